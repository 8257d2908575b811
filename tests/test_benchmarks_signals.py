"""SIGTERM and SIGHUP during ``python -m benchmarks``: the run unwinds as on
Ctrl-C, gives back the hugetlb pool pages it added, and still writes the JSON
of what finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import _harness, _hostlock  # noqa: E402
from benchmarks import __main__ as entry  # noqa: E402
from thpguard import kernel  # noqa: E402

REQUIRE_THP = os.environ.get("THPGUARD_REQUIRE_THP") == "1"


def _bench(name, run):
    return types.SimpleNamespace(NAME=name, TITLE=f"{name} title", run=run)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_keeps_what_finished_and_marks_the_json(tmp_path, monkeypatch, capsys, signum):
    """The first benchmark finished, the second is stopped by the signal:
    exit 128+signal, the JSON holds the first one's samples and says which
    signal stopped which benchmark; the handlers are restored afterwards."""
    unwound = []

    def done(settings):
        res = _harness.Result("done", "done title")
        res.samples["x"] = [1.0, 2.0]
        return res

    def stopped(settings):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(30)  # the handler raises before this ends
        finally:
            unwound.append(True)
        raise AssertionError("not interrupted")

    never = _bench("never", lambda settings: pytest.fail("ran after the signal"))
    benches = (_bench("done", done), _bench("stopped", stopped), never)
    monkeypatch.setattr(entry, "BENCHMARKS", benches)
    before = signal.getsignal(signum)
    out = tmp_path / "run.json"
    assert entry.main(["--only", "done,stopped,never", "--json", str(out)]) == 128 + signum
    assert unwound == [True]
    assert signal.getsignal(signum) == before
    doc = json.loads(out.read_text())
    assert doc["interrupted"] == {"signal": signal.Signals(signum).name, "benchmark": "stopped"}
    assert [r["name"] for r in doc["results"]] == ["done", "stopped"]
    assert doc["results"][0]["samples"] == {"x": [1.0, 2.0]}
    assert "interrupted by" in doc["results"][1]["skipped"]


def _lock_holders():
    """pids holding a flock on the host's pool lock file, from /proc/locks."""
    path = _hostlock.PATH if os.path.exists(_hostlock.PATH) else None
    if path is None:
        return set()
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:  # a waiter, not a holder
                continue
            if parts[1] == "FLOCK" and parts[5] == dev:
                holders.add(int(parts[4]))
    return holders


def _fail_or_skip(why):
    if REQUIRE_THP:
        pytest.fail(f"hugetlb required (THPGUARD_REQUIRE_THP=1): {why}")
    pytest.skip(why)


def test_sigterm_gives_the_hugetlb_pool_back(tmp_path):
    """A real hugetlb run killed by SIGTERM once it has grown the pool: the
    pool is back at its count, the exit status is 143 and the JSON is written."""
    if os.geteuid() != 0:
        _fail_or_skip("growing the hugetlb pool needs root")
    pmd = kernel.pmd_size()
    if not pmd or pmd not in kernel.hugetlb_sizes():
        _fail_or_skip("no hugetlb pool of the PMD size here")
    with _hostlock.hugetlb_pool_lock():
        before = kernel.hugetlb_pool(pmd).total  # nobody else has pages out while we hold it
    out = tmp_path / "run.json"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "--quick", "--only", "hugetlb",
                             "--json", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600  # it may wait for the lock behind other runs
        grown = False
        while time.monotonic() < deadline and proc.poll() is None:
            # While the run holds the lock, only it changes the pool.
            if proc.pid in _lock_holders() and kernel.hugetlb_pool(pmd).total > before:
                grown = True
                break
            time.sleep(0.05)
        if not grown:
            output = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
            pytest.fail(f"the run never held a grown pool (exit {proc.poll()}):\n{output}")
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, output
    with _hostlock.hugetlb_pool_lock():
        assert kernel.hugetlb_pool(pmd).total == before, output
    doc = json.loads(out.read_text())
    assert doc["interrupted"] == {"signal": "SIGTERM", "benchmark": "hugetlb"}
    assert "interrupted by SIGTERM" in doc["results"][-1]["skipped"]


def test_full_hugetlb_chase_fits_what_memavailable_allows():
    """The full chase (four 4 GiB regions) is sized to this host's
    MemAvailable with 2 GiB to spare, and a cut is said in a note."""
    from benchmarks import hugetlb

    res = _harness.Result("hugetlb", "t")
    try:
        size = hugetlb._chase_size(_harness.Settings.make(False), res, 4)
    except _harness.Skipped as exc:
        assert "MemAvailable" in str(exc)
        return
    available = _harness.mem_available()
    # Memory moves on a shared host between the two reads: allow 1 GiB of drift.
    assert 4 * size + hugetlb.KEEP_FREE <= available + (1 << 30)
    if size < 4 << 30:
        assert any("cut from 4 GiB" in n and "MemAvailable" in n for n in res.notes)
    else:
        assert res.notes == []
