"""Functional probes of the capability registry: each asks the kernel one
question through the private native layer (a scratch mapping, one
``madvise``, one ``PAGEMAP_SCAN``, ...) and answers with a :class:`Feature`
that says why. Only :mod:`thpguard.kernel.features` calls them.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os

from ._files import Roots
from .procfs import read_smaps, read_vmstat


@dataclasses.dataclass(frozen=True)
class Feature:
    """Whether a kernel feature works here, and why (or why not)."""

    available: bool
    reason: str

    def as_dict(self) -> dict:
        return {"available": self.available, "reason": self.reason}



def _has_sys_ptrace() -> bool:
    """CAP_SYS_PTRACE (bit 19) in this process's effective capabilities."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 19 & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False

def direct_cow_identity(n, roots: Roots) -> Feature:
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


def probe_copy_userfault(n) -> Feature:
    """Whether `copy` regions can copy blocks lazily with userfaultfd here."""
    probe = getattr(n, "copy_probe", None)
    if probe is None:
        return Feature(False, "the native layer has no userfaultfd block copy")
    try:
        p = probe()
    except OSError as exc:
        return Feature(False, f"userfaultfd probe failed: {os.strerror(exc.errno) if exc.errno else exc}")
    err = _errno.errorcode.get(p["errno"], str(p["errno"]))
    if p["stage"] == "ok":
        how = "userfaultfd(2)" if p["source"] == "syscall" else "/dev/userfaultfd"
        put = ("UFFDIO_MOVE" if p["move"]
               else "mremap (no UFFDIO_MOVE before Linux 6.8: one VMA per copied block)")
        return Feature(True, f"write-protect faults, kernel-mode faults included ({how}); blocks put in place with {put}")
    if p["stage"] == "open":
        if p["errno"] == _errno.ENOSYS:
            return Feature(False, "no userfaultfd: kernel built without CONFIG_USERFAULTFD, "
                                  "or a seccomp filter blocks it (ENOSYS)")
        why = ("userfaultfd that handles kernel-mode faults needs CAP_SYS_PTRACE, "
               "vm.unprivileged_userfaultfd=1 or read-write access to /dev/userfaultfd "
               f"({err}"
               + ("; this process has CAP_SYS_PTRACE, so a seccomp filter refusing "
                  "userfaultfd is the likely cause" if _has_sys_ptrace() else "") + ")")
        if p["user_mode_only"]:
            why += ("; only a user-mode-only userfaultfd is allowed, which would make read() "
                    "into a region fail with EFAULT, so it is not used")
        return Feature(False, why)
    if p["stage"] == "api":
        return Feature(False, f"kernel refuses userfaultfd write-protect (Linux 5.7+; UFFDIO_API: {err})")
    if p["stage"] == "scan":
        return Feature(False, "no PAGEMAP_SCAN (Linux 6.7+) to tell a whole huge block from a "
                              f"split one ({err})")
    return Feature(False, f"write-protecting a huge-page block with userfaultfd failed ({err})")


def probe_collapse(n, addr, size, collapse_known, thp_disable) -> Feature:
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


def probe_pagemap(n, addr, size, roots: Roots) -> Feature:
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


def probe_process_madvise(n, addr, size) -> Feature:
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
