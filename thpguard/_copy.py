"""How a ``copy`` region copies: the choice of ``copy_mode`` and the
registration with the native userfaultfd handler (docs/copy.rst).

The region layer calls :func:`setup` once a THP ``copy`` region is mapped
and populated, :func:`rearm` when ``close()`` was refused after the region
was unregistered, and :func:`check_mode` for :func:`thpguard.alloc`'s
argument. The copying itself is native (``native/uffd.c``); at fork the
``userfault`` copy mechanism (``backends.UserfaultCopy``) does nothing in
Python.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from typing import Dict

from . import _native, kernel
from .backends import _direct_cow_mode, mechanism_for
from .errors import InvalidArgumentError, InvalidTypeError, UnsupportedError

log = logging.getLogger("thpguard")
_PAGE = mmap.PAGESIZE

#: How a ``copy`` region may copy (the ``copy_mode`` argument of :func:`thpguard.alloc`).
COPY_MODES = ("auto", "lazy", "eager")


def mode(region) -> "str | None":
    """For ``fork="copy"``: the mechanism a fork now uses (``"kernel"``,
    ``"userfault"``, ``"eager"``, or one registered later); None for other
    policies. See :doc:`copy`."""
    return mechanism_for(region).name if region.fork == "copy" else None


def tag(region) -> str:
    """`` copy_mode='...'`` for the region's repr, or nothing."""
    name = mode(region)
    return f" copy_mode={name!r}" if name else ""


def check_mode(copy_mode: object, fork: str) -> None:
    """Raise for a ``copy_mode`` that is not one of :data:`COPY_MODES`, or
    that is given for another policy than ``copy``."""
    if not isinstance(copy_mode, str):
        raise InvalidTypeError(
            f"copy_mode must be a str, one of {', '.join(COPY_MODES)}; got {type(copy_mode).__name__}"
        )
    if copy_mode not in COPY_MODES:
        raise InvalidArgumentError(
            f"unknown copy_mode {copy_mode!r}; expected one of {', '.join(COPY_MODES)}"
        )
    if copy_mode != "auto" and fork != "copy":
        raise InvalidArgumentError(
            f"copy_mode={copy_mode!r} applies only to fork='copy' (this region is fork={fork!r})"
        )


#: Why a hugetlb ``copy`` region copies at fork (``copy_fallback_reason``
#: under ``auto``, the refusal of ``lazy``).
HUGETLB_NOT_LAZY = (
    "hugetlb pages are not copied lazily: the userfault handler copies into THP blocks and "
    "moves them in with UFFDIO_MOVE, which works only on anonymous (THP) memory, and the "
    "kernel's direct-COW flag is for THP only"
)


def backend_for(copy_mode: str, fork: str, backend: str) -> "tuple[str, str | None]":
    """For :func:`thpguard.alloc`: the backend to use and why, if not the
    one asked for. ``copy_mode="lazy"`` copies THP blocks only: it raises
    :class:`UnsupportedError` with ``backend="hugetlb"`` and takes THP for
    ``backend="auto"``."""
    if fork != "copy" or copy_mode != "lazy" or backend not in ("hugetlb", "auto"):
        return backend, None
    if backend == "auto":
        return "thp", "auto: THP because copy_mode='lazy' copies THP blocks only"
    raise UnsupportedError(
        "copy_mode='lazy'",
        f"copy_mode='lazy' with backend='hugetlb': {HUGETLB_NOT_LAZY}; use backend='thp' "
        "(or 'auto') to copy block by block, or copy_mode='auto' or 'eager' to keep hugetlb "
        "pages (each child copies the whole region at fork)",
    )


def setup_hugetlb(region, requested: str) -> None:
    """A hugetlb ``copy`` region: always the eager copy at fork;
    ``auto`` records why (``lazy`` was refused by :func:`backend_for`)."""
    if requested == "auto":
        region.copy_fallback_reason = HUGETLB_NOT_LAZY
        log.info("copy region %#x copies eagerly at fork: %s", region.address, HUGETLB_NOT_LAZY)


