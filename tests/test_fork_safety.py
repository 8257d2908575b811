"""Fork safety: nothing held, leaked or closed that is not thpguard's, whichever way a process forks."""

import ctypes
import errno
import gc
import os
import pickle

import pytest

import thpguard
from thpguard import _native, errors, kernel, pagemap
from conftest import exit_child, fork_from_threads, read_pipe, run_in_child, smaps_vma, wait_child

MiB = 1 << 20


def test_copy_region_dropped_after_fork_is_unmapped(require_thp):
    """A `copy` region dropped after a fork is unmapped: the fork hand-shake keeps no reference."""
    region = thpguard.alloc(2 * MiB, fork="copy")
    address = region.address
    assert run_in_child(lambda: True)
    del region
    gc.collect()
    assert smaps_vma(os.getpid(), address) is None


def test_late_fork_does_not_close_a_reused_fd(require_thp, tmp_path):
    """After a fork that bypassed Python, the inherited pagemap fd number is left alone once the program reused it."""
    region = thpguard.alloc(2 * MiB)
    region.coverage()  # opens this process's pagemap fd
    inherited = pagemap._self_pagemap().fd()
    path = tmp_path / "app.log"
    read_end, write_end = os.pipe()
    pid = ctypes.PyDLL(None).fork()  # keeps the GIL; no Python hook runs
    if pid == 0:
        ok = False
        try:
            os.close(inherited)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT)
            reused = fd == inherited
            region.coverage()  # notices the fork late
            os.write(fd, b"still open")
            ok = reused
        finally:
            os.write(write_end, b"1" if ok else b"0")
            os._exit(0)
    os.close(write_end)
    answer = read_pipe(read_end, "the child's answer (did it reuse the fd?)", pid=pid)
    os.close(read_end)
    wait_child(pid, "the child to exit after it answered")
    assert answer == b"1" and path.read_bytes() == b"still open"
    region.close()


def test_concurrent_forks_with_copy_regions(require_thp):
    """Forks from several threads with a `copy` region all finish: no child holds another's hand-shake."""
    region = thpguard.alloc(4 * MiB, fork="copy")
    region.view()[:4] = b"data"
    failures = []

    def forker():
        for _ in range(10):
            pid = os.fork()
            if pid == 0:
                exit_child(lambda: 0 if bytes(region.view()[:4]) == b"data" else 1)
            try:
                status = wait_child(pid, "a child forked from a thread to read the copy")
            except BaseException as exc:  # a hang: wait_child killed it and failed
                failures.append(str(exc))
                return
            if os.waitstatus_to_exitcode(status) != 0:
                failures.append(status)

    fork_from_threads(3, forker)
    assert failures == []
    region.close()


def test_native_map_of_odd_size_leaves_nothing_behind():
    """map_aligned with a size that is not a page multiple unmaps all its slack."""
    def mapped():
        return len(open("/proc/self/maps").read().splitlines())

    before = mapped()
    for _ in range(20):
        addr = _native.map_aligned(4097, 2 * MiB)
        assert addr % (2 * MiB) == 0
        _native.unmap(addr, 4097)
    # Slack left behind would add a mapping or two per call (20 or more);
    # other threads (a sanitizer's allocator) may add a few meanwhile.
    assert mapped() <= before + 5


def test_capability_probe_keeps_injected_faults(require_thp):
    """capabilities() probes without consuming a fault a test injected for the code under test."""
    _native.fault_inject("map", errno.ENOMEM, 1)
    try:
        caps = kernel.capabilities(refresh=True)
        assert caps.collapse.available and caps.pagemap_scan.available
        with pytest.raises(thpguard.KernelCallError) as info:
            thpguard.alloc(2 * MiB)
        assert info.value.errno == errno.ENOMEM
    finally:
        _native.fault_clear()


@pytest.mark.parametrize("exc", [
    errors.RegionClosedError("cannot view it: the region is closed", object()),
    errors.HugePagesUnavailableError("THP is off", "/sys/kernel/mm/transparent_hugepage/enabled"),
    errors.UnsupportedError("MADV_COLLAPSE", "needs Linux 6.1"),
    errors.kernel_error(errno.ENOMEM, "madvise(MADV_COLLAPSE)", (0x200000, 0x200000)),
])
def test_errors_survive_pickling(exc):
    """Exceptions cross process boundaries (multiprocessing) with message and fields intact."""
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc) and str(copy) == str(exc)
    for field in ("errno", "operation", "range", "reason", "setting", "feature"):
        assert getattr(copy, field, None) == getattr(exc, field, None)


def test_pagemap_fd_closed_and_reused_behind_our_back(require_thp, tmp_path):
    """After the program closes every fd (a daemonizing closerange) and reuses the number, coverage
    still comes from PAGEMAP_SCAN on a fresh fd, and the program's file is never ioctl'd or closed."""
    region = thpguard.alloc(2 * MiB)
    assert region.coverage().source == "pagemap_scan"
    fd = pagemap._self_pagemap().fd()
    os.close(fd)
    with open(tmp_path / "app.log", "w") as app:
        assert app.fileno() == fd
        cov = region.coverage()
        assert cov.source == "pagemap_scan" and cov.complete
        app.write("still open")
    assert (tmp_path / "app.log").read_text() == "still open"
    region.close()
