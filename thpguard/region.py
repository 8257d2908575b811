"""Huge-page regions that survive fork: :func:`alloc` and :class:`Region`.

A region is private anonymous memory, aligned to the PMD size, advised
``MADV_HUGEPAGE`` and kept in a VMA of its own. Its fork policy says what a
child of ``fork()`` gets:

``share``
    the same data, copy-on-write; a write splits the writer's 2 MiB block,
    which :meth:`Region.collapse` (or the guard) repairs.
``copy``
    the same data in the child's own huge pages at once: the child copies
    the region into fresh huge pages and moves them over the old range, and
    the parent waits for that copy, so nobody splits afterwards. Where the
    kernel has the direct-COW flag, the kernel copies on write instead.
``wipe``
    a zero-filled range that keeps ``MADV_HUGEPAGE`` (``MADV_WIPEONFORK``).
``private``
    nothing: the range is not mapped in the child (``MADV_DONTFORK``). A
    view made before fork and touched in the child is a SIGSEGV, which the
    native core explains on stderr (region, policy, what to use) first.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import _fork, _native, kernel, pagemap
from .errors import (
    HugePagesUnavailableError,
    InvalidArgumentError,
    InvalidTypeError,
    RegionClosedError,
    UnsupportedError,
    kernel_error,
)
from .pagemap import Coverage

__all__ = ["POLICIES", "Region", "CollapseResult", "alloc", "regions"]

log = logging.getLogger("thpguard")

POLICIES = ("share", "copy", "wipe", "private")

#: Environment variable naming the fork policy :func:`alloc` uses when none
#: is given (default ``share``); a bad value is logged and ignored.
ENV_FORK_POLICY = "THPGUARD_FORK_POLICY"
_reported_bad_policies: set = set()

#: Bytes per MADV_COLLAPSE call: the kernel holds mmap_lock for write per
#: 2 MiB block, so bounded calls let other threads fault in between.
DEFAULT_COLLAPSE_CHUNK = 8 << 20
DEFAULT_COLLAPSE_RETRIES = 3
_MAX_RETRIES = 1000  # EAGAIN retries per chunk; the C side takes an unsigned

_PAGE = mmap.PAGESIZE
_FALLBACK_PMD = 2 << 20
_live: "weakref.WeakSet[Region]" = weakref.WeakSet()
_live_lock = threading.Lock()


@dataclass(frozen=True)
class CollapseResult:
    """What :meth:`Region.collapse` did, checked against a rescan.

    ``attempted_bytes`` were not PMD-mapped before and were submitted to
    ``MADV_COLLAPSE``; ``collapsed_bytes`` of them are PMD-mapped after, by
    the kernel's own account. ``failures`` maps an errno to the number of
    chunks that failed with it. ``seconds`` is the wall time spent.
    """

    attempted_bytes: int
    collapsed_bytes: int
    failures: Dict[int, int]
    seconds: float
    coverage: Coverage

    @property
    def ok(self) -> bool:
        """True when the region is fully PMD-mapped afterwards."""
        return self.coverage.complete


def _collapse_known() -> bool:
    global _COLLAPSE_KNOWN
    if _COLLAPSE_KNOWN is None:
        _COLLAPSE_KNOWN = _native.advice_known(_native.MADV_COLLAPSE)
    return _COLLAPSE_KNOWN


_COLLAPSE_KNOWN: Optional[bool] = None


def _direct_cow_mode() -> Optional[str]:
    """The kernel's direct-COW mode, or None where it lacks the feature."""
    if not _native.advice_known(_native.MADV_THP_COW):
        return None
    return kernel.thp_cow_mode()


_NAME_MAX = 48


