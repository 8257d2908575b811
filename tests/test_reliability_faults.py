"""Reliability: injected kernel failures are retried or reported, never lose data."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
import time

import pytest

import thpguard
from thpguard import _native
from thpguard.errors import KernelCallError

from conftest import checksum, smaps_vma
from reliability_support import (  # noqa: F401
    inject,
    leaked_regions,
    no_faults,
    own_mappings,
    region_shaped_mappings,
    run_child,
    split_here,
)  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_faults")

RETRIES = 3


@contextlib.contextmanager
def _split(region, pmd, blocks):
    """Split the first ``blocks`` blocks here, check the kernel did, and
    keep them split (but for the test's own collapses) for the block."""
    with split_here(region, pmd, blocks):
        cov = region.coverage()
        assert cov.split_blocks == blocks, cov
        yield


def _filled(region_factory, pmd, blocks, **kwargs):
    region = region_factory(blocks * pmd, **kwargs)
    view = region.view()
    for b in range(blocks):
        view[b * pmd : (b + 1) * pmd] = bytes([b + 1]) * pmd
    view.release()
    return region


@pytest.mark.parametrize("injected", [RETRIES, 1])
def test_collapse_eagain_is_retried(region_factory, pmd, injected):
    """EAGAIN (transient) is retried up to max_retries times per chunk:
    that many injected failures leave no trace and every block collapses.
    The budget has room for EAGAINs of the kernel's own on a busy host (CI
    saw one beyond 3 injected); the next test checks the budget's edge."""
    region = _filled(region_factory, pmd, 4)
    with _split(region, pmd, 4):
        before = checksum(region.view())
        inject("collapse", errno.EAGAIN, injected)
        result = region.collapse(chunk=pmd, max_retries=injected + 8)
        assert result.failures == {}
        assert result.coverage.complete and region.coverage().complete
        assert _native.fault_take("collapse") == 0, "all injected faults consumed"
        assert checksum(region.view()) == before


def test_collapse_eagain_beyond_retries_is_reported(region_factory, pmd):
    """One EAGAIN more than max_retries fails that chunk only; the result
    reports it, the block stays split (kernel ground truth), and a later
    collapse repairs it."""
    region = _filled(region_factory, pmd, 4)
    with _split(region, pmd, 4):
        before = checksum(region.view())
        inject("collapse", errno.EAGAIN, RETRIES + 1)
        result = region.collapse(chunk=pmd, max_retries=RETRIES)
        assert result.failures == {errno.EAGAIN: 1}
        assert result.coverage.split_blocks == 1
        assert region.coverage().split_blocks == 1
        assert checksum(region.view()) == before
        again = region.collapse(chunk=pmd, max_retries=RETRIES)
        assert again.failures == {} and again.coverage.complete
        assert checksum(region.view()) == before


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.EBUSY, errno.EINVAL])
def test_collapse_hard_errors_not_retried_and_reported(region_factory, pmd, err):
    """ENOMEM, EBUSY and EINVAL are not retried: each injected failure costs
    exactly one chunk, is counted under its errno, and loses no byte."""
    region = _filled(region_factory, pmd, 4)
    with _split(region, pmd, 4):
        before = checksum(region.view())
        inject("collapse", err, 2)
        result = region.collapse(chunk=pmd, max_retries=RETRIES)
        assert result.failures == {err: 2}
        assert result.coverage.split_blocks == 2 == region.coverage().split_blocks
        assert result.attempted_bytes == 4 * pmd
        assert result.collapsed_bytes == 2 * pmd
        assert checksum(region.view()) == before
        assert region.collapse().coverage.complete
        assert checksum(region.view()) == before


def test_alloc_map_failure_raises_and_leaks_nothing(require_thp, pmd):
    """A failed mmap raises KernelCallError(ENOMEM) naming the call; no
    mapping and no region is left behind."""
    maps_before = region_shaped_mappings()
    regions_before = len(thpguard.regions())
    inject("map", errno.ENOMEM, 1)
    with pytest.raises(KernelCallError) as info:
        thpguard.alloc(4 * pmd)
    assert info.value.errno == errno.ENOMEM
    assert "mmap" in str(info.value)
    assert not leaked_regions(maps_before)
    assert len(thpguard.regions()) == regions_before
    with thpguard.alloc(4 * pmd) as region:  # the next one works
        assert region.coverage().complete


def test_alloc_scan_failure_raises_and_leaks_nothing(require_thp, pmd):
    """PAGEMAP_SCAN failing while alloc() checks its pages raises
    KernelCallError and unmaps what it had mapped."""
    maps_before = region_shaped_mappings()
    inject("scan", errno.EIO, 1)
    with pytest.raises(KernelCallError) as info:
        thpguard.alloc(4 * pmd)
    assert info.value.errno == errno.EIO
    assert "PAGEMAP_SCAN" in str(info.value)
    assert not leaked_regions(maps_before)


