"""A process that does not import thpguard, for the node agent's tests.

``python agent_victim.py SIZE_MB [--nohugepage] [--thp-disable]`` maps
SIZE_MB of private anonymous memory (never advised MADV_HUGEPAGE), writes
every page, prints one JSON line ``{"pid", "start", "end"}`` and then
obeys one command per stdin line, answering one line each:

- ``fork``: fork a child that sleeps (shares every page); answers its PID;
- ``write``: write one byte in the second page of every 2 MiB block;
- ``reap``: kill the child and wait for it;
- ``exit``: exit.
"""

import ctypes
import json
import mmap
import os
import signal
import sys

PR_SET_THP_DISABLE = 41


def main() -> None:
    size = int(sys.argv[1]) << 20
    if "--thp-disable" in sys.argv:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if "--nohugepage" in sys.argv:
        m.madvise(mmap.MADV_NOHUGEPAGE)
    for off in range(0, size, 4096):
        m[off] = 1
    start = ctypes.addressof(ctypes.c_char.from_buffer(m))
    print(json.dumps({"pid": os.getpid(), "start": start, "end": start + size}), flush=True)
    child = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "fork":
            child = os.fork()
            if child == 0:
                signal.pause()
                os._exit(0)
            print(child, flush=True)
        elif cmd == "write":
            for off in range(0, size - 4096, 2 << 20):
                m[off + 4096] = 2
            print("ok", flush=True)
        elif cmd == "reap":
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            child = 0
            print("ok", flush=True)
        elif cmd == "exit":
            break
    if child:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


if __name__ == "__main__":
    main()
