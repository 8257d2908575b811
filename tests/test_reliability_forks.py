"""Reliability: fork storms, forks from threads, grandchildren, quick exits."""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest

import thpguard
from conftest import WAIT, direct_cow_active, fork_from_threads, sharer, sigint_default

from reliability_support import COUNTS, N_WRITERS, Workload, run_child, scale, sized


def _split_and_repair_loop(region, pmd, forks, fork_fn):
    """Keep ``region`` split in this process (a sharer child, blocked on a
    pipe, shares it while we write one byte per block) while a thread
    repairs it, and fork through ``fork_fn`` meanwhile: every fork lands
    inside a repair sooner or later. Returns the bytes the thread collapsed
    (none when nothing split: then the scenario tested no repair at all).
    """
    view = region.view()
    stop = threading.Event()
    errors = []
    collapsed = []

    def repair():
        while not stop.is_set():
            try:
                collapsed.append(region.collapse().collapsed_bytes)
            except Exception as exc:
                errors.append(repr(exc))
                return

    repairer = threading.Thread(target=repair, daemon=True)
    repairer.start()
    try:
        for k in range(forks):
            with sharer():
                for off in range(0, region.size, pmd):
                    view[off] = k & 0xFF
                fork_fn(k)
    finally:
        stop.set()
        repairer.join(WAIT)
        view.release()
    assert not repairer.is_alive(), "the repair thread is stuck in collapse()"
    assert not errors, errors
    return sum(collapsed)


def _collapse_in_child(region):
    """Collapse in the child: it must finish (no lock inherited held). The
    kernel may still refuse blocks: EAGAIN for pages the parent's repair
    thread had locked at fork, ENOMEM when no 2 MiB page was free at that
    moment (this host's memory is shared with other work)."""
    result = region.collapse()
    return result.coverage.complete, result.failures


def _scenario_fork_during_repair(policy, forks):
    pmd = thpguard.region.kernel.pmd_size()
    region = thpguard.alloc(32 * pmd, fork=policy)
    try:

        def fork_fn(k):
            # run_child times out (and fails) when the child hangs.
            complete, failures = run_child(_collapse_in_child, region)
            named = {errno.errorcode.get(e, e): n for e, n in failures.items()}
            assert complete or set(failures) <= {errno.EAGAIN, errno.ENOMEM}, \
                f"collapse in child {k} left blocks split: {named}"

        collapsed = _split_and_repair_loop(region, pmd, forks, fork_fn)
        # A write to a block shared with the sharer splits it here (share);
        # copy gave the sharer its own copy, and direct COW copies on write.
        return policy == "copy" or direct_cow_active() or collapsed > 0
    finally:
        region.close()


@sized
@pytest.mark.parametrize("policy", ["share", "copy"])
def test_fork_while_another_thread_repairs(require_thp, policy, request, size):
    """A fork that lands while a thread holds a region inside collapse()
    gives a child that can still collapse (and, for `copy`, copy) its region:
    no lock is inherited locked, neither side hangs."""
    forks = scale(8, 200, request)
    # A scenario process of its own: if the parent side hangs in fork (the
    # `copy` hand-shake), run_child's timeout still ends the test.
    assert run_child(_scenario_fork_during_repair, policy, forks, timeout=WAIT + forks), \
        "nothing split while the sharer shared the region: no repair was tested"
    COUNTS["forks"] += 2 * forks


# -- storms, threads, generations -------------------------------------------

FILL = 0x3C


class PolicySet:
    """One region per fork policy, filled with known bytes."""

    def __init__(self, pmd):
        self.pmd = pmd
        self.regions = {p: thpguard.alloc(2 * pmd, fork=p) for p in thpguard.POLICIES}
        for region in self.regions.values():
            view = region.view()
            view[:] = bytes([FILL]) * len(view)
            view.release()

    def close(self):
        for region in self.regions.values():
            region.close()


