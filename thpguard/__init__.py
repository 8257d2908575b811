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
from .blocks import Coverage
from .kernel import capabilities

try:
    from . import _native  # noqa: F401 - the compiled core everything below needs
except ImportError as exc:  # not built, or built for another Python
    _native_missing: "str | None" = (f"the native module is not built ({exc}); "
                                     "reinstall thpguard")
else:
    _native_missing = None
if _native_missing is None:
    from .region import POLICIES, CollapseResult, Region, alloc, regions
    from .events import Event
    # ``thpguard.guard`` and ``thpguard.hot`` are the functions below; the
    # modules stay importable as ``from thpguard.guard import ...``.
    from .guard import Guard, guard, install
    from .launch import _install_from_environment
    from .hot import HotBuffer, HotReport, hot
    from .stats import Stats, stats


def __getattr__(name: str):
    # Without the native module ``import thpguard`` still works, so that
    # ``thpguard verify`` and capabilities() can say what is missing; the
    # rest of the API raises instead of failing at import.
    if _native_missing is not None and name in __all__:
        raise UnsupportedError("native module", _native_missing)
    raise AttributeError(f"module 'thpguard' has no attribute {name!r}")


try:
    from ._version import version as __version__
except ImportError:  # not installed (a source tree without a build)
    __version__ = "0.0.0"

__all__ = [
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
    "capabilities",
    "errors",
    "guard",
    "hot",
    "install",
    "regions",
    "stats",
]

# THPGUARD_GUARD=1 turns the guard on without code changes (docs/guard.rst).
if _native_missing is None:
    _install_from_environment()

