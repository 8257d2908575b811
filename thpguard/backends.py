"""Backends and copy mechanisms: the parts of a region that differ per mechanism.

A ``ThpBackend`` owns how a region is mapped, measured and repaired;
``HugetlbBackend`` gives the same methods for hugetlbfs pages, and
another backend plugs in with :func:`register_backend`. A :class:`CopyMechanism` says
how a ``fork="copy"`` region gets its own pages in a child; mechanisms are
tried in order (``copy_mechanisms()``) and new ones (userfaultfd lazy
copy) plug in with :func:`register_copy_mechanism`.
"""

from __future__ import annotations

import errno
import mmap
import sys
from typing import TYPE_CHECKING, List, Optional, Tuple

from . import _native, kernel, pagemap
from .blocks import Coverage
from .errors import (HugePagesUnavailableError, InvalidArgumentError, InvalidTypeError,
                     UnsupportedError, kernel_error)
from .repair import LocalTarget, RepairEngine

if TYPE_CHECKING:
    from .region import Region

__all__ = ["ThpBackend", "HugetlbBackend", "HugetlbCopy", "pool_shortfall", "CopyMechanism",
           "KernelCopy", "copy_mechanisms", "register_copy_mechanism", "mechanism_for", "BACKENDS",
           "register_backend", "COPY_WAIT_SECONDS", "COPY_HEADROOM_MARGIN", "copy_wait_limit"]

_PAGE = mmap.PAGESIZE
FALLBACK_PMD = 2 << 20


def _direct_cow_mode() -> Optional[str]:
    """The kernel's direct-COW mode, or None where it lacks the feature (or
    has a ``thp_cow`` that is not the interface thpguard knows)."""
    if not kernel.registry.knows(_native.MADV_THP_COW):
        return None
    if not kernel.direct_cow_interface().available:
        return None
    # Read now, not from the cached capabilities: thp_cow may have changed
    # since (a child forked after `echo never` must copy for itself).
    return kernel.thp_cow_mode()


class CopyMechanism:
    """How a ``copy`` region gets its own pages in a child.

    ``name`` shows as :attr:`thpguard.Region.copy_mode`. ``applies`` is asked
    before each fork (in the parent); the first registered mechanism that
    applies handles the region: ``parent_waits`` says whether the
    parent must wait for the child's copy (the hand-shake pipe), and
    ``in_child`` runs in the child. New mechanisms (userfaultfd lazy
    copy) plug in with :func:`register_copy_mechanism`.
    """

    name = "eager"

    def applies(self, region: "Region") -> bool:
        return True

    def parent_waits(self, region: "Region") -> bool:
        return True

    def charge(self, region: "Region") -> int:
        """Bytes ``in_child`` charges to the child's memory cgroup at once.
        The child checks the cgroup's room first (:data:`COPY_HEADROOM_MARGIN`)."""
        return region.size

    def in_child(self, region: "Region") -> None:
        """Copy the region into fresh huge pages moved over the old range."""
        with region._lock:
            _native.copy_remap(region.address, region.size, region.pmd_size)


class KernelCopy(CopyMechanism):
    """The proposed direct-COW flag: the kernel copies 2 MiB on write."""

    name = "kernel"

    def applies(self, region: "Region") -> bool:
        if getattr(region, "_copy_eager", False):
            return False  # copy_mode="eager" asked for the copy at fork
        return region.backend == "thp" and region.direct_cow and _direct_cow_mode() in ("always", "madvise")

    def parent_waits(self, region: "Region") -> bool:
        return False

    def charge(self, region: "Region") -> int:
        return 0  # copied on write, block by block, as without thpguard

    def in_child(self, region: "Region") -> None:
        pass


