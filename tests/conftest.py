"""Shared fixtures: THP availability, child processes, ground truth readers."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import zlib

import pytest

import thpguard
from thpguard import _checks, _child, _fork, kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks._hostlock import hugetlb_pool_lock  # noqa: E402

REQUIRE_THP = os.environ.get("THPGUARD_REQUIRE_THP") == "1"


def pytest_configure(config):
    """A run started in the background by a script (tests/under-load.sh)
    inherits SIGINT ignored; give it Ctrl-C's meaning back, so the script
    can end the run with SIGINT and every fixture's teardown still gives
    back what its test took (pool pages, cgroups, servers)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def thp_unavailable_reason():
    """Why this host cannot give PMD THP to an advised region, or None."""
    if not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        return "the kernel has no transparent huge pages (no sysfs directory)"
    ok, reason = kernel.can_get_huge_pages()
    return None if ok else reason


def skip_thp(reason):
    """Skip the test for a reason of THP (or the host's huge pages); under
    THPGUARD_REQUIRE_THP=1 (CI) fail instead, so no such test passes silently."""
    if REQUIRE_THP:
        pytest.fail(f"THP required (THPGUARD_REQUIRE_THP=1), but: {reason}")
    pytest.skip(reason)


@pytest.fixture
def require_thp():
    """Skip without THP; fail instead when THPGUARD_REQUIRE_THP=1 (CI)."""
    reason = thp_unavailable_reason()
    if reason:
        if REQUIRE_THP:
            pytest.fail(f"THP required (THPGUARD_REQUIRE_THP=1) but unavailable: {reason}")
        pytest.skip(f"needs transparent huge pages: {reason}")


@pytest.fixture
def pmd():
    return kernel.pmd_size()


# -- what the running kernel offers (the kernel matrix runs these tests on
# -- 5.10, 6.1 and 6.12 guests; the development host has everything)


def has_pagemap_scan() -> bool:
    """True when coverage() comes from PAGEMAP_SCAN (Linux 6.7+), with split_ranges."""
    return kernel.capabilities().pagemap_scan.available


def has_collapse() -> bool:
    """True when MADV_COLLAPSE can repair split blocks (Linux 6.1+)."""
    return kernel.capabilities().collapse.available


def direct_cow_active() -> bool:
    """True when the kernel copies a shared huge page on write instead of splitting it
    (the thp_cow patch, thp_cow=madvise or always): share regions do not split."""
    caps = kernel.capabilities()
    return caps.direct_cow.available and caps.thp_cow in ("madvise", "always")


@pytest.fixture
def require_collapse(require_thp):
    """Skip where the kernel cannot repair splits (no MADV_COLLAPSE, Linux < 6.1)."""
    feature = kernel.capabilities().collapse
    if not feature.available:
        pytest.skip(f"needs MADV_COLLAPSE to repair splits: {feature.reason}")


@pytest.fixture
def require_agent(require_collapse):
    """Skip where the agent cannot work: it needs PAGEMAP_SCAN (6.7), process_madvise
    with MADV_COLLAPSE (6.1) and CAP_SYS_NICE."""
    caps = kernel.capabilities()
    for name in ("pagemap_scan", "process_madvise"):
        if not caps.features[name].available:
            pytest.skip(f"the agent needs {name}: {caps.features[name].reason}")
    if not _checks.has_capability(_checks.CAP_SYS_NICE):
        pytest.skip("the agent needs CAP_SYS_NICE (run the tests as root)")


@pytest.fixture
def expect_splits(require_thp):
    """Skip where a write to a huge page shared after fork does not split it
    (direct COW: the kernel copies the whole huge page instead)."""
    if direct_cow_active():
        pytest.skip("the kernel copies shared huge pages on write (direct COW, thp_cow="
                    f"{kernel.capabilities().thp_cow}): a shared region does not split")


@pytest.fixture
def split_and_repair(require_collapse, expect_splits):
    """For tests that split a shared block on write and expect it repaired."""


def smaps_vma(pid, start):
    """The smaps entry (kernel.Vma) of ``pid`` that starts at ``start``, or None."""
    for vma in kernel.read_smaps(pid):
        if vma.start == start:
            return vma
    return None


