"""Regions: allocation, views, coverage against the kernel, collapse, lifetime."""

import errno
import gc
import os

import numpy
import pytest

import thpguard
from thpguard import _native, pagemap
from thpguard._child import Child
from conftest import checksum, has_collapse, has_pagemap_scan, run_in_child, smaps_huge_bytes, smaps_vma

MiB = 1 << 20


@pytest.mark.kernel
def test_fresh_region_is_fully_pmd_mapped(region_factory, pmd):
    """A populated region is PMD-mapped end to end, by PAGEMAP_SCAN and smaps."""
    region = region_factory(16 * MiB)
    cov = region.coverage()
    if has_pagemap_scan():
        assert cov.source == pagemap.SOURCE_PAGEMAP_SCAN and cov.split_ranges == ()
    else:  # Linux < 6.7: totals from smaps, no per-range detail
        assert cov.source == pagemap.SOURCE_SMAPS and cov.split_ranges is None
    assert cov.total_bytes == region.size == 16 * MiB
    assert cov.huge_bytes == region.size and cov.complete
    assert smaps_huge_bytes(os.getpid(), region.address, region.address + region.size) == region.size
    assert region.address % pmd == 0 and region.degraded is None


@pytest.mark.kernel
def test_region_is_its_own_vma(region_factory):
    """Each region is exactly one VMA, advised MADV_HUGEPAGE (VmFlags hg)."""
    region = region_factory(4 * MiB)
    vma = smaps_vma(os.getpid(), region.address)
    assert vma is not None and vma.end == region.address + region.size
    assert "hg" in vma.vm_flags


def test_size_rounds_up_to_pmd(region_factory, pmd):
    """Sizes round up to a whole number of PMD-size blocks."""
    region = region_factory(1)
    assert region.size == pmd
    assert len(region.view()) == pmd


def test_unpopulated_region_has_no_memory(region_factory):
    """populate=False maps nothing: no present bytes, nothing split."""
    region = region_factory(8 * MiB, populate=False)
    cov = region.coverage()
    assert cov.present_bytes == 0 and cov.huge_bytes == 0 and cov.split_ranges == ()


@pytest.mark.kernel
@pytest.mark.parametrize("policy", ["share", "copy", "wipe", "private"])
def test_unpopulated_region_gets_a_huge_page_in_every_block(region_factory, policy, pmd):
    """populate=False: the first write to each block, block 0 included, maps a
    whole huge page (no page table left under a block by the setup), by
    PAGEMAP_SCAN/smaps and by smaps AnonHugePages."""
    region = region_factory(8 * MiB, fork=policy, populate=False)
    view = region.view()
    try:
        for at in range(0, region.size, pmd):
            view[at] = 1
    finally:
        view.release()
    cov = region.coverage()
    assert cov.huge_bytes == region.size and cov.complete, cov
    # Per-block ranges come from PAGEMAP_SCAN; the smaps fallback has none (None).
    none = () if has_pagemap_scan() else None
    assert cov.partial_ranges == none and cov.split_ranges == none, cov
    assert smaps_huge_bytes(os.getpid(), region.address, region.address + region.size) == region.size


@pytest.mark.kernel
def test_issue_scenario_split_in_child_and_repair(region_factory, split_and_repair, pmd):
    """The README scenario: a child's write splits one block; collapse() repairs it."""
    region = region_factory(256 * MiB)
    arr = numpy.frombuffer(region.view(), dtype="float32")
    arr[:] = numpy.arange(arr.size, dtype="float32")
    before = checksum(region.view())

    def child():
        arr[0] = 1.0
        split = region.coverage()
        smaps_split = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
        expected = checksum(region.view())
        result = region.collapse()
        after = region.coverage()
        smaps_after = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
        return (split.huge_bytes, split.split_ranges, smaps_split, result.collapsed_bytes,
                after.complete, smaps_after, expected == checksum(region.view()))

    try:
        result = run_in_child(child)
    finally:
        del arr  # a live array would keep the region from closing at teardown
    huge, ranges, smaps_split, collapsed, complete, smaps_after, same = result
    assert huge == region.size - pmd == smaps_split
    if has_pagemap_scan():
        assert ranges == ((region.address, region.address + pmd),)
    else:
        assert ranges is None
    assert collapsed == pmd and complete and smaps_after == region.size and same
    # The parent never wrote: its copy is intact and still PMD-mapped.
    assert region.coverage().complete
    assert checksum(region.view()) == before


