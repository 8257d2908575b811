"""Host checks behind ``thpguard verify``.

Each check is a small object with a status (``ok``, ``warn``, ``fail``,
``n/a``), a one-line detail, and advice naming the exact file and value or
command to change. Checks only read; ``fix`` holds the sysfs write that
``verify --fix`` may apply, and nothing here applies it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, List, Optional, Tuple

from . import kernel
from .kernel import Capabilities, Roots

OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"
STATUSES = (OK, WARN, FAIL, NA)
MiB = 1024 * 1024
CAP_SYS_NICE = 23
CAP_SYS_PTRACE = 19
CAP_DAC_READ_SEARCH = 2


def fmt_bytes(n: Optional[int]) -> str:
    """Human size with binary units: ``2.0M``, ``512K``, ``1.5G``."""
    if n is None:
        return "?"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value >= 100 or value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


@dataclasses.dataclass
class Check:
    """One finding. ``fix`` is ``(path, value)`` for a sysfs write that
    resolves it, or None when the remedy is not a sysfs value;
    ``measurements`` holds the self-test's timings (seconds) and facts."""

    name: str
    title: str
    status: str
    detail: str
    advice: str = ""
    fix: Optional[Tuple[str, str]] = None
    measurements: Optional[dict] = None

    def as_dict(self) -> dict:
        return {
            "advice": self.advice,
            "detail": self.detail,
            "fix": None if self.fix is None else {"path": self.fix[0], "value": self.fix[1]},
            "measurements": self.measurements,
            "name": self.name,
            "status": self.status,
            "title": self.title,
        }


@dataclasses.dataclass
class HostContext:
    """What the checks read: the capabilities, the roots, and the target process."""

    caps: Capabilities
    roots: Roots
    pid: Optional[int] = None  # None: this process

    def thp_path(self, name: str) -> str:
        return os.path.join(self.roots.sys, kernel.THP_DIR, name)


def check_enabled(ctx: HostContext) -> Check:
    c, path = ctx.caps, ctx.thp_path("enabled")
    title = "THP enabled"
    if c.enabled is None:
        if not os.path.isdir(os.path.join(ctx.roots.sys, kernel.THP_DIR)):
            return Check("thp_enabled", title, FAIL, "this kernel has no transparent huge pages",
                         "use a kernel built with CONFIG_TRANSPARENT_HUGEPAGE=y")
        return Check("thp_enabled", title, FAIL, f"cannot read {path}", f"check that {path} is readable")
    if c.enabled in ("always", "madvise"):
        who = "every anonymous mapping gets" if c.enabled == "always" else "advised regions (thpguard's) get"
        return Check("thp_enabled", title, OK, f"{c.enabled}: {who} huge pages on fault")
    advice = f"echo madvise > {path}"
    if c.collapse.available:
        return Check("thp_enabled", title, WARN,
                     f"{c.enabled}: faults map small pages; only MADV_COLLAPSE builds huge ones (slower)",
                     advice, (path, "madvise"))
    return Check("thp_enabled", title, FAIL, f"{c.enabled}: no huge pages, and no MADV_COLLAPSE either",
                 advice, (path, "madvise"))


def check_defrag(ctx: HostContext) -> Check:
    c, path = ctx.caps, ctx.thp_path("defrag")
    title = "THP defrag"
    if c.defrag is None:
        return Check("thp_defrag", title, NA, f"cannot read {path}")
    if c.defrag in ("always", "madvise", "defer+madvise"):
        return Check("thp_defrag", title, OK, f"{c.defrag}: advised faults compact memory when they must")
    return Check("thp_defrag", title, WARN,
                 f"{c.defrag}: advised faults never wait for compaction; fragmented memory gives small pages",
                 f"echo madvise > {path}", (path, "madvise"))


def check_pmd_size(ctx: HostContext) -> Check:
    size = ctx.caps.pmd_size
    if size is None:
        return Check("pmd_size", "PMD size", FAIL, "unknown (no hpage_pmd_size)",
                     "use a kernel with transparent huge pages for this architecture")
    return Check("pmd_size", "PMD size", OK, fmt_bytes(size))


def check_mthp(ctx: HostContext) -> Check:
    c = ctx.caps
    title = "mTHP sizes"
    if not c.mthp:
        return Check("mthp", title, NA, "no per-size settings (kernel before 6.8): PMD size only")
    groups: dict = {}
    for size, mode in sorted(c.mthp.items()):
        groups.setdefault(mode or "?", []).append(fmt_bytes(size))
    detail = "; ".join(f"{','.join(sizes)} {mode}" for mode, sizes in groups.items())
    pmd_mode = c.mthp.get(c.pmd_size) if c.pmd_size else None
    if pmd_mode == "never":
        path = ctx.thp_path(f"hugepages-{c.pmd_size // 1024}kB/enabled")
        return Check("mthp", title, FAIL, f"PMD size set to never ({detail})",
                     f"echo inherit > {path}", (path, "inherit"))
    return Check("mthp", title, OK, detail)


