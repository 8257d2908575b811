"""8. The node agent on an unmodified Redis: time back to huge pages after a
snapshot, and what that is worth in throughput.

One ``redis-server`` (the distribution's, ``disable-thp no``) holds N keys
of 1000 bytes. Each repetition:

``agent``
    ``thpguard agent`` runs (limited to this Redis); a BGSAVE is taken while
    a client keeps overwriting random keys; the time from the end of the
    snapshot until the heap is PMD-mapped again (95 % of what it was
    before) is measured from smaps; then ``redis-benchmark`` GETs random
    keys, with the agent still running, and again after it stopped.
``khugepaged``
    the agent is stopped; the same snapshot under writes; the heap is
    sampled over the same window plus 5 s (khugepaged at the host's
    settings is all there is); then the same ``redis-benchmark``.

Ratios: GET throughput on the repaired heap (agent running, and agent
stopped) / on the split heap (paired per repetition), and the PMD-mapped
heap at the end of the window, agent / khugepaged.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from . import _redis
from ._harness import Result, Settings, Skipped, fmt_bytes, median, paired

NAME = "agent"
TITLE = "node agent on Redis: huge pages back after BGSAVE, GET throughput (agent / khugepaged)"

VALUE_BYTES = 1000
RECOVERED = 0.95
LIMIT = 120.0


def _agent(pid: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "thpguard", "agent", "--pid", str(pid),
                             "--interval", "0.5", "--stall-share", "0.5", "--cpu", "0.5",
                             "--log-format", "json"], stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _snapshot(server, keys: int) -> None:
    writer = _redis.Writer(server.port, keys, VALUE_BYTES)
    try:
        time.sleep(0.3)
        server.bgsave()
    finally:
        writer.stop()


def _get_throughput(server, keys: int, requests: int) -> float:
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(server.port), "-t", "get",
                          "-r", str(keys), "-n", str(requests), "-c", "8", "-P", "16", "-d", str(VALUE_BYTES),
                          "--csv"], capture_output=True, text=True, timeout=600, check=True).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "GET":
            return float(cells[1])
    raise RuntimeError(f"no GET line in redis-benchmark output: {out[:200]!r}")


def _wait_huge(pid: int, target: int, limit: float):
    samples, reached = _redis.sample_until(pid, limit, target=target, step=0.2, stop_at_target=True)
    return samples[-1][1], reached


def run(settings: Settings) -> Result:
    reason = _redis.unavailable_reason()
    if reason:
        raise Skipped(reason)
    keys = settings.pick(250_000, 1_000_000)
    requests = settings.pick(300_000, 1_000_000)
    reps = settings.reps
    res = Result(NAME, TITLE, params={"keys": keys, "value_bytes": VALUE_BYTES, "reps": reps,
                                      "get_requests": requests})
    runs = {"agent": [], "khugepaged": []}
    with _redis.RedisServer() as server:
        server.fill(keys, VALUE_BYTES)
        _, resident = _redis.heap_coverage(server.pid)
        res.params["heap"] = fmt_bytes(resident)
        agent = _agent(server.pid)
        try:
            _, first = _wait_huge(server.pid, int(0.9 * resident), LIMIT)
            if first is None:
                raise Skipped("the agent could not collapse Redis's heap (see its log)")
            time.sleep(1.0)
            for rep in range(settings.warmup + reps):
                if agent is None:
                    agent = _agent(server.pid)
                    _wait_huge(server.pid, int(0.9 * resident), LIMIT)
                    time.sleep(1.0)
                before, _ = _redis.heap_coverage(server.pid)
                _snapshot(server, keys)
                end_agent, back = _wait_huge(server.pid, int(RECOVERED * before), LIMIT)
                thr_agent = _get_throughput(server, keys, requests)
                summary = _stop(agent)
                agent = None
                thr_huge = _get_throughput(server, keys, requests)
                window = (back if back is not None else LIMIT) + 5.0
                before_k, _ = _redis.heap_coverage(server.pid)
                _snapshot(server, keys)
                samples, back_k = _redis.sample_until(server.pid, window, target=int(RECOVERED * before_k))
                thr_k = _get_throughput(server, keys, requests)
                if rep < settings.warmup:
                    continue
                runs["agent"].append({"before_bytes": before, "back_s": back, "end_bytes": end_agent,
                                      "get_per_s": thr_agent, "get_stopped_per_s": thr_huge,
                                      "agent_cpu_s": summary.get("cpu_seconds")})
                runs["khugepaged"].append({"before_bytes": before_k, "back_s": back_k, "window_s": window,
                                           "end_bytes": samples[-1][1], "get_per_s": thr_k})
        finally:
            if agent is not None:
                _stop(agent)
    res.samples["runs"] = runs
    a, k = runs["agent"], runs["khugepaged"]
    backs = [r["back_s"] for r in a if r["back_s"] is not None]
    res.add("time back to 95 % PMD-mapped", None, "seconds after the snapshot",
            f"{median(backs):.1f} s" if backs else f"not within {LIMIT:.0f} s",
            "not within the window" if all(r["back_s"] is None for r in k) else
            f"{median([r['back_s'] for r in k if r['back_s'] is not None]):.1f} s")
    res.add("PMD-mapped heap at window end", median([ra["end_bytes"] / max(rk["end_bytes"], 1)
                                                    for ra, rk in zip(a, k)]),
            "bytes agent/khugepaged", fmt_bytes(median([r["end_bytes"] for r in a])),
            fmt_bytes(median([r["end_bytes"] for r in k])))
    split = [r["get_per_s"] for r in k]
    res.add("GET random keys, agent running", paired([r["get_per_s"] for r in a], split),
            "throughput agent/khugepaged", f"{median([r['get_per_s'] for r in a]):,.0f}/s",
            f"{median(split):,.0f}/s")
    res.add("GET random keys, repaired, agent stopped", paired([r["get_stopped_per_s"] for r in a], split),
            "throughput agent/khugepaged", f"{median([r['get_stopped_per_s'] for r in a]):,.0f}/s",
            f"{median(split):,.0f}/s")
    res.notes.append("window for khugepaged = the agent's time back + 5 s; 'agent running' includes "
                     "the agent's scans every 0.5 s during the GETs, 'agent stopped' is the repaired heap alone")
    return res
