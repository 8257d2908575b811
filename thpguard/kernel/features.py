"""The capability registry: what this kernel and this process offer, probed once.

:data:`registry` is the one place that knows the capabilities. It probes
on first use and caches the result (per pair of roots); tests give it a
stand-in native layer with :meth:`CapabilityRegistry.set_native` instead of
patching private names. Without the native module every feature reads as
unavailable, with the reason.

The functional probes (a scratch 2 MiB mapping, ``madvise``, one
``MADV_COLLAPSE``, one ``PAGEMAP_SCAN``) go through the private native
module; everything else is parsing.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
import platform
import threading
from typing import Any, Dict, Optional, Tuple

from ._files import Roots, _roots
from .hugetlb import GIGANTIC, cpu_has_gigantic_pages, hugetlb_sizes
from .procfs import read_smaps, read_status, read_vmstat
from .sysfs import kernel_release, khugepaged_settings, mthp_sizes, pmd_size, thp_mode

# include/uapi/linux/prctl.h (6.18): PR_GET_THP_DISABLE returns "1 | flags".
PR_THP_DISABLE_EXCEPT_ADVISED = 2



@dataclasses.dataclass(frozen=True)
class Feature:
    """Whether a kernel feature works here, and why (or why not)."""

    available: bool
    reason: str

    def as_dict(self) -> dict:
        return {"available": self.available, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this kernel and this process offer for THP (see :func:`capabilities`).

    Sizes are in bytes; any field may be None where the kernel does not say.
    ``thp_disable`` is the raw ``prctl(PR_GET_THP_DISABLE)`` result: 0 not
    disabled, 1 disabled completely, 3 disabled except for advised regions
    (6.18 ``PR_THP_DISABLE_EXCEPT_ADVISED``).
    """

    kernel_release: Optional[str]
    machine: str
    enabled: Optional[str]
    defrag: Optional[str]
    shmem_enabled: Optional[str]
    pmd_size: Optional[int]
    mthp: Dict[int, Optional[str]]
    khugepaged: Dict[str, Optional[int]]
    thp_cow: Optional[str]
    thp_disable: Optional[int]
    status_thp_enabled: Optional[bool]
    collapse: Feature
    pagemap_scan: Feature
    populate_write: Feature
    process_madvise: Feature
    direct_cow: Feature
    #: hugetlb page sizes this kernel has pools for (bytes, ascending).
    hugetlb_sizes: Tuple[int, ...] = ()
    #: whether hugetlb pages can be mapped at all (the PMD-size pool exists).
    hugetlb: Feature = Feature(False, "not probed")
    #: whether 1 GiB hugetlb pages are possible (sysfs pool and CPU pdpe1gb).
    hugetlb_gigantic: Feature = Feature(False, "not probed")

    @property
    def thp_disabled_completely(self) -> bool:
        if self.thp_disable is not None:
            return self.thp_disable == 1
        return self.status_thp_enabled is False

    @property
    def thp_disabled_except_advised(self) -> bool:
        return self.thp_disable is not None and self.thp_disable & PR_THP_DISABLE_EXCEPT_ADVISED != 0

    @property
    def features(self) -> Dict[str, Feature]:
        return {
            "collapse": self.collapse,
            "direct_cow": self.direct_cow,
            "hugetlb": self.hugetlb,
            "hugetlb_gigantic": self.hugetlb_gigantic,
            "pagemap_scan": self.pagemap_scan,
            "populate_write": self.populate_write,
            "process_madvise": self.process_madvise,
        }

    def as_dict(self) -> dict:
        """A JSON-ready dict with stable, sorted keys (sizes as strings of bytes
        in ``mthp`` because JSON keys are strings)."""
        out = {
            "defrag": self.defrag,
            "enabled": self.enabled,
            "features": {k: v.as_dict() for k, v in sorted(self.features.items())},
            "hugetlb_sizes": list(self.hugetlb_sizes),
            "kernel_release": self.kernel_release,
            "khugepaged": dict(sorted(self.khugepaged.items())),
            "machine": self.machine,
            "mthp": {str(k): v for k, v in sorted(self.mthp.items())},
            "pmd_size": self.pmd_size,
            "shmem_enabled": self.shmem_enabled,
            "status_thp_enabled": self.status_thp_enabled,
            "thp_cow": self.thp_cow,
            "thp_disable": self.thp_disable,
        }
        return dict(sorted(out.items()))


