"""What this kernel offers, read from sysfs and /proc.

Everything here parses text, in Python, so that tests can point it at fake
trees: pass ``Roots(sys=..., proc=...)`` explicitly, or call
:func:`set_test_roots`. Nothing in the environment redirects these paths: an
installed program always reads the real ``/sys`` and ``/proc``.

Parsers never raise on a kernel whose files look different from the ones
they were written against: a missing file or field reads as ``None`` and is
logged once (logger ``thpguard.kernel``, level WARNING).

The only parts that are not pure parsing are the functional probes in
:func:`capabilities` (a scratch 2 MiB mapping, ``madvise``, one
``MADV_COLLAPSE``, one ``PAGEMAP_SCAN``), which go through the private native
module.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import logging
import os
import platform
import re
import threading
from typing import Dict, List, Optional, Tuple

log = logging.getLogger("thpguard.kernel")

__all__ = [
    "Roots",
    "set_test_roots",
    "Feature",
    "Capabilities",
    "Vma",
    "ProcStatus",
    "BuddyZone",
    "MemoryCgroup",
    "capabilities",
    "can_get_huge_pages",
    "pmd_size",
    "mthp_sizes",
    "khugepaged_settings",
    "thp_mode",
    "thp_cow_mode",
    "kernel_release",
    "read_smaps",
    "read_vmstat",
    "read_status",
    "read_buddyinfo",
    "free_huge_bytes",
    "memory_cgroup",
    "thp_disable_flags",
    "PR_THP_DISABLE_EXCEPT_ADVISED",
]

THP_DIR = "kernel/mm/transparent_hugepage"
_X86_64_PMD = 2 * 1024 * 1024
# include/uapi/linux/prctl.h (6.18): PR_GET_THP_DISABLE returns "1 | flags".
PR_THP_DISABLE_EXCEPT_ADVISED = 2
# v1 reports "no limit" as PAGE_COUNTER_MAX pages, rounded: anything this big.
_UNLIMITED = 1 << 60

KHUGEPAGED_FIELDS = (
    "defrag",
    "max_ptes_none",
    "max_ptes_shared",
    "max_ptes_swap",
    "pages_to_scan",
    "scan_sleep_millisecs",
    "alloc_sleep_millisecs",
)


@dataclasses.dataclass(frozen=True)
class Roots:
    """Where sysfs and procfs are mounted; tests point these at fake trees."""

    sys: str = "/sys"
    proc: str = "/proc"

    @classmethod
    def from_env(cls) -> "Roots":
        """The roots in effect: those given to :func:`set_test_roots`, else
        the real mounts. The environment is not read (the name is kept for
        callers written when it was): a variable set by whoever started the
        program must not choose the files root reads and writes."""
        return _test_roots if _test_roots is not None else cls()

    @property
    def is_real(self) -> bool:
        """True when both roots are the host's own mounts."""
        return self.sys == "/sys" and self.proc == "/proc"


_test_roots: Optional[Roots] = None


def set_test_roots(roots: Optional[Roots]) -> None:
    """For tests only: make every reader without explicit roots use ``roots``
    (None restores the real ``/sys`` and ``/proc``). Process-wide.

    ``thpguard verify --fix`` refuses to run while fake roots are set; it
    writes only to the real ``/sys``.
    """
    global _test_roots
    if roots is not None and not isinstance(roots, Roots):
        raise TypeError(f"roots must be a thpguard.kernel.Roots or None, got {type(roots).__name__}")
    _test_roots = roots
    _cache.clear()


def _roots(roots: Optional[Roots]) -> Roots:
    return roots if roots is not None else Roots.from_env()


# -- low-level readers --------------------------------------------------

_warned: set = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str, *args) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