def check_khugepaged(ctx: HostContext) -> Check:
    k = ctx.caps.khugepaged
    title = "khugepaged"
    shared, pages, sleep = k.get("max_ptes_shared"), k.get("pages_to_scan"), k.get("scan_sleep_millisecs")
    if shared is None and pages is None:
        return Check("khugepaged", title, NA, "no khugepaged tunables")
    parts = []
    if shared is not None:
        parts.append(f"max_ptes_shared={shared}: keeps fork splits while both live")
    if pages is not None and sleep is not None:
        parts.append(f"{pages} pages/{sleep / 1000:g} s")
    return Check("khugepaged", title, OK, "; ".join(parts))


# The registry's reason when it could not import the native module: then no
# kernel upgrade helps, a build does.
_NATIVE_MISSING = "native module not available"
_NATIVE_ADVICE = ("reinstall thpguard where a C compiler and the Python headers are present "
                  "(Debian: apt-get install gcc python3-dev)")


def _feature_check(name, title, feature, missing_status, advice) -> Check:
    if feature.available:
        return Check(name, title, OK, feature.reason)
    if feature.reason.startswith(_NATIVE_MISSING):
        advice = _NATIVE_ADVICE
    return Check(name, title, missing_status, feature.reason, advice)


def check_collapse(ctx: HostContext) -> Check:
    f = ctx.caps.collapse
    if not f.available and "THP-disabled" in f.reason:
        advice = "see the prctl check below"
    else:
        advice = "use Linux 6.1 or newer (MADV_COLLAPSE); until then splits are reported, not repaired"
    return _feature_check("collapse", "MADV_COLLAPSE", f, FAIL, advice)


def check_pagemap_scan(ctx: HostContext) -> Check:
    return _feature_check("pagemap_scan", "PAGEMAP_SCAN", ctx.caps.pagemap_scan, WARN,
                          "use Linux 6.7 or newer for fast split detection (smaps is slower)")


def check_populate_write(ctx: HostContext) -> Check:
    return _feature_check("populate_write", "MADV_POPULATE_WRITE", ctx.caps.populate_write, WARN,
                          "use Linux 5.14 or newer to populate with errors reported instead of SIGBUS")


def check_process_madvise(ctx: HostContext) -> Check:
    return _feature_check("process_madvise", "process_madvise", ctx.caps.process_madvise, WARN,
                          "use Linux 6.1 or newer; without it `thpguard guard PID` cannot repair")


def check_direct_cow(ctx: HostContext) -> Check:
    c = ctx.caps
    title = "direct COW"
    if c.direct_cow.available:
        return Check("direct_cow", title, OK, c.direct_cow.reason)
    if c.thp_cow == "never":
        ident = kernel.direct_cow_interface(ctx.roots)
        if not ident.available:
            # Another kernel's thp_cow: not ours to switch.
            return Check("direct_cow", title, NA, c.direct_cow.reason + "; share: splits re-collapsed")
        path = ctx.thp_path("thp_cow")
        return Check("direct_cow", title, WARN, "thp_cow=never: writes after fork split huge pages",
                     f"echo madvise > {path}", (path, "madvise"))
    # Without the kernel's copy, fork='copy' copies lazily with userfaultfd
    # where this process may (docs/copy.rst), else eagerly at fork: one line
    # for both keeps verify on one screen.
    uffd = c.copy_userfault
    if not uffd.available:
        lazy = f"copy: the whole region at fork ({uffd.reason})"
    elif uffd.reason.endswith("put in place with UFFDIO_MOVE"):  # kernel/_probes.py's wording
        lazy = "copy: 2 MiB block copies by userfaultfd (UFFDIO_MOVE)"
    else:  # Linux 6.7: no UFFDIO_MOVE
        lazy = "copy: 2 MiB block copies by userfaultfd (mremap: one VMA per copied block)"
    return Check("direct_cow", title, NA, f"{c.direct_cow.reason}; share: splits re-collapsed; {lazy}")


def _disabled_ancestor(ctx: HostContext, pid) -> Optional[Tuple[int, str]]:
    """The oldest ancestor of *pid* in an unbroken line of THP-disabled
    processes: where the prctl was most likely set."""
    found = None
    seen = set()
    try:
        st = kernel.read_status(pid, ctx.roots)
    except OSError:
        return None
    while st.ppid and st.ppid > 0 and st.ppid not in seen:
        seen.add(st.ppid)
        try:
            parent = kernel.read_status(st.ppid, ctx.roots)
        except OSError:
            break
        if parent.thp_enabled is not False:
            break
        found = (st.ppid, parent.name or "?")
        st = parent
    return found


