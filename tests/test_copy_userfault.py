"""copy regions with userfaultfd block copy: nobody splits, every byte right.

Every test checks the kernel's ground truth (PAGEMAP_SCAN through
``coverage()``, smaps ``AnonHugePages``) in the process that wrote, and
compares the data byte for byte against what each process wrote.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import thpguard
from thpguard import _native, kernel

from conftest import (checksum, exit_child, read_pipe, run_in_child, sharer, smaps_huge_bytes,
                      wait_child, wait_until)

MiB = 1 << 20


@pytest.fixture
def require_userfault(require_thp):
    feature = kernel.capabilities().copy_userfault
    if not feature.available:
        pytest.skip(f"needs userfaultfd block copy: {feature.reason}")


@pytest.fixture
def copy_region(require_userfault, region_factory):
    def make(size, **kwargs):
        region = region_factory(size, fork="copy", **kwargs)
        assert region.copy_mode == "userfault", region.copy_fallback_reason
        return region

    return make


def _fill(region):
    view = region.view()
    pattern = bytes(range(256)) * 16
    for off in range(0, region.size, len(pattern)):
        view[off : off + len(pattern)] = pattern
    view.release()
    return checksum(region.view())


def _expected_after_marks(region, marks):
    """Checksum of the filled region with byte ``marks[off]`` written at each offset."""
    data = bytearray((bytes(range(256)) * 16) * (region.size // 4096))
    for off, value in marks.items():
        data[off] = value
    return checksum(data)


class _Sampler:
    """Samples this process's mapping of the region (PAGEMAP_SCAN, and smaps
    every 8th sample) while writes run.

    ``small``/``small_smaps``: the most bytes any sample found mapped in
    small pages (present but not PMD-mapped; smaps Rss above
    AnonHugePages), which is a split: must stay 0. ``worst``/``worst_smaps``:
    the fewest PMD-mapped bytes any sample found. One block may be missing
    from a sample: the move method empties a block for the instant between
    its copy's MADV_DONTNEED and UFFDIO_MOVE (a reader there waits for the
    move), and the one handler thread copies one block at a time.
    """

    def __init__(self, region):
        self.region = region
        self.samples = 0
        self.worst = self.worst_smaps = region.size
        self.small = self.small_smaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        r = self.region
        while not self._stop.is_set():
            cov = r.coverage()
            self.worst = min(self.worst, cov.huge_bytes)
            self.small = max(self.small, cov.present_bytes - cov.huge_bytes)
            if self.samples % 8 == 0:
                vmas = [v for v in kernel.read_smaps(os.getpid())
                        if v.start >= r.address and v.end <= r.address + r.size]
                huge = sum(v.fields.get("AnonHugePages", 0) for v in vmas)
                self.worst_smaps = min(self.worst_smaps, huge)
                self.small_smaps = max(self.small_smaps, sum(v.fields.get("Rss", 0) for v in vmas) - huge)
            self.samples += 1

    def check(self) -> None:
        """No sample found a split, nor more than one block missing."""
        size, pmd = self.region.size, self.region.pmd_size
        assert self.samples > 0
        assert self.small == 0 and self.small_smaps == 0, vars(self)
        assert self.worst >= size - pmd and self.worst_smaps >= size - pmd, vars(self)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _write_every_block(region, value, pmd):
    view = region.view()
    for off in range(0, region.size, pmd):
        view[off] = value
    view.release()


def test_both_sides_write_every_block_and_stay_huge(copy_region, pmd):
    """Parent and child write every block at once; sampled during the writes,
    neither ever has any of the region in small pages (at most the one block
    being moved in is missing for an instant), both end 100 % PMD-mapped,
    and each sees exactly its own writes."""
    region = copy_region(32 * MiB)
    _fill(region)
    go_r, go_w = os.pipe()
    forked_r, forked_w = os.pipe()

    def child():
        os.write(forked_w, b"f")
        os.read(go_r, 1)
        with _Sampler(region) as sampler:
            _write_every_block(region, 0xC1, pmd)
        sampler.check()
        marks = {off: 0xC1 for off in range(0, region.size, pmd)}
        same = checksum(region.view()) == _expected_after_marks(region, marks)
        huge = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
        return huge, same, _native.copy_stats()

    result = {}
    thread = threading.Thread(target=lambda: result.update(r=run_in_child(child)))
    thread.start()
    # The sampler thread starts once the child exists: a thread starting
    # while another forks can leave the sanitizer runtime's lock held in
    # the child (conftest.fork_from_threads).
    read_pipe(forked_r, "the child to start")
    os.write(go_w, b"x")
    with _Sampler(region) as sampler:
        _write_every_block(region, 0x9A, pmd)
    thread.join()
    huge, same, stats = result["r"]
    assert huge == region.size and same
    assert stats["cow_fallbacks"] == 0 and stats["copies"] + stats["reuses"] == region.size // pmd
    sampler.check()
    assert smaps_huge_bytes(os.getpid(), region.address, region.address + region.size) == region.size
    marks = {off: 0x9A for off in range(0, region.size, pmd)}
    assert checksum(region.view()) == _expected_after_marks(region, marks)
    assert region.coverage().complete
    for fd in (go_r, go_w, forked_r, forked_w):
        os.close(fd)


def test_many_threads_same_and_different_blocks(copy_region, pmd):
    """Eight threads write one block and four others at once: one copy per
    block, every waiter woken, every write kept."""
    region = copy_region(16 * MiB)
    _fill(region)

    def child():
        view = region.view()
        offsets = [i * 4096 + 7 for i in range(8)] + [b * pmd + 11 for b in range(1, 5)]
        barrier = threading.Barrier(len(offsets))

        def write(off):
            barrier.wait()
            view[off] = 0x5C

        threads = [threading.Thread(target=write, args=(off,)) for off in offsets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        kept = all(view[off] == 0x5C for off in offsets)
        view.release()
        marks = {off: 0x5C for off in offsets}
        same = checksum(region.view()) == _expected_after_marks(region, marks)
        return kept, same, region.coverage().complete, _native.copy_stats()

    kept, same, complete, stats = run_in_child(child)
    assert kept and same and complete
    assert stats["copies"] == 5 and stats["cow_fallbacks"] == 0
    assert stats["wp_faults"] >= 5


def test_kernel_mode_writes(copy_region, pmd):
    """readinto, recv_into and os.readv into a protected block work (the
    kernel's own writes fault to the handler) and keep the block huge."""
    region = copy_region(8 * MiB)
    expected = _fill(region)

    def child():
        view = region.view()
        payload = b"written by the kernel" * 100
        with tempfile.TemporaryFile() as f:
            f.write(payload)
            f.seek(0)
            n1 = f.readinto(view[100 : 100 + len(payload)])
        a, b = socket.socketpair()
        with a, b:
            a.sendall(payload)
            n2 = b.recv_into(view[pmd + 100 : pmd + 100 + len(payload)])
        r, w = os.pipe()
        os.write(w, payload)
        n3 = os.readv(r, [view[2 * pmd + 100 : 2 * pmd + 100 + len(payload)]])
        os.close(r)
        os.close(w)
        ok = all(bytes(view[o + 100 : o + 100 + len(payload)]) == payload for o in (0, pmd, 2 * pmd))
        view.release()
        return (n1, n2, n3), ok, region.coverage().complete, _native.copy_stats()["cow_fallbacks"]

    sizes, ok, complete, fallbacks = run_in_child(child)
    assert sizes == (2100, 2100, 2100) and ok and complete and fallbacks == 0
    assert checksum(region.view()) == expected and region.coverage().complete


def test_fork_from_thread_and_grandchildren(copy_region, pmd):
    """A fork from a non-main thread, and a grandchild's fork, arm the new
    process too: the grandchild's writes do not split, nobody's data moves."""
    region = copy_region(8 * MiB)
    expected = _fill(region)

    def grandchild():
        _write_every_block(region, 0x66, pmd)
        return region.coverage().complete, _native.copy_stats()["copies"]

    def child():
        inner = run_in_child(grandchild)
        return inner, checksum(region.view()), region.coverage().complete

    out = {}
    t = threading.Thread(target=lambda: out.update(r=run_in_child(child)))
    t.start()
    t.join()
    (g_complete, g_copies), c_sum, c_complete = out["r"]
    assert g_complete and g_copies == region.size // pmd
    assert c_sum == expected and c_complete
    assert checksum(region.view()) == expected and region.coverage().complete


def test_exec_after_fork(copy_region, pmd, tmp_path):
    """A child that execs right after fork (at-fork hooks run) works, and the
    parent's next writes reuse its pages: no copy once the child is gone."""
    region = copy_region(8 * MiB)
    expected = _fill(region)
    marker = tmp_path / "ran"
    subprocess.run([sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ok')"],
                   check=True, preexec_fn=lambda: None)
    assert marker.read_text() == "ok"
    before = _native.copy_stats()
    _write_every_block(region, 0x11, pmd)
    after = _native.copy_stats()
    assert after["copies"] == before["copies"]
    assert after["reuses"] - before["reuses"] == region.size // pmd
    assert region.coverage().complete
    assert checksum(region.view()) != expected


def test_close_while_writes_fault(copy_region, pmd):
    """close() racing another thread's faulting writes never hangs: it is
    refused while the writer's view lives, then unmaps once it is gone."""
    region = copy_region(32 * MiB)
    _fill(region)

    def child():
        view = region.view()
        started = threading.Event()

        def writer():
            started.set()
            for off in range(0, region.size, pmd):
                view[off] = 0x77
            view.release()

        t = threading.Thread(target=writer)
        t.start()
        started.wait()
        refused = 0
        while True:
            try:
                region.close()
                break
            except BufferError:
                refused += 1
        t.join()
        return region.closed, _native.copy_stats()["regions"]

    closed, registered = run_in_child(child)
    assert closed and registered == 0


def test_exit_mid_copy(copy_region, pmd):
    """A child that exits while its threads' writes are being copied leaves
    cleanly; the parent's data and huge pages are untouched."""
    region = copy_region(32 * MiB)
    expected = _fill(region)
    pid = os.fork()
    if pid == 0:
        try:
            view = region.view()

            def writer(first):
                for off in range(first * pmd, region.size, 4 * pmd):
                    view[off] = 0x33

            for i in range(4):
                threading.Thread(target=writer, args=(i,), daemon=True).start()
        finally:
            os._exit(7)
    status = wait_child(pid, "a copy child whose writer threads were still running to exit")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    assert checksum(region.view()) == expected and region.coverage().complete


def test_dontneed_and_mprotect(copy_region, pmd):
    """MADV_DONTNEED of a block reads back zeros and refills as a huge page;
    mprotect read-only and back leaves the copy on write working."""
    region = copy_region(8 * MiB)
    expected = _fill(region)

    def child():
        addr = region.address
        _native.madvise(addr + pmd, pmd, 4)  # MADV_DONTNEED
        view = region.view()
        zeros = bytes(view[pmd : 2 * pmd]) == bytes(pmd)
        view[pmd + 5] = 0x42
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(addr + 2 * pmd, pmd, mmap.PROT_READ) == 0
        readable = view[2 * pmd + 1]
        assert libc.mprotect(addr + 2 * pmd, pmd, mmap.PROT_READ | mmap.PROT_WRITE) == 0
        view[2 * pmd + 1] = 0x43
        ok = view[pmd + 5] == 0x42 and view[2 * pmd + 1] == 0x43 and view[0] == 0
        view.release()
        return zeros, readable, ok, region.coverage().complete, _native.copy_stats()

    zeros, readable, ok, complete, stats = run_in_child(child)
    assert zeros and readable == 1 and ok and complete
    assert stats["cow_fallbacks"] == 0
    assert checksum(region.view()) == expected and region.coverage().complete


def test_no_new_block_falls_back_and_collapse_repairs(copy_region, pmd, require_collapse):
    """Without a new block (injected ENOMEM) the kernel's COW handles the
    write: the data is right, the fallback counted, and collapse() repairs."""
    region = copy_region(8 * MiB)
    expected = _fill(region)

    def child():
        _native.fault_inject("copy_block", errno.ENOMEM, 1)
        try:
            _write_every_block(region, 0x21, pmd)
        finally:
            _native.fault_clear()
        stats = _native.copy_stats()
        split = region.coverage().huge_bytes
        repaired = region.collapse().coverage.complete
        marks = {off: 0x21 for off in range(0, region.size, pmd)}
        # "fallbacks" is the old name of "cow_fallbacks", kept through 0.1.
        return (stats["cow_fallbacks"], stats["fallbacks"]), split, repaired, checksum(region.view()) == _expected_after_marks(region, marks)

    fallbacks, huge, repaired, same = run_in_child(child)
    assert fallbacks == (1, 1) and huge == region.size - pmd
    assert repaired and same
    assert checksum(region.view()) == expected and region.coverage().complete


def test_child_arm_failure_degrades_to_share(copy_region, pmd, require_collapse):
    """A child that cannot arm (injected EMFILE) says so and behaves like
    `share`: writes split, data right, collapse() repairs; the parent is fine."""
    region = copy_region(8 * MiB)
    expected = _fill(region)
    _native.fault_inject("copy_arm", errno.EMFILE, 1)
    try:
        def child():
            _write_every_block(region, 0x31, pmd)
            stats = _native.copy_stats()
            split = region.coverage().huge_bytes
            repaired = region.collapse().coverage.complete
            return stats["arm_errno"], split, repaired

        arm_errno, huge, repaired = run_in_child(child)
    finally:
        _native.fault_clear()
    assert arm_errno == errno.EMFILE and huge < region.size and repaired
    assert checksum(region.view()) == expected and region.coverage().complete


def test_copy_mode_arguments(require_thp):
    """copy_mode takes auto, lazy or eager, and only with fork='copy'."""
    with pytest.raises(thpguard.InvalidArgumentError, match="copy_mode"):
        thpguard.alloc(2 * MiB, fork="copy", copy_mode="later")
    with pytest.raises(thpguard.InvalidTypeError, match="copy_mode"):
        thpguard.alloc(2 * MiB, fork="copy", copy_mode=1)
    with pytest.raises(thpguard.InvalidArgumentError, match="only to fork='copy'"):
        thpguard.alloc(2 * MiB, fork="share", copy_mode="lazy")
    with thpguard.alloc(2 * MiB, fork="copy", copy_mode="eager") as region:
        assert region.copy_mode == "eager"
    with thpguard.alloc(2 * MiB, fork="share") as region:
        assert region.copy_mode is None


def test_split_block_stays_repairable_across_forks(copy_region, pmd, require_collapse):
    """A block split by a fallback is not protected again at the next fork
    (MADV_COLLAPSE refuses write-protected small pages): collapse() repairs
    it while children share the region."""
    region = copy_region(8 * MiB)
    expected = _fill(region)
    # The sharers end last-started first: the second holds the first one's pipe too.
    with contextlib.ExitStack() as holders:
        holders.enter_context(sharer())
        _native.fault_inject("copy_block", errno.ENOMEM, 1)
        try:
            view = region.view()
            view[5] = view[5]
            view.release()
        finally:
            _native.fault_clear()
        assert region.coverage().huge_bytes == region.size - pmd
        holders.enter_context(sharer())  # the next fork protects the whole blocks only
        result = region.collapse()
        assert result.failures == {} and result.coverage.complete
    assert checksum(region.view()) == expected


_UNPRIVILEGED_SCRIPT = """
import logging, sys, thpguard
from thpguard import kernel
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
print("FEATURE", kernel.capabilities().copy_userfault.available)
region = thpguard.alloc(4 << 20, fork="copy")
print("MODE", region.copy_mode)
print("REASON", region.copy_fallback_reason)
try:
    thpguard.alloc(4 << 20, fork="copy", copy_mode="lazy")
except thpguard.UnsupportedError as exc:
    print("LAZY", exc)
"""


def test_without_kernel_mode_userfaultfd_auto_falls_back(require_thp, tmp_path):
    """Without CAP_SYS_PTRACE and without /dev/userfaultfd (as for an
    unprivileged process), auto copies eagerly and logs why, and lazy raises
    UnsupportedError with the reason; the kernel decides, nothing is mocked."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop CAP_SYS_PTRACE and hide /dev/userfaultfd")
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            if f.read().strip() != "0":
                pytest.skip("vm.unprivileged_userfaultfd=1: every process may use userfaultfd")
    except OSError:
        pass
    script = tmp_path / "unprivileged.py"
    script.write_text(_UNPRIVILEGED_SCRIPT)
    # A private mount namespace hides the device from this one process tree.
    hide = "mount --bind /dev/null /dev/userfaultfd && " if os.path.exists("/dev/userfaultfd") else ""
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"{hide}exec setpriv --bounding-set -sys_ptrace --inh-caps -sys_ptrace "
           f"{sys.executable} {script}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("needs unshare and setpriv (util-linux)")
    if out.returncode != 0 and "unshare" in out.stderr:
        pytest.skip(f"cannot make a mount namespace here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout
    assert "FEATURE False" in lines
    assert "MODE eager" in lines
    assert "CAP_SYS_PTRACE" in lines and "EPERM" in lines
    assert "LOG copy region" in lines and "copies eagerly at fork" in lines
    assert "LAZY no lazy copy mechanism here" in lines


def _probe(stage, err=0, user_mode_only=False, move=True, source="syscall"):
    return {"stage": stage, "errno": err, "source": source, "user_mode_only": user_mode_only,
            "move": move}


@pytest.mark.parametrize("probe, available, words", [
    (_probe("ok"), True, "UFFDIO_MOVE"),
    (_probe("ok", move=False, source="device"), True, "/dev/userfaultfd"),
    (_probe("open", errno.ENOSYS), False, "CONFIG_USERFAULTFD"),
    (_probe("open", errno.EPERM, user_mode_only=True), False, "EFAULT"),
    (_probe("api", errno.EINVAL), False, "5.7"),
    (_probe("wp", errno.EINVAL), False, "write-protecting"),
    (_probe("scan", errno.ENOTTY), False, "PAGEMAP_SCAN"),
])
def test_capability_says_why(probe, available, words):
    """copy_userfault in capabilities() says whether lazy copy works and why
    not, for each stage the native probe can stop at (5.10, 6.1, 6.6, ...)."""
    from fakekernel import FakeNative

    kernel.registry.set_native(FakeNative(copy_probe=probe))
    try:
        feature = kernel.capabilities(refresh=True).copy_userfault
    finally:
        kernel.registry.reset()
    assert feature.available is available and words in feature.reason


def test_host_without_lazy_copy_falls_back(require_thp, caplog):
    """Where the registry says no lazy mechanism works (a 6.1 kernel without
    UFFDIO write-protect here, injected), auto copies eagerly with the reason
    logged, and lazy raises UnsupportedError with it."""
    from fakekernel import FakeNative

    kernel.registry.set_native(FakeNative(copy_probe=_probe("api", errno.EINVAL)))
    try:
        with caplog.at_level("INFO", logger="thpguard"):
            with thpguard.alloc(4 * MiB, fork="copy") as region:
                assert region.copy_mode == "eager"
                assert "write-protect" in region.copy_fallback_reason
        assert any("copies eagerly at fork" in r.getMessage() for r in caplog.records)
        with pytest.raises(thpguard.UnsupportedError, match="no lazy copy mechanism"):
            thpguard.alloc(4 * MiB, fork="copy", copy_mode="lazy")
    finally:
        kernel.registry.reset()


def _threads():
    return len(os.listdir("/proc/self/task"))


def _pool_mappings(pool_bytes):
    """Anonymous mappings of exactly ``pool_bytes`` flagged dontfork ("dc")."""
    return [v for v in kernel.read_smaps("self", kernel.Roots())
            if v.end - v.start == pool_bytes and "dc" in v.vm_flags]


def test_handler_stops_with_the_last_region(require_userfault, pmd):
    """The handler thread and its pool exist while a copy region does, stop
    when the last one closes, and start again with the next."""

    def child():
        before = _threads()
        first = thpguard.alloc(4 * pmd, fork="copy", copy_mode="lazy")
        second = thpguard.alloc(4 * pmd, fork="copy", copy_mode="lazy")
        with_regions = _threads()
        wait_until(lambda: _native.copy_stats()["pool_ready"] == 4, "the handler to fill its pool")
        pools = len(_pool_mappings(4 * pmd))
        first.close()
        one_left = _threads()
        second.close()
        after = _threads()
        pools_after = len(_pool_mappings(4 * pmd))
        stats = _native.copy_stats()
        again = thpguard.alloc(2 * pmd, fork="copy", copy_mode="lazy")
        view = again.view()
        view[0] = 1
        restarted = _threads()
        view.release()
        again.close()

        def grandchild():
            # Forked after the handler stopped: its own handler reads its
            # own page map (not the parent's) and fills its pool.
            region = thpguard.alloc(4 * pmd, fork="copy", copy_mode="lazy")
            wait_until(lambda: _native.copy_stats()["pool_ready"] == 4, "the pool to fill")
            region.close()
            return True

        return (before, with_regions, pools, one_left, after, pools_after, stats["pool_ready"],
                restarted, _threads(), run_in_child(grandchild))

    (before, with_regions, pools, one_left, after, pools_after, ready, restarted,
     final, grandchild_pool) = run_in_child(child)
    assert with_regions == before + 1 and one_left == before + 1
    assert pools == 1
    assert after == before and pools_after == 0 and ready == 0
    assert restarted == before + 1 and final == before and grandchild_pool


def test_pool_grows_with_a_later_larger_region(require_userfault, pmd):
    """A 2-block region fills a pool of 2; a later 8-block region raises the
    allowance, and the idle handler fills the pool to 4 without a fault."""
    from conftest import wait_until

    def child():
        small = thpguard.alloc(2 * pmd, fork="copy", copy_mode="lazy")
        wait_until(lambda: _native.copy_stats()["pool_ready"] == 2, "the pool to fill to 2")
        before = _native.copy_stats()  # counters carry over from the forking process
        large = thpguard.alloc(8 * pmd, fork="copy", copy_mode="lazy")
        wait_until(lambda: _native.copy_stats()["pool_ready"] == 4, "the pool to grow to 4")
        stats = _native.copy_stats()
        large.close()
        small.close()
        return tuple(stats[k] - before[k] for k in ("copies", "missing_faults", "wp_faults"))

    assert run_in_child(child) == (0, 0, 0)


def test_child_pool_ready_at_fork(copy_region, pmd):
    """A child's pool has a block before its code runs, so its first write
    is a copy from the pool, not a block faulted in the fault path; a child
    that has not written keeps that one block only, and its handler fills
    the pool after the first write."""
    import time

    from conftest import wait_until

    region = copy_region(8 * MiB)
    expected = _fill(region)
    view = region.view()
    view[0] = view[0]  # the parent's pool is filled meanwhile
    view.release()

    def child():
        ready = _native.copy_stats()["pool_ready"]
        time.sleep(0.1)
        idle = _native.copy_stats()["pool_ready"]
        view = region.view()
        view[pmd] = 0x51
        view.release()
        stats = _native.copy_stats()
        wait_until(lambda: _native.copy_stats()["pool_ready"] == 4, "the child's pool to fill")
        return ready, idle, stats["copies"], stats["inline_allocs"], region.coverage().complete

    # The child's at-fork handler waits for its handler thread at most 50 ms,
    # which a busy host can exceed: here it waits as long as that takes.
    _native.copy_set_child_ready_wait(30.0)
    try:
        ready, idle, copies, inline, complete = run_in_child(child)
    finally:
        _native.copy_set_child_ready_wait(0.05)
    assert ready == 1 and idle == 1 and copies == 1 and inline == 0 and complete
    assert checksum(region.view()) == expected


def test_collapse_of_protected_split_block(copy_region, pmd, require_collapse):
    """A protected block split by a partial mprotect keeps the write-protect
    marker on its small pages, which MADV_COLLAPSE refuses (EINVAL); the
    repair drops the marker first, so collapse() makes it huge again."""
    region = copy_region(8 * MiB)
    expected = _fill(region)

    def child():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        at = region.address + pmd
        assert libc.mprotect(at, 4096, mmap.PROT_READ) == 0
        assert libc.mprotect(at, 4096, mmap.PROT_READ | mmap.PROT_WRITE) == 0
        split = region.coverage().huge_bytes
        result = region.collapse()
        return split, result.failures, result.refused, result.coverage.complete, \
            checksum(region.view())

    split, failures, refused, complete, sums = run_in_child(child)
    assert split == region.size - pmd
    assert failures == {} and refused == {} and complete
    assert sums == expected and checksum(region.view()) == expected


def test_emptied_block_read_only_stays_small_and_guard_says_why(copy_region, pmd, require_collapse):
    """An emptied block read while the region is read-only fills with 4 KiB
    zero pages (UFFDIO_MOVE moves only between writable mappings), and
    MADV_COLLAPSE refuses it in a userfaultfd mapping: collapse() names
    that cause, and the block collapses once every page was written."""
    region = copy_region(8 * MiB)
    _fill(region)

    def child():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        at = region.address + pmd
        _native.madvise(at, pmd, 4)  # MADV_DONTNEED
        assert libc.mprotect(region.address, region.size, mmap.PROT_READ) == 0
        view = region.view()
        zeros = bytes(view[pmd : 2 * pmd]) == bytes(pmd)
        assert libc.mprotect(region.address, region.size, mmap.PROT_READ | mmap.PROT_WRITE) == 0
        small = region.coverage().huge_bytes
        view[pmd] = 1
        refused = region.collapse().refused
        for off in range(pmd, 2 * pmd, 4096):
            view[off] = 2
        view.release()
        return zeros, small, refused, region.collapse().coverage.complete

    zeros, small, refused, complete = run_in_child(child)
    assert zeros and small == region.size - pmd
    assert list(refused) == [region.address + pmd]
    assert "userfaultfd" in refused[region.address + pmd] and "zero page" in refused[region.address + pmd]
    assert complete


def test_guard_names_the_userfaultfd_cause(copy_region, pmd, require_collapse):
    """The guard meets the block above (EBUSY from MADV_COLLAPSE): it names
    the userfaultfd cause for that block and does not back off the region
    as if the memory cgroup were full; the block is repaired once written."""
    from conftest import wait_until

    region = copy_region(8 * MiB)
    _fill(region)

    def child():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _native.madvise(region.address + pmd, pmd, 4)  # MADV_DONTNEED
        assert libc.mprotect(region.address, region.size, mmap.PROT_READ) == 0
        view = region.view()
        bytes(view[pmd : 2 * pmd])
        assert libc.mprotect(region.address, region.size, mmap.PROT_READ | mmap.PROT_WRITE) == 0
        view[pmd] = 1
        events = []
        thpguard.install(on_event=events.append, interval=0.05)
        guard = thpguard.guard()
        wait_until(lambda: any(e.kind == "disabled" for e in events), "the guard to give the cause")
        reasons = [e.reason for e in events if e.kind == "disabled"]
        backoffs = [e.reason for e in events if e.kind == "backoff"]
        for off in range(pmd, 2 * pmd, 4096):
            view[off] = 2
        view.release()
        result = region.collapse()
        guard.stop()
        return reasons, backoffs, result.coverage.complete

    reasons, backoffs, complete = run_in_child(child)
    assert reasons and all("userfaultfd" in r for r in reasons), reasons
    assert backoffs == []
    assert complete


_SECCOMP_SCRIPT = r"""
import ctypes, logging, struct, sys
# A seccomp filter that refuses userfaultfd(2) and /dev/userfaultfd's
# USERFAULTFD_IOC_NEW with EPERM (x86_64 numbers), installed before thpguard
# is imported: the kernel, not a stand-in, says no.
def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
LD, JEQ, RET = 0x20, 0x15, 0x06
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
prog = b"".join([
    ins(LD, 0, 0, 4), ins(JEQ, 0, 5, 0xC000003E),        # arch x86_64, else allow
    ins(LD, 0, 0, 0), ins(JEQ, 4, 0, 323),               # userfaultfd: refuse
    ins(JEQ, 0, 2, 16),                                  # ioctl, else allow
    ins(LD, 0, 0, 24), ins(JEQ, 1, 0, 0xAA00),           # USERFAULTFD_IOC_NEW: refuse
    ins(RET, 0, 0, ALLOW), ins(RET, 0, 0, EPERM),
])
buf = ctypes.create_string_buffer(prog)
fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
fbuf = ctypes.create_string_buffer(fprog)
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
assert libc.prctl(38, 1, 0, 0, 0) == 0                   # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.addressof(fbuf), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
import thpguard
from thpguard import kernel
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
print("FEATURE", kernel.capabilities().copy_userfault.available)
region = thpguard.alloc(4 << 20, fork="copy")
print("MODE", region.copy_mode)
print("REASON", region.copy_fallback_reason)
"""


def test_seccomp_without_userfaultfd_auto_falls_back(require_thp, tmp_path):
    """A seccomp filter that refuses userfaultfd: auto copies eagerly and
    logs why (the kernel refuses, nothing is mocked)."""
    if os.uname().machine != "x86_64":
        pytest.skip("the filter uses x86_64 syscall numbers")
    script = tmp_path / "seccomp.py"
    script.write_text(_SECCOMP_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "FEATURE False" in out.stdout
    assert "MODE eager" in out.stdout
    assert "EPERM" in out.stdout and "seccomp" in out.stdout
    assert "LOG copy region" in out.stdout and "copies eagerly at fork" in out.stdout


_AFFINITY_SCRIPT = r"""
import ctypes, os, struct
# A seccomp filter that refuses sched_setaffinity(2) with EPERM (x86_64),
# as some container profiles do: the child's handler thread cannot be
# placed on the forking thread's CPU.
def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
LD, JEQ, RET = 0x20, 0x15, 0x06
prog = b"".join([ins(LD, 0, 0, 4), ins(JEQ, 0, 3, 0xC000003E), ins(LD, 0, 0, 0),
                 ins(JEQ, 0, 1, 203), ins(RET, 0, 0, 0x00050000 | 1), ins(RET, 0, 0, 0x7FFF0000)])
buf = ctypes.create_string_buffer(prog)
fbuf = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf)))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
assert libc.prctl(38, 1, 0, 0, 0) == 0
assert libc.prctl(22, 2, ctypes.addressof(fbuf), 0, 0) == 0, ctypes.get_errno()
import thpguard
region = thpguard.alloc(4 << 20, fork="copy", copy_mode="lazy")
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    armed = any(" uw" in line for line in open("/proc/self/smaps") if line.startswith("VmFlags"))
    os.write(w, f"{armed} {thpguard.copy_stats()['arm_errno']}".encode())
    os._exit(0)
