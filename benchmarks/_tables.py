"""The memory under the service and snapshot benchmarks, one variant per
mechanism, and what the kernel really maps there (smaps).

Every variant is a private anonymous range of its own VMA, aligned to the
PMD size, faulted in before any fork:

``4k``
    ``MADV_NOHUGEPAGE``: 4 KiB pages only, the floor.
``thp``
    ``MADV_HUGEPAGE`` and nothing else: what numpy gives a large array by
    default. A write after fork splits the writer's 2 MiB block for good.
``share+guard``
    ``thpguard.alloc(fork="share")`` and the background guard: a write
    splits, the guard collapses the block again in that process.
``copy eager``
    ``thpguard.alloc(fork="copy")`` with the copy made at fork: the child
    copies the whole range into its own huge pages, the parent waits.
``copy lazy``
    ``copy`` with a lazy mechanism (the kernel's direct COW or userfaultfd
    block copy): a 2 MiB block is copied on its first write.
``hugetlb``
    ``thpguard.alloc(fork="share", backend="hugetlb")``: the reserved pool,
    never split. Each run grows the 2 MiB pool by what it needs (the table,
    and a copy of it per process that may write to a page it shares:
    :func:`hugetlb_pool_pages`) and gives it back. Where the pool could not
    cover the copies, thpguard downgrades the fork (the child gets a THP
    copy of the table): such runs are reported as downgraded, never as
    hugetlb.

:func:`unavailable` says why a variant cannot run here (this thpguard or
this host lacks it); nothing is hard-coded about which versions have what:
it asks thpguard's own API. :func:`choose` and :func:`run_variant` are the
set-up every scenario (service, snapshot, pool) shares.
"""

from __future__ import annotations

import inspect
import mmap
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._harness import PoolGrowth, Result, fmt_bytes, loadavg, mem_available

VARIANTS = ("4k", "thp", "share+guard", "copy eager", "copy lazy", "hugetlb")

LABELS = {
    "4k": "4 KiB pages (MADV_NOHUGEPAGE)",
    "thp": "MADV_HUGEPAGE, no thpguard",
    "share+guard": "thpguard share + guard",
    "copy eager": "thpguard copy, eager (at fork)",
    "copy lazy": "thpguard copy, lazy (on first write)",
    "hugetlb": "thpguard hugetlb backend",
}

_PMD_FALLBACK = 2 << 20
#: Memory a grown hugetlb pool leaves available to everybody else (bytes).
POOL_KEEP_FREE = 2 << 30


def pmd_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _PMD_FALLBACK


def _alloc_takes(name: str) -> bool:
    import thpguard

    try:
        return name in inspect.signature(thpguard.alloc).parameters
    except (TypeError, ValueError):
        return False


def _capability_reason(*words: str) -> str:
    """What ``thpguard.capabilities()`` says about a feature, if it exists."""
    import thpguard

    caps = getattr(thpguard, "capabilities", None)
    if not callable(caps):
        return ""
    try:
        found = caps()
    except Exception as exc:  # a report, not a benchmark failure
        return f"capabilities() failed: {exc}"
    text = repr(found)
    hits = [m.group(0) for w in words for m in re.finditer(rf"[^,;{{}}]*{re.escape(w)}[^,;{{}}]*", text)]
    return "; ".join(dict.fromkeys(h.strip() for h in hits))[:300]


def alloc_kwargs(variant: str) -> Dict[str, Any]:
    """The ``thpguard.alloc`` keywords of a thpguard variant."""
    if variant == "share+guard":
        return {"fork": "share"}
    if variant == "copy eager":
        kwargs: Dict[str, Any] = {"fork": "copy"}
        if _alloc_takes("copy_mode"):
            kwargs["copy_mode"] = "eager"
        return kwargs
    if variant == "copy lazy":
        return {"fork": "copy", "copy_mode": "lazy", "strict": True}
    if variant == "hugetlb":
        return {"fork": "share", "backend": "hugetlb", "strict": True}
    raise ValueError(f"{variant!r} is not a thpguard variant")


def unavailable(variant: str, size: int) -> Optional[str]:
    """None if ``variant`` can run with a ``size``-byte table here, else why not.

    Asks this thpguard: an ``alloc()`` keyword it does not take means the
    mechanism is not in this version; a value it takes but refuses (an
    exception) gives thpguard's reason (a backend this build lacks, an
    empty hugetlb pool, userfaultfd not permitted).
    """
    if variant in ("4k", "thp"):
        return None
    import thpguard

    if variant == "share+guard":
        return None if callable(getattr(thpguard, "install", None)) else (
            "this thpguard has no background guard (thpguard.install)")
    if variant == "copy lazy" and not _alloc_takes("copy_mode"):
        extra = _capability_reason("lazy", "userfault")
        return "not available in this thpguard version: alloc() has no copy_mode, only the eager copy at fork" + (
            f" ({extra})" if extra else "")
    if variant == "hugetlb" and not _alloc_takes("backend"):
        return "not available in this thpguard version: alloc() has no hugetlb backend"
    if variant == "hugetlb":
        pages = size // pmd_size()
        with PoolGrowth(pmd_size(), pages, keep_free=POOL_KEEP_FREE) as ok:
            if not ok:
                return (f"not available here: the 2 MiB hugetlb pool could not be grown to the table's "
                        f"{pages} pages (free: {growth_free(pages)}; needs root and free memory)")
            return _probe(variant, size)
    return _probe(variant, pmd_size())


