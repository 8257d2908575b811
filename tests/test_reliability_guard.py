"""Reliability of the background guard: faults, back-off, busy forks, bad input."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thpguard
from thpguard import _native
from thpguard.errors import ThpguardError

from conftest import WAIT, assert_smaps_huge, checksum, wait_until
from reliability_support import (
    COUNTS,
    N_WRITERS,
    Workload,
    collapse_until_whole,
    inject,
    no_faults,  # noqa: F401
    run_child,
    split_here,
    scale,
    sized,
)

if not hasattr(thpguard, "install"):
    pytest.skip("the background guard is not in this tree", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("no_faults")

FAST = dict(interval=0.005, backoff_initial=0.02, backoff_max=0.08)


class Recorder:
    """Collects the guard's events (called in the guard thread)."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def __call__(self, event):
        with self.lock:
            self.events.append(event)

    def kinds(self, region=None):
        with self.lock:
            return [e.kind for e in self.events if region is None or e.address == region.address]

    def of(self, kind, region=None):
        with self.lock:
            return [e for e in self.events
                    if e.kind == kind and (region is None or e.address == region.address)]


@pytest.fixture
def guard():
    """Install a fast guard with an event recorder; always stop it."""
    recorder = Recorder()
    g = thpguard.install(on_event=recorder, **FAST)
    g.recorder = recorder
    try:
        yield g
    finally:
        g.stop()


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.EBUSY])
def test_guard_backs_off_on_hard_failures_then_repairs(region_factory, pmd, guard, err):
    """ENOMEM/EBUSY from MADV_COLLAPSE: the guard reports a failed event
    and backs off with growing delays (never busy-looping), counts the
    failures in stats(), keeps the data, and repairs once the fault is gone."""
    region = region_factory(4 * pmd)
    failures_before = thpguard.stats().repair_failures.get(errno.errorcode[err], 0)
    inject("collapse", err, 3)
    with split_here(region, pmd, 4):
        before = checksum(region.view())
        wait_until(lambda: region.coverage().complete,
                   lambda: f"the guard to repair after the faults (events: {guard.recorder.kinds(region)})")
    assert_smaps_huge(region)
    # At least the injected failures: a busy host may add a real one.
    backoffs = guard.recorder.of("backoff", region)
    assert len(backoffs) >= 3
    delays = [e.delay for e in backoffs]
    assert delays == sorted(delays) and delays[0] >= FAST["backoff_initial"]
    assert delays[-1] <= FAST["backoff_max"]
    assert errno.errorcode[err] in backoffs[0].reason
    failed = guard.recorder.of("failed", region)
    assert sum(e.failures.get(errno.errorcode[err], 0) for e in failed) >= 3
    stats = thpguard.stats()
    assert stats.repair_failures.get(errno.errorcode[err], 0) - failures_before >= 3
    assert checksum(region.view()) == before


def test_guard_persistent_eagain_backs_off(region_factory, pmd):
    """EAGAIN on every attempt: retried for eagain_ticks ticks, then backed
    off, then repaired when it clears."""
    recorder = Recorder()
    g = thpguard.install(on_event=recorder, eagain_ticks=3, **FAST)
    try:
        region = region_factory(2 * pmd)
        inject("collapse", errno.EAGAIN, 6)
        with split_here(region, pmd, 1):
            wait_until(lambda: region.coverage().complete, "the guard to repair the split")
        assert_smaps_huge(region)
        backoffs = recorder.of("backoff", region)
        assert backoffs and "EAGAIN" in backoffs[0].reason
    finally:
        g.stop()


def test_guard_disables_block_on_einval(region_factory, pmd, guard):
    """EINVAL without a cause that covers the region stops repairs of that
    block only, for a while, with a reason in stats() instead of retrying
    every tick; the region itself stays repaired."""
    region = region_factory(2 * pmd)
    inject("collapse", errno.EINVAL, 1)
    with split_here(region, pmd, 1):
        wait_until(lambda: guard.recorder.of("disabled", region), "a disabled event for the region")
    event = guard.recorder.of("disabled", region)[0]
    assert event.blocks == 1 and "no known cause" in event.reason
    s = thpguard.stats()
    assert hex(region.address) not in s.regions_disabled
    assert list(s.blocks_disabled) == [hex(region.address)]
    assert guard.running