def _check_name(name: object) -> Optional[str]:
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidTypeError(f"name must be a str or None, got {type(name).__name__}")
    # The name travels into /proc/PID/maps, Prometheus labels and a signal handler's message.
    if not 0 < len(name) <= _NAME_MAX or not all(c.isascii() and (c.isalnum() or c in "._-") for c in name):
        raise InvalidArgumentError(
            f"name must be 1 to {_NAME_MAX} ASCII letters, digits, '.', '_' or '-', got {name!r}"
        )
    return name


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidTypeError(
            f"size must be an int number of bytes, got {type(size).__name__}"
        )
    if size <= 0:
        raise InvalidArgumentError(f"size must be > 0 bytes, got {size}")
    return size


def default_policy() -> str:
    """The fork policy :func:`alloc` uses when none is given.

    ``THPGUARD_FORK_POLICY`` if set to one of :data:`POLICIES`, else
    ``"share"``. A bad value must not break the service that imports us:
    it is logged as an error (once per value) and ``"share"`` is used.
    """
    raw = os.environ.get(ENV_FORK_POLICY, "").strip().lower()
    if not raw:
        return "share"
    if raw in POLICIES:
        return raw
    if raw not in _reported_bad_policies:
        _reported_bad_policies.add(raw)
        log.error("%s=%r is not a fork policy (expected one of %s); using 'share'",
                  ENV_FORK_POLICY, os.environ.get(ENV_FORK_POLICY), ", ".join(POLICIES))
    return "share"


def _check_policy(policy: object) -> str:
    if not isinstance(policy, str):
        raise InvalidTypeError(
            f"fork policy must be a str, one of {', '.join(POLICIES)}; got {type(policy).__name__}"
        )
    if policy not in POLICIES:
        raise InvalidArgumentError(
            f"unknown fork policy {policy!r}; expected one of {', '.join(POLICIES)}"
        )
    return policy


