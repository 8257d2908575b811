"""gunicorn --preload with 4 sync workers: each worker's splits are repaired.

The app (examples/wsgi_app.py) allocates its hot buffer at import, in the
master; the test drives real HTTP requests on loopback and reads every
worker's /proc/PID/smaps: a worker's write splits a block there, and the
guard, restarted in each worker by the at-fork hooks, collapses it again.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from integ_servers import children, free_port, get, get_many, huge_bytes, serve

pytest.importorskip("gunicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TESTS = os.path.dirname(os.path.abspath(__file__))
WORKERS = 4
MAX_ROUNDS = 30
DEADLINE = 40.0


@pytest.fixture(params=["root", "user"])
def gunicorn_server(request, require_thp):
    """gunicorn as is, and with ``--user``: workers that setuid() away from
    root cannot open their own page map and are repaired from smaps."""
    extra = []
    if request.param == "user":
        if os.geteuid() != 0:
            pytest.skip("--user needs a master started as root")
        extra = ["--user", "65534", "--group", "65534"]
    port = free_port()
    env = dict(os.environ, THPGUARD_GUARD="1",
               # Slow enough that the test sees each split before it is repaired.
               THPGUARD_GUARD_INTERVAL="1.0", HOT_BYTES=str(8 << 20), PYTHONPATH=EXAMPLES)
    # examples/gunicorn.conf.py serving examples/wsgi_app.py through
    # tests/probe_app.py, which only adds routes for the test.
    argv = [sys.executable, "-m", "gunicorn", "-c", os.path.join(EXAMPLES, "gunicorn.conf.py"),
            "--bind", f"127.0.0.1:{port}", "--chdir", TESTS, *extra, "probe_app:application"]
    with serve(argv, port, env=env) as proc:
        yield proc, port


def test_each_worker_is_repaired(gunicorn_server):
    """Every worker writes, its smaps shows the split, then full huge coverage."""
    master, port = gunicorn_server
    state = get(port, "/state")
    start, size = state["address"], state["size"]
    deadline = time.monotonic() + 20.0
    while len(children(master.pid)) < WORKERS and time.monotonic() < deadline:
        time.sleep(0.1)  # gunicorn spawns its workers one after another
    workers = set(children(master.pid))
    assert len(workers) == WORKERS, workers
    # The master allocated and never writes: its copy stays whole.
    assert huge_bytes(master.pid, start, start + size) == size

    before, requests = {}, 0
    started = time.monotonic()
    for n in range(MAX_ROUNDS):
        if set(before) >= workers or time.monotonic() - started > DEADLINE:
            break
        # Reads, then writes; concurrent requests that hold their worker a
        # little reach every worker.
        for _ in range(3):
            get_many(port, [f"/read?block={n + k}&hold=0.02" for k in range(WORKERS)])
        # Each worker's smaps is read as soon as its write is answered: the
        # guard ticks only once a second here.
        for reply, huge in get_many(port, [f"/write?block={n}&hold=0.2"] * WORKERS,
                                    then=lambda r: huge_bytes(r["pid"], start, start + size)):
            before.setdefault(reply["pid"], huge)
        requests += 4 * WORKERS
    assert set(before) == workers, f"not every worker served a write: {sorted(before)}"

    after = {}
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline and len(after) < WORKERS:
        for pid in workers - set(after):
            if huge_bytes(pid, start, start + size) == size:
                after[pid] = size
        time.sleep(0.1)
    for pid in workers - set(after):
        after[pid] = huge_bytes(pid, start, start + size)

    report = ", ".join(f"worker {pid}: {before[pid] / size:.2f} -> {after[pid] / size:.2f}"
                       for pid in sorted(workers))
    print(f"\ngunicorn, {requests} requests, per-worker huge coverage "
          f"(smaps, before -> after repair): {report}")
    assert all(after[pid] == size for pid in workers), report
    # At least one write was caught split before the guard got to it
    # (the guard could, rarely, tick between a write and the smaps read).
    assert any(before[pid] < size for pid in workers), report
    assert huge_bytes(master.pid, start, start + size) == size
    stats = [get(port, "/state") for _ in range(8)]
    assert all(s["guard_running"] for s in stats), stats
