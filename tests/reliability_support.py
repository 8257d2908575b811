"""Helpers shared by the reliability tests (test_reliability_*.py).

Patterns are self-describing 8-byte words, so a reader can tell a word that
was written (by whom, at which index, in which round) from one that was
lost, moved or half-copied.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import json
import os
import threading
import time

import numpy as np
import pytest

from conftest import WAIT, sharer, skip_thp
from thpguard import _child, _native, kernel, pagemap
from thpguard.errors import RegionClosedError

#: What the reliability tests did (rounds, faults injected, inputs tried),
#: written as JSON at exit to the file named by THPGUARD_RELIABILITY_COUNTS.
COUNTS: "collections.Counter[str]" = collections.Counter()
_COUNTS_FILE = os.environ.get("THPGUARD_RELIABILITY_COUNTS")
_MAIN_PID = os.getpid()


def _write_counts() -> None:
    if _COUNTS_FILE and os.getpid() == _MAIN_PID:
        with open(_COUNTS_FILE, "w") as f:
            json.dump(dict(COUNTS), f, sort_keys=True, indent=1)


atexit.register(_write_counts)


def inject(op: str, err: int, count: int = 1) -> None:
    """Inject ``count`` faults of ``op`` (see thpguard._native.fault_inject)."""
    _native.fault_inject(op, err, count)
    COUNTS["faults_injected"] += count

_IDX_BITS = 24
_SEQ_BITS = 24
_TAG_SHIFT = _IDX_BITS + _SEQ_BITS


def stripe_base(tag: int, words: int) -> np.ndarray:
    """The seq-less part of the pattern of stripe ``tag``: tag and index."""
    assert words < (1 << _IDX_BITS)
    return np.arange(words, dtype=np.uint64) | np.uint64(tag << _TAG_SHIFT)


def write_stripe(stripe: np.ndarray, base: np.ndarray, seq: int) -> None:
    """Fill ``stripe`` with the words of round ``seq`` (no temporary copy)."""
    np.bitwise_or(base, np.uint64((seq & ((1 << _SEQ_BITS) - 1)) << _IDX_BITS), out=stripe)


def check_stripe(stripe: np.ndarray, base: np.ndarray, lo: int, hi: int) -> str:
    """'' when every word is this stripe's, at its index, of a seq in [lo, hi].

    Otherwise a sentence naming the first bad word.
    """
    seq = (stripe >> np.uint64(_IDX_BITS)) & np.uint64((1 << _SEQ_BITS) - 1)
    bad_shape = (stripe & ~np.uint64(((1 << _SEQ_BITS) - 1) << _IDX_BITS)) != base
    bad_seq = (seq < np.uint64(lo)) | (seq > np.uint64(hi))
    bad = np.flatnonzero(bad_shape | bad_seq)
    if bad.size == 0:
        return ""
    i = int(bad[0])
    return (
        f"{bad.size} bad words; first at word {i}: {int(stripe[i]):#018x}, "
        f"expected {int(base[i]):#018x} with seq in [{lo}, {hi}]"
    )


@contextlib.contextmanager
def split_here(region, pmd: int, blocks: int):
    """Split the first ``blocks`` PMD blocks of ``region`` in this process,
    and keep them split for the ``with`` block unless the code under test
    collapses them.

    A child shares the region (it waits on a pipe, not on a timer) while
    this process writes one byte per block (the kernel splits the writer's
    PMD). The child keeps sharing until the block ends: khugepaged leaves a
    block alone while more than ``max_ptes_shared`` of its PTEs map shared
    pages (511 here, 256 allowed by default), while MADV_COLLAPSE has no such
    limit. Without the sharer, khugepaged's next pass may repair a block
    the test expects split (seen once under load).
    """
    limit = kernel.khugepaged_settings().get("max_ptes_shared")
    if limit is not None and limit >= pmd // os.sysconf("SC_PAGE_SIZE") - 1:
        skip_thp(f"khugepaged's max_ptes_shared is {limit}: it may repair a split "
                 "block shared with a child before the test looks")
    with sharer():
        view = region.view()
        for b in range(blocks):
            view[b * pmd] = (view[b * pmd] + 1) & 0xFF
        view.release()
        yield


def collapse_until_whole(region, timeout: float = WAIT):
    """``region.collapse()`` again while the kernel refuses blocks only for
    the moment, until the region is whole or ``timeout`` seconds passed;
    the last CollapseResult.

    Transient: EAGAIN (another process or thread, such as a repair thread
    collapsing the same shared pages, holds a page lock) and ENOMEM (no free
    2 MiB page at that instant: this host's memory is shared). The guard
    retries those on a later tick; a test that repairs by hand does the same.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = region.collapse()
        if (result.coverage.complete or time.monotonic() > deadline
                or not set(result.failures) <= {errno.EAGAIN, errno.ENOMEM}):
            return result
        time.sleep(0.001)


#: Fork; in the child run ``fn(*args)`` (``fn(*args, received)`` with
#: ``send``: the parent computes ``send()`` after the fork and passes it
#: down). A child that gives no result within ``timeout`` seconds is killed
#: and the test fails: a hang after fork is a bug (a lock held across fork).
run_child = _child.run


@pytest.fixture
def no_faults():
    """Clear injected faults (and the scan fallback they may flip) afterwards."""
    supported = pagemap.scan_supported()
    _native.fault_clear()
    yield
    _native.fault_clear()
    pagemap._scan_state()["supported"] = supported


def own_mappings(min_size: int = 0):
    """Set of (start, end) of this process's mappings of at least
    ``min_size`` bytes, from /proc/self/maps."""
    spans = set()
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if hi - lo >= min_size:
                spans.add((lo, hi))
    return spans


def region_shaped_mappings(pmd: int = 2 << 20):
    """Set of (start, end) of this process's mappings shaped like a region
    (PMD-aligned start, a whole number of PMD blocks), from /proc/self/maps:
    cheap enough to take around every hypothesis example."""
    return {(lo, hi) for lo, hi in own_mappings(pmd) if lo % pmd == 0 and (hi - lo) % pmd == 0}


def leaked_regions(before):
    """Region-shaped mappings made since ``before`` (a
    :func:`region_shaped_mappings` result) that are MADV_HUGEPAGE-advised
    (smaps VmFlags ``hg``), as every region is: the interpreter's arenas
    and a sanitizer allocator's regions come and go, but are never advised.
    smaps (~100 ms here) is read only when something new appeared."""
    new = region_shaped_mappings() - before
    if not new:
        return set()
    from thpguard import kernel

    return new & {(v.start, v.end) for v in kernel.read_smaps("self") if "hg" in v.vm_flags}


#: Parametrize a test into its default size and its big version, which
#: carries the ``stress`` marker (deselected unless ``-m stress``).
sized = pytest.mark.parametrize(
    "size", ["default", pytest.param("stress", marks=pytest.mark.stress)]
)


def scale(default: int, stress: int, request) -> int:
    """``stress`` under the stress marker, else ``default``."""
    if request.node.get_closest_marker("stress"):
        return stress
    return default


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


def children(pid: int):
    """PIDs of the children of ``pid`` (its main thread's), or [] once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []
