"""The guard's per-process state: each region's repair state, and the
watchers of :func:`thpguard.hot` blocks.

Kept in the fork layer's per-process state: a child keeps the installed
guard (and restarts it) and its hot() watchers (with fresh locks); the
repair state starts over, since the child's splits are its own.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Optional

from . import _fork, events
from .blocks import Coverage
from .repair import RepairEngine, RepairState

log = logging.getLogger("thpguard")


class _GuardState:
    """The guard's per-process state: the installed guard (a child keeps it
    and restarts it), each region's repair state and watchers (fresh)."""

    def __init__(self, current: "Optional[object]" = None, watches=None) -> None:
        self.install_lock = threading.RLock()
        self.current = current
        self.lock = threading.Lock()
        self.states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.watches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary(
            watches or {})

    def for_child(self) -> "_GuardState":
        # hot() blocks keep watching in the child (with fresh locks); the
        # repair state starts over: the child's splits are its own.
        for watchers in list(self.watches.values()):
            for watcher in watchers:
                watcher.for_child()
        return _GuardState(self.current, dict(self.watches))


def _gs() -> _GuardState:
    return _fork.state.get("guard", _GuardState, _GuardState.for_child)


def state_of(region) -> RepairState:
    """The repair state of ``region`` in this process."""
    gs = _gs()
    with gs.lock:
        st = gs.states.get(region)
        if st is None:
            st = gs.states[region] = RepairState()
        return st


def states() -> list:
    gs = _gs()
    with gs.lock:
        return list(gs.states.items())


def watch(region, watcher) -> None:
    """Have ``watcher.observe(now, not_huge_bytes)`` called on each scan of
    ``region`` and its repairs made first (a :func:`hot` block)."""
    gs = _gs()
    with gs.lock:
        gs.watches.setdefault(region, []).append(watcher)
    current = gs.current
    if current is not None and current.running:
        current._wake.set()  # the faster hot interval applies at once


def unwatch(region, watcher) -> None:
    gs = _gs()
    with gs.lock:
        watchers = gs.watches.get(region, [])
        if watcher in watchers:
            watchers.remove(watcher)


def _watchers(region) -> list:
    gs = _gs()
    with gs.lock:
        return list(gs.watches.get(region, ()))


def _hot_regions() -> set:
    gs = _gs()
    with gs.lock:
        return {r for r, w in gs.watches.items() if w}


def scan(region, st: RepairState, engine: RepairEngine, now: float) -> Optional[Coverage]:
    """Coverage of ``region`` now, with new splits recorded. None if it
    cannot be read (counted and logged)."""
    c = events.counters()
    started = time.perf_counter()
    try:
        cov = region._backend.coverage(region)
    except OSError as exc:
        c.add(scan_failures=1)
        log.warning("region %#x: coverage scan failed: %s", region.address, exc)
        return None
    finally:
        c.add(scan_seconds=time.perf_counter() - started)
    engine.observe(st, cov, region.address, now)
    return cov
