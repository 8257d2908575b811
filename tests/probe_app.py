"""examples/wsgi_app.py plus what the server tests need to see.

``/hooks`` says whether Python's at-fork hooks ran in this worker (they do
not when the server forks from C); ``/copywrite`` writes one byte in a
``copy`` region that the fork handling must have made the worker's own.
``hold=SECONDS`` keeps the worker busy before it serves a request, so that
concurrent requests reach different workers.
"""

import json
import os
import time
from urllib.parse import parse_qs

import thpguard

hooks_ran = []
os.register_at_fork(after_in_child=lambda: hooks_ran.append(os.getpid()))

from wsgi_app import application as app  # noqa: E402  (examples/ is on the path)

copied = thpguard.alloc(4 << 20, fork="copy")


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    hold = float(parse_qs(environ.get("QUERY_STRING", "")).get("hold", ["0"])[0])
    if hold:
        time.sleep(min(hold, 2.0))
    if path == "/hooks":
        body = {"pid": os.getpid(), "python_hooks_ran": bool(hooks_ran),
                "fork_generation": thpguard._fork.generation()}
    elif path == "/copywrite":
        thpguard.guard()  # the first thpguard call in a worker handles the fork
        copied.view()[0] = (copied.view()[0] + 1) % 256
        body = {"pid": os.getpid(), "address": copied.address, "size": copied.size}
    else:
        return app(environ, start_response)
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [data]
