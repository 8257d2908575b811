"""examples/celery_app.py plus the task the celery test needs: ``pin``
(see pin_worker.py), so that one pin per pool process reaches each of them."""

from celery_app import app, blocks, hot, view  # examples/ is on the path

from pin_worker import pinned


@app.task(name="celery_probe.pin")
def pin(folder: str, block: int) -> dict:
    offset = block % blocks * hot.pmd_size

    def write():
        view[offset] = (view[offset] + 1) % 256  # splits the block in this pool process

    return pinned(folder, {"address": hot.address, "size": hot.size,
                           "pmd_size": hot.pmd_size}, write)
