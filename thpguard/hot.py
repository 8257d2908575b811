"""The hot-buffer context manager: :func:`hot`.

On entry the region is made fully huge-page backed (never-touched blocks
faulted in, split blocks re-collapsed through the repair engine); inside the
block an installed guard rescans it every ``hot_interval`` and repairs it
first; after the block a :class:`HotReport` says what happened.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from . import _fork, _native, events
from . import region as _region
from .blocks import Coverage
from .errors import InvalidTypeError, RegionClosedError
from .events import FAILED, REPAIRED, SPLIT, Event
from .guard import (
    DEFAULT_BACKOFF_INITIAL,
    DEFAULT_BACKOFF_MAX,
    scan,
    state_of,
    unwatch as _unwatch_region,
    watch as _watch_region,
)
from .guard import guard as _current_guard
from .region import Region
from .repair import LocalTarget, RepairEngine, RepairPolicy

__all__ = ["HotBuffer", "HotReport", "hot"]

log = logging.getLogger("thpguard")

#: MADV_COLLAPSE passes over a region on hot() entry while only EAGAIN fails.
_HOT_ENTRY_ATTEMPTS = 3


class _HotWatch:
    """Collects what happens to one region during one hot() block."""

    def __init__(self, not_huge: int) -> None:
        self._lock = threading.Lock()
        self.for_child()
        self.last_time = time.monotonic()
        self.last_not_huge = not_huge
        self.not_huge_seconds = 0.0
        self.not_huge_byte_seconds = 0.0
        self.max_not_huge = not_huge
        self.splits_seen = 0
        self.repairs = 0
        self.latencies: List[float] = []
        self.repair_seconds = 0.0
        self.failures: Dict[str, int] = {}
        self.observations = 0

    def for_child(self) -> None:
        self._lock = threading.Lock()

    def observe(self, now: float, not_huge: int) -> None:
        with self._lock:
            dt = max(0.0, now - self.last_time)
            if self.last_not_huge:
                self.not_huge_seconds += dt
                self.not_huge_byte_seconds += self.last_not_huge * dt
            self.last_time, self.last_not_huge = now, not_huge
            self.max_not_huge = max(self.max_not_huge, not_huge)
            self.observations += 1

    def on_event(self, event: Event) -> None:
        with self._lock:
            if event.kind == SPLIT:
                self.splits_seen += event.blocks
            elif event.kind == REPAIRED:
                self.repairs += event.blocks
                self.latencies.extend(event.latencies)
                self.repair_seconds += event.seconds
            elif event.kind == FAILED:
                for name, n in event.failures.items():
                    self.failures[name] = self.failures.get(name, 0) + n


@dataclass(frozen=True)
class HotReport:
    """What happened to a region during a :func:`hot` block.

    Sizes in bytes, times in seconds. ``watched`` is True when a guard
    watched the region inside the block; without one only entry and exit
    are checked and the time-based fields are None. ``populated_bytes``
    and ``entry_repaired_bytes`` were faulted in and re-collapsed on entry,
    in ``entry_seconds``. ``not_huge_seconds`` is the time some of the
    region was not PMD-mapped, ``not_huge_byte_seconds`` the integral of the
    bytes not PMD-mapped over time, ``max_not_huge_bytes`` the worst seen
    (all as scanned, at the guard's ``hot_interval``). ``splits_seen``
    blocks were seen split inside the block (including at exit),
    ``repairs`` repaired, each ``repair_latencies`` seconds after the scan
    that saw it split; ``repair_seconds`` were spent in MADV_COLLAPSE;
    ``failures`` maps errno names to failed block repairs.
    """

    address: int
    size: int
    seconds: float
    watched: bool
    populated_bytes: int
    entry_repaired_bytes: int
    entry_seconds: float
    entry_coverage: Coverage
    exit_coverage: Optional[Coverage]
    not_huge_seconds: Optional[float]
    not_huge_byte_seconds: Optional[float]
    max_not_huge_bytes: Optional[int]
    splits_seen: int
    repairs: int
    repair_latencies: Tuple[float, ...]
    repair_seconds: float
    failures: Dict[str, int]

    @property
    def median_repair_latency(self) -> Optional[float]:
        """Median of ``repair_latencies`` in seconds; None without repairs."""
        return statistics.median(self.repair_latencies) if self.repair_latencies else None

    @property
    def max_repair_latency(self) -> Optional[float]:
        """Worst of ``repair_latencies`` in seconds; None without repairs."""
        return max(self.repair_latencies) if self.repair_latencies else None

    @property
    def ok(self) -> bool:
        """True when the region was fully PMD-mapped on entry and at exit."""
        return bool(self.entry_coverage.complete and self.exit_coverage is not None
                    and self.exit_coverage.complete)

    def as_dict(self) -> dict:
        """A JSON-ready dict of every field and property."""
        return {
            "address": self.address,
            "size": self.size,
            "seconds": self.seconds,
            "watched": self.watched,
            "populated_bytes": self.populated_bytes,
            "entry_repaired_bytes": self.entry_repaired_bytes,
            "entry_seconds": self.entry_seconds,
            "entry_coverage": self.entry_coverage.as_dict(),
            "exit_coverage": None if self.exit_coverage is None else self.exit_coverage.as_dict(),
            "not_huge_seconds": self.not_huge_seconds,
            "not_huge_byte_seconds": self.not_huge_byte_seconds,
            "max_not_huge_bytes": self.max_not_huge_bytes,
            "splits_seen": self.splits_seen,
            "repairs": self.repairs,
            "repair_latencies": list(self.repair_latencies),
            "median_repair_latency": self.median_repair_latency,
            "max_repair_latency": self.max_repair_latency,
            "repair_seconds": self.repair_seconds,
            "failures": dict(self.failures),
            "ok": self.ok,
        }


class HotBuffer:
    """The context manager returned by :func:`hot`.

    ``with`` gives the :class:`~thpguard.Region`; after the block,
    ``report`` holds the :class:`HotReport` (None before). ``region`` is
    the region; one made by :func:`hot` is closed at exit.
    """

    def __init__(self, region: Region, owned: bool) -> None:
        self.region = region
        self.report: Optional[HotReport] = None
        self._owned = owned
        self._watch: Optional[_HotWatch] = None

    def __enter__(self) -> Region:
        region = self.region
        if region.closed:
            if self._owned:
                raise RegionClosedError("this hot() buffer was already used and closed; "
                                        "call thpguard.hot() again", region)
            region._require_open("use it in hot()")
        _fork.check()
        try:
            self._entry = self._make_huge(region)
        except BaseException:
            if self._owned:
                region.close()
            raise
        cov = self._entry[3]
        watch = self._watch = _HotWatch(cov.total_bytes - cov.huge_bytes)
        events.subscribe(watch.on_event, region.address)
        _watch_region(region, watch)
        self._entered = time.perf_counter()
        current = _current_guard()
        self._watched = current is not None and current.running
        return region

    @staticmethod
    def _make_huge(region: Region) -> Tuple[int, int, float, Coverage]:
        """Populate never-touched blocks, collapse split ones; what it took."""
        started = time.perf_counter()
        st = state_of(region)
        st.resume()  # entering hot() is the documented way to retry
        engine = RepairEngine(LocalTarget())
        cov = region.coverage()
        if cov.blocks is not None:
            absent = cov.blocks.absent()
        else:
            # No per-block detail (smaps): only an entirely empty region is known.
            absent = list(range(region.address, region.address + region.size, region.pmd_size)) \
                if cov.present_bytes == 0 else []
        for block in absent:
            # Only blocks without data: populating a block shared after fork
            # would split it (docs/kernel-facts.rst, populating).
            _native.populate_write(block, region.pmd_size, _region._PAGE)
        cov = scan(region, st, engine, time.monotonic())
        repaired = 0
        policy = RepairPolicy(chunk=8 * region.pmd_size, backoff_initial=DEFAULT_BACKOFF_INITIAL,
                              backoff_max=DEFAULT_BACKOFF_MAX,
                              eagain_ticks=_HOT_ENTRY_ATTEMPTS + 1)
        for _ in range(_HOT_ENTRY_ATTEMPTS):
            if cov is None or cov.complete or not _region._collapse_known():
                break
            done = engine.repair(st, cov, region.address, region.size, region.size, policy,
                                 lock=region._lock, is_closed=lambda: region.closed)
            repaired += done.blocks * region.pmd_size
            st.backoff_until = 0.0
            cov = scan(region, st, engine, time.monotonic())
            if set(done.failures) != {"EAGAIN"}:
                break  # only EAGAIN is worth an immediate retry
        if cov is None:
            cov = region.coverage()
        if not cov.complete:
            log.warning("hot(): region %#x is only %.1f%% PMD-mapped on entry",
                        region.address, 100 * cov.ratio)
        return len(absent) * region.pmd_size, repaired, time.perf_counter() - started, cov

    def __exit__(self, exc_type, exc, tb) -> None:
        region, watch = self.region, self._watch
        seconds = time.perf_counter() - self._entered
        exit_cov = None
        if not region.closed:
            # Scanned while still watched: splits no guard has seen yet (all
            # of them, without a guard) reach this report as split events.
            exit_cov = scan(region, state_of(region), RepairEngine(LocalTarget()),
                                   time.monotonic())
        _unwatch_region(region, watch)
        events.unsubscribe(watch.on_event, region.address)
        current = _current_guard()
        watched = self._watched and current is not None and current.running
        if exit_cov is not None:
            watch.observe(time.monotonic(), exit_cov.total_bytes - exit_cov.huge_bytes)
        populated, repaired, entry_seconds, entry_cov = self._entry
        self.report = HotReport(
            address=region.address,
            size=region.size,
            seconds=seconds,
            watched=watched,
            populated_bytes=populated,
            entry_repaired_bytes=repaired,
            entry_seconds=entry_seconds,
            entry_coverage=entry_cov,
            exit_coverage=exit_cov,
            not_huge_seconds=watch.not_huge_seconds if watched else None,
            not_huge_byte_seconds=watch.not_huge_byte_seconds if watched else None,
            max_not_huge_bytes=watch.max_not_huge if watched else None,
            splits_seen=watch.splits_seen,
            repairs=watch.repairs,
            repair_latencies=tuple(watch.latencies),
            repair_seconds=watch.repair_seconds,
            failures=dict(watch.failures),
        )
        if self._owned and not region.closed:
            try:
                region.close()
            except BufferError:
                if exc_type is None:
                    raise
                log.warning("hot(): region %#x not closed: views of it are still alive",
                            region.address)


def hot(size_or_region: Union[int, Region], **alloc_kwargs) -> HotBuffer:
    """A context manager around a hot buffer.

    ``size_or_region`` is a size in bytes (a region is allocated with
    :func:`~thpguard.alloc` and ``alloc_kwargs``, and closed at exit) or an
    open :class:`~thpguard.Region` (kept open). On entry the region is made
    fully huge-page backed: never-touched blocks are faulted in, split
    blocks re-collapsed. Inside the block an installed guard rescans the
    region every ``hot_interval`` and repairs it first; without a guard
    the region is checked on entry and exit only. After the block the
    returned object's ``report`` is a :class:`HotReport`::

        buffer = thpguard.hot(1 << 30)
        with buffer as region:
            ...
        print(buffer.report.splits_seen, buffer.report.repair_latencies)
    """
    if isinstance(size_or_region, Region):
        if alloc_kwargs:
            raise InvalidTypeError(
                f"hot() got allocation arguments {sorted(alloc_kwargs)} with an existing "
                "region; pass a size to allocate, or the region alone"
            )
        return HotBuffer(size_or_region, owned=False)
    if isinstance(size_or_region, bool) or not isinstance(size_or_region, int):
        raise InvalidTypeError(
            "hot() takes a size in bytes (int) or a thpguard.Region, got "
            f"{type(size_or_region).__name__}"
        )
    return HotBuffer(_region.alloc(size_or_region, **alloc_kwargs), owned=True)

