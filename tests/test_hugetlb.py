"""hugetlb regions on the real kernel: mapping, reservation, fork policies.

Hugeness and pool use are read from smaps and /proc/meminfo, never from the
library's own counters. Every test grows the pool it needs through the
``hugepool`` fixture, which gives the pages back afterwards.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

import thpguard
from thpguard import _fork, kernel
from thpguard.errors import HugePagesUnavailableError, InvalidArgumentError, UnsupportedError
from thpguard._child import Child
from conftest import WAIT, checksum, exit_child, hugetlb_vma, run_in_child, skip_thp, smaps_vma, wait_child

MB2 = 2 << 20
KB = 1024


@pytest.fixture
def pmd2m():
    if kernel.pmd_size() != MB2 or MB2 not in kernel.hugetlb_sizes():
        pytest.skip("needs a 2 MiB hugetlb pool and a 2 MiB PMD")
    return MB2


def _only_our_pages(pool, pages):
    """The pool's free pages are the ``pages`` this test grew it by, none more.

    The host's pool lock is held (the hugepool fixture): no other run of the
    suite or the benchmarks has pages in it now, so more free pages are
    pages a crashed run left behind or another program's. The test needs a
    pool it can run dry: it skips, or fails under THPGUARD_REQUIRE_THP=1.
    """
    if pool.available != pages:
        skip_thp(f"the hugetlb pool has {pool.available} free pages, {pages} expected (this "
                 f"test's): pages leaked by a crashed run or held by another program "
                 f"(see nr_hugepages and free_hugepages under /sys/kernel/mm/hugepages)")


def meminfo():
    return kernel.hugetlb_meminfo()


def _fill(region, seed):
    v = region.view()
    for off in range(0, region.size, region.page_size):
        v[off:off + 8] = (seed + off // region.page_size).to_bytes(8, "little")
    del v


def _pages_ok(region, seed):
    v = region.view()
    try:
        return all(bytes(v[off:off + 8]) == (seed + off // region.page_size).to_bytes(8, "little")
                   for off in range(0, region.size, region.page_size))
    finally:
        v.release()


def test_alloc_maps_hugetlb_pages(hugepool, pmd2m):
    """A hugetlb region has pages of the pool's size (smaps, meminfo); collapse() is a no-op."""
    hugepool(3)
    before = meminfo()
    with thpguard.alloc(5 << 20, backend="hugetlb") as r:  # rounded up to 3 pages
        assert (r.backend, r.page_size, r.size) == ("hugetlb", MB2, 6 << 20)
        page, huge, flags = hugetlb_vma("self", r.address)
        assert page == MB2 and huge == r.size and "ht" in flags
        assert meminfo()["HugePages_Free"] == before["HugePages_Free"] - 3
        cov = r.coverage()
        assert cov.complete and cov.huge_bytes == r.size
        res = r.collapse()
        assert res.ok and res.attempted_bytes == 0
        _fill(r, 7)
        assert _pages_ok(r, 7)
        s = thpguard.stats()
        assert s.regions >= 1
        assert "backend='hugetlb'" in repr(r)
    assert meminfo()["HugePages_Free"] == before["HugePages_Free"]


def test_reservation_is_taken_at_mmap(hugepool, pmd2m):
    """The pool reserves every page at mmap (HugePages_Rsvd), before any fault."""
    hugepool(2)
    before = meminfo()
    with thpguard.alloc(2 * MB2, backend="hugetlb", populate=False) as r:
        after = meminfo()
        assert after["HugePages_Rsvd"] == before["HugePages_Rsvd"] + 2
        assert after["HugePages_Free"] == before["HugePages_Free"]
        assert hugetlb_vma("self", r.address)[1] == 0
    assert meminfo()["HugePages_Rsvd"] == before["HugePages_Rsvd"]


