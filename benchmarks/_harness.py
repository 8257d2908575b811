"""What every benchmark shares: timing, interleaving, statistics, children,
warm memory, the host description, and the result table.

Rules the helpers enforce (these machines are noisy and shared): every
figure is a ratio against a baseline measured in the same run; variants
run interleaved (A B A B ...) after a discarded warm-up round; the
reported value is the median of the repetitions, and every raw sample is
kept for the JSON output.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import thpguard
from thpguard import _child, _native, kernel

from ._hostlock import hugetlb_pool_lock
from ._signals import deferred

GiB = 1 << 30
MiB = 1 << 20

now = time.perf_counter

SYS_THP = "/sys/kernel/mm/transparent_hugepage"


class Skipped(Exception):
    """A benchmark cannot run on this host or with this thpguard; says why."""


@dataclass
class Settings:
    """Sizes and repetitions, from the command line (``--quick`` shrinks them)."""

    quick: bool = False
    reps: int = 7
    warmup: int = 1

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        return cls(quick=True, reps=3, warmup=1) if quick else cls(quick=False, reps=7, warmup=1)

    #: Largest region a benchmark may map (``--max-gib``); None: no cap.
    max_bytes: Optional[int] = None

    def pick(self, quick_value, full_value):
        return quick_value if self.quick else full_value

    def sizes(self, result: "Result", sizes, headroom: int = 2 << 30):
        """The sizes that fit the cap and the available memory (plus
        ``headroom`` bytes for copies and for everybody else); the others
        are left out with a note in ``result``."""
        kept = []
        for size in sizes:
            if self.max_bytes is not None and size > self.max_bytes:
                result.notes.append(f"{fmt_bytes(size)} left out: above --max-gib")
            elif mem_available() < size + headroom:
                result.notes.append(f"{fmt_bytes(size)} left out: not enough available memory")
            else:
                kept.append(size)
        return kept


# -- statistics -------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def paired(values: Sequence[float], baselines: Sequence[float]) -> float:
    """Median over rounds of ``values[i] / baselines[i]``.

    Samples of the same interleaved round ran back to back, under the same
    load; their ratio is steadier than the ratio of two medians when the
    load on the machine changes during the run.
    """
    return median([ratio(v, b) for v, b in zip(values, baselines)])


#: (reps, warmup) of each interleave() call, for the JSON header (the entry point clears it).
ROUNDS_RUN: List[tuple] = []


def interleave(
    variants: Dict[str, Callable[[], Any]], reps: int, warmup: int = 1, rotate: bool = True
) -> Dict[str, List[Any]]:
    """Run each variant ``warmup + reps`` times, A B C A B C ...

    Returns the samples of the timed rounds per variant (warm-up rounds are
    discarded). A variant returns its own sample (a duration, a rate or a
    dict), so it can time exactly the part that matters. With ``rotate``
    each round starts one variant later (A B C, B C A, C A B, ...), so no
    variant always runs first after the previous round's teardown.
    """
    ROUNDS_RUN.append((reps, warmup))
    samples: Dict[str, List[Any]] = {name: [] for name in variants}
    names = list(variants)
    for round_no in range(warmup + reps):
        shift = round_no % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            run = variants[name]
            value = run()
            if round_no >= warmup:
                samples[name].append(value)
    return samples


# -- processes and memory ---------------------------------------------------


#: Seconds a benchmark child may take before it counts as hung (populating
#: GiBs on a busy host is slow; this only turns a hang into an error).
CHILD_TIMEOUT = 1800.0


def in_child(fn: Callable[..., Any], *args) -> Any:
    """Fork, run ``fn(*args)`` in the child, return its (pickled) result.

    The child's exception, death or hang raises thpguard._child.ChildError
    (a RuntimeError) with the child's traceback or how it died.
    """
    return _child.run(fn, *args, timeout=CHILD_TIMEOUT)


def pmd_size() -> int:
    """The PMD huge-page size; Skipped where the kernel offers none."""
    size = kernel.pmd_size()
    if not size:
        raise Skipped("the kernel reports no PMD huge-page size (no THP)")
    return size


class Worker:
    """A forked child that keeps its state and measures on request.

    ``setup(*args)`` runs once in the child and returns its state (a
    dict; its ``"info"`` entry, if any, comes back as :attr:`info`);
    each :meth:`measure` call runs ``measure(state)`` there and returns
    the result. Several workers let destructive setups (a split, a
    repair) be measured interleaved at a fine grain: A B C A B C ...
    """

    def __init__(self, setup: Callable[..., dict], measure: Callable[[dict], Any], *args) -> None:
        self._child = _child.Child(_worker_loop, setup, measure, args, channel=True)
        self.pid = self._child.pid
        self.info = self._child.recv(CHILD_TIMEOUT, what="the result of its setup")

    def measure(self):
        self._child.send("measure")
        return self._child.recv(CHILD_TIMEOUT, what="a measurement")

    def close(self) -> None:
        if self.pid is None:
            return
        try:
            self._child.send("stop")
            self._child.result(CHILD_TIMEOUT)
        except OSError:  # it died already: close() reaps it
            pass
        finally:
            self._child.close()
            self.pid = None


def _worker_loop(channel, setup, measure, args) -> None:
    """A Worker's child: set up once, then measure on each request."""
    state = setup(*args)
    channel.send(state.get("info"))
    while channel.recv(timeout=None) == "measure":
        channel.send(measure(state))


