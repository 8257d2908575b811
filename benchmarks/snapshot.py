"""9. An in-memory store that forks to write a snapshot while it keeps serving.

What Redis does for BGSAVE and a Python service for a checkpoint: a store
holds an open-addressing hash table (256 MiB quick, 4 GiB full: 16-byte
slots, half full) and serves a fixed mix of reads and updates (90/10, in
C, each key picked from the value read before). Then it forks a child
that streams the whole table to a file (in a temp dir, deleted after) and
goes on serving while the child writes. Each run is a fresh store process
for one variant of ``_tables``; the variants interleave, rotating.

Per phase (``before`` the fork, ``during`` the snapshot, ``after`` the
child exited) the store records the latency of every batch of operations;
a thread samples every 0.1 s what smaps says of the table (PMD-mapped
bytes) and the PSS of the store and of the child. Reported per variant,
as ratios against 4 KiB pages in the same round: throughput (operations
per CPU second of the serving thread, and per wall-clock second) and p99
batch latency during and after the snapshot, the pause in ``fork()``, the extra
memory (PSS of store and child at the peak minus the store's before the
fork); and the time until the store's table was 100 % PMD-mapped again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Dict, List, Optional

from . import _cbench, _tables
from ._harness import GiB, MiB, Result, Settings, fmt_bytes, in_child, interleave, median, mem_available, now, paired, percentile

NAME = "snapshot"
TITLE = "an in-memory store that forks to write a snapshot while it keeps serving"

SLOT_BYTES = 16
BATCH = 1000  # operations per timed batch
UPDATE_PERMILLE = 100
_SAMPLE_S = 0.1
#: Variants whose splits something repairs while the store runs.
REPAIRED = ("share+guard",)
_CHUNK = 8 << 20


def _stream(view: memoryview, path: str) -> None:
    """The snapshot child: write the table to ``path`` in 8 MiB writes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, len(view), _CHUNK):
            chunk = view[off:off + _CHUNK]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
    finally:
        os.close(fd)


