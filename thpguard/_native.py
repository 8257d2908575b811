"""Plain-Python face of the native core (the only module that sees cffi).

Every function takes and returns ints, lists and tuples; a failed call
raises :class:`~thpguard.errors.KernelCallError` carrying the errno. The C
contract is ``native/thpguard.h``. cffi releases the GIL around each call,
so long operations (collapse, copy) do not block other Python threads.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import logging
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ._cffi import ffi, lib
from .errors import InvalidArgumentError, KernelCallError, kernel_error

MADV_DONTFORK = lib.TG_MADV_DONTFORK
MADV_DOFORK = lib.TG_MADV_DOFORK
MADV_HUGEPAGE = lib.TG_MADV_HUGEPAGE
MADV_NOHUGEPAGE = lib.TG_MADV_NOHUGEPAGE
MADV_WIPEONFORK = lib.TG_MADV_WIPEONFORK
MADV_KEEPONFORK = lib.TG_MADV_KEEPONFORK
MADV_POPULATE_READ = lib.TG_MADV_POPULATE_READ
MADV_POPULATE_WRITE = lib.TG_MADV_POPULATE_WRITE
MADV_COLLAPSE = lib.TG_MADV_COLLAPSE
MADV_THP_COW = lib.TG_MADV_THP_COW

PAGE_IS_PRESENT = lib.TG_PAGE_IS_PRESENT
PAGE_IS_SWAPPED = lib.TG_PAGE_IS_SWAPPED
PAGE_IS_PFNZERO = lib.TG_PAGE_IS_PFNZERO
PAGE_IS_HUGE = lib.TG_PAGE_IS_HUGE
MAP_HUGETLB = lib.TG_MAP_HUGETLB
MAP_HUGE_SHIFT = lib.TG_MAP_HUGE_SHIFT

ADVICE_NAMES: Dict[int, str] = {
    MADV_DONTFORK: "MADV_DONTFORK",
    MADV_DOFORK: "MADV_DOFORK",
    MADV_HUGEPAGE: "MADV_HUGEPAGE",
    MADV_NOHUGEPAGE: "MADV_NOHUGEPAGE",
    MADV_WIPEONFORK: "MADV_WIPEONFORK",
    MADV_KEEPONFORK: "MADV_KEEPONFORK",
    MADV_POPULATE_READ: "MADV_POPULATE_READ",
    MADV_POPULATE_WRITE: "MADV_POPULATE_WRITE",
    MADV_COLLAPSE: "MADV_COLLAPSE",
    MADV_THP_COW: "MADV_THP_COW",
}

FAULT_OPS: Dict[str, int] = {
    "collapse": lib.TG_FAULT_COLLAPSE,
    "map": lib.TG_FAULT_MAP,
    "scan": lib.TG_FAULT_SCAN,
    "mremap": lib.TG_FAULT_MREMAP,
    "copy_block": lib.TG_FAULT_COPY_BLOCK,
    "copy_arm": lib.TG_FAULT_COPY_ARM,
}

COPY_METHODS: Dict[int, str] = {
    lib.TG_COPY_MOVE: "move",
    lib.TG_COPY_REMAP: "mremap",
    lib.TG_COPY_COLLAPSE: "collapse",
}

_COPY_STATS_FIELDS = (
    "wp_faults", "missing_faults", "copies", "reuses", "missing_fills", "cow_fallbacks",
    "inline_allocs", "copy_ns", "regions", "pool_ready", "arm_ns", "ready_wait_ns",
)

_SCAN_VEC = 512


def _ptr(addr: int):
    return ffi.cast("void *", addr)


def _check(rc: int, operation: str, addr: int = None, length: int = None) -> None:
    if rc != 0:
        rng = None if addr is None else (addr, length or 0)
        raise kernel_error(ffi.errno, operation, rng)


def _advice_name(advice: int) -> str:
    return ADVICE_NAMES.get(advice, str(advice))


def buffer_address(obj) -> int:
    """Address of the first byte of a writable buffer (e.g. an mmap)."""
    cdata = ffi.from_buffer(obj, require_writable=True)
    try:
        return int(ffi.cast("uintptr_t", cdata))
    finally:
        ffi.release(cdata)


def map_aligned(size: int, align: int) -> int:
    """Map ``size`` bytes private anonymous at an ``align``-aligned address."""
    out = ffi.new("void **")
    _check(lib.tg_map_aligned(size, align, out), "mmap", 0, size)
    return int(ffi.cast("uintptr_t", out[0]))


def unmap(addr: int, size: int) -> None:
    _check(lib.tg_unmap(_ptr(addr), size), "munmap", addr, size)


def madvise(addr: int, length: int, advice: int) -> None:
    _check(
        lib.tg_madvise(_ptr(addr), length, advice),
        f"madvise({_advice_name(advice)})",
        addr,
        length,
    )


def advice_known(advice: int) -> bool:
    """True if the running kernel knows ``advice`` (probed, changes nothing)."""
    known = ffi.new("int *")
    _check(lib.tg_advice_known(advice, known), f"madvise({_advice_name(advice)}, 0)")
    return bool(known[0])


def populate_write(addr: int, length: int, page_size: int) -> None:
    _check(
        lib.tg_populate_write(_ptr(addr), length, page_size),
        "madvise(MADV_POPULATE_WRITE)",
        addr,
        length,
    )


def pagemap_scan(fd: int, start: int, end: int) -> List[Tuple[int, int, int]]:
    """PAGEMAP_SCAN over ``[start, end)``: ``(start, end, categories)`` runs.

    Categories are masked to present, swapped, zero-page and huge. Follows
    ``walk_end`` until the whole range is walked.
    """
    vec = ffi.new("struct tg_page_region[]", _SCAN_VEC)
    n_out = ffi.new("size_t *")
    walk_end = ffi.new("uint64_t *")
    mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE
    runs: List[Tuple[int, int, int]] = []
    at = start
    while at < end:
        rc = lib.tg_pagemap_scan(fd, at, end, mask, vec, _SCAN_VEC, n_out, walk_end)
        _check(rc, "ioctl(PAGEMAP_SCAN)", at, end - at)
        for i in range(n_out[0]):
            runs.append((vec[i].start, vec[i].end, vec[i].categories))
        if walk_end[0] <= at:
            break
        at = walk_end[0]
    return runs


def huge_bytes(fd: int, start: int, end: int) -> Tuple[int, int]:
    """``tg_huge_bytes``: (huge, present) bytes of ``[start, end)`` by the C core."""
    huge = ffi.new("uint64_t *")
    present = ffi.new("uint64_t *")
    _check(lib.tg_huge_bytes(fd, start, end, huge, present), "tg_huge_bytes", start, end - start)
    return huge[0], present[0]


def block_counts(fd: int, start: int, end: int, pmd: int) -> Dict[str, int]:
    """``tg_block_counts``: the C core's count of each block kind, and bytes."""
    out = ffi.new("struct tg_block_counts *")
    _check(lib.tg_block_counts(fd, start, end, pmd, out), "tg_block_counts",
           start, end - start)
    return {name: getattr(out, name) for name in
            ("huge_bytes", "present_bytes", "huge", "zero", "split", "partial", "absent")}


