"""The plumbing of the service and snapshot benchmarks (benchmarks/): the
load generator's parsing and bounds, the memory variants against smaps, the
C workloads, the per-run arithmetic and the plot. No timings are asserted:
benchmarks are not tests."""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import _cbench, _tables, service, snapshot  # noqa: E402
from benchmarks import __main__ as entry  # noqa: E402
from conftest import read_pipe  # noqa: E402

MiB = 1 << 20


def test_parse_wrk_reads_our_report_line():
    """The script's last line gives requests, latency percentiles and req/s."""
    out = "Running 1s test\n  2 threads\nTHPGUARD_WRK " + json.dumps({
        "requests": 500, "duration_us": 2_000_000, "errors": 0, "p50_us": 3000, "p90_us": 4000,
        "p99_us": 9000, "p999_us": 12000, "max_us": 15000, "mean_us": 3100.5}) + "\n"
    found = service.parse_wrk(out)
    assert found["rps"] == 250.0 and found["p99_us"] == 9000
    with pytest.raises(RuntimeError, match="no result"):
        service.parse_wrk("Running 1s test\n")


@pytest.fixture
def tiny_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_in_repo_client_stops_at_its_request_bound(tiny_server):
    """The fallback client sends at most max_requests, on loopback, and
    reports them in wrk's shape."""
    found = service.client_load(tiny_server, seconds=30.0, connections=2, max_requests=40)
    assert 0 < found["requests"] <= 40
    assert found["errors"] == 0
    assert found["p50_us"] <= found["p99_us"] and found["rps"] > 0
    # Every request's latency is kept for the JSON, not only the percentiles.
    assert len(found["latencies_us"]) == found["requests"]
    assert max(found["latencies_us"]) == pytest.approx(found["max_us"], abs=0.1)


def test_wrk_reports_its_latency_distribution(tiny_server, tmp_path):
    """wrk keeps a histogram: our script prints its 1000 quantiles, which
    parse_wrk keeps; they rise and end at wrk's maximum."""
    if service.wrk_path() is None:
        pytest.skip("wrk is not installed (benchmarks/install-tools.sh installs it)")
    script = tmp_path / "report.lua"
    script.write_text(service._WRK_SCRIPT)
    found = service._run_wrk(tiny_server, 1.0, str(script))
    q = found["latency_quantiles_us"]
    assert len(q) == 1000 and found["requests"] > 0
    assert q == sorted(q) and q[-1] == found["max_us"]
    assert q[499] == found["p50_us"] and q[989] == found["p99_us"]


def test_every_variant_is_either_available_or_says_why():
    """unavailable() asks thpguard; a variant it lacks gets a reason, never a crash."""
    for variant in _tables.VARIANTS:
        reason = _tables.unavailable(variant, 4 * MiB)
        assert reason is None or (isinstance(reason, str) and reason)
    assert _tables.unavailable("4k", 4 * MiB) is None


def test_variant_tables_are_what_smaps_says(require_thp):
    """The 4k table has no huge page, the thp one is all PMD-mapped (smaps)."""
    size = 8 * MiB
    small = _tables.allocate("4k", size)
    huge = _tables.allocate("thp", size)
    pid = os.getpid()
    assert _tables.smaps_range(pid, small.address, small.address + size)["Rss"] >= size
    assert _tables.huge_bytes(pid, small.address, small.address + size) == 0
    assert _tables.huge_bytes(pid, huge.address, huge.address + size) == size
    assert _tables.pss(pid) >= 2 * size
    assert _tables.cpu_seconds(pid) > 0 and _tables.cpu_seconds(2 ** 31 - 7) == 0.0
    assert _tables.smaps_range(2 ** 31 - 7, 0, 1) == {}  # no such process