def growth_free(pages: int) -> int:
    """Free pages of the 2 MiB pool now (0 where there is none)."""
    from thpguard import kernel

    pool = kernel.hugetlb_pool(pmd_size())
    return pool.available if pool else 0


def _probe(variant: str, probe: int) -> Optional[str]:
    import thpguard

    try:
        region = thpguard.alloc(probe, **alloc_kwargs(variant))
    except Exception as exc:
        return f"not available here: {type(exc).__name__}: {exc}"
    try:
        if variant == "copy lazy" and getattr(region, "copy_mode", "lazy") == "eager":
            return "not available here: copy_mode='lazy' gave the eager copy"
        if variant == "hugetlb" and getattr(region, "backend", "hugetlb") != "hugetlb":
            return f"not available here: got backend {region.backend!r}"
    finally:
        region.close()
    return None


@dataclass
class Table:
    """A variant's table: ``address``/``size`` (bytes) of its own VMA, a
    writable ``view`` (memoryview), and ``mechanism`` (what thpguard says it
    used, or the madvise advice)."""

    variant: str
    address: int
    size: int
    view: memoryview
    mechanism: str
    _keep: List[Any] = field(default_factory=list)

    @property
    def fork_downgraded(self) -> Optional[str]:
        """Why thpguard copied this hugetlb ``share`` table into THP pages
        at the last fork (the pool could not cover the copies), else None."""
        return getattr(self._keep[0], "fork_downgraded", None) if self._keep else None


