"""What the node agent may repair in another process, and whether it is shared.

Reads only ``/proc``: which processes match the selection, who a PID is
(its start time, so a reused PID is never mistaken for the process the
agent knew), which VMAs are private anonymous memory the agent may touch,
which PMD-size blocks there hold data on small pages, and whether those
pages are mapped by this process alone (``/proc/PID/pagemap`` bit 56,
"page exclusively mapped", Linux 4.2). Reading another process's
``smaps`` and ``pagemap`` needs ptrace read access: the same user and a
dumpable process, or CAP_SYS_PTRACE.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import fnmatch
import os
from typing import List, Optional

from . import _native, _procmap, kernel
from ._procmap import ProcessGone
from .blocks import classify
from ._agentconfig import AgentConfig, Selection

PAGE = os.sysconf("SC_PAGE_SIZE")
_PM_PRESENT = 1 << 63
_PM_EXCLUSIVE = 1 << 56

# VmFlags the agent never collapses in: MADV_NOHUGEPAGE (nh), hugetlb (ht),
# device and PFN maps (io, pf), userfaultfd-registered ranges (um, uw:
# MADV_COLLAPSE answers EBUSY), and shared mappings (sh).
NEVER_FLAGS = frozenset({"nh", "ht", "io", "pf", "um", "uw", "sh"})


@dataclasses.dataclass
class ProcessInfo:
    """What selection needs to know about a process, from ``/proc/PID``."""

    pid: int
    start_time: int
    command: str
    cgroup: str
    thp_enabled: Optional[bool]
    rss_anon: Optional[int]


def list_pids(roots: kernel.Roots) -> List[int]:
    try:
        names = os.listdir(roots.proc)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def start_time(pid: int, roots: kernel.Roots) -> int:
    """The process's start time in clock ticks after boot (``stat`` field 22).
    Raises :class:`ProcessGone` when there is no such process."""
    try:
        with open(os.path.join(roots.proc, str(pid), "stat"), "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessGone(pid) from None
        raise
    # The command in parentheses may itself hold spaces and parentheses.
    fields = text[text.rfind(b")") + 2:].split()
    if len(fields) < 20:
        raise ProcessGone(pid)
    return int(fields[19])


def process_info(pid: int, roots: kernel.Roots) -> Optional[ProcessInfo]:
    """Selection facts about *pid*, or None if it is gone."""
    try:
        started = start_time(pid, roots)
        st = kernel.read_status(pid, roots)
    except (ProcessGone, OSError):
        return None
    return ProcessInfo(pid, started, st.name or "?", _procmap.cgroup_of(pid, roots) or "", st.thp_enabled,
                       st.rss_anon)


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def matches(info: ProcessInfo, sel: Selection) -> bool:
    """Whether the selection takes this process (see :class:`Selection`)."""
    if sel.pids and info.pid not in sel.pids:
        return False
    if sel.commands and not any(fnmatch.fnmatchcase(info.command, p) for p in sel.commands):
        return False
    if sel.cgroups and not any(_under(info.cgroup, c) for c in sel.cgroups):
        return False
    return not any(fnmatch.fnmatchcase(info.command, p) for p in sel.exclude_commands)


def vma_wanted(vma: kernel.Vma, cfg: AgentConfig, pmd: int) -> Optional[str]:
    """None if the agent may repair in *vma*, else why not (a short word)."""
    if vma.path and vma.path != "[heap]" and not vma.path.startswith("[anon:"):
        return "not_anonymous"
    if len(vma.perms) < 4 or vma.perms[3] != "p" or vma.perms[1] != "w":
        return "not_private_writable"
    if "nh" in vma.vm_flags:
        return "nohugepage"
    if NEVER_FLAGS.intersection(vma.vm_flags):
        return "special"
    if cfg.advised_only and not vma.advised_huge:
        return "not_advised"
    if vma.size < cfg.min_vma_bytes or -(-vma.start // pmd) * pmd + pmd > vma.end:
        return "small"
    return None


def shared_pages(fd: int, block: int, pmd: int) -> int:
    """How many present pages of the block at *block* are mapped by another
    process too (pagemap entries without bit 56, "exclusively mapped")."""
    count = pmd // PAGE
    data = os.pread(fd, count * 8, block // PAGE * 8)
    entries = array.array("Q")
    entries.frombytes(data[: len(data) - len(data) % 8])
    return sum(1 for e in entries if e & _PM_PRESENT and not e & _PM_EXCLUSIVE)


@dataclasses.dataclass
class ProcessScan:
    """One look at a process. Bytes are over the VMAs the agent may repair
    in; ``candidates`` are the starts of PMD-size blocks to collapse."""

    anon_bytes: int = 0
    huge_bytes: int = 0
    small_blocks: int = 0
    shared_blocks: int = 0
    candidates: List[int] = dataclasses.field(default_factory=list)
    candidate_vmas: dict = dataclasses.field(default_factory=dict)
    nohugepage_bytes: int = 0


def scan(pid: int, expect_start: int, cfg: AgentConfig, pmd: int, roots: kernel.Roots,
         refused: frozenset = frozenset()) -> ProcessScan:
    """Find the blocks worth repairing in *pid*.

    A block is a candidate when it is fully present, not PMD-mapped (split
    after a fork, or never huge), inside a VMA :func:`vma_wanted` accepts
    and not in a VMA listed in *refused* (``(start, end)`` pairs the kernel
    refused before), and, unless ``cfg.repair_shared``, none of its pages
    is shared with another process. Raises :class:`ProcessGone` when the
    process exited or the PID is no longer the process started at
    *expect_start*, ``PermissionError`` without ptrace access.
    """
    try:
        vmas = kernel.read_smaps(pid, roots)
        fd = os.open(os.path.join(roots.proc, str(pid), "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessGone(pid) from None
        raise
    out = ProcessScan()
    try:
        # The pagemap fd binds to the mm it was opened on: if the PID still
        # names the same process now, both smaps and the fd were about it.
        if start_time(pid, roots) != expect_start:
            raise ProcessGone(pid)
        for vma in vmas:
            why = vma_wanted(vma, cfg, pmd)
            if why == "nohugepage":
                out.nohugepage_bytes += vma.rss or 0
            if why is not None or (vma.start, vma.end) in refused:
                continue
            out.anon_bytes += vma.rss or 0
            try:
                # The engine's block model: "split" blocks hold data in every
                # page and are not PMD-mapped; "partial" ones (holes) are left
                # alone here, since filling them would grow the process.
                huge, _present, blocks = classify(_native.pagemap_scan(fd, vma.start, vma.end),
                                                  vma.start, vma.end, pmd)
                small = blocks.split
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise ProcessGone(pid) from None
                if exc.errno in (errno.EINVAL, errno.EFAULT):  # unmapped meanwhile
                    continue
                raise
            out.huge_bytes += huge
            out.small_blocks += len(small)
            for block in small:
                if shared_pages(fd, block, pmd):
                    out.shared_blocks += 1
                    if not cfg.repair_shared:
                        continue
                out.candidates.append(block)
                out.candidate_vmas[block] = (vma.start, vma.end)
    finally:
        os.close(fd)
    return out
