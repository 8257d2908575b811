"""5. Fork latency with a populated region under each fork policy.

Each round maps one populated region (one variant at a time, so a fork
copies only that one), forks a few times and tears it down; the variants
interleave. A fork is timed twice: until ``os.fork()`` returns in the parent
(for ``copy, eager`` this includes waiting for the child's copy, by design)
and until the child has exited and been reaped. ``copy, lazy`` is the
``copy`` policy with ``copy_mode="auto"``: the userfaultfd block copy where
the host offers it (the line says which mechanism ran), which copies
nothing at fork.

The baseline is a plain aligned ``mmap`` with ``MADV_HUGEPAGE`` (what an
application gets without thpguard); a plain mmap on 4 KiB pages is shown too.
"""

from __future__ import annotations

import mmap
import os

import thpguard
from thpguard import _native

from ._harness import pmd_size, GiB, MiB, Result, Skipped, Settings, fmt_bytes, interleave, median, now, paired, warm_memory

NAME = "fork"
TITLE = "fork latency: os.fork() + child exit with a populated region, per fork policy"

BASELINE = "mmap+MADV_HUGEPAGE"
SMALL = "mmap, 4 KiB pages"
VARIANTS = (BASELINE, SMALL, "share", "copy, eager", "copy, lazy", "wipe", "private")


class _PlainMapping:
    def __init__(self, size: int, huge: bool) -> None:
        pmd = pmd_size()
        self.size = size
        self.address = _native.map_aligned(size, pmd)
        _native.madvise(self.address, size, _native.MADV_HUGEPAGE if huge else _native.MADV_NOHUGEPAGE)
        _native.populate_write(self.address, size, mmap.PAGESIZE)

    def close(self) -> None:
        _native.unmap(self.address, self.size)


def _one_fork() -> dict:
    t0 = now()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    t1 = now()
    os.waitpid(pid, 0)
    t2 = now()
    return {"fork_s": t1 - t0, "total_s": t2 - t0}


def _round(variant: str, size: int, forks: int) -> list:
    if variant == BASELINE:
        mapping = _PlainMapping(size, huge=True)
    elif variant == SMALL:
        mapping = _PlainMapping(size, huge=False)
    elif variant == "copy, eager":
        mapping = thpguard.alloc(size, fork="copy", copy_mode="eager")
    elif variant == "copy, lazy":
        mapping = thpguard.alloc(size, fork="copy")
        _MECHANISM["copy, lazy"] = mapping.copy_mode
    else:
        mapping = thpguard.alloc(size, fork=variant)
    if variant == "copy, eager":
        # The child copies into fresh pages: let it find warm ones.
        warm_memory(size)
    try:
        return [_one_fork() for _ in range(forks)]
    finally:
        mapping.close()


_MECHANISM: dict = {}


def run(settings: Settings) -> Result:
    size = settings.pick(512 * MiB, 4 * GiB)
    res_sizes = settings.sizes(Result(NAME, TITLE), [size], headroom=size + 2 * GiB)
    if not res_sizes:
        raise Skipped(f"{fmt_bytes(size)} does not fit (--max-gib or available memory)")
    forks = settings.pick(2, 3)
    res = Result(NAME, TITLE, params={"region": fmt_bytes(size), "forks_per_round": forks, "reps": settings.reps})
    samples = interleave(
        {v: (lambda v=v: _round(v, size, forks)) for v in VARIANTS}, settings.reps, settings.warmup
    )
    res.samples["runs"] = samples
    flat = {v: [f for rnd in samples[v] for f in rnd] for v in VARIANTS}
    total = {v: median([f["total_s"] for f in flat[v]]) for v in VARIANTS}
    fork_ret = {v: median([f["fork_s"] for f in flat[v]]) for v in VARIANTS}
    per_round = {v: [median([f["total_s"] for f in rnd]) for rnd in samples[v]] for v in VARIANTS}
    for v in VARIANTS:
        if v == BASELINE:
            continue
        res.add(
            v,
            paired(per_round[v], per_round[BASELINE]),
            f"time vs {BASELINE}",
            f"{total[v] * 1e3:.2f} ms (fork() returns: {fork_ret[v] * 1e3:.2f} ms)",
            f"{total[BASELINE] * 1e3:.2f} ms",
        )
    per_gib = (total["copy, eager"] - total["share"]) / (size / GiB)
    res.add("copy, eager, per GiB", None, "", f"{per_gib * 1e3:.0f} ms per GiB", "(copy, eager - share)")
    res.notes.append(
        "copy, eager: the parent's fork() returns only after the child has copied the region into "
        "its own huge pages (a write in the parent before that would split shared pages)"
    )
    res.notes.append(
        f"copy, lazy: copy_mode='auto' ran the {_MECHANISM.get('copy, lazy', 'unknown')!r} mechanism "
        "(userfault: nothing is copied at fork; each block is copied on its first write)"
    )
    return res
