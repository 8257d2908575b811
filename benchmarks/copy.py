"""8. The ``copy`` policy with userfaultfd block copy: what it costs.

``first write``
    a process forks a child that keeps the region shared, then writes one
    byte into each 2 MiB block, one block at a time with a pause between
    them (so the handler's pool of pre-faulted blocks refills, as between
    the writes of a real application); each write is timed. Baseline: the
    same loop over a fresh ``MADV_HUGEPAGE`` mapping where each step is a
    THP fault plus a 2 MiB ``memcpy`` (what a kernel that copies on COW
    would do). Per mechanism: ``move`` (UFFDIO_MOVE, the default),
    ``mremap`` and ``collapse`` (unprotect, dirty a byte, MADV_COLLAPSE),
    each in a fresh process; ``burst`` writes every block back to back
    (the pool runs dry and later blocks are faulted in the fault path).
``first write in the child``
    the same loop in a child, whose pool starts empty after fork: its very
    first write right after ``fork()`` returns (``right after fork``), and
    the later blocks, with the child's handler thread filling 0, 1 (the
    default) or 4 pool blocks before the child's code runs (``prefill N``);
    each sample is the median of CHILDREN_PER_SAMPLE children.
    ``no ready wait`` is ``prefill 1`` without the at-fork handler waiting
    for the handler thread (its filling overlaps the child's code),
    ``neither`` also without the handler's 1 ms pause after a fault before
    it refills its pool; ``fork() until the child's first write is done``
    adds the fork to the first write, in the same run.
``chase``
    pointer chasing right after fork and a write to every block, against
    the same process before the fork (no repair phase).
``copied``
    bytes copied when the child writes one block in eight, against the
    whole region that the eager copy copies at fork.
``fork``
    ``fork()`` until it returns in the parent, and until the child exited
    (``waitpid``), with a populated region, at two region sizes; each
    sample is the median of FORKS_PER_SAMPLE forks of one region (the eager
    copy: one). Rows named ``userfault`` are ``copy`` regions with the lazy
    mechanism; they and the eager copy are against ``share``. ``no ready
    wait`` leaves out the child's wait for its handler thread, ``prefill
    0`` the block the child's handler zeroes at fork; ``prefill 1`` (the
    default) and ``prefill 4`` are against ``prefill 0`` (64 and 128 MiB
    regions only). ``child lives``: each child blocks on a pipe until
    ``fork()`` has returned in the parent, as a worker would; the other
    variants' children exit as soon as they run (often, not always, before
    ``fork()`` returned). While a child lives, each page the parent's own
    after-fork hooks write (stack and heap; the region is not written)
    is copied, not reused, whatever the region's policy: ``share, child
    lives`` against ``share`` shows what that costs, and ``userfault, child
    lives`` against ``share, child lives`` is the lazy copy's own cost at
    fork for a child that lives. ``share, again`` against ``share`` is the
    run's noise. ``eager`` runs apart, with its own ``share`` rounds (its
    copy would slow whichever variant ran after it). ``child not armed``:
    each child's arming made to fail at once through the ``copy_arm``
    fault hook (no descriptor, registration, handler thread or block of its
    own), so the parent's own work at fork shows apart from its children's.
    ``living workers``: WORKERS forks in a row whose earlier children all
    still live (a pre-forking server starting its workers), the median
    ``fork()`` of each sample.
"""

from __future__ import annotations

import errno
import json
import os
import time

import thpguard
from thpguard import _native, kernel

from . import _cbench
from ._harness import (
    MiB, Result, Settings, Skipped, fmt_bytes, in_child, interleave, median, now, paired, pmd_size,
    warm_memory,
)

NAME = "copy"
TITLE = "copy policy, userfaultfd block copy: first write, chase, memory copied, fork"

METHODS = ("move", "mremap", "collapse")
PREFILLS = (0, 1, 4)


def _child_waits(hold) -> None:
    """In a forked child: wait until the parent closes the pipe ``hold`` (if one), then exit.

    The exit is in a ``finally``: a signal while the child waits must not
    run the parent's code on in the child.
    """
    try:
        if hold:
            os.close(hold[1])
            os.read(hold[0], 1)
    finally:
        os._exit(0)


