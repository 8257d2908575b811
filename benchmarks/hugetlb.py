"""8. hugetlb against THP and small pages: reads, fork and allocation.

Three measurements, each a ratio against a baseline of the same run,
interleaved round by round:

``chase``
    dependent random reads (pointer chasing, one slot per 4 KiB page) over
    a region on 4 KiB pages (``MADV_NOHUGEPAGE``), THP, hugetlb 2 MiB and,
    where the kernel can find one, a hugetlb 1 GiB page; throughput against
    4 KiB pages.
``fork``
    per fork policy, a hugetlb region against a THP region of the same
    size (the only open regions): the time from ``fork()`` until the child
    runs its first line, and the child's first write to every 2 MiB page
    after fork (``share``: hugetlb copies each whole page, THP splits and
    copies 4 KiB; ``wipe``: zero-filled pages from the pool against THP
    faults).
``alloc``
    ``alloc(size)`` of a populated region: hugetlb 2 MiB against THP.

The hugetlb pool is grown for the run by exactly the pages it needs and
given back afterwards; the steps hold the host's pool lock meanwhile, so a
test suite on the same host waits instead of taking the pages
(benchmarks/_hostlock.py). The chase maps four regions of its size (4 GiB
each in a full run): it cuts the size, and says so in a note, to what
MemAvailable allows while 2 GiB stay available to the rest of the host.
"""

from __future__ import annotations

import mmap
import os

import thpguard
from thpguard import _native, kernel

from . import _cbench
from ._harness import GiB, MiB, Result, Settings, Skipped, fmt_bytes, interleave, median, mem_available, now, paired
from ._harness import PoolGrowth as _Pool

NAME = "hugetlb"
TITLE = "hugetlb against THP and 4 KiB pages: pointer chasing, fork per policy, allocation"

POLICIES = ("share", "copy", "wipe", "private")
_SEED = 0x6875676574
#: Memory the chase leaves available to the rest of the host (as the service
#: and snapshot rows' pool growth does).
KEEP_FREE = 2 * GiB
#: The smallest chase region worth measuring (still far beyond the TLB's reach).
MIN_CHASE = 256 * MiB


