"""The C inner loops (``_cbench.c``), compiled once with cffi into a cache.

The extension is built in cffi's API mode the first time it is needed and
kept under ``$XDG_CACHE_HOME/thpguard-bench`` (or ``~/.cache``), keyed by a
hash of the C source, so later runs import it directly. cffi releases the
GIL around every call: a C loop in one thread does not stop the others.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, "_cbench.c")

_CDEF = """
uint64_t tgb_now_ns(void);
int64_t tgb_build_chain(uint64_t *base, size_t size, size_t page, uint64_t seed);
uint64_t tgb_chase(const uint64_t *base, uint64_t at, uint64_t hops);
void tgb_copy(void *dst, const void *src, size_t n);
void tgb_fill(void *dst, int value, size_t n);
void tgb_write_each(void *addr, size_t len, size_t stride);
uint64_t tgb_read_each(const void *addr, size_t len, size_t stride);
size_t tgb_fault_loop(volatile int *stop, uint64_t *start_ns, uint64_t *lat_ns,
                      size_t cap, size_t bytes);
uint64_t tgb_lookup_f32(const float *table, unsigned bits, uint64_t start, uint64_t count);
void tgb_kv_fill(uint64_t *slots, unsigned bits);
void tgb_fill_index_f32(float *table, size_t n);
size_t tgb_kv_serve(uint64_t *slots, unsigned bits, uint64_t *state, uint64_t batch,
                    unsigned update_permille, uint64_t until_ns,
                    uint64_t *start_ns, uint64_t *lat_ns, size_t cap);
"""

_module = None


def _cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "thpguard-bench")


def load():
    """Return ``(ffi, lib)`` of the compiled helpers, building them if needed."""
    global _module
    if _module is not None:
        return _module.ffi, _module.lib
    with open(_SOURCE, "rb") as f:
        source = f.read()
    tag = hashlib.sha256(source + _CDEF.encode() + sys.version.encode()).hexdigest()[:16]
    name = f"_tgbench_{tag}"
    cache = _cache_dir()
    os.makedirs(cache, exist_ok=True)
    found = [f for f in os.listdir(cache) if f.startswith(name + ".") and f.endswith(".so")]
    if not found:
        import cffi

        builder = cffi.FFI()
        builder.cdef(_CDEF)
        builder.set_source(name, source.decode(), extra_compile_args=["-O2"])
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = builder.compile(tmpdir=tmp, verbose=False)
            final = os.path.join(cache, os.path.basename(built))
            os.replace(built, final)
        found = [os.path.basename(final)]
    spec = importlib.util.spec_from_file_location(name, os.path.join(cache, found[0]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _module = module
    return module.ffi, module.lib
