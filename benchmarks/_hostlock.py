"""One lock for the host's hugetlb pools, shared by the tests and the benchmarks.

The pools are host-wide: two runs that grow a pool, count its free pages and
then fault pages from it (two test suites, a suite and a benchmark) would
take each other's pages, and a hugetlb copy-on-write without a free page is
a SIGBUS. Whoever grows a pool for a test or a benchmark step holds this lock
(``flock`` on a file under /run/lock) until the pages are given back, so
such runs take turns. Other programs on the host do not take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator

PATH = "/run/lock/thpguard-hugetlb-pool.lock"


_held = 0  # nesting depth in this process (flock would block on a second descriptor)


@contextlib.contextmanager
def hugetlb_pool_lock(timeout: float = 600.0) -> Iterator[None]:
    """Hold the pool lock for the block (re-entrant within a process);
    TimeoutError after *timeout* seconds of waiting, naming the lock file
    (``fuser`` on it shows the holder)."""
    global _held
    if _held:
        _held += 1
        try:
            yield
        finally:
            _held -= 1
        return
    path = PATH if os.path.isdir(os.path.dirname(PATH)) else os.path.join("/tmp", os.path.basename(PATH))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:g} s for the hugetlb pool lock {path}") from None
                time.sleep(0.1)
        _held = 1
        try:
            yield
        finally:
            _held = 0
    finally:
        os.close(fd)  # releases the lock