def collapse(addr: int, length: int, chunk: int, max_retries: int) -> List[int]:
    """MADV_COLLAPSE in ``chunk``-byte pieces; errno per chunk (0 = collapsed)."""
    if chunk <= 0:
        raise InvalidArgumentError(f"collapse chunk must be > 0 bytes, got {chunk}")
    n_chunks = (length + chunk - 1) // chunk
    errs = ffi.new("int[]", max(n_chunks, 1))
    lib.tg_collapse(_ptr(addr), length, chunk, max_retries, errs, n_chunks)
    return [errs[i] for i in range(n_chunks)]


def pidfd_open(pid: int) -> int:
    fd = ffi.new("int *")
    _check(lib.tg_pidfd_open(pid, fd), f"pidfd_open({pid})")
    return fd[0]


def process_madvise(pidfd: int, ranges: Sequence[Tuple[int, int]], advice: int) -> int:
    """process_madvise(2) on ``ranges`` of ``(addr, length)``; bytes advised."""
    n = len(ranges)
    addrs = ffi.new("uint64_t[]", [r[0] for r in ranges] or [0])
    lens = ffi.new("uint64_t[]", [r[1] for r in ranges] or [0])
    advised = ffi.new("size_t *")
    rc = lib.tg_process_madvise(pidfd, addrs, lens, n, advice, advised)
    first = ranges[0] if ranges else None
    if rc != 0:
        raise kernel_error(
            ffi.errno, f"process_madvise({_advice_name(advice)})", first
        )
    return advised[0]


