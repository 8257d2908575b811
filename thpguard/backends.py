"""Backends and copy mechanisms: the parts of a region that differ per mechanism.

A ``ThpBackend`` owns how a region is mapped, measured and repaired
(a hugetlb backend gives the same methods). A :class:`CopyMechanism` says
how a ``fork="copy"`` region gets its own pages in a child; mechanisms are
tried in order (``copy_mechanisms()``) and new ones (userfaultfd lazy
copy) plug in with :func:`register_copy_mechanism`.
"""

from __future__ import annotations

import mmap
import sys
from typing import TYPE_CHECKING, List, Optional, Tuple

from . import _native, kernel, pagemap
from .blocks import Coverage
from .errors import InvalidArgumentError, kernel_error
from .repair import LocalTarget, RepairEngine

if TYPE_CHECKING:
    from .region import Region

__all__ = ["ThpBackend", "CopyMechanism", "KernelCopy", "copy_mechanisms",
           "register_copy_mechanism", "mechanism_for", "BACKENDS", "register_backend"]

_PAGE = mmap.PAGESIZE
FALLBACK_PMD = 2 << 20


def _direct_cow_mode() -> Optional[str]:
    """The kernel's direct-COW mode, or None where it lacks the feature."""
    if not kernel.registry.knows(_native.MADV_THP_COW):
        return None
    return kernel.capabilities().thp_cow


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

    def in_child(self, region: "Region") -> None:
        """Copy the region into fresh huge pages moved over the old range."""
        with region._lock:
            _native.copy_remap(region.address, region.size, region.pmd_size)


class KernelCopy(CopyMechanism):
    """The proposed direct-COW flag: the kernel copies 2 MiB on write."""

    name = "kernel"

    def applies(self, region: "Region") -> bool:
        return region.direct_cow and _direct_cow_mode() in ("always", "madvise")

    def parent_waits(self, region: "Region") -> bool:
        return False

    def in_child(self, region: "Region") -> None:
        pass


_copy_mechanisms: List[CopyMechanism] = [KernelCopy(), CopyMechanism()]


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
    layer keeps policies, views and lifetime. Other backends (hugetlb) give
    the same methods.
    """

    name = "thp"

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
            raise kernel_error(exc.errno, "mmap", (0, span)) from None
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
