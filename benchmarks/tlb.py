"""3. What a split costs the application: pointer chasing over huge vs split pages.

The parent builds one random cycle through every 4 KiB page of a region
(one 8-byte slot per page at a random cache line) and forks a worker per
measurement. The worker follows the chain (dependent loads, in C) and
reports hops per second:

``pristine``
    the worker reads the region as forked: still PMD-mapped, shared.
``split``
    the worker first writes one byte per 2 MiB block, keeping its value:
    every block is split into 4 KiB pages in the worker.
``repaired``
    the same split, then thpguard repairs it (the background guard when
    this thpguard has one, else ``Region.collapse()``) before timing.

Variants interleave (pristine, split, repaired, pristine, ...).
"""

from __future__ import annotations


import thpguard

from . import _cbench, _guard
from ._harness import GiB, Result, Settings, fmt_bytes, in_child, interleave, median, now, ratio

NAME = "tlb"
TITLE = "what a split costs the application: dependent random reads (pointer chasing)"

VARIANTS = ("pristine", "split", "repaired")


def _worker(region, first: int, hops: int, variant: str) -> dict:
    ffi, lib = _cbench.load()
    base = ffi.cast("uint64_t *", region.address)
    out = {"variant": variant}
    guard = None
    if variant != "pristine":
        lib.tgb_write_each(ffi.cast("void *", region.address), region.size, region.pmd_size)
        out["coverage_split"] = region.coverage().ratio
    if variant == "repaired":
        started = now()
        if _guard.available():
            guard = _guard.start()
            out["repair"] = "guard"
            out["repaired"] = _guard.wait_complete(region, timeout=60.0)
        else:
            out["repair"] = "Region.collapse()"
            out["repaired"] = region.collapse().coverage.complete
        out["repair_s"] = now() - started
    lib.tgb_chase(base, first, max(hops // 4, 1000))  # warm caches and TLB
    t0 = now()
    end = lib.tgb_chase(base, first, hops)
    elapsed = now() - t0
    out["coverage"] = region.coverage().ratio
    if guard is not None:
        _guard.stop(guard)
    out.update(hops=hops, seconds=elapsed, hops_per_s=hops / elapsed, end=int(end))
    return out


def run(settings: Settings) -> Result:
    sizes = settings.pick((1 * GiB, 2 * GiB), (1 * GiB, 4 * GiB))
    hops = settings.pick(500_000, 4_000_000)
    res = Result(
        NAME,
        TITLE,
        params={
            "sizes": [fmt_bytes(s) for s in sizes],
            "hops": hops,
            "reps": settings.reps,
            "repair": "guard" if _guard.available() else "Region.collapse() (no guard in this thpguard)",
        },
    )
    ffi, lib = _cbench.load()
    for size in sizes:
        with thpguard.alloc(size) as region:
            first = lib.tgb_build_chain(ffi.cast("uint64_t *", region.address), size, 4096, 0x7468706775617264)
            if first < 0:
                raise MemoryError("cannot build the pointer chain")
            samples = interleave(
                {v: (lambda v=v: in_child(_worker, region, first, hops, v)) for v in VARIANTS},
                settings.reps,
                settings.warmup,
            )
        res.samples[fmt_bytes(size)] = samples
        rate = {v: median([s["hops_per_s"] for s in samples[v]]) for v in VARIANTS}
        res.add(
            f"{fmt_bytes(size)} split",
            ratio(rate["split"], rate["pristine"]),
            "throughput split/pristine",
            f"{rate['split'] / 1e6:.2f} M hops/s",
            f"{rate['pristine'] / 1e6:.2f} M hops/s",
        )
        res.add(
            f"{fmt_bytes(size)} repaired",
            ratio(rate["repaired"], rate["pristine"]),
            "throughput repaired/pristine",
            f"{rate['repaired'] / 1e6:.2f} M hops/s",
            f"{rate['pristine'] / 1e6:.2f} M hops/s",
        )
        res.add(
            f"{fmt_bytes(size)} repaired vs split",
            ratio(rate["repaired"], rate["split"]),
            "throughput repaired/split",
            f"{rate['repaired'] / 1e6:.2f} M hops/s",
            f"{rate['split'] / 1e6:.2f} M hops/s",
        )
        res.series.setdefault("ratios", []).append(
            {
                "size": fmt_bytes(size),
                "split": ratio(rate["split"], rate["pristine"]),
                "repaired": ratio(rate["repaired"], rate["pristine"]),
            }
        )
        repair_s = median([s["repair_s"] for s in samples["repaired"]])
        res.notes.append(
            f"{fmt_bytes(size)}: repair took {repair_s:.2f} s (median); "
            f"coverage while timed: pristine {min(s['coverage'] for s in samples['pristine']):.0%}, "
            f"split {max(s['coverage'] for s in samples['split']):.0%}, "
            f"repaired {min(s['coverage'] for s in samples['repaired']):.0%}"
        )
    return res
