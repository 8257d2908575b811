"""A celery app whose prefork pool workers keep their huge pages.

    THPGUARD_GUARD=1 celery -A celery_app worker --pool=prefork --concurrency=4

The hot buffer is allocated when the worker imports this module, in the
main worker process. The prefork pool then forks its pool processes from
it (with os.fork(), whose at-fork hooks restart the guard in each of
them), so every pool process inherits the buffer copy-on-write. A task's
write splits the 2 MiB block it touched in that pool process only; the
guard there repairs it. Pool processes that celery replaces later
(``--max-tasks-per-child``) are forked the same way.

The broker and result backend are folders here (kombu's filesystem
transport), so the example runs without a broker service; use your own
``broker_url`` in production: the pool forks the same way whatever the
broker.
"""

import os

from celery import Celery

import thpguard

HOT_BYTES = int(os.environ.get("HOT_BYTES", 16 << 20))
QUEUE_DIR = os.environ.get("CELERY_QUEUE_DIR", "/tmp/thpguard-celery")

for sub in ("out", "processed", "results", "control"):
    os.makedirs(os.path.join(QUEUE_DIR, sub), exist_ok=True)

app = Celery("celery_app")
app.conf.update(
    broker_url="filesystem://",
    broker_transport_options={
        "data_folder_in": os.path.join(QUEUE_DIR, "out"),
        "data_folder_out": os.path.join(QUEUE_DIR, "out"),
        "data_folder_processed": os.path.join(QUEUE_DIR, "processed"),
        # Otherwise kombu keeps its exchange table in ./control, wherever the worker starts.
        "control_folder": os.path.join(QUEUE_DIR, "control"),
    },
    result_backend="file://" + os.path.join(QUEUE_DIR, "results"),
    worker_prefetch_multiplier=1,  # one task per pool process at a time
)

hot = thpguard.alloc(HOT_BYTES, fork="share", name="celery-hot")
view = hot.view()
blocks = hot.size // hot.pmd_size


@app.task
def write(block: int, hold: float = 0.0) -> dict:
    """Write one byte of ``block`` (splits it in this pool process)."""
    import time

    offset = block % blocks * hot.pmd_size
    view[offset] = (view[offset] + 1) % 256
    time.sleep(hold)  # keeps this pool process busy so others take the next tasks
    return {"pid": os.getpid(), "address": hot.address, "size": hot.size}


@app.task
def state() -> dict:
    """This pool process's view of the region and its guard."""
    running = thpguard.guard()
    stats = thpguard.stats()
    return {"pid": os.getpid(), "address": hot.address, "size": hot.size,
            "guard_running": running is not None and running.running,
            "repairs": stats["repairs"]}