def test_pool_too_small_names_the_fix_and_leaks_nothing(hugepool_lock, pmd2m):
    """A pool too small raises with the exact nr_hugepages command and leaves no reservation behind.

    The host's pool lock is held: no other run of the suite or the
    benchmarks grows or takes from the pool between the read and the alloc.
    """
    pool = kernel.hugetlb_pool(MB2)
    pages = pool.available + 1
    before = meminfo()
    try:
        region = thpguard.alloc(pages * MB2, backend="hugetlb")
    except HugePagesUnavailableError as exc:
        msg = str(exc)
    else:
        region.close()
        pytest.fail(f"alloc of {pages} pages with {pool.available} free did not raise "
                    f"(pool now: {kernel.hugetlb_pool(MB2)}): something outside the lock grew the pool")
    assert f"echo {pool.total + 1} > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages" in msg
    assert meminfo()["HugePages_Rsvd"] == before["HugePages_Rsvd"]
    assert not any(r.size == pages * MB2 and r.backend == "hugetlb" for r in thpguard.regions())


def _alloc_beyond_the_pool(**kwargs):
    """alloc() one 2 MiB page more than the pool has free (the caller holds
    the host's pool lock, so no run of this suite or the benchmarks changes it).

    The pool is shared with every process on the host: another program may grow it
    between the read and the alloc, and the region then fits (hugetlb).
    That breaks the premise, not the library: close it and try again.
    """
    deadline = time.monotonic() + WAIT
    while True:
        pages = kernel.hugetlb_pool(MB2).available + 1
        r = thpguard.alloc(pages * MB2, **kwargs)
        if r.backend == "thp":
            return r
        r.close()
        if time.monotonic() > deadline:
            pytest.fail(f"for {WAIT:g} s another process kept growing the hugetlb pool "
                        f"between reading it and allocating one page more")


def test_strict_false_and_auto_fall_back_to_thp(hugepool_lock, pmd2m, caplog):
    """strict=False and auto give a THP region when the pool cannot hold it, and log why."""
    with caplog.at_level(logging.INFO, logger="thpguard"):
        with _alloc_beyond_the_pool(backend="hugetlb", strict=False) as r:
            assert r.backend == "thp" and "nr_hugepages" in r.backend_reason
        with _alloc_beyond_the_pool(backend="auto") as r:
            assert r.backend == "thp" and r.backend_reason.startswith("auto:")
    assert "THP instead of hugetlb" in caplog.text


def test_auto_uses_hugetlb_when_the_pool_holds_it(hugepool, pmd2m):
    """auto takes hugetlb pages when the pool can hold the region.

    The premise, a free page in the shared pool, is made again if another
    process took the page between growing the pool and the alloc (auto then
    says the pool could not hold it, and falls back to THP).
    """
    deadline = time.monotonic() + WAIT
    while True:
        hugepool(1)
        r = thpguard.alloc(MB2, backend="auto")
        if r.backend == "hugetlb" or time.monotonic() > deadline:
            break
        r.close()
    with r:
        assert r.backend == "hugetlb" and "hugetlb pool" in r.backend_reason, r.backend_reason
        assert hugetlb_vma("self", r.address)[0] == MB2


def test_bad_arguments():
    """Unknown backends and page sizes are refused with what was expected."""
    with pytest.raises(InvalidArgumentError):
        thpguard.alloc(MB2, backend="hugepages")
    with pytest.raises(UnsupportedError, match="sizes offered"):
        thpguard.alloc(MB2, backend="hugetlb", page_size=3 << 20)
    with pytest.raises(InvalidArgumentError, match="backend='hugetlb'"):
        thpguard.alloc(MB2, page_size=1 << 30)


