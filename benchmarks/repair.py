"""1. Repair throughput: collapse() of split blocks against memcpy of the same bytes.

A 1 GiB region (512 MiB with --quick) is forked; the child writes one byte in each of N blocks
(spread over the region), which splits them, then times ``memcpy`` of those
N blocks, ``Region.collapse()``, and ``memcpy`` again (A B A; the memcpy
figure is the faster of the two, so the baseline is never flattered by
noise). Every repetition is a fresh fork, the N values interleave.
"""

from __future__ import annotations

import thpguard

from . import _cbench
from ._harness import GiB, MiB, Result, Settings, fmt_bytes, in_child, interleave, median, now, warm_memory

NAME = "repair"
TITLE = "repair throughput: collapse() of split blocks vs memcpy of the same bytes"


def _child(region, blocks: int) -> dict:
    ffi, lib = _cbench.load()
    pmd = region.pmd_size
    # Both steps below write fresh memory: touch twice that much first so
    # they reuse pages the host still backs (free memory goes back to it).
    warm_memory(2 * blocks * pmd)
    # The memcpy destination is made here: one shared with the parent would
    # be copied on write (and split) by the first memcpy.
    dst = thpguard.alloc(region.size, populate=False)
    pmd = region.pmd_size
    stride = region.size // blocks
    starts = [region.address + i * stride for i in range(blocks)]
    for start in starts:
        lib.tgb_write_each(ffi.cast("void *", start), 1, 1)
    t0 = now()
    before = region.coverage()
    scan_s = now() - t0

    def copy() -> float:
        t0 = now()
        for start in starts:
            offset = start - region.address
            lib.tgb_copy(ffi.cast("void *", dst.address + offset), ffi.cast("void *", start), pmd)
        return now() - t0

    for start in starts:  # fault the destination in, untimed
        lib.tgb_fill(ffi.cast("void *", dst.address + start - region.address), 0, pmd)
    copy_1 = copy()
    t0 = now()
    result = region.collapse()
    collapse_s = now() - t0
    copy_2 = copy()
    dst.close()
    return {
        "blocks": blocks,
        "bytes": blocks * pmd,
        "split_blocks_before": before.split_blocks,
        "collapse_s": collapse_s,
        "collapse_kernel_s": result.seconds,
        "scan_s": scan_s,
        "memcpy_s": min(copy_1, copy_2),
        "memcpy_samples_s": [copy_1, copy_2],
        "coverage_after": result.coverage.ratio,
        "failures": {str(k): v for k, v in result.failures.items()},
    }


def run(settings: Settings) -> Result:
    size = settings.pick(512 * MiB, 1 * GiB)
    counts = settings.pick((1, 64, 256), (1, 64, 512))
    res = Result(NAME, TITLE, params={"region": fmt_bytes(size), "blocks": list(counts), "reps": settings.reps})
    with thpguard.alloc(size) as region:
        samples = interleave(
            {str(n): (lambda n=n: in_child(_child, region, n)) for n in counts},
            settings.reps,
            settings.warmup,
        )
    res.samples["runs"] = samples
    for n in counts:
        runs = samples[str(n)]
        nbytes = runs[0]["bytes"]
        collapse_s = median([r["collapse_s"] for r in runs])
        memcpy_s = median([r["memcpy_s"] for r in runs])
        res.add(
            f"N={n} ({fmt_bytes(nbytes)})",
            median([r["memcpy_s"] / r["collapse_s"] for r in runs]),
            "speed collapse/memcpy",
            f"{nbytes / collapse_s / 1e9:.2f} GB/s",
            f"{nbytes / memcpy_s / 1e9:.2f} GB/s",
        )
        bad = [r for r in runs if r["coverage_after"] < 1.0 or r["split_blocks_before"] != n]
        if bad:
            res.notes.append(
                f"N={n}: {len(bad)} run(s) did not split exactly N blocks or did not end at 100 % coverage"
            )
    scan_s = median([r["scan_s"] for runs in samples.values() for r in runs])
    res.notes.append(
        "collapse time is the whole Region.collapse() call: scan, MADV_COLLAPSE, rescan "
        f"(one scan of the region: {scan_s * 1e3:.2f} ms, median)"
    )
    return res
