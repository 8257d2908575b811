"""Parsers of ``/proc/PID/smaps``, ``status``, ``/proc/vmstat`` and ``buddyinfo``."""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
import re
from typing import Dict, List, Optional

from ..errors import KernelCallError
from ._files import Roots, _int, _pid_dir, _read, _roots, _warn_once
from .sysfs import pmd_size

_SMAPS_HEADER = re.compile(
    r"^([0-9a-fA-F]+)-([0-9a-fA-F]+)\s+(\S{4})\s+([0-9a-fA-F]+)\s+(\S+)\s+(\d+)\s*(.*)$"
)
_SMAPS_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s+(\d+)(?:\s+(kB))?\s*$")


@dataclasses.dataclass
class Vma:
    """One mapping of ``/proc/PID/smaps``. Sizes are in bytes."""

    start: int
    end: int
    perms: str
    offset: int = 0
    path: str = ""
    fields: Dict[str, int] = dataclasses.field(default_factory=dict)
    thp_eligible: Optional[bool] = None
    vm_flags: List[str] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def rss(self) -> Optional[int]:
        return self.fields.get("Rss")

    @property
    def huge_bytes(self) -> Optional[int]:
        """PMD-mapped anonymous THP bytes (``AnonHugePages``)."""
        return self.fields.get("AnonHugePages")

    @property
    def hugetlb_bytes(self) -> Optional[int]:
        """hugetlb bytes mapped (``Private_Hugetlb`` + ``Shared_Hugetlb``),
        None where smaps has neither field."""
        private, shared = self.fields.get("Private_Hugetlb"), self.fields.get("Shared_Hugetlb")
        if private is None and shared is None:
            return None
        return (private or 0) + (shared or 0)

    @property
    def anon_huge_bytes(self) -> Optional[int]:
        """Deprecated name of ``huge_bytes`` (after the smaps field)."""
        return self.huge_bytes

    @property
    def advised_huge(self) -> bool:
        """The VMA carries ``MADV_HUGEPAGE`` (VmFlags ``hg``)."""
        return "hg" in self.vm_flags


def read_smaps(pid="self", roots: Optional[Roots] = None) -> List[Vma]:
    """All VMAs of ``/proc/PID/smaps``.

    Raises ``OSError`` (ENOENT/ESRCH, EACCES, EPERM) when the file cannot be
    opened, because callers must tell "no such process" from "not allowed";
    lines it does not understand are skipped with one logged warning.
    """
    r = _roots(roots)
    path = os.path.join(_pid_dir(r, pid), "smaps")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    vmas: List[Vma] = []
    cur: Optional[Vma] = None
    for line in text.splitlines():
        m = _SMAPS_HEADER.match(line)
        if m:
            cur = Vma(
                start=int(m.group(1), 16),
                end=int(m.group(2), 16),
                perms=m.group(3),
                offset=int(m.group(4), 16),
                path=m.group(7).strip(),
            )
            vmas.append(cur)
            continue
        if cur is None or not line.strip():
            continue
        if line.startswith("VmFlags:"):
            cur.vm_flags = line[len("VmFlags:"):].split()
            continue
        if line.startswith("THPeligible:"):
            value = _int(line.split(":", 1)[1])
            cur.thp_eligible = None if value is None else bool(value)
            continue
        f = _SMAPS_FIELD.match(line)
        if f:
            value = int(f.group(2))
            cur.fields[f.group(1)] = value * 1024 if f.group(3) else value
        else:
            _warn_once(path + ":line", "%s: skipping a line it does not understand: %r", path, line[:60])
    return vmas


@dataclasses.dataclass
class ProcStatus:
    """The fields of ``/proc/PID/status`` thpguard uses (None where missing)."""

    name: Optional[str] = None
    ppid: Optional[int] = None
    threads: Optional[int] = None
    thp_enabled: Optional[bool] = None
    uid: Optional[int] = None
    cap_eff: Optional[int] = None
    rss_anon: Optional[int] = None  # bytes; None for kernel threads (no mm)