class _Monitor(threading.Thread):
    """Samples every 0.1 s: (t, huge bytes of the table, the store's memory,
    what the child adds to it), memory as :func:`_tables.footprint` counts
    it (PSS, and hugetlb pages, which PSS leaves out)."""

    def __init__(self, table: _tables.Table) -> None:
        super().__init__(daemon=True)
        self.table = table
        self.child = 0
        self.samples: List[tuple] = []
        self._done = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        start, end = self.table.address, self.table.address + self.table.size
        while not self._done.is_set():
            child = self.child
            mine = _tables.footprint([me])
            self.samples.append((now(), _tables.huge_bytes(me, start, end), mine,
                                 _tables.footprint([me, child]) - mine if child else 0))
            self._done.wait(_SAMPLE_S)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _store(variant: str, size: int, before_s: float, after_s: float, directory: str,
           max_after_s: float = 30.0) -> dict:
    """One run, in a fresh process: build, serve, fork the snapshot, serve."""
    ffi, lib = _cbench.load()
    built = now()
    table = _tables.allocate(variant, size)
    bits = (size // SLOT_BYTES).bit_length() - 1
    slots = ffi.cast("uint64_t *", ffi.from_buffer(table.view))
    lib.tgb_kv_fill(slots, bits)
    built = now() - built
    cap = 2_000_000
    starts = ffi.new("uint64_t[]", cap)
    lats = ffi.new("uint64_t[]", cap)
    state = ffi.new("uint64_t *", 0x736E617073686F74)
    count = 0

    def serve(seconds: float) -> None:
        nonlocal count
        until = lib.tgb_now_ns() + int(seconds * 1e9)
        count += lib.tgb_kv_serve(slots, bits, state, BATCH, UPDATE_PERMILLE, until,
                                  starts + count, lats + count, cap - count)

    serve(0.3)  # warm caches and TLB; not kept
    count = 0
    monitor = _Monitor(table)
    monitor.start()
    path = os.path.join(directory, f"snapshot-{os.getpid()}.bin")
    cpu = {"start": time.thread_time()}
    try:
        serve(before_s)
        cpu["fork"] = time.thread_time()
        fork_start = lib.tgb_now_ns()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                _stream(table.view, path)
                status = 0
            finally:
                os._exit(status)
        fork_end = lib.tgb_now_ns()
        downgraded = table.fork_downgraded
        monitor.child = pid
        while True:
            serve(0.02)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        child_exit = lib.tgb_now_ns()
        cpu["exit"] = time.thread_time()
        monitor.child = 0
        serve(after_s)
        if variant in REPAIRED:
            # Serve on while the guard repairs, so "back to 100 %" is
            # measured rather than cut off (bounded).
            deadline = now() + max_after_s - after_s
            while now() < deadline and not (monitor.samples and monitor.samples[-1][1] >= table.size):
                serve(0.1)
        end = lib.tgb_now_ns()
        cpu["end"] = time.thread_time()
    finally:
        monitor.stop()
        if os.path.exists(path):
            written = os.path.getsize(path)
            os.unlink(path)
        else:
            written = 0
    batches = [(starts[i], lats[i]) for i in range(count)]
    return {
        "variant": variant, "mechanism": table.mechanism, "build_s": built, "fork_downgraded": downgraded,
        "snapshot_status": status, "snapshot_bytes": written,
        "fork_start_ns": fork_start, "fork_end_ns": fork_end, "child_exit_ns": child_exit, "end_ns": end,
        "batch_ops": BATCH, "batches": batches, "thread_cpu_s": cpu,
        # monitor times are perf_counter seconds; keep them relative to the fork
        "monitor": [(t, h, p, c) for t, h, p, c in monitor.samples],
        "clock_offset_s": now() - lib.tgb_now_ns() / 1e9,
        "table_bytes": table.size,
    }


def summarise_run(run: dict) -> dict:
    """Phase figures of one run: ops/s and p99 batch latency before, during
    and after the snapshot, the fork pause, extra memory, time back to huge."""
    fork0, fork1, exit_ns, end_ns = run["fork_start_ns"], run["fork_end_ns"], run["child_exit_ns"], run["end_ns"]
    phases = {"before": [], "during": [], "after": []}
    first = run["batches"][0][0] if run["batches"] else fork0
    for start, lat in run["batches"]:
        phase = "before" if start < fork0 else "during" if start < exit_ns else "after"
        phases[phase].append(lat)
    bounds = {"before": (first, fork0), "during": (fork0, exit_ns), "after": (exit_ns, end_ns)}
    out: Dict[str, float] = {}
    cpu = run.get("thread_cpu_s") or {}
    cpu_bounds = {"before": ("start", "fork"), "during": ("fork", "exit"), "after": ("exit", "end")}
    for phase, lats in phases.items():
        lo, hi = bounds[phase]
        wall = (hi - lo) / 1e9
        ops = len(lats) * run["batch_ops"]
        out[f"{phase}_wall_ops_per_s"] = ops / wall if wall > 0 else float("nan")
        a, b = cpu_bounds[phase]
        spent = cpu[b] - cpu[a] if a in cpu and b in cpu else 0.0
        # Per CPU second of the serving thread (fork() included): on a
        # shared host, what the pages cost rather than what the scheduler
        # gave; wall-clock rates are kept beside them.
        out[f"{phase}_ops_per_s"] = ops / spent if spent > 0 else out[f"{phase}_wall_ops_per_s"]
        out[f"{phase}_p99_us"] = percentile(lats, 99) / 1e3
    out["fork_ms"] = (fork1 - fork0) / 1e6
    out["snapshot_s"] = (exit_ns - fork0) / 1e9
    # Monitor samples: perf_counter seconds; tgb clock = perf_counter - offset.
    offset = run["clock_offset_s"]
    t_fork, t_exit = fork0 / 1e9 + offset, exit_ns / 1e9 + offset
    size = run["table_bytes"]
    pre = [s for s in run["monitor"] if s[0] < t_fork]
    during = [s for s in run["monitor"] if t_fork <= s[0] < t_exit and s[3]]
    base_pss = pre[-1][2] if pre else float("nan")
    out["huge_before"] = pre[-1][1] / size if pre else float("nan")
    out["extra_bytes"] = max((p + c for _, _, p, c in during), default=base_pss) - base_pss
    out["huge_at_exit"] = min((s[1] for s in run["monitor"] if s[0] >= t_fork and s[0] <= t_exit + _SAMPLE_S),
                              default=0) / size
    back, split_seen = None, False
    if pre and pre[-1][1] >= size:
        for t, huge, _, _ in run["monitor"]:
            if t < t_fork:
                continue
            if huge < size:
                split_seen = True
            elif t >= t_exit or not split_seen:
                back = max(0.0, t - t_exit)
                break
    out["back_to_huge_s"] = back  # None: not within the run (or never huge)
    out["split_seen"] = split_seen
    out["watched_after_s"] = (end_ns - exit_ns) / 1e9
    return out


def _snapshot_dir(size: int) -> Optional[str]:
    """Where the snapshot file goes: ``THPGUARD_BENCH_SNAPSHOT_DIR`` if set,
    else tmpfs (``/dev/shm``) when it has room for the file and memory to
    spare (the snapshot then costs what the store and the child do, not
    what the disk does), else the default temp dir."""
    chosen = os.environ.get("THPGUARD_BENCH_SNAPSHOT_DIR")
    if chosen:
        return chosen
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    if stat.f_bavail * stat.f_frsize > 2 * size and mem_available() > 4 * size + 2 * GiB:
        return "/dev/shm"
    return None


def run(settings: Settings) -> Result:
    size = settings.pick(256 * MiB, 4 * GiB)
    before_s, after_s = settings.pick((0.5, 1.0), (3.0, 8.0))
    max_after_s = settings.pick(8.0, 60.0)
    reps = settings.pick(2, 5)
    res = Result(NAME, TITLE, params={
        "table": f"{fmt_bytes(size)} open addressing, {SLOT_BYTES}-byte slots, half full",
        "mix": f"{100 - UPDATE_PERMILLE // 10} % reads, {UPDATE_PERMILLE // 10} % updates, batches of {BATCH}",
        "per run": (f"fresh store, {before_s:g} s serving, fork + snapshot to a file, {after_s:g} s after "
                    f"(with the guard: until repaired, at most {max_after_s:.0f} s)"),
        "rounds": reps,
    })
    if settings.max_bytes is not None and size > settings.max_bytes:
        res.skipped = f"the {fmt_bytes(size)} table is above --max-gib"
        return res
    # The store's table, what the child copies or shares, headroom; hugetlb
    # takes its pool (grown per run), outside this.
    chosen = _tables.choose(res, size, lambda v: (0 if v == "hugetlb" else 2 * size) + 2 * GiB)
    if chosen is None:
        return res
    runnable, missing = chosen
    directory = tempfile.mkdtemp(prefix="thpguard-bench-snapshot-", dir=_snapshot_dir(size))
    res.params["snapshot to"] = f"a file in {os.path.dirname(directory)}"
    try:
        raw = interleave(
            {v: (lambda v=v: _tables.run_variant(v, size, 1, lambda: in_child(
                _store, v, size, before_s, after_s, directory, max_after_s))) for v in runnable},
            reps, warmup=0,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    figures = {v: [summarise_run(r) for r in raw[v]] for v in runnable}
    res.samples["runs"] = raw
    res.samples["figures"] = figures
    res.samples["unavailable"] = missing
    _rows(res, figures, runnable, missing, after_s, max_after_s)
    return res


def _rows(res: Result, figures: Dict[str, List[dict]], runnable: List[str], missing: Dict[str, str],
          after_s: float, max_after_s: float) -> None:
    def col(v: str, key: str) -> List[float]:
        return [f[key] for f in figures[v]]

    series = []
    for v in _tables.VARIANTS:
        if v in missing:
            _tables.not_available(res, series, v, missing[v])
            continue
        if v not in figures:
            continue
        label = _tables.label_of(v, res.samples["runs"][v], res)
        if v == "4k":
            res.add(f"{label}: the baseline", None, "",
                    f"{median(col(v, 'during_ops_per_s')) / 1e6:.2f} M ops/CPU-s during, "
                    f"{median(col(v, 'after_ops_per_s')) / 1e6:.2f} M after, p99 {median(col(v, 'during_p99_us')):.0f} us "
                    f"during, fork {median(col(v, 'fork_ms')):.1f} ms, extra {fmt_bytes(max(0, median(col(v, 'extra_bytes'))))}")
        for key, what, unit in () if v == "4k" else (("during_ops_per_s", "throughput during snapshot", "ops"),
                                ("after_ops_per_s", "throughput after snapshot", "ops"),
                                ("during_wall_ops_per_s", "wall-clock throughput during", "ops"),
                                ("during_p99_us", "p99 batch latency during", "us"),
                                ("fork_ms", "fork() pause", "ms"),
                                ("extra_bytes", "extra memory (PSS + hugetlb)", "bytes")):
            value, base = median(col(v, key)), median(col("4k", key))
            if unit == "ops":
                unit_text = "M ops/s" if "wall" in key else "M ops/CPU-s"
                text, btext = f"{value / 1e6:.2f} {unit_text}", f"{base / 1e6:.2f} {unit_text}"
            elif unit == "us":
                text, btext = f"{value:.0f} us", f"{base:.0f} us"
            elif unit == "ms":
                text, btext = f"{value:.1f} ms", f"{base:.1f} ms"
            else:
                text, btext = fmt_bytes(max(value, 0)), fmt_bytes(max(base, 0))
            res.add(f"{label}: {what}", paired(col(v, key), col("4k", key)), f"{v}/4k", text, btext)
        res.add(f"{label}: during vs before the snapshot",
                paired(col(v, "during_ops_per_s"), col(v, "before_ops_per_s")), "throughput during/before",
                f"{median(col(v, 'during_ops_per_s')) / 1e6:.2f} M ops/CPU-s",
                f"{median(col(v, 'before_ops_per_s')) / 1e6:.2f} M ops/CPU-s")
        backs = col(v, "back_to_huge_s")
        reached = [b for b in backs if b is not None]
        if v == "4k":
            back_text = None
        elif not any(col(v, "split_seen")):
            back_text = "never below 100 % (no split seen)"
        elif len(reached) == len(backs):
            back_text = f"{median(reached):.1f} s after the child exited"
        else:
            watched = max_after_s if v in REPAIRED else after_s
            back_text = f"not within {watched:.0f} s in {len(backs) - len(reached)} of {len(backs)} runs"
            if reached:
                back_text += f"; {median(reached):.1f} s in the others"
        if back_text:
            res.add(f"{label}: back to 100 % PMD-mapped", None, "", back_text)
        series.append({
            "variant": v, "label": label, "available": True, "mechanism": figures[v] and
            res.samples["runs"][v][0]["mechanism"],
            **{f"{key}_ratio": [a / b if b else float("nan") for a, b in zip(col(v, key), col("4k", key))]
               for key in ("during_ops_per_s", "after_ops_per_s", "during_p99_us", "extra_bytes")},
            "extra_bytes": col(v, "extra_bytes"),
            "back_to_huge_s": backs,
            "huge_at_exit": col(v, "huge_at_exit"),
            "downgraded_runs": len(_tables.downgrades(res.samples["runs"][v])),
        })
        res.notes.append(
            f"{label} [{res.samples['runs'][v][0]['mechanism']}]: table PMD-mapped {median(col(v, 'huge_before')):.0%} "
            f"before the fork, {median(col(v, 'huge_at_exit')):.0%} at worst until the child exited; snapshot took "
            f"{median(col(v, 'snapshot_s')):.2f} s")
    res.series["variants"] = series
