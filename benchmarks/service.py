"""8. A pre-forking web service: gunicorn --preload, 2 workers, a float32 table.

The master builds the table (256 MiB quick, 4 GiB full) before it forks;
each request does a fixed number of dependent random lookups in it (TLB
bound) and one request in N adds 1.0 to one entry, as a service updates a
counter or a cache entry. ``wrk`` (Debian's package, installed by
``benchmarks/install-tools.sh``) drives it on loopback; without wrk an
in-repo client does, bounded in time and in requests, and the output says
which. Each run is a fresh server: start, build, fork, a warm-up load
(writes split blocks meanwhile), then the timed load; the variants of
``_tables`` interleave, one run each per round, rotating which goes first.

Reported per variant: requests/s, requests per CPU second of the workers
(the guard's thread included; on a shared host the wall-clock rate mostly
says how much CPU the scheduler gave) and p50/p99 latency as ratios
against 4 KiB pages of the same round, requests/s against plain ``MADV_HUGEPAGE``,
the share of each worker's table still PMD-mapped (smaps), and the PSS of
master and workers (the memory each mechanism costs).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from . import _tables
from ._harness import GiB, MiB, Result, Settings, Skipped, fmt_bytes, interleave, median, now, paired, percentile

NAME = "service"
TITLE = "a pre-forking web service (gunicorn --preload, 2 workers): requests/s and latency"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 2
CONNECTIONS = 2
#: Variants whose splits something repairs while the service runs.
REPAIRED = ("share+guard",)
_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")

_WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'THPGUARD_WRK {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
  -- wrk keeps a histogram, not each request's latency: its distribution
  -- at every 0.1 % quantile is what it can give of the raw samples.
  local q = {}
  for i = 1, 999 do q[i] = string.format('%d', latency:percentile(i / 10)) end
  q[1000] = string.format('%d', latency.max)  -- wrk's percentile(100) is 0
  io.write('THPGUARD_WRK_QUANTILES [' .. table.concat(q, ', ') .. ']\n')
end
"""

#: What the JSON's latency samples are, per load generator.
LATENCY_SAMPLES = {
    "wrk": "latency_quantiles_us: wrk's latency distribution at the 0.1 %, 0.2 % ... 100 % quantiles "
           "(wrk keeps a histogram, not each request's latency)",
    "client": "latencies_us: every request's latency, per connection in the order sent",
}


def wrk_path() -> Optional[str]:
    return shutil.which("wrk")


def parse_wrk(output: str) -> dict:
    """The numbers our wrk script prints at the end of ``output`` (requests,
    errors, latency percentiles in microseconds) plus ``rps``, and
    ``latency_quantiles_us`` (the 1000 quantiles 0.1 % ... 100 %) where the
    script printed them."""
    quantiles = None
    for line in reversed(output.splitlines()):
        if line.startswith("THPGUARD_WRK_QUANTILES "):
            quantiles = json.loads(line[len("THPGUARD_WRK_QUANTILES "):])
        elif line.startswith("THPGUARD_WRK "):
            found = json.loads(line[len("THPGUARD_WRK "):])
            found["rps"] = found["requests"] / (found["duration_us"] / 1e6) if found["duration_us"] else 0.0
            if quantiles is not None:
                found["latency_quantiles_us"] = quantiles
            return found
    raise RuntimeError(f"wrk printed no result:\n{output[-2000:]}")


def _run_wrk(port: int, seconds: float, script: str, path: str = "/") -> dict:
    argv = [wrk_path(), "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", script, f"http://127.0.0.1:{port}{path}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def client_load(port: int, seconds: float, connections: int = CONNECTIONS, max_requests: int = 200_000,
                path: str = "/") -> dict:
    """The in-repo load generator: ``connections`` threads, each sending
    ``GET path`` one after another to 127.0.0.1:``port`` until ``seconds``
    have passed or ``max_requests`` were sent in all. Returns what
    :func:`parse_wrk` returns, with ``latencies_us``, every request's
    latency (per connection, in the order sent) in place of wrk's quantiles."""
    lat: List[float] = []
    errors = [0]
    sent = [0]
    lock = threading.Lock()
    deadline = now() + seconds

    def loop() -> None:
        mine: List[float] = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while now() < deadline:
                with lock:
                    if sent[0] >= max_requests:
                        break
                    sent[0] += 1
                t0 = now()
                try:
                    conn.request("GET", path)
                    reply = conn.getresponse()
                    reply.read()
                    if reply.status != 200:
                        errors[0] += 1
                        continue
                except (OSError, http.client.HTTPException):
                    errors[0] += 1
                    conn.close()
                    continue
                mine.append(now() - t0)
        finally:
            conn.close()
            with lock:
                lat.extend(mine)

    started = now()
    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = now() - started
    us = [x * 1e6 for x in lat]
    return {
        "requests": len(us), "duration_us": int(elapsed * 1e6), "errors": errors[0],
        "p50_us": percentile(us, 50), "p90_us": percentile(us, 90), "p99_us": percentile(us, 99),
        "p999_us": percentile(us, 99.9), "max_us": max(us) if us else float("nan"),
        "mean_us": sum(us) / len(us) if us else float("nan"),
        "rps": len(us) / elapsed if elapsed else 0.0,
        "latencies_us": [round(x, 1) for x in us],
    }


