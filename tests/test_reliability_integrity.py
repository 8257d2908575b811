"""Reliability: no byte changes under concurrent writers, repairs and forks."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import thpguard
from thpguard.errors import RegionClosedError

from reliability_support import (
    COUNTS,
    check_stripe,
    run_child,
    scale,
    stripe_base,
    write_stripe,
)

N_WRITERS = 4


class Workload:
    """4 writer threads, each filling its own stripe round after round, and
    one repair thread collapsing whatever splits, until stopped.

    ``started[i]`` is set before writer ``i`` begins a write of that seq,
    ``done[i]`` after it finished, so a reader knows the range of seqs a
    stripe may hold at any moment.
    """

    def __init__(self, region, stripe_bytes: int, repair: bool = True):
        self.region = region
        self.arr = np.frombuffer(region.view(), dtype=np.uint64)
        words = stripe_bytes // 8
        self.stripes = [self.arr[i * words : (i + 1) * words] for i in range(N_WRITERS)]
        self.bases = [stripe_base(i + 1, words) for i in range(N_WRITERS)]
        self.started = [0] * N_WRITERS
        self.done = [0] * N_WRITERS
        for i in range(N_WRITERS):
            write_stripe(self.stripes[i], self.bases[i], 0)
        self.running = threading.Event()
        self.stop = False
        # Every round starts and ends with all writers and the main thread
        # at a barrier; the timeout turns a hang into a failure.
        self.go = threading.Barrier(N_WRITERS + 1, timeout=60)
        self.paused = threading.Barrier(N_WRITERS + 1, timeout=60)
        self.repairs = 0
        self.repair_errors = []
        self.threads = [
            threading.Thread(target=self._write, args=(i,), daemon=True)
            for i in range(N_WRITERS)
        ]
        if repair:
            self.threads.append(threading.Thread(target=self._repair, daemon=True))

    def _write(self, i: int) -> None:
        try:
            while True:
                self.go.wait()
                if self.stop:
                    return
                while self.running.is_set():
                    seq = self.done[i] + 1
                    self.started[i] = seq
                    write_stripe(self.stripes[i], self.bases[i], seq)
                    self.done[i] = seq
                self.paused.wait()
        except threading.BrokenBarrierError:
            return  # close() while paused or waiting

    def _repair(self) -> None:
        while not self.stop:
            try:
                self.region.collapse()
                self.repairs += 1
                time.sleep(0.001)
            except RegionClosedError:
                return
            except Exception as exc:  # reported by check_exact()
                self.repair_errors.append(repr(exc))
                return

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def resume(self) -> None:
        self.running.set()
        self.go.wait()

    def pause(self) -> None:
        """Stop the writers after their current write and wait for them."""
        self.running.clear()
        self.paused.wait()

    def close(self) -> None:
        self.stop = True
        self.running.clear()
        self.go.abort()
        self.paused.abort()
        for t in self.threads:
            t.join(10)
        del self.stripes, self.arr

    def check_exact(self) -> None:
        """With writers paused: every stripe holds exactly its last write."""
        assert not self.repair_errors, self.repair_errors
        for i in range(N_WRITERS):
            msg = check_stripe(self.stripes[i], self.bases[i], self.done[i], self.done[i])
            assert not msg, f"parent stripe {i}: {msg}"


def _child_round(work: Workload, lo, hi):
    """In the child: the snapshot is intact, own writes stick, repair works."""
    for i in range(N_WRITERS):
        msg = check_stripe(work.stripes[i], work.bases[i], lo[i], hi[i])
        if msg:
            raise AssertionError(f"child stripe {i} at fork: {msg}")
    # Write: splits every shared block here; then repair and check again.
    for i in range(N_WRITERS):
        write_stripe(work.stripes[i], work.bases[i], 0xABCDE)
    result = work.region.collapse()
    for i in range(N_WRITERS):
        msg = check_stripe(work.stripes[i], work.bases[i], 0xABCDE, 0xABCDE)
        if msg:
            raise AssertionError(f"child stripe {i} after its writes: {msg}")
    return work.region.coverage().complete, result.failures


def _grandchild_round(work: Workload, lo, hi):
    """A child that forks a grandchild that writes, then checks both sides."""
    complete, failures = _child_round(work, lo, hi)
    done = [0xABCDE] * N_WRITERS
    run_child(_child_round, work, done, done, timeout=30)
    for i in range(N_WRITERS):
        msg = check_stripe(work.stripes[i], work.bases[i], 0xABCDE, 0xABCDE)
        if msg:
            raise AssertionError(f"child stripe {i} after its grandchild: {msg}")
    return complete, failures


def _rounds(region, stripe_bytes, rounds, child_fn=_child_round):
    work = Workload(region, stripe_bytes)
    work.start()
    incomplete = 0
    try:
        for _ in range(rounds):
            work.resume()
            lo = list(work.done)
            complete, failures = run_child(
                child_fn, work, lo, send=lambda: list(work.started), timeout=60
            )
            incomplete += not complete
            COUNTS["integrity_rounds"] += 1
            work.pause()
            work.check_exact()
    finally:
        work.close()
    return incomplete, work.repairs


@pytest.mark.parametrize("policy", ["share", "copy"])
def test_concurrent_writers_repair_and_fork(region_factory, pmd, policy, request):
    """4 writer threads + a repair thread + forking children: no byte changes."""
    rounds = scale(12, 1000, request)
    region = region_factory(N_WRITERS * pmd, fork=policy)
    incomplete, repairs = _rounds(region, pmd, rounds)
    # Children repaired their own split blocks: the kernel agrees.
    assert incomplete == 0
    # And the parent's blocks, split by its writers while children shared
    # them, come back whole.
    region.collapse()
    assert region.coverage().complete


@pytest.mark.stress
@pytest.mark.parametrize("policy", ["share", "copy"])
def test_concurrent_writers_repair_and_fork_stress(region_factory, pmd, policy, request):
    """1000 rounds of the above, on 4 stripes of 2 PMD blocks each."""
    rounds = scale(12, 1000, request)
    region = region_factory(N_WRITERS * 2 * pmd, fork=policy)
    incomplete, repairs = _rounds(region, 2 * pmd, rounds)
    assert incomplete == 0
    region.collapse()
    assert region.coverage().complete


def test_child_forks_grandchild_that_writes(region_factory, pmd):
    """Policies apply again in grandchildren; every generation keeps its bytes."""
    region = region_factory(N_WRITERS * pmd, fork="share")
    incomplete, _ = _rounds(region, pmd, 3, child_fn=_grandchild_round)
    assert incomplete == 0