def _holder(region):
    """Fork a child that keeps the region shared until told to go."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _child_waits((r, w))
    os.close(r)
    return pid, w


def _release(holder):
    pid, w = holder
    os.close(w)
    os.waitpid(pid, 0)


def _first_writes(method: str, size: int, pause: float, burst: bool) -> dict:
    """In a fresh process: per-block first-write latency after fork."""
    ffi, lib = _cbench.load()
    _native.copy_set_method(method)
    pmd = pmd_size()
    warm_memory(2 * size)
    region = thpguard.alloc(size, fork="copy", copy_mode="lazy")
    try:
        lib.tgb_fill(ffi.cast("void *", region.address), 7, size)
        time.sleep(0.05)  # the pool fills
        holder = _holder(region)
        base = region.address
        times = []
        try:
            if burst:
                t0 = now()
                lib.tgb_write_each(ffi.cast("void *", base), size, pmd)
                times.append((now() - t0) / (size // pmd))
            else:
                for off in range(0, size, pmd):
                    time.sleep(pause)
                    t0 = now()
                    lib.tgb_write_each(ffi.cast("void *", base + off), pmd, pmd)
                    times.append(now() - t0)
            stats = _native.copy_stats()
            huge = region.coverage().ratio
        finally:
            _release(holder)
        return {"per_block_s": median(times), "stats": stats, "coverage": huge}
    finally:
        region.close()


def _child_first_writes(prefill: int, size: int, pause: float, ready_wait: bool = True,
                        refill_delay: bool = True) -> dict:
    """In a fresh process: a child's first writes, its pool filled with
    ``prefill`` blocks at fork (the parent keeps the region shared);
    without ``ready_wait`` the child does not wait for its handler thread,
    without ``refill_delay`` the handler refills at once after a fault."""
    ffi, lib = _cbench.load()
    _native.copy_set_child_prefill(prefill)
    if not ready_wait:
        _native.copy_set_child_ready_wait(0)
    if not refill_delay:
        _native.copy_set_refill_delay(0)
    warm_memory(2 * size)
    region = thpguard.alloc(size, fork="copy", copy_mode="lazy")
    try:
        lib.tgb_fill(ffi.cast("void *", region.address), 7, size)
        time.sleep(0.05)  # the parent's pool fills

        # Plain forks, the write the first thing each child does once
        # fork() returned (a harness's own setup in the child would give the
        # handler thread time to start first); the first child also writes
        # the later blocks.
        runs = [_one_child_first_writes(ffi, lib, region, size, pause, later=(i == 0))
                for i in range(CHILDREN_PER_SAMPLE)]
        out = dict(runs[0])
        out["first_s"] = median([r["first_s"] for r in runs])
        out["fork_to_first_s"] = median([r["fork_to_first_s"] for r in runs])
        out["coverage"] = min(r["coverage"] for r in runs)
        for key in ("arm_ns", "ready_wait_ns"):
            out["stats"][key] = median([r["stats"][key] for r in runs])
        return out
    finally:
        region.close()


#: Children forked per sample of a child's first write (the median is the sample).
CHILDREN_PER_SAMPLE = 5


def _one_child_first_writes(ffi, lib, region, size: int, pause: float, later: bool) -> dict:
    pmd = region.pmd_size
    time.sleep(pause)
    r, w = os.pipe()
    forked = now()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            base = region.address
            t0 = now()
            lib.tgb_write_each(ffi.cast("void *", base), pmd, pmd)
            first = now() - t0
            fork_to_first = now() - forked  # one monotonic clock for both processes
            times = []
            for off in range(pmd, size if later else pmd, pmd):
                time.sleep(pause)
                t0 = now()
                lib.tgb_write_each(ffi.cast("void *", base + off), pmd, pmd)
                times.append(now() - t0)
            out = {"first_s": first, "fork_to_first_s": fork_to_first,
                   "per_block_s": median(times) if times else None, "stats": _native.copy_stats(),
                   "coverage": region.coverage().ratio}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    _, status = os.waitpid(pid, 0)
    if not got:
        raise RuntimeError(f"the writing child gave no result (wait status {status:#x})")
    return json.loads(got)


def _baseline(size: int, pause: float) -> dict:
    """A THP fault plus a 2 MiB memcpy per block, in a fresh mapping."""
    ffi, lib = _cbench.load()
    pmd = pmd_size()
    warm_memory(2 * size)
    src = _native.map_aligned(size, pmd)
    dst = _native.map_aligned(size, pmd)
    try:
        _native.madvise(src, size, _native.MADV_HUGEPAGE)
        _native.madvise(dst, size, _native.MADV_HUGEPAGE)
        lib.tgb_fill(ffi.cast("void *", src), 7, size)
        times = []
        for off in range(0, size, pmd):
            time.sleep(pause)
            t0 = now()
            lib.tgb_copy(ffi.cast("void *", dst + off), ffi.cast("void *", src + off), pmd)
            times.append(now() - t0)
        return {"per_block_s": median(times)}
    finally:
        _native.unmap(src, size)
        _native.unmap(dst, size)


def _chase(size: int, hops: int) -> dict:
    """Chase rate before fork, and right after fork plus a write per block."""
    ffi, lib = _cbench.load()
    region = thpguard.alloc(size, fork="copy", copy_mode="lazy")
    try:
        base = ffi.cast("uint64_t *", region.address)
        first = lib.tgb_build_chain(base, size, 4096, 0x7468706775617264)
        lib.tgb_chase(base, first, hops)
        t0 = now()
        lib.tgb_chase(base, first, hops)
        pristine = hops / (now() - t0)
        holder = _holder(region)
        try:
            lib.tgb_write_each(ffi.cast("void *", region.address), size, region.pmd_size)
            lib.tgb_chase(base, first, hops // 4)
            t0 = now()
            lib.tgb_chase(base, first, hops)
            after = hops / (now() - t0)
            cov = region.coverage().ratio
        finally:
            _release(holder)
        return {"pristine": pristine, "after": after, "coverage": cov}
    finally:
        region.close()


def _copied(size: int) -> dict:
    """Bytes the child copies when it writes one block in eight."""
    region = thpguard.alloc(size, fork="copy", copy_mode="lazy")
    try:
        def child():
            view = region.view()
            for off in range(0, region.size, 8 * region.pmd_size):
                view[off] = 1
            view.release()
            s = _native.copy_stats()
            return s["copies"] * region.pmd_size, region.coverage().ratio

        copied, cov = in_child(child)
        return {"copied": copied, "coverage": cov}
    finally:
        region.close()


FORKS_PER_SAMPLE = 15


def _fork_once(variant: str, size: int) -> dict:
    """Median of FORKS_PER_SAMPLE forks (each until the child exited) of one region.

    A variant ending in ", child lives" keeps each child until the
    parent's ``fork()`` returned (it reads a pipe the parent then closes).
    ``share, again`` is ``share`` once more: its ratio to ``share`` is the
    run's noise. ``copy, child not armed`` replaces any pending ``copy_arm``
    fault and clears it afterwards.
    """
    lives = variant.endswith(", child lives")
    variant = variant.removesuffix(", child lives")
    region = None
    try:
        if variant in ("share", "share, again"):
            region = thpguard.alloc(size, fork="share")
        elif variant == "eager":
            region = thpguard.alloc(size, fork="copy", copy_mode="eager")
        else:
            if variant.startswith("copy, prefill "):
                _native.copy_set_child_prefill(int(variant.split()[-1]))
            if variant == "copy, no ready wait":
                _native.copy_set_child_ready_wait(0)
            region = thpguard.alloc(size, fork="copy", copy_mode="lazy")
            if variant == "copy, child not armed":
                # Each child inherits the pending fault and fails its arming
                # at once (no descriptor, registration, thread or block of
                # its own); the parent never consumes it.
                _native.fault_inject("copy_arm", errno.EIO, 1)
        time.sleep(0.05)  # the parent's pool fills: the fork measures the steady state
        if variant == "eager":
            warm_memory(size)
        fork_s, total_s = [], []
        for _ in range(FORKS_PER_SAMPLE if variant != "eager" else 1):
            hold = os.pipe() if lives else ()
            t0 = now()
            pid = os.fork()
            if pid == 0:
                _child_waits(hold)
            t1 = now()
            for fd in hold:
                os.close(fd)
            os.waitpid(pid, 0)
            fork_s.append(t1 - t0)
            total_s.append(now() - t0)
        return {"fork_s": median(fork_s), "total_s": median(total_s)}
    finally:
        if variant == "copy, child not armed":
            _native.fault_inject("copy_arm", 0, 0)
        if region is not None:
            region.close()
        _native.copy_set_child_prefill(1)
        _native.copy_set_child_ready_wait(0.05)


#: Workers a sample of ``_fork_workers`` starts, all alive until the last fork returned.
WORKERS = 8


def _fork_workers(variant: str, size: int) -> float:
    """Median ``fork()`` time over WORKERS forks whose earlier children still live.

    The shape of a pre-forking server starting its workers: each child blocks
    on a pipe until the last one has been forked, then all exit.
    """
    region, hold, pids, times = None, (), [], []
    try:
        if variant == "share":
            region = thpguard.alloc(size, fork="share")
        else:
            region = thpguard.alloc(size, fork="copy", copy_mode="lazy")
        time.sleep(0.05)  # the parent's pool fills
        hold = os.pipe()
        for _ in range(WORKERS):
            t0 = now()
            pid = os.fork()
            if pid == 0:
                _child_waits(hold)
            times.append(now() - t0)
            pids.append(pid)
    finally:
        for fd in hold:
            os.close(fd)
        for pid in pids:
            os.waitpid(pid, 0)
        if region is not None:
            region.close()
    return median(times)


def _label(variant: str) -> str:
    return "userfault" + variant[4:] if variant.startswith("copy") else variant


def _forks(res: Result, settings: Settings, fork_size: int) -> None:
    """fork() returning and fork + child exit, at one region size (module docstring)."""
    against_share = ("share, again", "copy", "copy, child not armed", "copy, no ready wait", "copy, prefill 0")
    fork_variants = ("share",) + against_share + ("share, child lives", "copy, child lives")
    if fork_size <= 128 * MiB:
        fork_variants += ("copy, prefill 4",)
    forks = interleave({v: (lambda v=v: _fork_once(v, fork_size)) for v in fork_variants},
                       settings.reps, settings.warmup)
    # Apart: the eager copy's seconds of copying would slow whichever
    # variant runs after it.
    eager = interleave({v: (lambda v=v: _fork_once(v, fork_size)) for v in ("share", "eager")},
                       settings.reps, settings.warmup)
    forks["eager"] = eager["eager"]
    forks["share (with eager)"] = eager["share"]
    res.samples[f"fork {fmt_bytes(fork_size)}"] = forks

    def row(what: str, key: str, variant: str, against: str, label: str) -> None:
        mine = [f[key] for f in forks[variant]]
        base = [f[key] for f in forks[against]]
        res.add(f"{what}, {label}, {fmt_bytes(fork_size)}", paired(mine, base),
                f"time vs {_label(against)}", f"{median(mine) * 1e3:.2f} ms",
                f"{median(base) * 1e3:.2f} ms")

    for v in against_share:
        row("fork() returns", "fork_s", v, "share", _label(v))
        row("fork + child exit", "total_s", v, "share", _label(v))
    for key, what in (("fork_s", "fork() returns"), ("total_s", "fork + child exit")):
        row(what, key, "eager", "share (with eager)", "eager")
    row("fork() returns", "fork_s", "share, child lives", "share", "share, child lives")
    row("fork() returns", "fork_s", "copy, child lives", "share, child lives", _label("copy, child lives"))
    if fork_size <= 128 * MiB:
        for v, n in (("copy", 1), ("copy, prefill 4", 4)):
            row("fork + child exit", "total_s", v, "copy, prefill 0", f"prefill {n}")
    workers = interleave({v: (lambda v=v: _fork_workers(v, fork_size)) for v in ("share", "copy")},
                         settings.reps, settings.warmup)
    res.samples[f"fork workers {fmt_bytes(fork_size)}"] = workers
    res.add(f"fork() returns, {WORKERS} living workers, userfault, {fmt_bytes(fork_size)}",
            paired(workers["copy"], workers["share"]), "time vs share",
            f"{median(workers['copy']) * 1e3:.2f} ms", f"{median(workers['share']) * 1e3:.2f} ms")


def run(settings: Settings) -> Result:
    feature = kernel.capabilities().copy_userfault
    if not feature.available:
        raise Skipped(f"no userfaultfd block copy here: {feature.reason}")
    size = settings.pick(32 * MiB, 128 * MiB)
    pause = 0.004
    res = Result(NAME, TITLE, params={"region": fmt_bytes(size), "reps": settings.reps,
                                      "pause_between_writes_s": pause})

    variants = {"baseline": lambda: in_child(_baseline, size, pause)}
    for m in METHODS:
        variants[m] = lambda m=m: in_child(_first_writes, m, size, pause, False)
    variants["move, burst"] = lambda: in_child(_first_writes, "move", size, 0.0, True)
    for n in PREFILLS:
        variants[f"child, prefill {n}"] = lambda n=n: in_child(_child_first_writes, n, size, pause)
    variants["child, no ready wait"] = lambda: in_child(_child_first_writes, 1, size, pause, False)
    variants["child, neither"] = lambda: in_child(_child_first_writes, 1, size, pause, False, False)
    samples = interleave(variants, settings.reps, settings.warmup)
    res.samples["first_write"] = samples
    base = [s["per_block_s"] for s in samples["baseline"]]
    for name in list(METHODS) + ["move, burst"]:
        per = [s["per_block_s"] for s in samples[name]]
        cov = min(s["coverage"] for s in samples[name])
        fallbacks = sum(s["stats"]["cow_fallbacks"] for s in samples[name])
        inline = median([s["stats"]["inline_allocs"] for s in samples[name]])
        res.add(f"first write, {name}", paired(per, base), "time per block vs THP fault + memcpy",
                f"{median(per) * 1e3:.3f} ms (min coverage {cov:.0%}, {fallbacks} left to the kernel COW, "
                f"{inline:.0f} blocks faulted in the fault path)",
                f"{median(base) * 1e3:.3f} ms")
    for label in [f"prefill {n}" for n in PREFILLS] + ["no ready wait", "neither"]:
        runs = samples[f"child, {label}"]
        cov = min(s["coverage"] for s in runs)
        inline = [s["stats"]["inline_allocs"] for s in runs]
        res.add(f"first write in the child, right after fork, {label}",
                paired([s["first_s"] for s in runs], base), "time per block vs THP fault + memcpy",
                f"{median([s['first_s'] for s in runs]) * 1e3:.3f} ms (min coverage {cov:.0%}, "
                f"{median(inline):.0f} blocks faulted in the fault path)",
                f"{median(base) * 1e3:.3f} ms")
        res.add(f"first write in the child, later blocks, {label}",
                paired([s["per_block_s"] for s in runs], base), "time per block vs THP fault + memcpy",
                f"{median([s['per_block_s'] for s in runs]) * 1e3:.3f} ms", f"{median(base) * 1e3:.3f} ms")
    for label in ("prefill 1", "no ready wait"):
        runs = samples[f"child, {label}"]
        arm = [s["stats"]["arm_ns"] / 1e9 for s in runs]
        wait = [s["stats"]["ready_wait_ns"] / 1e9 for s in runs]
        res.add(f"child's at-fork arming, {label}", paired(arm, base), "time vs THP fault + memcpy",
                f"{median(arm) * 1e3:.3f} ms (waiting for its handler thread {median(wait) * 1e3:.3f} ms)",
                f"{median(base) * 1e3:.3f} ms")
    for key, what in (("first_s", "first write in the child, right after fork"),
                      ("fork_to_first_s", "fork() until the child's first write is done")):
        mine = [s[key] for s in samples["child, prefill 1"]]
        for other in ("no ready wait", "neither"):
            theirs = [s[key] for s in samples[f"child, {other}"]]
            res.add(f"{what}, prefill 1 vs {other}", paired(mine, theirs), f"time vs {other}",
                    f"{median(mine) * 1e3:.3f} ms", f"{median(theirs) * 1e3:.3f} ms")

    hops = settings.pick(2_000_000, 10_000_000)
    chase_size = settings.pick(128 * MiB, 512 * MiB)
    chases = [in_child(_chase, chase_size, hops) for _ in range(settings.reps)]
    res.samples["chase"] = chases
    res.add("chase after fork + writes", paired([c["after"] for c in chases], [c["pristine"] for c in chases]),
            "hops/s vs before fork",
            f"{median([c['after'] for c in chases]) / 1e6:.1f} M/s (coverage {min(c['coverage'] for c in chases):.0%})",
            f"{median([c['pristine'] for c in chases]) / 1e6:.1f} M/s")

    copied = [_copied(size) for _ in range(settings.reps)]
    res.samples["copied"] = copied
    res.add("memory copied, 1 block in 8 written", median([c["copied"] for c in copied]) / size,
            "bytes vs eager copy", fmt_bytes(median([c["copied"] for c in copied])), fmt_bytes(size))

    for fork_size in (64 * MiB, 512 * MiB):
        _forks(res, settings, fork_size)
    res.notes.append(
        "fork + child exit includes the child arming its own userfaultfd (a new descriptor, "
        "registration, protection, a handler thread) before it runs"
    )
    res.notes.append(
        "against the kernel's direct-COW flag: run this benchmark in the patched guest of "
        "tests/kernels/run (where copy_mode='auto' picks the kernel's copy)"
    )
    return res
