"""Reliability: fork storms, forks from threads, grandchildren, quick exits."""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

import thpguard

from reliability_support import check_stripe, run_child, scale, stripe_base, write_stripe


def _split_and_repair_loop(region, pmd, forks, fork_fn):
    """Keep ``region`` split in this process (a sharer child lives while we
    write one byte per block) while a thread repairs it, and fork through
    ``fork_fn`` meanwhile: every fork lands inside a repair sooner or later.
    """
    view = region.view()
    stop = threading.Event()
    errors = []

    def repair():
        while not stop.is_set():
            try:
                region.collapse()
            except Exception as exc:
                errors.append(repr(exc))
                return

    repairer = threading.Thread(target=repair, daemon=True)
    repairer.start()
    try:
        for k in range(forks):
            sharer = os.fork()
            if sharer == 0:
                time.sleep(0.3)
                os._exit(0)
            for off in range(0, region.size, pmd):
                view[off] = k & 0xFF
            try:
                fork_fn(k)
            finally:
                os.kill(sharer, 9)
                os.waitpid(sharer, 0)
    finally:
        stop.set()
        repairer.join(10)
        view.release()
    assert not errors, errors
    return True


def _collapse_in_child(region):
    """Collapse in the child: it must finish; blocks the parent's repair
    thread was collapsing at fork may fail transiently (EAGAIN) here."""
    result = region.collapse()
    return result.coverage.complete or set(result.failures) <= {errno.EAGAIN}


def _scenario_fork_during_repair(policy, forks):
    pmd = thpguard.region.kernel.pmd_size()
    region = thpguard.alloc(32 * pmd, fork=policy)
    try:

        def fork_fn(k):
            # run_child times out (and fails) when the child hangs.
            assert run_child(_collapse_in_child, region, timeout=10)

        return _split_and_repair_loop(region, pmd, forks, fork_fn)
    finally:
        region.close()


@pytest.mark.parametrize("policy", ["share", "copy"])
def test_fork_while_another_thread_repairs(require_thp, policy, request):
    """A fork that lands while a thread holds a region inside collapse()
    gives a child that can still collapse (and, for `copy`, copy) its region:
    no lock is inherited locked, neither side hangs."""
    forks = scale(15, 200, request)
    # A scenario process of its own: if the parent side hangs in fork (the
    # `copy` hand-shake), run_child's timeout still ends the test.
    assert run_child(_scenario_fork_during_repair, policy, forks, timeout=120)
