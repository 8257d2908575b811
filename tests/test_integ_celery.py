"""celery's prefork pool: each pool process's splits are repaired.

A real ``celery worker --pool=prefork`` runs examples/celery_app.py (through
tests/celery_probe.py, which only adds a task for the test) with a
filesystem broker (no broker service): the main worker process allocates
the hot buffer at import and the pool forks its processes from it, as in
production. One ``pin`` task per pool process reaches each of them (a
pinned process takes no other task until released) and writes one byte
with its guard paused; the test reads every pool process's
/proc/PID/smaps: the write split a block there, and the guard, restarted
in each pool process by the at-fork hooks, collapses it again.
"""

from __future__ import annotations

import os
import sys

import pytest

from integ_servers import _stop, huge_bytes, pin_workers, wait_for_workers, wait_huge

pytest.importorskip("celery")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TESTS = os.path.dirname(os.path.abspath(__file__))
POOL = 3
DEADLINE = 60.0


@pytest.fixture
def celery_worker(require_thp, tmp_path):
    import subprocess

    env = dict(os.environ, THPGUARD_GUARD="1", THPGUARD_GUARD_INTERVAL="1.0",
               HOT_BYTES=str(8 << 20), CELERY_QUEUE_DIR=str(tmp_path / "queue"),
               PYTHONPATH=os.pathsep.join([EXAMPLES, TESTS, os.environ.get("PYTHONPATH", "")]))
    log_path = tmp_path / "worker.log"
    with open(log_path, "w+b") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_probe", "worker", "--pool=prefork",
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
    pool = set(wait_for_workers(proc.pid, POOL))
    assert first["pid"] in pool and first["guard_running"]
    # The main worker process allocated the buffer and never writes it.
    assert huge_bytes(proc.pid, start, start + size) == size

    # Each pool process, pinned with its guard paused, has written one byte
    # of a block: its smaps shows the split, which the guard has not seen yet.
    def send_pin(folder):
        return app.app.send_task("celery_probe.pin", args=[folder, 0]).get(timeout=4 * DEADLINE)

    with pin_workers(sorted(pool), send_pin, DEADLINE) as reports:
        split = {pid: huge_bytes(pid, start, start + size) for pid in pool}
        assert all(r["guard_running"] for r in reports.values()), reports
    assert all(split[pid] == size - reports[pid]["pmd_size"] for pid in pool), split
    # Released, each pool process's guard runs again and repairs its split.
    repaired = wait_huge(sorted(pool), start, size, DEADLINE)
    assert repaired == {pid: size for pid in pool}, f"pool processes still split: {repaired}"
    assert huge_bytes(proc.pid, start, start + size) == size
