"""Prometheus: the collector scraped for real, and the node_exporter textfile."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import thpguard
from conftest import run_in_child, smaps_huge_bytes, wait_repaired
import json

from thpguard import _procmap, cli, pagemap
from thpguard._child import Child

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import thpguard.metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scrape(registry) -> dict:
    """generate_latest() parsed back: {(sample name, labels): value}."""
    text = prometheus_client.generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _split_repair_scrape(region, inject_enomem: int, register_first: bool = False):
    """In a child: guard on, write one block, let the guard repair, scrape."""
    registry = prometheus_client.CollectorRegistry()
    if register_first:
        thpguard.metrics.register(registry)
    guard = thpguard.install(interval=0.02, backoff_initial=0.01, backoff_max=0.05)
    if register_first:
        scrape(registry)  # the first scrape after install() hooks the guard's events
    else:
        thpguard.metrics.register(registry)
    if inject_enomem:
        thpguard._native.fault_inject("collapse", errno.ENOMEM, inject_enomem)
    region.view()[0] = 1
    # Then one more tick: the repairing tick has counted and emitted.
    wait_repaired(guard, region, "the guard to repair the child's split")
    huge = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
    return scrape(registry), huge, dict(thpguard.stats())


@pytest.mark.parametrize("register_first", [False, True])
def test_collector_reports_split_and_repair(region_factory, pmd, register_first):
    """A child's split and the guard's repair show up in the scraped registry."""
    region = region_factory(4 * pmd)
    samples, huge, stats = run_in_child(_split_repair_scrape, region, 0, register_first)
    assert huge == region.size  # ground truth: repaired
    assert samples[("thpguard_guarded_bytes", ())] == stats["guarded_bytes"] >= region.size
    assert samples[("thpguard_huge_bytes", ())] == stats["huge_bytes"]
    assert samples[("thpguard_coverage_ratio", ())] == 1.0
    assert samples[("thpguard_guard_running", ())] == 1.0
    assert samples[("thpguard_splits_detected_total", ())] >= 1
    assert samples[("thpguard_repairs_total", ())] >= 1
    assert samples[("thpguard_repaired_bytes_total", ())] >= pmd
    assert samples[("thpguard_repair_latency_seconds_count", ())] >= 1
    assert samples[("thpguard_repair_latency_seconds_bucket", (("le", "+Inf"),))] >= 1


def test_collector_counts_failures_by_errno(region_factory, pmd):
    """Injected MADV_COLLAPSE failures appear as repair_failures{errno="ENOMEM"}."""
    region = region_factory(2 * pmd)
    samples, huge, _ = run_in_child(_split_repair_scrape, region, 2)
    assert samples[("thpguard_repair_failures_total", (("errno", "ENOMEM"),))] >= 1
    assert huge == region.size  # repaired once the faults ran out


def test_register_is_idempotent_and_uses_the_global_registry():
    """register() twice adds one collector; the default is prometheus_client.REGISTRY."""
    registry = prometheus_client.CollectorRegistry()
    assert thpguard.metrics.register(registry) is thpguard.metrics.register(registry)
    collector = thpguard.metrics.register()
    try:
        assert "thpguard_guarded_bytes" in prometheus_client.generate_latest().decode()
    finally:
        prometheus_client.REGISTRY.unregister(collector)
        thpguard.metrics._registered.pop(id(prometheus_client.REGISTRY), None)


def test_textfile_for_another_process(region_factory, pmd, tmp_path, capsys):
    """textfile() of a live child's coverage parses, and matches its smaps."""
    region = region_factory(4 * pmd)

    def child(channel):
        region.view()[pmd] = 1  # split the second block in the child only
        channel.send("split")
        channel.recv(timeout=None)  # alive until the parent has read it

    with Child(child, channel=True) as forked:
        pid = forked.pid
        assert forked.recv(what="the child's split") == "split"
        end = region.address + region.size
        theirs = pagemap.coverage(region.address, end, pmd, pid=pid)
        ours = region.coverage()
        truth = smaps_huge_bytes(pid, region.address, end)
        # What `thpguard status` collects, as objects and as --json.
        status = [_procmap.scan_process(pid)]
        capsys.readouterr()
        assert cli.main(["status", "--json", str(pid)]) == 0
        status_json = json.loads(capsys.readouterr().out)["processes"]
        forked.send("done")
        forked.result()
    text = thpguard.metrics.textfile({os.getpid(): [ours], pid: [theirs.as_dict()]},
                                     names={pid: 'worker "1"'}, per_pid=True)
    path = tmp_path / "thpguard.prom"
    thpguard.metrics.write_textfile(str(path), text)
    assert path.read_text() == text and os.listdir(tmp_path) == ["thpguard.prom"]
    samples = {
        (s.name, s.labels.get("pid"), s.labels.get("start")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    start = f"{region.address:#x}"
    assert samples[("thpguard_vma_huge_bytes", str(pid), start)] == truth == 3 * pmd
    assert samples[("thpguard_vma_split_bytes", str(pid), start)] == pmd
    assert samples[("thpguard_process_coverage_ratio", str(pid), None)] == 0.75
    assert samples[("thpguard_vma_huge_bytes", str(os.getpid()), start)] == 4 * pmd
    assert 'comm="worker \\"1\\""' in text
    for records in (status, status_json):
        from_status = {
            (s.name, s.labels.get("start")): s.value
            for family in text_string_to_metric_families(thpguard.metrics.textfile(records, per_pid=True))
            for s in family.samples
        }
        assert from_status[("thpguard_vma_huge_bytes", start)] == 3 * pmd
        assert from_status[("thpguard_vma_split_bytes", start)] == pmd
    totals = thpguard.metrics.textfile({pid: [theirs]}, per_vma=False, per_pid=True)
    assert "thpguard_vma_" not in totals and "thpguard_process_huge_bytes" in totals


@pytest.mark.parametrize(
    "processes, error",
    [
        ([1, 2], TypeError),
        (5, TypeError),
        ({0: []}, ValueError),
        ({1: [{"start": 0, "total_bytes": 10}]}, ValueError),
        ({1: [{"start": 0, "total_bytes": "10", "huge_bytes": 0}]}, TypeError),
        ({1: [{"start": 0, "total_bytes": 10, "huge_bytes": -1}]}, ValueError),
    ],
)
def test_textfile_refuses_bad_input(processes, error):
    """Bad per-VMA data raises a clear thpguard error, not a broken file."""
    with pytest.raises(error) as info:
        thpguard.metrics.textfile(processes)
    assert isinstance(info.value, thpguard.ThpguardError)


def test_prometheus_example_runs(require_thp):
    """examples/prometheus_metrics.py (included in the docs) runs as documented."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "prometheus_metrics.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    samples = {s.name: s.value for f in text_string_to_metric_families(done.stdout)
               for s in f.samples if not s.labels}
    assert samples["thpguard_guarded_bytes"] == 8 << 20
    assert samples["thpguard_repairs_total"] >= 1


STABLE_TARGET = r"""
import os, sys, thpguard
r = thpguard.alloc(4 << 20, fork="share", name="weights")
v = r.view()
v[:] = b"\x5a" * len(v)
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:   # a second process of the same name; it splits its own second block
    v[r.pmd_size + 5] = 1
    os.write(ready_w, b"x")
    sys.stdin.read()
    os._exit(0)
os.read(ready_r, 1)
print(r.address, r.pmd_size, pid, flush=True)
sys.stdin.read()
os.waitpid(pid, 0)
"""


def test_textfile_default_labels_are_stable(require_thp, capsys):
    """By default: comm, cgroup and region name, no pid or address; same-named processes add up."""
    p = subprocess.Popen([sys.executable, "-c", STABLE_TARGET], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        addr, pmd, child = map(int, p.stdout.readline().split())
        assert cli.main(["status", "--prometheus", str(p.pid), str(child)]) == 0
        text = capsys.readouterr().out
        assert cli.main(["status", "--prometheus", "--prometheus-per-pid", str(p.pid), str(child)]) == 0
        detailed = capsys.readouterr().out
        cgroup = _procmap.cgroup_of(p.pid)
    finally:
        p.stdin.close()
        p.wait(timeout=10)
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert samples and all("pid" not in s.labels and "start" not in s.labels for s in samples)
    region = {s.name: s.value for s in samples if s.labels.get("region") == "weights"}
    assert region["thpguard_region_bytes"] == 2 * 4 * (1 << 20)  # parent and child, added up
    assert region["thpguard_region_split_bytes"] == pmd  # the child's split block
    counts = [s for s in samples if s.name == "thpguard_process_count"]
    assert [(c.labels["comm"], c.labels.get("cgroup"), c.value) for c in counts] == [
        (counts[0].labels["comm"], cgroup, 2.0)]
    by_pid = {s.labels.get("pid") for family in text_string_to_metric_families(detailed)
              for s in family.samples}
    assert by_pid == {str(p.pid), str(child)} and f'start="{addr:#x}"' in detailed


def test_collector_labels_regions_by_name(region_factory, pmd):
    """Named regions get their own region_bytes / region_huge_bytes series in the collector."""
    def child():
        registry = prometheus_client.CollectorRegistry()
        thpguard.metrics.register(registry)
        with thpguard.alloc(2 * pmd, name="embeddings"), thpguard.alloc(pmd, name="embeddings"):
            return scrape(registry)

    samples = run_in_child(child)
    assert samples[("thpguard_region_bytes", (("region", "embeddings"),))] == 3 * pmd
    assert samples[("thpguard_region_huge_bytes", (("region", "embeddings"),))] == 3 * pmd
