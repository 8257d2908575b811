"""10. multiprocessing workers that only read a table shared at fork.

The parent builds a float32 table (256 MiB quick, 2 GiB full) in each
memory variant of ``_tables`` and starts a ``multiprocessing`` pool (the
``fork`` start method, 2 workers) whose tasks only read it: dependent
random lookups for a fixed time. Nobody writes, so nothing splits: this
shows what read-only sharing keeps (every worker's table stays
PMD-mapped) and what each mechanism costs where there is nothing to
repair (the guard idles; ``copy`` still copies the whole table into every
worker at fork). Reported as ratios against 4 KiB pages in the same round:
lookups per CPU second of the worker, the pool's start-up time, and the PSS of parent and
workers together.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Dict, List

from . import _cbench, _tables
from ._harness import GiB, MiB, Result, Settings, fmt_bytes, in_child, interleave, median, now, paired

NAME = "pool"
TITLE = "multiprocessing workers that only read a table shared at fork"

WORKERS = 2
_STATE: Dict[str, object] = {}


def _work(seconds: float) -> dict:
    """A pool task: dependent lookups for ``seconds``; lookups/s, and what
    smaps says of this worker's copy of the table."""
    # Each worker takes exactly one task: it waits here until every other
    # worker has one too (on a busy host one worker could otherwise take
    # them all, and the run would measure a single worker).
    _STATE["barrier"].wait(timeout=120)
    ffi, lib = _cbench.load()
    table = _STATE["table"]
    pointer = ffi.cast("float *", ffi.from_buffer(table.view))
    bits = (table.size // 4).bit_length() - 1
    step, done, at = 50_000, 0, os.getpid()
    started, cpu = now(), time.thread_time()
    while now() - started < seconds:
        at = lib.tgb_lookup_f32(pointer, bits, at, step)
        done += step
    # Per CPU second of this thread: on a shared host, what the pages cost,
    # not how much CPU the scheduler gave the worker.
    elapsed = time.thread_time() - cpu
    me = os.getpid()
    return {
        "pid": me, "lookups_per_s": done / elapsed,
        "huge": _tables.huge_bytes(me, table.address, table.address + table.size) / table.size,
        "hugetlb": _tables.hugetlb_bytes(me, table.address, table.address + table.size) / table.size,
        "pss_bytes": _tables.pss(me),
    }


def _ready(_: int) -> int:
    return os.getpid()


def _one(variant: str, size: int, seconds: float) -> dict:
    """One run in a fresh process: build, start the pool, read, measure."""
    table = _tables.allocate(variant, size)
    ffi, lib = _cbench.load()
    lib.tgb_fill_index_f32(ffi.cast("float *", ffi.from_buffer(table.view)), table.size // 4)
    _STATE["table"] = table
    ctx = multiprocessing.get_context("fork")
    _STATE["barrier"] = ctx.Barrier(WORKERS)  # inherited by the workers at fork
    t0 = now()
    with ctx.Pool(WORKERS) as pool:
        # A trivial task per worker: the pool is up once each has answered.
        pool.map(_ready, range(WORKERS), chunksize=1)
        startup = now() - t0
        found = pool.map(_work, [seconds] * WORKERS, chunksize=1)
        # Hugetlb pages are outside PSS: footprint() counts them too.
        family = _tables.footprint([os.getpid()] + [w["pid"] for w in found])
    return {
        "variant": variant, "mechanism": table.mechanism, "startup_s": startup,
        "fork_downgraded": table.fork_downgraded,
        "workers": found,
        "lookups_per_s": sum(w["lookups_per_s"] for w in found),
        "min_worker_huge": min(w["huge"] for w in found),
        "pss_bytes": family,
    }


def run(settings: Settings) -> Result:
    size = settings.pick(256 * MiB, 2 * GiB)
    seconds = settings.pick(1.0, 3.0)
    reps = settings.pick(2, 5)
    res = Result(NAME, TITLE, params={
        "table": f"{fmt_bytes(size)} float32, read only after fork",
        "pool": f"multiprocessing fork context, {WORKERS} workers, {seconds:.0f} s of dependent lookups each",
        "rounds": reps,
    })
    if settings.max_bytes is not None and size > settings.max_bytes:
        res.skipped = f"the {fmt_bytes(size)} table is above --max-gib"
        return res
    chosen = _tables.choose(res, size, lambda v: size * (WORKERS + 1 if v == "copy eager" else
                                                         0 if v == "hugetlb" else 1) + 2 * GiB)
    if chosen is None:
        return res
    runnable, missing = chosen
    samples = interleave({v: (lambda v=v: _tables.run_variant(v, size, WORKERS, lambda: in_child(
        _one, v, size, seconds))) for v in runnable}, reps, warmup=0)
    res.samples["runs"] = samples
    res.samples["unavailable"] = missing

    def col(v: str, key: str) -> List[float]:
        return [s[key] for s in samples[v]]

    series = []
    for v in _tables.VARIANTS:
        if v in missing:
            _tables.not_available(res, series, v, missing[v])
            continue
        label = _tables.label_of(v, samples[v], res)
        res.add(f"{label}: lookups per CPU second", paired(col(v, "lookups_per_s"), col("4k", "lookups_per_s")), f"{v}/4k",
                f"{median(col(v, 'lookups_per_s')) / 1e6:.2f} M/CPU-s", f"{median(col('4k', 'lookups_per_s')) / 1e6:.2f} M/CPU-s")
        res.add(f"{label}: pool start-up", paired(col(v, "startup_s"), col("4k", "startup_s")), f"time {v}/4k",
                f"{median(col(v, 'startup_s')) * 1e3:.0f} ms", f"{median(col('4k', 'startup_s')) * 1e3:.0f} ms")
        res.add(f"{label}: memory (PSS + hugetlb), parent + workers", paired(col(v, "pss_bytes"), col("4k", "pss_bytes")),
                f"memory {v}/4k", fmt_bytes(median(col(v, "pss_bytes"))), fmt_bytes(median(col("4k", "pss_bytes"))))
        res.notes.append(f"{label} [{samples[v][0]['mechanism']}]: workers' table PMD-mapped "
                         f"{median(col(v, 'min_worker_huge')):.0%} after reading (least of {WORKERS})")
        series.append({
            "variant": v, "label": label, "available": True,
            "lookups_ratio": [a / b for a, b in zip(col(v, "lookups_per_s"), col("4k", "lookups_per_s"))],
            "startup_ratio": [a / b for a, b in zip(col(v, "startup_s"), col("4k", "startup_s"))],
            "pss_ratio": [a / b for a, b in zip(col(v, "pss_bytes"), col("4k", "pss_bytes"))],
            "worker_huge_after": median(col(v, "min_worker_huge")),
            "downgraded_runs": len(_tables.downgrades(samples[v])),
        })
    res.series["variants"] = series
    return res
