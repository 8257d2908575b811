"""Run a real forking server for a test: loopback only, always stopped."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

from thpguard import kernel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5.0) -> dict:
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


def get_many(port: int, paths: List[str], then=None, timeout: float = 10.0) -> list:
    """GET ``paths`` concurrently (one connection each); replies in order.

    With ``then``, each item is ``(reply, then(reply))``, ``then`` called in
    the request's thread as soon as its reply is in.
    """
    def one(path):
        reply = get(port, path, timeout)
        return reply if then is None else (reply, then(reply))

    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(one, paths))


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


def huge_bytes(pid: int, start: int, end: int) -> int:
    """AnonHugePages of ``pid``'s VMAs inside [start, end), from its smaps."""
    return sum(
        v.fields.get("AnonHugePages", 0)
        for v in kernel.read_smaps(pid)
        if v.start >= start and v.end <= end
    )


@contextlib.contextmanager
def serve(argv: List[str], port: int, env: Optional[Dict[str, str]] = None,
          cwd: Optional[str] = None, ready_path: str = "/state", timeout: float = 30.0):
    """Start ``argv`` in its own session, wait until it answers, stop it after.

    The server is sent SIGTERM, then its whole process group SIGKILL, even
    when the test fails or the server never came up; its output is attached to any
    failure to start.
    """
    log_path = f"/tmp/thpguard-server-{os.getpid()}-{port}.log"
    with open(log_path, "w+b") as log:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"server exited with {proc.returncode}:\n"
                                         f"{log.read().decode(errors='replace')[-3000:]}")
                try:
                    get(port, ready_path, timeout=2.0)
                    break
                except (OSError, http.client.HTTPException):
                    if time.monotonic() > deadline:
                        log.seek(0)
                        raise AssertionError("server did not answer in time:\n"
                                             + log.read().decode(errors="replace")[-3000:])
                    time.sleep(0.1)
            yield proc
        finally:
            _stop(proc)
            os.unlink(log_path)


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