@pytest.mark.kernel
def test_parent_write_after_fork_splits_only_parent(region_factory, split_and_repair, pmd):
    """Splits are per process: the writer splits, the other side stays whole."""
    region = region_factory(8 * MiB)

    def child(channel):
        channel.recv(timeout=None)  # wait until the parent has written
        return region.coverage().complete

    # Both reads while the child still maps the block's other pages: khugepaged
    # leaves a block alone while more than max_ptes_shared of its pages are
    # shared; once the child is gone it may collapse the block again.
    for _ in range(5):
        with Child(child, channel=True) as forked, region.view() as view:
            view[3 * pmd] = 1
            cov = region.coverage()
            truth = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
            forked.send("written")
            child_whole = forked.result()
        if cov.huge_bytes == truth == region.size - pmd:
            break
        # khugepaged collapsed the split block before a read (a host whose
        # max_ptes_shared is 511): fork and write again.
        assert region.collapse().ok
    if has_pagemap_scan():
        assert cov.split_ranges == ((region.address + 3 * pmd, region.address + 4 * pmd),)
    else:  # smaps fallback: the same split, in bytes
        assert cov.split_ranges is None and cov.huge_bytes == region.size - pmd
    assert truth == region.size - pmd
    assert child_whole, "the child, which never wrote, saw a split"
    assert region.collapse().ok


@pytest.mark.kernel
def test_collapse_without_madv_collapse_is_unsupported(region_factory, pmd):
    """Without MADV_COLLAPSE (Linux < 6.1) collapse() raises UnsupportedError naming it, and changes nothing."""
    if has_collapse():
        pytest.skip("this kernel has MADV_COLLAPSE: collapse() works here")
    region = region_factory(2 * pmd)
    with pytest.raises(thpguard.UnsupportedError, match="MADV_COLLAPSE") as info:
        region.collapse()
    assert info.value.feature == "MADV_COLLAPSE"
    assert not region.closed and region.coverage().complete


def test_collapse_on_whole_region_is_a_no_op(region_factory):
    """collapse() on a fully mapped region attempts nothing and reports ok."""
    region = region_factory(4 * MiB)
    result = region.collapse()
    assert result.ok and result.attempted_bytes == 0 and result.failures == {}


def test_view_is_writable_and_zeroed(region_factory):
    """A new region reads as zeros and keeps what is written to it."""
    region = region_factory(2 * MiB)
    view = region.view()
    assert not view.readonly and view[0] == 0 and view[-1] == 0
    view[100:104] = b"abcd"
    assert bytes(region.view()[100:104]) == b"abcd"


def test_close_with_live_view_raises_and_keeps_mapping(region_factory):
    """close() with a live numpy array raises BufferError and unmaps nothing."""
    region = region_factory(2 * MiB)
    arr = numpy.frombuffer(region.view(), dtype="uint8")
    arr[5] = 42
    with pytest.raises(BufferError, match="release them"):
        region.close()
    assert not region.closed and arr[5] == 42
    del arr
    gc.collect()
    region.close()
    assert region.closed
    assert smaps_vma(os.getpid(), region.address) is None


def test_dropped_region_is_unmapped(require_thp):
    """A region dropped without close() is unmapped with its last reference."""
    region = thpguard.alloc(2 * MiB)
    view = region.view()
    address = region.address
    del region
    gc.collect()
    assert smaps_vma(os.getpid(), address) is not None  # the view keeps it
    view[0] = 1
    view.release()
    del view
    gc.collect()
    assert smaps_vma(os.getpid(), address) is None