def setup(region, requested: str) -> None:
    """Pick the copy mechanism (after populating: the handler need not
    fill the blocks one fault at a time)."""
    if getattr(region._backend, "setup", None) is not None:  # hugetlb: eager
        return setup_hugetlb(region, requested) if region.backend == "hugetlb" else None
    if requested == "eager":
        region._copy_eager = True
        return
    if region.direct_cow and _direct_cow_mode() in ("always", "madvise"):
        return  # the kernel copies (mechanism "kernel")
    feature = kernel.capabilities().copy_userfault
    reason = feature.reason
    if feature.available:
        try:
            _native.copy_register(region.address, region.size, region.pmd_size)
        except OSError as exc:
            reason = f"registering the region with userfaultfd failed: {exc}"
        else:
            region._copy_registered = True
            _note_method(region)
            # A region dropped without close() leaves the handler too,
            # before the mapping goes.
            region._forget_copy = weakref.finalize(region, _native.copy_unregister, region.address)
            return
    if requested == "lazy":
        raise UnsupportedError(
            "copy_mode='lazy'",
            f"no lazy copy mechanism here: {reason}; use copy_mode='auto' or 'eager' "
            "(the child copies the whole region at fork)",
        )
    region.copy_fallback_reason = reason
    log.info("copy region %#x copies eagerly at fork: %s", region.address, reason)


def _note_method(region) -> None:
    """Note, once per registration (not at every fork), whether the
    handlers put copied blocks in with mremap, as VMAs of their own
    (:func:`thpguard._regions.outside_change`); UFFDIO_MOVE (6.8) and the
    collapse method move pages, not VMAs, and the range stays one VMA. The
    method cannot change while a region is registered."""
    try:
        region._moves_vmas = _native.copy_stats()["method"] not in ("move", "collapse")
    except OSError:
        region._moves_vmas = True


def label(region) -> None:
    """Name the region's copy mechanism in its marker page, so ``thpguard
    status`` shows it from outside the process (the marker is mapped again
    under the new name; without a marker nothing happens)."""
    if not getattr(region, "_marked", False):
        return
    try:
        _native.map_marker(region.address - _PAGE, _PAGE, region.name, mode(region))
    except OSError as exc:  # no fd left: status shows the region without its mechanism
        log.debug("copy region %#x: marker not renamed: %s", region.address, exc)


def release(region) -> bool:
    """Unregister the region from the handler; True if it was registered.
    Waits for a copy in progress and wakes every thread waiting on the
    region, so the caller may unmap it."""
    forget = getattr(region, "_forget_copy", None)
    if forget is None or not forget.alive:
        return False
    forget()
    return True


def rearm(region) -> None:
    """Register and protect the region again (its close() was refused)."""
    try:
        _native.copy_register(region.address, region.size, region.pmd_size)
    except OSError as exc:
        log.error("copy region %#x: writes after fork now split (the kernel's COW): %s",
                  region.address, exc)
        region._copy_registered = False
        label(region)
        return
    _note_method(region)
    region._forget_copy = weakref.finalize(region, _native.copy_unregister, region.address)
    try:
        _native.copy_arm()  # unregistering dropped the protection
    except OSError as exc:
        log.warning("copy region %#x: could not protect it again: %s", region.address, exc)


def copy_stats() -> Dict[str, object]:
    """Counters of this process's userfaultfd block copy (``copy`` regions
    with ``copy_mode == "userfault"``); a child starts from zero.

    ``copies``: blocks copied into a new huge page on their first write;
    ``reuses``: blocks no longer shared with another process, unprotected
    without a copy; ``cow_fallbacks``: writes left to the kernel's own COW
    (the block was split or partly empty, or no new block could be had: the
    block splits and the guard repairs it; its old name ``fallbacks`` stays
    as a second key with the same value through 0.1 and goes in 0.2; not to
    be confused with :func:`thpguard.stats`' ``copy_fallbacks``, which
    counts eager-copy regions kept shared);
    ``inline_allocs``: blocks faulted in inside a write fault because the
    pool of pre-faulted blocks was empty; ``missing_fills``: empty blocks
    filled with a zeroed huge page; ``copy_ns``: nanoseconds spent copying;
    ``method``: ``"move"`` (UFFDIO_MOVE), ``"mremap"`` or ``"collapse"``
    (forced by the benchmarks), None while no
    ``copy`` region is open (the handler is stopped); ``regions``: ``copy``
    regions registered; ``pool_ready``: pre-faulted blocks waiting (at most
    4, 8 MiB); ``arm_errno``: nonzero when this process could not arm its
    regions at fork (they then behave like ``share``); ``arm_ns``: in a
    child, nanoseconds its at-fork handler took to arm (a userfaultfd, the
    registrations, the protection, the handler thread and its first pool
    block), of which ``ready_wait_ns`` waiting for that thread. Counters
    survive the handler's stop and restart within a process.
    """
    return _native.copy_stats()
