"""The guard: automatic split repair in every process, :func:`hot`, :func:`stats`.

:func:`install` starts one background thread per process that scans every
open region with PAGEMAP_SCAN each tick and re-collapses (``MADV_COLLAPSE``)
the 2 MiB blocks that a write after fork split. It is fork-aware: it stops
its thread before ``fork()`` and starts it again after, in the parent and in
the child, so a process never forks with the guard thread running and every
child repairs its own splits with its own pagemap fd and its own counters.

:func:`hot` is the context manager around a hot buffer; it lives here rather
than in ``region.py`` because it needs the guard.

Environment switches, read once at ``import thpguard``:

``THPGUARD_GUARD=1``
    install the guard at import (also ``true``/``yes``/``on``; ``0``,
    ``false``, ``no``, ``off`` or empty leave it off).
``THPGUARD_GUARD_INTERVAL``
    the guard's interval in seconds (default 0.05).

A bad value never breaks the import: it is logged as an error on the
``thpguard`` logger and the default is used.
"""

from __future__ import annotations

import atexit
import contextlib
import errno as _errno
import logging
import math
import os
import statistics
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from . import _fork, _native, kernel, pagemap
from . import region as _region
from .errors import InvalidArgumentError, InvalidTypeError, KernelCallError, RegionClosedError
from .pagemap import Coverage
from .region import Region

__all__ = [
    "Event",
    "Guard",
    "HotBuffer",
    "HotReport",
    "Stats",
    "guard",
    "hot",
    "install",
    "stats",
]

log = logging.getLogger("thpguard")

ENV_GUARD = "THPGUARD_GUARD"
ENV_GUARD_INTERVAL = "THPGUARD_GUARD_INTERVAL"

DEFAULT_INTERVAL = 0.05
#: Fastest rescan of regions inside a :func:`hot` block (seconds).
DEFAULT_HOT_INTERVAL = 0.01
#: Bytes the guard submits to MADV_COLLAPSE per tick (each 2 MiB costs about
#: 0.17 ms of copying, KERNEL-NOTES), so one tick repairs at most ~5.5 ms.
DEFAULT_MAX_REPAIR_BYTES = 64 << 20
DEFAULT_BACKOFF_INITIAL = 0.1
DEFAULT_BACKOFF_MAX = 10.0
#: Consecutive ticks a region may answer EAGAIN before it is backed off.
DEFAULT_EAGAIN_TICKS = 20

#: MADV_COLLAPSE passes over a region on hot() entry while only EAGAIN fails.
_HOT_ENTRY_ATTEMPTS = 3
_SMAPS_CPU_SHARE = 0.05
_MIN_INTERVAL = 0.001
_MAX_INTERVAL = 3600.0
_JOIN_TIMEOUT = 5.0

# Event kinds.
SPLIT = "split"
REPAIRED = "repaired"
FAILED = "failed"
BACKOFF = "backoff"
DISABLED = "disabled"
FORK = "fork"

_LEVELS = {
    SPLIT: logging.DEBUG,
    REPAIRED: logging.DEBUG,
    FORK: logging.DEBUG,
    FAILED: logging.WARNING,
    BACKOFF: logging.WARNING,
    DISABLED: logging.WARNING,
}


def _errname(err: int) -> str:
    return _errno.errorcode.get(err, str(err))


# -- events -------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Something the guard saw or did, passed to the ``on_event`` callback.

    ``kind`` is one of ``"split"``, ``"repaired"``, ``"failed"``,
    ``"backoff"``, ``"disabled"``, ``"fork"``. ``address`` is the region's
    start (None for ``fork``); ``blocks``/``bytes`` count the PMD-size
    blocks concerned. For ``repaired``: ``seconds`` is the time spent in
    MADV_COLLAPSE and ``latencies`` the seconds from the scan that first saw
    each block split to its repair. For ``failed``: ``failures`` maps an
    errno name to a count of blocks. For ``backoff``: ``delay`` is the
    seconds until the next attempt. ``reason`` is a sentence for
    ``disabled`` and ``backoff``. ``time`` is :func:`time.time`.
    """

    kind: str
    pid: int
    time: float
    address: Optional[int] = None
    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    latencies: Tuple[float, ...] = ()
    failures: Dict[str, int] = field(default_factory=dict)
    delay: Optional[float] = None
    reason: str = ""

    def describe(self) -> str:
        """One line of text, as logged."""
        where = "" if self.address is None else f"region {self.address:#x}: "
        if self.kind == SPLIT:
            return f"{where}{self.blocks} block(s) ({self.bytes} bytes) seen split"
        if self.kind == REPAIRED:
            worst = max(self.latencies) if self.latencies else 0.0
            return (
                f"{where}repaired {self.blocks} block(s) in {self.seconds * 1e3:.2f} ms "
                f"(worst {worst * 1e3:.1f} ms after the split was seen)"
            )
        if self.kind == FAILED:
            errs = ", ".join(f"{k} x{v}" for k, v in sorted(self.failures.items()))
            then = "; retried next tick" if set(self.failures) == {"EAGAIN"} else ""
            return f"{where}MADV_COLLAPSE failed on {self.blocks} block(s): {errs}{then}"
        if self.kind == BACKOFF:
            return f"{where}backing off {self.delay:.2f} s: {self.reason}"
        if self.kind == DISABLED:
            return f"{where}no longer repaired: {self.reason}"
        return f"pid {self.pid}: {self.reason}"


# -- counters -----------------------------------------------------------------


class _Counters:
    """Process-wide counters; a child starts with fresh ones."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ticks = 0
        self.hot_ticks = 0
        self.tick_cpu_seconds = 0.0
        self.scan_seconds = 0.0
        self.scan_failures = 0
        self.splits_detected = 0
        self.repairs = 0
        self.bytes_repaired = 0
        self.repair_seconds = 0.0
        self.last_repair_seconds: Optional[float] = None
        self.last_repair_latency_seconds: Optional[float] = None
        self.repair_failures: Dict[str, int] = {}
        self.backoffs = 0
        self.forks_seen = 0
        self.callback_errors = 0