def test_kv_workload_counts_its_updates():
    """tgb_kv_serve does `cap` batches, about 10 % of them updates (+1 each)."""
    ffi, lib = _cbench.load()
    bits = 12
    slots = ffi.new("uint64_t[]", 2 << bits)
    lib.tgb_kv_fill(slots, bits)
    keys = [slots[2 * s] for s in range(1 << bits)]
    assert sum(1 for k in keys if k) == 1 << (bits - 1)  # half full
    before = sum(slots[2 * s + 1] for s in range(1 << bits))
    starts, lats = ffi.new("uint64_t[]", 4), ffi.new("uint64_t[]", 4)
    state = ffi.new("uint64_t *", 7)
    done = lib.tgb_kv_serve(slots, bits, state, 1000, 100, 2 ** 63, starts, lats, 3)
    assert done == 3
    updates = sum(slots[2 * s + 1] for s in range(1 << bits)) - before
    assert 200 < updates < 400  # 3000 operations, 10 % updates
    assert [slots[2 * s] for s in range(1 << bits)] == keys  # updates never move keys


def test_lookup_chain_is_deterministic():
    """The service's lookups depend only on the table and the start index."""
    ffi, lib = _cbench.load()
    table = ffi.new("float[]", 1 << 10)
    for i in range(1 << 10):
        table[i] = float(i)
    first = lib.tgb_lookup_f32(table, 10, 3, 1000)
    assert first == lib.tgb_lookup_f32(table, 10, 3, 1000) < 1 << 10
    assert lib.tgb_lookup_f32(table, 0, 3, 10) == 0  # a bad size does nothing


