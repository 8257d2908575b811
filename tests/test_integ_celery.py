"""celery's prefork pool: each pool process's splits are repaired.

A real ``celery worker --pool=prefork`` runs examples/celery_app.py with a
filesystem broker (no broker service): the main worker process allocates
the hot buffer at import and the pool forks its processes from it, as in
production. Tasks write one byte each; the test reads every pool process's
/proc/PID/smaps: the write split a block there, and the guard, restarted
in each pool process by the at-fork hooks, collapses it again.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from integ_servers import _stop, children, huge_bytes

pytest.importorskip("celery")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
POOL = 3
DEADLINE = 60.0


@pytest.fixture
def celery_worker(require_thp, tmp_path):
    import subprocess

    env = dict(os.environ, THPGUARD_GUARD="1", THPGUARD_GUARD_INTERVAL="1.0",
               HOT_BYTES=str(8 << 20), CELERY_QUEUE_DIR=str(tmp_path / "queue"),
               PYTHONPATH=EXAMPLES + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = tmp_path / "worker.log"
    with open(log_path, "w+b") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=prefork",
             f"--concurrency={POOL}", "--loglevel=INFO", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            cwd=EXAMPLES, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        # The client side: the same app module, the same queue folder.
        os.environ["CELERY_QUEUE_DIR"] = env["CELERY_QUEUE_DIR"]
        sys.path.insert(0, EXAMPLES)
        try:
            import celery_app

            yield proc, celery_app
        finally:
            sys.path.remove(EXAMPLES)
            module = sys.modules.pop("celery_app", None)
            if module is not None:  # the client's own copy of the hot buffer
                module.view.release()
                module.hot.close()
            _stop(proc)
            if os.environ.get("CELERY_QUEUE_DIR") == env["CELERY_QUEUE_DIR"]:
                del os.environ["CELERY_QUEUE_DIR"]
            log.seek(0)
            print(log.read().decode(errors="replace")[-3000:])


def test_each_pool_process_is_repaired(celery_worker):
    """Each prefork pool process splits a block with a task, then its guard repairs it."""
    proc, app = celery_worker
    first = app.state.delay().get(timeout=DEADLINE)
    start, size = first["address"], first["size"]
    pool = set(children(proc.pid))
    assert len(pool) == POOL, pool
    assert first["pid"] in pool and first["guard_running"]
    # The main worker process allocated the buffer and never writes it.
    assert huge_bytes(proc.pid, start, start + size) == size

    split = {}
    deadline = time.monotonic() + DEADLINE
    n = 0
    while set(split) < pool and time.monotonic() < deadline:
        # Tasks that hold their process a little reach every pool process.
        results = [app.write.delay(n + k, 0.3) for k in range(POOL)]
        for r in results:
            reply = r.get(timeout=DEADLINE)
            split.setdefault(reply["pid"], huge_bytes(reply["pid"], start, start + size))
        n += POOL
    assert set(split) == pool, f"not every pool process ran a write: {sorted(split)}"
    assert any(huge < size for huge in split.values()), split  # at least one split was seen

    repaired = {}
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline and len(repaired) < POOL:
        for pid in pool - set(repaired):
            if huge_bytes(pid, start, start + size) == size:
                repaired[pid] = True
        time.sleep(0.1)
    assert set(repaired) == pool, f"pool processes still split: {sorted(pool - set(repaired))}"
    assert huge_bytes(proc.pid, start, start + size) == size
