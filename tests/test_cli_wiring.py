"""CLI wiring of the integrations: status --prometheus and thpguard run."""

import os
import subprocess
import sys

import pytest

from conftest import smaps_huge_bytes
from thpguard import cli
from thpguard._child import Child

prometheus_parser = pytest.importorskip("prometheus_client.parser")
MiB = 1 << 20


def _samples(text):
    return {
        (s.name, s.labels.get("pid")): s.value
        for family in prometheus_parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def _split_first_block_and_wait(channel, region):
    region.view()[0] = 1  # split one block in the child
    channel.send("split")
    channel.recv(timeout=None)  # until the parent is done (or kills it)


def test_status_prometheus_reports_split(region_factory, pmd, capsys):
    """status --prometheus prints this process's huge and split bytes as the kernel maps them."""
    region = region_factory(8 * MiB)
    with Child(_split_first_block_and_wait, region, channel=True) as child:
        child.recv(what="its split")
        pid = child.pid
        end = region.address + region.size
        assert smaps_huge_bytes(pid, region.address, end) == region.size - pmd  # ground truth
        assert cli.main(["status", "--prometheus", "--prometheus-per-pid", str(pid)]) == 0
        samples = _samples(capsys.readouterr().out)
    assert samples[("thpguard_process_split_bytes", str(pid))] == pmd
    assert samples[("thpguard_process_huge_bytes", str(pid))] >= region.size - pmd


def test_status_prometheus_file_is_written(region_factory, tmp_path):
    """--prometheus-file writes the same text to a file (for node_exporter's textfile collector)."""
    region_factory(4 * MiB)
    path = tmp_path / "thpguard.prom"
    assert cli.main(["status", "--prometheus-file", str(path), "--prometheus-per-pid", str(os.getpid())]) == 0
    samples = _samples(path.read_text())
    assert samples[("thpguard_process_huge_bytes", str(os.getpid()))] >= 4 * MiB


def _thpguard(*args):
    return subprocess.run([sys.executable, "-m", "thpguard", *args],
                          capture_output=True, text=True, timeout=60)


def test_run_sets_checked_environment():
    """thpguard run execs the command with THPGUARD_* set; the guard starts at import."""
    code = ("import os, thpguard; g = thpguard.guard(); "
            "print(os.environ['THPGUARD_FORK_POLICY'], g is not None and g.running, g.interval)")
    done = _thpguard("run", "--interval", "0.5", "--fork-policy", "copy", "--", sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["copy", "True", "0.5"]


@pytest.mark.parametrize("args, code, message", [
    (["--fork-policy", "bogus", "--", "true"], 2, "unknown fork policy"),
    (["--interval", "-1", "--", "true"], 2, "interval must be between"),
    (["--", "no-such-program-here"], 127, "not found on PATH"),
    (["--", "/nonexistent/program"], 127, "/nonexistent/program: No such file"),
    (["--", "/etc/passwd"], 126, "/etc/passwd: Permission denied"),
    ([], 2, "no command given"),
])
def test_run_bad_input(args, code, message):
    """thpguard run refuses bad settings, missing and unrunnable programs with a message and exit code."""
    done = _thpguard("run", *args)
    assert done.returncode == code and message in done.stderr