def read_status(pid="self", roots: Optional[Roots] = None) -> ProcStatus:
    """Parse ``/proc/PID/status``. ``thp_enabled`` is False only when the
    process is THP-disabled completely by prctl (6.18: the except-advised
    flag still reads 1 here). Raises ``OSError`` if the process is gone."""
    r = _roots(roots)
    path = os.path.join(_pid_dir(r, pid), "status")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    raw: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            raw[key.strip()] = value.strip()
    st = ProcStatus(name=raw.get("Name"))
    st.ppid = _int(raw.get("PPid"))
    st.threads = _int(raw.get("Threads"))
    thp = _int(raw.get("THP_enabled"))
    anon = raw.get("RssAnon", "").split()
    st.rss_anon = _int(anon[0]) * 1024 if anon and _int(anon[0]) is not None else None
    # THP_enabled appeared in 5.0.
    st.thp_enabled = None if thp is None else bool(thp)
    if raw.get("Uid"):
        st.uid = _int(raw["Uid"].split()[0])
    if raw.get("CapEff"):
        try:
            st.cap_eff = int(raw["CapEff"], 16)
        except ValueError:
            st.cap_eff = None
    return st


def read_vmstat(roots: Optional[Roots] = None) -> Dict[str, int]:
    """The system-wide ``thp_*`` counters of ``/proc/vmstat`` (empty if unreadable)."""
    r = _roots(roots)
    text = _read(os.path.join(r.proc, "vmstat"))
    out: Dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("thp_"):
            value = _int(parts[1])
            if value is not None:
                out[parts[0]] = value
    return out


@dataclasses.dataclass
class BuddyZone:
    """One line of ``/proc/buddyinfo``: free block counts per order."""

    node: int
    zone: str
    free_blocks: List[int]


def read_buddyinfo(roots: Optional[Roots] = None) -> List[BuddyZone]:
    """Parse ``/proc/buddyinfo`` (empty list if unreadable)."""
    r = _roots(roots)
    text = _read(os.path.join(r.proc, "buddyinfo"))
    zones = []
    for line in (text or "").splitlines():
        m = re.match(r"^Node\s+(\d+),\s*zone\s+(\S+)\s+(.*)$", line)
        if not m:
            continue
        counts = [_int(x) for x in m.group(3).split()]
        if any(c is None for c in counts):
            _warn_once("buddyinfo:line", "/proc/buddyinfo: skipping line %r", line[:60])
            continue
        zones.append(BuddyZone(int(m.group(1)), m.group(2), counts))
    return zones


def free_huge_bytes(roots: Optional[Roots] = None, huge_size: Optional[int] = None) -> Optional[int]:
    """Free memory in buddy blocks at least *huge_size* (default: the PMD
    size) large, in bytes: how much a huge page fault can get without
    compaction. None if buddyinfo or the sizes are unknown."""
    huge = huge_size or pmd_size(roots)
    zones = read_buddyinfo(roots)
    if not huge or not zones:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    order = max(0, (huge // page).bit_length() - 1)
    total = 0
    for z in zones:
        for o, count in enumerate(z.free_blocks):
            if o >= order:
                total += count * (page << o)
    return total


def map_count_hint(roots: Optional[Roots] = None) -> str:
    """A hint when this process is at ``vm.max_map_count`` mappings, else "".

    At that limit ``mmap`` fails with ENOMEM and a ``madvise`` that would
    split a mapping with EAGAIN, which alone reads as "retry".
    """
    r = _roots(roots)
    limit = _int(_read(os.path.join(r.proc, "sys", "vm", "max_map_count"), quiet=True))
    try:
        with open(os.path.join(r.proc, "self", "maps"), "rb") as f:
            count = sum(1 for _ in f)
    except OSError:
        return ""
    if limit is None or count + 8 < limit:
        return ""
    return (f"this process has {count} mappings and vm.max_map_count is {limit}: close "
            "regions (each takes up to 3 mappings) or raise the vm.max_map_count sysctl")


def map_count_error(exc: BaseException) -> Optional[KernelCallError]:
    """``exc`` (ENOMEM or EAGAIN from mmap/madvise) restated with :func:`map_count_hint`,
    or None when it is another error or the process is not at the limit."""
    if not isinstance(exc, OSError) or exc.errno not in (_errno.EAGAIN, _errno.ENOMEM):
        return None
    hint = map_count_hint()
    if not hint:
        return None
    return KernelCallError(exc.errno, getattr(exc, "operation", "mmap"), getattr(exc, "range", None), hint)