def _read(path: str, *, quiet: bool = False) -> Optional[str]:
    """Text of *path*, or None (logged once) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        if not quiet:
            _warn_once(path, "%s is missing on this kernel", path)
    except OSError as exc:
        if not quiet:
            _warn_once(path, "cannot read %s: %s", path, exc.strerror or exc)
    except ValueError:
        # A path built from file contents (cgroup, mountinfo) with a NUL.
        if not quiet:
            _warn_once(path, "cannot read %r: the path holds a NUL byte", path)
    return None


def _bracketed(text: Optional[str]) -> Optional[str]:
    """The selected value of a sysfs choice file: ``always [madvise] never``."""
    if text is None:
        return None
    m = re.search(r"\[([^\]\s]+)\]", text)
    if m:
        return m.group(1)
    # A few old kernels and some tunables print just the value.
    words = text.split()
    if len(words) == 1 and re.fullmatch(r"[a-z][a-z0-9_+-]*", words[0]):
        return words[0]
    return None


def _int(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _pid_dir(roots: Roots, pid) -> str:
    return os.path.join(roots.proc, str(pid))


# -- THP settings -------------------------------------------------------


def thp_mode(name: str, roots: Optional[Roots] = None) -> Optional[str]:
    """Selected value of ``transparent_hugepage/<name>`` (``enabled``,
    ``defrag``, ``shmem_enabled``, ``thp_cow``), or None where missing."""
    r = _roots(roots)
    quiet = name == "thp_cow"  # not in any merged kernel: absence is normal
    return _bracketed(_read(os.path.join(r.sys, THP_DIR, name), quiet=quiet))


def thp_cow_mode(roots: Optional[Roots] = None) -> Optional[str]:
    """The direct-COW mode (sysfs ``thp_cow``: proposed, not merged), or None."""
    return thp_mode("thp_cow", roots)


def pmd_size(roots: Optional[Roots] = None) -> Optional[int]:
    """Size in bytes of a PMD-mapped huge page (``hpage_pmd_size``).

    Where the file is missing (kernels before 4.16, or no THP at all), x86-64
    falls back to 2 MiB, logging that it assumed so; other architectures
    return None because their PMD size depends on the base page size (arm64
    with 64 KiB pages: 512 MiB). A value that is not a positive power of two
    also reads as None.
    """
    r = _roots(roots)
    path = os.path.join(r.sys, THP_DIR, "hpage_pmd_size")
    text = _read(path, quiet=True)
    value = _int(text)
    if value is not None and value > 0 and value & (value - 1) == 0:
        return value
    if text is not None:
        _warn_once(path + ":bad", "%s holds an unexpected value; ignoring it", path)
    elif os.path.isdir(os.path.join(r.sys, THP_DIR)) and platform.machine() == "x86_64":
        # hpage_pmd_size appeared in 4.16; the PMD is 2 MiB on every x86-64.
        _warn_once(path, "%s is missing; assuming 2 MiB (x86-64)", path)
        return _X86_64_PMD
    else:
        _warn_once(path, "%s is missing; PMD size unknown", path)
    return None


def mthp_sizes(roots: Optional[Roots] = None) -> Dict[int, Optional[str]]:
    """Per-size THP settings: ``{size_bytes: enabled}`` from
    ``transparent_hugepage/hugepages-<N>kB/enabled`` (6.8+; empty before)."""
    r = _roots(roots)
    base = os.path.join(r.sys, THP_DIR)
    out: Dict[int, Optional[str]] = {}
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        m = re.fullmatch(r"hugepages-(\d+)kB", name)
        if not m:
            continue
        # Sizes without an "enabled" file exist for shmem/file THP only (6.11+).
        text = _read(os.path.join(base, name, "enabled"), quiet=True)
        if text is not None:
            out[int(m.group(1)) * 1024] = _bracketed(text)
    return dict(sorted(out.items()))


def khugepaged_settings(roots: Optional[Roots] = None) -> Dict[str, Optional[int]]:
    """khugepaged tunables as ints (None where missing)."""
    r = _roots(roots)
    base = os.path.join(r.sys, THP_DIR, "khugepaged")
    return {name: _int(_read(os.path.join(base, name))) for name in KHUGEPAGED_FIELDS}


def kernel_release(roots: Optional[Roots] = None) -> Optional[str]:
    """The running kernel's release string (``uname -r``)."""
    r = _roots(roots)
    text = _read(os.path.join(r.proc, "sys/kernel/osrelease"), quiet=not r.is_real)
    if text is not None and text.strip():
        return text.strip()
    return os.uname().release if r.is_real else None


# -- /proc/PID ----------------------------------------------------------

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
    def anon_huge_bytes(self) -> Optional[int]:
        """PMD-mapped anonymous THP bytes (``AnonHugePages``)."""
        return self.fields.get("AnonHugePages")

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


