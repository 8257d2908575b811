"""cffi build script for thpguard's private extension ``thpguard._cffi``.

The declarations in ``cdef.h`` are compiled against the real ``thpguard.h``
in API mode, so a drift between the two fails the build. Set
``THPGUARD_WERROR=1`` to turn C warnings into errors (CI does; shipped
builds do not).
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
with open(os.path.join(HERE, "cdef.h")) as f:
    ffibuilder.cdef(f.read())

extra_compile_args = ["-std=gnu11", "-Wall", "-Wextra"]
if os.environ.get("THPGUARD_WERROR") == "1":
    extra_compile_args.append("-Werror")

ffibuilder.set_source(
    "thpguard._cffi",
    '#include "thpguard.h"',
    # Relative to the project root, where setup.py runs.
    sources=["native/thpguard.c", "native/uffd.c"],
    include_dirs=["native"],
    extra_compile_args=extra_compile_args,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
