"""Per-VMA huge-page coverage of any process, for ``thpguard status``,
``watch`` and ``guard``.

PAGEMAP_SCAN on ``/proc/PID/pagemap`` (Linux 6.7), classified by the one
block model (:mod:`thpguard.blocks`), gives each PMD-size block's kind;
without it, smaps ``AnonHugePages`` (plus ``Private_Hugetlb`` and
``Shared_Hugetlb`` for hugetlb mappings) gives the huge bytes per VMA and
split blocks are unknown. Reading another
process needs ptrace read access (same user and dumpable, or root).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import List, Optional

from . import _native, kernel
from .blocks import SOURCE_PAGEMAP_SCAN, SOURCE_SMAPS, BlockMap, classify


_MARKER = "/memfd:" + _native.MARKER_PREFIX
_POOL_MARKER = "/memfd:" + _native.POOL_MARKER_PREFIX


def _marker_label(previous: Optional[kernel.Vma], vma: kernel.Vma, prefix: str) -> Optional[str]:
    """What follows *prefix* in the name of *previous*, a marker page right below *vma*."""
    if previous is None or previous.end != vma.start or not previous.path.startswith(prefix):
        return None
    return previous.path[len(prefix):].split(" (deleted)")[0]


def _marked_region(previous: Optional[kernel.Vma], vma: kernel.Vma) -> "tuple[Optional[str], Optional[str]]":
    """(name, copy mechanism) when *previous* is a thpguard region's marker
    page right below *vma*: the name "" when unnamed, the mechanism None
    unless it is a ``copy`` region; (None, None) for any other VMA."""
    label = _marker_label(previous, vma, _MARKER)
    if label is None:
        return None, None
    name, _, copy_mode = label.partition(_native.MARKER_COPY)
    return name, copy_mode or None


def _pool_end(previous: Optional[kernel.Vma], vma: kernel.Vma) -> Optional[int]:
    """Where the lazy copy's pool ends when *previous* is its marker page
    right below *vma* (the marker names the pool's length)."""
    label = _marker_label(previous, vma, _POOL_MARKER)
    return vma.start + int(label) if label is not None and label.isdigit() else None


def cgroup_of(pid, roots: Optional[kernel.Roots] = None) -> Optional[str]:
    """The cgroup path of *pid* that governs its memory (the v1 memory
    controller's on a v1 or hybrid host, else the v2 one); None if unreadable."""
    return kernel.cgroup_path(pid, roots)


class ProcessGone(Exception):
    """The process exited (or never existed, or its PID now belongs to
    another process), or has no user memory.

    ``reason`` is a sentence for the user ("PID 7 is a zombie: ..."); it
    names a zombie or a kernel thread when that is why.
    """

    def __init__(self, pid, reason: Optional[str] = None) -> None:
        super().__init__(pid)
        self.pid = pid
        self.reason = reason or f"no process with PID {pid}"

    def __str__(self) -> str:
        return self.reason


# PF_KTHREAD, the 9th field of /proc/PID/stat (include/linux/sched.h); the
# status line "Kthread:" is only in newer kernels.
_PF_KTHREAD = 0x00200000


def why_no_memory(pid, roots: Optional[kernel.Roots] = None) -> str:
    """Why ``pid`` has no memory map to read: a sentence naming a zombie or
    a kernel thread, else that the process does not exist (any more)."""
    base = os.path.join((roots or kernel.Roots.from_env()).proc, str(pid))
    try:
        with open(os.path.join(base, "stat"), "rb") as f:
            text = f.read().decode("utf-8", "replace")
        name, _, rest = text.partition(" (")[2].rpartition(")")
        fields = rest.split()
        state, flags = fields[0], int(fields[6])
    except (OSError, ValueError, IndexError):
        return f"no process with PID {pid} (it never existed, or it has exited)"
    if flags & _PF_KTHREAD:
        return (f"PID {pid} ({name}) is a kernel thread: it has no user memory to show or repair")
    if state in ("Z", "X", "x"):
        return (f"PID {pid} ({name}) has exited (a zombie its parent has not reaped): it has no "
                "memory any more")
    return f"PID {pid} ({name}) has no memory map (it is exiting)"


@dataclasses.dataclass
class VmaCoverage:
    """Huge-page state of one VMA, from the one block model
    (:mod:`thpguard.blocks`). Sizes in bytes. ``blocks`` is the per-block
    detail, None when only smaps was available."""

    start: int
    end: int
    perms: str
    path: str
    thp_eligible: Optional[bool]
    advised: bool
    huge_bytes: int
    present_bytes: Optional[int]
    blocks: Optional[BlockMap]
    #: For a thpguard region (found by its marker page): its name, "" when
    #: unnamed; None for every other VMA.
    region: Optional[str] = None
    #: For a thpguard ``copy`` region: how it copies ("kernel", "userfault",
    #: "eager", "hugetlb-eager"; :attr:`thpguard.Region.copy_mode`); else None.
    copy_mode: Optional[str] = None
    #: For a ``userfault`` copy region: whether this process has it
    #: registered for write-protect faults now (VmFlags ``uw``), which a
    #: child that could not arm lacks (its writes split); else None.
    copy_armed: Optional[bool] = None
    #: True for the lazy copy's pool of pre-faulted huge pages (found by
    #: its marker page): spare memory of the handler, not a leak.
    copy_pool: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def label(self) -> str:
        """What ``thpguard status`` shows in its path column: a region with
        its name and copy mechanism, the lazy copy's pool, else the path."""
        if self.copy_pool:
            return "* thpguard copy pool (pre-faulted huge pages for the lazy copy, not a leak)"
        if self.region is None:
            return self.path
        label = f"* thpguard region {self.region!r}" if self.region else "* thpguard region"
        if self.copy_mode:
            label += f" copy={self.copy_mode}"
            if self.copy_armed is False:
                label += (" (not armed: its writes split; see copy_stats()['arm_errno'] in that "
                          "process for why; the guard repairs the splits)")
        return label

    @property
    def pmd_mapped_bytes(self) -> int:
        """Deprecated name of ``huge_bytes``."""
        return self.huge_bytes

    @property
    def split_block_addresses(self) -> Optional[List[int]]:
        """Start addresses of the ``split`` blocks; None without detail."""
        return None if self.blocks is None else list(self.blocks.split)

    @property
    def split_blocks(self) -> Optional[int]:
        """Number of ``split`` blocks; None without detail."""
        return None if self.blocks is None else len(self.blocks.split)

    @property
    def partial_blocks(self) -> Optional[int]:
        """Number of ``partial`` blocks; None without detail."""
        return None if self.blocks is None else len(self.blocks.partial)

    def as_dict(self) -> dict:
        return {
            "advised": self.advised,
            "copy_armed": self.copy_armed,
            "copy_mode": self.copy_mode,
            "copy_pool": self.copy_pool,
            "end": self.end,
            "huge_bytes": self.huge_bytes,
            "partial_blocks": self.partial_blocks,
            "path": self.path,
            "perms": self.perms,
            "pmd_mapped_bytes": self.huge_bytes,
            "present_bytes": self.present_bytes,
            "region": self.region,
            "size": self.size,
            "split_blocks": self.split_blocks,
            "split_block_addresses": self.split_block_addresses,
            "start": self.start,
            "thp_eligible": self.thp_eligible,
        }


@dataclasses.dataclass
class ProcessCoverage:
    pid: int
    name: Optional[str]
    source: str
    pmd_size: int
    vmas: List[VmaCoverage]
    #: The process's cgroup (v2 path, else the memory controller's), or None.
    cgroup: Optional[str] = None

    def totals(self, only_eligible: bool = False) -> dict:
        """Sums over the VMAs, in bytes (blocks for the ``*_blocks`` keys).

        The lazy copy's pool (``copy_pool`` VMAs) is not counted in
        ``eligible_bytes``, ``huge_bytes`` or the block counts: it is spare
        huge pages the copy takes blocks from, not memory of the program.
        It has its own keys, ``copy_pool_bytes`` and
        ``copy_pool_huge_bytes``; ``size`` and ``vmas`` count every VMA.
        """
        vmas = [v for v in self.vmas if v.thp_eligible or not only_eligible]
        pool = [v for v in vmas if v.copy_pool]
        memory = [v for v in vmas if not v.copy_pool]
        detail = self.source != SOURCE_SMAPS
        huge = sum(v.huge_bytes for v in memory)
        return {
            "copy_pool_bytes": sum(v.size for v in pool),
            "copy_pool_huge_bytes": sum(v.huge_bytes for v in pool),
            "eligible_bytes": sum(v.size for v in memory if v.thp_eligible),
            "huge_bytes": huge,
            "partial_blocks": sum(v.partial_blocks or 0 for v in memory) if detail else None,
            "pmd_mapped_bytes": huge,
            "size": sum(v.size for v in vmas),
            "split_blocks": sum(v.split_blocks or 0 for v in memory) if detail else None,
            "vmas": len(vmas),
        }

    def split_addresses(self) -> set:
        """Start addresses of the split blocks of THP-eligible VMAs, the
        lazy copy's pool left out (what ``watch`` follows)."""
        return {b for v in self.vmas if v.thp_eligible and not v.copy_pool
                for b in (v.split_block_addresses or ())}

    @staticmethod
    def pool_note(totals: dict) -> str:
        """The lazy copy's pool from :meth:`totals`, which leave it out, as
        ``status`` and ``watch`` print it apart."""
        from ._checks import fmt_bytes  # noqa: PLC0415 - same layer, only for this text

        return (f"copy pool {fmt_bytes(totals['copy_pool_bytes'])} "
                f"({fmt_bytes(totals['copy_pool_huge_bytes'])} PMD-mapped, not counted)")


def _error(exc: OSError, pid: int, what: str) -> OSError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionError(exc.errno, f"not allowed to read {what} of PID {pid}: it needs ptrace read "
                                          "access (the same user and a dumpable process, or root; even as root a "
                                          "container or a security module such as Yama, SELinux or AppArmor "
                                          "can still refuse it)")
    return exc


def scan_process(pid: int, pmd: Optional[int] = None, roots: Optional[kernel.Roots] = None,
                 use_scan: bool = True) -> ProcessCoverage:
    """Coverage of every VMA of *pid*.

    Raises :class:`ProcessGone` if the process does not exist (any more),
    ``PermissionError`` (with a message saying what access is missing) when
    its memory map may not be read.
    """
    pmd = pmd or kernel.pmd_size(roots) or 2 * 1024 * 1024
    try:
        vmas = kernel.read_smaps(pid, roots)
        name = kernel.read_status(pid, roots).name
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid, why_no_memory(pid, roots)) from None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessGone(pid, why_no_memory(pid, roots)) from None
        raise _error(exc, pid, "the memory map") from None
    if not vmas:
        # Zombies and kernel threads have no mm: an empty smaps, ESRCH on pagemap.
        raise ProcessGone(pid, why_no_memory(pid, roots))
    fd = -1
    source = SOURCE_SMAPS
    if use_scan:
        try:
            fd = os.open(os.path.join((roots or kernel.Roots.from_env()).proc, str(pid), "pagemap"),
                         os.O_RDONLY | os.O_CLOEXEC)
            source = SOURCE_PAGEMAP_SCAN
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGone(pid, why_no_memory(pid, roots)) from None
        except OSError as exc:
            raise _error(exc, pid, "the page map") from None
    out: List[VmaCoverage] = []
    previous = None
    pool_end = 0
    try:
        for v in vmas:
            region, copy_mode = _marked_region(previous, v)
            pool_end = _pool_end(previous, v) or pool_end
            cov = VmaCoverage(v.start, v.end, v.perms, v.path, v.thp_eligible, v.advised_huge,
                              (v.huge_bytes or 0) + (v.hugetlb_bytes or 0), v.rss, None,
                              region, copy_mode,
                              "uw" in v.vm_flags if copy_mode == "userfault" else None,
                              v.start < pool_end)  # mremap (Linux 6.7) splits the pool's VMA
            previous = v
            if source == SOURCE_PAGEMAP_SCAN and v.path != "[vsyscall]":
                try:
                    runs = _native.pagemap_scan(fd, v.start, v.end)
                    cov.huge_bytes, cov.present_bytes, cov.blocks = classify(
                        runs, v.start, v.end, pmd)
                except OSError as exc:
                    if exc.errno == errno.ENOTTY:  # PAGEMAP_SCAN is Linux 6.7+
                        source = SOURCE_SMAPS
                        for c in out:
                            c.blocks = None
                    elif exc.errno == errno.ESRCH:
                        raise ProcessGone(pid, why_no_memory(pid, roots)) from None
                    elif exc.errno not in (errno.EINVAL, errno.EFAULT):
                        raise _error(exc, pid, "the page map") from None
            out.append(cov)
    finally:
        if fd >= 0:
            os.close(fd)
    if source == SOURCE_SMAPS:
        for c in out:
            c.blocks = None
    return ProcessCoverage(int(pid) if str(pid).isdigit() else os.getpid(), name, source, pmd, out,
                           cgroup_of(pid, roots))