def test_numpy_and_hot_work(hugepool, pmd2m):
    """numpy arrays work on hugetlb regions, also through thpguard.numpy."""
    np = pytest.importorskip("numpy")
    hugepool(2)
    with thpguard.alloc(2 * MB2, backend="hugetlb") as r:
        a = np.frombuffer(r.view(), dtype=np.uint64)
        a[:] = 3
        assert int(a.sum()) == 3 * (r.size // 8)
        del a
    import thpguard.numpy as tnp

    arr = tnp.zeros((MB2 // 8,), dtype="u8", backend="hugetlb")
    region = tnp.region_of(arr)
    assert region.backend == "hugetlb" and hugetlb_vma("self", region.address)[0] == MB2
    del arr


# -- fork policies -------------------------------------------------------------------------


def _child_view(r):
    page, huge, _ = hugetlb_vma("self", r.address) or (None, 0, [])
    anon = (smaps_vma("self", r.address) or kernel.Vma(0, 0, "")).huge_bytes or 0
    return {"backend": r.backend, "page": page, "hugetlb": huge, "anon_huge": anon}


def test_copy_child_gets_its_own_hugetlb_pages(hugepool, pmd2m):
    """copy: the child owns hugetlb pages of its own from fork on (its smaps: Private_Hugetlb).

    Not the pool's free count: other processes on the host use the same pool.
    """
    hugepool(4)  # 2 for the parent, 2 for the child's copy
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="copy") as r:
        _fill(r, 100)

        def child():
            info = _child_view(r)
            info["ok"] = _pages_ok(r, 100)
            vma = smaps_vma("self", r.address)
            info["private"] = vma.fields.get("Private_Hugetlb")
            info["shared"] = vma.fields.get("Shared_Hugetlb")
            _fill(r, 200)  # its own pages: the parent keeps 100
            return info

        info = run_in_child(child)
        assert r.copy_mode == "hugetlb-eager" and "UFFDIO_MOVE" in r.copy_fallback_reason
        # `thpguard status` names the mechanism from outside (the region's marker page).
        from thpguard import _procmap
        row = next(v for v in _procmap.scan_process(os.getpid()).vmas if v.start == r.address)
        assert (row.region, row.copy_mode, row.copy_armed) == ("", "hugetlb-eager", None)
        assert info["ok"] and info["backend"] == "hugetlb"
        assert info["page"] == MB2 and info["hugetlb"] == r.size
        # The child's pages are its own (mapped once: private), not the parent's.
        assert (info["private"], info["shared"]) == (r.size, 0), info
        assert _pages_ok(r, 100)


@pytest.mark.parametrize("strict", [True, False])
def test_lazy_copy_is_refused_on_hugetlb(strict):
    """copy_mode='lazy' with backend='hugetlb' raises UnsupportedError naming
    why and what to use, before anything is mapped (no pool needed)."""
    before = set(open("/proc/self/maps").read().splitlines())
    with pytest.raises(UnsupportedError, match="UFFDIO_MOVE.*backend='thp'.*'eager'") as info:
        thpguard.alloc(2 * MB2, backend="hugetlb", fork="copy", copy_mode="lazy", strict=strict)
    assert info.value.feature == "copy_mode='lazy'"
    # Other threads (a guard, a sanitizer's allocator) may map and unmap
    # meanwhile: what must not appear is a hugetlb or thpguard mapping.
    new = set(open("/proc/self/maps").read().splitlines()) - before
    assert not [line for line in new if "huge" in line or "thpguard" in line], new


def test_lazy_copy_with_auto_backend_takes_thp(require_thp, hugepool, pmd2m):
    """backend='auto' with copy_mode='lazy' takes THP even where the pool
    could hold the region, and says so in backend_reason."""
    hugepool(2)
    try:
        r = thpguard.alloc(2 * MB2, backend="auto", fork="copy", copy_mode="lazy")
    except UnsupportedError as exc:  # no lazy mechanism on this host
        pytest.skip(str(exc))
    with r:
        assert r.backend == "thp" and r.copy_mode in ("userfault", "kernel")
        assert "copy_mode='lazy'" in r.backend_reason and r.copy_fallback_reason is None


def test_hugetlb_copy_eager_records_no_fallback(hugepool, pmd2m):
    """copy_mode='eager' on hugetlb is what was asked: no fallback reason."""
    hugepool(2)
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="copy", copy_mode="eager") as r:
        assert r.copy_mode == "hugetlb-eager" and r.copy_fallback_reason is None


def test_copy_child_falls_back_to_thp_when_the_pool_is_dry(hugepool, pmd2m, require_thp):
    """copy with a dry pool: the child's copy is on THP pages, with the same data."""
    pool = hugepool(2)
    _only_our_pages(pool, 2)
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="copy") as r:
        _fill(r, 5)

        def child():
            info = _child_view(r)
            info["ok"] = _pages_ok(r, 5)
            return info

        info = run_in_child(child)
        assert info["ok"] and info["backend"] == "thp" and info["hugetlb"] == 0
        assert info["anon_huge"] == r.size


