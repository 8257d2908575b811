"""The benchmark helpers (benchmarks/ at the repo top): statistics, interleaving,
output shape. No timings are asserted: benchmarks are not tests."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import BENCHMARKS, _harness  # noqa: E402
from benchmarks import __main__ as entry  # noqa: E402


def test_interleave_runs_variants_alternately_and_drops_warmup():
    """Variants run A B A B ...; warm-up rounds are not in the samples."""
    order = []
    counter = {"a": 0, "b": 0}

    def make(name):
        def run():
            order.append(name)
            counter[name] += 1
            return counter[name]

        return run

    samples = _harness.interleave({"a": make("a"), "b": make("b")}, reps=3, warmup=1, rotate=False)
    assert order == ["a", "b"] * 4
    assert samples == {"a": [2, 3, 4], "b": [2, 3, 4]}


def test_interleave_rotates_the_first_variant_by_default():
    """Each round starts one variant later, so none always runs first."""
    order = []
    variants = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = _harness.interleave(variants, reps=2, warmup=1)
    assert order == list("abc") + list("bca") + list("cab")
    assert all(len(v) == 2 for v in samples.values())


def test_statistics_helpers():
    """median, nearest-rank percentile and ratio, including the empty cases."""
    assert _harness.median([3, 1, 2]) == 2
    values = list(range(1, 101))
    assert _harness.percentile(values, 99) == 99
    assert _harness.percentile(values, 100) == 100
    assert _harness.percentile([5.0], 99) == 5.0
    assert _harness.percentile([], 50) != _harness.percentile([], 50)  # nan
    assert _harness.ratio(3.0, 2.0) == 1.5
    # Per-round ratios: a load swing that hits both sides of a round cancels.
    assert _harness.paired([2.0, 20.0, 4.0], [1.0, 10.0, 4.0]) == 2.0
    assert _harness.ratio(1.0, 0.0) != _harness.ratio(1.0, 0.0)  # nan


def test_in_child_returns_value_and_reports_child_errors():
    """Results come back pickled; a child exception becomes a RuntimeError here."""
    assert _harness.in_child(os.getpid) != os.getpid()
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        _harness.in_child(lambda: 1 // 0)


def test_table_puts_ratio_first_and_json_keeps_rows():
    """The table lists case then ratio; as_dict is JSON-serialisable."""
    res = _harness.Result("demo", "a demo", params={"reps": 3})
    res.add("case one", 1.234, "time a/b", "2 ms", "1.6 ms")
    res.add("no ratio", None, "", "5 ms")
    res.notes.append("a note")
    text = _harness.format_table(res)
    header = text.splitlines()[2]
    assert header.split()[:2] == ["case", "ratio"]
    assert "1.23" in text and "note: a note" in text
    assert json.loads(json.dumps(res.as_dict()))["rows"][0]["ratio"] == 1.234


def test_entry_point_lists_every_benchmark(capsys):
    """--list names all eleven benchmarks and exits 0."""
    assert entry.main(["--list"]) == 0
    out = capsys.readouterr().out
    names = [b.NAME for b in BENCHMARKS]
    assert names == ["repair", "coverage", "tlb", "overhead", "fork", "alloc", "stall", "copy", "agent", "service", "snapshot", "pool",
                     "hugetlb"]
    for name in names:
        assert name in out


def test_entry_point_rejects_unknown_names(capsys):
    """--only with an unknown name is a usage error (exit 2) naming the choices."""
    with pytest.raises(SystemExit) as info:
        entry.main(["--only", "nope"])
    assert info.value.code == 2
    assert "repair" in capsys.readouterr().err


def test_host_info_has_kernel_and_thp_settings():
    """The JSON's host block names the kernel, the CPU and the THP settings."""
    host = _harness.host_info()
    assert host["kernel"] == os.uname().release
    assert "enabled" in host["thp"] and "khugepaged/max_ptes_shared" in host["thp"]
    assert host["thpguard"]


