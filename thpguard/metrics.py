"""Prometheus metrics: a collector for this process, a textfile for any process.

:func:`register` adds a ``prometheus_client`` collector that reads
:func:`thpguard.stats` at every scrape: guarded bytes, huge bytes, the
coverage ratio, splits, repairs, repair failures by errno, and a histogram
of repair latency (seconds from the scan that saw a block split to its
repair, fed by the guard's events). It needs the ``prometheus`` extra
(``prometheus_client``).

:func:`textfile` formats the coverage of any processes in the
node_exporter textfile-collector format (what ``thpguard status
--prometheus`` prints), labelled by process name, cgroup and region name
so that series survive restarts; it needs nothing but the standard library.

The metrics of :func:`register` are per process: in a pre-forking server
each worker has its own. To see every process of a host at once, let
node_exporter read :func:`textfile` output instead.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

from thpguard.errors import InvalidArgumentError, InvalidTypeError
from thpguard import _fork, events
from thpguard.events import REPAIRED, Event
from thpguard.stats import stats as _stats
# The textfile writer lives apart (file safety, not metrics): re-exported here.
from thpguard._textfile import TextfileError, UnsafeDirectoryError, write_textfile

__all__ = [
    "LATENCY_BUCKETS",
    "ThpguardCollector",
    "on_event",
    "register",
    "textfile",
    "write_textfile",
    "TextfileError",
    "UnsafeDirectoryError",
]

#: Upper bounds (seconds) of the repair latency histogram. The guard
#: rescans every 0.05 s by default, so most repairs land in the first few.
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

PREFIX = "thpguard"


# -- repair latency, fed by guard events ---------------------------------------


class _Latencies:
    """A cumulative histogram of repair latencies for this process only
    (per-process state: a forked child starts from zero, like stats())."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.total += seconds

    def snapshot(self) -> Tuple[List[Tuple[str, int]], float]:
        with self.lock:
            buckets, running = [], 0
            for bound, n in zip(LATENCY_BUCKETS + (math.inf,), self.counts):
                running += n
                buckets.append(("+Inf" if bound == math.inf else repr(bound), running))
            return buckets, self.total


def _latencies() -> _Latencies:
    return _fork.state.get("metrics.latencies", _Latencies)


def on_event(event: Event) -> None:
    """Feed one guard event into the latency histogram.

    :func:`register` subscribes it to the event stream
    (``thpguard.events.subscribe``), once, whether or not a guard is
    installed yet. Repairs made before that are counted but not in the
    histogram.
    """
    if event.kind == REPAIRED:
        for seconds in event.latencies:
            _latencies().observe(seconds)


# -- the collector -----------------------------------------------------------