def warm_memory(size: int) -> float:
    """Touch ``size`` bytes of fresh huge pages and free them; seconds taken.

    On these VMs free memory is handed back to the host (virtio-balloon
    free page reporting, after about 2 s), and the next first touch of it
    costs 10-20x a warm one. Calling this right before a timed step that
    allocates makes that step reuse the pages just freed, which the host
    still backs; the time this call took is the cold figure.
    """
    pmd = pmd_size()
    started = now()
    addr = _native.map_aligned(size, pmd)
    try:
        _native.madvise(addr, size, _native.MADV_HUGEPAGE)
        _native.populate_write(addr, size, mmap.PAGESIZE)
    finally:
        _native.unmap(addr, size)
    return now() - started


_NR_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages"


class PoolGrowth:
    """Grow a hugetlb pool until ``pages`` of it are free; give back what
    was added on exit. From entry to exit it holds the host's hugetlb pool
    lock (``_hostlock``), so the tests and other benchmarks that grow a pool
    wait instead of taking the pages this run was promised.

    ``with PoolGrowth(page_size, pages) as ok``: ``ok`` is True when the
    pool has ``pages`` free pages. With ``keep_free`` (bytes) the pool never
    takes memory that would leave less than that available to everybody
    else; the kernel may also grow it by fewer pages than asked (no free
    contiguous memory): :attr:`free` says what there was on entry.
    """

    def __init__(self, page_size: int, pages: int, keep_free: Optional[int] = None) -> None:
        self.path = _NR_HUGEPAGES.format(page_size // 1024)
        self.page_size, self.pages, self.keep_free = page_size, pages, keep_free
        self.added, self.free = 0, 0
        self.lock = contextlib.ExitStack()

    def __enter__(self) -> bool:
        if kernel.hugetlb_pool(self.page_size) is None:
            return False
        self.lock.enter_context(hugetlb_pool_lock())
        try:
            with deferred():  # a SIGTERM waits until `added` is known
                return self._grow()
        except BaseException:
            self.__exit__()
            raise

    def _grow(self) -> bool:
        pool = kernel.hugetlb_pool(self.page_size)
        missing = max(0, self.pages - pool.available)
        if missing and self.keep_free is not None:
            missing = min(missing, max(0, (mem_available() - self.keep_free) // self.page_size))
        if missing:
            try:
                with open(self.path, "w") as f:
                    f.write(str(pool.total + missing))
            except OSError:
                return False
            # The kernel may add fewer than asked: give back only what it added.
            self.added = max(0, kernel.hugetlb_pool(self.page_size).total - pool.total)
        self.free = kernel.hugetlb_pool(self.page_size).available
        return self.free >= self.pages

    def __exit__(self, *exc) -> None:
        try:
            with deferred():
                if self.added:
                    with open(self.path) as f:
                        now_total = int(f.read())
                    with open(self.path, "w") as f:
                        f.write(str(max(0, now_total - self.added)))
                    self.added = 0  # given back: a second exit gives nothing
        finally:
            self.lock.close()


def loadavg() -> List[float]:
    """The 1, 5 and 15 minute load averages (empty when unreadable)."""
    try:
        return [float(x) for x in (_read("/proc/loadavg") or "").split()[:3]]
    except ValueError:
        return []


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when unreadable)."""
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


# -- host ---------------------------------------------------------------------


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def host_info() -> dict:
    """Kernel, CPU, memory and THP settings of this host, for the JSON."""
    cpu = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_total = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) * 1024
    thp = {}
    base = SYS_THP
    for rel in (
        "enabled",
        "defrag",
        "shmem_enabled",
        "hpage_pmd_size",
        "khugepaged/defrag",
        "khugepaged/pages_to_scan",
        "khugepaged/scan_sleep_millisecs",
        "khugepaged/alloc_sleep_millisecs",
        "khugepaged/max_ptes_none",
        "khugepaged/max_ptes_shared",
        "khugepaged/max_ptes_swap",
    ):
        thp[rel] = _read(os.path.join(base, rel))
    uname = platform.uname()
    return {
        "hostname": uname.node,
        "kernel": uname.release,
        "kernel_version": uname.version,
        "machine": uname.machine,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_bytes": mem_total,
        "thp": thp,
        "python": platform.python_version(),
        "thpguard": thpguard.__version__,
        "loadavg": _read("/proc/loadavg"),
    }


# -- results ------------------------------------------------------------------


@dataclass
class Row:
    """One line of a result table: the ratio first, then what it compares.

    ``ratio`` is ``value / baseline`` in the unit of ``what`` (so a time
    ratio above 1 means slower, a throughput ratio above 1 means faster);
    ``value`` and ``baseline`` are medians, already formatted.
    """

    case: str
    ratio: Optional[float]
    what: str
    value: str
    baseline: str = ""


@dataclass
class Result:
    name: str
    title: str
    params: Dict[str, Any] = field(default_factory=dict)
    rows: List[Row] = field(default_factory=list)
    samples: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: Optional[str] = None
    series: Dict[str, Any] = field(default_factory=dict)

    def add(self, case: str, ratio_value: Optional[float], what: str, value: str, baseline: str = "") -> None:
        self.rows.append(Row(case, ratio_value, what, value, baseline))

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "params": self.params,
            "rows": [row.__dict__ for row in self.rows],
            "samples": self.samples,
            "series": self.series,
            "notes": self.notes,
            "seconds": self.seconds,
            "skipped": self.skipped,
        }


def format_table(result: Result) -> str:
    """A plain-text table: ratio first, then the medians it was made of."""
    head = f"== {result.name}: {result.title}"
    lines = [head]
    if result.params:
        lines.append("   " + ", ".join(f"{k}={v}" for k, v in result.params.items()))
    if result.skipped:
        lines.append(f"   skipped: {result.skipped}")
        return "\n".join(lines)
    cols = ("case", "ratio", "ratio of", "value", "baseline")
    table = [cols] + [
        (
            r.case,
            "-" if r.ratio is None else f"{r.ratio:.2f}",
            r.what,
            r.value,
            r.baseline,
        )
        for r in result.rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(cols))]
    for n, row in enumerate(table):
        cells = [str(c).ljust(w) if i != 1 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("   " + "  ".join(cells).rstrip())
        if n == 0:
            lines.append("   " + "  ".join("-" * w for w in widths))
    for note in result.notes:
        lines.append(f"   note: {note}")
    lines.append(f"   ({result.seconds:.1f} s)")
    return "\n".join(lines)