def test_json_header_says_the_rounds_each_benchmark_ran(tmp_path, monkeypatch):
    """settings.per_benchmark holds the reps and warm-up rounds a benchmark's
    interleave() really ran (service, snapshot and pool: rounds=N, no
    warm-up round), not the run's defaults."""
    import types

    def own_rounds(settings):
        _harness.interleave({"a": lambda: 1, "b": lambda: 2}, 2, warmup=0)
        return _harness.Result("own", "t", params={"rounds": 2})

    def own_loop(settings):
        return _harness.Result("loop", "t", params={"rounds": 9})

    benches = (types.SimpleNamespace(NAME="own", TITLE="t", run=own_rounds),
               types.SimpleNamespace(NAME="loop", TITLE="t", run=own_loop))
    monkeypatch.setattr(entry, "BENCHMARKS", benches)
    out = tmp_path / "run.json"
    assert entry.main(["--only", "own,loop", "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["reps"] == 7 and settings["warmup"] == 1
    assert settings["per_benchmark"]["own"] == {"reps": 2, "warmup": 0, "source": "measured"}
    assert settings["per_benchmark"]["loop"] == {"reps": 9, "warmup": 1, "source": "declared"}


def test_hugetlb_fork_child_always_ends_in_exit():
    """_fork_once's child ends in os._exit even when it raises: the parent
    gets a RuntimeError, never a second pytest running on in the child."""
    from benchmarks import hugetlb

    class Broken:
        size = 2 << 20
        address = 0

        @property
        def closed(self):
            raise ValueError("raised in the child")

    me = os.getpid()
    with pytest.raises(RuntimeError, match="child failed"):
        hugetlb._fork_once(Broken())
    assert os.getpid() == me

    class Closed:
        closed = True

    ran, took = hugetlb._fork_once(Closed())
    assert ran >= 0 and took == 0.0


@pytest.fixture
def sticky_dir():
    """A world-writable sticky directory, as /run/lock is (under /tmp: any
    user can reach it, which pytest's own temp dirs do not allow)."""
    import pathlib
    import shutil
    import tempfile

    d = pathlib.Path(tempfile.mkdtemp(prefix="thpguard-test-lock-", dir="/tmp"))
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_pool_lock_refuses_files_another_user_could_plant(sticky_dir):
    """As root: a lock file of another user, a symlink or a FIFO is refused
    with a message saying to remove it (a FIFO must not hang the open);
    root's own file is taken and released."""
    from benchmarks import _hostlock

    if os.geteuid() != 0:
        pytest.skip("the owner check applies to runs as root")
    planted = sticky_dir / "planted.lock"
    planted.write_text("")
    os.chown(planted, 65534, 65534)
    with pytest.raises(_hostlock.LockFileError, match=r"owned by uid 65534.*rm "):
        with _hostlock.hugetlb_pool_lock(path=str(planted)):
            pass
    link = sticky_dir / "link.lock"
    link.symlink_to(sticky_dir / "elsewhere")
    with pytest.raises(_hostlock.LockFileError, match="symlink"):
        with _hostlock.hugetlb_pool_lock(path=str(link)):
            pass
    assert not (sticky_dir / "elsewhere").exists()
    fifo = sticky_dir / "fifo.lock"
    os.mkfifo(fifo)
    with pytest.raises(_hostlock.LockFileError, match="not a regular file"):
        with _hostlock.hugetlb_pool_lock(path=str(fifo)):
            pass
    good = sticky_dir / "good.lock"
    with _hostlock.hugetlb_pool_lock(path=str(good)):
        assert os.stat(good).st_uid == 0
        with _hostlock.hugetlb_pool_lock(path=str(good)):  # re-entrant
            pass


def test_pool_lock_is_never_created_by_a_process_that_is_not_root(sticky_dir):
    """Not root: no file is made (root would refuse it); an existing root
    file is still taken."""
    from benchmarks import _hostlock

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    absent = sticky_dir / "absent.lock"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            with _hostlock.hugetlb_pool_lock(path=str(absent)):
                made = absent.exists()
            os.write(w, b"made" if made else b"none")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and said == b"none"
    assert not absent.exists()
