"""Coverage of any range of any process: PAGEMAP_SCAN, with an smaps fallback.

:func:`coverage` asks the kernel each time and classifies the answer with
the one block model (:mod:`thpguard.blocks`). Nothing is cached except this
process's pagemap descriptor, which the fork layer's per-process state
reopens in every child: an fd opened before fork keeps reading the parent's
address space (``fs/proc/task_mmu.c`` binds the mm at open).

A process that dropped privileges (``setuid()`` from root, as gunicorn
``--user`` or uWSGI ``--uid`` workers do) or is not dumpable cannot open its
own ``/proc/self/pagemap``: the file is then owned by root with mode 0400.
The descriptor is opened eagerly (at import and in each new child, before
a worker drops privileges), and kept across a later drop when that is
sound: when the opener could not see page frame numbers (no
``CAP_SYS_ADMIN``), or its user did not change. A descriptor opened by root
is not kept across a change of user, because it would show the frame
numbers to the unprivileged process. Where no descriptor can be had,
coverage comes from ``/proc/self/smaps`` (always readable), without
per-block detail, and a warning is logged once.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import List, Optional, Union

from . import _fork, _native, kernel
from .blocks import SOURCE_PAGEMAP_SCAN, SOURCE_SMAPS, Coverage, Run
from .errors import InvalidArgumentError, InvalidTypeError, KernelCallError, kernel_error

__all__ = ["Coverage", "coverage", "scan", "smaps_coverage", "runs", "SOURCE_PAGEMAP_SCAN",
           "SOURCE_SMAPS"]

log = logging.getLogger("thpguard")

Pid = Union[int, str]

_CAP_SYS_ADMIN = 21
_ADDRESS_LIMIT = 1 << 64


class _PagemapFile:
    """This process's /proc/self/pagemap fd (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._pid = -1
        self._identity = None  # (st_dev, st_ino) of the fd we opened
        self._opener_uid = -1
        self._privileged = False
        self.denied: Optional[str] = None  # why there is no fd, once refused
        self._warned = False

    def for_child(self) -> "_PagemapFile":
        """The child's file: the parent's fd reads the parent's mm; close it
        unless the program has closed and reused that number already (a fork
        that bypassed Python, noticed late): then it is not ours to close."""
        fd = self._fd
        if fd >= 0:
            try:
                st = os.fstat(fd)
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self._identity:
                os.close(fd)
        child = _PagemapFile()
        child.open_quietly()
        return child

    def open_quietly(self) -> None:
        with self._lock:
            try:
                self._open()
            except OSError:
                pass

    def _open(self) -> None:
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                self.denied = (f"/proc/self/pagemap cannot be opened ({errno.errorcode[exc.errno]}: "
                               "the process dropped privileges or is not dumpable)")
            raise
        st = os.fstat(fd)
        self._fd, self._pid, self._identity = fd, os.getpid(), (st.st_dev, st.st_ino)
        self._opener_uid = os.geteuid()
        try:
            cap = kernel.read_status("self", kernel.Roots()).cap_eff
        except OSError:
            cap = None
        self._privileged = cap is None or bool(cap >> _CAP_SYS_ADMIN & 1)
        self.denied = None

    def _still_ours(self) -> bool:
        try:
            st = os.fstat(self._fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def fd(self) -> int:
        """The fd, or -1 where the process may not open its page map."""
        with self._lock:
            if self._fd >= 0 and self._pid == os.getpid() and not self._still_ours():
                self._fd = -1  # closed behind our back (closerange), maybe reused: not ours
            if self._fd >= 0 and self._pid == os.getpid():
                if not self._privileged or os.geteuid() == self._opener_uid:
                    return self._fd
                # Root's fd would show frame numbers after the drop.
                os.close(self._fd)
                self._fd = -1
            try:
                self._open()
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM):
                    raise kernel_error(exc.errno, "open(/proc/self/pagemap)") from None
                if not self._warned:
                    self._warned = True
                    log.warning("%s; coverage comes from /proc/self/smaps, without per-block "
                                "detail", self.denied)
                return -1
            return self._fd


def _self_pagemap() -> _PagemapFile:
    return _fork.state.get("pagemap.file", _make_file, _PagemapFile.for_child)


def _make_file() -> _PagemapFile:
    f = _PagemapFile()
    f.open_quietly()
    return f


