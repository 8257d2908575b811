"""4. Guard overhead: CPU per tick and per second at the default interval.

Each measurement is a forked child holding the populated region that
sleeps for a fixed window; the CPU the whole child used in that window
(getrusage) is compared with an idle child's (no guard), measured
interleaved. Variants:

``idle``            no guard (the baseline)
``pagemap``         the guard, PAGEMAP_SCAN detection, nothing split
``pagemap+splits``  the same after the child split 64 blocks (repair included)
``smaps``           the guard on the smaps fallback (as on Linux < 6.7)
``smaps+splits``    the smaps fallback after 64 splits

The smaps fallback is forced through thpguard's private switch
``pagemap._scan_state()["supported"] = False`` in the child.
"""

from __future__ import annotations

import resource
import time

import thpguard
from thpguard import pagemap

from . import _cbench, _guard
from ._harness import GiB, Result, Settings, fmt_bytes, in_child, interleave, median, now, warm_memory

NAME = "overhead"
TITLE = "guard overhead: CPU per tick and per second at the default interval"

VARIANTS = ("idle", "pagemap", "pagemap+splits", "smaps", "smaps+splits")
SPLITS = 64
LABELS = {
    "pagemap": "PAGEMAP_SCAN, no split",
    "pagemap+splits": f"PAGEMAP_SCAN, {SPLITS} split (repaired in window)",
    "smaps": "smaps fallback, no split",
    "smaps+splits": f"smaps fallback, {SPLITS} split (repaired in window)",
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(region, variant: str, window_s: float) -> dict:
    ffi, lib = _cbench.load()
    if variant.startswith("smaps"):
        pagemap._scan_state()["supported"] = False
    if variant.endswith("+splits"):
        warm_memory(SPLITS * region.pmd_size)  # the repairs allocate: warm pages
        stride = region.size // SPLITS
        for i in range(SPLITS):
            lib.tgb_write_each(ffi.cast("void *", region.address + i * stride), 1, 1)
    stats0 = thpguard.stats() if _guard.available() else {}
    cpu0, t0 = _cpu(), now()
    guard = _guard.start() if variant != "idle" else None
    time.sleep(window_s)
    if guard is not None:
        _guard.stop(guard)
    cpu, wall = _cpu() - cpu0, now() - t0
    out = {"variant": variant, "cpu_s": cpu, "wall_s": wall}
    if guard is not None:
        stats1 = thpguard.stats()
        out["ticks"] = stats1["ticks"] - stats0.get("ticks", 0)
        out["tick_cpu_s"] = stats1["tick_cpu_seconds"] - stats0.get("tick_cpu_seconds", 0.0)
        out["bytes_repaired"] = stats1["bytes_repaired"] - stats0.get("bytes_repaired", 0)
        out["interval_s"] = guard.interval
    out["coverage_end"] = region.coverage().ratio
    return out


def run(settings: Settings) -> Result:
    _guard.require()
    sizes = settings.pick((1 * GiB, 2 * GiB), (1 * GiB, 8 * GiB, 16 * GiB))
    window = settings.pick(0.25, 3.0)
    res = Result(
        NAME,
        TITLE,
        params={"sizes": [fmt_bytes(s) for s in sizes], "window_s": window, "splits": SPLITS, "reps": settings.reps},
    )
    for size in settings.sizes(res, sizes, headroom=4 * GiB):
        with thpguard.alloc(size) as region:
            samples = interleave(
                {v: (lambda v=v: in_child(_child, region, v, window)) for v in VARIANTS},
                settings.reps,
                settings.warmup,
            )
        res.samples[fmt_bytes(size)] = samples
        idle = [s["cpu_s"] / s["wall_s"] for s in samples["idle"]]
        for v in VARIANTS[1:]:
            runs = samples[v]
            # Extra CPU over the idle child of the same round, per second.
            per_s = median([s["cpu_s"] / s["wall_s"] - i for s, i in zip(runs, idle)])
            ticks = median([s["ticks"] for s in runs]) or float("nan")
            per_tick = per_s * window / ticks
            own_tick = median([s["tick_cpu_s"] / s["ticks"] for s in runs if s["ticks"]])
            res.add(
                f"{fmt_bytes(size)} {LABELS[v]}",
                per_s,
                "CPU s per s (one core = 1)",
                f"{per_tick * 1e3:.3f} ms/tick",
                f"guard thread: {own_tick * 1e3:.3f} ms/tick",
            )
        interval = samples["pagemap"][0]["interval_s"]
        res.params["interval_s"] = interval
    res.notes.append(
        "ratio = extra CPU of the child over the idle child per second of wall time; "
        "ms/tick = that extra CPU per full guard tick; the guard thread's own count "
        "(stats()['tick_cpu_seconds']) is shown beside it. With splits, the window includes "
        "repairing them"
    )
    return res
