"""What this kernel offers, read from sysfs and /proc.

Everything here parses text, in Python, so that tests can point it at fake
trees: pass ``Roots(sys=..., proc=...)`` explicitly, or set the environment
variables ``THPGUARD_SYSFS_ROOT`` and ``THPGUARD_PROC_ROOT``.

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

from ._files import THP_DIR, Roots, _bracketed, reset_warnings
from .cgroup import MemoryCgroup, memory_cgroup
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
    free_huge_bytes,
    map_count_error,
    map_count_hint,
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
    "read_vmstat",
    "read_status",
    "read_buddyinfo",
    "free_huge_bytes",
    "map_count_error",
    "map_count_hint",
    "memory_cgroup",
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