def test_share_with_room_in_the_pool_is_shared(hugepool, pmd2m):
    """share with room in the pool: shared, not downgraded, and a child's write copies whole pages."""
    hugepool(4)
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="share") as r:
        _fill(r, 1)
        downgrades = thpguard.stats().hugetlb_fork_downgrades

        def child():
            before = _pages_ok(r, 1)
            _fill(r, 2)  # the kernel copies whole pages from the pool
            return before, _pages_ok(r, 2)

        assert run_in_child(child) == (True, True), "the child read or wrote the wrong bytes"
        assert r.fork_downgraded is None
        assert thpguard.stats().hugetlb_fork_downgrades == downgrades
        assert _pages_ok(r, 1)


@pytest.mark.parametrize("writer", ["child", "parent"])
def test_share_fork_with_a_dry_pool_kills_nobody(hugepool, pmd2m, writer, caplog):
    """The pool holds exactly the region: a shared write could find no page
    to copy into (measured: the child dies of SIGBUS). The fork copies the
    region into the child instead, loudly, and both sides live."""
    pool = hugepool(4)
    _only_our_pages(pool, 4)
    with thpguard.alloc(4 * MB2, backend="hugetlb", fork="share") as r:
        _fill(r, 10)
        assert kernel.hugetlb_pool(MB2).available == 0
        downgrades = thpguard.stats().hugetlb_fork_downgrades

        def child(channel):
            before = _pages_ok(r, 10)
            if writer == "child":
                _fill(r, 20)
                return before, _pages_ok(r, 20)
            channel.recv(timeout=None)  # the parent has written every page
            return before, _pages_ok(r, 10)  # a read after: SIGBUS if shared

        # A child killed by a signal (SIGBUS) fails the test, naming it.
        with caplog.at_level(logging.ERROR, logger="thpguard"):
            forked = Child(child, channel=True)
        with forked:
            if writer == "parent":
                _fill(r, 30)
                forked.send("written")
            assert forked.result() == (True, True), "the child read or wrote the wrong bytes"
        assert thpguard.stats().hugetlb_fork_downgrades == downgrades + 1
        assert r.fork_downgraded and "nr_hugepages" in r.fork_downgraded
        assert "hugetlb share region" in caplog.text
        assert _pages_ok(r, 30 if writer == "parent" else 10)
        assert hugetlb_vma("self", r.address)[1] == r.size


def test_wipe_child_gets_zeroed_hugetlb_pages_at_the_same_address(hugepool, pmd2m):
    """wipe: the child sees zeroed hugetlb pages at the same address; the parent keeps its data."""
    hugepool(4)
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="wipe") as r:
        _fill(r, 9)

        def child():
            info = _child_view(r)
            v = r.view()
            info["zero"] = v.tobytes() == bytes(r.size)
            v[0:4] = b"abcd"
            info["written"] = bytes(v[0:4]) == b"abcd"
            v.release()
            info["page_after"] = hugetlb_vma("self", r.address)[0]
            return info

        info = run_in_child(child)
        assert info["zero"] and info["written"] and info["backend"] == "hugetlb"
        assert info["page_after"] == MB2
        assert _pages_ok(r, 9)


def test_wipe_child_gets_thp_when_the_pool_is_dry(hugepool, pmd2m, require_thp):
    """wipe with a dry pool: the child's zeroed range is THP."""
    pool = hugepool(2)
    _only_our_pages(pool, 2)
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="wipe") as r:
        _fill(r, 9)

        def child():
            v = r.view()
            zero = v.tobytes() == bytes(r.size)
            v.release()
            return zero, r.backend, hugetlb_vma("self", r.address)[1]

        zero, backend, huge = run_in_child(child)
        assert zero and backend == "thp" and huge == 0
        assert _pages_ok(r, 9)


