"""THP settings from sysfs (``/sys/kernel/mm/transparent_hugepage``)."""

from __future__ import annotations

import os
import platform
import re
from typing import Dict, Optional

from ._files import THP_DIR, Roots, _bracketed, _int, _read, _roots, _warn_once

_X86_64_PMD = 2 * 1024 * 1024

KHUGEPAGED_FIELDS = (
    "defrag",
    "max_ptes_none",
    "max_ptes_shared",
    "max_ptes_swap",
    "pages_to_scan",
    "scan_sleep_millisecs",
    "alloc_sleep_millisecs",
)

def thp_mode(name: str, roots: Optional[Roots] = None) -> Optional[str]:
    """Selected value of ``transparent_hugepage/<name>`` (``enabled``,
    ``defrag``, ``shmem_enabled``, ``thp_cow``), or None where missing."""
    r = _roots(roots)
    quiet = name == "thp_cow"  # not in any merged kernel: absence is normal
    return _bracketed(_read(os.path.join(r.sys, THP_DIR, name), quiet=quiet))


def thp_cow_mode(roots: Optional[Roots] = None) -> Optional[str]:
    """The direct-COW mode (sysfs ``thp_cow``: proposed, not merged), or None."""
    return thp_mode("thp_cow", roots)


def pmd_size(roots: Optional[Roots] = None) -> Optional[int]:
    """Size in bytes of a PMD-mapped huge page (``hpage_pmd_size``).

    Where the file is missing (kernels before 4.16, or no THP at all), x86-64
    falls back to 2 MiB, logging that it assumed so; other architectures
    return None because their PMD size depends on the base page size (arm64
    with 64 KiB pages: 512 MiB). A value that is not a positive power of two
    also reads as None.
    """
    r = _roots(roots)
    path = os.path.join(r.sys, THP_DIR, "hpage_pmd_size")
    text = _read(path, quiet=True)
    value = _int(text)
    if value is not None and value > 0 and value & (value - 1) == 0:
        return value
    if text is not None:
        _warn_once(path + ":bad", "%s holds an unexpected value; ignoring it", path)
    elif os.path.isdir(os.path.join(r.sys, THP_DIR)) and platform.machine() == "x86_64":
        # hpage_pmd_size appeared in 4.16; the PMD is 2 MiB on every x86-64.
        _warn_once(path, "%s is missing; assuming 2 MiB (x86-64)", path)
        return _X86_64_PMD
    else:
        _warn_once(path, "%s is missing; PMD size unknown", path)
    return None


def mthp_sizes(roots: Optional[Roots] = None) -> Dict[int, Optional[str]]:
    """Per-size THP settings: ``{size_bytes: enabled}`` from
    ``transparent_hugepage/hugepages-<N>kB/enabled`` (6.8+; empty before)."""
    r = _roots(roots)
    base = os.path.join(r.sys, THP_DIR)
    out: Dict[int, Optional[str]] = {}
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        m = re.fullmatch(r"hugepages-(\d+)kB", name)
        if not m:
            continue
        # Sizes without an "enabled" file exist for shmem/file THP only (6.11+).
        text = _read(os.path.join(base, name, "enabled"), quiet=True)
        if text is not None:
            out[int(m.group(1)) * 1024] = _bracketed(text)
    return dict(sorted(out.items()))


def khugepaged_settings(roots: Optional[Roots] = None) -> Dict[str, Optional[int]]:
    """khugepaged tunables as ints (None where missing)."""
    r = _roots(roots)
    base = os.path.join(r.sys, THP_DIR, "khugepaged")
    return {name: _int(_read(os.path.join(base, name))) for name in KHUGEPAGED_FIELDS}


def kernel_release(roots: Optional[Roots] = None) -> Optional[str]:
    """The running kernel's release string (``uname -r``)."""
    r = _roots(roots)
    text = _read(os.path.join(r.proc, "sys/kernel/osrelease"), quiet=not r.is_real)
    if text is not None and text.strip():
        return text.strip()
    return os.uname().release if r.is_real else None