def test_scan_failure_is_reported_then_recovers(region_factory, pmd):
    """coverage() and collapse() raise KernelCallError while the scan fails,
    change nothing, and work again once it does not."""
    region = _filled(region_factory, pmd, 2)
    before = checksum(region.view())
    inject("scan", errno.EFAULT, 2)
    for call in (region.coverage, region.collapse):
        with pytest.raises(KernelCallError) as info:
            call()
        assert info.value.errno == errno.EFAULT
    assert region.coverage().complete
    assert region.coverage().source == "pagemap_scan"
    assert checksum(region.view()) == before


def test_scan_enotty_falls_back_to_smaps(region_factory, pmd):
    """ENOTTY (a kernel before 6.7) switches coverage to smaps, as documented,
    with the same byte counts."""
    region = _filled(region_factory, pmd, 2)
    inject("scan", errno.ENOTTY, 1)
    cov = region.coverage()
    assert cov.source == "smaps" and cov.split_ranges is None
    assert cov.huge_bytes == cov.total_bytes == 2 * pmd


def _copy_child_report(region, pmd, before):
    """In a `copy` child: data, then who owns the pages (smaps ground truth)."""
    vma = smaps_vma("self", region.address)
    owned = {
        "private": vma.fields.get("Private_Dirty", 0),
        "shared": vma.fields.get("Shared_Dirty", 0),
    }
    intact = checksum(region.view()) == before
    # Writing must never reach the parent, copied or not.
    view = region.view()
    view[0 : pmd * 2] = b"\xee" * (pmd * 2)
    view.release()
    return intact, owned, vma.end - vma.start


@pytest.mark.parametrize("op", ["map", "mremap"])
def test_copy_policy_failure_leaves_child_shared_never_half(region_factory, pmd, op):
    """When the copy's mapping or its final mremap fails in the child, the
    child keeps the shared pages (all of them: smaps shows no private
    page), its data is intact, the parent's bytes are untouched and the
    failure is logged; with no fault, the child owns all its pages."""
    blocks = 4
    region = _filled(region_factory, pmd, blocks, fork="copy", copy_mode="eager")
    before = checksum(region.view())
    size = blocks * pmd

    intact, owned, vma_len = run_child(_copy_child_report, region, pmd, before)
    assert intact and vma_len == size
    assert owned == {"private": size, "shared": 0}, "fault-free copy owns every page"

    # One fault per `copy` region alive (an earlier test may have left one):
    # the child copies them in no set order, and every copy must fail.
    inject(op, errno.ENOMEM, sum(r.copy_mode == "eager" for r in thpguard.regions()))
    intact, owned, vma_len = run_child(_copy_child_report, region, pmd, before)
    _native.fault_clear()  # the child consumed its copy of the fault, not ours
    assert intact and vma_len == size
    assert owned == {"private": 0, "shared": size}, "never half copied"
    assert checksum(region.view()) == before
    assert region.coverage().complete


def _child_messages_copy_failure(region):
    return None


def test_copy_policy_failure_is_logged_in_child(region_factory, pmd, tmp_path):
    """The child says what went wrong: a log record naming the region, the
    pid and the failed call."""
    region = _filled(region_factory, pmd, 2, fork="copy", copy_mode="eager")
    log_file = tmp_path / "child.log"
    # The child's hooks run inside fork(): the handler must exist before.
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("thpguard")
    logger.addHandler(handler)
    try:
        inject("mremap", errno.EBUSY, sum(r.copy_mode == "eager" for r in thpguard.regions()))
        run_child(_child_messages_copy_failure, region)
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = log_file.read_text()
    assert f"{region.address:#x}" in text and "stays shared" in text
    assert "mremap" in text and "EBUSY" in text


def test_faults_from_environment(require_thp, pmd):
    """THPGUARD_FAULTS arms faults at import: the first alloc fails with the
    named errno, the second works."""
    code = (
        "import errno, thpguard\n"
        "try:\n"
        f"    thpguard.alloc({pmd})\n"
        "except thpguard.KernelCallError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
        f"thpguard.alloc({pmd}).close()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, THPGUARD_FAULTS="map:ENOMEM:1, collapse:11:0")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ENOMEM", "ok"]


def _mapped_in_child(addresses):
    """Which of ``addresses`` a fresh child has any mapping at."""

    def child():
        found = []
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                found += [a for a in addresses if lo <= a < hi]
        return found

    return run_child(child)


def test_failed_private_alloc_leaves_no_reservation(require_thp, pmd):
    """A `private` alloc() that fails after its setup began leaves nothing
    behind: no mapping here and no PROT_NONE reservation in later children
    (the native placeholder list does not keep its address)."""
    inject("scan", errno.EIO, 1)
    with pytest.raises(KernelCallError) as info:
        thpguard.alloc(2 * pmd, fork="private")
    address = info.value.range[0]
    assert not any(lo <= address < hi for lo, hi in own_mappings(1))
    assert _mapped_in_child([address]) == []


def test_dropped_private_region_leaves_no_reservation(require_thp, pmd):
    """A `private` region dropped without close() (garbage collected) also
    takes its reservation in future children with it."""
    import gc

    region = thpguard.alloc(2 * pmd, fork="private")
    address = region.address
    del region
    gc.collect()
    assert _mapped_in_child([address]) == []
