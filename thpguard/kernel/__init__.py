"""What this kernel offers, read from sysfs and /proc.

Everything here parses text, in Python, so that tests can point it at fake
trees: pass ``Roots(sys=..., proc=...)`` explicitly, or call
:func:`set_test_roots`. Nothing in the environment redirects these paths: an
installed program always reads the real ``/sys`` and ``/proc``.

Parsers never raise on a kernel whose files look different from the ones
they were written against: a missing file or field reads as ``None`` and is
logged once (logger ``thpguard.kernel``, level WARNING).

One module per concern:

``sysfs``
    THP settings (``enabled``, ``defrag``, the PMD size, mTHP sizes,
    khugepaged tunables).
``procfs``
    ``/proc/PID/smaps``, ``status``, ``/proc/vmstat``, ``buddyinfo``.
``cgroup``
    the memory cgroup of a process, v1 or v2.
``hugetlb``
    the hugetlb pools per size and NUMA node, overcommit, the hugetlb
    cgroup limit of a process, 1 GiB page support.
``features``
    the capability registry (``registry``, :func:`capabilities`):
    functional probes through the private native module, once, cached.
"""

from __future__ import annotations

from typing import Optional

from ._files import THP_DIR, Roots, _bracketed, _set_test_roots, reset_warnings
from .cgroup import MemoryCgroup, cgroup_path, memory_cgroup
from .features import (
    PR_THP_DISABLE_EXCEPT_ADVISED,
    Capabilities,
    CapabilityRegistry,
    Feature,
    can_get_huge_pages,
    capabilities,
    direct_cow_interface,
    registry,
    thp_disable_flags,
)
from .hugetlb import (
    GIGANTIC,
    HugePool,
    HugetlbCgroup,
    NodePool,
    cpu_has_gigantic_pages,
    default_hugetlb_size,
    gigantic_supported,
    hugetlb_cgroup,
    hugetlb_meminfo,
    hugetlb_pool,
    hugetlb_pools,
    hugetlb_sizes,
)
from .procfs import (
    BuddyZone,
    ProcStatus,
    Vma,
    first_gap,
    free_huge_bytes,
    map_count_error,
    map_count_hint,
    mapped_ranges,
    read_buddyinfo,
    read_smaps,
    read_status,
    read_vmstat,
)
from .sysfs import (
    KHUGEPAGED_FIELDS,
    kernel_release,
    khugepaged_settings,
    mthp_sizes,
    pmd_size,
    thp_cow_mode,
    thp_mode,
)

__all__ = [
    "Roots",
    "set_test_roots",
    "Feature",
    "Capabilities",
    "CapabilityRegistry",
    "Vma",
    "ProcStatus",
    "BuddyZone",
    "MemoryCgroup",
    "capabilities",
    "registry",
    "can_get_huge_pages",
    "pmd_size",
    "mthp_sizes",
    "khugepaged_settings",
    "thp_mode",
    "thp_cow_mode",
    "direct_cow_interface",
    "kernel_release",
    "read_smaps",
    "mapped_ranges",
    "first_gap",
    "read_vmstat",
    "read_status",
    "read_buddyinfo",
    "free_huge_bytes",
    "map_count_error",
    "map_count_hint",
    "memory_cgroup",
    "cgroup_path",
    "thp_disable_flags",
    "reset_warnings",
    "PR_THP_DISABLE_EXCEPT_ADVISED",
    "THP_DIR",
    "KHUGEPAGED_FIELDS",
    "_bracketed",
    "GIGANTIC",
    "HugePool",
    "HugetlbCgroup",
    "NodePool",
    "cpu_has_gigantic_pages",
    "default_hugetlb_size",
    "gigantic_supported",
    "hugetlb_cgroup",
    "hugetlb_meminfo",
    "hugetlb_pool",
    "hugetlb_pools",
    "hugetlb_sizes",
]


def set_test_roots(roots: Optional[Roots]) -> None:
    """For tests only: make every reader without explicit roots use ``roots``
    (None restores the real ``/sys`` and ``/proc``). Process-wide; the
    capability registry forgets what it cached.

    ``thpguard verify --fix`` refuses to run while fake roots are set; it
    writes only to the real ``/sys``.
    """
    _set_test_roots(roots)
    registry.clear()