def copy_remap(addr: int, length: int, align: int) -> None:
    _check(lib.tg_copy_remap(_ptr(addr), length, align), "copy and mremap", addr, length)


def copy_probe() -> Dict[str, object]:
    """Whether this process can use userfaultfd block copy (``tg_copy_probe``).

    Keys: ``stage`` ("ok", "open", "api", "wp", "scan"), ``errno`` at that stage,
    ``source`` ("syscall", "device" or None), ``user_mode_only`` (only a
    user-mode-only userfaultfd was available), ``move`` (UFFDIO_MOVE).
    """
    out = ffi.new("struct tg_copy_probe *")
    _check(lib.tg_copy_probe(out), "userfaultfd probe")
    stages = {lib.TG_PROBE_OK: "ok", lib.TG_PROBE_OPEN: "open", lib.TG_PROBE_API: "api",
              lib.TG_PROBE_WP: "wp", lib.TG_PROBE_SCAN: "scan"}
    return {
        "stage": stages.get(out.stage, str(out.stage)),
        "errno": out.err,
        "source": {1: "syscall", 2: "device"}.get(out.source),
        "user_mode_only": bool(out.user_mode_only),
        "move": bool(out.has_move),
    }


def copy_register(addr: int, length: int, block: int) -> None:
    _check(lib.tg_copy_register(_ptr(addr), length, block), "userfaultfd register", addr, length)


def copy_unregister(addr: int) -> bool:
    """Unregister the copy region at ``addr``; False if it was not registered."""
    if lib.tg_copy_unregister(_ptr(addr)) != 0:
        if ffi.errno == _errno.ENOENT:
            return False
        _check(-1, "userfaultfd unregister", addr, 0)
    return True


def copy_arm() -> None:
    """Write-protect every registered copy region now."""
    _check(lib.tg_copy_arm(), "userfaultfd write-protect")


def copy_stats() -> Dict[str, object]:
    """This process's block-copy counters (``struct tg_copy_stats``)."""
    out = ffi.new("struct tg_copy_stats *")
    _check(lib.tg_copy_stats(out), "copy stats")
    stats: Dict[str, object] = {name: int(getattr(out, name)) for name in _COPY_STATS_FIELDS}
    stats["fallbacks"] = stats["cow_fallbacks"]  # the old name: kept through 0.1, gone in 0.2
    stats["method"] = COPY_METHODS.get(out.method)
    stats["arm_errno"] = out.arm_errno
    return stats


def copy_set_method(name: str) -> None:
    """Force ``"move"``, ``"mremap"`` or ``"collapse"`` before the first region
    (benchmarks); ``"auto"`` picks the best the kernel offers."""
    numbers = {v: k for k, v in COPY_METHODS.items()}
    numbers["auto"] = 0
    if name not in numbers:
        raise InvalidArgumentError(f"copy method must be one of {sorted(numbers)}, got {name!r}")
    _check(lib.tg_copy_set_method(numbers[name]), "copy method")


def copy_set_pool(blocks: int) -> None:
    _check(lib.tg_copy_set_pool(blocks), "copy pool")


def copy_set_child_prefill(blocks: int) -> None:
    """Pool blocks a child fills before its code runs (``tg_copy_set_child_prefill``)."""
    _check(lib.tg_copy_set_child_prefill(blocks), "copy child prefill")


def copy_set_child_ready_wait(seconds: float) -> None:
    """How long a child's at-fork handler waits at most for its handler
    thread to poll (``tg_copy_set_child_ready_wait``); 0: not at all."""
    _check(lib.tg_copy_set_child_ready_wait(int(seconds * 1e6)), "copy child ready wait")