os.close(w)
print("CHILD", os.read(r, 100).decode())
os.waitpid(pid, 0)
"""


def test_child_arms_where_its_handler_cannot_be_placed(require_thp, tmp_path):
    """sched_setaffinity refused (a seccomp profile): the child's handler
    thread starts without the placement and the child is armed (before: it
    ran unarmed, arm_errno EPERM, its writes split)."""
    if os.uname().machine != "x86_64":
        pytest.skip("the filter uses x86_64 syscall numbers")
    if not kernel.capabilities().copy_userfault.available:
        pytest.skip("no lazy copy here")
    script = tmp_path / "affinity.py"
    script.write_text(_AFFINITY_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CHILD True 0" in out.stdout, out.stdout


def _status_rows(pid):
    """{start: VmaCoverage} of every thpguard region and pool VMA of *pid*, from its maps."""
    from thpguard import _procmap

    pc = _procmap.scan_process(pid)
    return {v.start: v for v in pc.vmas if v.region is not None or v.copy_pool}


def test_status_names_copy_mechanism_and_pool(copy_region, region_factory, pmd, capsys):
    """status names each copy region's mechanism from outside the process,
    whether the process has it armed (VmFlags uw), and labels the pool."""
    from thpguard import cli

    lazy = copy_region(8 * MiB, name="lazy-w")
    eager = region_factory(4 * MiB, fork="copy", copy_mode="eager", name="eager-w")
    plain = region_factory(2 * MiB, fork="share", name="plain-w")
    wait_until(lambda: _native.copy_stats()["pool_ready"] > 0, "the handler to fill its pool")
    rows = _status_rows(os.getpid())
    assert (rows[lazy.address].copy_mode, rows[lazy.address].copy_armed) == ("userfault", True)
    assert (rows[eager.address].copy_mode, rows[eager.address].copy_armed) == ("eager", None)
    assert (rows[plain.address].copy_mode, rows[plain.address].region) == (None, "plain-w")
    pool = [v for v in rows.values() if v.copy_pool]
    assert pool and all(v.region is None for v in pool)
    # The pool is what the handler holds ready: PMD-mapped pages, at most its 4 blocks.
    assert 0 < sum(v.huge_bytes for v in pool) <= 4 * pmd
    assert cli.main(["status", str(os.getpid())]) == 0
    out = capsys.readouterr().out
    assert "* thpguard region 'lazy-w' copy=userfault\n" in out
    assert "* thpguard region 'eager-w' copy=eager\n" in out
    assert "* thpguard region 'plain-w'\n" in out
    assert "* thpguard copy pool (pre-faulted huge pages for the lazy copy, not a leak)" in out
    assert cli.main(["status", "--json", str(os.getpid())]) == 0
    vmas = json.loads(capsys.readouterr().out)["processes"][0]["vmas"]
    by_start = {v["start"]: v for v in vmas}
    assert by_start[lazy.address]["copy_mode"] == "userfault" and by_start[lazy.address]["copy_armed"]
    assert any(v["copy_pool"] for v in vmas)

    def child():
        view = lazy.view()
        view[0] = 1  # a first write: an armed child takes a pool block
        view.release()
        mine = _status_rows(os.getpid())
        return (mine[lazy.address].copy_armed, any(v.copy_pool for v in mine.values()),
                mine[lazy.address].label)

    assert run_in_child(child) == (True, True, "* thpguard region 'lazy-w' copy=userfault")
    # A child that could not arm: its region is not registered, and it has no pool.
    _native.fault_inject("copy_arm", errno.EMFILE, 1)
    try:
        armed, has_pool, label = run_in_child(child)
    finally:
        _native.fault_clear()
    assert (armed, has_pool) == (False, False)
    assert label == ("* thpguard region 'lazy-w' copy=userfault (not armed: its writes split; see "
                     "copy_stats()['arm_errno'] in that process for why; the guard repairs the splits)")
    rows = _status_rows(os.getpid())  # the parent is unchanged
    assert rows[lazy.address].copy_armed and rows[lazy.address].copy_mode == "userfault"


def test_watch_and_status_leave_the_pool_out_of_totals(copy_region, pmd, capsys):
    """In a child of two healthy 4 MiB copy regions, watch and status count
    only the regions as eligible and PMD-mapped: the lazy copy's pool VMA
    (spare huge pages) has its own totals, checked against smaps."""
    from thpguard import _procmap, cli

    regions = [copy_region(4 * MiB, name=f"pool-totals-{i}") for i in range(2)]
    for region in regions:
        _fill(region)
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        def body():
            os.close(go_w)
            os.close(ready_r)
            for region in regions:
                view = region.view()
                view[0] ^= 1  # the child's first write takes a block from its pool
                view.release()
            os.write(ready_w, b"r")
            os.read(go_r, 1)  # until the parent has looked
            return 0

        exit_child(body)
    os.close(go_r)
    os.close(ready_w)
    try:
        assert read_pipe(ready_r, "the child's writes", pid) == b"r"
        pc = _procmap.scan_process(pid)
        pool = [v for v in pc.vmas if v.copy_pool]
        assert pool, "the child has no copy pool VMA"
        mine = [v for v in pc.vmas if v.region is not None and v.region.startswith("pool-totals-")]
        assert len(mine) == 2
        # Ground truth: both regions wholly PMD-mapped in the child.
        for v in mine:
            assert smaps_huge_bytes(pid, v.start, v.end) == v.size == 4 * MiB
        others = [v for v in pc.vmas if v.thp_eligible and not v.copy_pool]
        t = pc.totals(only_eligible=True)
        assert t["eligible_bytes"] == sum(v.size for v in others)
        assert t["huge_bytes"] == sum(v.huge_bytes for v in others)
        assert t["copy_pool_bytes"] == sum(v.size for v in pool if v.thp_eligible)
        # The child's handler refills its pool meanwhile: compare within one scan.
        assert t["copy_pool_huge_bytes"] == sum(v.huge_bytes for v in pool if v.thp_eligible)
        assert t["copy_pool_huge_bytes"] <= t["copy_pool_bytes"]

        assert cli.main(["watch", "--count", "1", "--json", str(pid)]) == 0
        sample = json.loads(capsys.readouterr().out.splitlines()[0])
        assert sample["totals"]["eligible_bytes"] == t["eligible_bytes"]
        assert sample["totals"]["huge_bytes"] == t["huge_bytes"]
        assert sample["totals"]["copy_pool_bytes"] == t["copy_pool_bytes"] > 0
        assert cli.main(["watch", "--count", "1", str(pid)]) == 0
        line = capsys.readouterr().out
        if all(v.region is not None for v in others):  # no other eligible VMA in the child
            assert "PMD-mapped 8M of 8M eligible (100%)" in line, line
        assert "copy pool" in line and "not counted" in line

        assert cli.main(["status", "--json", str(pid)]) == 0
        totals = json.loads(capsys.readouterr().out)["processes"][0]["totals"]
        assert totals["huge_bytes"] == sum(v.huge_bytes for v in pc.vmas if not v.copy_pool)
        assert totals["copy_pool_bytes"] == sum(v.size for v in pool)

        from thpguard import metrics

        text = metrics.textfile([pc])
        huge = [line for line in text.splitlines() if line.startswith("thpguard_process_huge_bytes")]
        counted = sum(v.huge_bytes for v in pc.vmas if not v.copy_pool and (v.advised or v.huge_bytes))
        assert len(huge) == 1 and float(huge[0].rsplit(" ", 1)[1]) == counted
    finally:
        os.close(go_w)
        os.close(ready_r)
        assert wait_child(pid, "the child after status and watch") == 0


def _blocked_syscalls():
    """{tid: syscall number} of this process's threads (/proc/self/task/*/syscall;
    "running" for a thread not in a system call)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/syscall") as f:
            out[int(tid)] = f.read().split()[0]
    return out