def _fake_run(huge_track):
    ns = 1_000_000_000
    batches = [(t * ns // 10, 1_000_000) for t in range(0, 60)]
    return {
        "fork_start_ns": 2 * ns, "fork_end_ns": 2 * ns + 5_000_000, "child_exit_ns": 4 * ns, "end_ns": 6 * ns,
        "batch_ops": 1000, "batches": batches, "clock_offset_s": 0.0, "table_bytes": 100,
        "thread_cpu_s": {"start": 0.0, "fork": 1.0, "exit": 1.5, "end": 3.5},
        "monitor": [(t / 10, huge_track(t / 10), 1000 + (200 if 2 <= t / 10 < 4 else 0),
                     500 if 2 <= t / 10 < 4 else 0) for t in range(0, 60)],
    }


def test_snapshot_phases_memory_and_time_back_to_huge():
    """A run splits into before/during/after; extra memory is store + child
    at the peak minus the store before; time back is from the child's exit."""
    fig = snapshot.summarise_run(_fake_run(lambda t: 100 if t < 2 or t >= 4.5 else 40))
    assert fig["fork_ms"] == 5.0 and fig["snapshot_s"] == 2.0
    assert fig["before_wall_ops_per_s"] == pytest.approx(20 * 1000 / 2.0)
    assert fig["during_wall_ops_per_s"] == pytest.approx(20 * 1000 / 2.0)
    assert fig["before_ops_per_s"] == pytest.approx(20 * 1000 / 1.0)  # per CPU second
    assert fig["during_ops_per_s"] == pytest.approx(20 * 1000 / 0.5)
    assert fig["extra_bytes"] == 700
    assert fig["huge_before"] == 1.0 and fig["huge_at_exit"] == 0.4
    assert fig["back_to_huge_s"] == pytest.approx(0.5) and fig["split_seen"]
    never = snapshot.summarise_run(_fake_run(lambda t: 100 if t < 2 else 40))
    assert never["back_to_huge_s"] is None
    kept = snapshot.summarise_run(_fake_run(lambda t: 100))
    assert kept["back_to_huge_s"] == 0.0 and not kept["split_seen"]


def test_snapshot_before_phase_ends_where_the_warming_starts():
    """A run that warms memory before its fork: the warming (1.5 to 2 s,
    the store's memory up by what it maps) counts in no phase, and the
    extra memory is measured against the store before it."""
    ns = 1_000_000_000
    run = _fake_run(lambda t: 100 if t < 2 or t >= 4.5 else 40)
    run["batches"] = [b for b in run["batches"] if not 1.5 * ns <= b[0] < 2 * ns]
    run["before_end_ns"] = 3 * ns // 2
    run["thread_cpu_s"] = {"start": 0.0, "before_end": 0.75, "fork": 1.0, "exit": 1.5, "end": 3.5}
    run["monitor"] = [(t, h, p + (5000 if 1.5 <= t < 2 else 0), c) for t, h, p, c in run["monitor"]]
    fig = snapshot.summarise_run(run)
    assert fig["before_wall_ops_per_s"] == pytest.approx(15 * 1000 / 1.5)
    assert fig["before_ops_per_s"] == pytest.approx(15 * 1000 / 0.75)
    assert fig["during_ops_per_s"] == pytest.approx(20 * 1000 / 0.5)
    assert fig["extra_bytes"] == 700
    assert fig["huge_before"] == 1.0


def test_warm_hugetlb_pool_leaves_the_pages_in_the_pool(hugepool):
    """The free pages are mapped, touched and unmapped: the pool keeps
    them (sysfs counts), free and unreserved as before."""
    from benchmarks._harness import warm_hugetlb_pool
    from thpguard import kernel

    pmd = kernel.pmd_size()
    hugepool(4)
    before = kernel.hugetlb_pool(pmd)
    pages, seconds = warm_hugetlb_pool(pmd)
    after = kernel.hugetlb_pool(pmd)
    assert pages >= 4 and seconds > 0
    assert (after.total, after.free, after.reserved) == (before.total, before.free, before.reserved)


def test_unavailable_variants_keep_their_row():
    """A variant the host lacks is a row that says why, not a missing row."""
    from benchmarks._harness import Result

    runs = {v: [{"rps": 100.0 * (i + 1), "per_cpu_s": 50.0, "p50_us": 1000.0, "p99_us": 2000.0, "mechanism": v,
                 "load": {"errors": 0},
                 "before": {"min_worker_huge": 1.0}, "after": {"min_worker_huge": 0.5, "pss_bytes": 10}}
                for i in range(2)] for v in ("4k", "thp")}
    res = Result("service", "t")
    service._summarise(res, runs, ["4k", "thp"], {"hugetlb": "not available on this host: empty pool"})
    rows = {r.case: r for r in res.rows}
    row = rows[_tables.LABELS["hugetlb"]]
    assert row.ratio is None and "empty pool" in row.value
    assert rows[_tables.LABELS["thp"] + ": requests/s"].ratio == 1.0
    assert [v["variant"] for v in res.series["variants"]] == ["4k", "thp", "hugetlb"]


def test_plot_draws_service_and_snapshot_panels(tmp_path):
    """The PNG is written from a document with service and snapshot series."""
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    def variants(keys):
        out = [{"variant": "4k", "label": _tables.LABELS["4k"], "available": True,
                **{k: [1.0, 1.0] for k in keys}, "worker_huge_after": 0.0, "back_to_huge_s": [None]}]
        out.append({"variant": "thp", "label": _tables.LABELS["thp"], "available": True,
                    **{k: [1.5, 1.8] for k in keys}, "worker_huge_after": 0.7, "back_to_huge_s": [1.0, None]})
        out.append({"variant": "hugetlb", "label": _tables.LABELS["hugetlb"], "available": False, "reason": "no"})
        return out

    doc = {
        "thpguard": "0", "date": "2026-12-01T10:00:00", "quick": True, "loadavg_end": "1.0 1.0 1.0",
        "host": {"kernel": "6.18", "cpu": "cpu", "cpus": 2, "loadavg": "1.0 1.0 1.0 1/1 1"},
        "results": [
            {"name": "service", "skipped": None,
             "series": {"variants": variants(("rps_ratio", "per_cpu_ratio", "p99_ratio", "pss_ratio"))}},
            {"name": "snapshot", "skipped": None,
             "series": {"variants": variants(("during_ops_per_s_ratio", "after_ops_per_s_ratio",
                                              "during_p99_us_ratio", "extra_bytes_ratio"))}},
        ],
    }
    out = tmp_path / "evidence.png"
    plot.plot(doc, str(out))
    assert out.stat().st_size > 10_000


def test_plot_of_one_panel_keeps_its_title_inside_the_figure(tmp_path, monkeypatch):
    """``--only pool`` draws one panel: the long host title still fits its width."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from benchmarks import plot

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    pool = [{"variant": "4k", "label": _tables.LABELS["4k"], "available": True,
             "lookups_ratio": [1.0], "pss_ratio": [1.0], "worker_huge_after": 0.0},
            {"variant": "hugetlb", "label": _tables.LABELS["hugetlb"], "available": False, "reason": "no"}]
    doc = {
        "thpguard": "0.1.0.dev267+g37587b6ee", "date": "2026-12-01T10:00:00", "quick": True,
        "loadavg_end": "15.84 14.08 13.99",
        "host": {"kernel": "6.18.44-fc-v669", "cpu": "Intel(R) Xeon(R) Processor", "cpus": 2,
                 "loadavg": "12.66 13.35 13.77 20/193 6981"},
        "results": [{"name": "pool", "skipped": None, "series": {"variants": pool}}],
    }
    plot.plot(doc, str(tmp_path / "pool.png"))
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for text in fig.texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, text.get_text()


def test_service_reads_every_workers_info():
    """worker_infos() gets /info from each gunicorn worker, whichever
    accepts first, in the order of the server's worker pids."""
    if service.importlib.util.find_spec("gunicorn") is None:
        pytest.skip("gunicorn is not installed in this Python: pip install -e '.[bench]'")
    server = service.Server("4k", 16 * MiB, lookups=10, write_every=0)
    try:
        server.wait_ready(timeout=180)
        for _ in range(3):
            infos = server.worker_infos(timeout=120)
            assert [i["pid"] for i in infos] == server.workers
            assert len(set(server.workers)) == service.WORKERS
    finally:
        server.stop()


def test_service_without_gunicorn_is_skipped_with_the_install_command(monkeypatch):
    """Installed with only the bench extra of an older checkout, gunicorn is missing:
    the service benchmark says so instead of failing with a dead server's log."""
    from benchmarks._harness import Settings, Skipped

    real = service.importlib.util.find_spec
    monkeypatch.setattr(service.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gunicorn" else real(name, *a))
    with pytest.raises(Skipped, match=r"gunicorn is not installed.*\[bench\]"):
        service.run(Settings.make(True))


def test_header_defers_to_a_benchmarks_own_rounds(capsys, monkeypatch):
    """service, snapshot and pool run rounds=N without a warm-up round: the run's
    header must not claim its default repetitions and warm-up for them."""
    monkeypatch.setattr(entry, "DEFAULT", [])
    assert entry.main([]) == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ratios:")]
    assert header and "rounds=N" in header[0]


def test_entry_point_runs_end_to_end_benchmarks_only_when_named(capsys):
    """--list names agent, service, snapshot, pool and hugetlb as --only ones; a plain run leaves them out."""
    from benchmarks import BENCHMARKS, DEFAULT

    assert entry.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("agent", "service", "snapshot", "pool", "hugetlb"):
        assert f"{name} " in out
    assert out.count("(only with --only)") == 5
    assert {b.NAME for b in BENCHMARKS} - {b.NAME for b in DEFAULT} == {"agent", "service", "snapshot", "pool",
                                                                       "hugetlb"}
    _, selected = entry._parse([])
    assert [b.NAME for b in selected] == [b.NAME for b in DEFAULT]
    _, selected = entry._parse(["--only", "service,snapshot,pool"])
    assert [b.NAME for b in selected] == ["service", "snapshot", "pool"]


def test_pool_run_reports_every_worker(require_thp):
    """One pool run (in a child) reads with every worker and reads smaps for each."""
    from benchmarks import pool
    from benchmarks._harness import in_child

    found = in_child(pool._one, "thp", 8 * MiB, 0.05)
    assert len(found["workers"]) == pool.WORKERS
    assert len({w["pid"] for w in found["workers"]}) == pool.WORKERS
    assert found["min_worker_huge"] == 1.0  # nobody wrote: nothing split
    assert found["pss_bytes"] > 0 and found["lookups_per_s"] > 0


def test_lazy_copy_and_hugetlb_rows_are_asked_of_thpguard(monkeypatch):
    """Availability comes from thpguard's API: a missing keyword means this
    version lacks the mechanism, a refusal gives the host's reason."""
    import thpguard

    def old_alloc(size, *, fork=None, populate=True, strict=False):
        raise AssertionError("not called: the keyword is missing")

    monkeypatch.setattr(thpguard, "alloc", old_alloc)
    assert "not available in this thpguard version" in _tables.unavailable("copy lazy", 4 * MiB)
    assert "not available in this thpguard version" in _tables.unavailable("hugetlb", 4 * MiB)

    def new_alloc(size, *, fork=None, populate=True, strict=False, copy_mode="auto", backend="thp"):
        raise thpguard.UnsupportedError("mechanism", f"no {copy_mode if fork == 'copy' else backend} here: the reason")

    monkeypatch.setattr(thpguard, "alloc", new_alloc)
    lazy = _tables.unavailable("copy lazy", 4 * MiB)
    assert lazy.startswith("not available here") and "no lazy here: the reason" in lazy
    assert "no hugetlb here" in _tables.unavailable("hugetlb", 4 * MiB)


def _share_table_forks(size: int, children: int) -> dict:
    """In a fresh process: a hugetlb share table, ``children`` forks that
    keep sharing it, what smaps says each child maps from the pool."""
    table = _tables.allocate("hugetlb", size)
    hold_r, hold_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pids = []
    try:
        for _ in range(children):
            pid = os.fork()
            if pid == 0:
                os.close(hold_w)
                os.write(ready_w, b"r")
                os.read(hold_r, 1)
                os._exit(0)
            pids.append(pid)
        # Measured once every child waits: a child still in its at-fork
        # hooks copies pages as it writes, and the PSS of both sides moves
        # (by 1.06 MiB between two reads once).
        for pid in pids:
            read_pipe(ready_r, "a child to start", pid=pid)
        end = table.address + size
        me = os.getpid()
        return {"downgraded": table.fork_downgraded,
                "pss": _tables.pss(me) + sum(_tables.pss(p) for p in pids),
                "footprint": _tables.footprint([me] + pids),
                "children_hugetlb": [_tables.hugetlb_bytes(p, table.address, end) for p in pids],
                "children_thp": [_tables.smaps_range(p, table.address, end).get("AnonHugePages", 0)
                                 for p in pids]}
    finally:
        os.close(hold_w)
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_hugetlb_variant_sizes_the_pool_its_forks_need(hugepool):
    """With the pool hugetlb_pool_pages() asks for, two children that keep
    sharing the table are not downgraded: both map it from the pool (smaps)."""
    from benchmarks._harness import in_child

    size = 8 * MiB
    hugepool(_tables.hugetlb_pool_pages(size, 2))
    found = _tables.run_variant("hugetlb", size, 2, lambda: in_child(_share_table_forks, size, 2))
    assert found["pool"]["covered"] and found["loadavg"]
    assert found["downgraded"] is None
    assert found["children_hugetlb"] == [size, size]
    assert found["children_thp"] == [0, 0]
    # smaps leaves hugetlb pages out of PSS; footprint() counts the shared table
    # once. The two are read one after the other, with the children waiting;
    # the measuring process's own PSS may still move by some KiB between them.
    assert abs(found["footprint"] - found["pss"] - size) < MiB, found


def test_a_downgraded_hugetlb_run_is_named_so():
    """A run whose share fork thpguard downgraded is labelled as such, with
    thpguard's reason in a note, not presented as hugetlb."""
    from benchmarks._harness import Result

    res = Result("service", "t")
    runs = [{"fork_downgraded": None, "pool": {"pages_needed": 20, "pages_free": 20}},
            {"fork_downgraded": "fork copied this share region into the child (THP): too few pages",
             "pool": {"pages_needed": 20, "pages_free": 12}}]
    label = _tables.label_of("hugetlb", runs, res)
    assert "DOWNGRADED" in label and "1 of 2" in label
    assert any("too few pages" in n and "12 of the 20" in n for n in res.notes)
    assert _tables.label_of("hugetlb", runs[:1], res) == _tables.LABELS["hugetlb"]