class UserfaultCopy(CopyMechanism):
    """userfaultfd block copy: the native handler of each process copies a
    2 MiB block on its first write after fork (docs/copy.rst). The native
    at-fork handlers arm parent and child; nothing happens in Python."""

    name = "userfault"

    def applies(self, region: "Region") -> bool:
        return getattr(region, "_copy_registered", False)

    def parent_waits(self, region: "Region") -> bool:
        return False

    def charge(self, region: "Region") -> int:
        return 0  # each written block is charged when it is copied, as by the kernel's COW

    def in_child(self, region: "Region") -> None:
        pass


_copy_mechanisms: List[CopyMechanism] = [KernelCopy(), UserfaultCopy(), CopyMechanism()]

#: Seconds the parent of a ``copy`` fork waits at most for the child's
#: copy; None: 10 s plus 1 s per 64 MiB to copy. After that the parent goes
#: on (writes there may split blocks the child still shares) and logs an ERROR.
COPY_WAIT_SECONDS: Optional[float] = None
#: Bytes a child's memory cgroup must have free beyond the copy itself;
#: without that room the region stays shared in the child, with an ERROR.
COPY_HEADROOM_MARGIN = 16 << 20


def copy_wait_limit(waited_for: List["Region"]) -> float:
    """Seconds a parent waits for its child to copy ``waited_for``."""
    if COPY_WAIT_SECONDS is not None:
        return COPY_WAIT_SECONDS
    return 10.0 + sum(r.size for r in waited_for) / (64 << 20)


def copy_mechanisms() -> List[CopyMechanism]:
    """The registered copy mechanisms, most preferred first."""
    return list(_copy_mechanisms)


def register_copy_mechanism(mechanism: CopyMechanism, first: bool = True) -> None:
    """Add a copy mechanism, tried before the others unless ``first`` is False."""
    if first:
        _copy_mechanisms.insert(0, mechanism)
    else:
        _copy_mechanisms.insert(len(_copy_mechanisms) - 1, mechanism)


def mechanism_for(region: "Region") -> CopyMechanism:
    """The first registered mechanism that applies to ``region`` now."""
    return next(m for m in _copy_mechanisms if m.applies(region))