def _cpus_allowed(tid):
    with open(f"/proc/self/task/{tid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))


def test_child_handler_ready_before_child_code(copy_region, pmd):
    """A child's handler thread has run and filled its first pool block
    when the child's first line runs: its first write copies the block
    without allocating in the fault."""
    region = copy_region(8 * MiB)
    expected = _fill(region)
    # Generous: only the order is under test, not how long a busy host takes.
    _native.copy_set_child_ready_wait(30.0)
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the first thing the child does
            try:
                ready = _native.copy_stats()["pool_ready"]
                threads = _blocked_syscalls()
                view = region.view()
                view[0] = 0x5A
                view.release()
                stats = _native.copy_stats()
                os.write(w, json.dumps({
                    "ready": ready, "threads": {str(k): v for k, v in threads.items()},
                    "cpus": sorted({_cpus_allowed(tid) for tid in threads}),
                    "copies": stats["copies"], "inline": stats["inline_allocs"],
                    "complete": region.coverage().complete}).encode())
            finally:
                os._exit(0)
    finally:
        _native.copy_set_child_ready_wait(0.05)
    os.close(w)
    with os.fdopen(r) as f:
        child = json.loads(f.read())
    os.waitpid(pid, 0)
    assert child["ready"] == 1, child
    # The handler thread: in poll (7 on x86-64), or on its way there from
    # the futex that let the child go on.
    handler = [v for tid, v in child["threads"].items() if int(tid) != pid]
    assert len(handler) == 1, child
    if os.uname().machine == "x86_64":
        assert handler[0] in ("7", "running"), child
    assert (child["copies"], child["inline"], child["complete"]) == (1, 0, True), child
    # The handler's first run was on the forking thread's CPU; once it handled
    # a fault it runs on the CPUs that thread may use again.
    assert len(child["cpus"]) == 1, child
    assert checksum(region.view()) == expected and region.coverage().complete