def _check_policies(policies: PolicySet, expect_fill: int = FILL, write: bool = True):
    """In a child: each policy gave what docs/policies.rst promises, by ground truth."""
    from conftest import smaps_vma

    problems = []
    pmd = policies.pmd
    for name in ("share", "copy"):
        region = policies.regions[name]
        view = region.view()
        if view.tobytes() != bytes([expect_fill]) * len(view):
            problems.append(f"{name}: data differs from the parent's")
        view.release()
    copy = policies.regions["copy"]
    vma = smaps_vma("self", copy.address)
    # eager: the child owns every page at once; lazy (kernel, userfault):
    # pages stay shared until written, and stay huge when written (below).
    owned = copy.copy_mode != "eager" or vma.fields.get("Private_Dirty", 0) == copy.size
    if not owned or not copy.coverage().complete:
        problems.append(f"copy ({copy.copy_mode}): not in own huge pages ({vma.fields})")
    wipe = policies.regions["wipe"]
    view = wipe.view()
    if view.tobytes() != bytes(len(view)):
        problems.append("wipe: not zero-filled")
    view.release()
    private = policies.regions["private"]
    if not private.closed:
        problems.append("private: still open in the child")
    if any(lo <= private.address < hi for lo, hi in _rw_mappings()):
        problems.append("private: mapped readable in the child")
    # Write everything this child can, as children do.
    for name in ("share", "copy", "wipe") if write else ():
        view = policies.regions[name].view()
        view[:: pmd // 2] = bytes([0xEE]) * len(view[:: pmd // 2])
        view.release()
    if write and not copy.coverage().complete:
        problems.append(f"copy ({copy.copy_mode}): a write split a block")
    return problems


def _rw_mappings():
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if fields[1].startswith("r"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    return spans


def _assert_parent_intact(policies: PolicySet):
    for region in policies.regions.values():
        view = region.view()
        assert view.tobytes() == bytes([FILL]) * len(view), f"{region.fork}: parent data changed"
        view.release()


@pytest.fixture
def policies(require_thp, pmd):
    made = PolicySet(pmd)
    yield made
    made.close()


@sized
def test_fork_storm_with_busy_threads(require_thp, policies, pmd, request, size):
    """Forks in a row while 4 threads write and a thread repairs: every child
    gets each policy's promise, the parent's bytes never change."""
    forks = scale(12, 200, request)
    busy = thpguard.alloc(N_WRITERS * pmd)
    work = Workload(busy, pmd)
    work.start()
    try:
        work.resume()
        for _ in range(forks):
            problems = run_child(_check_policies, policies)
            assert not problems, problems
        work.pause()
        work.check_exact()
    finally:
        work.close()
        busy.close()
    COUNTS["forks"] += forks
    _assert_parent_intact(policies)


def test_fork_from_other_threads(policies):
    """Forks made by threads other than the main one follow the policies
    too (the copy hand-shake is per forking thread)."""
    results = []

    def forker():
        for _ in range(5):
            results.append(run_child(_check_policies, policies))

    fork_from_threads(2, forker, timeout=2 * WAIT)
    assert len(results) == 10 and not any(results), results
    COUNTS["forks"] += 10
    _assert_parent_intact(policies)


def _child_then_grandchild(policies):
    """The child writes, then forks: policies apply again in the grandchild."""
    for name in ("share", "copy", "wipe"):
        view = policies.regions[name].view()
        view[:] = bytes([0x77]) * len(view)
        view.release()
    return run_child(_check_policies, policies, 0x77)


def test_grandchildren_get_the_policies_again(policies):
    """copy copies again, wipe wipes again, private stays absent, share
    shows the child's data, in the grandchild of a child that wrote."""
    problems = run_child(_child_then_grandchild, policies)
    assert not problems, problems
    _assert_parent_intact(policies)


@sized
def test_children_that_exit_at_once(policies, pmd, request, size):
    """Children that leave the moment fork returns never hang the parent
    (the copy hand-shake sees EOF) and leave its data whole and huge."""
    forks = scale(30, 200, request)
    for _ in range(forks):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    COUNTS["forks"] += forks
    _assert_parent_intact(policies)
    for region in policies.regions.values():
        cov = region.coverage()
        assert cov.complete or region.collapse().coverage.complete


def _mp_worker(_):
    # A worker runs several tasks: check, but leave the data as inherited.
    return _check_policies(_MP_POLICIES, write=False)


_MP_POLICIES = None


def test_multiprocessing_fork_start_method(policies):
    """multiprocessing with the fork start method: workers (forked by the
    pool, also from its helper threads) see each policy's promise."""
    global _MP_POLICIES
    _MP_POLICIES = policies
    ctx = multiprocessing.get_context("fork")
    try:
        with ctx.Pool(2, maxtasksperchild=2) as pool:
            results = pool.map(_mp_worker, range(8), chunksize=1)
    finally:
        _MP_POLICIES = None
    assert not any(results), results
    _assert_parent_intact(policies)


INTERRUPTED_COPY_FORK = r"""
import os, signal, sys, time

def child_first():
    # Runs in the child before thpguard's copy, which the parent waits for:
    # the parent is inside os.fork() when this Ctrl-C reaches it.
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(1.0)

os.register_at_fork(after_in_child=child_first)
import thpguard

thpguard.install(interval=0.01)
r = thpguard.alloc(8 << 20, fork="copy", copy_mode="eager")  # the parent waits
pid = None
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    time.sleep(5)  # the interruption is delivered once fork() has returned
except KeyboardInterrupt:
    print("delivered after fork", pid is not None, flush=True)
os.waitpid(-1, 0)
print("guard_running", thpguard.stats()["guard_running"], flush=True)
"""


def test_ctrl_c_while_a_fork_waits_for_the_copy_keeps_the_guard(require_thp):
    """Ctrl-C while the parent waits for a `copy` child (sent by the child
    before its copy) still restarts the guard after fork, and the
    interruption reaches the caller of fork(), with its pid."""
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_COPY_FORK], capture_output=True,
                          text=True, timeout=120, preexec_fn=sigint_default)
    assert "delivered after fork True" in done.stdout, (done.stdout, done.stderr)
    assert "guard_running True" in done.stdout, (done.stdout, done.stderr)
    assert "Exception ignored" not in done.stderr, done.stderr


CLOSE_WHILE_FORKING = r"""
import os, threading, time, thpguard
stop = False
def churn(policy):
    while not stop:
        thpguard.alloc(2 << 20, fork=policy, populate=False).close()
threads = [threading.Thread(target=churn, args=(p,)) for p in ("copy", "private")]
for t in threads:
    t.start()
deadline, forks, failed = time.monotonic() + 4, 0, []
while time.monotonic() < deadline:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    forks += 1
    if status:
        failed.append(status)
stop = True
for t in threads:
    t.join()
print(forks, failed)
"""


def test_fork_while_other_threads_close_copy_regions():
    """A copy region closed by another thread during fork is never copied in the child (it faulted there)."""
    done = subprocess.run([sys.executable, "-c", CLOSE_WHILE_FORKING], capture_output=True, text=True,
                          timeout=120)
    forks, failed = done.stdout.split(" ", 1)
    assert int(forks) > 0 and failed.strip() == "[]", done.stdout + done.stderr[-1500:]
