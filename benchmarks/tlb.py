"""3. What a split costs the application: pointer chasing over huge vs split pages.

The parent builds one random cycle through every 4 KiB page of a region
(one 8-byte slot per page at a random cache line) and forks three
workers, which keep their state while the parent asks each in turn to
follow the chain for a fixed number of dependent loads (in C): pristine,
split, repaired, pristine, ... so load on the machine hits all three alike.

``pristine``
    the worker reads the region as forked: still PMD-mapped, shared.
``split``
    the worker first wrote one byte per 2 MiB block, keeping its value:
    every block is split into 4 KiB pages in the worker.
``repaired``
    the same split, then thpguard repaired it (the background guard, still
    running while timed, where this thpguard has one; else
    ``Region.collapse()``).
"""

from __future__ import annotations

import thpguard

from . import _cbench, _guard
from ._harness import GiB, Result, Settings, Worker, fmt_bytes, median, now, paired, warm_memory

NAME = "tlb"
TITLE = "what a split costs the application: dependent random reads (pointer chasing)"

VARIANTS = ("pristine", "split", "repaired")


def _setup(region, first: int, hops: int, variant: str) -> dict:
    ffi, lib = _cbench.load()
    info = {"variant": variant}
    state = {"region": region, "first": first, "hops": hops, "info": info, "guard": None}
    if variant == "repaired":
        warm_memory(region.size)  # the repair allocates: let it reuse warm pages
    if variant != "pristine":
        lib.tgb_write_each(ffi.cast("void *", region.address), region.size, region.pmd_size)
        info["coverage_split"] = region.coverage().ratio
    if variant == "repaired":
        started = now()
        if _guard.available():
            state["guard"] = _guard.start()
            info["repair"] = "guard"
            info["repaired"] = _guard.wait_complete(region, timeout=120.0)
        else:
            info["repair"] = "Region.collapse()"
            info["repaired"] = region.collapse().coverage.complete
        info["repair_s"] = now() - started
    lib.tgb_chase(ffi.cast("uint64_t *", region.address), first, hops)  # warm caches and TLB
    return state


def _measure(state: dict) -> dict:
    ffi, lib = _cbench.load()
    region = state["region"]
    t0 = now()
    end = lib.tgb_chase(ffi.cast("uint64_t *", region.address), state["first"], state["hops"])
    elapsed = now() - t0
    return {
        "seconds": elapsed,
        "hops_per_s": state["hops"] / elapsed,
        "coverage": region.coverage().ratio,
        "end": int(end),
    }


def run(settings: Settings) -> Result:
    sizes = settings.pick((2 * GiB,), (1 * GiB, 4 * GiB))
    hops = settings.pick(200_000, 500_000)
    rounds = settings.pick(7, 25)
    res = Result(
        NAME,
        TITLE,
        params={
            "sizes": [fmt_bytes(s) for s in sizes],
            "hops_per_round": hops,
            "rounds": rounds,
            "repair": "guard" if _guard.available() else "Region.collapse() (no guard in this thpguard)",
        },
    )
    ffi, lib = _cbench.load()
    for size in settings.sizes(res, sizes, headroom=max(sizes) + 2 * GiB):
        # Like the repaired worker's pages, the parent's come from memory
        # touched just before: both are backed alike by the host.
        warm_memory(size)
        with thpguard.alloc(size) as region:
            first = lib.tgb_build_chain(ffi.cast("uint64_t *", region.address), size, 4096, 0x7468706775617264)
            if first < 0:
                raise MemoryError("cannot build the pointer chain")
            workers = {}
            try:
                for v in VARIANTS:
                    workers[v] = Worker(_setup, _measure, region, first, hops, v)
                samples = {v: [] for v in VARIANTS}
                for round_no in range(settings.warmup + rounds):
                    for v in VARIANTS:
                        sample = workers[v].measure()
                        if round_no >= settings.warmup:
                            samples[v].append(sample)
                infos = {v: w.info for v, w in workers.items()}
            finally:
                for w in workers.values():
                    w.close()
        res.samples[fmt_bytes(size)] = {"rounds": samples, "workers": infos}
        per_round = {v: [s["hops_per_s"] for s in samples[v]] for v in VARIANTS}
        rate = {v: median(per_round[v]) for v in VARIANTS}
        for v, base in (("split", "pristine"), ("repaired", "pristine"), ("repaired", "split")):
            res.add(
                f"{fmt_bytes(size)} {v}" + ("" if base == "pristine" else f" vs {base}"),
                paired(per_round[v], per_round[base]),
                f"throughput {v}/{base}",
                f"{rate[v] / 1e6:.2f} M hops/s",
                f"{rate[base] / 1e6:.2f} M hops/s",
            )
        res.series.setdefault("ratios", []).append(
            {
                "size": fmt_bytes(size),
                "split": paired(per_round["split"], per_round["pristine"]),
                "repaired": paired(per_round["repaired"], per_round["pristine"]),
            }
        )
        rep = infos["repaired"]
        res.notes.append(
            f"{fmt_bytes(size)}: repair by {rep['repair']} took {rep['repair_s']:.2f} s; "
            f"coverage while timed: pristine {min(s['coverage'] for s in samples['pristine']):.0%}, "
            f"split {max(s['coverage'] for s in samples['split']):.0%}, "
            f"repaired {min(s['coverage'] for s in samples['repaired']):.0%}"
        )
    return res