def test_private_is_not_mapped_in_the_child(hugepool, pmd2m):
    """private: the child has only a PROT_NONE placeholder at the address."""
    hugepool(2)
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="private") as r:
        _fill(r, 4)

        def child():
            vma = smaps_vma("self", r.address)
            return r.closed, vma.perms if vma else None, (vma.hugetlb_bytes or 0) if vma else 0

        closed, perms, huge = run_in_child(child)
        assert closed and huge == 0 and (perms is None or perms.startswith("---"))
        assert _pages_ok(r, 4)


def test_one_gigabyte_page(hugepool):
    """A 1 GiB region is one 1 GiB page (smaps KernelPageSize) where the kernel can find one.

    Skips, even under THPGUARD_REQUIRE_THP=1, when the kernel cannot find
    1 GiB of contiguous free memory for the page (a fragmented or busy host),
    or another process took the page from the shared pool before the test
    mapped it: neither is a thpguard failure. Where it gets the page, the
    region must be exactly that page.
    """
    if not kernel.capabilities().hugetlb_gigantic.available:
        pytest.skip(kernel.capabilities().hugetlb_gigantic.reason)
    if kernel.hugetlb_meminfo().get("HugePages_Total") is None:
        pytest.skip("no /proc/meminfo hugetlb lines")
    hugepool(1, page_size=1 << 30, required=False)
    try:
        r = thpguard.alloc(1, backend="hugetlb", page_size=1 << 30)
    except HugePagesUnavailableError as exc:
        pytest.skip(f"the 1 GiB page was gone from the shared pool before the test mapped it: {exc}")
    with r:
        assert (r.size, r.page_size) == (1 << 30, 1 << 30)
        page, huge, flags = hugetlb_vma("self", r.address)
        assert page == 1 << 30 and huge == 1 << 30 and "ht" in flags
        assert r.coverage().complete
        v = r.view()
        v[-1] = 7
        assert checksum(v[-16:]) == checksum(bytes(15) + b"\x07")
        v.release()


@pytest.mark.parametrize("use_scan", [True, False])
def test_status_counts_hugetlb_pages(hugepool, pmd2m, use_scan):
    """thpguard status counts hugetlb pages as huge, from PAGEMAP_SCAN and from smaps."""
    from thpguard import _procmap

    hugepool(2)
    with thpguard.alloc(2 * MB2, backend="hugetlb") as r:
        pc = _procmap.scan_process(os.getpid(), use_scan=use_scan)
        vma = next(v for v in pc.vmas if v.start == r.address)
        assert vma.huge_bytes == r.size == hugetlb_vma("self", r.address)[1]


def test_guard_leaves_hugetlb_regions_alone(hugepool, pmd2m):
    """The guard never tries to repair a hugetlb region."""
    hugepool(2)
    with thpguard.alloc(2 * MB2, backend="hugetlb") as r:
        repairs = thpguard.stats().repairs
        g = thpguard.install(interval=0.05)
        try:
            assert g.wait_ticks(2, timeout=30)
        finally:
            g.stop()
        assert thpguard.stats().repairs == repairs
        assert hugetlb_vma("self", r.address)[1] == r.size


def test_hot_populates_a_hugetlb_region(hugepool, pmd2m):
    """hot() on a hugetlb region populates it on entry."""
    hugepool(2)
    with thpguard.hot(2 * MB2, backend="hugetlb", populate=False) as r:
        assert r.backend == "hugetlb"
        assert hugetlb_vma("self", r.address)[1] == r.size  # populated on entry
        _fill(r, 3)
        assert _pages_ok(r, 3)


def test_share_counts_the_pages_a_child_takes_for_copy_and_wipe(hugepool, pmd2m):
    """A child maps its own pages for copy and wipe regions; with those the
    pool would be dry for the shared pages' copies: the fork downgrades."""
    pool = hugepool(5)
    _only_our_pages(pool, 5)
    with thpguard.alloc(MB2, backend="hugetlb", fork="share") as s, \
            thpguard.alloc(MB2, backend="hugetlb", fork="copy") as c, \
            thpguard.alloc(MB2, backend="hugetlb", fork="wipe") as w:
        _fill(s, 1)
        _fill(c, 2)
        # free now: 2; the child takes 1 (copy) + 1 (wipe); a shared write needs 1 more

        def child():
            _fill(s, 3)
            return _pages_ok(s, 3) and _pages_ok(c, 2)

        assert run_in_child(child), "the child read or wrote the wrong bytes"
        assert s.fork_downgraded is not None
        assert w.fork_downgraded is None