class ThpguardCollector:
    """A ``prometheus_client`` collector of :func:`thpguard.stats`.

    Every metric is a gauge or a counter of this process (sizes in bytes,
    times in seconds); failures carry an ``errno`` label (``ENOMEM``...).
    """

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix

    def describe(self):
        # Without describe() the registry would call collect() (and scan
        # every region) at registration time just to learn the names.
        return list(self._families(None))

    def collect(self):
        return list(self._families(_stats()))

    def _families(self, stats: Optional[Mapping[str, Any]]):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        p = self.prefix
        s = stats or {}

        def gauge(name, doc, value):
            family = GaugeMetricFamily(f"{p}_{name}", doc)
            if stats is not None:
                family.add_metric([], float(value or 0))
            return family

        def counter(name, doc, value):
            family = CounterMetricFamily(f"{p}_{name}", doc)
            if stats is not None:
                family.add_metric([], float(value or 0))
            return family

        guarded, huge = s.get("guarded_bytes", 0), s.get("huge_bytes", 0)
        yield gauge("regions", "Open thpguard regions in this process.", s.get("regions"))
        yield gauge("guarded_bytes", "Bytes of open thpguard regions.", guarded)
        yield gauge("huge_bytes", "Bytes of those regions mapped with PMD-size huge pages now.",
                    huge)
        yield gauge("split_bytes", "Bytes of those regions in split blocks now (every page "
                    "holds data, not PMD-mapped).", s.get("split_bytes"))
        yield gauge("coverage_ratio", "huge_bytes / guarded_bytes (1 when there is nothing "
                    "to guard).", huge / guarded if guarded else 1.0)
        yield gauge("guard_running", "1 while the guard thread runs in this process.",
                    1 if s.get("guard_running") else 0)
        yield counter("splits_detected", "PMD-size blocks the guard saw newly split.",
                      s.get("splits_detected"))
        yield counter("repairs", "PMD-size blocks re-collapsed into huge pages.",
                      s.get("repairs"))
        yield counter("repaired_bytes", "Bytes re-collapsed into huge pages.",
                      s.get("bytes_repaired"))
        yield counter("repair_seconds", "Seconds spent in MADV_COLLAPSE.",
                      s.get("repair_seconds"))
        yield counter("forks", "fork() calls made by this process.", s.get("forks_seen"))
        yield counter("copy_fallbacks", "copy-policy regions kept shared after fork: the memory "
                      "cgroup had no room for the copy.", s.get("copy_fallbacks"))
        yield counter("copy_wait_timeouts", "Forks whose parent stopped waiting for the child's "
                      "copy.", s.get("copy_wait_timeouts"))
        yield counter("hugetlb_fork_downgrades",
                      "hugetlb share regions a fork copied into the child because the pool "
                      "could not cover the copies a shared write would need.",
                      s.get("hugetlb_fork_downgrades"))
        failures = CounterMetricFamily(
            f"{p}_repair_failures", "Block repairs that failed, by errno.", labels=["errno"]
        )
        for name, count in sorted((s.get("repair_failures") or {}).items()):
            failures.add_metric([str(name)], float(count))
        yield failures
        latency = HistogramMetricFamily(
            f"{p}_repair_latency_seconds",
            "Seconds from the scan that saw a block split to its repair.",
        )
        if stats is not None:
            buckets, total = _latencies().snapshot()
            latency.add_metric([], buckets, total)
        yield latency
        yield from _region_families(p, stats is not None)


def _region_families(p: str, scrape: bool):
    """Bytes and PMD-mapped bytes per region name (``alloc(name=...)``; "" unnamed)."""
    from prometheus_client.core import GaugeMetricFamily

    from thpguard.region import regions

    sizes = GaugeMetricFamily(f"{p}_region_bytes", "Bytes of open thpguard regions with this "
                              "name (\"\" for unnamed ones).", labels=["region"])
    huge = GaugeMetricFamily(f"{p}_region_huge_bytes", "Bytes of them mapped with PMD-size "
                             "huge pages now.", labels=["region"])
    if scrape:
        by_name: Dict[str, List[int]] = {}
        for region in regions():
            try:
                cov = region.coverage()
            except Exception:  # noqa: BLE001 - closed meanwhile, or unreadable: left out
                continue
            entry = by_name.setdefault(getattr(region, "name", None) or "", [0, 0])
            entry[0] += cov.total_bytes
            entry[1] += cov.huge_bytes
        for name, (total, pmd_mapped) in sorted(by_name.items()):
            sizes.add_metric([name], float(total))
            huge.add_metric([name], float(pmd_mapped))
    yield sizes
    yield huge


_registered: Dict[int, ThpguardCollector] = {}
_register_lock = threading.Lock()


def register(registry=None) -> ThpguardCollector:
    """Add the thpguard collector to ``registry`` (default: the global REGISTRY).

    Idempotent per registry. Also subscribes :func:`on_event` to the event
    stream, so repair latencies reach the histogram.
    Raises :class:`ImportError` without ``prometheus_client`` (install
    the ``prometheus`` extra).
    """
    try:
        import prometheus_client
    except ImportError:
        raise ImportError(
            "thpguard.metrics.register needs prometheus_client: "
            "pip install prometheus_client (the prometheus extra)"
        ) from None
    if registry is None:
        registry = prometheus_client.REGISTRY
    events.subscribe(on_event)
    with _register_lock:
        collector = _registered.get(id(registry))
        if collector is None:
            collector = ThpguardCollector()
            registry.register(collector)
            _registered[id(registry)] = collector
        return collector


# -- node_exporter textfile ------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _field(vma: Any, *names: str) -> Any:
    for name in names:
        value = vma.get(name) if isinstance(vma, Mapping) else getattr(vma, name, None)
        if value is not None:
            return value
    return None