class Region:
    """A huge-page region; create it with :func:`alloc`.

    ``address`` and ``size`` (bytes, a multiple of ``pmd_size``) describe
    the mapping; ``fork`` is its policy; ``closed`` is True once closed, and
    in a child for a ``private`` region, which is not mapped there.
    ``degraded`` is None when the region was fully PMD-mapped at
    allocation, else a sentence saying why it is not.
    """

    def __init__(self, size: int, fork: str, populate: bool, strict: bool,
                 name: Optional[str] = None) -> None:
        # Without a known PMD size (no THP in this kernel) the region still
        # works, on small pages, aligned as on x86-64.
        self.pmd_size = kernel.pmd_size() or _FALLBACK_PMD
        self.size = -(-size // self.pmd_size) * self.pmd_size
        self.fork = fork
        #: The name given to :func:`alloc`, or None; shown by ``thpguard status`` and in metrics.
        self.name = name
        self.degraded: Optional[str] = None
        self.direct_cow = False
        self._closed = False
        self._unmapped_here = False
        self._lock = threading.Lock()

        if strict:
            ok, reason = kernel.can_get_huge_pages()
            if not ok:
                raise HugePagesUnavailableError(reason)

        err = _native.fault_take("map")
        if err:
            raise kernel_error(err, "mmap", (0, self.size))
        # Python's mmap object owns the mapping: it refuses to close while a
        # memoryview or numpy array still exports it (BufferError) and
        # unmaps when the last reference goes. One page of slack either side
        # of the aligned range keeps this region a VMA of its own.
        span = self.size + self.pmd_size + _PAGE
        if span > sys.maxsize:
            # mmap.mmap would raise OverflowError; no address space is this big.
            raise InvalidArgumentError(
                f"size {size} bytes is larger than any mapping can be (at most "
                f"{sys.maxsize - self.pmd_size - _PAGE} bytes)"
            )
        try:
            self._map = mmap.mmap(
                -1, span, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as exc:
            raise kernel_error(exc.errno, "mmap", (0, span)) from None
        try:
            base = _native.buffer_address(self._map)
            self.address = -(-(base + _PAGE) // self.pmd_size) * self.pmd_size
            self._offset = self.address - base
            self._setup(populate, strict)
        except BaseException:
            self._map.close()
            forget = getattr(self, "_forget_placeholder", None)
            if forget is not None:
                forget()  # else every later child reserves this stale range
            raise
        with _live_lock:
            _live.add(self)

    def _setup(self, populate: bool, strict: bool) -> None:
        addr, size = self.address, self.size
        try:
            # The slack page just below the region becomes a named marker,
            # so `thpguard status` of this process can tell the region apart.
            _native.map_marker(addr - _PAGE, _PAGE, self.name)
        except OSError as exc:
            log.debug("no marker page for region %#x: %s", addr, exc)
        try:
            _native.madvise(addr, size, _native.MADV_HUGEPAGE)
        except OSError as exc:
            # EINVAL: a kernel built without CONFIG_TRANSPARENT_HUGEPAGE.
            if exc.errno != errno.EINVAL or strict:
                raise
            self.degraded = "this kernel has no transparent huge pages (MADV_HUGEPAGE: EINVAL)"
        if self.fork == "wipe":
            _native.madvise(addr, size, _native.MADV_WIPEONFORK)
        elif self.fork == "private":
            _native.madvise(addr, size, _native.MADV_DONTFORK)
            _native.placeholder_add(addr, size, self.name)
            # A region dropped without close() takes its reservation along.
            self._forget_placeholder = weakref.finalize(
                self, _native.placeholder_remove, addr
            )
        elif _direct_cow_mode() is not None:
            try:
                _native.madvise(addr, size, _native.MADV_THP_COW)
                self.direct_cow = True
            except OSError as exc:
                log.warning("MADV_THP_COW failed on %#x: %s", addr, exc)
        if not populate:
            return
        _native.populate_write(addr, size, _PAGE)
        cov = pagemap.coverage(addr, addr + size, self.pmd_size)
        if not cov.complete and _collapse_known():
            # Fragmentation can make the faults fall back to small pages;
            # MADV_COLLAPSE compacts and retries (as defrag allows).
            cov = self.collapse().coverage
        if not cov.complete:
            ok, reason = kernel.can_get_huge_pages()
            self.degraded = self.degraded or reason if not ok else (
                f"only {cov.huge_bytes} of {cov.total_bytes} bytes are PMD-mapped "
                "(memory fragmented or THP unavailable)"
            )
            if strict:
                raise HugePagesUnavailableError(self.degraded)
            log.warning("region %#x degraded to small pages: %s", addr, self.degraded)

    # -- state -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once closed, or when this process never had the mapping."""
        return self._closed or self._unmapped_here

    def _require_open(self, what: str) -> None:
        if self._unmapped_here:
            raise RegionClosedError(
                f"cannot {what}: this 'private' region (MADV_DONTFORK) is not mapped "
                f"in this child process (pid {os.getpid()})",
                self,
            )
        if self._closed:
            raise RegionClosedError(f"cannot {what}: the region is closed", self)

    # -- data --------------------------------------------------------------

    def view(self) -> memoryview:
        """A writable memoryview of the whole region (``size`` bytes).

        ``numpy.frombuffer(region.view(), dtype)`` gives a zero-copy array.
        While any view (or array made from one) is alive, :meth:`close`
        raises :class:`BufferError`.
        """
        self._require_open("view it")
        return memoryview(self._map)[self._offset : self._offset + self.size]

    # -- huge pages --------------------------------------------------------

    def coverage(self) -> Coverage:
        """Ask the kernel how much of the region is PMD-mapped right now."""
        self._require_open("measure coverage")
        _fork.check()
        return pagemap.coverage(self.address, self.address + self.size, self.pmd_size)

    def collapse(
        self,
        *,
        chunk: int = DEFAULT_COLLAPSE_CHUNK,
        max_retries: int = DEFAULT_COLLAPSE_RETRIES,
    ) -> CollapseResult:
        """Re-collapse the split blocks of the region into huge pages now.

        Runs ``MADV_COLLAPSE`` (Linux 6.1) over the blocks that hold data
        but are not PMD-mapped, ``chunk`` bytes per call, retrying EAGAIN up
        to ``max_retries`` (0 to 1000) times, then rescans. Blocks never touched are
        left alone. Raises :class:`~thpguard.errors.UnsupportedError` on
        kernels without MADV_COLLAPSE. Each repair of a block shared with
        another process allocates a new 2 MiB page.
        """
        self._require_open("collapse it")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise InvalidArgumentError(f"chunk must be a positive int of bytes, got {chunk!r}")
        if (
            isinstance(max_retries, bool)
            or not isinstance(max_retries, int)
            or not 0 <= max_retries <= _MAX_RETRIES
        ):
            raise InvalidArgumentError(
                f"max_retries must be an int from 0 to {_MAX_RETRIES}, got {max_retries!r}"
            )
        if not _collapse_known():
            raise UnsupportedError(
                "MADV_COLLAPSE",
                "this kernel has no MADV_COLLAPSE (Linux 6.1+): split blocks cannot be "
                "repaired; use fork='copy', 'wipe' or 'private' to avoid splits instead",
            )
        # More than the region is the whole region (and fits the C size_t).
        chunk = max(self.pmd_size, min(self.size, chunk - chunk % self.pmd_size))
        started = time.perf_counter()
        before = self.coverage()
        if before.split_ranges is not None:
            targets = list(before.split_ranges)
        else:
            # No per-range detail (smaps): try every block on its own, so a
            # never-touched block (EINVAL) fails alone.
            chunk = self.pmd_size
            targets = [(self.address, self.address + self.size)] if not before.complete else []
        failures: Dict[int, int] = {}
        attempted = 0
        with self._lock:
            # close() from another thread may have won the lock since the
            # scan: the range may be unmapped, or mapped by someone else.
            self._require_open("collapse it")
            for start, end in targets:
                attempted += end - start
                for err in _native.collapse(start, end - start, chunk, max_retries):
                    if err:
                        failures[err] = failures.get(err, 0) + 1
        after = self.coverage()
        if before.split_ranges is None:
            failures.pop(errno.EINVAL, None)  # untouched blocks, expected here
        return CollapseResult(
            attempted_bytes=attempted,
            collapsed_bytes=max(0, after.huge_bytes - before.huge_bytes),
            failures=failures,
            seconds=time.perf_counter() - started,
            coverage=after,
        )

    def populate(self) -> None:
        """Fault in every page of the region for writing, keeping its data.

        Never call it on a ``share`` region while a child shares it: the
        kernel splits every shared block it touches (KERNEL-NOTES).
        """
        self._require_open("populate it")
        _native.populate_write(self.address, self.size, _PAGE)

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Unmap the region. Idempotent.

        Raises :class:`BufferError` (and unmaps nothing) while a view or an
        array made from one is still alive. In a child where a ``private``
        region was never mapped it only releases the reservation.
        """
        with self._lock:
            if self._closed:
                return
            try:
                self._map.close()
            except BufferError:
                if self._unmapped_here:
                    # A child of a `private` region: views inherited from
                    # the parent are unusable here anyway; the mmap object
                    # unmaps the reservation once they are gone.
                    pass
                else:
                    raise BufferError(
                        "cannot close the region: memoryviews or arrays made from "
                        "region.view() still use it; release them (del, or "
                        "memoryview.release()) and close again"
                    ) from None
            self._closed = True
        if self.fork == "private":
            self._forget_placeholder()
        with _live_lock:
            _live.discard(self)

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<thpguard.Region {state}{'' if self.name is None else ' ' + repr(self.name)} "
            f"address={self.address:#x} size={self.size} "
            f"fork={self.fork!r}{' direct_cow' if self.direct_cow else ''}>"
        )

    # -- fork --------------------------------------------------------------

    def _copy_into_own_pages(self) -> None:
        with self._lock:
            _native.copy_remap(self.address, self.size, self.pmd_size)


def alloc(
    size: int,
    *,
    fork: Optional[str] = None,
    populate: bool = True,
    strict: bool = False,
    name: Optional[str] = None,
) -> Region:
    """Allocate a huge-page region of at least ``size`` bytes.

    ``size`` is rounded up to the PMD size (2 MiB on x86-64). ``fork`` is the
    fork policy: ``"share"``, ``"copy"``, ``"wipe"`` or ``"private"``; when
    None, :func:`default_policy` (``THPGUARD_FORK_POLICY``, else ``share``).
    ``populate`` faults every page in now, as huge pages. With ``strict``,
    :class:`~thpguard.errors.HugePagesUnavailableError` is raised where huge
    pages cannot be had; otherwise the region works on small pages and
    ``Region.degraded`` and :meth:`Region.coverage` say so. ``name``
    (letters, digits and ``._-``, at most 48 characters) labels the region
    in ``thpguard status``, in metrics and in the message a child gets if it
    touches a ``private`` region.
    """
    size = _check_size(size)
    name = _check_name(name)
    fork = default_policy() if fork is None else _check_policy(fork)
    for arg, value in (("populate", populate), ("strict", strict)):
        if not isinstance(value, bool):
            raise InvalidTypeError(f"{arg} must be True or False, got {value!r}")
    return Region(size, fork, populate, strict, name)


def regions() -> List[Region]:
    """The open regions of this process."""
    with _live_lock:
        return [r for r in _live if not r.closed]


# -- fork handling ------------------------------------------------------------

_pending = threading.local()
# Held from before fork() to after it, so forks from several threads run
# one at a time: a child forked by another thread meanwhile would inherit
# the hand-shake pipe and keep this parent waiting until it exits.
_fork_serial = threading.Lock()


def _before_fork() -> None:
    """Prepare the `copy` hand-shake: a pipe the child closes when done."""
    _fork_serial.acquire()
    _pending.pipe = None
    mode = None
    targets = [r for r in regions() if r.fork == "copy"]
    if targets:
        mode = _direct_cow_mode()
    targets = [r for r in targets if not (r.direct_cow and mode in ("always", "madvise"))]
    if targets:
        _pending.pipe = os.pipe()
    _pending.targets = targets
    _pending.prepared = True


def _after_fork_in_parent() -> None:
    pipe = getattr(_pending, "pipe", None)
    _pending.pipe, _pending.targets = None, []  # hold no region alive
    _pending.prepared = False
    try:
        if pipe is None:
            return
        read_end, write_end = pipe
        os.close(write_end)
        try:
            # Until the child has copied, a write here would split the pages
            # it still shares (DESIGN: the `copy` race); EOF if it dies.
            while os.read(read_end, 64):
                pass
        finally:
            os.close(read_end)
    finally:
        if _fork_serial.locked():
            _fork_serial.release()


def _after_fork_in_child(late: bool = False) -> None:
    global _live_lock, _fork_serial
    # A lock another parent thread held at fork stays held forever in the
    # child, where that thread does not exist: start with fresh ones.
    _live_lock = threading.Lock()
    _fork_serial = threading.Lock()
    for region in list(_live):
        region._lock = threading.Lock()
        if region.fork == "private" and not region._closed:
            region._unmapped_here = True
    pipe = getattr(_pending, "pipe", None)
    targets = getattr(_pending, "targets", [])
    prepared = getattr(_pending, "prepared", False)
    _pending.pipe, _pending.targets, _pending.prepared = None, [], False
    try:
        if late or not prepared:
            # The parent did not wait for us (a fork from C; or uWSGI's
            # py-call-osafterfork, which runs the child's hooks but not the
            # parent's before-fork ones), but copying still ends our
            # sharing, so neither side splits from now on.
            targets = [r for r in _live if r.fork == "copy" and not r.closed and not r.direct_cow]
        if _fork.in_exec_child():
            return
        for region in targets:
            if region.closed:
                continue
            try:
                region._copy_into_own_pages()
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