def copy_set_refill_delay(seconds: float) -> None:
    """How long the handler waits after a fault before refilling its pool
    (``tg_copy_set_refill_delay``, whole milliseconds); 0: at once."""
    _check(lib.tg_copy_set_refill_delay(round(seconds * 1e3)), "copy refill delay")


def map_flags(addr: int, length: int, extra_flags: int) -> int:
    """Map ``length`` bytes private anonymous with ``extra_flags`` (with a
    reservation, never ``MAP_NORESERVE``); at ``addr`` (``MAP_FIXED``) unless 0."""
    out = ffi.new("void **")
    _check(lib.tg_map_flags(_ptr(addr) if addr else ffi.NULL, length, extra_flags, out),
           "mmap", addr, length)
    return int(ffi.cast("uintptr_t", out[0]))


def map_unmergeable(addr: int, length: int) -> None:
    """Replace the fresh range by a mapping that a later neighbour mapping
    never merges with (``tg_map_unmergeable``)."""
    _check(lib.tg_map_unmergeable(_ptr(addr), length), "mmap and mremap", addr, length)


def copy_remap_flags(addr: int, length: int, extra_flags: int) -> None:
    """Copy a range into a fresh mapping made with ``extra_flags`` and move it over."""
    _check(lib.tg_copy_remap_flags(_ptr(addr), length, extra_flags),
           "copy and mremap", addr, length)


def placeholder_add(addr: int, length: int, name: Optional[str] = None) -> None:
    """Reserve the range in every child; ``name`` is shown if a child touches it."""
    label = (name or "").encode("utf-8", "replace")[: lib.TG_PLACEHOLDER_NAME_MAX - 1]
    if lib.tg_placeholder_add(_ptr(addr), length, label) != 0:
        if ffi.errno == _errno.ENOSPC:
            raise KernelCallError(_errno.ENOSPC, "placeholder_add", (addr, length),
                                  f"a process holds at most {lib.TG_MAX_PLACEHOLDERS} open "
                                  "fork='private' regions; close some, or use fewer larger ones")
        _check(-1, "placeholder_add", addr, length)


#: memfd name prefix of the marker page in front of each region: maps show
#: ``/memfd:thpguard-region:NAME (deleted)`` right before the region's VMA,
#: ``/memfd:thpguard-region:NAME;copy=MECHANISM (deleted)`` for a ``copy``
#: region (names never hold ``;``).
MARKER_PREFIX = "thpguard-region:"
#: What follows the name in a ``copy`` region's marker: its copy mechanism.
MARKER_COPY = ";copy="
#: memfd name prefix of the marker page below the lazy copy's pool of
#: pre-faulted huge pages, followed by the pool's length in bytes
#: (``TG_COPY_POOL_MARKER`` in native/thpguard.h).
POOL_MARKER_PREFIX = "thpguard-copy-pool:"


def map_marker(addr: int, length: int, name: Optional[str], copy_mode: Optional[str] = None) -> None:
    """Put a PROT_NONE page of a memfd named after the region (and, for a
    ``copy`` region, its copy mechanism) at ``addr``."""
    label = MARKER_PREFIX + (name or "") + (MARKER_COPY + copy_mode if copy_mode else "")
    fd = os.memfd_create(label, os.MFD_CLOEXEC)
    try:
        _check(lib.tg_map_marker(_ptr(addr), length, fd), "mmap marker", addr, length)
    finally:
        os.close(fd)


def placeholder_remove(addr: int) -> None:
    if lib.tg_placeholder_remove(_ptr(addr)) != 0 and ffi.errno != _errno.ENOENT:
        _check(-1, "placeholder_remove", addr, 0)


def atfork_install() -> None:
    _check(lib.tg_atfork_install(), "pthread_atfork")


def fork_generation() -> int:
    return lib.tg_fork_generation()


def fork_claim() -> bool:
    """True exactly once per new fork generation (see ``tg_fork_claim``)."""
    return bool(lib.tg_fork_claim())


@contextlib.contextmanager
def faults_suspended() -> Iterator[None]:
    """Injected faults do not apply to this thread's calls inside the block.

    For thpguard's own probes, which must not consume faults a test set up
    for the code under test.
    """
    lib.tg_fault_suspend(1)
    try:
        yield
    finally:
        lib.tg_fault_suspend(0)