class _Small:
    """A region of 4 KiB pages with the Region attributes chase needs."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        self.address = _native.buffer_address(self._map)
        _native.madvise(self.address, size, _native.MADV_NOHUGEPAGE)
        _native.populate_write(self.address, size, mmap.PAGESIZE)

    def close(self) -> None:
        self._map.close()


def _chase_size(settings: Settings, res: Result, tables: int) -> int:
    """The chase region: 4 GiB (quick: 1 GiB), cut to what --max-gib and
    MemAvailable allow for ``tables`` regions of it, keeping KEEP_FREE
    available to everybody else (the host may have no swap: an OOM kill
    would leave the grown pools behind). The cut is said in a note."""
    size = settings.pick(1 * GiB, 4 * GiB)
    if settings.max_bytes is not None and size > settings.max_bytes:
        size = 1 * GiB
    available = mem_available()
    fit = max(0, available - KEEP_FREE) // tables
    if fit >= size:
        return size
    cut = size
    while cut > fit and cut > MIN_CHASE:
        cut //= 2
    if cut > fit:
        raise Skipped(f"{tables} chase regions of {fmt_bytes(MIN_CHASE)} need {fmt_bytes(tables * MIN_CHASE)}, "
                      f"MemAvailable is {fmt_bytes(available)} and {fmt_bytes(KEEP_FREE)} stays free")
    res.notes.append(f"chase region cut from {fmt_bytes(size)} to {fmt_bytes(cut)}: {tables} regions "
                     f"of {fmt_bytes(size)} need {fmt_bytes(tables * size)}, MemAvailable was "
                     f"{fmt_bytes(available)} and {fmt_bytes(KEEP_FREE)} stays free for the rest of the host")
    return cut


def _chase(settings: Settings, res: Result) -> None:
    gigantic = kernel.capabilities().hugetlb_gigantic.available
    # 4 KiB, THP and hugetlb 2 MiB regions, plus a 1 GiB one where the kernel has the size.
    size = _chase_size(settings, res, 4 if gigantic else 3)
    res.params["chase_region"] = fmt_bytes(size)
    hops = settings.pick(300_000, 1_000_000)
    ffi, lib = _cbench.load()
    pmd = kernel.pmd_size() or 2 * MiB
    regions = {}
    # The pools grow before the 4 KiB and THP regions are made: keep room for them too.
    pools = [_Pool(pmd, size // pmd, keep_free=KEEP_FREE + 2 * size)]
    try:
        if not pools[0].__enter__():
            raise Skipped(f"the {fmt_bytes(pmd)} hugetlb pool could not be grown by {size // pmd} pages")
        regions["4 KiB"] = _Small(size)
        regions["THP"] = thpguard.alloc(size)
        regions["hugetlb 2 MiB"] = thpguard.alloc(size, backend="hugetlb")
        if gigantic and size % GiB == 0:
            pools.append(_Pool(GiB, size // GiB, keep_free=KEEP_FREE))
            if pools[-1].__enter__():
                regions["hugetlb 1 GiB"] = thpguard.alloc(size, backend="hugetlb", page_size=GiB)
            else:
                res.notes.append("hugetlb 1 GiB left out: the kernel found no free 1 GiB of "
                                 "contiguous memory at run time (fragmented)")
        firsts = {}
        for name, r in regions.items():
            firsts[name] = lib.tgb_build_chain(ffi.cast("uint64_t *", r.address), size, 4096, _SEED)
            lib.tgb_chase(ffi.cast("uint64_t *", r.address), firsts[name], hops)  # warm

        def variant(name):
            def run():
                r = regions[name]
                t0 = now()
                lib.tgb_chase(ffi.cast("uint64_t *", r.address), firsts[name], hops)
                return hops / (now() - t0)
            return run

        samples = interleave({n: variant(n) for n in regions}, settings.pick(5, 15))
        res.samples["chase"] = samples
        for name in regions:
            if name != "4 KiB":
                res.add(f"chase {fmt_bytes(size)} {name}", paired(samples[name], samples["4 KiB"]),
                        "throughput vs 4 KiB", f"{median(samples[name]) / 1e6:.2f} M hops/s",
                        f"{median(samples['4 KiB']) / 1e6:.2f} M hops/s")
        res.add(f"chase {fmt_bytes(size)} hugetlb 2 MiB vs THP",
                paired(samples["hugetlb 2 MiB"], samples["THP"]), "throughput",
                f"{median(samples['hugetlb 2 MiB']) / 1e6:.2f} M hops/s",
                f"{median(samples['THP']) / 1e6:.2f} M hops/s")
    finally:
        for r in regions.values():
            r.close()
        for p in reversed(pools):
            p.__exit__()


def _fork_once(region) -> tuple:
    """(seconds until the child runs, seconds of the child's first write to each page)."""
    ffi, lib = _cbench.load()
    r_fd, w_fd = os.pipe()
    t0 = now()
    pid = os.fork()
    if pid == 0:
        # The child never returns into the benchmark (its finally blocks
        # would give the pool pages back a second time): os._exit always.
        code = 1
        try:
            os.close(r_fd)
            ran = now()
            took = 0.0
            if not region.closed:
                t1 = now()
                lib.tgb_write_each(ffi.cast("void *", region.address), region.size, 4096 * 512)
                took = now() - t1
            os.write(w_fd, f"{ran - t0!r} {took!r}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w_fd)
    data = b""
    while chunk := os.read(r_fd, 256):
        data += chunk
    os.close(r_fd)
    _, status = os.waitpid(pid, 0)
    if not data or os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the forked child failed (exit {os.waitstatus_to_exitcode(status)}, "
                           f"sent {data!r})")
    ran, took = (float(x) for x in data.split())
    return ran, took


def _fork(settings: Settings, res: Result) -> None:
    size = settings.pick(64 * MiB, 256 * MiB)
    pmd = kernel.pmd_size() or 2 * MiB
    pages = size // pmd
    # One policy at a time (a fork handles every open region: a copy region
    # would be copied by every other policy's fork too): the region, plus
    # what the child takes (its copy, its wiped range, the shared copies).
    samples = {}
    for policy in POLICIES:
        with _Pool(pmd, 2 * pages) as ok:
            if not ok:
                raise Skipped(f"the hugetlb pool could not be grown by {2 * pages} pages")
            regions = {}
            try:
                for backend in ("thp", "hugetlb"):
                    regions[(backend, policy)] = thpguard.alloc(size, fork=policy, backend=backend)
                samples.update(interleave({k: (lambda r=r: _fork_once(r)) for k, r in regions.items()},
                                          settings.pick(5, 15)))
            finally:
                for r in regions.values():
                    r.close()
    res.samples["fork"] = {f"{b} {p}": v for (b, p), v in samples.items()}
    for policy in POLICIES:
        h, t = samples[("hugetlb", policy)], samples[("thp", policy)]
        res.add(f"fork {policy}", paired([x[0] for x in h], [x[0] for x in t]),
                "fork latency hugetlb/THP", f"{median([x[0] for x in h]) * 1e3:.2f} ms",
                f"{median([x[0] for x in t]) * 1e3:.2f} ms")
        if policy != "private":
            res.add(f"first write after fork {policy}", paired([x[1] for x in h], [x[1] for x in t]),
                    "child's write to each page, hugetlb/THP",
                    f"{median([x[1] for x in h]) * 1e3:.2f} ms",
                    f"{median([x[1] for x in t]) * 1e3:.2f} ms")
    res.params["fork_region"] = fmt_bytes(size)


def _alloc(settings: Settings, res: Result) -> None:
    size = settings.pick(64 * MiB, 512 * MiB)
    pmd = kernel.pmd_size() or 2 * MiB
    with _Pool(pmd, size // pmd) as ok:
        if not ok:
            raise Skipped("the hugetlb pool could not be grown")

        def run(backend):
            def once():
                t0 = now()
                r = thpguard.alloc(size, backend=backend)
                took = now() - t0
                r.close()
                return took
            return once

        samples = interleave({"thp": run("thp"), "hugetlb": run("hugetlb")}, settings.pick(5, 15))
    res.samples["alloc"] = samples
    res.add(f"alloc {fmt_bytes(size)} populated", paired(samples["hugetlb"], samples["thp"]),
            "time hugetlb/THP", f"{median(samples['hugetlb']) * 1e3:.2f} ms",
            f"{median(samples['thp']) * 1e3:.2f} ms")


def run(settings: Settings) -> Result:
    caps = kernel.capabilities()
    if not caps.hugetlb.available:
        raise Skipped(f"no hugetlb here: {caps.hugetlb.reason}")
    if os.geteuid() != 0:
        raise Skipped("growing the hugetlb pool for the run needs root")
    res = Result(NAME, TITLE, params={"quick": settings.quick})
    for step in (_alloc, _fork, _chase):
        try:
            step(settings, res)
        except Skipped as exc:
            res.notes.append(f"{step.__name__.strip('_')} left out: {exc}")
    return res
