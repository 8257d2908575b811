"""The open regions of this process, and what a fork does to them.

Below :mod:`thpguard.region`: it keeps the per-process set of open regions
(a child keeps them, with fresh locks) and the fork handling of the region
layer: the ``copy`` hand-shake (a pipe made before fork that the child
closes once its copy mechanism is done), ``private`` bookkeeping, and the
serialisation of forks from several threads. The copy itself is the
region's :class:`~thpguard.backends.CopyMechanism`.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from . import _fork
from .backends import mechanism_for

__all__ = ["regions"]

log = logging.getLogger("thpguard")


class _Live:
    """This process's open regions; a child keeps them, with fresh locks."""

    def __init__(self, regions=()) -> None:
        self.lock = threading.Lock()
        self.regions: weakref.WeakSet = weakref.WeakSet(regions)

    def for_child(self) -> "_Live":
        return _Live(list(self.regions))


def _live() -> _Live:
    return _fork.state.get("region.live", _Live, _Live.for_child)


def regions() -> list:
    """The open regions of this process."""
    live = _live()
    with live.lock:
        return [r for r in live.regions if not r.closed]


# -- fork handling ------------------------------------------------------------


class _ForkState:
    """The `copy` hand-shake of one fork, in the forking process."""

    def __init__(self) -> None:
        self.pending = threading.local()
        # Held from before fork() to after it, so forks from several threads
        # run one at a time: a child forked by another thread meanwhile would
        # inherit the hand-shake pipe and keep this parent waiting until it exits.
        self.serial = threading.Lock()

    def for_child(self) -> "_ForkState":
        child = _ForkState()
        child.pending.pipe = getattr(self.pending, "pipe", None)
        child.pending.targets = getattr(self.pending, "targets", [])
        child.pending.prepared = getattr(self.pending, "prepared", False)
        return child


def _fork_state() -> _ForkState:
    return _fork.state.get("region.fork", _ForkState, _ForkState.for_child)


def _before_fork() -> None:
    """Prepare the `copy` hand-shake: a pipe the child closes when done."""
    fs = _fork_state()
    fs.serial.acquire()
    fs.pending.pipe = None
    targets = [r for r in regions() if r.fork == "copy"]
    targets = [(r, mechanism_for(r)) for r in targets]
    if any(m.parent_waits(r) for r, m in targets):
        fs.pending.pipe = os.pipe()
    fs.pending.targets = targets
    fs.pending.prepared = True


def _after_fork_in_parent() -> None:
    fs = _fork_state()
    pipe = getattr(fs.pending, "pipe", None)
    fs.pending.pipe, fs.pending.targets = None, []  # hold no region alive
    fs.pending.prepared = False
    try:
        if pipe is None:
            return
        read_end, write_end = pipe
        os.close(write_end)
        try:
            # Until the child has copied, a write here would split the pages
            # it still shares (the `copy` race, docs/kernel-facts.rst); EOF if it dies.
            while os.read(read_end, 64):
                pass
        finally:
            os.close(read_end)
    finally:
        if fs.serial.locked():
            fs.serial.release()


def _after_fork_in_child(late: bool = False) -> None:
    fs = _fork_state()  # made for this child by the fork layer
    for region in list(_live().regions):
        region._lock = threading.Lock()
        if region.fork == "private" and not region._closed:
            region._unmapped_here = True
    pipe = getattr(fs.pending, "pipe", None)
    targets = getattr(fs.pending, "targets", [])
    prepared = getattr(fs.pending, "prepared", False)
    fs.pending.pipe, fs.pending.targets, fs.pending.prepared = None, [], False
    try:
        if late or not prepared:
            # The parent did not wait for us (a fork from C; or uWSGI's
            # py-call-osafterfork, which runs the child's hooks but not the
            # parent's before-fork ones), but copying still ends our
            # sharing, so neither side splits from now on.
            targets = [(r, mechanism_for(r)) for r in _live().regions
                       if r.fork == "copy" and not r.closed]
        if _fork.in_exec_child():
            return
        for region, mechanism in targets:
            if region.closed:
                continue
            try:
                mechanism.in_child(region)
            except OSError as exc:
                # The old mapping is untouched: data stays right, still shared.
                log.error("copy policy: region %#x stays shared in pid %d: %s",
                          region.address, os.getpid(), exc)
    finally:
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])


_fork.subscribe(
    "region",
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
    order=10,
)
