"""The background guard as the benchmarks use it, whatever this thpguard has.

Benchmarks 2 and 4 need ``thpguard.install()``; the others use it where
present and fall back to ``Region.collapse()``, saying so in their output.
"""

from __future__ import annotations

import time

import thpguard

from ._harness import Skipped


def available() -> bool:
    return callable(getattr(thpguard, "install", None))


def require() -> None:
    if not available():
        raise Skipped("needs the background guard (thpguard.install), which this thpguard lacks")


def start(**kwargs):
    """Install the guard in this process (default interval unless given)."""
    return thpguard.install(**kwargs)


def stop(guard) -> None:
    """Stop the guard thread and uninstall it (``Guard.stop``)."""
    guard.stop()


def wait_complete(region, timeout: float, poll: float = 0.005) -> bool:
    """Poll the region's coverage until it is 100 %; False after ``timeout`` s."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if region.coverage().complete:
            return True
        time.sleep(poll)
    return region.coverage().complete
