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
from .region import COPY_MODES, POLICIES, CollapseResult, Region, alloc, copy_stats, regions
# ``thpguard.guard`` is the function below; the module stays importable as
# ``from thpguard.guard import ...``.
from .guard import (
    Event,
    Guard,
    HotBuffer,
    HotReport,
    Stats,
    _install_from_environment,
    guard,
    hot,
    install,
    stats,
)

try:
    from ._version import version as __version__
except ImportError:  # not installed (a source tree without a build)
    __version__ = "0.0.0"

__all__ = [
    "COPY_MODES",
    "POLICIES",
    "CollapseResult",
    "Coverage",
    "Event",
    "Guard",
    "HotBuffer",
    "HotReport",
    "HugePagesUnavailableError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "KernelCallError",
    "Region",
    "RegionClosedError",
    "Stats",
    "ThpguardError",
    "UnsupportedError",
    "alloc",
    "copy_stats",
    "errors",
    "guard",
    "hot",
    "install",
    "regions",
    "stats",
]

# THPGUARD_GUARD=1 turns the guard on without code changes (docs/guard.rst).
_install_from_environment()

