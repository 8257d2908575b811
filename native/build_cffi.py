"""cffi build script for thpguard's private extension ``thpguard._cffi``.

The declarations in ``cdef.h`` are checked strictly against the real
``thpguard.h``: every function prototype of the cdef is compiled again
after the header is included, so a difference in arity, pointer type,
integer width or signedness is a "conflicting types" compile error, and
the layout of each struct the cdef spells out is pinned with static
assertions. Set ``THPGUARD_WERROR=1`` to turn C warnings into errors (CI
does; shipped builds do not).
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "cdef.h")) as f:
    CDEF = f.read()


def _statements(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [" ".join(part.split()) for part in text.split(";") if part.strip()]


def strict_checks(text):
    """C that fails to compile where the cdef and thpguard.h disagree."""
    out = []
    for stmt in _statements(text):
        if "(" in stmt and not stmt.startswith(("typedef", "struct", "enum")):
            out.append(stmt + ";")  # a prototype: must match the header's exactly
    for name, body in re.findall(r"struct\s+(\w+)\s*\{([^}]*)\}", text):
        if "..." in body:
            continue
        offset, fields = 0, [f.split() for f in body.split(";") if f.strip()]
        for ftype, fname in fields:
            size = {"uint64_t": 8, "int64_t": 8, "uint32_t": 4, "int32_t": 4}[ftype]
            out.append(f"_Static_assert(offsetof(struct {name}, {fname}) == {offset}, "
                       f"\"cdef: struct {name}.{fname} moved\");")
            out.append(f"_Static_assert(sizeof(((struct {name} *)0)->{fname}) == {size}, "
                       f"\"cdef: struct {name}.{fname} changed width\");")
            offset += size
        out.append(f"_Static_assert(sizeof(struct {name}) == {offset}, "
                   f"\"cdef: struct {name} changed size\");")
    return "\n".join(out)


ffibuilder = FFI()
ffibuilder.cdef(CDEF)

extra_compile_args = ["-std=gnu11", "-Wall", "-Wextra"]
if os.environ.get("THPGUARD_WERROR") == "1":
    extra_compile_args.append("-Werror")

ffibuilder.set_source(
    "thpguard._cffi",
    '#include <stddef.h>\n#include "thpguard.h"\n#include "thpguard_testing.h"\n'
    + strict_checks(CDEF),
    # Relative to the project root, where setup.py runs.
    sources=["native/thpguard.c"],
    include_dirs=["native"],
    extra_compile_args=extra_compile_args,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