def thp_disable_flags() -> Optional[int]:
    """Raw ``prctl(PR_GET_THP_DISABLE)`` of this process, None if unknown."""
    native, _ = registry.native()
    if native is None:
        return None
    try:
        return int(native.thp_disable_get())
    except OSError:
        return None


def _probe_features(native, pmd: Optional[int], thp_disable: Optional[int], thp_cow: Optional[str],
                    roots: Roots) -> Dict[str, Feature]:
    n = native
    feats: Dict[str, Feature] = {}

    def known(advice: int) -> bool:
        try:
            return bool(n.advice_known(advice))
        except OSError:
            return False

    populate_known = known(n.MADV_POPULATE_WRITE)
    feats["populate_write"] = (
        Feature(True, "known to the kernel") if populate_known
        else Feature(False, "kernel lacks MADV_POPULATE_WRITE (older than 5.14); pages are touched instead"))

    cow_known = known(n.MADV_THP_COW)
    if thp_cow is None and not cow_known:
        feats["direct_cow"] = Feature(False, "not in this kernel (thp_cow: proposed, not merged)")
    elif thp_cow is None or not cow_known:
        feats["direct_cow"] = Feature(False, "kernel has only half of direct COW (thp_cow sysfs %s, MADV_THP_COW %s)"
                                      % ("present" if thp_cow else "missing", "known" if cow_known else "unknown"))
    else:
        ident = _direct_cow_identity(n, roots)
        if not ident.available:
            feats["direct_cow"] = Feature(False, "a thp_cow switch and advice 257 are there, but not the "
                                                 f"direct-COW interface thpguard knows: {ident.reason}")
        elif thp_cow == "never":
            feats["direct_cow"] = Feature(False, "thp_cow is never")
        else:
            feats["direct_cow"] = Feature(True, f"thp_cow={thp_cow}, MADV_THP_COW sets the tc VmFlag")

    collapse_known = known(n.MADV_COLLAPSE)
    addr = None
    size = pmd or 0
    try:
        if size:
            addr = n.map_aligned(size, size)
        feats["collapse"] = _probe_collapse(n, addr, size, collapse_known, thp_disable)
        feats["pagemap_scan"] = _probe_pagemap(n, addr, size, roots)
        feats["process_madvise"] = _probe_process_madvise(n, addr, size)
    except OSError as exc:
        reason = f"could not map a probe block: {os.strerror(exc.errno) if exc.errno else exc}"
        for name in ("collapse", "pagemap_scan", "process_madvise"):
            feats.setdefault(name, Feature(False, reason))
    finally:
        if addr is not None:
            try:
                n.unmap(addr, size)
            except OSError:
                pass
    return feats


def _direct_cow_identity(n, roots: Roots) -> Feature:
    """Whether ``thp_cow`` and advice 257 are the direct-COW interface
    thpguard knows: ``MADV_THP_COW`` (257) on a private anonymous page sets
    the ``tc`` VmFlag in smaps, and ``/proc/vmstat`` has the ``thp_cow_*``
    counters. A kernel with its own ``thp_cow`` file and another meaning for
    257 fails this, so it is never taken for direct COW."""
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        addr = n.map_aligned(page, page)
    except OSError as exc:
        return Feature(False, f"could not map a probe page: {os.strerror(exc.errno) if exc.errno else exc}")
    try:
        try:
            n.madvise(addr, page, n.MADV_THP_COW)
        except OSError as exc:
            return Feature(False, "advice 257 on private anonymous memory fails with "
                                  f"{_errno.errorcode.get(exc.errno, exc.errno)}")
        try:
            vma = next((v for v in read_smaps("self", roots) if v.start <= addr < v.end), None)
        except OSError as exc:
            return Feature(False, f"cannot read smaps to check the tc VmFlag: {exc.strerror or exc}")
        if vma is None or "tc" not in vma.vm_flags:
            return Feature(False, "advice 257 does not set the tc VmFlag in smaps")
    finally:
        try:
            n.unmap(addr, page)
        except OSError:
            pass
    counters = sorted(k for k in read_vmstat(roots) if k.startswith("thp_cow_"))
    if not counters:
        return Feature(False, "/proc/vmstat has no thp_cow_* counters")
    return Feature(True, "advice 257 sets the tc VmFlag; /proc/vmstat counts " + ", ".join(counters))


