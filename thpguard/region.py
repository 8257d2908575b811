"""Huge-page regions that survive fork: :func:`alloc` and :class:`Region`.

A region is private anonymous memory in a VMA of its own, on THP
(``MADV_HUGEPAGE``, PMD-aligned) or hugetlb pages (the backend). Its fork
policy says what a child of ``fork()`` gets:

``share``
    the same data, copy-on-write; on THP a write splits the writer's 2 MiB
    block, which :meth:`Region.collapse` (or the guard) repairs.
``copy``
    the same data; each process gets its own huge pages for what it writes
    (:attr:`Region.copy_mode`: ``kernel``, ``userfault`` or ``eager``).
``wipe``
    a zero-filled range (``MADV_WIPEONFORK``; emulated on hugetlb).
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
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

from . import _copy, _fork, _native, kernel, pagemap
from .blocks import Coverage
from .errors import (HugePagesUnavailableError, InvalidArgumentError, InvalidTypeError,
                     RegionClosedError, UnsupportedError)
from .backends import (
    BACKENDS,
    CopyMechanism,
    check_page_size,
    keep_out_of_child,
    make_hugetlb,
    ThpBackend,
    _direct_cow_mode,
    copy_mechanisms,
    register_copy_mechanism,
)
from ._regions import _live, regions, unmap_region
from .repair import RepairState

__all__ = ["POLICIES", "Region", "CollapseResult", "alloc", "regions", "ThpBackend",
           "CopyMechanism", "copy_mechanisms", "register_copy_mechanism"]
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


@dataclass(frozen=True)
class CollapseResult:
    """What :meth:`Region.collapse` did, checked against a rescan.

    ``attempted_bytes`` were not PMD-mapped before and were submitted to
    ``MADV_COLLAPSE``; ``collapsed_bytes`` of them are PMD-mapped after, by
    the kernel's own account. ``failures`` maps an errno to the number of
    chunks that failed with it. ``seconds`` is the wall time spent.
    ``refused`` maps each refused block (EINVAL; EBUSY in a userfaultfd
    mapping, :doc:`copy`) to its cause (``mprotect``, ``MADV_NOHUGEPAGE``, ...).
    """

    attempted_bytes: int
    collapsed_bytes: int
    failures: Dict[int, int]
    seconds: float
    coverage: Coverage
    refused: Dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the region is fully PMD-mapped afterwards."""
        return self.coverage.complete


def _collapse_known() -> bool:
    return kernel.registry.knows(_native.MADV_COLLAPSE)


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
                 name: Optional[str] = None, backend: object = "thp", copy_mode: str = "auto",
                 backend_reason: Optional[str] = None) -> None:
        # The backend (a registered name, or an object) owns mapping, coverage, repair.
        self._backend = BACKENDS[backend]() if isinstance(backend, str) else backend
        # The block model's block size, whatever the backend's page size.
        self.pmd_size = ThpBackend().page_size()
        self.size = -(-size // self.page_size) * self.page_size
        self.fork = fork
        #: The name given to :func:`alloc`, or None; shown by ``thpguard status`` and in metrics.
        self.name = name
        self.degraded: Optional[str] = None
        #: Why ``auto`` or ``strict=False`` chose this backend, else None.
        self.backend_reason = backend_reason
        #: hugetlb ``share``: why the last fork copied it into the child, else None.
        self.fork_downgraded: Optional[str] = None
        self.direct_cow = False
        self.copy_fallback_reason: Optional[str] = None  #: why ``copy_mode="auto"`` copies eagerly
        self._closed = False
        self._unmapped_here = False
        self._lock = threading.Lock()

        if strict and self.backend == "thp":
            ok, reason = kernel.can_get_huge_pages()
            if not ok:
                raise HugePagesUnavailableError(reason)

        self._map, self.address = self._backend.map(self.size, self.pmd_size)
        self._advised = False  # MADV_HUGEPAGE taken: smaps shows hg on its VMAs
        try:
            self._offset = self.address - _native.buffer_address(self._map)
            setup = getattr(self._backend, "setup", None)
            setup(self, populate) if setup else self._setup(populate, strict)
            if self.fork == "copy":
                _copy.setup(self, copy_mode)  # populated
                _copy.label(self)
        except BaseException as exc:
            full = kernel.map_count_error(exc)  # at vm.max_map_count: say so, not "EAGAIN"
            self._map.close()
            forget = getattr(self, "_forget_placeholder", None)
            if forget is not None:
                forget()  # else every later child reserves this stale range
            if full is not None:
                raise full from None
            raise
        live = _live()
        with live.lock:
            live.regions.add(self)

    @property
    def repairable(self) -> bool:
        """False where splits cannot happen (hugetlb): the guard skips it."""
        return getattr(self._backend, "repairable", True)

    def _setup(self, populate: bool, strict: bool) -> None:
        addr, size = self.address, self.size
        try:  # what outside code maps into a hole stays a VMA apart (outside_change)
            self._unmergeable = _native.map_unmergeable(addr, size) is None
        except OSError as exc:
            log.debug("region %#x keeps its plain mapping: %s", addr, exc)
        try:
            # The slack page below the region: a named marker for `thpguard status`.
            _native.map_marker(addr - _PAGE, _PAGE, self.name)
            self._marked = True
        except OSError as exc:
            log.debug("no marker page for region %#x: %s", addr, exc)
        try:
            _native.madvise(addr, size, _native.MADV_HUGEPAGE)
            self._advised = True
        except OSError as exc:
            # EINVAL: a kernel built without CONFIG_TRANSPARENT_HUGEPAGE.
            if exc.errno != errno.EINVAL or strict:
                raise
            self.degraded = "this kernel has no transparent huge pages (MADV_HUGEPAGE: EINVAL)"
        if self.fork == "wipe":
            _native.madvise(addr, size, _native.MADV_WIPEONFORK)
        elif self.fork == "private":
            keep_out_of_child(self)
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
        return self._backend.coverage(self)

    def collapse(
        self,
        *,
        chunk: int = DEFAULT_COLLAPSE_CHUNK,
        max_retries: int = DEFAULT_COLLAPSE_RETRIES,
    ) -> CollapseResult:
        """Re-collapse the split blocks of the region into huge pages now.

        Runs ``MADV_COLLAPSE`` (Linux 6.1) over the blocks the block model
        calls repairable (``split`` ones, and ``partial`` ones within
        khugepaged's ``max_ptes_none``: see :mod:`thpguard.blocks`), ``chunk``
        bytes per call, retrying EAGAIN up to ``max_retries`` (0 to 1000)
        times, then rescans. Blocks never touched are left alone. Raises :class:`~thpguard.errors.UnsupportedError` on
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
        engine = self._backend.engine()
        if before.blocks is None:
            # No per-block detail (smaps): try every block on its own, so a
            # never-touched block (EINVAL) fails alone.
            chunk = self.pmd_size
        calls = engine.plan(RepairState(), before, self.address, self.size, self.size, chunk,
                            time.monotonic())
        failures: Dict[int, int] = {}
        refused: Dict[int, str] = {}
        results = engine.run(calls, self.pmd_size, max_retries, lock=self._lock,
                             is_closed=lambda: self.closed)
        if len(results) < len(calls):
            # close() from another thread won the lock since the scan: the
            # range may be unmapped, or mapped by someone else.
            self._require_open("collapse it")
        for start, length, errs, _ in results:
            first = next((e for e in errs if e), 0)
            if first:
                failures[first] = failures.get(first, 0) + 1
            if before.blocks is not None:
                for i, err in enumerate(errs):
                    block = start + i * self.pmd_size
                    why = engine.refusal(err, block, self.pmd_size, self.address, self.size)
                    if why:
                        refused[block] = why
        after = self.coverage()
        if before.blocks is None:
            failures.pop(errno.EINVAL, None)  # untouched blocks, expected here
        return CollapseResult(
            attempted_bytes=sum(length for _, length in calls),
            collapsed_bytes=max(0, after.huge_bytes - before.huge_bytes),
            failures=failures,
            seconds=time.perf_counter() - started,
            coverage=after,
            refused=refused,
        )

    def populate(self) -> None:
        """Fault in every page of the region for writing, keeping its data.

        Never call it on a ``share`` region while a child shares it: the
        kernel splits every shared block it touches (:doc:`kernel-facts`).
        """
        self._require_open("populate it")
        _native.populate_write(self.address, self.size, _PAGE)

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Unmap the region. Idempotent.

        Raises :class:`BufferError` (and unmaps nothing) while a view or an
        array made from one is still alive. In a child where a ``private``
        region was never mapped it only releases the reservation.

        Never unmaps what is not the region's: when code outside thpguard
        unmapped part of the range (another mapping may sit in the hole
        now), the region is closed but its range stays mapped for the life
        of the process, and one ERROR on the ``thpguard`` logger says why.
        """
        with self._lock:
            if self._closed:
                return
            self._closed, registered = True, _copy.release(self)  # before unmapping (forks, handler)
            try:
                unmap_region(self)
            except BufferError:
                if registered and not self._unmapped_here:
                    _copy.rearm(self)
                self._closed = False
                raise
        forget = getattr(self, "_forget_placeholder", None)
        if forget is not None:
            forget()
        live = _live()
        with live.lock:
            live.regions.discard(self)

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<thpguard.Region {state}{'' if self.name is None else ' ' + repr(self.name)} "
            f"address={self.address:#x} size={self.size} fork={self.fork!r} "
            f"backend={self.backend!r} page_size={self.page_size}"
            f"{' direct_cow' if self.direct_cow else ''}{_copy.tag(self)}>"
        )

    # -- fork --------------------------------------------------------------

    @property
    def backend(self) -> str:
        """What backs the region's pages: ``"thp"`` or ``"hugetlb"``."""
        return self._backend.name

    @property
    def page_size(self) -> int:
        """The page size backing this region, in bytes: the PMD size for
        THP, the pool's page size for hugetlb (2 MiB or 1 GiB)."""
        return self._backend.page_size()

    copy_mode = property(_copy.mode)


def alloc(
    size: int,
    *,
    fork: Optional[str] = None,
    populate: bool = True,
    strict: Optional[bool] = None,
    name: Optional[str] = None,
    backend: str = "thp",
    page_size: Optional[int] = None, copy_mode: str = "auto",
) -> Region:
    """Allocate a huge-page region of at least ``size`` bytes.

    ``size`` is rounded up to the page size (the PMD size, 2 MiB on x86-64,
    for THP; ``page_size`` for hugetlb). ``fork`` is the fork policy:
    ``"share"``, ``"copy"``, ``"wipe"`` or ``"private"``; when None,
    :func:`default_policy` (``THPGUARD_FORK_POLICY``, else ``share``).
    ``populate`` faults every page in now. ``name`` (letters, digits and
    ``._-``, at most 48 characters) labels the region in ``thpguard
    status``, in metrics and in the message a child gets if it touches a
    ``private`` region.

    ``backend`` (:attr:`Region.backend`): ``"thp"`` (default), transparent
    huge pages, repaired; with ``strict``,
    :class:`~thpguard.errors.HugePagesUnavailableError` where they cannot
    be had, else small pages, as ``Region.degraded`` says. ``"hugetlb"``:
    pages of the pool of ``page_size`` bytes (default the PMD size),
    reserved at mapping time, never split; ``strict`` defaults to True and
    raises with the command that grows the pool, ``strict=False`` falls
    back to THP. ``"auto"``: hugetlb when the pool holds the region, else
    THP. See :doc:`hugetlb`. ``copy_mode`` (auto, lazy, eager): how ``copy`` copies (``lazy``: THP only), :doc:`copy`.
    """
    size = _check_size(size)
    name = _check_name(name)
    fork = default_policy() if fork is None else _check_policy(fork)
    if not isinstance(backend, str) or backend not in (*BACKENDS, "auto"):
        raise InvalidArgumentError(f"unknown backend {backend!r}; this build has "
                                   f"{', '.join(sorted((*BACKENDS, 'auto')))}")
    if strict is None:
        strict = backend == "hugetlb"
    for arg, value in (("populate", populate), ("strict", strict)):
        if not isinstance(value, bool):
            raise InvalidTypeError(f"{arg} must be True or False, got {value!r}")
    _copy.check_mode(copy_mode, fork)
    backend, why = _copy.backend_for(copy_mode, fork, backend)  # a lazy copy is THP only
    if backend in ("hugetlb", "auto"):
        return make_hugetlb(lambda strict_, backend_: Region(
            size, fork, populate, strict_, name, backend_, copy_mode), size, backend, strict, page_size)
    check_page_size(backend, page_size)
    return Region(size, fork, populate, strict, name, backend, copy_mode, why)
