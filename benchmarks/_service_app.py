"""The WSGI app of the service benchmark (``benchmarks/service.py``).

Run by ``gunicorn --preload``: the master imports this module, which
builds the float32 table before gunicorn forks its workers, in the memory
variant named by ``THPGUARD_BENCH_VARIANT`` (see ``_tables``). Each request
to ``/`` does ``THPGUARD_BENCH_LOOKUPS`` dependent random lookups in the
table (in C, so the TLB cost is not hidden by Python's), and one request in
``THPGUARD_BENCH_WRITE_EVERY`` adds 1.0 to one random entry (4 bytes), as a
service updates a counter or a cache entry. ``/age`` does only that write
(the benchmark ages its workers with it). ``/info`` reports this worker's
pid, where the table is and thpguard's counters.
"""

import dataclasses
import json
import os
import random
import sys

import numpy

from benchmarks import _cbench, _tables

VARIANT = os.environ["THPGUARD_BENCH_VARIANT"]
TABLE_BYTES = int(os.environ["THPGUARD_BENCH_TABLE_BYTES"])
LOOKUPS = int(os.environ.get("THPGUARD_BENCH_LOOKUPS", "20000"))
WRITE_EVERY = int(os.environ.get("THPGUARD_BENCH_WRITE_EVERY", "4"))

table = _tables.allocate(VARIANT, TABLE_BYTES)
values = numpy.frombuffer(table.view, dtype=numpy.float32)
BITS = values.size.bit_length() - 1  # the table is a power of two entries
_ffi, _lib = _cbench.load()
_pointer = _ffi.cast("float *", values.ctypes.data)
_lib.tgb_fill_index_f32(_pointer, values.size)
_served = 0


def _thpguard_stats():
    thpguard = sys.modules.get("thpguard")
    if VARIANT in ("4k", "thp") or thpguard is None:
        return None
    found = thpguard.stats()
    if dataclasses.is_dataclass(found):
        return dataclasses.asdict(found)
    try:
        return dict(found)
    except (TypeError, ValueError):
        return {"repr": repr(found)}


def application(environ, start_response):
    global _served
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        _served += 1
        # random is reseeded in each child after fork: workers differ.
        end = _lib.tgb_lookup_f32(_pointer, BITS, random.getrandbits(64), LOOKUPS)
        if WRITE_EVERY and _served % WRITE_EVERY == 0:
            values[random.getrandbits(BITS)] += 1.0
        body = b"%d\n" % end
    elif path == "/age":
        # Only the write: stands in for the hours of traffic a long-running
        # worker has served, whose writes have reached most of the table.
        values[random.getrandbits(BITS)] += 1.0
        body = b"aged\n"
    elif path == "/info":
        body = json.dumps({
            "pid": os.getpid(), "address": table.address, "size": table.size,
            "mechanism": table.mechanism, "served": _served, "thpguard_stats": _thpguard_stats(),
            "fork_downgraded": table.fork_downgraded,
        }, default=str).encode()
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