def _probe_collapse(n, addr, size, collapse_known, thp_disable) -> Feature:
    if not collapse_known:
        return Feature(False, "kernel lacks MADV_COLLAPSE (older than 6.1): splits are reported, not repaired")
    if addr is None:
        return Feature(False, "MADV_COLLAPSE known, but the PMD size is unknown")
    import ctypes  # noqa: PLC0415 - only to write one byte

    # Touch before MADV_HUGEPAGE so the fault (under enabled=madvise) maps a
    # small page, and the collapse below does real work.
    ctypes.c_char.from_address(addr).value = b"\x01"
    try:
        n.madvise(addr, size, n.MADV_HUGEPAGE)
        n.madvise(addr, size, n.MADV_COLLAPSE)
        err = 0
    except OSError as exc:
        err = exc.errno
    if err == 0:
        return Feature(True, "repaired a probe block")
    if err == _errno.EINVAL and thp_disable == 1:
        return Feature(False, "this process is THP-disabled by prctl(PR_SET_THP_DISABLE) "
                              "(inherited from its parent?): MADV_COLLAPSE fails with EINVAL")
    return Feature(False, f"MADV_COLLAPSE failed on a probe block: {_errno.errorcode.get(err, err)}")


def _probe_pagemap(n, addr, size, roots: Roots) -> Feature:
    try:
        # A live probe of this process: always the real procfs, not a fake root.
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError as exc:
        return Feature(False, f"cannot open /proc/self/pagemap: {exc.strerror}")
    try:
        start = addr if addr is not None else 0
        n.pagemap_scan(fd, start, start + (size or os.sysconf("SC_PAGE_SIZE")))
    except OSError as exc:
        if exc.errno == _errno.ENOTTY:
            return Feature(False, "kernel lacks PAGEMAP_SCAN (older than 6.7): smaps is used instead")
        return Feature(False, f"PAGEMAP_SCAN failed: {exc.strerror or exc}")
    finally:
        os.close(fd)
    return Feature(True, "scanned a probe block")


def _probe_process_madvise(n, addr, size) -> Feature:
    try:
        pidfd = n.pidfd_open(os.getpid())
    except OSError as exc:
        if exc.errno == _errno.ENOSYS:
            return Feature(False, "kernel lacks pidfd_open (older than 5.3)")
        return Feature(False, f"pidfd_open failed: {exc.strerror or exc}")
    # An empty vector asks only whether the syscall exists: it advises
    # nothing. MADV_COLD (5) is the one advice every kernel with the syscall
    # accepts (5.10 takes only MADV_COLD and MADV_PAGEOUT, and rejects the
    # others with EINVAL before looking at the vector).
    try:
        n.process_madvise(pidfd, [], 5)
    except OSError as exc:
        if exc.errno == _errno.ENOSYS:
            return Feature(False, "kernel lacks process_madvise (older than 5.10)")
        if exc.errno != _errno.EINVAL:
            return Feature(False, f"process_madvise failed: {exc.strerror or exc}")
        # EINVAL: the kernel knows the syscall, not the advice.
    finally:
        os.close(pidfd)
    return Feature(True, "works (on another process: needs CAP_SYS_NICE and ptrace)")


