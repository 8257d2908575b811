"""The node agent (``thpguard agent``) against real processes that do not
import thpguard, checked with their smaps (the kernel's ground truth).

Every agent started here is limited to the test's own processes (``--pid``):
the machine is shared, and the agent must not collapse anyone else's memory.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import WAIT, wait_until

from thpguard import kernel
from thpguard._agentconfig import AgentConfig, ConfigError, Selection, from_mapping, load
from thpguard.agent import Agent, AgentLog

HERE = os.path.dirname(os.path.abspath(__file__))
VICTIM = os.path.join(HERE, "agent_victim.py")


class Victim:
    """An agent_victim.py process and its mapping."""

    def __init__(self, size_mb: int, *flags: str) -> None:
        self.proc = subprocess.Popen([sys.executable, VICTIM, str(size_mb), *flags],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = json.loads(self.proc.stdout.readline())
        self.pid, self.start, self.end = info["pid"], info["start"], info["end"]

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def huge_bytes(self) -> int:
        """AnonHugePages of the VMA that holds the mapping."""
        for v in kernel.read_smaps(self.pid):
            if v.start <= self.start < v.end:
                return v.fields.get("AnonHugePages", 0)
        raise AssertionError("mapping not found in smaps")

    def whole_blocks(self, pmd: int) -> int:
        first = -(-self.start // pmd) * pmd
        return (self.end - first) // pmd * pmd

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("exit")
            except (BrokenPipeError, OSError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def victims():
    made = []

    def make(size_mb: int, *flags: str) -> Victim:
        v = Victim(size_mb, *flags)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


def agent_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thpguard", "agent", "--log-format", "json", *args],
                          capture_output=True, text=True, timeout=timeout)


def events(stderr: str) -> list:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def once(*pids: int, extra=()) -> list:
    args = ["--once", "--min-process-bytes", "0"]
    for pid in pids:
        args += ["--pid", str(pid)]
    r = agent_cli(*args, *extra)
    assert r.returncode == 0, r.stderr
    return events(r.stderr)


def repaired_until(v: "Victim", expected: int, *extra: str, passes: int = 4) -> int:
    """Bytes repaired by one-pass agents run until the mapping is *expected* bytes
    PMD-mapped (at most *passes*): a collapse may meet ENOMEM when another
    process on the host holds the free huge pages for a moment, and the next
    pass retries, as the running agent would."""
    total = 0
    for _ in range(passes):
        total += once(v.pid, extra=extra)[-1]["repaired_bytes"]
        if v.huge_bytes() >= expected:
            break
        time.sleep(0.5)
    return total


# -- what it repairs and what it leaves alone ---------------------------------


def test_collapses_memory_never_advised(require_agent, victims, pmd, tmp_path):
    """Small-page memory of a process that never advised MADV_HUGEPAGE ends PMD-mapped;
    ``thpguard status`` shows what the agent did from its state file."""
    v = victims(64)
    assert v.huge_bytes() == 0
    state = str(tmp_path / "agent.json")
    assert repaired_until(v, v.whole_blocks(pmd), "--state-file", state) >= v.whole_blocks(pmd)
    assert v.huge_bytes() == v.whole_blocks(pmd)
    r = subprocess.run([sys.executable, "-m", "thpguard", "status", str(v.pid), "--agent-state", state],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and re.search(r"agent: repaired [1-9]\d*M", r.stdout), r.stdout
    r = subprocess.run([sys.executable, "-m", "thpguard", "status", str(v.pid), "--agent-state", state, "--json"],
                       capture_output=True, text=True, timeout=60)
    row = json.loads(r.stdout)["processes"][0]["agent"]
    assert row["repaired_bytes"] > 0 and row["pid"] == v.pid


def test_never_touches_nohugepage(require_agent, victims):
    """A VMA advised MADV_NOHUGEPAGE stays on small pages."""
    v = victims(32, "--nohugepage")
    stop = once(v.pid)[-1]
    assert stop["repaired_blocks"] == 0
    assert v.huge_bytes() == 0


def test_never_touches_prctl_disabled(require_agent, victims):
    """A process that disabled THP with prctl is left alone, logged once."""
    v = victims(32, "--thp-disable")
    evs = once(v.pid)
    assert [e["event"] for e in evs].count("thp_disabled") == 1
    assert evs[-1]["repaired_blocks"] == 0 and not evs[-1]["failures"]
    assert v.huge_bytes() == 0


def test_size_thresholds(require_agent, victims):
    """Processes below min_process_bytes and VMAs below min_vma_bytes are not touched."""
    v = victims(32)
    r = agent_cli("--once", "--pid", str(v.pid), "--min-process-bytes", "1G")
    assert r.returncode == 0 and events(r.stderr)[-1]["repaired_blocks"] == 0
    assert once(v.pid, extra=("--min-vma-bytes", "64M"))[-1]["repaired_blocks"] == 0
    assert v.huge_bytes() == 0


def test_shared_blocks_wait_for_the_sharer(require_agent, expect_splits, victims, pmd):
    """Blocks split while a fork child shares them are skipped (pagemap: not exclusive),
    repaired once the child is gone, and repaired at once with --repair-shared."""
    v = victims(32)
    whole = v.whole_blocks(pmd)
    repaired_until(v, whole)
    assert v.huge_bytes() == whole
    v.ask("fork")
    v.ask("write")
    assert v.huge_bytes() == 0
    stop = once(v.pid)[-1]
    assert stop["repaired_blocks"] == 0 and stop["shared_blocks_skipped"] >= whole // pmd
    assert v.huge_bytes() == 0
    v.ask("reap")
    repaired_until(v, whole)
    assert v.huge_bytes() == whole
    v.ask("fork")
    v.ask("write")
    assert repaired_until(v, whole, "--repair-shared") >= whole
    assert v.huge_bytes() == whole


# -- surviving the processes it watches ---------------------------------------


def test_processes_exiting_and_pid_reuse(require_agent, victims, pmd):
    """A tracked process that exits is dropped; a PID whose start time changed is a new
    process (new pidfd); neither is fatal."""
    a, b = victims(16), victims(16)
    agent = Agent(AgentConfig(min_process_bytes=0, select=Selection(pids=[a.pid, b.pid])),
                  AgentLog("json", open(os.devnull, "w")))
    agent.run_pass()
    assert set(agent.tracked) == {a.pid, b.pid}
    old = agent.tracked[b.pid]
    old.info.start_time -= 1  # as if the agent had known an earlier process with this PID
    a.close()
    result = agent.run_pass()
    assert a.pid not in agent.tracked and agent.exited >= 1
    assert agent.tracked[b.pid] is not old and old.pidfd == -1
    assert result["processes"] == 1
    assert b.huge_bytes() == b.whole_blocks(pmd)
    for t in list(agent.tracked.values()):
        t.close()


def test_churn_of_short_lived_processes(require_agent, tmp_path):
    """Processes that come and go during the passes never stop the agent (selected by a
    command name only this test uses, so nobody else's processes are looked at)."""
    name = f"tgchurn{os.getpid() % 100000}"
    sleeper = tmp_path / name
    shutil.copy(shutil.which("sleep"), sleeper)
    procs = []
    agent = Agent(AgentConfig(min_process_bytes=0, select=Selection(commands=[name])),
                  AgentLog("json", open(os.devnull, "w")))
    try:
        for _ in range(5):
            procs += [subprocess.Popen([str(sleeper), "0.05"]) for _ in range(10)]
            agent.run_pass()
        for p in procs:
            p.wait()
        agent.run_pass()
        assert agent.passes == 6 and not agent.tracked
    finally:
        for t in list(agent.tracked.values()):
            t.close()


def _setpriv(*caps: str):
    """Run as nobody with only *caps* (ambient), or skip where that cannot be done."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the agent as an unprivileged user")
    capset = ",".join(f"+{c}" for c in caps) if caps else "-all"
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            f"--inh-caps=-all,{capset}" if caps else "--inh-caps=-all",
            f"--ambient-caps={capset}" if caps else "--ambient-caps=-all",
            "--bounding-set=-all" + ("," + capset if caps else "")]


def test_unprivileged_with_three_capabilities(require_agent, victims, pmd):
    """As nobody with only CAP_SYS_NICE, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, the agent
    repairs a root process; without CAP_SYS_PTRACE it logs one permission error per process
    and keeps running."""
    v = victims(32)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    base = [sys.executable, "-m", "thpguard", "agent", "--log-format", "json", "--pid", str(v.pid),
            "--min-process-bytes", "0"]
    # Passes until every block is huge (a collapse may meet a moment without
    # free huge pages; the CPU budget spreads the work on a busy machine).
    agent = subprocess.Popen(_setpriv("sys_nice", "sys_ptrace", "dac_read_search") + base
                             + ["--interval", "0.2"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: v.huge_bytes() == v.whole_blocks(pmd), "the unprivileged agent to repair every block")
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=WAIT)
    assert agent.returncode == 0, err
    v2 = victims(32)
    r = subprocess.run(_setpriv("sys_nice", "dac_read_search") + base[:-4]
                       + ["--pid", str(v2.pid), "--min-process-bytes", "0", "--interval", "0.2", "--duration", "4"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    evs = events(r.stderr)
    perm = [e for e in evs if e["event"] == "permission"]
    assert len(perm) == 1 and perm[0]["pid"] == v2.pid and "CAP_SYS_PTRACE" in perm[0]["reason"]
    assert evs[-1]["event"] == "stop" and evs[-1]["passes"] >= 2
    assert v2.huge_bytes() == 0


def test_refuses_to_start_without_cap_sys_nice(require_agent):
    """Without CAP_SYS_NICE the agent says what it needs and exits 3 (no permission)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    r = subprocess.run(_setpriv("sys_ptrace") + [sys.executable, "-m", "thpguard", "agent", "--once"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3 and "CAP_SYS_NICE" in r.stderr


# -- operations: config, signals, logs, metrics -------------------------------


def test_config_schema_errors():
    """Unknown keys and bad values are errors that name the key."""
    assert from_mapping({"rate": "64M", "select": {"commands": ["redis-*"]}}).rate == 64 << 20
    for bad, word in (({"rat": 1}, "rat"), ({"cpu": 2}, "cpu"), ({"rate": "lots"}, "rate"),
                      ({"select": {"pids": [0]}}, "select.pids"), ({"metrics": {"port": 70000}}, "port"),
                      ({"log_format": "xml"}, "log_format")):
        with pytest.raises(ConfigError, match=word):
            from_mapping(bad)


@pytest.mark.parametrize("bad", [{"interval": float("inf")}, {"interval": float("nan")}, {"interval": 1e308},
                                 {"cpu": float("nan")}, {"stall_share": float("nan")}])
def test_config_non_finite_numbers_are_errors(bad):
    """NaN, Infinity (JSON allows both) or an interval no clock can sleep are config errors, not a crash later."""
    with pytest.raises(ConfigError, match=next(iter(bad))):
        from_mapping(bad)


def test_config_file_that_is_no_regular_file_or_huge_is_an_error(tmp_path):
    """A config that is /dev/zero, a FIFO (via a symlink too) or huge is a clear error, never a hang."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    (tmp_path / "link.toml").symlink_to(fifo)
    (tmp_path / "zero.toml").symlink_to("/dev/zero")
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)
    for path, word in ((fifo, "regular"), (tmp_path / "link.toml", "regular"),
                       (tmp_path / "zero.toml", "regular"), (big, "larger")):
        with pytest.raises(ConfigError, match=word):
            load(str(path))
    r = agent_cli("--config", str(tmp_path / "zero.toml"), "--check")
    assert r.returncode == 2 and "regular file" in r.stderr


def test_config_file_toml_and_json(tmp_path):
    """The same keys load from TOML and from JSON; --check prints the result."""
    toml = tmp_path / "agent.toml"
    toml.write_text('interval = 1.5\nrate = "32M"\n[select]\ncgroups = ["system.slice/redis.service"]\n'
                    '[metrics]\nport = 0\n')
    cfg = load(str(toml))
    assert (cfg.interval, cfg.rate, cfg.select.cgroups, cfg.metrics_port) == \
        (1.5, 32 << 20, ["/system.slice/redis.service"], 0)
    js = tmp_path / "agent.json"
    js.write_text(json.dumps({"interval": 1.5, "rate": "32M"}))
    assert load(str(js)).rate == 32 << 20
    r = agent_cli("--config", str(toml), "--check")
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["interval"] == 1.5
    toml.write_text("interval = -1\n")
    r = agent_cli("--config", str(toml), "--check")
    assert r.returncode == 2 and "interval" in r.stderr


def test_sighup_reloads_and_sigterm_summarises(require_agent, victims, tmp_path, pmd):
    """SIGHUP rereads the config (a bad file keeps the old one), SIGTERM stops with a summary;
    the metrics endpoint aggregates per cgroup and command, without pid labels."""
    v = victims(32)
    conf = tmp_path / "agent.toml"
    conf.write_text('interval = 0.2\nmin_process_bytes = 0\n[select]\ncommands = ["no-such-command"]\n')
    p = subprocess.Popen([sys.executable, "-m", "thpguard", "agent", "--log-format", "json",
                          "--config", str(conf), "--metrics", "127.0.0.1:0"],
                         stderr=subprocess.PIPE, text=True)
    # The agent's log lines, read as they come (a thread: a read must not
    # block the test past its deadline); None once stderr is closed.
    lines, err_lines = queue.Queue(), []

    def read_log():
        for line in p.stderr:
            err_lines.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()

    def next_event(event, level=None):
        """The agent's next log event named ``event`` (at ``level``), within WAIT s."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"waited {WAIT:g} s for the agent's {event!r} event; "
                            f"its log: {''.join(err_lines)[-2000:]}")
            if line is None:
                pytest.fail(f"the agent ended before its {event!r} event: {''.join(err_lines)[-2000:]}")
            if line.startswith("{"):
                e = json.loads(line)
                if e["event"] == event and (level is None or e["level"] == level):
                    return e

    try:
        start = next_event("start")  # logged once the signal handlers are in place
        port = int(start["metrics"].rsplit(":", 1)[1])
        conf.write_text(f"interval = 0.2\nmin_process_bytes = 0\n[select]\npids = [{v.pid}]\n")
        p.send_signal(signal.SIGHUP)
        next_event("reload", "info")
        wait_until(lambda: v.huge_bytes() == v.whole_blocks(pmd),
                   lambda: f"the agent to repair the victim ({v.huge_bytes()} of "
                           f"{v.whole_blocks(pmd)} bytes huge)", poll=0.1)
        # The agent counts a pass's repairs once the pass is over: smaps may
        # show the last block huge a moment before the counter has it.
        scrape = {}

        def repaired_bytes() -> float:
            scrape["text"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                    timeout=WAIT).read().decode()
            scrape["line"] = next((ln for ln in scrape["text"].splitlines()
                                   if ln.startswith("thpguard_agent_repaired_bytes_total{")), "")
            return float(scrape["line"].rsplit(" ", 1)[1]) if scrape["line"] else 0.0

        wait_until(lambda: repaired_bytes() >= v.whole_blocks(pmd),
                   lambda: f"the agent's repaired_bytes_total to count the victim's "
                           f"{v.whole_blocks(pmd)} bytes ({scrape.get('line')!r})", poll=0.1)
        line, text = scrape["line"], scrape["text"]
        assert 'comm="python' in line and 'cgroup="' in line and "pid=" not in line
        assert not re.search(r'pid="', text)
        conf.write_text("interval = [\n")
        p.send_signal(signal.SIGHUP)
        # Not a fixed pause: a SIGTERM that arrived with the SIGHUP still
        # pending would stop the agent before it reread the file.
        next_event("reload", "error")
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=WAIT)
        reader.join(WAIT)
        err = "".join(err_lines)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0
    evs = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    reloads = [e for e in evs if e["event"] == "reload"]
    assert reloads[0]["level"] == "info" and reloads[-1]["level"] == "error"
    assert "kept the old configuration" in reloads[-1]["reason"]
    stop = evs[-1]
    assert stop["event"] == "stop" and stop["repaired_bytes"] >= v.whole_blocks(pmd)


def test_byte_budget_bounds_what_is_collapsed(require_agent, victims, pmd):
    """With --rate, the bytes collapsed never exceed the rate times the elapsed time plus
    the one-second burst (a bound, not a timing)."""
    v = victims(64)
    r = agent_cli("--pid", str(v.pid), "--min-process-bytes", "0", "--rate", "8M", "--interval", "0.2",
                  "--duration", "4")
    assert r.returncode == 0, r.stderr
    stop = events(r.stderr)[-1]
    assert 0 < stop["repaired_bytes"] <= (8 << 20) * (stop["elapsed_seconds"] + 1) + pmd
    assert stop["throttled_seconds"] > 0
    assert v.huge_bytes() == stop["repaired_bytes"]


def test_metrics_per_pid_only_when_asked(require_agent, victims):
    """The collector labels series by cgroup and command; a pid label only with per_pid."""
    pytest.importorskip("prometheus_client")
    from thpguard._agentmetrics import AgentCollector

    for per_pid in (False, True):
        v = victims(16)
        agent = Agent(AgentConfig(min_process_bytes=0, metrics_per_pid=per_pid,
                                  select=Selection(pids=[v.pid])), AgentLog("json", open(os.devnull, "w")))
        agent.run_pass()
        fams = {f.name: f for f in AgentCollector(agent).collect()}
        labels = fams["thpguard_agent_repaired_bytes"].samples[0].labels
        with open(f"/proc/{v.pid}/comm") as f:  # python or python3, as the suite was started
            comm = f.read().strip()
        assert ("pid" in labels) is per_pid and labels["comm"] == comm
        assert fams["thpguard_agent_anon_bytes"].samples[0].value > 0  # gauges: as of the last scan
        for t in list(agent.tracked.values()):
            t.close()


def test_cpu_budget_bounds_the_agents_cpu_time(require_agent, victims):
    """With --cpu, the agent's own CPU time (scans and the kernel's copies in collapse)
    stays within the share of its wall time, plus one operation (a bound, not a timing).

    6 s at 5 % is 0.3 s of CPU: a first scan and a few collapses of 2 MiB (each up to
    0.08 s of the kernel's copying here). In 3 s the scan alone could use the whole
    budget, under sanitizers and load, and leave nothing repaired."""
    v = victims(256)
    r = agent_cli("--pid", str(v.pid), "--min-process-bytes", "0", "--cpu", "0.05", "--rate", "4G",
                  "--stall-share", "1", "--interval", "0.2", "--duration", "6")
    assert r.returncode == 0, r.stderr
    stop = events(r.stderr)[-1]
    assert stop["repaired_blocks"] > 0
    assert stop["cpu_seconds"] <= 0.05 * stop["elapsed_seconds"] + 0.1, stop