def thp_disable_get() -> int:
    value = ffi.new("int *")
    _check(lib.tg_thp_disable_get(value), "prctl(PR_GET_THP_DISABLE)")
    return value[0]


def thp_disable_set(disable: int, flags: int = 0) -> None:
    _check(lib.tg_thp_disable_set(disable, flags), "prctl(PR_SET_THP_DISABLE)")


def fault_inject(op: str, err: int, count: int = 1) -> None:
    """Make the next ``count`` native calls of ``op`` fail with ``err``.

    ``op`` is one of ``"collapse"``, ``"map"``, ``"scan"``, ``"mremap"``,
    ``"copy_block"`` (the new block a copy region's write fault needs) or
    ``"copy_arm"`` (arming a child's copy regions at fork).
    For tests and drills only; nothing is injected unless this is called
    or ``THPGUARD_FAULTS`` is set when thpguard is imported.
    """
    if not isinstance(op, str) or op not in FAULT_OPS:
        raise InvalidArgumentError(
            f"unknown fault op {op!r}; expected one of {sorted(FAULT_OPS)}"
        )
    for name, value, limit in (("errno", err, _MAX_ERRNO), ("count", count, _MAX_FAULTS)):
        if not isinstance(value, int) or not 0 <= value <= limit:
            raise InvalidArgumentError(f"fault {name} must be an int from 0 to {limit}, got {value!r}")
    if count and not err:
        raise InvalidArgumentError("fault errno must be > 0 when count > 0")
    _check(lib.tg_fault_inject(FAULT_OPS[op], err, count), "fault_inject")


_MAX_ERRNO = 4095  # the kernel's MAX_ERRNO
_MAX_FAULTS = 2**31 - 1  # a C int


def fault_clear() -> None:
    """Cancel every pending injected fault."""
    lib.tg_fault_clear()


def fault_take(op: str) -> int:
    """Consume one injected fault of ``op`` for a call Python makes itself.

    Returns the errno to fail with, or 0. The region mapping is made by
    the :mod:`mmap` module, not by C, and takes its ``"map"`` faults here.
    """
    return lib.tg_fault_take(FAULT_OPS[op])


def _faults_from_environment(spec: str) -> None:
    """Parse ``THPGUARD_FAULTS="op:ERRNO:count,..."`` (ERRNO a name or number)."""
    names = {name: num for num, name in _errno.errorcode.items()}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise InvalidArgumentError(
                f"THPGUARD_FAULTS entry {item!r}: expected op:ERRNO[:count]"
            )
        err = int(parts[1]) if _DECIMAL.fullmatch(parts[1]) else names.get(parts[1])
        if err is None:
            raise InvalidArgumentError(
                f"THPGUARD_FAULTS entry {item!r}: unknown errno {parts[1]!r} "
                "(a name such as ENOMEM, or a number)"
            )
        count = 1
        if len(parts) == 3:
            if not _DECIMAL.fullmatch(parts[2]):
                raise InvalidArgumentError(
                    f"THPGUARD_FAULTS entry {item!r}: count {parts[2]!r} is not a number"
                )
            count = int(parts[2])
        try:
            fault_inject(parts[0], err, count)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"THPGUARD_FAULTS entry {item!r}: {exc}") from None


_DECIMAL = re.compile(r"[0-9]+")


def _arm_faults_from_environment() -> None:
    """Arm ``THPGUARD_FAULTS`` at import; never raises.

    Ignored in a process whose real and effective ids differ (a setuid or
    setgid program: the environment belongs to whoever started it); a
    malformed value is logged once and arms nothing.
    """
    spec = os.environ.get("THPGUARD_FAULTS")
    if not spec:
        return
    log = logging.getLogger("thpguard")
    if os.getuid() != os.geteuid() or os.getgid() != os.getegid():
        log.warning("THPGUARD_FAULTS is ignored in a setuid/setgid process")
        return
    try:
        _faults_from_environment(spec)
    except InvalidArgumentError as exc:
        fault_clear()
        log.warning("%s; no faults armed", exc)


_arm_faults_from_environment()