def smaps_huge_bytes(pid, start, end):
    """AnonHugePages summed over the VMAs of ``pid`` inside [start, end)."""
    return sum(
        v.fields.get("AnonHugePages", 0)
        for v in kernel.read_smaps(pid)
        if v.start >= start and v.end <= end
    )


def checksum(buf) -> int:
    return zlib.crc32(buf)


def _time_scale() -> float:
    raw = os.environ.get("THPGUARD_TEST_TIME_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 1 <= value <= 1000:
        raise pytest.UsageError(
            f"THPGUARD_TEST_TIME_SCALE={raw!r}: expected a number from 1 to 1000 "
            "(how many times slower than a bare host this run may be)")
    return value


#: THPGUARD_TEST_TIME_SCALE (default 1): how many times slower than a bare
#: host this run may be. It multiplies every deadline of the suite (WAIT,
#: the children's default wait, the fork tests' alarm) and nothing else: the
#: tests wait on conditions, and a deadline only bounds a hang. The kernel
#: matrix's guests set it (tests/kernels/guest.sh), since under qemu's
#: software emulation they run 10 to 50 times slower than the host.
TIME_SCALE = _time_scale()

#: Seconds a test waits for a condition before it fails. Long on purpose:
#: a deadline only turns a hang into a failure (other work may be slowing
#: this host down), it never decides whether something was fast enough.
WAIT = 60.0 * TIME_SCALE
# Children the tests fork (run_in_child, Child) wait as long.
_child.DEFAULT_TIMEOUT = WAIT


def wait_until(predicate, what: str, timeout: float = WAIT, poll: float = 0.01):
    """Poll ``predicate()`` until it returns something true, and return that.

    Fails the test, naming ``what`` was awaited (a string, or a callable
    that returns one when the wait failed), after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what() if callable(what) else what}")
        time.sleep(poll)


def assert_smaps_huge(region) -> None:
    """The kernel's smaps shows all of ``region`` mapped by huge pages in this process."""
    end = region.address + region.size
    huge = smaps_huge_bytes(os.getpid(), region.address, end)
    assert huge == region.size, f"smaps: {huge} of {region.size} bytes huge"


def wait_repaired(guard, region, what: str = "the guard to repair the region",
                  timeout: float = WAIT) -> None:
    """Wait, tick by tick, until ``region`` is fully PMD-mapped again, then
    for the end of one more tick, so the guard's counters include the repair;
    then check smaps agrees.

    Fails the test naming ``what`` after ``timeout`` seconds, or at once when
    the guard stops ticking.
    """
    deadline = time.monotonic() + timeout
    while not region.coverage().complete:
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what} ({region.coverage()})")
        assert guard.wait_ticks(1, timeout=timeout), f"the guard stopped ticking ({what})"
    assert guard.wait_ticks(1, timeout=timeout), f"the guard stopped ticking ({what})"
    # The kernel's own account agrees (smaps, not thpguard's reading of it).
    assert_smaps_huge(region)


@contextlib.contextmanager
def sharer():
    """A child that keeps sharing every region until the block ends.

    It blocks on a pipe (never on a timer), so a write inside the block
    always finds the pages shared.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_end)
        try:
            os.read(read_end, 1)
        finally:
            os._exit(0)
    os.close(read_end)
    try:
        yield pid
    finally:
        os.close(write_end)
        wait_child(pid, "the sharer to exit once its pipe closed")


def _kill_and_reap(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def wait_child(pid, what, timeout=WAIT):
    """Reap the forked child ``pid`` and return its wait status.

    For tests that fork with os.fork() themselves (the fork is what they
    test); everything else uses run_in_child. A child not gone within
    ``timeout`` seconds is killed and reaped, and the test fails naming
    ``what`` it waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            _kill_and_reap(pid)
            pytest.fail(f"waited {timeout:g} s for child {pid} to exit ({what}); killed it")
        time.sleep(0.01)