_counters = _Counters()


class Stats(dict):
    """Process-wide guard counters: a plain ``dict`` also readable by attribute.

    Keys (sizes in bytes, times in seconds):

    ``pid``, ``guard_running``, ``interval`` (None without a guard);
    ``regions`` open regions, ``guarded_bytes`` their size, ``huge_bytes``
    and ``split_bytes`` of them right now (scanned by this call);
    ``ticks`` full guard ticks, ``hot_ticks`` extra scans of hot regions,
    ``tick_cpu_seconds`` guard thread CPU time over all ticks,
    ``scan_seconds``, ``scan_failures``;
    ``splits_detected`` blocks newly seen split, ``repairs`` blocks
    re-collapsed, ``bytes_repaired``, ``repair_seconds`` time in
    MADV_COLLAPSE, ``last_repair_seconds`` the last such call,
    ``last_repair_latency_seconds`` from the scan that saw the last repaired
    block split to its repair; ``repair_failures`` a dict of errno name to
    count of failed block repairs; ``backoffs``; ``regions_backing_off``;
    ``regions_disabled`` a dict of region address (hex) to the reason it is
    no longer repaired; ``forks_seen`` forks made by this process;
    ``callback_errors`` exceptions raised by the ``on_event`` callback;
    ``copy_fallbacks`` ``copy`` regions this process kept shared after fork
    because its memory cgroup had no room for the copy (counted in the
    child), ``copy_wait_timeouts`` forks whose parent stopped waiting for
    the child's copy.
    """

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# -- per-region state -----------------------------------------------------------


class _RegionState:
    def __init__(self) -> None:
        self.first_seen: Dict[int, float] = {}  # block start -> monotonic time
        self.backoff_until = 0.0
        self.backoff_delay = 0.0
        self.eagain_ticks = 0
        self.disabled: Optional[str] = None
        # smaps fallback (no per-block detail): split blocks seen last time.
        self.smaps_split = 0
        self.smaps_seen: List[float] = []  # when each of them was first seen
        self.smaps_cursor = 0  # offset where the next budget-limited pass starts


_states: "weakref.WeakKeyDictionary[Region, _RegionState]" = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _state(region: Region) -> _RegionState:
    with _states_lock:
        st = _states.get(region)
        if st is None:
            st = _states[region] = _RegionState()
        return st


def _blocks(ranges, pmd: int) -> List[int]:
    return [b for lo, hi in ranges for b in range(lo, hi, pmd)]


