"""examples/wsgi_app.py plus the route the server tests need.

``/pin?dir=DIR&block=N`` pins the worker (pin_worker.py): with its guard
paused it writes one byte of block N of the hot buffer (a split) and one of
the ``copy`` region (no split), reports to ``DIR/PID.json`` whether
Python's at-fork hooks ran there (they do not when the server forks from
C), and answers once the test releases it.
"""

import json
import os
from urllib.parse import parse_qs

import thpguard
from pin_worker import pinned

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


def _pin(query):
    folder = query["dir"][0]
    hot = wsgi_app.hot
    offset = int(query.get("block", ["0"])[0]) % wsgi_app.blocks * hot.pmd_size

    def write():
        wsgi_app.view[offset] = (wsgi_app.view[offset] + 1) % 256  # splits the block
        copied.view()[0] = (copied.view()[0] + 1) % 256  # must not split: a copy

    return pinned(folder, {"python_hooks_ran": bool(hooks_ran),
                           "fork_generation": thpguard._fork.generation(),
                           "address": hot.address, "size": hot.size, "pmd_size": hot.pmd_size,
                           "copy_address": copied.address, "copy_size": copied.size}, write)
