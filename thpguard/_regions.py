"""The open regions of this process, and what a fork does to them.

Below :mod:`thpguard.region`: it keeps the per-process set of open regions
(a child keeps them, with fresh locks) and the fork handling of the region
layer: the ``copy`` hand-shake (a pipe made before fork that the child
closes once its copy mechanism is done), ``private`` bookkeeping, and the
serialisation of forks from several threads. The copy itself is the
region's :class:`~thpguard.backends.CopyMechanism`; the child checks its
memory cgroup's room before a copy, and the parent waits for the copy a
bounded time (:data:`~thpguard.backends.COPY_WAIT_SECONDS`). It also tells
whether a region's range is still all the region's (:func:`outside_change`).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import threading
import time
import weakref
from typing import List, Optional, Tuple

from . import _fork, backends, kernel
from .backends import mechanism_for
from .events import counters

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


def _after_fork_in_parent() -> None:
    fs = _fork_state()
    pipe = getattr(fs.pending, "pipe", None)
    limit = backends.copy_wait_limit([r for r, m in getattr(fs.pending, "targets", [])
                                      if m.parent_waits(r)])
    fs.pending.pipe, fs.pending.targets = None, []  # hold no region alive
    try:
        if pipe is None:
            return
        read_end, write_end = pipe
        os.close(write_end)
        try:
            # Until the child has copied, a write here would split the pages
            # it still shares (the `copy` race, docs/kernel-facts.rst); EOF if it
            # dies. A child that never finishes (stopped, or stuck in a memory
            # cgroup without an OOM killer) must not hold fork() forever.
            _wait_for_copy(read_end, limit)
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
    fs.pending.pipe, fs.pending.targets = None, []
    try:
        if late:
            # The parent did not wait for us, but copying still ends our
            # sharing, so neither side splits from now on.
            targets = [(r, mechanism_for(r)) for r in _live().regions
                       if r.fork == "copy" and not r.closed]
        if _fork.in_exec_child():
            return
        room = _cgroup_room() if targets else None
        for region, mechanism in targets:
            if region.closed:
                continue
            charge = mechanism.charge(region)
            if room is not None and charge and charge + backends.COPY_HEADROOM_MARGIN > room[0]:
                # The copy is charged to the cgroup: beyond its limit the kernel
                # OOM-kills this child (or, OOM killer disabled, stops it and
                # its waiting parent until the limit rises).
                counters().add(copy_fallbacks=1)
                log.error("copy policy: region %#x stays shared in pid %d: memory cgroup %s has "
                          "%d bytes of room, the copy needs %d (+%d margin)", region.address,
                          os.getpid(), room[1], max(0, room[0]), charge,
                          backends.COPY_HEADROOM_MARGIN)
                continue
            if room is not None:
                room = (room[0] - charge, room[1])
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


def _wait_for_copy(read_end: int, limit: float) -> None:
    """Read the hand-shake pipe to EOF, for ``limit`` seconds at most."""
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([read_end], [], [], left)[0]:
            counters().add(copy_wait_timeouts=1)
            log.error("copy policy: the child of pid %d has not finished copying after %.1f s; "
                      "not waiting longer (writes here may split blocks it still shares)",
                      os.getpid(), limit)
            return
        if not os.read(read_end, 64):
            return


def _cgroup_room() -> Optional[Tuple[int, str]]:
    """(bytes this process's memory cgroup can still charge, its path), or
    None without a limit."""
    try:
        cg = kernel.memory_cgroup()
    except OSError:
        return None
    room = cg.room_bytes if cg is not None else None
    return None if room is None else (room, cg.path)


# -- ranges changed by outside code ----------------------------------------------

# Mappings close() must not unmap (part of their range is not the region's
# any more). Their mmap objects would unmap the whole range when freed, even
# at interpreter exit (module globals are cleared then, and memory the
# interpreter mapped into the hole meanwhile would go): one extra reference
# that nothing releases keeps them alive until the process ends.
_abandoned: List[mmap.mmap] = []


def abandon(mapping: mmap.mmap) -> None:
    """Keep ``mapping`` mapped until the process ends."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(mapping))
    _abandoned.append(mapping)


def outside_change(region) -> Optional[str]:
    """None while the region's mapping is as thpguard made it, as far as
    ``/proc/self/maps`` and smaps VmFlags tell; else a sentence naming the
    hole or the mapping that is not the region's.

    Splits by ``mprotect``/``mlock`` keep the range the region's. Not
    seen: a mapping placed over the one-page slack around the range.
    """
    base = region.address - region._offset
    end = base + len(region._map)
    lo, hi = region.address, region.address + region.size
    vmas = kernel.mapped_ranges(base, end, roots=kernel.Roots())  # this process, never a fake tree
    gap = kernel.first_gap(vmas, base, end)
    if gap is not None:
        return f"{gap[0]:#x}-{gap[1]:#x} was unmapped by code outside thpguard"
    if (lo, hi) in vmas:
        return None  # the region's VMA, untouched
    try:
        smaps = kernel.read_smaps("self", kernel.Roots())
    except OSError:
        return None
    for vma in smaps:
        if vma.start >= hi or vma.end <= lo:
            continue
        if vma.start < lo or vma.end > hi:
            return f"{vma.start:#x}-{vma.end:#x} crosses the region's edge (not the region's)"
        if region._advised and not {"hg", "nh"} & set(vma.vm_flags):
            return (f"{vma.start:#x}-{vma.end:#x} is not the region's (no MADV_HUGEPAGE): "
                    "mapped there after outside code unmapped part of the region")
    return None


_fork.subscribe(
    "region",
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
    order=10,
)
