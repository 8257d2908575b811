"""thpguard: transparent huge pages that survive fork().

Allocate hot buffers with :func:`alloc` before a process forks; each
region stays huge-page backed, or regains its huge pages, in the parent and
in every child, and :meth:`Region.coverage` reports what the kernel really
maps.
"""

from . import errors
from .errors import (
    HugePagesUnavailableError,
    InvalidArgumentError,
    InvalidTypeError,
    KernelCallError,
    RegionClosedError,
    ThpguardError,
    UnsupportedError,
)
from .pagemap import Coverage
from .region import POLICIES, CollapseResult, Region, alloc, regions

try:
    from ._version import version as __version__
except ImportError:  # not installed (a source tree without a build)
    __version__ = "0.0.0"

__all__ = [
    "POLICIES",
    "CollapseResult",
    "Coverage",
    "HugePagesUnavailableError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "KernelCallError",
    "Region",
    "RegionClosedError",
    "ThpguardError",
    "UnsupportedError",
    "alloc",
    "errors",
    "regions",
]
