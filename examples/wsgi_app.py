"""A WSGI app with a huge-page hot buffer, for forking servers.

Allocated at import: with ``gunicorn --preload`` (or uWSGI without
``lazy-apps``) the master imports this module once and every worker
inherits the buffer copy-on-write. A worker's write splits the 2 MiB block
it touched, in that worker only; the guard (``THPGUARD_GUARD=1`` in the
server's environment) repairs it there.

Routes: ``/read?block=N`` reads a block, ``/write?block=N`` writes one
byte of it, ``/state`` reports this worker's pid, region and counters.
"""

import json
import os
from urllib.parse import parse_qs

import thpguard

HOT_BYTES = int(os.environ.get("HOT_BYTES", 16 << 20))

hot = thpguard.alloc(HOT_BYTES, fork="share")
view = hot.view()
blocks = hot.size // hot.pmd_size


def application(environ, start_response):
    # Cheap (one native call); after a fork made from C (uWSGI) the first
    # call in the worker runs thpguard's fork handling and restarts the guard.
    running = thpguard.guard()
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    offset = int(query.get("block", ["0"])[0]) % blocks * hot.pmd_size
    if path == "/read":
        body = {"pid": os.getpid(), "value": view[offset]}
    elif path == "/write":
        view[offset] = (view[offset] + 1) % 256
        body = {"pid": os.getpid(), "value": view[offset]}
    elif path == "/state":
        stats = thpguard.stats()
        body = {
            "pid": os.getpid(),
            "address": hot.address,
            "size": hot.size,
            "guard_running": running is not None and running.running,
            "repairs": stats["repairs"],
            "splits_detected": stats["splits_detected"],
        }
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]
