"""gunicorn --preload with 4 sync workers: each worker's splits are repaired.

The app (examples/wsgi_app.py) allocates its hot buffer at import, in the
master; the test drives real HTTP requests on loopback and reads every
worker's /proc/PID/smaps: a worker's write splits a block there, and the
guard, restarted in each worker by the at-fork hooks, collapses it again.
"""

from __future__ import annotations

import os
import sys

import pytest

from integ_servers import ANY_PORT, get, huge_bytes, pin_every_worker, serve, wait_for_workers, wait_huge

pytest.importorskip("gunicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TESTS = os.path.dirname(os.path.abspath(__file__))
WORKERS = 4


@pytest.fixture(params=["root", "user"])
def gunicorn_server(request, require_thp):
    """gunicorn as is, and with ``--user``: workers that setuid() away from
    root cannot open their own page map and are repaired from smaps."""
    extra = []
    if request.param == "user":
        if os.geteuid() != 0:
            pytest.skip("--user needs a master started as root")
        extra = ["--user", "65534", "--group", "65534"]
    env = dict(os.environ, THPGUARD_GUARD="1", THPGUARD_GUARD_INTERVAL="1.0",
               HOT_BYTES=str(8 << 20), PYTHONPATH=EXAMPLES)
    # examples/gunicorn.conf.py serving examples/wsgi_app.py through
    # tests/probe_app.py, which only adds routes for the test. A pinned
    # worker sends gunicorn no heartbeat: --timeout keeps a slow host from
    # having it killed as hung.
    argv = [sys.executable, "-m", "gunicorn", "-c", os.path.join(EXAMPLES, "gunicorn.conf.py"),
            "--bind", ANY_PORT, "--timeout", "300", "--chdir", TESTS, *extra,
            "probe_app:application"]
    with serve(argv, env=env) as (proc, port):
        yield proc, port


def test_each_worker_is_repaired(gunicorn_server):
    """Every worker writes, its smaps shows the split, then its guard restores full huge coverage."""
    master, port = gunicorn_server
    state = get(port, "/state")
    start, size = state["address"], state["size"]
    workers = set(wait_for_workers(master.pid, WORKERS))  # gunicorn forks them one by one
    # The master allocated and never writes: its copy stays whole.
    assert huge_bytes(master.pid, start, start + size) == size

    # Each worker, pinned with its guard paused, has written one byte of a
    # block: its smaps shows the split, which the guard has not seen yet.
    with pin_every_worker(port, sorted(workers)) as reports:
        before = {pid: huge_bytes(pid, start, start + size) for pid in workers}
        assert all(r["guard_running"] for r in reports.values()), reports
    # Released, each worker's guard runs again and repairs its split.
    after = wait_huge(sorted(workers), start, size)

    report = ", ".join(f"worker {pid}: {before[pid] / size:.2f} -> {after[pid] / size:.2f}"
                       for pid in sorted(workers))
    print(f"\ngunicorn, per-worker huge coverage (smaps, split -> repaired): {report}")
    assert all(before[pid] == size - reports[pid]["pmd_size"] for pid in workers), report
    assert all(after[pid] == size for pid in workers), report
    assert huge_bytes(master.pid, start, start + size) == size
