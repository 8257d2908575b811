"""One lock for the host's hugetlb pools, shared by the tests and the benchmarks.

The pools are host-wide: two runs that grow a pool, count its free pages and
then fault pages from it (two test suites, a suite and a benchmark) would
take each other's pages, and a hugetlb copy-on-write without a free page is
a SIGBUS. Whoever grows a pool for a test or a benchmark step holds this lock
(``flock`` on a file under /run/lock) until the pages are given back, so
such runs take turns. Other programs on the host do not take it.

/run/lock (and /tmp, the fallback) is writable by every user, so the file is
opened with ``O_NOFOLLOW`` and must be a regular file, and a process running
as root refuses a lock file that root does not own: another user could
otherwise plant it (a symlink, a FIFO, a file of theirs) and hold it to
stall every run. Only root can grow a pool; a process that is not root takes
the lock where root's file exists and never creates it (a file of its own
would be refused by root's runs), and goes without the lock where there is
none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from typing import Iterator, Optional

PATH = "/run/lock/thpguard-hugetlb-pool.lock"


_held = 0  # nesting depth in this process (flock would block on a second descriptor)


class LockFileError(RuntimeError):
    """The lock file is not one this process may trust; says what to do."""


def _open(path: str) -> Optional[int]:
    """A descriptor of the lock file at ``path`` (created by root if
    missing), or None where a process that is not root finds no file."""
    root = os.geteuid() == 0
    # O_NONBLOCK: a FIFO planted there must not block the open.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_CREAT if root else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        return None  # not root, and no root run has made the file: nobody to take turns with
    except OSError as exc:
        raise LockFileError(
            f"cannot open the hugetlb pool lock file {path}: {exc.strerror} (a symlink or a file another "
            f"user planted in a world-writable directory?); check it with `ls -l {path}` and remove it"
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LockFileError(f"the hugetlb pool lock file {path} is not a regular file; remove it (rm {path})")
        if root and st.st_uid != 0:
            raise LockFileError(
                f"the hugetlb pool lock file {path} is owned by uid {st.st_uid}, not root: a file another user "
                f"made could be held to stall every run; remove it (rm {path}) and run again")
    except BaseException:
        os.close(fd)
        raise
    return fd


def default_path() -> str:
    return PATH if os.path.isdir(os.path.dirname(PATH)) else os.path.join("/tmp", os.path.basename(PATH))


@contextlib.contextmanager
def hugetlb_pool_lock(timeout: float = 600.0, path: Optional[str] = None) -> Iterator[None]:
    """Hold the pool lock for the block (re-entrant within a process);
    TimeoutError after *timeout* seconds of waiting, naming the lock file
    (``fuser`` on it shows the holder); :class:`LockFileError` where the
    file is not one to trust (see the module's text). *path* is for tests."""
    global _held
    if _held:
        _held += 1
        try:
            yield
        finally:
            _held -= 1
        return
    path = path or default_path()
    fd = _open(path)
    try:
        deadline = time.monotonic() + timeout
        while fd is not None:
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
        if fd is not None:
            os.close(fd)  # releases the lock