def _smaps_split_blocks(cov: Coverage) -> int:
    """Split blocks in a coverage from smaps (no per-block detail).

    A block split after fork stays present, mapped by small pages; a block
    never touched is not present. So present bytes that are not huge
    count the split blocks (rounded up: a block may be partly present).
    """
    pmd = cov.pmd_size
    return max(0, -(-(cov.present_bytes - cov.huge_bytes) // pmd))


def _collapse_blocker(region: Region) -> str:
    """Why MADV_COLLAPSE answers EINVAL on a region that holds data."""
    try:
        value = _native.thp_disable_get()
    except OSError:
        value = 0
    # Linux 6.18: PR_GET_THP_DISABLE returns 3 with PR_THP_DISABLE_EXCEPT_ADVISED,
    # under which advised regions still collapse; 1 disables THP completely.
    if value & 1 and not value & 2:
        return ("THP is disabled for this process by prctl(PR_SET_THP_DISABLE); "
                "clear it, or set it with PR_THP_DISABLE_EXCEPT_ADVISED (Linux 6.18)")
    try:
        for vma in kernel.read_smaps():
            if vma.start <= region.address < vma.end and "nh" in vma.vm_flags:
                return ("the region is marked MADV_NOHUGEPAGE; madvise(MADV_HUGEPAGE) "
                        "it again, then use it in hot() to resume repairs")
    except OSError:
        pass
    return "MADV_COLLAPSE answers EINVAL for this region (no known cause: THP not allowed here)"


# -- event dispatch -----------------------------------------------------------------

_hot_watches: "weakref.WeakKeyDictionary[Region, List[_HotWatch]]" = weakref.WeakKeyDictionary()
_hot_lock = threading.Lock()


def _watches(region: Region) -> List["_HotWatch"]:
    with _hot_lock:
        return list(_hot_watches.get(region, ()))


def _emit(event: Event, region: Optional[Region] = None) -> None:
    """Log an event, feed hot watchers and the callback. Counters come first."""
    level = _LEVELS.get(event.kind, logging.INFO)
    if event.kind == FAILED and set(event.failures) == {"EAGAIN"}:
        level = logging.INFO
    log.log(level, "%s", event.describe())
    if region is not None:
        for watch in _watches(region):
            watch.on_event(event)
    current = _current
    callback = current.on_event if current is not None else None
    if callback is not None:
        try:
            callback(event)
        except Exception:
            with _counters.lock:
                _counters.callback_errors += 1
            log.exception("thpguard on_event callback %r failed on a %s event", callback, event.kind)


def _count_failures(failures: Dict[str, int]) -> None:
    with _counters.lock:
        for name, n in failures.items():
            _counters.repair_failures[name] = _counters.repair_failures.get(name, 0) + n


# -- scanning and repair (shared by the guard thread and hot()) ---------------------


def _scan(region: Region, st: _RegionState, now: float) -> Optional[Coverage]:
    """Coverage of ``region`` now; records new splits. None if it cannot be read."""
    started = time.perf_counter()
    try:
        cov = pagemap.coverage(region.address, region.address + region.size, region.pmd_size)
    except OSError as exc:
        with _counters.lock:
            _counters.scan_failures += 1
        log.warning("region %#x: coverage scan failed: %s", region.address, exc)
        return None
    finally:
        with _counters.lock:
            _counters.scan_seconds += time.perf_counter() - started
    if cov.split_ranges is None:
        split = _smaps_split_blocks(cov)
        new_count = split - st.smaps_split
        st.smaps_split = split
        del st.smaps_seen[split:]  # repaired elsewhere, or the other side exited
        if new_count > 0:
            st.smaps_seen.extend([now] * new_count)
            with _counters.lock:
                _counters.splits_detected += new_count
            _emit(Event(SPLIT, os.getpid(), time.time(), region.address, new_count,
                        new_count * region.pmd_size), region)
        return cov
    current = set(_blocks(cov.split_ranges, region.pmd_size))
    new = current.difference(st.first_seen)
    for block in set(st.first_seen).difference(current):
        del st.first_seen[block]  # repaired elsewhere, or the other side exited
    if new:
        for block in new:
            st.first_seen[block] = now
        with _counters.lock:
            _counters.splits_detected += len(new)
        _emit(Event(SPLIT, os.getpid(), time.time(), region.address, len(new),
                    len(new) * region.pmd_size), region)
    return cov


@dataclass
class _Repaired:
    blocks: int = 0
    seconds: float = 0.0
    failures: Dict[str, int] = field(default_factory=dict)


def _repair(
    region: Region,
    st: _RegionState,
    cov: Coverage,
    budget: int,
    *,
    chunk: int,
    backoff_initial: float,
    backoff_max: float,
    eagain_ticks: int,
    stop: Optional[threading.Event] = None,
) -> Tuple[_Repaired, int]:
    """Re-collapse the split blocks of ``region`` within ``budget`` bytes.

    Returns what was done and the bytes submitted. Each MADV_COLLAPSE call
    covers at most ``chunk`` bytes of contiguous split blocks; the GIL is
    released during the call (cffi) and ``stop`` is checked between calls,
    so a fork waits for one chunk at most.
    """
    done = _Repaired()
    if st.disabled or budget <= 0:
        return done, 0
    pmd = region.pmd_size
    if cov.split_ranges is not None:
        ranges = list(cov.split_ranges)
    elif not cov.complete:
        # smaps fallback (no PAGEMAP_SCAN, Linux < 6.7): no per-block detail,
        # try every block; untouched ones answer EINVAL and are skipped. A
        # pass cut short by the budget resumes where the last one stopped.
        at = region.address + (st.smaps_cursor % region.size if region.size else 0)
        ranges = [(at, region.address + region.size), (region.address, at)]
        ranges = [(lo, hi) for lo, hi in ranges if lo < hi]
    else:
        ranges = []
    calls: List[Tuple[int, int]] = []
    left = budget
    for lo, hi in ranges:
        at = lo
        while at < hi and left > 0:
            length = min(chunk, hi - at, max(pmd, left - left % pmd))
            calls.append((at, length))
            left -= length
            at += length
    smaps = cov.split_ranges is None
    smaps_ok = smaps_einval = 0
    submitted = calls_made = 0
    latencies: List[float] = []
    fatal: Optional[int] = None
    for start, length in calls:
        if stop is not None and stop.is_set():
            break
        with region._lock:
            if region.closed:
                break
            t0 = time.perf_counter()
            errs = _native.collapse(start, length, pmd, 0)
            spent = time.perf_counter() - t0
        submitted += length
        calls_made += 1
        if smaps:
            st.smaps_cursor = (start + length - region.address) % region.size
        done.seconds += spent
        finished = time.monotonic()
        for i, err in enumerate(errs):
            block = start + i * pmd
            if err == 0 and smaps:
                smaps_ok += 1  # maybe a block that was huge already: counted below
            elif err == 0:
                done.blocks += 1
                seen = st.first_seen.pop(block, None)
                if seen is not None:
                    latencies.append(finished - seen)
            elif err == _errno.EINVAL and smaps:
                smaps_einval += 1  # a block never touched, or THP not allowed here
            else:
                name = _errname(err)
                done.failures[name] = done.failures.get(name, 0) + 1
                if err != _errno.EAGAIN:
                    fatal = err
        if fatal is not None:
            break
    if smaps and calls_made:
        # MADV_COLLAPSE also answers 0 for a block that was huge already:
        # count the repairs from smaps, before and after.
        try:
            after = pagemap.smaps_coverage(region.address, region.address + region.size, pmd)
        except OSError:
            after = None
        if after is not None:
            done.blocks = max(0, (after.huge_bytes - cov.huge_bytes) // pmd)
            st.smaps_split = _smaps_split_blocks(after)
            finished = time.monotonic()
            for seen in st.smaps_seen[:done.blocks]:
                latencies.append(finished - seen)
            del st.smaps_seen[:done.blocks]
            del st.smaps_seen[st.smaps_split:]
            if smaps_ok == 0 and smaps_einval and st.smaps_split:
                # Present blocks that are not huge refuse the collapse: not
                # untouched blocks, THP is not allowed here.
                done.failures["EINVAL"] = st.smaps_split
                fatal = _errno.EINVAL
    if done.blocks:
        with _counters.lock:
            _counters.repairs += done.blocks
            _counters.bytes_repaired += done.blocks * pmd
            _counters.repair_seconds += done.seconds
            _counters.last_repair_seconds = done.seconds / calls_made
            if latencies:
                _counters.last_repair_latency_seconds = latencies[-1]
        st.backoff_delay = 0.0
        _emit(Event(REPAIRED, os.getpid(), time.time(), region.address, done.blocks,
                    done.blocks * pmd, done.seconds, tuple(latencies)), region)
    if done.failures:
        _count_failures(done.failures)
        n_failed = sum(done.failures.values())
        _emit(Event(FAILED, os.getpid(), time.time(), region.address, n_failed,
                    n_failed * pmd, failures=dict(done.failures)), region)
    hole = region._outside_change() if fatal == _errno.ENOMEM else None
    if hole is not None:
        # ENOMEM is also the answer for a range with a hole in it, on every
        # try: backing off would retry forever. Say so once and stop.
        st.disabled = (f"part of the region is gone: {hole}; its blocks cannot be repaired "
                       "(MADV_COLLAPSE answers ENOMEM for an unmapped range)")
        _emit(Event(DISABLED, os.getpid(), time.time(), region.address,
                    reason=st.disabled), region)
        return done, submitted
    if fatal == _errno.EINVAL:
        st.disabled = _collapse_blocker(region)
        _emit(Event(DISABLED, os.getpid(), time.time(), region.address,
                    reason=st.disabled), region)
        return done, submitted
    if fatal is None and "EAGAIN" in done.failures:
        st.eagain_ticks += 1
        if st.eagain_ticks < eagain_ticks:
            return done, submitted
        fatal = _errno.EAGAIN
    elif fatal is None:
        st.eagain_ticks = 0
    if fatal is not None:
        st.eagain_ticks = 0
        st.backoff_delay = min(backoff_max, max(backoff_initial, st.backoff_delay * 2))
        st.backoff_until = time.monotonic() + st.backoff_delay
        with _counters.lock:
            _counters.backoffs += 1
        reason = f"MADV_COLLAPSE failed with {_errname(fatal)} ({os.strerror(fatal)})"
        if fatal == _errno.EAGAIN:
            reason += f" on {eagain_ticks} ticks in a row"
        _emit(Event(BACKOFF, os.getpid(), time.time(), region.address,
                    delay=st.backoff_delay, reason=reason), region)
    return done, submitted


# -- the guard ------------------------------------------------------------------------


def _check_seconds(name: str, value: object, low: float = _MIN_INTERVAL,
                   high: float = _MAX_INTERVAL) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not (low <= value <= high) or math.isnan(value):
        raise InvalidArgumentError(f"{name} must be between {low} and {high} seconds, got {value!r}")
    return float(value)


def _check_bytes(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{name} must be an int number of bytes, got {type(value).__name__}")
    if value < low:
        raise InvalidArgumentError(f"{name} must be at least {low} bytes, got {value}")
    return value


def _wait_task_gone(tid: Optional[int]) -> None:
    """Wait until the kernel has removed a joined thread.

    ``Thread.join`` returns when the thread's Python code is done, a few
    microseconds before the kernel task exits; forking in that window
    forks a process that still has two threads.
    """
    if tid is None:
        return
    path = f"/proc/self/task/{tid}"
    deadline = time.monotonic() + 1.0
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.00005)


class Guard:
    """The background guard of this process; get it from :func:`install`.

    Attributes (read them; change them through :func:`install`):
    ``interval`` seconds between full scans of every region;
    ``hot_interval`` seconds between scans of regions inside :func:`hot`;
    ``max_repair_bytes`` bytes submitted to MADV_COLLAPSE per tick at most;
    ``chunk`` bytes per MADV_COLLAPSE call; ``backoff_initial`` and
    ``backoff_max`` the first and the longest pause (seconds) after ENOMEM,
    EBUSY or persistent EAGAIN; ``eagain_ticks`` ticks of EAGAIN in a row
    before backing off; ``on_event`` the callback receiving each
    :class:`Event` (called in the guard thread; keep it short).
    """

    def __init__(self) -> None:
        # Regions fall back to 2 MiB blocks where the PMD size is unknown.
        pmd = kernel.pmd_size() or _region._FALLBACK_PMD
        self.interval = DEFAULT_INTERVAL
        self.hot_interval = DEFAULT_HOT_INTERVAL
        self.max_repair_bytes = DEFAULT_MAX_REPAIR_BYTES
        self.chunk = pmd
        self.backoff_initial = DEFAULT_BACKOFF_INITIAL
        self.backoff_max = DEFAULT_BACKOFF_MAX
        self.eagain_ticks = DEFAULT_EAGAIN_TICKS
        self.on_event: Optional[Callable[[Event], None]] = None
        self._pmd = pmd
        self._fresh_locks()
        self._thread: Optional[threading.Thread] = None
        self._stop_event: Optional[threading.Event] = None
        self._wake = threading.Event()
        self._wanted = False

    def _fresh_locks(self) -> None:
        self._lock = threading.RLock()
        self._tick_done = threading.Condition(threading.Lock())

    def _configure(self, **settings) -> None:
        for name, value in settings.items():
            if value is None:
                continue
            if name in ("interval", "hot_interval"):
                value = _check_seconds(name, value)
            elif name in ("backoff_initial", "backoff_max"):
                value = _check_seconds(name, value, 0.001, 86400.0)
            elif name == "max_repair_bytes":
                value = _check_bytes(name, value, self._pmd)
            elif name == "chunk":
                value = _check_bytes(name, value, self._pmd)
                value -= value % self._pmd
            elif name == "eagain_ticks":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise InvalidArgumentError(f"eagain_ticks must be an int >= 1, got {value!r}")
            elif name == "on_event":
                if not callable(value):
                    raise InvalidTypeError(f"on_event must be callable, got {type(value).__name__}")
            setattr(self, name, value)
        if self.backoff_max < self.backoff_initial:
            raise InvalidArgumentError(
                f"backoff_max ({self.backoff_max} s) must be >= backoff_initial "
                f"({self.backoff_initial} s)"
            )

    # -- lifetime --------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the guard thread runs in this process."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stop(self) -> None:
        """Stop the guard thread and uninstall this guard. Idempotent."""
        global _current
        with self._lock:
            self._wanted = False
            self._halt()
        with _install_lock:
            if _current is self:
                _current = None

    def wait_ticks(self, n: int = 1, timeout: Optional[float] = None) -> bool:
        """Block until ``n`` more full ticks have completed; False on timeout.

        Also returns False at once if the guard is not running.
        """
        with self._tick_done:
            target = _counters.ticks + n
            return self._tick_done.wait_for(
                lambda: _counters.ticks >= target or not self._wanted, timeout
            ) and _counters.ticks >= target

    @contextlib.contextmanager
    def paused(self) -> Iterator["Guard"]:
        """Stop the guard thread for the block, then start it again.

        Use it around a ``fork()`` that bypasses Python's at-fork hooks (a
        C extension, uWSGI without ``py-call-osafterfork``): a thread that
        runs during such a fork can leave CPython's own GIL mutex locked in
        the child, which then hangs. The guard stays installed, so a child
        forked inside the block starts its own guard on its first thpguard
        call.
        """
        with self._lock:
            self._halt()
        try:
            yield self
        finally:
            # In a child forked inside the block, handle that fork first: it
            # replaces this guard's locks and thread state, then starts it.
            _fork.check()
            if self._wanted:
                self._start()

    def _start(self) -> None:
        with self._lock:
            if self.running:
                return
            self._stop_event = threading.Event()
            ready = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop_event, ready), name="thpguard-guard",
                daemon=True,
            )
            self._thread.start()
            # Thread.start() returns before the new thread has registered
            # itself under threading's internal lock; a fork that bypasses
            # Python in that window would leave the lock held in the child.
            ready.wait(_JOIN_TIMEOUT)

    def _halt(self) -> None:
        thread, stop = self._thread, self._stop_event
        if thread is None:
            return
        stop.set()
        self._wake.set()
        with self._tick_done:
            self._tick_done.notify_all()
        if thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                log.error("the guard thread did not stop within %.0f s", _JOIN_TIMEOUT)
                return
            _wait_task_gone(thread.native_id)
        self._thread = self._stop_event = None

    # -- fork ------------------------------------------------------------------

    def _pause_for_fork(self) -> None:
        with self._lock:
            self._halt()

    def _resume_in_parent(self) -> None:
        """Start the thread again once ``fork()`` has returned to its caller.

        Python 3.13 checks whether the parent is multi-threaded (and warns)
        after the at-fork hooks have run (Modules/posixmodule.c,
        warn_about_fork_with_threads), so a thread started here would
        trigger the warning. A one-shot profile function waits for the first
        event in the frame that called fork() (its ``c_return``), starts
        the thread and removes itself. Where a profiler is already set, the
        thread starts at once instead.
        """
        if not self._wanted:
            return
        frame = sys._getframe()
        while frame is not None and frame.f_code is not _fork._after_in_parent.__code__:
            frame = frame.f_back
        caller = frame.f_back if frame is not None else None
        if caller is None or sys.getprofile() is not None:
            # Never displace a profiler: start now (3.13 may then warn).
            self._start()
            return

        def profile(frame, event, arg):
            at = caller
            while at is not None and at is not frame:
                at = at.f_back
            if at is None:
                return  # still inside the fork hooks
            sys.setprofile(None)
            if self._wanted:
                self._start()

        sys.setprofile(profile)

    def _restart_in_child(self) -> None:
        # The parent's thread does not exist here; after a fork that
        # bypassed Python it may even have held our locks: replace them.
        self._fresh_locks()
        self._wake = threading.Event()
        self._thread = self._stop_event = None
        if self._wanted:
            self._start()

    # -- work ------------------------------------------------------------------

    def _run(self, stop: threading.Event, ready: threading.Event) -> None:
        ready.set()
        next_full = 0.0
        while not stop.is_set():
            now = time.monotonic()
            full = now >= next_full
            if full:
                next_full = now + self.interval
            cpu = time.thread_time()
            try:
                hot = self._tick(full, stop)
            except Exception:  # the guard must outlive any one bad tick
                log.exception("guard tick failed")
                hot = False
            if full and pagemap.scan_supported() is False:
                # Each smaps read walks every VMA's page tables (Linux < 6.7
                # has no PAGEMAP_SCAN): stretch the interval so full ticks
                # take at most _SMAPS_CPU_SHARE of a core.
                spent = time.thread_time() - cpu
                next_full = max(next_full, now + spent / _SMAPS_CPU_SHARE)
            wait = next_full - time.monotonic()
            if hot:
                wait = min(wait, self.hot_interval)
            self._wake.wait(max(0.0, wait))
            self._wake.clear()

    def _tick(self, full: bool, stop: threading.Event) -> bool:
        """One scan-and-repair pass; True when hot regions are watched."""
        cpu0 = time.thread_time()
        _fork.check()
        now = time.monotonic()
        with _hot_lock:
            hot_set = {r for r, w in _hot_watches.items() if w} if _hot_watches else set()
        if full:
            # Hot regions first: they get the repair budget before the rest.
            regions = sorted(_region.regions(), key=lambda r: r not in hot_set)
        else:
            regions = [r for r in _region.regions() if r in hot_set]
        budget = self.max_repair_bytes
        for region in regions:
            if stop.is_set():
                break
            st = _state(region)
            cov = _scan(region, st, now)
            if cov is None:
                continue
            watches = _watches(region) if hot_set else ()
            for watch in watches:
                watch.observe(now, cov.total_bytes - cov.huge_bytes)
            if st.disabled or now < st.backoff_until or cov.complete:
                continue
            done, used = _repair(
                region, st, cov, budget, chunk=self.chunk,
                backoff_initial=self.backoff_initial, backoff_max=self.backoff_max,
                eagain_ticks=self.eagain_ticks, stop=stop,
            )
            budget -= used
            if done.blocks:
                left = cov.total_bytes - cov.huge_bytes - done.blocks * region.pmd_size
                for watch in watches:
                    watch.observe(time.monotonic(), max(0, left))
        with _counters.lock:
            _counters.tick_cpu_seconds += time.thread_time() - cpu0
            if full:
                _counters.ticks += 1
            else:
                _counters.hot_ticks += 1
        if full:
            with self._tick_done:
                self._tick_done.notify_all()
        return bool(hot_set)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<thpguard.Guard {state} pid={os.getpid()} interval={self.interval}>"


_current: Optional[Guard] = None
_install_lock = threading.RLock()


def install(
    interval: Optional[float] = None,
    *,
    hot_interval: Optional[float] = None,
    max_repair_bytes: Optional[int] = None,
    chunk: Optional[int] = None,
    backoff_initial: Optional[float] = None,
    backoff_max: Optional[float] = None,
    eagain_ticks: Optional[int] = None,
    on_event: Optional[Callable[[Event], None]] = None,
) -> Guard:
    """Start the guard of this process, or return the running one.

    Idempotent: a second call returns the same :class:`Guard`, with the
    arguments it was given (those not None) applied. ``interval`` is the
    seconds between full scans (default 0.05); ``hot_interval`` between
    scans of regions inside :func:`hot` (default 0.01);
    ``max_repair_bytes`` caps the bytes handed to MADV_COLLAPSE per tick
    (default 64 MiB); ``chunk`` the bytes per MADV_COLLAPSE call (default
    one PMD block, 2 MiB); ``backoff_initial``/``backoff_max`` (0.1 s / 10 s)
    bound the exponential back-off after ENOMEM, EBUSY or ``eagain_ticks``
    (20) ticks of EAGAIN in a row; ``on_event`` receives every
    :class:`Event`. Invalid values raise
    :class:`~thpguard.errors.InvalidArgumentError` or
    :class:`~thpguard.errors.InvalidTypeError`.
    """
    global _current
    settings = dict(
        interval=interval, hot_interval=hot_interval, max_repair_bytes=max_repair_bytes,
        chunk=chunk, backoff_initial=backoff_initial, backoff_max=backoff_max,
        eagain_ticks=eagain_ticks, on_event=on_event,
    )
    _fork.check()
    with _install_lock:
        current = _current if _current is not None else Guard()
        current._configure(**settings)
        current._wanted = True
        _current = current
        current._start()
        return current


def guard() -> Optional[Guard]:
    """The guard installed in this process, or None."""
    _fork.check()
    return _current


# -- fork hooks ----------------------------------------------------------------------


def _before_fork() -> None:
    current = _current
    if current is not None:
        current._pause_for_fork()


def _after_fork_in_parent() -> None:
    with _counters.lock:
        _counters.forks_seen += 1
    current = _current
    if current is not None:
        current._resume_in_parent()


def _after_fork_in_child(late: bool = False) -> None:
    global _counters, _states, _states_lock, _hot_lock, _install_lock
    # New locks first: after a fork that bypassed Python another thread may
    # have held the old ones at the moment of fork.
    _counters = _Counters()
    _states_lock = threading.Lock()
    _states = weakref.WeakKeyDictionary()
    _hot_lock = threading.Lock()
    _install_lock = threading.RLock()
    for watches in list(_hot_watches.values()):
        for watch in watches:
            watch._lock = threading.Lock()
    if _fork.in_exec_child():
        return  # subprocess with preexec_fn: exec replaces this process
    current = _current
    if current is not None:
        current._restart_in_child()
    how = "outside Python's fork hooks, noticed late" if late else "os.fork"
    state = "not installed" if current is None else (
        "restarted" if current.running else "stopped")
    _emit(Event(FORK, os.getpid(), time.time(),
                reason=f"new child process ({how}); guard {state}"))


_fork.subscribe(
    "guard",
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
    order=-100,  # stop first before fork, start last after it
)


def _stop_at_exit() -> None:
    current = _current
    if current is not None:
        with current._lock:
            current._halt()


atexit.register(_stop_at_exit)


# -- stats -------------------------------------------------------------------------------


def stats() -> Stats:
    """Process-wide counters of the guard and of :func:`hot` (see :class:`Stats`).

    Region sizes and huge bytes are measured now; the rest counts since this
    process started (a child starts from zero). Works without a guard.
    """
    _fork.check()
    regions = _region.regions()
    guarded = huge = split = 0
    for region in regions:
        try:
            cov = pagemap.coverage(region.address, region.address + region.size, region.pmd_size)
        except (OSError, RegionClosedError):
            continue
        guarded += cov.total_bytes
        huge += cov.huge_bytes
        split += cov.split_bytes or 0
    with _states_lock:
        states = list(_states.items())
    now = time.monotonic()
    current = _current
    c = _counters
    with c.lock:
        return Stats(
            pid=os.getpid(),
            guard_running=bool(current is not None and current.running),
            interval=current.interval if current is not None else None,
            regions=len(regions),
            guarded_bytes=guarded,
            huge_bytes=huge,
            split_bytes=split,
            ticks=c.ticks,
            hot_ticks=c.hot_ticks,
            tick_cpu_seconds=c.tick_cpu_seconds,
            scan_seconds=c.scan_seconds,
            scan_failures=c.scan_failures,
            splits_detected=c.splits_detected,
            repairs=c.repairs,
            bytes_repaired=c.bytes_repaired,
            repair_seconds=c.repair_seconds,
            last_repair_seconds=c.last_repair_seconds,
            last_repair_latency_seconds=c.last_repair_latency_seconds,
            repair_failures=dict(c.repair_failures),
            backoffs=c.backoffs,
            regions_backing_off=sum(1 for r, st in states if st.backoff_until > now and not r.closed),
            regions_disabled={hex(r.address): st.disabled for r, st in states
                              if st.disabled and not r.closed},
            forks_seen=c.forks_seen,
            callback_errors=c.callback_errors,
            copy_fallbacks=_region.copy_counters["copy_fallbacks"],
            copy_wait_timeouts=_region.copy_counters["copy_wait_timeouts"],
        )


# -- hot buffers -----------------------------------------------------------------------------


class _HotWatch:
    """Collects what happens to one region during one hot() block."""

    def __init__(self, not_huge: int) -> None:
        self._lock = threading.Lock()
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


def _absent_blocks(region: Region) -> List[int]:
    """Blocks of ``region`` holding no data (never touched, or the zero page)."""
    start, end, pmd = region.address, region.address + region.size, region.pmd_size
    try:
        runs = _native.pagemap_scan(pagemap._self_pagemap.fd(), start, end)
    except KernelCallError as exc:
        if exc.errno != _errno.ENOTTY:
            raise
        # No PAGEMAP_SCAN (Linux < 6.7): only an entirely empty region is known.
        cov = pagemap.smaps_coverage(start, end, pmd)
        return list(range(start, end, pmd)) if cov.present_bytes == 0 else []
    touched = set()
    data = _native.PAGE_IS_PRESENT | _native.PAGE_IS_SWAPPED
    for lo, hi, cats in runs:
        if cats & data and not cats & _native.PAGE_IS_PFNZERO:
            first = start + (lo - start) // pmd * pmd
            touched.update(range(first, hi, pmd))
    return [b for b in range(start, end, pmd) if b not in touched]


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
        with _hot_lock:
            _hot_watches.setdefault(region, []).append(watch)
        self._entered = time.perf_counter()
        current = _current
        self._watched = current is not None and current.running
        if self._watched:
            current._wake.set()  # the faster hot interval applies at once
        return region

    @staticmethod
    def _make_huge(region: Region) -> Tuple[int, int, float, Coverage]:
        """Populate never-touched blocks, collapse split ones; what it took."""
        started = time.perf_counter()
        st = _state(region)
        st.disabled = None  # entering hot() is the documented way to retry
        st.backoff_until = 0.0
        absent = _absent_blocks(region)
        for block in absent:
            # Only blocks without data: populating a block shared after fork
            # would split it (KERNEL-NOTES, Populating).
            _native.populate_write(block, region.pmd_size, _region._PAGE)
        cov = _scan(region, st, time.monotonic())
        repaired = 0
        for _ in range(_HOT_ENTRY_ATTEMPTS):
            if cov is None or cov.complete or not _region._collapse_known():
                break
            done, _ = _repair(
                region, st, cov, region.size, chunk=8 * region.pmd_size,
                backoff_initial=DEFAULT_BACKOFF_INITIAL, backoff_max=DEFAULT_BACKOFF_MAX,
                eagain_ticks=_HOT_ENTRY_ATTEMPTS + 1,
            )
            repaired += done.blocks * region.pmd_size
            st.backoff_until = 0.0
            cov = _scan(region, st, time.monotonic())
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
            exit_cov = _scan(region, _state(region), time.monotonic())
        with _hot_lock:
            watches = _hot_watches.get(region, [])
            if watch in watches:
                watches.remove(watch)
        watched = self._watched and _current is not None and _current.running
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


# -- environment --------------------------------------------------------------------------

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _install_from_environment() -> Optional[Guard]:
    """Install the guard when ``THPGUARD_GUARD`` asks for it; never raises."""
    raw = os.environ.get(ENV_GUARD, "").strip().lower()
    if raw in _FALSE:
        return None
    if raw not in _TRUE:
        log.error("%s=%r not understood: expected 1 or 0 (or true/false, yes/no, on/off); "
                  "the guard stays off", ENV_GUARD, os.environ.get(ENV_GUARD))
        return None
    interval = DEFAULT_INTERVAL
    raw_interval = os.environ.get(ENV_GUARD_INTERVAL, "").strip()
    if raw_interval:
        try:
            interval = _check_seconds(ENV_GUARD_INTERVAL, float(raw_interval))
        except ValueError as exc:
            problem = str(exc) if isinstance(exc, InvalidArgumentError) else (
                f"{ENV_GUARD_INTERVAL} must be a number of seconds, got {raw_interval!r}")
            log.error("%s; using the default, %s s", problem, DEFAULT_INTERVAL)
            interval = DEFAULT_INTERVAL
    try:
        return install(interval)
    except Exception:  # the importing service must keep running
        log.exception("could not install the guard from %s", ENV_GUARD)
        return None
