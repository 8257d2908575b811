"""6. Allocation: thpguard.alloc(populate=True) against numpy and mmap + memset.

Each variant allocates and fills ``size`` bytes, then the huge-page coverage
of what it made is read from PAGEMAP_SCAN (untimed) and it is freed. The
variants interleave after a warm-up round. Right before each timed
allocation the same amount of memory is touched and freed, so the timed
step finds warm pages. The cold figure is one populate of huge pages made
after waiting until the host has taken free memory back.
"""

from __future__ import annotations

import importlib.util
import mmap
import time

import thpguard
from thpguard import _native, pagemap

from . import _cbench
from ._harness import pmd_size, GiB, MiB, Result, Settings, Skipped, fmt_bytes, interleave, median, now, paired, ratio, warm_memory

NAME = "alloc"
TITLE = "allocation: alloc(populate=True) vs numpy.zeros + fill and mmap + memset (warm)"

_REPORTING_WAIT_S = 3.0

VARIANTS = ("thpguard.alloc", "numpy.zeros+fill", "mmap+memset")


def _coverage(address: int, size: int) -> float:
    page = mmap.PAGESIZE
    start = address - address % page
    end = -(-(address + size) // page) * page
    cov = pagemap.coverage(start, end, pmd_size())
    return cov.huge_bytes / size


def _thpguard(size: int) -> dict:
    t0 = now()
    region = thpguard.alloc(size, populate=True)
    elapsed = now() - t0
    cov = _coverage(region.address, region.size)
    region.close()
    return {"seconds": elapsed, "coverage": cov}


def _numpy(size: int) -> dict:
    import numpy

    t0 = now()
    array = numpy.zeros(size, dtype=numpy.uint8)
    array.fill(1)
    elapsed = now() - t0
    cov = _coverage(array.ctypes.data, size)
    del array
    return {"seconds": elapsed, "coverage": cov}


def _mmap(size: int) -> dict:
    ffi, lib = _cbench.load()
    t0 = now()
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = _native.buffer_address(m)
    lib.tgb_fill(ffi.cast("void *", address), 1, size)
    elapsed = now() - t0
    cov = _coverage(address, size)
    m.close()
    return {"seconds": elapsed, "coverage": cov}


def run(settings: Settings) -> Result:
    if importlib.util.find_spec("numpy") is None:
        raise Skipped("needs numpy (pip install '.[bench]')")
    sizes = settings.pick((512 * MiB,), (1 * GiB, 4 * GiB))
    res = Result(NAME, TITLE, params={"sizes": [fmt_bytes(s) for s in sizes], "reps": settings.reps})
    for size in settings.sizes(res, sizes):
        # Free pages go back to the host about 2 s after they are freed
        # (free page reporting): wait for that, then the first touch is cold.
        time.sleep(_REPORTING_WAIT_S)
        cold = warm_memory(size)
        pre_touch = []

        def warmed(fn):
            # Touch the memory right before, so the timed step reuses warm pages.
            pre_touch.append(warm_memory(size))
            return fn(size)

        samples = interleave(
            {
                "thpguard.alloc": lambda: warmed(_thpguard),
                "numpy.zeros+fill": lambda: warmed(_numpy),
                "mmap+memset": lambda: warmed(_mmap),
            },
            settings.reps,
            settings.warmup,
        )
        res.samples[fmt_bytes(size)] = samples
        res.samples[f"{fmt_bytes(size)} cold_first_touch_s"] = cold
        res.samples[f"{fmt_bytes(size)} pre_touch_s"] = pre_touch
        secs = {v: median([s["seconds"] for s in samples[v]]) for v in VARIANTS}
        cov = {v: median([s["coverage"] for s in samples[v]]) for v in VARIANTS}
        gb = size / 1e9
        for v in VARIANTS[1:]:
            res.add(
                f"{fmt_bytes(size)} thpguard vs {v}",
                paired(
                    [s["seconds"] for s in samples["thpguard.alloc"]], [s["seconds"] for s in samples[v]]
                ),
                "time thpguard/other",
                f"{gb / secs['thpguard.alloc']:.2f} GB/s, {cov['thpguard.alloc']:.1%} huge",
                f"{gb / secs[v]:.2f} GB/s, {cov[v]:.1%} huge",
            )
    done = [s for s in sizes if fmt_bytes(s) in res.samples]
    if not done:
        raise Skipped("; ".join(res.notes))
    biggest = max(done)
    warm = median([s["seconds"] for s in res.samples[fmt_bytes(biggest)]["thpguard.alloc"]])
    cold = res.samples[f"{fmt_bytes(biggest)} cold_first_touch_s"]
    res.add(
        f"{fmt_bytes(biggest)} cold first touch vs warm alloc",
        ratio(cold, warm),
        "time cold/warm",
        f"{biggest / 1e9 / cold:.2f} GB/s",
        f"{biggest / 1e9 / warm:.2f} GB/s",
    )
    res.notes.append(
        f"cold = populating that many huge pages {_REPORTING_WAIT_S:.0f} s after the last free "
        "(the host had taken the free pages back); one sample"
    )
    return res
