"""multiprocessing with the fork start method: share and copy regions in a Pool."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest

from conftest import WAIT, checksum, smaps_huge_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Set by the test before the pool forks; the workers inherit them.
_regions = {}


def _huge(pid, region):
    return smaps_huge_bytes(pid, region.address, region.address + region.size)


def _task(block):
    """In a worker: read, write one byte per region, repair the share region."""
    share, copy = _regions["share"], _regions["copy"]
    pmd, pid = share.pmd_size, os.getpid()
    seen = (share.view()[block * pmd], copy.view()[block * pmd])
    share.view()[block * pmd] = block + 1
    copy.view()[block * pmd] = block + 1
    split = _huge(pid, share)
    result = share.collapse()
    return {
        "pid": pid,
        "seen": seen,
        "split": split,
        "repaired": _huge(pid, share),
        "copy": _huge(pid, copy),
        "data_kept": share.view()[block * pmd] == block + 1,
        "failures": result.failures,
    }


@pytest.fixture
def share_and_copy(region_factory, pmd):
    _regions["share"] = region_factory(4 * pmd, fork="share")
    _regions["copy"] = region_factory(4 * pmd, fork="copy")
    yield _regions["share"], _regions["copy"]
    _regions.clear()


def test_pool_workers_split_and_repair(share_and_copy, pmd):
    """Each worker's write splits only its share block; collapse repairs it (smaps)."""
    share, copy = share_and_copy
    sums = checksum(share.view()), checksum(copy.view())
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_task, range(4), chunksize=1)
        pids = {r["pid"] for r in results}
        # Ground truth from outside, while the workers still live.
        outside = {pid: (_huge(pid, share), _huge(pid, copy)) for pid in pids}
    for r in results:
        assert r["seen"] == (0, 0)
        assert r["split"] < share.size, "the write did not split the worker's block"
        assert r["repaired"] == share.size and r["data_kept"] and not r["failures"]
        assert r["copy"] == copy.size, "the copy region split in a worker"
    assert all(v == (share.size, copy.size) for v in outside.values()), outside
    # The parent's data and huge pages are untouched by the workers.
    assert (checksum(share.view()), checksum(copy.view())) == sums
    assert _huge(os.getpid(), share) == share.size
    assert _huge(os.getpid(), copy) == copy.size


def test_multiprocessing_example_runs(require_thp):
    """examples/multiprocessing_pool.py (included in the docs) runs as documented."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "multiprocessing_pool.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    workers = [line for line in done.stdout.splitlines() if line.startswith("worker")]
    assert len(workers) == 4
    assert all("split blocks 1, share coverage 1.00 after repair, copy coverage 1.00" in line
               for line in workers), done.stdout
    assert "parent: share 1.00, copy 1.00" in done.stdout


GUARDED_POOL = '''
import multiprocessing, os, sys, time
import thpguard
from thpguard import kernel

shared = thpguard.alloc(8 << 20, fork="share")

def huge(pid):
    return sum(v.fields.get("AnonHugePages", 0) for v in kernel.read_smaps(pid)
               if v.start >= shared.address and v.end <= shared.address + shared.size)

def write(block):
    shared.view()[block * shared.pmd_size] = 1  # no collapse here: the guard repairs
    time.sleep(0.05)
    return os.getpid()

if __name__ == "__main__":
    assert thpguard.guard() is not None and thpguard.guard().running
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pids = set(pool.map(write, range(4), chunksize=1))
        deadline = time.monotonic() + 60  # only ends a hang: the guard repairs on its ticks
        while time.monotonic() < deadline and any(huge(p) < shared.size for p in pids):
            time.sleep(0.05)
        print(" ".join(f"{p}:{huge(p)}" for p in sorted(pids)), flush=True)
        ok = all(huge(p) == shared.size for p in pids)
    sys.exit(0 if ok and shared.coverage().complete else 1)
'''


def test_guard_repairs_pool_workers(require_thp, tmp_path):
    """THPGUARD_GUARD=1: the guard restarts in each Pool worker and repairs its split."""
    script = tmp_path / "guarded_pool.py"
    script.write_text(GUARDED_POOL)
    env = dict(os.environ, THPGUARD_GUARD="1", THPGUARD_GUARD_INTERVAL="0.05")
    # Longer than the script's own minute, so a hang there ends with its
    # own report (the workers' huge bytes), not this timeout.
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=WAIT * 3)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(entry.endswith(f":{8 << 20}") for entry in done.stdout.split()), done.stdout