def _bytes(vma: Any, value: Any, what: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"per-VMA {what} must be a number of bytes, got {value!r} in {vma!r}")
    if value < 0:
        raise InvalidArgumentError(f"per-VMA {what} must be >= 0 bytes, got {value} in {vma!r}")
    return int(value)


def _vma_numbers(vma: Any, pmd: Optional[int]) -> Tuple[int, int, int, Optional[int]]:
    """(start, size, huge, split or None) of one VMA record, in bytes."""
    start = _field(vma, "start")
    size = _field(vma, "total_bytes", "size")
    if size is None and start is not None and _field(vma, "end") is not None:
        size = _field(vma, "end") - start
    huge = _field(vma, "huge_bytes", "pmd_mapped_bytes")
    if start is None or size is None or huge is None:
        raise InvalidArgumentError(
            "each VMA needs start, total_bytes (or size, or end) and huge_bytes "
            f"(or pmd_mapped_bytes); got {vma!r}"
        )
    split = _field(vma, "split_bytes")
    if split is None:
        blocks = _field(vma, "split_blocks")
        if blocks is not None and pmd:
            split = (blocks if isinstance(blocks, int) else len(blocks)) * pmd
    return (int(start), _bytes(vma, size, "size"), _bytes(vma, huge, "huge bytes"),
            _bytes(vma, split, "split bytes"))


def _counts(vma: Any, huge: int) -> bool:
    # `thpguard status` lists every VMA of a process; only those advised
    # MADV_HUGEPAGE or holding huge pages say anything about THP.
    # The lazy copy's pool is spare huge pages, not the program's memory.
    if _field(vma, "copy_pool"):
        return False
    advised = _field(vma, "advised")
    return advised is None or bool(advised) or huge > 0


def _as_processes(processes: Any):
    """(pid, name, pmd, cgroup, vmas) for each process, from either accepted form."""
    if isinstance(processes, Mapping):
        for pid in sorted(processes):
            yield pid, None, None, None, processes[pid]
        return
    if isinstance(processes, (str, bytes)) or not hasattr(processes, "__iter__"):
        raise InvalidTypeError(
            "processes must map a pid to its VMAs, or be process records with pid and vmas; "
            f"got {type(processes).__name__}"
        )
    for record in processes:
        pid, vmas = _field(record, "pid"), _field(record, "vmas")
        if pid is None or vmas is None:
            raise InvalidTypeError(
                f"a process record needs pid and vmas (like thpguard status --json); got {record!r}"
            )
        yield pid, _field(record, "name"), _field(record, "pmd_size"), _field(record, "cgroup"), vmas


def textfile(
    processes: Any,
    *,
    names: Optional[Mapping[int, str]] = None,
    cgroups: Optional[Mapping[int, str]] = None,
    per_vma: bool = True,
    per_pid: bool = False,
    pmd_size: Optional[int] = None,
    prefix: str = PREFIX,
) -> str:
    """node_exporter textfile-collector text for the coverage of processes.

    ``processes`` is either a mapping of pid to that process's VMAs, or an
    iterable of process records with ``pid``, ``vmas`` and optionally
    ``name``, ``cgroup`` and ``pmd_size`` (objects or dicts, like each
    process of ``thpguard status --json``). A VMA is a
    :class:`~thpguard.Coverage`, or an object or mapping with ``start`` and
    ``total_bytes`` (or ``size``, or ``end``) and ``huge_bytes`` (or
    ``pmd_mapped_bytes``), optionally ``split_bytes`` (or ``split_blocks``,
    a count or a list of block addresses, times ``pmd_size``) and
    ``region`` (a thpguard region's name, ``""`` when unnamed, as
    ``thpguard status`` finds it). VMAs with ``advised`` false and no huge
    pages are left out. ``names`` and ``cgroups`` map a pid to its command
    name and cgroup path, over what the records say.

    By default the labels are stable across restarts: ``comm`` (process
    name), ``cgroup`` and, on the ``region_*`` series, ``region`` (the name
    given to :func:`thpguard.alloc`). Processes with the same labels (the
    workers of one server) are added up, and ``process_count`` says how
    many there were. ``per_vma=False`` drops the ``region_*`` series.
    ``per_pid=True`` instead labels every series with ``pid`` and gives one
    ``vma_*`` series per VMA with its ``start`` address: detail for
    debugging that starts new series at every restart. Write the text with
    :func:`write_textfile` so node_exporter never reads half a file.
    """
    names = dict(names or {})
    cgroups = dict(cgroups or {})
    docs = {
        "process_count": "Processes with these labels.",
        "process_bytes": "Bytes of the process's huge-page VMAs (advised or holding huge pages).",
        "process_huge_bytes": "Bytes of them mapped with PMD-size huge pages.",
        "process_split_bytes": "Bytes of them in split blocks (every page holds data, not PMD-mapped).",
        "process_coverage_ratio": "process_huge_bytes / process_bytes (1 when there are none).",
        "region_bytes": "Bytes of thpguard regions with this name.",
        "region_huge_bytes": "Bytes of those regions mapped with PMD-size huge pages.",
        "region_split_bytes": "Bytes of those regions holding data but split.",
        "vma_bytes": "Bytes of one VMA.",
        "vma_huge_bytes": "Bytes of one VMA mapped with PMD-size huge pages.",
        "vma_split_bytes": "Bytes of one VMA in split blocks.",
    }
    # (metric, label items) -> value; added up where the labels repeat.
    values: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
    unknown_split: set = set()

    def add(name: str, labels: Dict[str, str], value: float) -> None:
        key = (name, tuple(labels.items()))
        values[key] = values.get(key, 0) + value

    for pid, name, pmd, cgroup, vmas in _as_processes(processes):
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise InvalidArgumentError(f"pid must be a positive int, got {pid!r}")
        labels: Dict[str, str] = {"pid": str(pid)} if per_pid else {}
        name = names.get(pid, name)
        if name is not None:
            labels["comm"] = str(name)
        cgroup = cgroups.get(pid, cgroup)
        if cgroup is not None:
            labels["cgroup"] = str(cgroup)
        total = huge = split = 0
        split_known = True
        for vma in vmas:
            start, vma_size, vma_huge, vma_split = _vma_numbers(vma, pmd or pmd_size)
            if not _counts(vma, vma_huge):
                continue
            total += vma_size
            huge += vma_huge
            if vma_split is None:
                split_known = False
            else:
                split += vma_split
            region = _field(vma, "region")
            if not per_vma or (region is None and not per_pid):
                continue
            if per_pid:
                family, vma_labels = "vma", dict(labels, start=f"{start:#x}")
                if region is not None:
                    vma_labels["region"] = str(region)
            else:
                family, vma_labels = "region", dict(labels, region=str(region))
            add(f"{family}_bytes", vma_labels, vma_size)
            add(f"{family}_huge_bytes", vma_labels, vma_huge)
            if vma_split is not None:
                add(f"{family}_split_bytes", vma_labels, vma_split)
        add("process_count", labels, 1)
        add("process_bytes", labels, total)
        add("process_huge_bytes", labels, huge)
        if split_known:
            add("process_split_bytes", labels, split)
        else:
            unknown_split.add(tuple(labels.items()))
    for key in list(values):
        name, items = key
        if name == "process_bytes":
            huge = values[("process_huge_bytes", items)]
            values[("process_coverage_ratio", items)] = huge / values[key] if values[key] else 1.0
        if name == "process_split_bytes" and items in unknown_split:
            del values[key]  # one process of the group without split detail: unknown
    if per_pid:  # one process per label set: a count of 1 says nothing
        for key in [k for k in values if k[0] == "process_count"]:
            del values[key]

    lines: List[str] = []
    for name, doc in docs.items():
        rows = [(items, v) for (n, items), v in values.items() if n == name]
        if not rows:
            continue
        lines.append(f"# HELP {prefix}_{name} {doc}")
        lines.append(f"# TYPE {prefix}_{name} gauge")
        for items, value in rows:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
            number = str(int(value)) if name != "process_coverage_ratio" else repr(float(value))
            lines.append(f"{prefix}_{name}{{{text}}} {number}")
    return "\n".join(lines) + "\n" if lines else ""
