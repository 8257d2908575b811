"""The open regions of this process, and what a fork does to them.

Below :mod:`thpguard.region`: it keeps the per-process set of open regions
(a child keeps them, with fresh locks) and the fork handling of the region
layer: the ``copy`` hand-shake (a pipe made before fork that the child
closes once its copy mechanism is done), ``private`` bookkeeping, and the
serialisation of forks from several threads. The copy itself is the
region's :class:`~thpguard.backends.CopyMechanism`; the child checks its
memory cgroup's room before a copy, and the parent waits for the copy a
bounded time (:data:`~thpguard.backends.COPY_WAIT_SECONDS`). It also
unmaps a closed region only where its range is still all the region's
(:func:`unmap_region`).
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

from . import _fork, _native, backends, events, kernel
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
    for r, m in targets:
        # From this fork on, the handler of each side may put copied blocks
        # into the range as VMAs of their own (outside_change).
        if m.name == "userfault" and getattr(r, "_moves_vmas", True):
            r._blocks_moved_in = True
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
    limit = backends.copy_wait_limit([r for r, m in getattr(fs.pending, "targets", [])
                                      if m.parent_waits(r)])
    fs.pending.pipe, fs.pending.targets = None, []  # hold no region alive
    fs.pending.prepared = False
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
            # The parent did not wait for us (a fork from C; or uWSGI
            # without py-call-uwsgi-fork-hooks: py-call-osafterfork alone
            # runs the child's hooks but not the parent's before-fork
            # ones), but copying still ends our
            # sharing, so neither side splits from now on.
            targets = [(r, mechanism_for(r)) for r in _live().regions
                       if r.fork == "copy" and not r.closed]
        if exec_child:
            return
        # Only a copy at fork needs room: a lazy copy charges block by block
        # on write (and reading the cgroup costs a child milliseconds).
        room = _cgroup_room() if any(m.charge(r) for r, m in targets) else None
        for region, mechanism in targets:
            if region.closed:
                continue
            charge = mechanism.charge(region)
            if room is not None and charge and charge + backends.COPY_HEADROOM_MARGIN > room[0]:
                # The copy is charged to the cgroup: beyond its limit the kernel
                # OOM-kills this child (or, OOM killer disabled, stops it and
                # its waiting parent until the limit rises).
                events.counters().add(copy_fallbacks=1)
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
            events.counters().add(copy_wait_timeouts=1)
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


def unmap_region(region) -> None:
    """Unmap ``region``'s mapping (for close(), under its lock), unless part
    of its range is no longer the region's: then keep every byte mapped, for
    the life of the process (unmapping would take the other mapping with
    it), and log one ERROR.

    Raises :class:`BufferError` (and unmaps nothing) while a view still
    exports the mapping.
    """
    change = None if region._unmapped_here else outside_change(region)
    if change is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(region._map))
        _abandoned.append(region._map)
        base = region.address - region._offset
        end = base + len(region._map)
        try:
            spans = kernel.mapped_ranges(base, end, roots=kernel.Roots())
        except OSError:
            spans = []
        kept = sum(min(b, end) - max(a, base) for a, b in spans)
        log.error("region %#x (%d bytes) is closed but not unmapped: %s. The %d bytes still "
                  "mapped in its range %#x-%#x (%d mappings, any in the hole included) stay "
                  "mapped until the process exits: the region's mapping can only be unmapped "
                  "as that one range, and that would also unmap whatever is mapped in the "
                  "hole then (by this or another thread). Nothing needs doing for the data: the "
                  "program keeps running correctly, and only these bytes stay in use; if it "
                  "repeats, find the code that unmaps or maps over thpguard regions (munmap, "
                  "mmap with MAP_FIXED) and make it leave them alone", region.address, region.size, change,
                  kept, base, end, len(spans))
        return
    try:
        region._map.close()
    except BufferError:
        # A child of a `private` region: views inherited from the parent are
        # unusable here anyway; the mmap object unmaps the reservation once
        # they are gone.
        if not region._unmapped_here:
            raise BufferError(
                "cannot close the region: memoryviews or arrays made from region.view() still "
                "use it; release them (del, or memoryview.release()) and close again") from None


# VmFlags a piece of a region may have apart from its other pieces: set by
# mprotect(), mlock() or madvise() on part of it (soft-dirty does not stop a
# merge). Any other difference, or none at all, between two pieces that
# touch means one of them is another mapping.
_PIECE_FLAGS = frozenset({"rd", "wr", "ex", "lo", "lf", "sd", "hg", "nh", "mg", "dc", "dd", "wf",
                          "sr", "rr"})


def outside_change(region) -> Optional[str]:
    """None while the region's mapping is as thpguard made it, as far as
    ``/proc/self/maps`` and smaps VmFlags tell; else a sentence naming the
    hole or the mapping that is not the region's.

    Splits by ``mprotect``/``mlock`` keep the range the region's. A region
    mapped by :func:`~thpguard._native.map_unmergeable` never merges with a
    mapping placed into a hole of it (same flags or not), so one VMA over
    exactly the range is the region's, and two pieces that touch but did
    not merge although they differ in nothing a merge looks at cannot both
    be the region's. Not seen: a mapping placed over the one-page slack
    around the range; another mapping that differs from a piece of the
    region only in protection, mlock or huge page advice; and a region whose
    VMA could merge (``map_unmergeable`` failed, a hugetlb region); and in a
    lazy ``copy`` region that has been through a fork where the handlers put
    copied blocks in with mremap (no UFFDIO_MOVE: Linux before 6.8), as VMAs
    of their own, a mapping of whole blocks that differs from the region's
    pieces only in what a merge ignores.
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
    pieces = [v for v in smaps if v.start < hi and v.end > lo]
    for vma in pieces:
        if vma.start < lo or vma.end > hi:
            return f"{vma.start:#x}-{vma.end:#x} crosses the region's edge (not the region's)"
        if region._advised and not {"hg", "nh"} & set(vma.vm_flags):
            return (f"{vma.start:#x}-{vma.end:#x} is not the region's (no MADV_HUGEPAGE): "
                    "mapped there after outside code unmapped part of the region")
    if not getattr(region, "_unmergeable", False):  # set by Region._setup (THP)
        return None
    fixed = {frozenset(set(v.vm_flags) - _PIECE_FLAGS) for v in pieces}
    if len(fixed) > 1:
        return ("the region's range holds mappings with different VmFlags ("
                + ", ".join(f"{v.start:#x}-{v.end:#x}: {' '.join(v.vm_flags)}" for v in pieces)
                + "): one of them is not the region's")
    # The blocks the userfaultfd handler copies after a fork with mremap
    # are VMAs of their own that never merge back, each a whole block:
    # pieces alike may meet at a block's edge there, and nowhere else.
    moved = getattr(region, "_blocks_moved_in", False)
    for a, b in zip(pieces, pieces[1:]):
        if moved and (b.start - region.address) % region.pmd_size == 0:
            continue
        if a.end == b.start and a.perms == b.perms and set(a.vm_flags) - {"sd"} == set(b.vm_flags) - {"sd"}:
            return (f"{b.start:#x}-{b.end:#x} did not merge with {a.start:#x}-{a.end:#x} although "
                    "nothing tells them apart: one is another mapping, placed there after outside "
                    "code unmapped part of the region")
    return None


_fork.subscribe(
    "region",
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
    order=10,
)
