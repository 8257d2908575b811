"""Fork policies: what a child gets, checked in the child's page tables."""

import os
import subprocess
import sys

import pytest

from conftest import (
    checksum,
    direct_cow_active,
    has_pagemap_scan,
    run_in_child,
    smaps_huge_bytes,
    smaps_vma,
)
from thpguard import kernel
from thpguard._child import Child

MiB = 1 << 20
pytestmark = pytest.mark.kernel


def _fill(region):
    view = region.view()
    pattern = bytes(range(256)) * (len(view) // 256)
    view[:] = pattern
    return checksum(view)


def test_copy_nobody_splits(region_factory, pmd):
    """copy: after fork, child and parent both write every block and neither splits."""
    region = region_factory(16 * MiB, fork="copy")
    expected = _fill(region)

    def child(channel):
        view = region.view()
        same = checksum(view) == expected
        for off in range(0, region.size, pmd):
            view[off] = 0xAA
        cov = region.coverage()
        smaps = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
        channel.recv(timeout=None)  # the parent has written too
        return {"same data": same, "coverage complete": cov.complete,
                "smaps huge": smaps == region.size, "own write": view[0] == 0xAA}

    with Child(child, channel=True) as forked:
        view = region.view()
        for off in range(0, region.size, pmd):
            view[off + 1] = 0x55
        cov = region.coverage()
        forked.send("written")
        seen = forked.result()
    assert all(seen.values()), f"child saw a split or wrong data: {seen}"
    assert cov.complete and cov.split_ranges == (() if has_pagemap_scan() else None)
    assert smaps_huge_bytes(os.getpid(), region.address, region.address + region.size) == region.size
    assert view[0] == 0 and view[1] == 0x55  # the child's writes stayed in the child


def test_copy_survives_grandchildren(region_factory, pmd):
    """copy applies again at every fork: a grandchild's write does not split either."""
    region = region_factory(4 * MiB, fork="copy")
    expected = _fill(region)

    def grandchild():
        view = region.view()
        same = checksum(view) == expected
        view[pmd] = 1
        return same and region.coverage().complete

    assert run_in_child(lambda: run_in_child(grandchild))


def _release_before(major, minor):
    """True on kernels older than major.minor (from the release string)."""
    found = [int(x) for x in kernel.kernel_release().split("-")[0].split(".")[:2]]
    return tuple(found) < (major, minor)


def test_wipe_child_gets_zeros_and_huge_pages(region_factory, pmd):
    """wipe: the child sees zeros, gets fresh huge pages on write; the parent keeps its data."""
    region = region_factory(8 * MiB, fork="wipe")
    expected = _fill(region)
    if _release_before(6, 13):
        # Before 6.13 a read maps the huge zero page and a later write to it
        # splits (no huge zero page write fault that allocates a THP): the
        # child writes first, then checks the zeros around its writes.
        def write_first():
            view = region.view()
            view[0] = 7
            view[3 * pmd + 3] = 7
            cov = region.coverage()
            smaps = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
            rest = bytearray(view)
            zeros = rest[0] == 7 and rest[3 * pmd + 3] == 7
            rest[0] = rest[3 * pmd + 3] = 0
            return zeros and not any(rest), cov.huge_bytes, cov.split_ranges, smaps

        zeros, huge, ranges, smaps = run_in_child(write_first)
        assert zeros and huge == 2 * pmd == smaps
        assert ranges == (() if has_pagemap_scan() else None)
        assert checksum(region.view()) == expected and region.coverage().complete
        return

    def child():
        view = region.view()
        zeros = not any(view[::4096])
        view[0] = 7
        view[3 * pmd + 3] = 7
        cov = region.coverage()
        smaps = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
        return zeros, cov.huge_bytes, cov.split_ranges, smaps

    zeros, huge, ranges, smaps = run_in_child(child)
    assert zeros and huge == 2 * pmd == smaps and ranges == ()
    assert checksum(region.view()) == expected and region.coverage().complete


def test_private_is_absent_in_child(region_factory):
    """private: no accessible mapping in the child; the Region there reports closed."""
    region = region_factory(8 * MiB, fork="private")
    _fill(region)

    def child():
        maps = open("/proc/self/maps").read().splitlines()
        covering = [
            line for line in maps
            if int(line.split()[0].split("-")[0], 16) < region.address + region.size
            and int(line.split()[0].split("-")[1], 16) > region.address
        ]
        vma = smaps_vma(os.getpid(), region.address)
        errors = []
        for call in (region.view, region.coverage, region.collapse):
            try:
                call()
            except Exception as exc:
                errors.append(type(exc).__name__)
        closed = region.closed
        region.close()  # harmless
        return covering, vma.fields.get("Rss") if vma else None, errors, closed

    covering, rss, errors, closed = run_in_child(child)
    # Only the PROT_NONE reservation thpguard keeps there (no data, no access).
    assert all(line.split()[1] == "---p" for line in covering), covering
    assert rss in (None, 0)
    assert errors == ["RegionClosedError"] * 3 and closed
    assert not region.closed and region.coverage().complete


def test_share_child_sees_same_data(region_factory):
    """share: the child reads the parent's data without splitting anything."""
    region = region_factory(8 * MiB)
    expected = _fill(region)

    def child():
        return checksum(region.view()), region.coverage().complete

    assert run_in_child(child) == (expected, True)


def _shared_dirty(region):
    return smaps_vma(os.getpid(), region.address).fields["Shared_Dirty"]


def test_copy_happens_in_forked_child(region_factory, pmd):
    """copy: a forked child holds no page shared with the parent (smaps Shared_Dirty 0)."""
    region = region_factory(8 * MiB, fork="copy")
    expected = _fill(region)
    if region.copy_mode in ("kernel", "userfault"):
        # Lazy copy, on the first write to each block (by the kernel, or by
        # the userfaultfd handler): the pages stay shared until then, and
        # every written block stays huge.
        def child():
            view = region.view()
            same = checksum(view) == expected
            for off in range(0, region.size, pmd):
                view[off] = 0xEE
            view.release()
            cov = region.coverage()
            smaps = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
            return same, cov.complete, smaps

        assert run_in_child(child) == (True, True, region.size)
        assert checksum(region.view()) == expected and region.coverage().complete
        return
    assert run_in_child(lambda: (_shared_dirty(region), checksum(region.view()))) == (0, expected)


def test_subprocess_does_not_trigger_copy(region_factory, tmp_path):
    """A subprocess child about to exec copies nothing, even when the at-fork hooks run there."""
    region = region_factory(8 * MiB, fork="copy")
    expected = _fill(region)
    seen = tmp_path / "shared_dirty"

    def before_exec():
        # preexec_fn makes CPython run the at-fork hooks in this child
        # (Modules/_posixsubprocess.c); it runs after them, before exec.
        seen.write_text(str(_shared_dirty(region)))

    subprocess.run(["true"], check=True, preexec_fn=before_exec)
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert int(seen.read_text()) == region.size  # still shared: nothing copied
    assert checksum(region.view()) == expected and region.coverage().complete