class CapabilityRegistry:
    """Probes the capabilities once and answers from the cache after.

    :meth:`get` returns :class:`Capabilities` (one probe per pair of roots
    until :meth:`clear` or ``refresh=True``); :meth:`knows` whether the
    kernel knows a ``madvise`` advice (one cheap probe per advice). Both
    use the native layer that :meth:`native` returns: the real one, or the
    stand-in a test set with :meth:`set_native`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: Dict[Roots, Capabilities] = {}
        self._advice: Dict[int, bool] = {}
        self._identity: Dict[Roots, Feature] = {}
        self._native: Any = None
        self._native_reason = ""
        self._injected = False

    def native(self) -> Tuple[Any, str]:
        """(native module or None, why not)."""
        if self._injected:
            return self._native, self._native_reason
        try:
            from .. import _native  # noqa: PLC0415 - optional until built
        except ImportError as exc:  # not built, or a partial checkout
            return None, f"native module not available ({exc})"
        return _native, ""

    def set_native(self, native: Any, reason: str = "") -> None:
        """Probe with ``native`` (None: as if the module were missing, with
        ``reason``) from now on, and forget what was cached. For tests."""
        with self._lock:
            self._native, self._native_reason, self._injected = native, reason, True
            self._cache.clear()
            self._advice.clear()
            self._identity.clear()

    def reset(self) -> None:
        """Back to the real native layer, nothing cached."""
        with self._lock:
            self._native, self._native_reason, self._injected = None, "", False
            self._cache.clear()
            self._advice.clear()
            self._identity.clear()

    def clear(self) -> None:
        """Forget the cached results; the next call probes again."""
        with self._lock:
            self._cache.clear()
            self._advice.clear()
            self._identity.clear()

    def get(self, refresh: bool = False, roots: Optional[Roots] = None) -> Capabilities:
        r = _roots(roots)
        with self._lock:
            if not refresh and r in self._cache:
                return self._cache[r]
        caps = _probe(r, *self.native())
        if _out_of_descriptors():
            return caps  # its reads and probes failed with EMFILE: ask again next time
        with self._lock:
            self._cache[r] = caps
        return caps

    def direct_cow_interface(self, refresh: bool = False, roots: Optional[Roots] = None) -> Feature:
        """See :func:`direct_cow_interface` (cached per pair of roots)."""
        r = _roots(roots)
        with self._lock:
            if not refresh and r in self._identity:
                return self._identity[r]
        native, why = self.native()
        if native is None:
            found = Feature(False, why)
        elif thp_mode("thp_cow", r) is None:
            found = Feature(False, "no transparent_hugepage/thp_cow in sysfs")
        else:
            found = _direct_cow_identity(native, r)
        with self._lock:
            self._identity[r] = found
        return found

    def knows(self, advice: int) -> bool:
        """True if the running kernel knows the madvise ``advice`` (cached)."""
        known = self._advice.get(advice)
        if known is None:
            native, _ = self.native()
            try:
                known = bool(native is not None and native.advice_known(advice))
            except OSError:
                known = False
            self._advice[advice] = known
        return known


#: The one capability registry of this process.
registry = CapabilityRegistry()


def capabilities(refresh: bool = False, roots: Optional[Roots] = None) -> Capabilities:
    """Probe what this kernel and process offer, once; later calls return the
    cached result unless *refresh* is true.

    The probe maps one scratch PMD-sized block, collapses it, scans it with
    PAGEMAP_SCAN and unmaps it (a few milliseconds). Without the native
    module every feature reads as unavailable, with the reason.
    """
    return registry.get(refresh, roots)


def direct_cow_interface(roots: Optional[Roots] = None, refresh: bool = False) -> Feature:
    """Whether this kernel has the direct-COW interface thpguard drives
    (``thp_cow`` in sysfs, and ``MADV_THP_COW`` that sets the ``tc`` VmFlag
    with ``thp_cow_*`` counters in ``/proc/vmstat``), whatever the mode.

    Probed once (a scratch page, one ``madvise``, one smaps read) and cached
    unless *refresh*; ``verify --fix`` asks it before it writes ``thp_cow``.
    """
    return registry.direct_cow_interface(refresh, roots)


def _out_of_descriptors() -> bool:
    try:
        os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        return exc.errno in (_errno.EMFILE, _errno.ENFILE)
    return False


def _probe(r: Roots, native: Any, why: str) -> Capabilities:
    pmd = pmd_size(r)
    cow = thp_mode("thp_cow", r)
    thp_disable = None
    if native is not None:
        try:
            thp_disable = int(native.thp_disable_get())
        except OSError:
            thp_disable = None
    try:
        status_thp = read_status("self", r).thp_enabled
    except OSError:
        status_thp = None
    if native is None:
        feats = {k: Feature(False, why) for k in
                 ("collapse", "pagemap_scan", "populate_write", "process_madvise", "direct_cow")}
    else:
        with native.faults_suspended():  # not the faults a test injected
            feats = _probe_features(native, pmd, thp_disable, cow, r)
    return Capabilities(
        kernel_release=kernel_release(r),
        machine=platform.machine(),
        enabled=thp_mode("enabled", r),
        defrag=thp_mode("defrag", r),
        shmem_enabled=thp_mode("shmem_enabled", r),
        pmd_size=pmd,
        mthp=mthp_sizes(r),
        khugepaged=khugepaged_settings(r),
        thp_cow=cow,
        thp_disable=thp_disable,
        status_thp_enabled=status_thp,
        **feats,
        **_hugetlb_fields(r, native, why),
    )


def _hugetlb_fields(r: Roots, native: Any, why: str) -> Dict[str, Any]:
    sizes, basic, gig = _hugetlb_features(r)
    if native is None:  # regions need the native layer, whatever the pools say
        basic = gig = Feature(False, why)
    return {"hugetlb_sizes": sizes, "hugetlb": basic, "hugetlb_gigantic": gig}


def _hugetlb_features(r: Roots) -> Tuple[Tuple[int, ...], Feature, Feature]:
    sizes = tuple(hugetlb_sizes(r))
    if not sizes:
        none = Feature(False, "kernel has no hugetlb pools (no /sys/kernel/mm/hugepages)")
        return sizes, none, none
    pmd = pmd_size(r)
    if pmd in sizes:
        basic = Feature(True, f"pools of {', '.join(_fmt(s) for s in sizes)}")
    else:
        basic = Feature(False, "no hugetlb pool of the PMD size")
    cpu = cpu_has_gigantic_pages(r)
    if GIGANTIC not in sizes:
        gig = Feature(False, "kernel has no 1 GiB pool (hugepages-1048576kB)"
                      + ("; the CPU lacks pdpe1gb" if cpu is False else ""))
    elif cpu is False:
        gig = Feature(False, "the CPU lacks pdpe1gb")
    else:
        gig = Feature(True, "1 GiB pool present" + (", CPU has pdpe1gb" if cpu else ""))
    return sizes, basic, gig


def _fmt(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB" if size >= 1 << 20 \
        else f"{size >> 10} KiB"


def can_get_huge_pages(caps: Optional[Capabilities] = None,
                       roots: Optional[Roots] = None) -> Tuple[bool, str]:
    """Whether this process can get PMD-mapped huge pages at all, and why not.

    False when the PMD size is unknown, when THP is ``never`` (globally or
    for the PMD size) and ``MADV_COLLAPSE`` cannot help, or when the process
    is THP-disabled by prctl without the except-advised flag. Without
    *caps* it reads the settings directly and runs the capability probe
    only when THP is ``never`` (to learn whether MADV_COLLAPSE can help).
    """
    r = _roots(roots)
    if caps is not None:
        pmd, enabled, mthp = caps.pmd_size, caps.enabled, caps.mthp
        completely = caps.thp_disabled_completely
    else:
        pmd, enabled, mthp = pmd_size(r), thp_mode("enabled", r), mthp_sizes(r)
        raw = thp_disable_flags()
        if raw is None:
            try:
                completely = read_status("self", r).thp_enabled is False
            except OSError:
                completely = False
        else:
            completely = raw == 1
    if pmd is None:
        return False, "the PMD huge page size is unknown (no transparent_hugepage/hpage_pmd_size)"
    if completely:
        return False, ("this process is THP-disabled by prctl(PR_SET_THP_DISABLE), "
                       "usually inherited from a parent; start it from a parent that does not set it")
    pmd_mode = mthp.get(pmd)
    if pmd_mode in ("always", "madvise"):
        never = False  # the per-size setting overrides the global one
    else:
        never = enabled == "never" or pmd_mode == "never" or (enabled is None and not mthp)
    if not never:
        return True, "ok"
    collapse = (caps or capabilities(roots=r)).collapse
    if collapse.available:
        return True, "ok (faults give small pages; MADV_COLLAPSE builds the huge pages)"
    where = "hugepages-%dkB/enabled" % (pmd // 1024) if pmd_mode == "never" else "enabled"
    return False, (f"THP is off (transparent_hugepage/{where} = never) and "
                   f"MADV_COLLAPSE is unavailable: {collapse.reason}")

