"""Reliability: no byte changes under concurrent writers, repairs and forks."""

from __future__ import annotations

import errno

import pytest

from reliability_support import (
    COUNTS,
    N_WRITERS,
    Workload,
    check_stripe,
    collapse_until_whole,
    run_child,
    scale,
    sized,
    write_stripe,
)


def _child_round(work: Workload, lo, hi):
    """In the child: the snapshot is intact, own writes stick, repair works."""
    for i in range(N_WRITERS):
        msg = check_stripe(work.stripes[i], work.bases[i], lo[i], hi[i])
        if msg:
            raise AssertionError(f"child stripe {i} at fork: {msg}")
    # Write: splits every shared block here; then repair and check again.
    for i in range(N_WRITERS):
        write_stripe(work.stripes[i], work.bases[i], 0xABCDE)
    # The parent's repair thread collapses the same shared pages meanwhile.
    result = collapse_until_whole(work.region)
    for i in range(N_WRITERS):
        msg = check_stripe(work.stripes[i], work.bases[i], 0xABCDE, 0xABCDE)
        if msg:
            raise AssertionError(f"child stripe {i} after its writes: {msg}")
    return work.region.coverage().complete, result.failures


def _grandchild_round(work: Workload, lo, hi):
    """A child that forks a grandchild that writes, then checks both sides."""
    complete, failures = _child_round(work, lo, hi)
    done = [0xABCDE] * N_WRITERS
    run_child(_child_round, work, done, done)
    for i in range(N_WRITERS):
        msg = check_stripe(work.stripes[i], work.bases[i], 0xABCDE, 0xABCDE)
        if msg:
            raise AssertionError(f"child stripe {i} after its grandchild: {msg}")
    return complete, failures


def _rounds(region, stripe_bytes, rounds, child_fn=_child_round):
    work = Workload(region, stripe_bytes)
    work.start()
    incomplete = []
    try:
        for n in range(rounds):
            work.resume()
            lo = list(work.done)
            complete, failures = run_child(
                child_fn, work, lo, send=lambda: list(work.started)
            )
            if not complete:
                incomplete.append((n, {errno.errorcode.get(e, e): k for e, k in failures.items()}))
            COUNTS["integrity_rounds"] += 1
            work.pause()
            work.check_exact()
    finally:
        work.close()
    return incomplete, work.repairs


@sized
@pytest.mark.parametrize("policy", ["share", "copy"])
def test_concurrent_writers_repair_and_fork(region_factory, pmd, policy, request, size):
    """4 writer threads + a repair thread + forking children: no byte changes.

    Default: 12 rounds on 4 stripes of one PMD block; stress: 1000 rounds
    on 4 stripes of two blocks each.
    """
    rounds = scale(12, 1000, request)
    blocks = scale(1, 2, request)
    region = region_factory(N_WRITERS * blocks * pmd, fork=policy)
    incomplete, repairs = _rounds(region, blocks * pmd, rounds)
    # Children repaired their own split blocks: the kernel agrees.
    assert incomplete == [], "rounds whose child could not repair (round, failures)"
    # And the parent's blocks, split by its writers while children shared
    # them, come back whole.
    collapse_until_whole(region)
    assert region.coverage().complete


def test_child_forks_grandchild_that_writes(region_factory, pmd):
    """Policies apply again in grandchildren; every generation keeps its bytes."""
    region = region_factory(N_WRITERS * pmd, fork="share")
    incomplete, _ = _rounds(region, pmd, 3, child_fn=_grandchild_round)
    assert incomplete == [], "rounds whose child could not repair (round, failures)"