def read_pipe(fd, what, pid=None, n=1, timeout=WAIT) -> bytes:
    """Up to ``n`` bytes from the pipe ``fd`` (b"" at EOF), waiting at most
    ``timeout`` seconds; then the test fails naming ``what``, after killing
    and reaping the child ``pid`` when one is given."""
    if not select.select([fd], [], [], timeout)[0]:
        if pid is not None:
            _kill_and_reap(pid)
        pytest.fail(f"waited {timeout:g} s for {what} on a pipe"
                    + (f" (child {pid}, killed)" if pid is not None else ""))
    return os.read(fd, n)


def exit_child(body) -> None:
    """In a child forked with os.fork(): run ``body()``, which returns the
    exit status, and leave with os._exit whatever happens (an exception
    prints its traceback and exits 70), so the child never returns into
    the test runner."""
    status = 70
    try:
        status = body()
    except BaseException:
        traceback.print_exc()
    finally:
        _child.leave(status if isinstance(status, int) else 70)


def fork_from_threads(n: int, body, timeout: float = WAIT) -> None:
    """Run ``body()`` in ``n`` threads at once, for tests that fork from threads.

    No thread starts or ends while another one forks: every thread is
    running before any calls ``body``, none returns before all are done,
    and this returns once the kernel has removed them. A thread's start and
    end take the C runtime's locks without the GIL (AddressSanitizer's
    allocator among them, which GCC 12's runtime does not make safe across
    fork), so a child forked at that moment could hang on its first
    allocation. Fails the test if a thread is still running after
    ``timeout`` seconds; an exception in a thread (``body``'s, or a barrier
    that broke) is raised here once all have ended.
    """
    started = threading.Barrier(n, timeout=timeout)
    ended = threading.Barrier(n, timeout=timeout)
    raised = []

    def run() -> None:
        try:
            started.wait()
            body()
        except BaseException as exc:  # raised again in the calling thread
            raised.append(exc)
        finally:
            try:
                ended.wait()
            except threading.BrokenBarrierError:
                pass

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        pytest.fail(f"a thread forking in {getattr(body, '__name__', body)!s} still ran after "
                    f"{timeout:g} s (a fork hung)")
    for t in threads:
        _fork.wait_task_gone(t.native_id)
    if raised:
        raise raised[0]


#: Fork, run ``fn(*args)`` in the child, return its result (thpguard._child.run):
#: the child's exception, death or hang fails the test with what happened.
run_in_child = _child.run


@pytest.fixture
def region_factory(require_thp):
    """alloc() that closes every region it made at the end of the test."""
    made = []

    def make(size, **kwargs):
        region = thpguard.alloc(size, **kwargs)
        made.append(region)
        return region

    yield make
    for region in made:
        if not region.closed:
            region.close()


# -- hugetlb pools ---------------------------------------------------------------------------

HUGEPAGES = "/sys/kernel/mm/hugepages"


def _nr_path(page_size):
    return f"{HUGEPAGES}/hugepages-{page_size // 1024}kB/nr_hugepages"


def _read_nr(page_size):
    with open(_nr_path(page_size)) as f:
        return int(f.read())


def _write_nr(page_size, value):
    with open(_nr_path(page_size), "w") as f:
        f.write(f"{value}\n")


#: Set in the environment of a pytest run started by a test that already
#: holds the host's pool lock for it (and waits for it to end): flock would
#: otherwise make the inner run wait for its own parent.
POOL_LOCK_HELD_BY_PARENT = "THPGUARD_TEST_POOL_LOCK_HELD_BY_PARENT"


@contextlib.contextmanager
def pool_lock():
    """Hold the host's hugetlb pool lock (benchmarks/_hostlock.py) for the block,
    unless the parent test run holds it for this run."""
    if os.environ.get(POOL_LOCK_HELD_BY_PARENT) == "1":
        yield
        return
    with hugetlb_pool_lock():
        yield


@pytest.fixture
def hugepool_lock():
    """Hold the host's hugetlb pool lock for the whole test: for tests that
    read the pool's counts or take pages from it without growing it (every
    run of this suite and of the benchmarks that grows the pool holds it
    too, so none of them changes the pool under such a test)."""
    with pool_lock():
        yield


