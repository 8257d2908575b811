"""Direct COW (thp_cow kernels only): the kernel copies 2 MiB on write after fork.

These run where the kernel has the proposed ``thp_cow`` switch and
``MADV_THP_COW`` (tests/kernels/thp-cow/, booted by tests/kernels/run); they
skip elsewhere, or fail when THPGUARD_REQUIRE_DIRECT_COW=1 (the matrix sets
it in that guest).
"""

import ctypes
import os

import pytest

from conftest import checksum, smaps_huge_bytes

import thpguard
from thpguard import _fork, kernel

MiB = 1 << 20
THP_COW = "/sys/kernel/mm/transparent_hugepage/thp_cow"
pytestmark = pytest.mark.kernel


@pytest.fixture
def direct_cow(require_thp):
    """Skip unless the kernel offers direct COW; restore thp_cow afterwards."""
    feature = kernel.capabilities(refresh=True).features["direct_cow"]
    if not feature.available:
        if os.environ.get("THPGUARD_REQUIRE_DIRECT_COW") == "1":
            pytest.fail(f"direct COW required but unavailable: {feature.reason}")
        pytest.skip(f"needs direct COW: {feature.reason}")
    saved = kernel.thp_cow_mode()
    try:
        yield saved
    finally:
        with open(THP_COW, "w") as f:
            f.write(saved)
        kernel.capabilities(refresh=True)


def _vmstat(name):
    return kernel.read_vmstat().get(name, 0)


def _fill(region):
    view = region.view()
    view[:] = bytes(range(256)) * (len(view) // 256)
    return checksum(view)


def _write_every_block(region, pmd, offset, value):
    view = region.view()
    for off in range(0, region.size, pmd):
        view[off + offset] = value


def _fork_and_write(region, pmd, expected, child_check):
    """Fork; the child writes one byte per block and runs child_check; then
    the parent writes one byte per block. Returns the child's exit code."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(write_end)
            view = region.view()
            same = checksum(view) == expected
            _write_every_block(region, pmd, 0, 0xAA)
            ok = same and child_check(region)
            os.read(read_end, 1)
            # the parent's writes (offset 1) must not show here
            ok = ok and view[0] == 0xAA and view[1] == 1
            code = 0 if ok else 1
        finally:
            os._exit(code)
    os.close(read_end)
    _write_every_block(region, pmd, 1, 0x55)
    os.write(write_end, b"x")
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _all_huge(region):
    cov = region.coverage()
    smaps = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
    return cov.complete and smaps == region.size


@pytest.mark.parametrize("policy", ["share", "copy"])
def test_direct_cow_writes_keep_every_block_huge(direct_cow, region_factory, pmd, policy):
    """share/copy with direct COW: child and parent write every block after fork and
    both keep PMD mappings (PAGEMAP_SCAN and smaps); the kernel counted the copies."""
    region = region_factory(8 * MiB, fork=policy)
    assert region.direct_cow, "the region did not get MADV_THP_COW"
    expected = _fill(region)
    copies, splits = _vmstat("thp_cow_alloc"), _vmstat("thp_split_pmd")

    assert _fork_and_write(region, pmd, expected, _all_huge) == 0, "child split or saw wrong data"

    assert _all_huge(region)
    view = region.view()
    assert view[0] == 0 and view[1] == 0x55  # the child's writes stayed in the child
    blocks = region.size // pmd
    assert _vmstat("thp_cow_alloc") - copies >= blocks
    assert _vmstat("thp_split_pmd") - splits == 0


def test_thp_cow_never_falls_back_to_repair(direct_cow, region_factory, pmd):
    """thp_cow=never: capabilities report no direct COW, the child's write splits,
    and region.collapse() repairs it (MADV_COLLAPSE)."""
    with open(THP_COW, "w") as f:
        f.write("never")
    caps = kernel.capabilities(refresh=True)
    assert not caps.features["direct_cow"].available
    assert caps.features["collapse"].available
    region = region_factory(4 * MiB, fork="share")
    expected = _fill(region)

    def split_then_repaired(region):
        split = not region.coverage().complete
        region.collapse()
        return split and _all_huge(region)

    assert _fork_and_write(region, pmd, expected, split_then_repaired) == 0
    region.collapse()
    assert _all_huge(region)


def test_late_fork_copies_direct_cow_region_under_never(direct_cow, region_factory, pmd):
    """A fork that bypasses Python's hooks, under thp_cow=never: the child's late
    fork handling copies a direct-COW `copy` region itself (the kernel will not),
    so the child's writes keep every block huge and the parent's data stays."""
    region = region_factory(4 * MiB, fork="copy")
    assert region.direct_cow
    expected = _fill(region)
    with open(THP_COW, "w") as f:
        f.write("never")
    libc_fork = ctypes.PyDLL(None).fork  # PyDLL keeps the GIL: no Python hook runs
    pid = libc_fork()
    if pid == 0:
        code = 1
        try:
            _fork.check()  # the late path: after_in_child(late=True)
            view = region.view()
            same = checksum(view) == expected
            _write_every_block(region, pmd, 0, 0xAA)
            code = 0 if same and _all_huge(region) else 1
            view.release()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the late child split (not copied) or saw wrong data"
    assert checksum(region.view()) == expected
    assert _all_huge(region)
