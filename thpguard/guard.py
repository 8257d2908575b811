"""The guard: automatic split repair in every process.

:func:`install` starts one background thread per process that scans every
open region each tick and hands what it finds to the repair engine
(:mod:`thpguard.repair`), which re-collapses (``MADV_COLLAPSE``) the 2 MiB
blocks a write after fork split. It is fork-aware: the fork layer stops its
thread before ``fork()`` and starts it again after, in the parent and in the
child, so a process never forks with the guard thread running and every
child repairs its own splits with its own pagemap fd and its own counters.

:func:`thpguard.hot` (:mod:`thpguard.hot`) watches its region through
:func:`watch`; :func:`thpguard.stats` (:mod:`thpguard.stats`) reads the
counters.

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
import logging
import math
import os
import signal
import threading
import time
from typing import Callable, Iterator, Optional

from . import _fork, events, kernel, pagemap
from . import region as _region
from .backends import FALLBACK_PMD
from .events import FORK, Event
from .errors import InvalidArgumentError, InvalidTypeError
from ._guardstate import _gs, _hot_regions, _watchers, scan, state_of, states, unwatch, watch
from .repair import LocalTarget, RepairEngine, RepairPolicy

__all__ = ["Guard", "guard", "install", "watch", "unwatch", "state_of", "states", "scan"]

log = logging.getLogger("thpguard")

ENV_GUARD = "THPGUARD_GUARD"
ENV_GUARD_INTERVAL = "THPGUARD_GUARD_INTERVAL"

DEFAULT_INTERVAL = 0.05
#: Fastest rescan of regions inside a :func:`hot` block (seconds).
DEFAULT_HOT_INTERVAL = 0.01
#: Bytes the guard submits to MADV_COLLAPSE per tick (each 2 MiB costs about
#: 0.17 ms of copying, docs/kernel-facts.rst), so one tick repairs at most ~5.5 ms.
DEFAULT_MAX_REPAIR_BYTES = 64 << 20
DEFAULT_BACKOFF_INITIAL = 0.1
DEFAULT_BACKOFF_MAX = 10.0
#: Consecutive ticks a region may answer EAGAIN before it is backed off.
DEFAULT_EAGAIN_TICKS = 20

_SMAPS_CPU_SHARE = 0.05
_MIN_INTERVAL = 0.001
_MAX_INTERVAL = 3600.0
_JOIN_TIMEOUT = 5.0


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

# Signals a thread can hold back: all but the ones a fault raises in the
# thread itself (blocked, those kill the process at once).
_ALL_SIGNALS = frozenset(signal.valid_signals()) - {
    signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS}


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
        pmd = kernel.pmd_size() or FALLBACK_PMD
        self._engine = RepairEngine(LocalTarget())
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
        with self._lock:
            self._wanted = False
            self._halt()
        gs = _gs()
        with gs.install_lock:
            if gs.current is self:
                gs.current = None
            if self.on_event is not None:
                events.unsubscribe(self.on_event)

    def wait_ticks(self, n: int = 1, timeout: Optional[float] = None) -> bool:
        """Block until ``n`` more full ticks have completed; False on timeout.

        Also returns False at once if the guard is not running.
        """
        with self._tick_done:
            c = events.counters()
            target = c.ticks + n
            return self._tick_done.wait_for(
                lambda: c.ticks >= target or not self._wanted, timeout
            ) and c.ticks >= target

    @contextlib.contextmanager
    def paused(self) -> Iterator["Guard"]:
        """Stop the guard thread for the block, then start it again.

        Use it around a ``fork()`` that bypasses Python's at-fork hooks (a
        C extension, uWSGI without ``py-call-uwsgi-fork-hooks``): a thread that
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
        # No Python signal handler may run in this thread while it starts
        # the guard thread: a handler that forks (a SIGCHLD handler that
        # respawns) would run the fork's hooks between two steps of the
        # start and halt a thread that is half set up, or start a second
        # one that nothing stops. Blocking the signals is not enough (a
        # signal another thread takes runs its Python handler here at the
        # next bytecode), so the handlers are deferred until the thread
        # runs; a handler that runs after that sees a consistent guard.
        # The mask is for the new thread, which inherits it and so never
        # takes a signal meant for the program's handlers.
        with _fork.signals_deferred():
            try:
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
            except (OSError, ValueError):
                blocked = None
            try:
                self._start_blocked()
            finally:
                if blocked is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _start_blocked(self) -> None:
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
            # So wait as long as it takes (a busy machine may not schedule
            # the thread for a while), unless the thread is already gone.
            warned = False
            while not ready.wait(_JOIN_TIMEOUT) and self._thread.is_alive():
                if not warned:
                    log.warning("the guard thread has not started after %g s; "
                                "still waiting", _JOIN_TIMEOUT)
                    warned = True

    def _halt(self) -> None:
        thread, stop = self._thread, self._stop_event
        if thread is None:
            return
        stop.set()
        self._wake.set()
        with self._tick_done:
            self._tick_done.notify_all()
        if thread is not threading.current_thread():
            # Never go on (to a fork) with the thread alive: wait until it
            # is gone. A tick is bounded (the repair checks the stop event
            # between blocks), but a busy machine may take long over one.
            warned = False
            thread.join(_JOIN_TIMEOUT)
            while thread.is_alive():
                if not warned:
                    log.warning("the guard thread has not stopped after %g s; "
                                "still waiting for its tick to end", _JOIN_TIMEOUT)
                    warned = True
                thread.join(_JOIN_TIMEOUT)
            _fork.wait_task_gone(thread.native_id)
        self._thread = self._stop_event = None

    # -- fork ------------------------------------------------------------------

    def _pause_for_fork(self) -> None:
        with self._lock:
            self._halt()

    def _resume_in_parent(self) -> None:
        """Start the thread again once ``fork()`` has returned to its caller."""
        if self._wanted:
            _fork.after_fork_returns(lambda: self._wanted and self._start())

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
            if full and (pagemap.scan_supported() is False or pagemap._self_pagemap().denied):
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
        hot_set = _hot_regions()
        if full:
            # Hot regions first: they get the repair budget before the rest.
            regions = sorted(_region.regions(), key=lambda r: r not in hot_set)
        else:
            regions = [r for r in _region.regions() if r in hot_set]
        budget = self.max_repair_bytes
        policy = self.policy()
        for region in regions:
            if stop.is_set():
                break
            if not region.repairable:
                continue  # hugetlb: never split, nothing to repair
            st = state_of(region)
            cov = scan(region, st, self._engine, now)
            if cov is None:
                continue
            watchers = _watchers(region) if hot_set else ()
            for watcher in watchers:
                watcher.observe(now, cov.total_bytes - cov.huge_bytes)
            if cov.complete:
                continue
            done = self._engine.repair(
                st, cov, region.address, region.size, budget, policy, stop=stop,
                lock=region._lock, is_closed=lambda r=region: r.closed)
            budget -= done.submitted
            if done.blocks:
                left = cov.total_bytes - cov.huge_bytes - done.blocks * region.pmd_size
                for watcher in watchers:
                    watcher.observe(time.monotonic(), max(0, left))
        c = events.counters()
        with c.lock:
            c.tick_cpu_seconds += time.thread_time() - cpu0
            if full:
                c.ticks += 1
            else:
                c.hot_ticks += 1
        if full:
            with self._tick_done:
                self._tick_done.notify_all()
        return bool(hot_set)

    def policy(self) -> RepairPolicy:
        """The repair engine's settings from this guard's attributes."""
        return RepairPolicy(chunk=self.chunk, backoff_initial=self.backoff_initial,
                            backoff_max=self.backoff_max, eagain_ticks=self.eagain_ticks)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<thpguard.Guard {state} pid={os.getpid()} interval={self.interval}>"



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
    settings = dict(
        interval=interval, hot_interval=hot_interval, max_repair_bytes=max_repair_bytes,
        chunk=chunk, backoff_initial=backoff_initial, backoff_max=backoff_max,
        eagain_ticks=eagain_ticks, on_event=on_event,
    )
    _fork.check()
    gs = _gs()
    with gs.install_lock:
        current = gs.current if gs.current is not None else Guard()
        previous = current.on_event
        current._configure(**settings)
        if current.on_event is not previous and previous is not None:
            events.unsubscribe(previous)
        if current.on_event is not None:
            events.subscribe(current.on_event)
        current._wanted = True
        gs.current = current
        current._start()
        return current


