"""7. Stall of other threads while split blocks are repaired.

A forked child splits 512 blocks of its 1 GiB region, starts a thread that
maps, touches and unmaps 64 KiB in a loop (every round takes mmap_lock),
and repairs the region while that thread records each round's latency:

``idle``
    no repair; the same thread for a comparable time (the noise floor).
``chunked``
    the guard repairs the region with its default chunking (MADV_COLLAPSE
    per chunk, a bounded number of bytes per tick); where this thpguard has
    no guard, ``Region.collapse()`` with its default chunk.
``one call``
    a single ``MADV_COLLAPSE`` over the whole region (no chunking).

Each repetition is a fresh fork; the variants interleave.
"""

from __future__ import annotations

import threading
import time

import thpguard
from thpguard import _native, region as _region

from . import _cbench, _guard
from ._harness import pmd_size, GiB, MiB, Result, Settings, fmt_bytes, in_child, interleave, median, now, paired, percentile

NAME = "stall"
TITLE = "stall of another thread (mmap + fault loop) while split blocks are repaired"

VARIANTS = ("idle", "chunked", "one call")
_LOOP_BYTES = 64 << 10
_CAPACITY = 2_000_000


def _child(region, variant: str, idle_s: float) -> dict:
    ffi, lib = _cbench.load()
    lib.tgb_write_each(ffi.cast("void *", region.address), region.size, region.pmd_size)
    split = region.coverage().split_blocks
    stop = ffi.new("int *")
    starts = ffi.new("uint64_t[]", _CAPACITY)
    lat = ffi.new("uint64_t[]", _CAPACITY)
    count = [0]

    def loop() -> None:
        count[0] = lib.tgb_fault_loop(stop, starts, lat, _CAPACITY, _LOOP_BYTES)

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.02)
    t0, t0_ns = now(), lib.tgb_now_ns()
    if variant == "chunked" and _guard.available():
        guard = _guard.start()
        # Poll once per guard interval: a scan takes mmap_lock for read too.
        _guard.wait_complete(region, timeout=60.0, poll=guard.interval)
        _guard.stop(guard)
    elif variant == "chunked":
        region.collapse()
    elif variant == "one call":
        _native.collapse(region.address, region.size, region.size, _region.DEFAULT_COLLAPSE_RETRIES)
    else:
        time.sleep(idle_s)
    busy_s, t1_ns = now() - t0, lib.tgb_now_ns()
    stop[0] = 1
    thread.join()
    # Only the rounds that started while the repair (or the idle wait) ran.
    values = [lat[i] / 1e3 for i in range(count[0]) if t0_ns <= starts[i] < t1_ns]  # microseconds
    return {
        "variant": variant,
        "split_blocks": split,
        "repair_s": busy_s,
        "coverage_after": region.coverage().ratio,
        "rounds": len(values),
        "rounds_per_s": len(values) / busy_s if busy_s else float("nan"),
        "max_us": max(values) if values else float("nan"),
        "p99_us": percentile(values, 99),
        "p50_us": percentile(values, 50),
    }


def _chunking() -> str:
    if _guard.available():
        from thpguard.guard import DEFAULT_INTERVAL, Guard

        defaults = Guard()  # not started: only its default settings are read
        return (
            f"the guard: {fmt_bytes(defaults.chunk)} per MADV_COLLAPSE, at most "
            f"{fmt_bytes(defaults.max_repair_bytes)} per {DEFAULT_INTERVAL * 1e3:.0f} ms tick"
        )
    return f"Region.collapse(): {fmt_bytes(_region.DEFAULT_COLLAPSE_CHUNK)} per MADV_COLLAPSE"


def run(settings: Settings) -> Result:
    size = settings.pick(512 * MiB, 1 * GiB)
    idle_s = settings.pick(0.3, 0.5)
    res = Result(
        NAME,
        TITLE,
        params={
            "region": fmt_bytes(size),
            "split_blocks": size // pmd_size(),
            "chunked by": _chunking(),
            "loop": f"mmap+touch+munmap {fmt_bytes(_LOOP_BYTES)}",
            "reps": settings.reps,
        },
    )
    with thpguard.alloc(size) as region:
        samples = interleave(
            {v: (lambda v=v: in_child(_child, region, v, idle_s)) for v in VARIANTS},
            settings.reps,
            settings.warmup,
        )
    res.samples["runs"] = samples
    def rows(key: str, scale: float, unit: str, digits: int, label: str, what: str) -> None:
        per_round = {v: [r[key] * scale for r in samples[v]] for v in VARIANTS}
        mid = {v: median(per_round[v]) for v in VARIANTS}
        for v, base in (("chunked", "idle"), ("one call", "idle"), ("one call", "chunked")):
            res.add(
                f"{v}{'' if base == 'idle' else ' vs ' + base}: {label}",
                paired(per_round[v], per_round[base]),
                f"{what} {v}/{base}",
                f"{mid[v]:.{digits}f} {unit}",
                f"{mid[base]:.{digits}f} {unit}",
            )

    rows("max_us", 1e-3, "ms", 2, "worst", "latency")
    rows("p99_us", 1e-3, "ms", 3, "p99", "latency")
    rows("rounds_per_s", 1.0, "/s", 0, "loop rounds/s", "throughput")
    per_round = {v: [r["repair_s"] for r in samples[v]] for v in ("chunked", "one call")}
    res.add(
        "one call vs chunked: repair time",
        paired(per_round["one call"], per_round["chunked"]),
        "time one call/chunked",
        f"{median(per_round['one call']) * 1e3:.0f} ms",
        f"{median(per_round['chunked']) * 1e3:.0f} ms",
    )
    res.notes.append(
        "only loop rounds that started during the repair (or the idle wait) count; worst and p99 "
        "are medians over the repetitions of each run's worst and 99th percentile"
    )
    return res
