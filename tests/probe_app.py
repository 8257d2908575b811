"""examples/wsgi_app.py plus the route the server tests need.

``/pin?dir=DIR&block=N`` reaches every worker deterministically: a worker
serves one request at a time, and a pinned one stays busy until the test
releases it, so N concurrent pins land on N different workers. With its
guard paused, the worker writes one byte of block N of the hot buffer (a
split, which stays until the guard runs again) and one of the ``copy``
region, writes what it did to ``DIR/PID.json``, and waits for
``DIR/release`` to exist; then its guard runs again and it answers.
"""

import contextlib
import json
import os
import time
from urllib.parse import parse_qs

import thpguard

hooks_ran = []
os.register_at_fork(after_in_child=lambda: hooks_ran.append(os.getpid()))

import wsgi_app  # noqa: E402  (examples/ is on the path)
from wsgi_app import application as app  # noqa: E402

copied = thpguard.alloc(4 << 20, fork="copy")


def application(environ, start_response):
    if environ.get("PATH_INFO", "/") != "/pin":
        return app(environ, start_response)
    body = _pin(parse_qs(environ.get("QUERY_STRING", "")))
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [data]


#: Seconds a pinned worker waits for its release at most (the test stops
#: the server long before, unless it hangs itself).
PIN_LIMIT = 300.0


def _pin(query):
    folder = query["dir"][0]
    hot = wsgi_app.hot
    offset = int(query.get("block", ["0"])[0]) % wsgi_app.blocks * hot.pmd_size
    guard = thpguard.guard()  # the first thpguard call in a worker handles the fork
    body = {"pid": os.getpid(), "python_hooks_ran": bool(hooks_ran),
            "fork_generation": thpguard._fork.generation(),
            "guard_running": guard is not None and guard.running,
            "address": hot.address, "size": hot.size, "pmd_size": hot.pmd_size,
            "copy_address": copied.address, "copy_size": copied.size}
    with guard.paused() if guard is not None else contextlib.nullcontext():
        wsgi_app.view[offset] = (wsgi_app.view[offset] + 1) % 256  # splits the block
        copied.view()[0] = (copied.view()[0] + 1) % 256  # must not split: a copy
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