class ThpBackend:
    """Anonymous transparent huge pages (``MADV_HUGEPAGE``): best effort, repaired.

    ``name`` is what :attr:`thpguard.Region.backend` shows.

    A backend owns how a region is mapped, measured and repaired; the region
    layer keeps policies, views and lifetime. ``HugetlbBackend``, and any
    backend registered with :func:`register_backend`, gives the same methods.
    """

    name = "thp"
    repairable = True

    def page_size(self) -> int:
        # Without a known PMD size (no THP in this kernel) the region still
        # works, on small pages, aligned as on x86-64.
        return kernel.pmd_size() or FALLBACK_PMD

    def map(self, size: int, pmd: int) -> Tuple[mmap.mmap, int]:
        """(mapping object, aligned address) of ``size`` bytes."""
        # The documented fault-injection seam (docs/architecture.rst): the
        # mapping is made by the mmap module, not by C.
        err = _native.fault_take("map")
        if err:
            raise kernel_error(err, "mmap", (0, size))
        # Python's mmap object owns the mapping: it refuses to close while a
        # memoryview or numpy array still exports it (BufferError) and
        # unmaps when the last reference goes. One page of slack either side
        # of the aligned range keeps this region a VMA of its own.
        span = size + pmd + _PAGE
        if span > sys.maxsize:
            # mmap.mmap would raise OverflowError; no address space is this big.
            raise InvalidArgumentError(
                f"size {size} bytes is larger than any mapping can be (at most "
                f"{sys.maxsize - pmd - _PAGE} bytes)"
            )
        try:
            mapping = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise kernel.map_count_error(exc) or kernel_error(exc.errno, "mmap", (0, span)) from None
        base = _native.buffer_address(mapping)
        return mapping, -(-(base + _PAGE) // pmd) * pmd

    def coverage(self, region: "Region") -> Coverage:
        return pagemap.coverage(region.address, region.address + region.size, region.pmd_size)

    def engine(self) -> RepairEngine:
        return RepairEngine(LocalTarget())


#: Backend name -> factory of backend objects; :func:`thpguard.alloc`'s
#: ``backend`` argument picks one.
BACKENDS = {"thp": ThpBackend}


def register_backend(name: str, factory) -> None:
    """Make ``alloc(backend=name)`` use objects made by ``factory()`` (a class
    with ThpBackend's methods: ``page_size``, ``map``, ``coverage``, ``engine``)."""
    BACKENDS[name] = factory


# -- hugetlb --------------------------------------------------------------------


def _log2(n: int) -> int:
    return n.bit_length() - 1


def _fmt(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


class HugetlbBackend:
    """hugetlb pages (``MAP_HUGETLB``): guaranteed at map time, never split.

    The mapping is made with a reservation (never ``MAP_NORESERVE``): the
    kernel promises every page at ``mmap`` time or refuses with ENOMEM, so no
    fault later finds the pool empty. There is nothing to repair:
    ``repairable`` is False and the guard skips these regions.
    """

    name = "hugetlb"
    repairable = False

    def __init__(self, page_size: Optional[int] = None) -> None:
        sizes = kernel.hugetlb_sizes()
        if page_size is None:
            default = kernel.pmd_size() or FALLBACK_PMD
            page_size = default if default in sizes else (sizes[0] if sizes else default)
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise InvalidTypeError(
                f"page_size must be an int number of bytes, got {type(page_size).__name__}")
        if page_size not in sizes:
            have = ", ".join(f"{s} ({_fmt(s)})" for s in sizes) or "none"
            raise UnsupportedError(
                "hugetlb", f"no hugetlb pool of {page_size} bytes on this kernel; sizes offered: {have}")
        if page_size == kernel.GIGANTIC and not kernel.capabilities().hugetlb_gigantic.available:
            raise UnsupportedError(
                "hugetlb 1 GiB", f"1 GiB hugetlb pages are not possible here: "
                f"{kernel.capabilities().hugetlb_gigantic.reason}")
        self._page_size = page_size

    def page_size(self) -> int:
        return self._page_size

    def flags(self) -> int:
        """The extra mmap flags: ``MAP_HUGETLB | log2(page size) << MAP_HUGE_SHIFT``."""
        return _native.MAP_HUGETLB | (_log2(self._page_size) << _native.MAP_HUGE_SHIFT)

    def sysfs_setting(self) -> str:
        """The file that sizes this pool."""
        return f"/sys/kernel/mm/hugepages/hugepages-{self._page_size // 1024}kB/nr_hugepages"

    def shortfall(self, size: int) -> Optional[str]:
        """Why the pool (or the hugetlb cgroup) cannot hold ``size`` more
        bytes now, with the command that would fix it; None when it can."""
        return pool_shortfall(self._page_size, size // self._page_size)

    def map(self, size: int, pmd: int) -> Tuple[mmap.mmap, int]:
        """(mapping object, address) of ``size`` bytes (a multiple of the
        page size), reserved in the pool now.

        As for THP, Python's mmap object owns a span with slack either side
        (so views keep it alive and the slack page below takes the region's
        marker); the hugetlb mapping replaces the aligned middle of it.
        """
        err = _native.fault_take("map")
        if err:
            raise kernel_error(err, "mmap", (0, size))
        span = size + self._page_size + _PAGE
        try:
            mapping = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, OverflowError) as exc:
            raise kernel_error(getattr(exc, "errno", None) or errno.ENOMEM, "mmap", (0, span)) from None
        addr = -(-(_native.buffer_address(mapping) + _PAGE) // self._page_size) * self._page_size
        try:
            _native.map_flags(addr, size, self.flags())
        except OSError as exc:
            mapping.close()
            if exc.errno == errno.ENOMEM:
                why = self.shortfall(size) or (
                    f"the {_fmt(self._page_size)} hugetlb pool could not reserve "
                    f"{size // self._page_size} pages (another process took them)")
                raise HugePagesUnavailableError(why) from None
            raise
        return mapping, addr

    def coverage(self, region: "Region") -> Coverage:
        # hugetlb pages are PAGE_IS_HUGE in PAGEMAP_SCAN (6.7+): blocks of the PMD
        # size, like THP, so the block model and its consumers are shared.
        return pagemap.coverage(region.address, region.address + region.size, region.pmd_size)

    def setup(self, region: "Region", populate: bool) -> None:
        """Marker page, fork policy and population of a freshly mapped region."""
        try:
            _native.map_marker(region.address - _PAGE, _PAGE, region.name)
            region._marked = True
        except OSError:
            pass  # only `thpguard status` loses the region's name
        # MADV_WIPEONFORK is EINVAL on hugetlb (Linux 6.18, measured): a
        # `wipe` region is kept out of the child like a `private` one, and
        # the fork layer maps a fresh zeroed mapping over the placeholder
        # there (_regions.py).
        if region.fork in ("wipe", "private"):
            keep_out_of_child(region)
        if populate:
            # Never SIGBUS: every page was reserved at mmap time.
            _native.populate_write(region.address, region.size, _PAGE)

    def populated_pages(self, region: "Region") -> int:
        """Pages of this region that are faulted in (what a fork may copy)."""
        cov = self.coverage(region)
        return -(-cov.present_bytes // self._page_size)

    def engine(self) -> RepairEngine:
        return RepairEngine(LocalTarget())


def pool_shortfall(page_size: int, pages: int) -> Optional[str]:
    """Why ``pages`` more pages of ``page_size`` cannot be had now (pool or
    hugetlb cgroup), with the command that would fix it; None if they can."""
    pool = kernel.hugetlb_pool(page_size)
    if pool is None:
        return f"this kernel has no {_fmt(page_size)} hugetlb pool"
    if pool.available < pages:
        return (f"the {_fmt(page_size)} hugetlb pool has {pool.available} pages available "
                f"(free {pool.free}, reserved {pool.reserved}, total {pool.total}, surplus "
                f"{pool.surplus} of overcommit {pool.overcommit}) and {pages} are needed; "
                f"to fix: {pool.grow_command(pages)}")
    cg = kernel.hugetlb_cgroup(page_size)
    if cg is not None and cg.available_bytes is not None and cg.available_bytes < pages * page_size:
        return (f"the hugetlb cgroup {cg.directory} allows {cg.available_bytes} more bytes of "
                f"{_fmt(page_size)} pages and {pages * page_size} are needed; raise its limit")
    return None


def choose_hugetlb(size: int, backend: str, strict: bool,
                   page_size: Optional[int]) -> Tuple[Optional[HugetlbBackend], Optional[str]]:
    """For :func:`~thpguard.alloc`: (the hugetlb backend, None) when the pool
    can hold ``size`` bytes now, else (None, why). Raises where ``backend``
    is ``"hugetlb"`` and ``strict``: :class:`UnsupportedError` without the
    page size, :class:`HugePagesUnavailableError` (with the command that
    grows the pool) when the pool or cgroup cannot hold the region."""
    try:
        hb = HugetlbBackend(page_size)
    except UnsupportedError as exc:
        if backend == "hugetlb" and strict:
            raise
        return None, str(exc)
    rounded = -(-size // hb.page_size()) * hb.page_size()
    why = hb.shortfall(rounded)
    if why is None:
        return hb, None
    if backend == "hugetlb" and strict:
        raise HugePagesUnavailableError(why, hb.sysfs_setting())
    return None, why


def keep_out_of_child(region: "Region") -> None:
    """``MADV_DONTFORK``, and the fork layer maps a PROT_NONE placeholder at
    the same address in each child so nothing else is mapped there."""
    import weakref  # noqa: PLC0415

    addr, size = region.address, region.size
    _native.madvise(addr, size, _native.MADV_DONTFORK)
    _native.placeholder_add(addr, size, region.name)
    # A region dropped without close() takes its reservation along.
    region._forget_placeholder = weakref.finalize(region, _native.placeholder_remove, addr)


def check_page_size(backend: str, page_size: Optional[int]) -> None:
    """``page_size`` is for hugetlb; a THP region has the PMD size."""
    pmd = ThpBackend().page_size()
    if backend == "thp" and page_size not in (None, pmd):
        raise InvalidArgumentError(f"page_size={page_size!r}: a THP region uses the PMD size "
                                   f"({pmd} bytes); pass backend='hugetlb' for other sizes")


def make_hugetlb(make_region, size: int, backend: str, strict: bool, page_size: Optional[int]):
    """:func:`~thpguard.alloc` for ``backend`` ``"hugetlb"`` or ``"auto"``:
    ``make_region(strict, backend_object_or_name)`` makes the region; a THP
    one, with the reason in ``backend_reason`` (logged), where the pool
    cannot hold it and the call allows that."""
    import logging  # noqa: PLC0415

    log = logging.getLogger("thpguard")
    hb, why = choose_hugetlb(size, backend, strict, page_size)
    if hb is not None:
        try:
            region = make_region(strict, hb)
        except HugePagesUnavailableError as exc:
            if strict and backend == "hugetlb":  # pool drained since the check
                raise
            why = str(exc)
        else:
            if backend == "auto":
                region.backend_reason = "auto: the hugetlb pool can hold the region"
                log.info("alloc(backend='auto'): hugetlb, %s", region.backend_reason)
            return region
    region = make_region(strict and backend == "auto", "thp")
    region.backend_reason = f"{backend}: THP instead of hugetlb because {why}"
    log.log(logging.WARNING if backend == "hugetlb" else logging.INFO,
            "alloc(backend=%r): THP instead of hugetlb because %s", backend, why)
    return region


def become_thp(region: "Region", why: str) -> None:
    """In a child whose copy of a hugetlb region is on THP pages now."""
    import logging  # noqa: PLC0415 - only on this rare path
    import os  # noqa: PLC0415

    region._backend = ThpBackend()
    region.degraded = why
    try:
        _native.madvise(region.address, region.size, _native.MADV_HUGEPAGE)
    except OSError:
        pass
    logging.getLogger("thpguard").warning("region %#x in pid %d: %s", region.address,
                                          os.getpid(), why)


class HugetlbCopy(CopyMechanism):
    """A ``copy`` hugetlb region (or a ``share`` one downgraded at fork):
    the child copies it into pages of its own while the parent waits.

    Into fresh hugetlb pages where the pool has them (``pool=True``), else
    into THP pages: the child's copy of the region is then a THP region.
    Either way no page stays shared, so nobody needs a copy-on-write page
    from the pool later.
    """

    name = "hugetlb-eager"

    def __init__(self, pool: bool = True) -> None:
        self.pool = pool

    def applies(self, region: "Region") -> bool:
        return region.backend == "hugetlb"

    def charge(self, region: "Region") -> int:
        # Never skipped for want of memory cgroup room: a hugetlb page left
        # shared needs a pool page on the next write (SIGBUS without one).
        return 0

    def in_child(self, region: "Region") -> None:
        with region._lock:
            backend = region._backend
            if self.pool:
                try:
                    _native.copy_remap_flags(region.address, region.size, backend.flags())
                    return
                except OSError as exc:
                    if exc.errno != errno.ENOMEM:
                        raise
            _native.copy_remap(region.address, region.size, region.pmd_size)
            become_thp(region, "the hugetlb pool had no pages for this child's copy; the child's "
                               "copy is THP" if self.pool else region.fork_downgraded or
                               "this fork copied the share region into THP pages")


_copy_mechanisms.insert(0, HugetlbCopy())

register_backend("hugetlb", HugetlbBackend)