@dataclasses.dataclass
class MemoryCgroup:
    """The memory cgroup of a process. Sizes in bytes; ``limit_bytes`` is
    None when no limit applies (on this cgroup or any ancestor)."""

    version: int
    path: str
    directory: str
    limit_bytes: Optional[int]
    usage_bytes: Optional[int]
    limit_file: str

    @property
    def available_bytes(self) -> Optional[int]:
        if self.limit_bytes is None or self.usage_bytes is None:
            return None
        return max(0, self.limit_bytes - self.usage_bytes)


def _mounts(roots: Roots, pid) -> List[Tuple[str, str, str, List[str]]]:
    """(root, mount point, fstype, super options) of the cgroup mounts."""
    text = _read(os.path.join(_pid_dir(roots, pid), "mountinfo"), quiet=True) or ""
    out = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or not tail[0].startswith("cgroup"):
            continue
        out.append((fields[3], fields[4], tail[0], tail[2].split(",")))
    return out


def _under_sys(roots: Roots, mount_point: str) -> str:
    """Map a real mount point below /sys into the (maybe fake) sys root."""
    if mount_point == "/sys" or mount_point.startswith("/sys/"):
        return os.path.join(roots.sys, mount_point[len("/sys/"):])
    return mount_point


def memory_cgroup(pid="self", roots: Optional[Roots] = None) -> Optional[MemoryCgroup]:
    """Memory limit and usage of the cgroup *pid* is in, v1 or v2, or None
    if there is no memory controller for it (or nothing readable)."""
    r = _roots(roots)
    text = _read(os.path.join(_pid_dir(r, pid), "cgroup"), quiet=True)
    if text is None:
        return None
    v1_path = v2_path = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    mounts = _mounts(r, pid)
    if v1_path is not None:
        mount = next((m for m in mounts if m[2] == "cgroup" and "memory" in m[3]), None)
        base, mroot = (_under_sys(r, mount[1]), mount[0]) if mount else (
            os.path.join(r.sys, "fs/cgroup/memory"), "/")
        return _memcg_v1(base, _rel(v1_path, mroot), v1_path)
    if v2_path is not None:
        mount = next((m for m in mounts if m[2] == "cgroup2"), None)
        base, mroot = (_under_sys(r, mount[1]), mount[0]) if mount else (
            os.path.join(r.sys, "fs/cgroup"), "/")
        return _memcg_v2(base, _rel(v2_path, mroot), v2_path)
    return None


def _rel(path: str, mount_root: str) -> str:
    # Inside a cgroup namespace or a bind mount, the mount's root is a prefix
    # of the path /proc/PID/cgroup prints.
    if mount_root not in ("", "/") and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root):]
    return path.strip("/")


def _limit(value: Optional[int]) -> Optional[int]:
    return None if value is None or value >= _UNLIMITED else value


def _memcg_v1(base: str, rel: str, shown: str) -> Optional[MemoryCgroup]:
    directory = os.path.join(base, rel)
    limit_file = os.path.join(directory, "memory.limit_in_bytes")
    limit = _int(_read(limit_file, quiet=True))
    usage = _int(_read(os.path.join(directory, "memory.usage_in_bytes"), quiet=True))
    if limit is None and usage is None:
        return None
    # memory.stat's hierarchical_memory_limit includes the ancestors' limits.
    stat = _read(os.path.join(directory, "memory.stat"), quiet=True) or ""
    m = re.search(r"^hierarchical_memory_limit\s+(\d+)$", stat, re.M)
    effective = _limit(limit)
    hier = _limit(int(m.group(1))) if m else None
    if hier is not None and (effective is None or hier < effective):
        effective = hier
    return MemoryCgroup(1, shown, directory, effective, usage, limit_file)


def _memcg_v2(base: str, rel: str, shown: str) -> Optional[MemoryCgroup]:
    directory = os.path.join(base, rel)
    usage = _int(_read(os.path.join(directory, "memory.current"), quiet=True))
    if usage is None:
        return None  # memory controller not enabled for this cgroup
    limit, limit_file = None, os.path.join(directory, "memory.max")
    parts = rel.split("/") if rel else []
    for i in range(len(parts), -1, -1):
        d = os.path.join(base, *parts[:i])
        value = (_read(os.path.join(d, "memory.max"), quiet=True) or "").strip()
        if value and value != "max":
            v = _int(value)
            if v is not None and (limit is None or v < limit):
                limit, limit_file = v, os.path.join(d, "memory.max")
    return MemoryCgroup(2, shown, directory, limit, usage, limit_file)


