"""What the repair engine saw and did: :class:`Event`, the counters, and who listens.

The engine emits each event once, here. :func:`emit` logs it, then calls
every subscriber: :func:`subscribe` adds one for good (the metrics
histogram, the ``on_event`` callback of :func:`thpguard.install`), and a
:func:`thpguard.hot` block watches its own region the same way. Nothing
rewires another module's callback. Subscribers and counters are
per-process state of the fork layer: a child starts with fresh counters
and keeps the subscribers.
"""

from __future__ import annotations

import errno as _errno
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from . import _fork

__all__ = ["Event", "SPLIT", "REPAIRED", "FAILED", "BACKOFF", "DISABLED", "FORK",
           "subscribe", "unsubscribe", "emit", "counters"]

log = logging.getLogger("thpguard")

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


def errname(err: int) -> str:
    return _errno.errorcode.get(err, str(err))


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
    ``disabled`` and ``backoff``; a ``disabled`` event with ``blocks`` > 0
    concerns those blocks only (the rest of the region is still repaired),
    with ``blocks`` 0 the whole region. ``time`` is :func:`time.time`.
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
            if self.blocks:
                return f"{where}{self.blocks} block(s) not repaired for now: {self.reason}"
            return f"{where}no longer repaired: {self.reason}"
        return f"pid {self.pid}: {self.reason}"


class Counters:
    """Process-wide counters of the repair engine; a child starts with fresh ones."""

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
        self.hugetlb_fork_downgrades = 0
        self.callback_errors = 0

    def add(self, **amounts) -> None:
        with self.lock:
            for name, value in amounts.items():
                setattr(self, name, getattr(self, name) + value)

    def count_failures(self, failures: Dict[str, int]) -> None:
        with self.lock:
            for name, n in failures.items():
                self.repair_failures[name] = self.repair_failures.get(name, 0) + n


def counters() -> Counters:
    """This process's counters."""
    return _fork.state.get("events.counters", Counters)


Listener = Callable[[Event], None]


class _Subscribers:
    def __init__(self, listeners: Optional[List[Tuple[Listener, object]]] = None) -> None:
        self.lock = threading.Lock()
        self.listeners: List[Tuple[Listener, object]] = list(listeners or ())

    def for_child(self) -> "_Subscribers":
        return _Subscribers(self.listeners)


def _subscribers() -> _Subscribers:
    return _fork.state.get("events.subscribers", _Subscribers, _Subscribers.for_child)


def subscribe(listener: Listener, address: Optional[int] = None) -> None:
    """Call ``listener(event)`` for every event (of the region at ``address``
    only, when given). Idempotent; called in the thread that emits (the
    guard thread, mostly): keep it short."""
    subs = _subscribers()
    with subs.lock:
        if (listener, address) not in subs.listeners:
            subs.listeners.append((listener, address))


def unsubscribe(listener: Listener, address: Optional[int] = None) -> None:
    subs = _subscribers()
    with subs.lock:
        if (listener, address) in subs.listeners:
            subs.listeners.remove((listener, address))


def emit(event: Event) -> None:
    """Log an event, then hand it to every subscriber. Counters come first
    (the engine updates them before it emits)."""
    level = _LEVELS.get(event.kind, logging.INFO)
    if event.kind == FAILED and set(event.failures) == {"EAGAIN"}:
        level = logging.INFO
    log.log(level, "%s", event.describe())
    subs = _subscribers()
    with subs.lock:
        listeners = list(subs.listeners)
    for listener, address in listeners:
        if address is not None and address != event.address:
            continue
        try:
            listener(event)
        except Exception:
            counters().add(callback_errors=1)
            log.exception("thpguard event listener %r failed on a %s event", listener, event.kind)