def guard() -> Optional[Guard]:
    """The guard installed in this process, or None."""
    _fork.check()
    return _gs().current


# -- fork hooks ----------------------------------------------------------------------


def _before_fork() -> None:
    current = _gs().current
    if current is not None:
        current._pause_for_fork()


def _after_fork_in_parent() -> None:
    events.counters().add(forks_seen=1)
    current = _gs().current
    if current is not None:
        current._resume_in_parent()


def _after_fork_in_child(late: bool = False) -> None:
    # The fork layer has given this child fresh counters, locks and repair
    # state (a thread of the parent may have held the old locks at fork).
    if _fork.in_exec_child():
        return  # subprocess with preexec_fn: exec replaces this process
    current = _gs().current
    if current is not None:
        current._restart_in_child()
    how = "outside Python's fork hooks, noticed late" if late else "os.fork"
    state = "not installed" if current is None else (
        "restarted" if current.running else "stopped")
    events.emit(Event(FORK, os.getpid(), time.time(),
                      reason=f"new child process ({how}); guard {state}"))


_fork.subscribe(
    "guard",
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
    order=-100,  # stop first before fork, start last after it
)


def _stop_at_exit() -> None:
    current = _gs().current
    if current is not None:
        with current._lock:
            current._halt()


atexit.register(_stop_at_exit)