class Server:
    """``gunicorn --preload`` serving ``_service_app`` on an ephemeral
    loopback port; the log goes to a temp file, removed on :meth:`stop`."""

    def __init__(self, variant: str, size: int, lookups: int, write_every: int) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix=f"thpguard-bench-gunicorn-{os.getpid()}-", suffix=".log",
                                               delete=False)
        env = dict(os.environ, THPGUARD_BENCH_VARIANT=variant, THPGUARD_BENCH_TABLE_BYTES=str(size),
                   THPGUARD_BENCH_LOOKUPS=str(lookups), THPGUARD_BENCH_WRITE_EVERY=str(write_every),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("THPGUARD_GUARD", None)  # the variant decides, not the caller's environment
        argv = [sys.executable, "-m", "gunicorn", "--preload", "--workers", str(WORKERS),
                "--worker-class", "sync", "--bind", "127.0.0.1:0", "--timeout", "120",
                "--chdir", ROOT, "benchmarks._service_app:application"]
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.port = 0
        self.workers: List[int] = []

    def wait_ready(self, timeout: float) -> dict:
        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.proc.returncode}):\n{self._log_tail()}")
            if not self.port:
                m = _LISTENING.search(self._log_text())
                if m:
                    self.port = int(m.group(1))
            if self.port:
                self.workers = _tables.children(self.proc.pid)
                if len(self.workers) == WORKERS and self._log_text().count("Booting worker") >= WORKERS:
                    try:
                        return self.info()
                    except (OSError, http.client.HTTPException):
                        pass
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn not ready after {timeout:.0f} s:\n{self._log_tail()}")

    def info(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/info")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def worker_infos(self, timeout: float = 120.0) -> List[dict]:
        """``/info`` of every worker, in the order of :attr:`workers`.

        Each try opens one connection per worker before it sends a request
        on any: a sync worker serves one connection at a time, so the
        connections land on different workers. Tries again (a worker
        restarted, a connection refused) until each worker pid answered;
        RuntimeError naming the silent ones after ``timeout`` s."""
        deadline = now() + timeout
        got: Dict[int, dict] = {}
        while True:
            conns = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=30) for _ in self.workers]
            try:
                for conn in conns:
                    conn.connect()
                for conn in conns:
                    conn.request("GET", "/info")
                for conn in conns:
                    info = json.loads(conn.getresponse().read())
                    got.setdefault(info["pid"], info)
            except (OSError, http.client.HTTPException, ValueError):
                pass
            finally:
                for conn in conns:
                    conn.close()
            missing = [pid for pid in self.workers if pid not in got]
            if not missing:
                return [got[pid] for pid in self.workers]
            if now() > deadline:
                raise RuntimeError(f"gunicorn workers {missing} did not answer /info in {timeout:.0f} s "
                                   f"(answered: {sorted(got)}):\n{self._log_tail()}")
            time.sleep(0.05)

    def _log_text(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def _log_tail(self) -> str:
        return "\n".join(self._log_text().splitlines()[-30:])

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self.log.close()
            os.unlink(self.log.name)


def _memory(server: Server, info: dict) -> dict:
    start, end = info["address"], info["address"] + info["size"]
    workers = {pid: _tables.huge_bytes(pid, start, end) / info["size"] for pid in server.workers}
    return {
        "worker_huge": workers,
        "worker_hugetlb": {pid: _tables.hugetlb_bytes(pid, start, end) / info["size"] for pid in server.workers},
        "min_worker_huge": min(workers.values()) if workers else float("nan"),
        "pss_bytes": _tables.footprint([server.proc.pid] + server.workers),
        "master_huge": _tables.huge_bytes(server.proc.pid, start, end) / info["size"],
    }


def _settle(server: Server, info: dict, timeout: float) -> dict:
    """Wait, without load, until every worker's table is PMD-mapped again
    (the guard has repaired what aging split) or ``timeout`` s passed."""
    t0 = now()
    while True:
        found = _memory(server, info)
        if found["min_worker_huge"] >= 1.0 or now() - t0 >= timeout:
            break
        time.sleep(0.25)
    return {"seconds": now() - t0, "min_worker_huge": found["min_worker_huge"], "repaired": found["min_worker_huge"] >= 1.0}


def one_run(variant: str, size: int, lookups: int, write_every: int, age_s: float, warmup_s: float,
            measure_s: float, script: Optional[str], settle_s: float = 30.0) -> dict:
    """Start a server for ``variant``, age its workers (write-only requests
    for ``age_s``), let the guard repair what that split (variants with a
    guard, at most ``settle_s``), warm it up, measure, stop it; one sample."""
    if script:
        def load(port: int, seconds: float, path: str = "/") -> dict:
            return _run_wrk(port, seconds, script, path)
    else:
        load = client_load
    t0 = now()
    server = Server(variant, size, lookups, write_every)
    try:
        info = server.wait_ready(timeout=180)
        started_s = now() - t0
        aged = load(server.port, age_s, path="/age") if age_s > 0 else None
        settle = _settle(server, info, settle_s) if variant in REPAIRED else None
        warm = load(server.port, warmup_s)
        before = _memory(server, info)
        cpu0 = sum(_tables.cpu_seconds(p) for p in server.workers)
        timed = load(server.port, measure_s)
        cpu = sum(_tables.cpu_seconds(p) for p in server.workers) - cpu0
        after = _memory(server, info)
        # One entry per worker, in server.workers' order (the pids of after["worker_huge"]).
        after["thpguard_stats"] = [i.get("thpguard_stats") for i in server.worker_infos()]
    finally:
        server.stop()
    return {
        "variant": variant, "mechanism": info["mechanism"], "start_s": started_s,
        "fork_downgraded": info.get("fork_downgraded"),
        "aging": aged, "settle": settle, "warmup": warm, "rps": timed["rps"],
        "workers_cpu_s": cpu, "per_cpu_s": timed["requests"] / cpu if cpu > 0 else float("nan"), "p50_us": timed["p50_us"], "p99_us": timed["p99_us"],
        "load": timed, "before": before, "after": after,
    }


def _fmt_us(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def run(settings: Settings) -> Result:
    if importlib.util.find_spec("gunicorn") is None:
        # Else the first server dies at start-up and the benchmark fails with its log tail.
        raise Skipped("gunicorn is not installed in this Python: pip install -e '.[bench]'")
    size = settings.pick(256 * MiB, 4 * GiB)
    lookups = 10_000
    write_every = 4
    # wrk counts whole seconds: 1 s is its shortest load.
    age_s, warmup_s, measure_s = settings.pick((1.0, 1.0, 1.0), (4.0, 4.0, 10.0))
    settle_s = settings.pick(10.0, 90.0)
    reps = settings.pick(2, 5)
    wrk = wrk_path()
    res = Result(NAME, TITLE, params={
        "table": f"{fmt_bytes(size)} float32, built before fork",
        "workers": WORKERS,
        "request": f"{lookups} dependent random lookups; 1 in {write_every} writes 4 bytes",
        "load": (f"wrk -t1 -c{CONNECTIONS}" if wrk else
                 f"in-repo client, {CONNECTIONS} connections (wrk not found: benchmarks/install-tools.sh)"),
        "latency samples": LATENCY_SAMPLES["wrk" if wrk else "client"],
        "per run": (f"fresh server, {age_s:.0f} s of write-only requests (aging), the guard's repair of that "
                    f"(at most {settle_s:.0f} s, no load), {warmup_s:.0f} s warm-up load, {measure_s:.0f} s timed"),
        "rounds": reps,
    })
    if settings.max_bytes is not None and size > settings.max_bytes:
        res.skipped = f"the {fmt_bytes(size)} table is above --max-gib"
        return res
    # copy: master and both workers hold a copy each from the start;
    # share + guard ends there once the aged workers' blocks are repaired;
    # the others share one, plus what the writes copy; hugetlb takes its
    # pool (grown per run), outside this.
    chosen = _tables.choose(res, size, lambda v: size * (WORKERS + 1 if v in ("copy eager", "share+guard")
                                                         else 0 if v == "hugetlb" else 2) + 2 * GiB)
    if chosen is None:
        return res
    runnable, missing = chosen
    script = None
    tmp = tempfile.mkdtemp(prefix="thpguard-bench-service-")
    try:
        if wrk:
            script = os.path.join(tmp, "report.lua")
            with open(script, "w") as f:
                f.write(_WRK_SCRIPT)
        samples = interleave(
            {v: (lambda v=v: _tables.run_variant(v, size, WORKERS, lambda: one_run(
                v, size, lookups, write_every, age_s, warmup_s, measure_s, script, settle_s))) for v in runnable},
            reps, warmup=0,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.samples["runs"] = samples
    res.samples["unavailable"] = missing
    _summarise(res, samples, runnable, missing)
    return res


def _summarise(res: Result, samples: Dict[str, List[dict]], runnable: List[str], missing: Dict[str, str]) -> None:
    rps = {v: [s["rps"] for s in samples[v]] for v in runnable}
    p50 = {v: [s["p50_us"] for s in samples[v]] for v in runnable}
    p99 = {v: [s["p99_us"] for s in samples[v]] for v in runnable}
    pss = {v: [s["after"]["pss_bytes"] for s in samples[v]] for v in runnable}
    per_cpu = {v: [s.get("per_cpu_s", float("nan")) for s in samples[v]] for v in runnable}
    series = []
    for v in _tables.VARIANTS:
        if v in missing:
            _tables.not_available(res, series, v, missing[v])
            continue
        if v not in rps:
            continue
        label = _tables.label_of(v, samples[v], res)
        if v == "4k":
            res.add(f"{label}: the baseline", None, "",
                    f"{median(rps[v]):.0f} req/s, {median(per_cpu[v]):.0f} per worker CPU-s, p50 {_fmt_us(median(p50[v]))}, p99 {_fmt_us(median(p99[v]))}, "
                    f"memory {fmt_bytes(median(pss[v]))}")
        per_round = [r / b for r, b in zip(rps[v], rps["4k"])]
        if v != "4k":
            _variant_rows(res, v, label, rps, p50, p99, pss)
            res.add(f"{label}: requests per worker CPU second", paired(per_cpu[v], per_cpu["4k"]),
                    f"req/CPU-s {v}/4k", f"{median(per_cpu[v]):.0f} /CPU-s", f"{median(per_cpu['4k']):.0f} /CPU-s")
        huge_before = median([s["before"]["min_worker_huge"] for s in samples[v]])
        huge_after = median([s["after"]["min_worker_huge"] for s in samples[v]])
        series.append({
            "variant": v, "label": label, "available": True,
            "mechanism": samples[v][0]["mechanism"],
            "rps_ratio": per_round,
            "per_cpu_ratio": [a / b for a, b in zip(per_cpu[v], per_cpu["4k"])],
            "p99_ratio": [a / b for a, b in zip(p99[v], p99["4k"])],
            "pss_ratio": [a / b for a, b in zip(pss[v], pss["4k"])],
            "rps": rps[v], "p50_us": p50[v], "p99_us": p99[v],
            "worker_huge_before": huge_before, "worker_huge_after": huge_after,
            "downgraded_runs": len(_tables.downgrades(samples[v])),
        })
        settles = [s["settle"] for s in samples[v] if s.get("settle")]
        if settles:
            res.notes.append(
                f"{label}: after aging, the guard had every worker's table PMD-mapped again in "
                f"{median([s['seconds'] for s in settles]):.1f} s (median; repaired in "
                f"{sum(s['repaired'] for s in settles)} of {len(settles)} runs)")
            series[-1]["settle_s"] = [s["seconds"] for s in settles]
        res.notes.append(
            f"{label} [{samples[v][0]['mechanism']}]: workers' table PMD-mapped {huge_before:.0%} at the start of "
            f"the timed load, {huge_after:.0%} at its end (least of the {WORKERS} workers, median over rounds)")
    res.series["variants"] = series
    errors = sum(s["load"]["errors"] for v in runnable for s in samples[v])
    if errors:
        res.notes.append(f"{errors} request errors in the timed loads")


def _variant_rows(res: Result, v: str, label: str, rps, p50, p99, pss) -> None:
    res.add(f"{label}: requests/s", paired(rps[v], rps["4k"]), f"req/s {v}/4k",
            f"{median(rps[v]):.0f} /s", f"{median(rps['4k']):.0f} /s")
    if "thp" in rps and v != "thp":
        res.add(f"{label}: requests/s vs plain THP", paired(rps[v], rps["thp"]), f"req/s {v}/thp",
                f"{median(rps[v]):.0f} /s", f"{median(rps['thp']):.0f} /s")
    res.add(f"{label}: p50", paired(p50[v], p50["4k"]), f"latency {v}/4k",
            _fmt_us(median(p50[v])), _fmt_us(median(p50["4k"])))
    res.add(f"{label}: p99", paired(p99[v], p99["4k"]), f"latency {v}/4k",
            _fmt_us(median(p99[v])), _fmt_us(median(p99["4k"])))
    res.add(f"{label}: memory (PSS + hugetlb), master + workers", paired(pss[v], pss["4k"]), f"memory {v}/4k",
            fmt_bytes(median(pss[v])), fmt_bytes(median(pss["4k"])))
