"""Which parts of a range are PMD-mapped: PAGEMAP_SCAN, with an smaps fallback.

:func:`coverage` is the single source of truth every other layer uses. It
asks the kernel each time (nothing is cached except the pagemap file
descriptor, which is reopened after fork: an fd opened before fork keeps
reading the parent's address space).
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

from . import _fork, _native, kernel
from .errors import InvalidArgumentError, InvalidTypeError, KernelCallError, kernel_error

Pid = Union[int, str]

SOURCE_PAGEMAP_SCAN = "pagemap_scan"
SOURCE_SMAPS = "smaps"


@dataclass(frozen=True)
class Coverage:
    """How much of a range the kernel maps with PMD-size huge pages.

    All sizes are bytes. ``split_ranges`` lists ``(start, end)`` address
    ranges, aligned to ``pmd_size``, that hold data but are not PMD-mapped
    (split after fork, or never huge); it is None when the kernel offers no
    per-range detail (no PAGEMAP_SCAN, Linux < 6.7: ``source == "smaps"``).
    """

    start: int
    total_bytes: int
    huge_bytes: int
    present_bytes: int
    split_ranges: Optional[Tuple[Tuple[int, int], ...]]
    pmd_size: int
    source: str

    @property
    def ratio(self) -> float:
        """``huge_bytes / total_bytes`` (0.0 for an empty range)."""
        return self.huge_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def split_bytes(self) -> Optional[int]:
        """Bytes in ``split_ranges``; None without per-range detail."""
        if self.split_ranges is None:
            return None
        return sum(end - start for start, end in self.split_ranges)

    @property
    def split_blocks(self) -> Optional[int]:
        """Number of PMD-size blocks in ``split_ranges``; None without detail."""
        split = self.split_bytes
        return None if split is None else split // self.pmd_size

    @property
    def complete(self) -> bool:
        """True when every byte of the range is PMD-mapped."""
        return self.huge_bytes == self.total_bytes

    def as_dict(self) -> dict:
        """A JSON-ready dict of every field and property."""
        return {
            "start": self.start,
            "total_bytes": self.total_bytes,
            "huge_bytes": self.huge_bytes,
            "present_bytes": self.present_bytes,
            "ratio": self.ratio,
            "split_ranges": None if self.split_ranges is None else [list(r) for r in self.split_ranges],
            "split_bytes": self.split_bytes,
            "split_blocks": self.split_blocks,
            "pmd_size": self.pmd_size,
            "source": self.source,
        }


class _PagemapFile:
    """This process's /proc/self/pagemap fd, reopened in every new process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._fd = -1
        self._identity = None  # (st_dev, st_ino) of the fd we opened
        self.scan_supported: Optional[bool] = None

    def after_fork_in_child(self, late: bool = False) -> None:
        # A parent thread may have held the lock at fork.
        self._lock = threading.Lock()
        # The inherited fd still reads the parent's mm (fs/proc/task_mmu.c
        # binds the mm at open). Close it, unless the program has closed
        # and reused that number already (possible when a fork that
        # bypassed Python is noticed late): then it is not ours to close.
        fd, self._fd, self._pid = self._fd, -1, -1
        if fd >= 0:
            try:
                st = os.fstat(fd)
            except OSError:
                return
            if (st.st_dev, st.st_ino) == self._identity:
                os.close(fd)

    def fd(self) -> int:
        with self._lock:
            if self._pid != os.getpid():
                self._fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                st = os.fstat(self._fd)
                self._identity = (st.st_dev, st.st_ino)
                self._pid = os.getpid()
            return self._fd


_self_pagemap = _PagemapFile()
_fork.subscribe("pagemap", after_in_child=_self_pagemap.after_fork_in_child, order=100)


def scan_supported() -> Optional[bool]:
    """Whether PAGEMAP_SCAN works here: None until the first coverage()."""
    return _self_pagemap.scan_supported


def _merge_block_ranges(runs, start: int, end: int, pmd: int):
    """Expand non-huge runs that hold data to PMD blocks, clip and merge."""
    merged: List[List[int]] = []
    for run_start, run_end in runs:
        lo = max(start, run_start - (run_start - start) % pmd)
        hi = min(end, run_end + (-(run_end - start)) % pmd)
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def scan(fd: int, start: int, end: int, pmd: int) -> Coverage:
    """Coverage of ``[start, end)`` from PAGEMAP_SCAN on an open pagemap fd.

    Blocks are counted from ``start``, which should be PMD-aligned.
    """
    huge = present = 0
    data_runs = []
    for run_start, run_end, cats in _native.pagemap_scan(fd, start, end):
        size = run_end - run_start
        has_data = cats & (_native.PAGE_IS_PRESENT | _native.PAGE_IS_SWAPPED)
        if cats & _native.PAGE_IS_PRESENT:
            present += size
        if cats & _native.PAGE_IS_HUGE and not cats & _native.PAGE_IS_PFNZERO:
            huge += size
        elif has_data and not cats & _native.PAGE_IS_PFNZERO:
            data_runs.append((run_start, run_end))
    return Coverage(
        start=start,
        total_bytes=end - start,
        huge_bytes=huge,
        present_bytes=present,
        split_ranges=_merge_block_ranges(data_runs, start, end, pmd),
        pmd_size=pmd,
        source=SOURCE_PAGEMAP_SCAN,
    )


def smaps_coverage(start: int, end: int, pmd: int, pid: Pid = "self") -> Coverage:
    """Coverage of ``[start, end)`` from ``/proc/PID/smaps`` (no per-range detail).

    Sums ``AnonHugePages`` and ``Rss`` over the VMAs inside the range; a
    thpguard region is one VMA, so this stays per region.
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


_ADDRESS_LIMIT = 1 << 64


def coverage(start: int, end: int, pmd: Optional[int] = None, pid: Pid = "self") -> Coverage:
    """Coverage of ``[start, end)`` in process ``pid`` (default: this one).

    Uses PAGEMAP_SCAN where the kernel has it (Linux 6.7), else smaps.
    Reading another process needs ptrace read access; failures raise
    :class:`~thpguard.errors.KernelCallError` (EACCES, EPERM, ESRCH, ...).
    """
    pmd = _check_arguments(start, end, pmd, pid)
    if _self_pagemap.scan_supported is False:
        return smaps_coverage(start, end, pmd, pid)
    own = pid == "self" or pid == os.getpid()
    try:
        if own:
            result = scan(_self_pagemap.fd(), start, end, pmd)
        else:
            try:
                fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise kernel_error(exc.errno, f"open(/proc/{pid}/pagemap)") from None
            try:
                result = scan(fd, start, end, pmd)
            finally:
                os.close(fd)
    except KernelCallError as exc:
        if exc.errno != errno.ENOTTY:
            raise
        # PAGEMAP_SCAN arrived in Linux 6.7; older kernels answer ENOTTY.
        _self_pagemap.scan_supported = False
        return smaps_coverage(start, end, pmd, pid)
    _self_pagemap.scan_supported = True
    return result
