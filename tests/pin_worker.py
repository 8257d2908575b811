"""A worker of a forking server, pinned by a test: the pin route of
probe_app.py (WSGI servers) and the pin task of celery_probe.py.

A worker that serves one request (or task) at a time and stays busy until
the test releases it reaches every worker deterministically: N concurrent
pins land on N different workers. With its guard paused, the worker makes
its writes (a split, which stays until the guard runs again), writes
``body`` to ``FOLDER/PID.json`` and waits for ``FOLDER/release`` to exist;
then its guard runs again.
"""

import contextlib
import json
import os
import time

import thpguard

#: Seconds a pinned worker waits for its release at most (the test stops
#: the server long before, unless it hangs itself).
PIN_LIMIT = 300.0


def pinned(folder: str, body: dict, write) -> dict:
    """Run ``write()`` with this process's guard paused, report ``body``
    (plus ``guard_running``) to the test, and hold until released; returns
    ``body`` with ``guard_running_after``."""
    guard = thpguard.guard()  # the first thpguard call in a worker handles the fork
    body = dict(body, pid=os.getpid(), guard_running=guard is not None and guard.running)
    with guard.paused() if guard is not None else contextlib.nullcontext():
        write()
        report = os.path.join(folder, f"{os.getpid()}.json")
        with open(report + ".tmp", "w") as f:
            json.dump(body, f)
        os.rename(report + ".tmp", report)
        deadline = time.monotonic() + PIN_LIMIT
        release = os.path.join(folder, "release")
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
    body["guard_running_after"] = guard is not None and guard.running
    return body
