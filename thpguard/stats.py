"""Process-wide counters of the guard and of :func:`thpguard.hot`: :func:`stats`."""

from __future__ import annotations

import os
import time

from . import _fork, events
from . import region as _region
from .errors import RegionClosedError
from .guard import guard as _current_guard
from .guard import states as _repair_states

__all__ = ["Stats", "stats"]


class Stats(dict):
    """Process-wide guard counters: a plain ``dict`` also readable by attribute.

    Keys (sizes in bytes, times in seconds):

    ``pid``, ``guard_running``, ``interval`` (None without a guard);
    ``regions`` open regions, ``guarded_bytes`` their size, ``huge_bytes``
    and ``split_bytes`` of them right now (scanned by this call);
    ``ticks`` full guard ticks, ``hot_ticks`` extra scans of hot regions,
    ``tick_cpu_seconds`` guard thread CPU time over all ticks,
    ``scan_seconds``, ``scan_failures``;
    ``splits_detected`` blocks newly seen split, ``repairs`` blocks
    re-collapsed, ``bytes_repaired``, ``repair_seconds`` time in
    MADV_COLLAPSE, ``last_repair_seconds`` the last such call,
    ``last_repair_latency_seconds`` from the scan that saw the last repaired
    block split to its repair; ``repair_failures`` a dict of errno name to
    count of failed block repairs; ``backoffs``; ``regions_backing_off``;
    ``regions_disabled`` a dict of region address (hex) to the reason it is
    no longer repaired (a cause that covers the whole region, looked at
    again every 10 s); ``blocks_disabled`` a dict of block address (hex) to
    the reason that block answered EINVAL (such as a mapping split by
    ``mprotect`` or ``mlock``): it is tried again after 10 s and the rest of
    its region is still repaired; ``forks_seen`` forks made by this process;
    ``hugetlb_fork_downgrades`` hugetlb ``share`` regions a fork copied into
    the child because the pool could not cover the copies a shared write
    would need (see ``Region.fork_downgraded``);
    ``callback_errors`` exceptions raised by the ``on_event`` callback;
    ``copy_fallbacks`` ``copy`` regions with the eager mechanism this
    process kept shared after fork because its memory cgroup had no room
    for the copy (counted in the child; the lazy mechanism's blocks left to
    the kernel's COW are ``copy_stats()["cow_fallbacks"]``),
    ``copy_wait_timeouts`` forks whose parent stopped waiting for
    the child's copy.
    """

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# -- per-region state -----------------------------------------------------------


def stats() -> Stats:
    """Process-wide counters of the guard and of :func:`hot` (see :class:`Stats`).

    Region sizes and huge bytes are measured now; the rest counts since this
    process started (a child starts from zero). Works without a guard.
    """
    _fork.check()
    regions = _region.regions()
    guarded = huge = split = 0
    for region in regions:
        try:
            cov = region._backend.coverage(region)
        except (OSError, RegionClosedError):
            continue
        guarded += cov.total_bytes
        huge += cov.huge_bytes
        split += cov.split_bytes or 0
    states = _repair_states()
    now = time.monotonic()
    current = _current_guard()
    c = events.counters()
    with c.lock:
        return Stats(
            pid=os.getpid(),
            guard_running=bool(current is not None and current.running),
            interval=current.interval if current is not None else None,
            regions=len(regions),
            guarded_bytes=guarded,
            huge_bytes=huge,
            split_bytes=split,
            ticks=c.ticks,
            hot_ticks=c.hot_ticks,
            tick_cpu_seconds=c.tick_cpu_seconds,
            scan_seconds=c.scan_seconds,
            scan_failures=c.scan_failures,
            splits_detected=c.splits_detected,
            repairs=c.repairs,
            bytes_repaired=c.bytes_repaired,
            repair_seconds=c.repair_seconds,
            last_repair_seconds=c.last_repair_seconds,
            last_repair_latency_seconds=c.last_repair_latency_seconds,
            repair_failures=dict(c.repair_failures),
            backoffs=c.backoffs,
            regions_backing_off=sum(1 for r, st in states if st.backoff_until > now and not r.closed),
            regions_disabled={hex(r.address): st.disabled for r, st in states
                              if st.disabled and not r.closed},
            blocks_disabled={hex(block): reason for r, st in states if not r.closed
                             for block, (until, reason) in st.blocked.items()},
            forks_seen=c.forks_seen,
            hugetlb_fork_downgrades=c.hugetlb_fork_downgrades,
            callback_errors=c.callback_errors,
            copy_fallbacks=c.copy_fallbacks,
            copy_wait_timeouts=c.copy_wait_timeouts,
        )


# -- hot buffers -----------------------------------------------------------------------------