def _scan_state() -> dict:
    # Whether PAGEMAP_SCAN works on this kernel (None: not asked yet).
    return _fork.state.get("pagemap.scan", lambda: {"supported": None}, dict)


def scan_supported() -> Optional[bool]:
    """Whether PAGEMAP_SCAN works here: None until the first coverage()."""
    return _scan_state()["supported"]


def scan(fd: int, start: int, end: int, pmd: int) -> Coverage:
    """Coverage of ``[start, end)`` from PAGEMAP_SCAN on an open pagemap fd."""
    return Coverage.from_runs(_native.pagemap_scan(fd, start, end), start, end, pmd)


def smaps_coverage(start: int, end: int, pmd: int, pid: Pid = "self") -> Coverage:
    """Coverage of ``[start, end)`` from ``/proc/PID/smaps`` (no per-range detail).

    Sums ``AnonHugePages`` and ``Rss`` over the VMAs inside the range; a
    thpguard region is one VMA (or several, after a partial ``mprotect``),
    so this stays per region.
    """
    huge = present = 0
    try:
        vmas = kernel.read_smaps(pid)
    except OSError as exc:
        raise kernel_error(exc.errno, f"read /proc/{pid}/smaps") from None
    for vma in vmas:
        if vma.start >= start and vma.end <= end:
            huge += vma.fields.get("AnonHugePages", 0)
            present += vma.fields.get("Rss", 0)
    return Coverage(start, end - start, huge, present, None, pmd, SOURCE_SMAPS)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arguments(start, end, pmd, pid) -> int:
    """Validate :func:`coverage`'s arguments; the PMD size to use."""
    for name, value in (("start", start), ("end", end)):
        if not _is_int(value):
            raise InvalidTypeError(f"{name} must be an int address, got {type(value).__name__}")
    if not 0 <= start <= end <= _ADDRESS_LIMIT:
        raise InvalidArgumentError(
            f"need 0 <= start <= end <= 2**64, got start={start:#x} end={end:#x}"
        )
    if pmd is None:
        pmd = kernel.pmd_size()
    elif not _is_int(pmd) or pmd <= 0 or pmd & (pmd - 1):
        raise InvalidArgumentError(f"pmd must be a power-of-two int of bytes or None, got {pmd!r}")
    if not (pid == "self" or (_is_int(pid) and pid > 0)
            or (isinstance(pid, str) and pid.isascii() and pid.isdigit())):
        raise InvalidArgumentError(f"pid must be a positive int or 'self', got {pid!r}")
    return pmd


def runs(start: int, end: int, pid: Pid = "self", fd: Optional[int] = None) -> Optional[List[Run]]:
    """PAGEMAP_SCAN runs of ``[start, end)``, or None where only smaps can
    answer (no PAGEMAP_SCAN, or this process may not read its page map)."""
    state = _scan_state()
    if state["supported"] is False:
        return None
    own = pid == "self" or pid == os.getpid()
    close = False
    if fd is None and own:
        fd = _self_pagemap().fd()
        if fd < 0:
            return None
    elif fd is None:
        try:
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise kernel_error(exc.errno, f"open(/proc/{pid}/pagemap)") from None
        close = True
    try:
        result = _native.pagemap_scan(fd, start, end)
    except KernelCallError as exc:
        if exc.errno != errno.ENOTTY:
            raise
        # PAGEMAP_SCAN arrived in Linux 6.7; older kernels answer ENOTTY.
        state["supported"] = False
        return None
    finally:
        if close:
            os.close(fd)
    state["supported"] = True
    return result


def coverage(start: int, end: int, pmd: Optional[int] = None, pid: Pid = "self") -> Coverage:
    """Coverage of ``[start, end)`` in process ``pid`` (default: this one).

    Uses PAGEMAP_SCAN where the kernel has it (Linux 6.7) and the page map
    can be read, else smaps. Reading another process needs ptrace read
    access; failures raise :class:`~thpguard.errors.KernelCallError`
    (EACCES, EPERM, ESRCH, ...).
    """
    pmd = _check_arguments(start, end, pmd, pid)
    found = runs(start, end, pid)
    if found is None:
        return smaps_coverage(start, end, pmd, pid)
    return Coverage.from_runs(found, start, end, pmd)


# Open now: a process that imports thpguard and then drops privileges keeps
# a descriptor it may use (see the module docstring).
_self_pagemap()