def test_named_hugetlb_region_in_status(hugepool, pmd2m):
    """A named hugetlb region carries its marker page: status shows its name."""
    from thpguard import _procmap

    hugepool(1)
    with thpguard.alloc(MB2, backend="hugetlb", name="weights") as r:
        pc = _procmap.scan_process(os.getpid())
        vma = next(v for v in pc.vmas if v.start == r.address)
        assert vma.region == "weights" and vma.huge_bytes == r.size
        assert "'weights'" in repr(r)


def test_metrics_count_hugetlb_regions_and_downgrades(hugepool, pmd2m):
    """The collector reports a named hugetlb region's bytes and the fork downgrade counter."""
    prometheus_client = pytest.importorskip("prometheus_client")
    import thpguard.metrics
    from test_integ_metrics import scrape

    pool = hugepool(2)
    _only_our_pages(pool, 2)

    def child():
        registry = prometheus_client.CollectorRegistry()
        thpguard.metrics.register(registry)
        with thpguard.alloc(2 * MB2, backend="hugetlb", name="table") as r:
            _fill(r, 1)  # the pool is dry now: a fork must downgrade
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            return scrape(registry)

    samples = run_in_child(child)
    assert samples[("thpguard_region_bytes", (("region", "table"),))] == 2 * MB2
    assert samples[("thpguard_region_huge_bytes", (("region", "table"),))] == 2 * MB2
    assert samples[("thpguard_hugetlb_fork_downgrades_total", ())] == 1


def test_hugepool_fixture_gives_the_pages_back_when_a_test_fails(tmp_path, pmd2m):
    """The fixture that grows the pool shrinks it back to where it was, also after a failure.

    This test holds the host's pool lock from the first read of the pool to
    the last, for the inner run too (it is told so and does not take it):
    no other run changes the pool's size in between.
    """
    import subprocess
    import sys

    from conftest import POOL_LOCK_HELD_BY_PARENT, pool_lock

    (tmp_path / "test_fails.py").write_text(
        "from conftest import hugepool  # noqa: F401\n"
        "from thpguard import kernel\n\n"
        "def test_fails(hugepool):\n"
        "    hugepool(3)\n"
        "    assert kernel.hugetlb_pool(2 << 20).available >= 3\n"
        "    assert False, 'deliberate'\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    env[POOL_LOCK_HELD_BY_PARENT] = "1"
    with pool_lock():
        before = kernel.hugetlb_pool(MB2).total
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(tmp_path / "test_fails.py")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "deliberate" in proc.stdout, proc.stdout + proc.stderr
        assert kernel.hugetlb_pool(MB2).total == before


def test_share_counts_children_that_still_share(hugepool, pmd2m):
    """A second child is downgraded while the first still shares: the pool
    holds one child's copies, not two, and neither child dies writing."""
    pool = hugepool(4)
    _only_our_pages(pool, 4)
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="share") as r:
        _fill(r, 1)  # 2 pages used, 2 free: room for one child's copies

        def first_child(channel):
            channel.recv(timeout=None)  # writes when the parent says so
            _fill(r, 2)
            return _pages_ok(r, 2)

        def second_child(channel):
            _fill(r, 4)
            channel.send("written")
            channel.recv(timeout=None)  # alive, holding its pages, until the first wrote
            return _pages_ok(r, 4)

        # A child killed by a signal (SIGBUS) fails the test, naming it.
        with Child(first_child, channel=True) as first:
            assert r.fork_downgraded is None
            with Child(second_child, channel=True) as second:
                downgraded = r.fork_downgraded  # checked once both children are gone
                second.recv(what="the second child's write")
                first.send("write")
                assert first.result() is True, "the first child read the wrong bytes"
                second.send("done")
                assert second.result() is True, "the second child read the wrong bytes"
        assert downgraded and "1 other process(es)" in downgraded
        assert _pages_ok(r, 1)