def test_context_manager_closes(require_thp):
    """``with alloc(...) as region`` closes the region on exit."""
    with thpguard.alloc(2 * MiB) as region:
        region.view()[0] = 1
    assert region.closed


def test_use_after_close_raises(region_factory):
    """Every operation on a closed region raises RegionClosedError; close() again is fine."""
    region = region_factory(2 * MiB)
    region.close()
    region.close()
    for call in (region.view, region.coverage, region.collapse, region.populate):
        with pytest.raises(thpguard.RegionClosedError, match="closed"):
            call()
    assert "closed" in repr(region)


def test_regions_lists_open_regions(region_factory):
    """thpguard.regions() lists open regions and forgets closed ones."""
    a = region_factory(2 * MiB)
    b = region_factory(2 * MiB)
    assert {id(a), id(b)} <= {id(r) for r in thpguard.regions()}
    b.close()
    assert id(b) not in {id(r) for r in thpguard.regions()}


@pytest.mark.parametrize("size", [0, -1, -(1 << 40)])
def test_bad_size_value(size):
    """Sizes must be positive."""
    with pytest.raises(thpguard.InvalidArgumentError, match="size must be > 0"):
        thpguard.alloc(size)


@pytest.mark.parametrize("size", [1.5, "4096", None, True, b"x"])
def test_bad_size_type(size):
    """Sizes must be ints (bool is refused)."""
    with pytest.raises(thpguard.InvalidTypeError, match="size must be an int"):
        thpguard.alloc(size)


@pytest.mark.parametrize("policy", ["shared", "", "COPY", "none"])
def test_unknown_policy(policy):
    """Unknown fork policies name the valid ones."""
    with pytest.raises(thpguard.InvalidArgumentError, match="share, copy, wipe, private"):
        thpguard.alloc(2 * MiB, fork=policy)


def test_policy_type():
    """The policy must be a str."""
    with pytest.raises(thpguard.InvalidTypeError):
        thpguard.alloc(2 * MiB, fork=1)


def test_bool_flags_checked():
    """populate and strict must be bools."""
    with pytest.raises(thpguard.InvalidTypeError, match="populate"):
        thpguard.alloc(2 * MiB, populate="yes")
    with pytest.raises(thpguard.InvalidTypeError, match="strict"):
        thpguard.alloc(2 * MiB, strict=1)


def test_bad_collapse_chunk(region_factory):
    """collapse(chunk=...) must be a positive int."""
    region = region_factory(2 * MiB)
    with pytest.raises(thpguard.InvalidArgumentError, match="chunk"):
        region.collapse(chunk=0)


def test_injected_map_failure_leaks_nothing(require_thp):
    """An mmap failure raises KernelCallError with the errno and maps nothing."""
    before = len(thpguard.regions())
    _native.fault_inject("map", errno.ENOMEM, 1)
    try:
        with pytest.raises(thpguard.KernelCallError) as info:
            thpguard.alloc(2 * MiB)
    finally:
        _native.fault_clear()
    assert info.value.errno == errno.ENOMEM and "mmap" in str(info.value)
    assert isinstance(info.value, OSError)
    assert len(thpguard.regions()) == before


@pytest.mark.kernel
def test_strict_raises_in_thp_disabled_process(require_thp):
    """strict=True raises HugePagesUnavailableError in a prctl-THP-disabled child."""

    def child():
        _native.thp_disable_set(1, 0)
        try:
            thpguard.alloc(2 * MiB, strict=True)
        except thpguard.HugePagesUnavailableError as exc:
            strict = str(exc)
        else:
            strict = None
        region = thpguard.alloc(4 * MiB)
        degraded = region.degraded
        cov = region.coverage()
        smaps = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
        region.close()
        return strict, degraded, cov.huge_bytes, smaps, cov.present_bytes

    strict, degraded, huge, smaps, present = run_in_child(child)
    assert strict and "prctl" in strict
    assert degraded and huge == 0 and smaps == 0 and present == 4 * MiB
