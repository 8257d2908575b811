"""Run a real forking server for a test: loopback only, always stopped."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

from thpguard import kernel


#: Seconds to wait for a server to come up or for its workers to answer.
#: Long on purpose: it only turns a hang into a failure (this host may be
#: busy with other work).
WAIT = 60.0

#: The address a server under test binds: port 0, so the kernel picks a
#: free port (other test runs may share this host); listening_port() reads it.
ANY_PORT = "127.0.0.1:0"


def listening_port(pid: int) -> Optional[int]:
    """The TCP port ``pid`` listens on (on 127.0.0.1), from /proc; None while it has none.

    The server's sockets (``/proc/PID/fd``) matched by inode against its
    network namespace's TCP table, state 0A (LISTEN).
    """
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open(f"/proc/{pid}/net/tcp") as f:
            lines = f.read().splitlines()[1:]
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and inode in inodes:
            return int(local.split(":")[1], 16)
    return None


def get(port: int, path: str, timeout: float = WAIT) -> dict:
    """GET ``path`` from 127.0.0.1:``port`` (no proxy) and decode the JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise AssertionError(f"GET {path}: HTTP {response.status}: {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def children(pid: int) -> List[int]:
    """Direct children of ``pid``, from /proc (Linux 3.5+ children file)."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(x) for x in f.read().split()]
        except FileNotFoundError:  # a thread that ended meanwhile (the guard's, at fork)
            continue
    return sorted(found)


def describe(pid: int) -> str:
    """What ``pid`` is doing, for a failure message: each thread's state,
    wait channel and top 6 kernel frames (/proc), and where gdb is
    installed its user stacks (25 frames a thread, 120 lines in all; gdb
    stops the process while it reads, up to 30 s)."""
    lines = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except FileNotFoundError:
        return f"pid {pid}: gone"
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat") as f:
                stat = f.read()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            state = stat[stat.rindex(")") + 2]
            with open(f"{base}/wchan") as f:
                wchan = f.read()
            try:
                with open(f"{base}/stack") as f:
                    stack = " < ".join(x.split()[1].split("+")[0] for x in f.read().splitlines()[:6])
            except OSError:
                stack = "?"
        except (OSError, ValueError):
            continue
        lines.append(f"  tid {tid} {comm!r} state {state} wchan {'-' if wchan in ('', '0') else wchan}; "
                     f"kernel stack {stack}")
    gdb = shutil.which("gdb")
    if gdb:
        try:
            out = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt 25"],
                                 capture_output=True, text=True, timeout=30).stdout
            lines += ["  " + x for x in out.splitlines() if x.startswith(("#", "Thread"))][:120]
        except (OSError, subprocess.SubprocessError) as exc:
            lines.append(f"  gdb: {exc}")
    return f"pid {pid}:\n" + "\n".join(lines)


def huge_bytes(pid: int, start: int, end: int) -> int:
    """AnonHugePages of ``pid``'s VMAs inside [start, end), from its smaps."""
    return sum(
        v.fields.get("AnonHugePages", 0)
        for v in kernel.read_smaps(pid)
        if v.start >= start and v.end <= end
    )


@contextlib.contextmanager
def serve(argv: List[str], env: Optional[Dict[str, str]] = None,
          cwd: Optional[str] = None, ready_path: str = "/state", timeout: float = WAIT):
    """Start ``argv`` (which binds :data:`ANY_PORT`) in its own session, wait
    until it answers, yield ``(proc, port)``, and stop it after.

    The server is sent SIGTERM, then its whole process group SIGKILL, even
    when the test fails or the server never came up; its output is attached to any
    failure to start.
    """
    with tempfile.NamedTemporaryFile(prefix="thpguard-server-", suffix=".log") as log:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        def failed(why):
            log.seek(0)
            return AssertionError(f"{why}:\n{log.read().decode(errors='replace')[-3000:]}")

        try:
            deadline = time.monotonic() + timeout
            port = None
            while True:
                if proc.poll() is not None:
                    raise failed(f"server exited with {proc.returncode}")
                port = port or listening_port(proc.pid)
                if port:
                    try:
                        get(port, ready_path, timeout=timeout)
                        break
                    except (OSError, http.client.HTTPException):
                        pass
                if time.monotonic() > deadline:
                    raise failed(f"server did not answer within {timeout:g} s "
                                 f"(listening on port {port})")
                time.sleep(0.1)
            yield proc, port
        finally:
            _stop(proc)


def wait_for_workers(master: int, count: int, timeout: float = WAIT) -> List[int]:
    """The pids of the ``count`` children of ``master``, once it has forked them all."""
    deadline = time.monotonic() + timeout
    while len(children(master)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {count} workers of {master}; "
                                 f"it has {children(master)}")
        time.sleep(0.05)
    return children(master)


@contextlib.contextmanager
def pin_every_worker(port: int, workers: List[int], block: int = 0, timeout: float = WAIT):
    """Pin each of ``workers`` (HTTP server workers) with one ``/pin``
    request (tests/probe_app.py); see :func:`pin_workers`."""
    with pin_workers(workers, lambda folder: get(port, f"/pin?dir={folder}&block={block}",
                                                 4 * timeout), timeout) as reports:
        yield reports


@contextlib.contextmanager
def pin_workers(workers: List[int], send_pin, timeout: float = WAIT):
    """Pin each of ``workers``: ``send_pin(folder)`` (called once per worker,
    each in its own thread) asks for one pin (tests/pin_worker.py) and
    returns the worker's answer. Yields their reports (pid -> dict) while
    they are all held, then releases them and checks their answers.

    Deterministic: a pinned worker takes nothing else until released, so
    ``len(workers)`` concurrent pins land on that many different workers.
    """
    with tempfile.TemporaryDirectory(prefix="thpguard-pin-") as folder, \
            concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        os.chmod(folder, 0o1777)  # workers that dropped privileges report here too
        # The answers come after the release, well past the deadline below.
        answers = [pool.submit(send_pin, folder) for _ in workers]
        try:
            deadline = time.monotonic() + timeout
            while True:
                reports = {}
                for name in os.listdir(folder):
                    if name.endswith(".json"):
                        with open(os.path.join(folder, name)) as f:
                            report = json.load(f)
                        reports[report["pid"]] = report
                if len(reports) == len(workers):
                    break
                failed = [a.exception() for a in answers if a.done() and a.exception()]
                if failed or time.monotonic() > deadline:
                    stuck = "" if failed else "\n".join(describe(pid) for pid in workers
                                                         if pid not in reports)
                    raise AssertionError(f"not every worker took a pin within "
                                         f"{timeout:g} s: pinned {sorted(reports)} of "
                                         f"{sorted(workers)}; errors: {failed}\n{stuck}")
                time.sleep(0.02)
            assert set(reports) == set(workers), (sorted(reports), sorted(workers))
            yield reports
        finally:
            open(os.path.join(folder, "release"), "w").close()
        for answer in answers:
            reply = answer.result()
            assert reply["guard_running_after"], f"worker {reply['pid']}: guard not running after"


def wait_huge(pids: List[int], start: int, size: int, timeout: float = WAIT) -> Dict[int, int]:
    """Wait until each of ``pids`` has [start, start + size) all in huge
    pages (smaps); return the huge bytes each has when that holds or at the
    deadline."""
    deadline = time.monotonic() + timeout
    while True:
        huge = {pid: huge_bytes(pid, start, start + size) for pid in pids}
        if all(v == size for v in huge.values()) or time.monotonic() > deadline:
            return huge
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    # SIGTERM to the master only: it stops its workers in order (a worker
    # sent SIGTERM directly may start a graceful reload instead); then
    # SIGKILL to whatever is left of the process group.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
        pass