def test_share_fork_of_an_unpopulated_region_with_a_dry_pool_kills_nobody(hugepool, pmd2m):
    """A child touching share pages the parent never faulted needs pool pages too: no SIGBUS."""
    pool = hugepool(2)
    _only_our_pages(pool, 2)
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="share", populate=False) as r:
        assert kernel.hugetlb_pool(MB2).available == 0  # both pages reserved, none faulted

        def child():
            _fill(r, 3)
            return _pages_ok(r, 3)

        # A child killed by a signal (SIGBUS) fails the test, naming it.
        assert run_in_child(child), "the child read the wrong bytes"
        assert r.fork_downgraded
        _fill(r, 5)
        assert _pages_ok(r, 5) and hugetlb_vma("self", r.address)[1] == r.size


def test_share_counts_the_parent_when_a_child_forks_again(hugepool, pmd2m):
    """A grandchild forked from a share region shares the pages with child and parent: no SIGBUS."""
    pool = hugepool(4)
    _only_our_pages(pool, 4)
    with thpguard.alloc(2 * MB2, backend="hugetlb", fork="share") as r:
        _fill(r, 1)  # the pool has 2 free pages: room for one more copy, not two

        def grandchild():
            _fill(r, 5)
            return _pages_ok(r, 5)

        def child():
            # The grandchild forks from the child (a signal that kills it
            # fails the child's run_in_child, naming it).
            grand_ok = run_in_child(grandchild)
            _fill(r, 6)
            return grand_ok, _pages_ok(r, 6)

        assert run_in_child(child) == (True, True), "the grandchild or the child read the wrong bytes"
        assert _pages_ok(r, 1)


class _Alarm(Exception):
    """Raised by the test's SIGALRM handler."""


def test_downgraded_share_fork_survives_a_raising_signal_handler(hugepool, pmd2m):
    """A SIGALRM handler that raises, fired every 0.5 ms (setitimer) through
    share forks the pool cannot cover (each copies the region into the
    child): the fork's hooks hold the signal until fork() returned the pid,
    the copy completes, and every child reads the parent's bytes and writes
    its own without dying (before: the child died of SIGBUS, 3 of 3 runs)."""
    pool = hugepool(4)
    _only_our_pages(pool, 4)
    raising, fired = [False], []

    def on_alarm(signum, frame):
        fired.append(signum)
        if raising[0]:
            raise _Alarm()

    forked = []  # os.fork() was called: its after-fork hooks ran in the parent
    with thpguard.alloc(4 * MB2, backend="hugetlb", fork="share") as r:
        _fill(r, 10)
        old = signal.signal(signal.SIGALRM, on_alarm)
        _fork.subscribe("test-hugetlb-forked", after_in_parent=lambda: forked.append(1))
        try:
            done = 0
            while done < 5:
                pid, before = None, len(forked)
                try:
                    raising[0] = True
                    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
                    pid = os.fork()
                    raising[0] = False  # no check for signals between these two stores
                except _Alarm:
                    raising[0] = False
                # An exception its handler raised as the fork's hooks began is
                # raised again at the first call after fork() returned and the
                # pid is stored (thpguard._forksignals), in the parent only: here,
                # at setitimer(). The child starts with no held signal and
                # inherits no interval timer.
                if pid == 0:
                    def body():
                        code = 0 if _pages_ok(r, 10) else 3
                        _fill(r, 20)
                        return code or (0 if _pages_ok(r, 20) else 4)
                    exit_child(body)
                while True:
                    try:
                        signal.setitimer(signal.ITIMER_REAL, 0, 0)
                        break
                    except _Alarm:
                        pass
                if len(forked) == before:
                    continue  # the alarm came before os.fork() was called (a busy host)
                done += 1
                assert pid is not None, "the handler's exception came before fork() returned the pid"
                status = wait_child(pid, "a downgraded share child to read and write its copy")
                assert not os.WIFSIGNALED(status), \
                    f"child killed by {signal.Signals(os.WTERMSIG(status)).name}"
                assert os.WEXITSTATUS(status) == 0
                assert _pages_ok(r, 10)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, old)
            _fork.unsubscribe("test-hugetlb-forked")
        assert r.fork_downgraded
        assert fired  # the timer did fire through the forks