def _buffer_address(buf) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def allocate(variant: str, size: int) -> Table:
    """Map and fault in ``size`` bytes (a multiple of the PMD size) for
    ``variant``; with ``share+guard`` the guard is installed too."""
    if variant in ("4k", "thp"):
        pmd = pmd_size()
        # Private (the default MAP_SHARED would be shmem); the slack lets
        # the range start on a PMD boundary, and the advice on exactly that
        # range makes it a VMA of its own.
        mm = mmap.mmap(-1, size + pmd, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = _buffer_address(mm)
        offset = (-base) % pmd
        advice = mmap.MADV_NOHUGEPAGE if variant == "4k" else mmap.MADV_HUGEPAGE
        mm.madvise(advice, offset, size)
        view = memoryview(mm)[offset:offset + size]
        _touch(view)
        name = "MADV_NOHUGEPAGE" if variant == "4k" else "MADV_HUGEPAGE"
        return Table(variant, base + offset, size, view, name, [mm])
    import thpguard

    region = thpguard.alloc(size, **alloc_kwargs(variant))
    keep: List[Any] = [region]
    if variant == "share+guard":
        keep.append(thpguard.install())
    mechanism = variant
    if variant.startswith("copy"):
        mechanism = f"copy ({getattr(region, 'copy_mode', 'eager')})"
    elif variant == "hugetlb":
        mechanism = f"hugetlb ({getattr(region, 'page_size', 0) >> 20} MiB pages)"
    return Table(variant, region.address, region.size, region.view(), mechanism, keep)


def _touch(view: memoryview) -> None:
    page = mmap.PAGESIZE
    for off in range(0, len(view), page):
        view[off] = 0


# -- what the kernel maps ----------------------------------------------------

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def smaps_range(pid: int, start: int, end: int) -> Dict[str, int]:
    """Bytes of ``AnonHugePages``, ``Rss``, ``Pss`` and ``Private_Hugetlb``
    summed over the VMAs of ``pid`` that overlap ``[start, end)``
    (ground truth from ``/proc/PID/smaps``). Empty when the process is gone."""
    out = {"AnonHugePages": 0, "Rss": 0, "Pss": 0, "Private_Hugetlb": 0, "Shared_Hugetlb": 0}
    inside = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                m = _HEADER.match(line)
                if m:
                    lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                    inside = lo < end and hi > start
                    continue
                if inside:
                    key, _, rest = line.partition(":")
                    if key in out:
                        out[key] += int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def hugetlb_bytes(pid: int, start: int, end: int) -> int:
    """Bytes of ``[start, end)`` that ``pid`` maps from the hugetlb pool."""
    found = smaps_range(pid, start, end)
    return found.get("Private_Hugetlb", 0) + found.get("Shared_Hugetlb", 0)


def huge_bytes(pid: int, start: int, end: int) -> int:
    """Bytes of ``[start, end)`` that ``pid`` maps with huge pages (PMD THP or hugetlb)."""
    found = smaps_range(pid, start, end)
    return found.get("AnonHugePages", 0) + found.get("Private_Hugetlb", 0) + found.get("Shared_Hugetlb", 0)


def pss(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (smaps_rollup; 0 when gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _rollup(pid: int) -> Dict[str, int]:
    """``Pss``, ``Private_Hugetlb`` and ``Shared_Hugetlb`` of ``pid`` in
    bytes (smaps_rollup); empty when the process is gone."""
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Private_Hugetlb", "Shared_Hugetlb"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def footprint(pids: List[int]) -> int:
    """Bytes of memory the processes ``pids`` use between them: the sum of
    their PSS, plus the hugetlb pages they map, which smaps counts outside
    Rss and Pss: each one's private pages, and the shared ones once (the
    most any of them maps shared). That is exact for a process and its
    children, where every page still shared is mapped by the parent."""
    found = [_rollup(pid) for pid in pids]
    return (sum(r.get("Pss", 0) + r.get("Private_Hugetlb", 0) for r in found)
            + max((r.get("Shared_Hugetlb", 0) for r in found), default=0))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) in seconds; 0 when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # Fields 14 and 15 of proc(5), counted after the ")" that ends the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> List[int]:
    """The child pids of ``pid`` (/proc/PID/task/*/children)."""
    out: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return sorted(set(out))


# -- what every scenario shares ----------------------------------------------


def hugetlb_pool_pages(size: int, sharers: int) -> int:
    """2 MiB pool pages a hugetlb ``share`` table of ``size`` bytes needs
    when its process forks ``sharers`` children that all keep sharing it:
    the table, plus a copy of every page per process that may write to it
    while shared. thpguard checks, before each fork, that the pool has a
    page for every page each sharer may copy (the n-th child: n copies of
    the table), and downgrades the fork where it has not. The pool is the
    host's: another process may take a free page between the growth and a
    fork (seen here once in a quick run: 1 page short), so 1 % more, at
    least 8 pages, is asked for."""
    pages = size // pmd_size() * (1 + sharers)
    return pages + max(8, pages // 100)


def choose(res: Result, size: int, need: Callable[[str], int]) -> Optional[Tuple[List[str], Dict[str, str]]]:
    """The variants that can run with a ``size``-byte table, and why the
    others cannot. ``need(variant)`` is the memory (bytes) a run takes
    outside the hugetlb pool; a variant is left out when less is available.
    None (with ``res.skipped`` set) when the 4 KiB baseline cannot run."""
    runnable: List[str] = []
    missing: Dict[str, str] = {}
    for variant in VARIANTS:
        reason = unavailable(variant, size)
        wanted = need(variant)
        if reason is None and mem_available() < wanted:
            reason = f"left out: needs about {fmt_bytes(wanted)} available, {fmt_bytes(mem_available())} is"
        if reason:
            missing[variant] = reason
        else:
            runnable.append(variant)
    if "4k" not in runnable:
        res.skipped = f"the 4 KiB baseline cannot run: {missing.get('4k')}"
        return None
    return runnable, missing


def run_variant(variant: str, size: int, sharers: int, fn: Callable[[], dict]) -> dict:
    """One run of ``fn`` (a fresh server, store or pool for ``variant``);
    the sample it returns gets the load average at its start and, for
    hugetlb, the pool it had: the pool is grown for the run by the pages
    :func:`hugetlb_pool_pages` says (as far as the host gives them) and
    given back after it, even when the run fails."""
    load = loadavg()
    if variant != "hugetlb":
        sample = fn()
        sample["loadavg"] = load
        return sample
    pages = hugetlb_pool_pages(size, sharers)
    growth = PoolGrowth(pmd_size(), pages, keep_free=POOL_KEEP_FREE)
    with growth as covered:
        sample = fn()
    sample["loadavg"] = load
    sample["pool"] = {"pages_needed": pages, "pages_free": growth.free, "covered": covered}
    return sample


def not_available(res: Result, series: List[dict], variant: str, reason: str) -> None:
    """The table row and plot entry of a variant that could not run."""
    label = LABELS[variant]
    res.add(label, None, "", reason)
    series.append({"variant": variant, "label": label, "available": False, "reason": reason})


def downgrades(runs: List[dict]) -> List[str]:
    """The ``fork_downgraded`` reasons of the hugetlb runs that had one."""
    return [r["fork_downgraded"] for r in runs if r.get("fork_downgraded")]


def label_of(variant: str, runs: List[dict], res: Result) -> str:
    """The row label of ``variant``; a hugetlb run whose fork thpguard
    downgraded (the children got THP copies) is named so, with a note of
    why and how the pool was, never presented as hugetlb."""
    label = LABELS[variant]
    found = downgrades(runs)
    if variant != "hugetlb" or not found:
        return label
    pools = [r.get("pool") or {} for r in runs]
    res.notes.append(
        f"{label}: thpguard downgraded the share fork in {len(found)} of {len(runs)} runs (the children copied "
        f"the table into THP pages at fork): the pool had {min(p.get('pages_free', 0) for p in pools)} of the "
        f"{pools[0].get('pages_needed', 0)} free pages it needed; thpguard said: {found[0]}")
    return f"{label}, DOWNGRADED to THP copies in {len(found)} of {len(runs)} runs"