def test_guard_survives_scan_failures(region_factory, pmd, guard):
    """PAGEMAP_SCAN failing in the guard thread is counted and logged; the
    guard keeps running and repairs once scans work again."""
    region = region_factory(2 * pmd)
    scan_failures = thpguard.stats().scan_failures
    inject("scan", errno.EIO, 5)
    assert guard.wait_ticks(8, timeout=WAIT), "the guard stopped ticking"
    _native.fault_clear()
    assert thpguard.stats().scan_failures > scan_failures
    with split_here(region, pmd, 2):
        wait_until(lambda: region.coverage().complete, "the guard to repair the split")
    assert_smaps_huge(region)
    assert guard.running


@sized
@pytest.mark.parametrize("policy", ["share", "copy"])
def test_guard_repairs_under_concurrent_writers_and_forks(region_factory, pmd, policy,
                                                        request, size):
    """The guard (not a test thread) repairs while 4 threads write and the
    main thread forks children that write: no byte changes anywhere."""
    from test_reliability_integrity import _child_round

    rounds = scale(6, 1000, request)
    region = region_factory(N_WRITERS * pmd, fork=policy)
    g = thpguard.install(**FAST)
    work = Workload(region, pmd, repair=False)
    work.start()
    try:
        for _ in range(rounds):
            work.resume()
            lo = list(work.done)
            complete, failures = run_child(_child_round, work, lo,
                                           send=lambda: list(work.started))
            assert complete, f"the child could not repair: {failures}"
            work.pause()
            work.check_exact()
            COUNTS["integrity_rounds"] += 1
        assert g.running
    finally:
        work.close()
        g.stop()
    collapse_until_whole(region)
    assert region.coverage().complete


def _guard_child(region):
    g = thpguard.guard()
    running = g is not None and g.running
    return running, checksum(region.view())


@sized
def test_fork_storm_with_guard_and_busy_threads(region_factory, pmd, request, size):
    """Forks in a row with the guard on and 4 busy threads: the guard runs
    again in every child and in the parent, data is the parent's."""
    forks = scale(15, 200, request)
    region = region_factory(2 * pmd, fork="copy")
    view = region.view()
    view[:] = b"\x5a" * len(view)
    view.release()
    expected = checksum(region.view())
    busy = thpguard.alloc(N_WRITERS * pmd)
    g = thpguard.install(**FAST)
    work = Workload(busy, pmd, repair=False)
    work.start()
    try:
        work.resume()
        for _ in range(forks):
            running, got = run_child(_guard_child, region)
            assert running and got == expected
            assert g.running
        work.pause()
        work.check_exact()
    finally:
        work.close()
        busy.close()
        g.stop()
    COUNTS["forks"] += forks


junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.just(object()),
)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(interval=junk, backoff_initial=junk, backoff_max=junk, chunk=junk,
       max_repair_bytes=junk, eagain_ticks=junk)
def test_install_arguments(interval, backoff_initial, backoff_max, chunk,
                           max_repair_bytes, eagain_ticks):
    """install() with any arguments starts a guard or raises a documented
    error; a rejected call leaves no guard thread behind."""
    COUNTS["inputs_tried"] += 1
    try:
        g = thpguard.install(interval, backoff_initial=backoff_initial,
                             backoff_max=backoff_max, chunk=chunk,
                             max_repair_bytes=max_repair_bytes, eagain_ticks=eagain_ticks)
    except ThpguardError as exc:
        assert str(exc)
        g = thpguard.guard()
    if g is not None:
        g.stop()
    assert thpguard.guard() is None


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(arg=st.one_of(junk, st.integers(min_value=-5, max_value=2 << 20)))
def test_hot_arguments(require_thp, arg):
    """hot() with any size or object enters and leaves cleanly or raises a
    documented error."""
    COUNTS["inputs_tried"] += 1
    try:
        with thpguard.hot(arg) as region:
            assert region.size >= arg
    except ThpguardError as exc:
        assert str(exc)
    finally:
        g = thpguard.guard()
        if g is not None:
            g.stop()
