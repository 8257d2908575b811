"""An unmodified Redis for the node agent's test and benchmark.

:class:`RedisServer` starts the distribution's ``redis-server`` on a free
loopback port in a private directory (no persistence, ``disable-thp no``)
and always stops it; :class:`Writer` keeps overwriting random keys from a
thread; :func:`heap_coverage` reads the server's smaps (ground truth).
The tiny RESP client below is enough for the commands used here, so no
Redis client library is needed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import List, Optional, Tuple

KEY_FORMAT = "key:%012d"  # what redis-benchmark -r makes of key:__rand_int__

_FILL = """
local v = string.rep('x', tonumber(ARGV[3]))
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do
  redis.call('SET', string.format('key:%012d', i), v)
end
return 1
"""


class RedisError(Exception):
    """Redis answered with an error, or could not be started."""


def unavailable_reason() -> Optional[str]:
    """Why Redis cannot be run here, or None."""
    for tool in ("redis-server", "redis-benchmark"):
        if not shutil.which(tool):
            return f"{tool} is not installed (tests/install-services.sh installs redis-server and redis-tools)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One RESP connection."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    @staticmethod
    def encode(*args) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def read(self):
        line = self.file.readline()
        if not line:
            raise RedisError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            return [self.read() for _ in range(int(rest))]
        raise RedisError(f"unexpected reply {line[:40]!r}")

    def call(self, *args):
        self.sock.sendall(self.encode(*args))
        return self.read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class RedisServer:
    """``redis-server`` on 127.0.0.1 at a free port, in a private temporary
    directory; use as a context manager (always stopped and cleaned up)."""

    def __init__(self, extra: Tuple[str, ...] = ()) -> None:
        self.dir = tempfile.mkdtemp(prefix="thpguard-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--disable-thp", "no", "--dir", self.dir,
             "--dbfilename", "dump.rdb", "--logfile", os.path.join(self.dir, "redis.log"), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client = Client(self.port)
                if self.client.call("PING") == "PONG":
                    break
            except (OSError, RedisError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                self.stop()
                raise RedisError(f"redis-server did not start on port {self.port}: {err.strip()[:300]}")
            time.sleep(0.05)

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def call(self, *args):
        return self.client.call(*args)

    def fill(self, keys: int, value_bytes: int, chunk: int = 50_000) -> None:
        """SET key:000000000000 .. key:<keys-1> to values of *value_bytes*."""
        for lo in range(0, keys, chunk):
            self.call("EVAL", _FILL, 0, lo, min(keys, lo + chunk), value_bytes)

    def info(self, section: str) -> dict:
        text = self.call("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def bgsave(self, timeout: float = 300.0) -> Tuple[float, float]:
        """Run BGSAVE and wait until the child has exited; (start, end) in
        ``time.monotonic()`` seconds."""
        started = time.monotonic()
        self.call("BGSAVE")  # answers once the child is forked
        deadline = started + timeout
        while time.monotonic() < deadline:
            info = self.info("persistence")
            if info.get("rdb_bgsave_in_progress") == "0":  # the child is reaped
                if info.get("rdb_last_bgsave_status") != "ok":
                    raise RedisError("BGSAVE failed (see redis.log)")
                return started, time.monotonic()
            time.sleep(0.02)
        raise RedisError("BGSAVE did not finish in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.client.call("SHUTDOWN", "NOSAVE")
            except (OSError, RedisError, AttributeError):
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
        if hasattr(self, "client"):
            try:
                self.client.close()
            except OSError:
                pass
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Writer:
    """Overwrites random existing keys (pipelined SETs) from a thread until
    :meth:`stop`; ``ops`` counts acknowledged writes."""

    def __init__(self, port: int, keys: int, value_bytes: int, batch: int = 64) -> None:
        self.port, self.keys, self.batch = port, keys, batch
        self.value = b"y" * value_bytes
        self.ops = 0
        self._stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="redis-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            c = Client(self.port)
            rng = random.Random(1)
            while not self._stop.is_set():
                payload = b"".join(Client.encode("SET", KEY_FORMAT % rng.randrange(self.keys), self.value)
                                   for _ in range(self.batch))
                c.sock.sendall(payload)
                for _ in range(self.batch):
                    c.read()
                self.ops += self.batch
            c.close()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> int:
        self._stop.set()
        self.thread.join(30)
        if self.error is not None:
            raise RedisError(f"writer failed: {self.error}")
        return self.ops


def heap_coverage(pid: int) -> Tuple[int, int]:
    """(PMD-mapped bytes, resident bytes) over the private anonymous VMAs of
    *pid* (Redis's jemalloc heap), from ``/proc/PID/smaps``."""
    from thpguard import kernel  # noqa: PLC0415

    huge = resident = 0
    for v in kernel.read_smaps(pid):
        if v.path and v.path != "[heap]":
            continue
        huge += v.fields.get("AnonHugePages", 0)
        resident += v.fields.get("Anonymous", 0)
    return huge, resident


def sample_until(pid: int, seconds: float, target: Optional[int] = None, step: float = 0.25,
                 stop_at_target: bool = False) -> Tuple[List[Tuple[float, int, int]], Optional[float]]:
    """Sample :func:`heap_coverage` for *seconds* (or until PMD-mapped bytes
    reach *target*, with *stop_at_target*); returns the samples ``(seconds,
    huge bytes, resident bytes)`` and the first time *target* was reached."""
    samples, reached = [], None
    t0 = time.monotonic()
    while True:
        now = time.monotonic() - t0
        huge, resident = heap_coverage(pid)
        samples.append((round(now, 3), huge, resident))
        if reached is None and target is not None and huge >= target:
            reached = now
        if now >= seconds or (stop_at_target and reached is not None):
            return samples, reached
        time.sleep(step)
