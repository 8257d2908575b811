"""2. Time to full coverage after fork, with the guard against kernel defaults.

A region of 256 blocks (512 MiB) is forked; the child writes one byte per
block, which splits all of them, then samples its own PAGEMAP_SCAN
coverage over time:

``guarded``
    the guard was installed in the parent before fork (default interval);
    it restarts in the child, which samples until coverage is 100 %.
``unguarded``
    no guard, kernel defaults: the child watches what khugepaged does for a
    bounded time (60 s; 5 s with --quick). Expected: nothing, since every
    split block still shares 511 pages with the live parent, more than
    khugepaged's ``max_ptes_shared``.
"""

from __future__ import annotations

import time

import thpguard

from . import _cbench, _guard
from ._harness import pmd_size, Result, Settings, fmt_bytes, in_child, median, now, ratio, warm_memory

NAME = "coverage"
TITLE = "time to full coverage after a child splits 256 blocks: guard vs kernel defaults"

_VMSTAT = ("thp_scan_exceed_share_pte", "thp_collapse_alloc", "thp_split_pmd")


def _vmstat() -> dict:
    out = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                key, value = line.split()
                if key in _VMSTAT:
                    out[key] = int(value)
    except OSError:
        pass
    return out


def _child(region, watch_s: float, poll_s: float, stop_when_complete: bool) -> dict:
    ffi, lib = _cbench.load()
    forked = now()
    # Repairs allocate fresh huge pages: let them reuse warm ones.
    warm_memory(region.size)
    vm0 = _vmstat()
    lib.tgb_write_each(ffi.cast("void *", region.address), region.size, region.pmd_size)
    t0 = now()
    first = region.coverage()
    series = [(0.0, first.ratio)]
    full_at = None
    while True:
        t = now() - t0
        if t >= watch_s:
            break
        time.sleep(poll_s)
        cov = region.coverage()
        t = now() - t0
        series.append((t, cov.ratio))
        if cov.complete and full_at is None:
            full_at = t
            if stop_when_complete:
                break
    vm1 = _vmstat()
    return {
        "split_blocks": first.split_blocks,
        "split_s": t0 - forked,
        "series": series,
        "time_to_full_s": full_at,
        "final_ratio": series[-1][1],
        "watched_s": series[-1][0],
        "vmstat_delta": {k: vm1.get(k, 0) - vm0.get(k, 0) for k in vm0},
    }


def median_run(runs: list) -> dict:
    """The guarded run whose time to 100 % is the median (unfinished last)."""
    ordered = sorted(runs, key=lambda r: (r["time_to_full_s"] is None, r["time_to_full_s"] or 0.0))
    return ordered[(len(ordered) - 1) // 2]


def run(settings: Settings) -> Result:
    _guard.require()
    blocks = 256
    pmd = pmd_size()
    watch_unguarded = settings.pick(5.0, 60.0)
    guarded_reps = settings.pick(3, 7)
    res = Result(
        NAME,
        TITLE,
        params={
            "region": fmt_bytes(blocks * pmd),
            "split_blocks": blocks,
            "guarded_reps": guarded_reps,
            "unguarded_watch_s": watch_unguarded,
        },
    )
    guarded, unguarded = [], []
    with thpguard.alloc(blocks * pmd) as region:
        # Interleaved: G U G G ... (the unguarded watch is long, so it runs once).
        schedule = ["G"] * settings.warmup + ["G", "U"] + ["G"] * (guarded_reps - 1)
        warm = settings.warmup
        for kind in schedule:
            if kind == "G":
                guard = _guard.start()
                interval = guard.interval
                try:
                    sample = in_child(_child, region, 30.0, 0.002, True)
                finally:
                    _guard.stop(guard)
                sample["interval_s"] = interval
                if warm:
                    warm -= 1
                else:
                    guarded.append(sample)
            else:
                unguarded.append(in_child(_child, region, watch_unguarded, 0.1, False))
    res.samples["guarded"] = guarded
    res.samples["unguarded"] = unguarded
    res.series["guarded"] = median_run(guarded)["series"]
    res.series["unguarded"] = unguarded[0]["series"]
    interval = guarded[0]["interval_s"]
    reached = [s["time_to_full_s"] for s in guarded if s["time_to_full_s"] is not None]
    if reached:
        t_full = median(reached)
        res.add(
            "guarded: time to 100 %",
            ratio(t_full, interval),
            "time / guard interval",
            f"{t_full * 1e3:.0f} ms",
            f"interval {interval * 1e3:.0f} ms",
        )
    if len(reached) < len(guarded):
        res.notes.append(f"{len(guarded) - len(reached)} guarded run(s) did not reach 100 % within 30 s")
    u = unguarded[0]
    res.add(
        f"unguarded: coverage after {u['watched_s']:.0f} s",
        u["final_ratio"],
        "huge/total at the end",
        f"{u['final_ratio']:.0%}",
        "100 % guarded",
    )
    res.notes.append(
        "unguarded /proc/vmstat deltas (system wide): "
        + ", ".join(f"{k} {v}" for k, v in sorted(u["vmstat_delta"].items()))
    )
    return res
