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
from . import _fork, _native, events
from .backends import HugetlbCopy, become_thp, mechanism_for, pool_shortfall

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
    targets += _share_downgrades()
    if any(m.parent_waits(r) for r, m in targets):
        fs.pending.pipe = os.pipe()
    fs.pending.targets = targets
    fs.pending.prepared = True


def _share_downgrades() -> list:
    """hugetlb ``share`` regions this fork must copy into the child instead.

    After fork, a write to a shared hugetlb page by either side copies the
    whole page, and that copy needs a free pool page, as does the child's
    first touch of a page the parent never faulted (Linux 6.18, measured):
    a child that finds none dies of SIGBUS, and a parent that finds none
    takes the page away from its children (they die of SIGBUS on their next
    access). So before
    the fork the pages of the ``share`` regions (what the fork may have to
    copy or fault), plus the pages the child takes for its ``copy`` and
    ``wipe`` hugetlb regions, are held against the pages the pool and the
    hugetlb cgroup can still give; where they do not cover them, the child copies
    those regions into THP pages of its own while the parent waits (as
    ``copy`` does): then no page is shared and nobody needs a pool page.
    """
    by_size: dict = {}
    child_pages: dict = {}  # pool pages the child takes for copy and wipe regions
    for r in regions():
        if r.backend != "hugetlb":
            continue
        if r.fork == "share":
            by_size.setdefault(r.page_size, []).append(r)
        elif r.fork in ("copy", "wipe"):
            child_pages[r.page_size] = child_pages.get(r.page_size, 0) + r.size // r.page_size
    out = []
    for page_size, group in by_size.items():
        # Every page counts, populated or not: the child has no reservation
        # (the parent owns it), so its first touch of a page the parent never
        # faulted takes a fresh pool page too, or dies of SIGBUS (measured).
        populated = [(r, r.size // page_size) for r in group]
        shared = sum(n for _, n in populated)
        # Each process still sharing these pages (children, grandchildren, the
        # parent that forked us) may copy each of them once more.
        sharers = _children_sharing([r.address for r in group]) if shared else 0
        need = shared * (1 + sharers) + child_pages.get(page_size, 0)
        why = pool_shortfall(page_size, need) if shared else None
        for r, n in populated:
            r.fork_downgraded = None
            if why is None or not n:
                continue
            r.fork_downgraded = (
                f"fork copied this share region into the child (THP): writes to the {shared} "
                f"shared pages (by this child and {sharers} other process(es) still sharing them) "
                f"and the child's copy and wipe regions could need {need} pool pages: {why}")
            log.error("hugetlb share region %#x: %s", r.address, r.fork_downgraded)
            try:
                # The child's copy reads every page: fault the missing ones in
                # here, from the parent's reservation (a read never copies a
                # page an earlier child shares), or the child's read of them
                # needs a pool page it cannot have.
                _native.madvise(r.address, r.size, _native.MADV_POPULATE_READ)
            except OSError as exc:
                log.error("hugetlb share region %#x: could not fault it in: %s", r.address, exc)
            events.counters().add(hugetlb_fork_downgrades=1)
            out.append((r, HugetlbCopy(pool=False)))
    return out


def _children_sharing(addresses) -> int:
    """How many other live processes of this process's fork family (its
    descendants, and its ancestors that still map the ranges with theirs)
    map one of the hugetlb ranges starting at ``addresses`` (their maps):
    a grandchild shares the pages as much as a child does; 0 where the
    kernel does not list children (CONFIG_PROC_CHILDREN)."""
    starts = set(addresses)

    def maps_one(pid) -> bool:
        try:
            with open(f"/proc/{pid}/maps") as f:
                return any("anon_hugepage" in line and int(line.split("-", 1)[0], 16) in starts
                           for line in f)
        except (OSError, ValueError):
            return False  # exited meanwhile, or not ours to read

    def children(pid) -> set:
        out: set = set()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return out
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.update(int(c) for c in f.read().split())
            except (OSError, ValueError):
                continue
        return out

    me = top = os.getpid()
    while True:  # climb to the oldest ancestor still mapping the pages
        try:
            with open(f"/proc/{top}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if ppid <= 1 or not maps_one(ppid):
            break
        top = ppid
    count, seen, todo = 0, {top}, [top]
    while todo:
        pid = todo.pop()
        if pid != me and maps_one(pid):
            count += 1
        for c in children(pid) - seen:
            seen.add(c)
            todo.append(c)
    return count


def _wipe_in_child(region) -> None:
    """Map a fresh zeroed range over a hugetlb ``wipe`` region's placeholder:
    hugetlb pages where the pool has them, else THP."""
    backend = region._backend
    try:
        _native.map_flags(region.address, region.size, backend.flags())
        return
    except OSError as exc:
        why = f"no hugetlb pages for the wiped copy in this child ({exc})"
    _native.map_flags(region.address, region.size, 0)
    become_thp(region, why)


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
    exec_child = _fork.in_exec_child()  # exec replaces the process: no work for it
    for region in list(_live().regions):
        region._lock = threading.Lock()
        if region.fork == "private" and not region._closed:
            region._unmapped_here = True
        if region.fork == "wipe" and region.backend == "hugetlb" and not region._closed \
                and not exec_child:
            try:
                _wipe_in_child(region)
            except OSError as exc:
                # The placeholder stays: any access fails loudly, never stale data.
                log.error("wipe policy: region %#x has no mapping in pid %d: %s",
                          region.address, os.getpid(), exc)
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
        if exec_child:
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