def check_prctl(ctx: HostContext) -> Check:
    c = ctx.caps
    title = "prctl THP disable"
    who = "this process" if ctx.pid is None else f"PID {ctx.pid}"
    if ctx.pid is None:
        raw = c.thp_disable
        completely = c.thp_disabled_completely
        except_advised = c.thp_disabled_except_advised
    else:
        try:
            st = kernel.read_status(ctx.pid, ctx.roots)
        except OSError as exc:
            return Check("prctl", title, NA, f"cannot read /proc/{ctx.pid}/status: {exc.strerror or exc}")
        raw = None
        completely = st.thp_enabled is False
        except_advised = False
    if raw is None and ctx.pid is None and c.status_thp_enabled is None:
        return Check("prctl", title, NA, "unknown (no PR_GET_THP_DISABLE and no THP_enabled in status)")
    if completely:
        origin = _disabled_ancestor(ctx, ctx.pid or "self")
        inherited = (f"; inherited: ancestor PID {origin[0]} ({origin[1]}) is disabled too"
                     if origin else "")
        return Check("prctl", title, FAIL,
                     f"{who} is THP-disabled by prctl(PR_SET_THP_DISABLE){inherited}",
                     "the flag survives fork and exec: start the service from a parent that does not set it, "
                     "or set it with PR_THP_DISABLE_EXCEPT_ADVISED (Linux 6.18)")
    if except_advised:
        return Check("prctl", title, OK, f"{who}: disabled except advised regions (flag 2); "
                                         "thpguard regions are advised")
    detail = f"{who}: not disabled"
    if ctx.pid is not None:
        detail += " (THP_enabled: 1; the except-advised flag is not visible from outside)"
    return Check("prctl", title, OK, detail)


def check_cgroup(ctx: HostContext, headroom: int) -> Check:
    title = "memory cgroup"
    try:
        cg = kernel.memory_cgroup(ctx.pid or "self", ctx.roots)
    except OSError as exc:
        return Check("cgroup", title, NA, f"cannot read the cgroup: {exc.strerror or exc}")
    if cg is None:
        return Check("cgroup", title, NA, "no memory controller applies")
    where = f"v{cg.version} {cg.path}"
    if cg.limit_bytes is None:
        return Check("cgroup", title, OK, f"{where}: no limit, {fmt_bytes(cg.usage_bytes)} used")
    avail = cg.available_bytes or 0
    detail = f"{where}: {fmt_bytes(cg.usage_bytes)} of {fmt_bytes(cg.limit_bytes)} used"
    if avail < headroom:
        want = (cg.usage_bytes or 0) + headroom
        return Check("cgroup", title, WARN,
                     detail + f"; less than {fmt_bytes(headroom)} free for repair copies (collapse fails EBUSY)",
                     f"raise the limit: echo {want} > {cg.limit_file}")
    return Check("cgroup", title, OK, detail + f"; {fmt_bytes(avail)} free for repair copies")


def check_fragmentation(ctx: HostContext, wanted: int) -> Check:
    title = "free huge blocks"
    free = kernel.free_huge_bytes(ctx.roots, ctx.caps.pmd_size)
    if free is None:
        return Check("fragmentation", title, NA, "cannot read /proc/buddyinfo")
    detail = f"{fmt_bytes(free)} free in blocks of {fmt_bytes(ctx.caps.pmd_size)} or more"
    if free < wanted:
        return Check("fragmentation", title, WARN, detail + " (memory is fragmented)",
                     "echo 1 > /proc/sys/vm/compact_memory (as root), or keep defrag=madvise")
    return Check("fragmentation", title, OK, detail)


def host_checks(ctx: HostContext, headroom: int = 64 * MiB, wanted_free: int = 64 * MiB) -> List[Check]:
    """Run every host check, in display order; nothing is printed or written."""
    checks: List[Callable[[HostContext], Check]] = [
        check_enabled, check_defrag, check_pmd_size, check_mthp, check_khugepaged,
        check_collapse, check_pagemap_scan, check_populate_write, check_process_madvise,
        check_direct_cow, check_prctl,
    ]
    out = [f(ctx) for f in checks]
    out.append(check_cgroup(ctx, headroom))
    out.append(check_fragmentation(ctx, wanted_free))
    return out


def has_capability(bit: int, pid="self", roots: Optional[Roots] = None) -> Optional[bool]:
    """Whether *pid* has capability *bit* in its effective set (None if unknown)."""
    try:
        cap = kernel.read_status(pid, roots).cap_eff
    except OSError:
        return None
    return None if cap is None else bool(cap >> bit & 1)