# -- capabilities -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Feature:
    """Whether a kernel feature works here, and why (or why not)."""

    available: bool
    reason: str

    def as_dict(self) -> dict:
        return {"available": self.available, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this kernel and this process offer for THP (see :func:`capabilities`).

    Sizes are in bytes; any field may be None where the kernel does not say.
    ``thp_disable`` is the raw ``prctl(PR_GET_THP_DISABLE)`` result: 0 not
    disabled, 1 disabled completely, 3 disabled except for advised regions
    (6.18 ``PR_THP_DISABLE_EXCEPT_ADVISED``).
    """

    kernel_release: Optional[str]
    machine: str
    enabled: Optional[str]
    defrag: Optional[str]
    shmem_enabled: Optional[str]
    pmd_size: Optional[int]
    mthp: Dict[int, Optional[str]]
    khugepaged: Dict[str, Optional[int]]
    thp_cow: Optional[str]
    thp_disable: Optional[int]
    status_thp_enabled: Optional[bool]
    collapse: Feature
    pagemap_scan: Feature
    populate_write: Feature
    process_madvise: Feature
    direct_cow: Feature

    @property
    def thp_disabled_completely(self) -> bool:
        if self.thp_disable is not None:
            return self.thp_disable == 1
        return self.status_thp_enabled is False

    @property
    def thp_disabled_except_advised(self) -> bool:
        return self.thp_disable is not None and self.thp_disable & PR_THP_DISABLE_EXCEPT_ADVISED != 0

    @property
    def features(self) -> Dict[str, Feature]:
        return {
            "collapse": self.collapse,
            "direct_cow": self.direct_cow,
            "pagemap_scan": self.pagemap_scan,
            "populate_write": self.populate_write,
            "process_madvise": self.process_madvise,
        }

    def as_dict(self) -> dict:
        """A JSON-ready dict with stable, sorted keys (sizes as strings of bytes
        in ``mthp`` because JSON keys are strings)."""
        out = {
            "defrag": self.defrag,
            "enabled": self.enabled,
            "features": {k: v.as_dict() for k, v in sorted(self.features.items())},
            "kernel_release": self.kernel_release,
            "khugepaged": dict(sorted(self.khugepaged.items())),
            "machine": self.machine,
            "mthp": {str(k): v for k, v in sorted(self.mthp.items())},
            "pmd_size": self.pmd_size,
            "shmem_enabled": self.shmem_enabled,
            "status_thp_enabled": self.status_thp_enabled,
            "thp_cow": self.thp_cow,
            "thp_disable": self.thp_disable,
        }
        return dict(sorted(out.items()))


def _load_native():
    try:
        from . import _native  # noqa: PLC0415 - optional until built
    except ImportError as exc:  # not built, or a partial checkout
        return None, f"native module not available ({exc})"
    return _native, ""


def thp_disable_flags() -> Optional[int]:
    """Raw ``prctl(PR_GET_THP_DISABLE)`` of this process, None if unknown."""
    native, _ = _load_native()
    if native is None:
        return None
    try:
        return int(native.thp_disable_get())
    except OSError:
        return None


def _probe_features(native, pmd: Optional[int], thp_disable: Optional[int], thp_cow: Optional[str],
                    roots: Roots) -> Dict[str, Feature]:
    n = native
    feats: Dict[str, Feature] = {}

    def known(advice: int) -> bool:
        try:
            return bool(n.advice_known(advice))
        except OSError:
            return False

    populate_known = known(n.MADV_POPULATE_WRITE)
    feats["populate_write"] = (
        Feature(True, "known to the kernel") if populate_known
        else Feature(False, "kernel lacks MADV_POPULATE_WRITE (older than 5.14); pages are touched instead"))

    cow_known = known(n.MADV_THP_COW)
    if thp_cow is None and not cow_known:
        feats["direct_cow"] = Feature(False, "not in this kernel (thp_cow: proposed, not merged)")
    elif thp_cow is None or not cow_known:
        feats["direct_cow"] = Feature(False, "kernel has only half of direct COW (thp_cow sysfs %s, MADV_THP_COW %s)"
                                      % ("present" if thp_cow else "missing", "known" if cow_known else "unknown"))
    elif thp_cow == "never":
        feats["direct_cow"] = Feature(False, "thp_cow is never")
    else:
        feats["direct_cow"] = Feature(True, f"thp_cow={thp_cow}, MADV_THP_COW known")

    collapse_known = known(n.MADV_COLLAPSE)
    addr = None
    size = pmd or 0
    try:
        if size:
            addr = n.map_aligned(size, size)
        feats["collapse"] = _probe_collapse(n, addr, size, collapse_known, thp_disable)
        feats["pagemap_scan"] = _probe_pagemap(n, addr, size, roots)
        feats["process_madvise"] = _probe_process_madvise(n, addr, size)
    except OSError as exc:
        reason = f"could not map a probe block: {os.strerror(exc.errno) if exc.errno else exc}"
        for name in ("collapse", "pagemap_scan", "process_madvise"):
            feats.setdefault(name, Feature(False, reason))
    finally:
        if addr is not None:
            try:
                n.unmap(addr, size)
            except OSError:
                pass
    return feats


def _probe_collapse(n, addr, size, collapse_known, thp_disable) -> Feature:
    if not collapse_known:
        return Feature(False, "kernel lacks MADV_COLLAPSE (older than 6.1): splits are reported, not repaired")
    if addr is None:
        return Feature(False, "MADV_COLLAPSE known, but the PMD size is unknown")
    import ctypes  # noqa: PLC0415 - only to write one byte

    # Touch before MADV_HUGEPAGE so the fault (under enabled=madvise) maps a
    # small page, and the collapse below does real work.
    ctypes.c_char.from_address(addr).value = b"\x01"
    try:
        n.madvise(addr, size, n.MADV_HUGEPAGE)
        n.madvise(addr, size, n.MADV_COLLAPSE)
        err = 0
    except OSError as exc:
        err = exc.errno
    if err == 0:
        return Feature(True, "repaired a probe block")
    if err == _errno.EINVAL and thp_disable == 1:
        return Feature(False, "this process is THP-disabled by prctl(PR_SET_THP_DISABLE) "
                              "(inherited from its parent?): MADV_COLLAPSE fails with EINVAL")
    return Feature(False, f"MADV_COLLAPSE failed on a probe block: {_errno.errorcode.get(err, err)}")


def _probe_pagemap(n, addr, size, roots: Roots) -> Feature:
    try:
        # A live probe of this process: always the real procfs, not a fake root.
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError as exc:
        return Feature(False, f"cannot open /proc/self/pagemap: {exc.strerror}")
    try:
        start = addr if addr is not None else 0
        n.pagemap_scan(fd, start, start + (size or os.sysconf("SC_PAGE_SIZE")))
    except OSError as exc:
        if exc.errno == _errno.ENOTTY:
            return Feature(False, "kernel lacks PAGEMAP_SCAN (older than 6.7): smaps is used instead")
        return Feature(False, f"PAGEMAP_SCAN failed: {exc.strerror or exc}")
    finally:
        os.close(fd)
    return Feature(True, "scanned a probe block")


def _probe_process_madvise(n, addr, size) -> Feature:
    try:
        pidfd = n.pidfd_open(os.getpid())
    except OSError as exc:
        if exc.errno == _errno.ENOSYS:
            return Feature(False, "kernel lacks pidfd_open (older than 5.3)")
        return Feature(False, f"pidfd_open failed: {exc.strerror or exc}")
    # An empty vector asks only whether the syscall exists: it advises
    # nothing. MADV_COLD (5) is the one advice every kernel with the syscall
    # accepts (5.10 takes only MADV_COLD and MADV_PAGEOUT, and rejects the
    # others with EINVAL before looking at the vector).
    try:
        n.process_madvise(pidfd, [], 5)
    except OSError as exc:
        if exc.errno == _errno.ENOSYS:
            return Feature(False, "kernel lacks process_madvise (older than 5.10)")
        if exc.errno != _errno.EINVAL:
            return Feature(False, f"process_madvise failed: {exc.strerror or exc}")
        # EINVAL: the kernel knows the syscall, not the advice.
    finally:
        os.close(pidfd)
    return Feature(True, "works (on another process: needs CAP_SYS_NICE and ptrace)")


_cache: Dict[Roots, Capabilities] = {}
_cache_lock = threading.Lock()


def capabilities(refresh: bool = False, roots: Optional[Roots] = None) -> Capabilities:
    """Probe what this kernel and process offer, once; later calls return the
    cached result unless *refresh* is true.

    The probe maps one scratch PMD-sized block, collapses it, scans it with
    PAGEMAP_SCAN and unmaps it (a few milliseconds). Without the native
    module every feature reads as unavailable, with the reason.
    """
    r = _roots(roots)
    with _cache_lock:
        if not refresh and r in _cache:
            return _cache[r]
    caps = _probe(r)
    with _cache_lock:
        _cache[r] = caps
    return caps


def _probe(r: Roots) -> Capabilities:
    pmd = pmd_size(r)
    cow = thp_mode("thp_cow", r)
    native, why = _load_native()
    thp_disable = None
    if native is not None:
        try:
            thp_disable = int(native.thp_disable_get())
        except OSError:
            thp_disable = None
    try:
        status_thp = read_status("self", r).thp_enabled
    except OSError:
        status_thp = None
    if native is None:
        feats = {k: Feature(False, why) for k in
                 ("collapse", "pagemap_scan", "populate_write", "process_madvise", "direct_cow")}
    else:
        with native.faults_suspended():  # not the faults a test injected
            feats = _probe_features(native, pmd, thp_disable, cow, r)
    return Capabilities(
        kernel_release=kernel_release(r),
        machine=platform.machine(),
        enabled=thp_mode("enabled", r),
        defrag=thp_mode("defrag", r),
        shmem_enabled=thp_mode("shmem_enabled", r),
        pmd_size=pmd,
        mthp=mthp_sizes(r),
        khugepaged=khugepaged_settings(r),
        thp_cow=cow,
        thp_disable=thp_disable,
        status_thp_enabled=status_thp,
        **feats,
    )


def can_get_huge_pages(caps: Optional[Capabilities] = None,
                       roots: Optional[Roots] = None) -> Tuple[bool, str]:
    """Whether this process can get PMD-mapped huge pages at all, and why not.

    False when the PMD size is unknown, when THP is ``never`` (globally or
    for the PMD size) and ``MADV_COLLAPSE`` cannot help, or when the process
    is THP-disabled by prctl without the except-advised flag. Without
    *caps* it reads the settings directly and runs the capability probe
    only when THP is ``never`` (to learn whether MADV_COLLAPSE can help).
    """
    r = _roots(roots)
    if caps is not None:
        pmd, enabled, mthp = caps.pmd_size, caps.enabled, caps.mthp
        completely = caps.thp_disabled_completely
    else:
        pmd, enabled, mthp = pmd_size(r), thp_mode("enabled", r), mthp_sizes(r)
        raw = thp_disable_flags()
        if raw is None:
            try:
                completely = read_status("self", r).thp_enabled is False
            except OSError:
                completely = False
        else:
            completely = raw == 1
    if pmd is None:
        return False, "the PMD huge page size is unknown (no transparent_hugepage/hpage_pmd_size)"
    if completely:
        return False, ("this process is THP-disabled by prctl(PR_SET_THP_DISABLE), "
                       "usually inherited from a parent; start it from a parent that does not set it")
    pmd_mode = mthp.get(pmd)
    if pmd_mode in ("always", "madvise"):
        never = False  # the per-size setting overrides the global one
    else:
        never = enabled == "never" or pmd_mode == "never" or (enabled is None and not mthp)
    if not never:
        return True, "ok"
    collapse = (caps or capabilities(roots=r)).collapse
    if collapse.available:
        return True, "ok (faults give small pages; MADV_COLLAPSE builds the huge pages)"
    where = "hugepages-%dkB/enabled" % (pmd // 1024) if pmd_mode == "never" else "enabled"
    return False, (f"THP is off (transparent_hugepage/{where} = never) and "
                   f"MADV_COLLAPSE is unavailable: {collapse.reason}")
