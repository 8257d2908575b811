"""Expose thpguard's counters to Prometheus (run: python prometheus_metrics.py)."""

import os
import sys

from prometheus_client import CollectorRegistry, generate_latest

import thpguard
import thpguard.metrics

thpguard.install()  # or THPGUARD_GUARD=1 in the environment
hot = thpguard.alloc(8 << 20)

registry = CollectorRegistry()  # or leave it out: the global REGISTRY
thpguard.metrics.register(registry)

# A child shares the buffer; its write splits a block, the guard repairs it.
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    hot.view()[0] = 1
    guard = thpguard.guard()
    for _ in range(600):  # guard ticks, bounded so that a bug cannot hang it
        if hot.coverage().complete:
            break
        guard.wait_ticks(1, timeout=60)
    guard.wait_ticks(1, timeout=60)  # the repairing tick has counted it
    print(generate_latest(registry).decode(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
# A service would serve it instead:
#   prometheus_client.start_http_server(9464, addr="127.0.0.1", registry=registry)
