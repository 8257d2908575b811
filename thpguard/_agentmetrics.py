"""The node agent's Prometheus endpoint (needs the ``prometheus`` extra).

Series are aggregated per cgroup and command name (labels ``cgroup`` and
``comm``, as in ``thpguard status --prometheus``) by default, so they do not
churn as processes come and go; ``per_pid`` adds a ``pid`` label for
debugging. Addresses are never labels.
"""

from __future__ import annotations

import threading
from typing import Dict, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .errors import UnsupportedError

PREFIX = "thpguard_agent"


def _prometheus():
    try:
        import prometheus_client  # noqa: PLC0415
        from prometheus_client import core  # noqa: PLC0415
    except ImportError:
        raise UnsupportedError("prometheus", "the metrics endpoint needs prometheus_client: "
                                             "pip install prometheus_client (the prometheus extra)") from None
    return prometheus_client, core


def group_key(command: str, cgroup: str, pid: int, per_pid: bool) -> Tuple[str, ...]:
    """The label values of one process's series."""
    key = (cgroup, command)
    return key + (str(pid),) if per_pid else key


class AgentCollector:
    """Reads the agent's state at every scrape."""

    def __init__(self, agent) -> None:
        self.agent = agent

    def describe(self):
        return []

    def collect(self):
        _, core = _prometheus()
        agent = self.agent
        per_pid = agent.config.metrics_per_pid
        labels = ["cgroup", "comm"] + (["pid"] if per_pid else [])
        gauges = {
            "processes": "selected processes the agent scans",
            "anon_bytes": "resident bytes of the anonymous memory the agent may repair",
            "huge_bytes": "PMD-mapped bytes in that memory",
            "small_blocks": "PMD-size blocks fully present on small pages (split or never huge)",
            "shared_blocks": "of those, blocks sharing pages with another process (repaired only if asked)",
        }
        fams = {k: core.GaugeMetricFamily(f"{PREFIX}_{k}", doc, labels=labels) for k, doc in gauges.items()}
        sums: Dict[Tuple[str, ...], Dict[str, int]] = {}
        with agent.lock:
            for t in agent.tracked.values():
                ps = t.last_scan
                key = group_key(t.info.command, t.info.cgroup, t.info.pid, per_pid)
                row = sums.setdefault(key, dict.fromkeys(gauges, 0))
                row["processes"] += 1
                if ps is not None:
                    row["anon_bytes"] += ps.anon_bytes
                    row["huge_bytes"] += ps.huge_bytes
                    row["small_blocks"] += ps.small_blocks
                    row["shared_blocks"] += ps.shared_blocks
            groups = {k: (c.repaired_blocks, c.repaired_bytes, dict(c.failures))
                      for k, c in agent.by_group.items()}
            summary = agent.summary()
        for key, row in sorted(sums.items()):
            for name, value in row.items():
                fams[name].add_metric(list(key), value)
        yield from fams.values()
        rb = core.CounterMetricFamily(f"{PREFIX}_repaired_bytes", "bytes collapsed into PMD-size pages",
                                      labels=labels)
        rn = core.CounterMetricFamily(f"{PREFIX}_repaired_blocks", "PMD-size blocks collapsed", labels=labels)
        rf = core.CounterMetricFamily(f"{PREFIX}_repair_failures", "collapse calls the kernel refused, by errno",
                                      labels=labels + ["errno"])
        for key, (blocks, nbytes, failures) in sorted(groups.items()):
            if len(key) != len(labels):  # counted before a reload changed per_pid
                continue
            rb.add_metric(list(key), nbytes)
            rn.add_metric(list(key), blocks)
            for name, n in sorted(failures.items()):
                rf.add_metric(list(key) + [name], n)
        yield from (rb, rn, rf)
        for name, doc, field in (
            ("passes", "scan passes done", "passes"),
            ("cpu_seconds", "CPU time the agent used (scan and collapse)", "cpu_seconds"),
            ("throttled_seconds", "time spent waiting for the byte or CPU budget", "throttled_seconds"),
            ("processes_exited", "tracked processes that exited", "processes_exited"),
            ("shared_blocks_skipped", "shared blocks seen and left alone, summed over passes",
             "shared_blocks_skipped"),
        ):
            c = core.CounterMetricFamily(f"{PREFIX}_{name}", doc)
            c.add_metric([], summary[field])
            yield c


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        pass


class MetricsServer:
    """``/metrics`` over HTTP on a daemon thread; :attr:`port` is the bound port."""

    def __init__(self, agent, address: str, port: int) -> None:
        prometheus_client, _ = _prometheus()
        registry = prometheus_client.CollectorRegistry(auto_describe=False)
        registry.register(AgentCollector(agent))
        app = prometheus_client.make_wsgi_app(registry)
        self.httpd: WSGIServer = make_server(address, port, app, handler_class=_QuietHandler)
        self.port = self.httpd.server_port
        self.address = address
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="thpguard-agent-metrics",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