@pytest.fixture
def hugepool():
    """``hugepool(pages, page_size=PMD)``: grow a hugetlb pool by ``pages``
    free pages for this test; the pool is given back afterwards, even when
    the test fails.

    The pool is shared with everyone on the host: this only ever adds pages
    and, at the end, removes as many as it added. Skips where hugetlb or root is missing, or the
    kernel could not find the memory; THPGUARD_REQUIRE_THP=1 fails instead,
    except with ``hugepool(..., required=False)``, which always skips when
    the kernel could not find the pages (a 1 GiB page on a fragmented host
    is the kernel's limit, not a thpguard failure).
    Returns the pool (kernel.HugePool) after growing it.
    """
    grown = []  # (page_size, count before, pages added)
    lock = contextlib.ExitStack()  # holds the host's pool lock once taken
    lock_held = []

    def fail_or_skip(why):
        if REQUIRE_THP:
            pytest.fail(f"hugetlb pool required (THPGUARD_REQUIRE_THP=1): {why}")
        pytest.skip(why)

    def reserve(pages, page_size=None, required=True):
        page_size = page_size or kernel.pmd_size()
        if page_size not in kernel.hugetlb_sizes():
            fail_or_skip(f"no hugetlb pool of {page_size} bytes here")
        if not lock_held:
            # Another suite or a benchmark on this host takes turns with us.
            lock.enter_context(pool_lock())
            lock_held.append(True)
        pool = kernel.hugetlb_pool(page_size)
        before = _read_nr(page_size)
        want = before + max(0, pages - pool.available)
        if want > before:
            try:
                _write_nr(page_size, want)
            except OSError as exc:
                # The kernel may have added some pages before it failed.
                added = max(0, _read_nr(page_size) - before)
                if added:
                    grown.append((page_size, before, added))
                fail_or_skip(f"cannot grow the hugetlb pool: {exc}")
            # What the kernel actually added: it may find fewer pages than
            # asked for, and teardown must give back only those (never
            # shrink the pool below where it was).
            added = max(0, _read_nr(page_size) - before)
            if added:
                grown.append((page_size, before, added))
        pool = kernel.hugetlb_pool(page_size)
        if pool.available < pages:
            why = f"the kernel found {pool.available} of {pages} hugetlb pages of {page_size} bytes"
            if not required:
                pytest.skip(why)
            fail_or_skip(why)
        return pool

    try:
        yield reserve
    finally:
        for page_size, before, added in reversed(grown):
            # Exactly the pages added, not down to the count found at the
            # start: another test run may have grown and given back its own
            # pages meanwhile (a floor at `before` would then keep theirs).
            now = _read_nr(page_size)
            _write_nr(page_size, max(0, now - added))
        lock.close()


def hugetlb_vma(pid, start):
    """(KernelPageSize, hugetlb bytes, VmFlags) of the VMA of ``pid`` at ``start``, from smaps."""
    vma = smaps_vma(pid, start)
    if vma is None:
        return None
    return vma.fields.get("KernelPageSize"), vma.hugetlb_bytes or 0, vma.vm_flags


def readline_within(proc, stream, what, timeout=WAIT) -> str:
    """The next line of ``stream`` (a pipe from the subprocess ``proc``);
    after ``timeout`` seconds without one, ``proc`` is killed and the test
    fails naming ``what`` it waited for."""
    line = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        stop_process(proc)
        reader.join(WAIT)  # EOF now
        pytest.fail(f"waited {timeout:g} s for {what} (pid {proc.pid}); killed it")
    return line[0]


def communicate_within(proc, what, timeout=WAIT, input=None):
    """proc.communicate(); after ``timeout`` seconds the process is killed
    and the test fails naming ``what`` it waited for, with its stderr."""
    try:
        return proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"waited {timeout:g} s for {what} (pid {proc.pid}); killed it; "
                    f"stderr: {(err or '')[-2000:]}")


def stop_process(proc) -> None:
    """Kill and reap ``proc`` if it still runs (for a finally: no test leaves one behind)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def sigint_default():
    """preexec_fn for a child the test sends SIGINT: Python turns SIGINT into
    KeyboardInterrupt only if it was not ignored at start, and a shell starts
    its background jobs with it ignored (CI, tests/under-load.sh)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
