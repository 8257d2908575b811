"""The hugetlb pools: sizes, per-node counts, overcommit and cgroup limits.

Everything is read from sysfs and procfs text (``/sys/kernel/mm/hugepages``,
``/sys/devices/system/node/node*/hugepages``, ``/proc/cpuinfo``, the hugetlb
cgroup controller), so tests can point it at fake trees like the other
readers. Counts are in pages of the pool's size; sizes in bytes.

The pool changes whenever any process maps or frees hugetlb memory: these
readers are never cached (the capability registry keeps only which sizes
exist and whether 1 GiB pages are possible).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional

from ._files import Roots, _int, _pid_dir, _read, _roots
from .cgroup import _mounts, _under_sys

HUGEPAGES_DIR = "kernel/mm/hugepages"
GIGANTIC = 1 << 30

# v1 reports "no limit" as PAGE_COUNTER_MAX pages in bytes: anything this big.
_UNLIMITED = 1 << 60


@dataclasses.dataclass(frozen=True)
class NodePool:
    """One NUMA node's share of a pool (pages)."""

    node: int
    total: int
    free: int
    surplus: int


@dataclasses.dataclass(frozen=True)
class HugePool:
    """The hugetlb pool of one page size, in pages of ``page_size`` bytes.

    ``total`` is ``nr_hugepages`` (persistent pages), ``free`` the pages no
    one maps, ``reserved`` the free pages promised to mappings that have not
    touched them yet, ``surplus`` pages allocated beyond ``total`` under
    ``overcommit`` (``nr_overcommit_hugepages``). ``nodes`` splits total,
    free and surplus per NUMA node (empty where the kernel has no node
    directories).
    """

    page_size: int
    total: int
    free: int
    reserved: int
    surplus: int
    overcommit: int
    nodes: List[NodePool] = dataclasses.field(default_factory=list)

    @property
    def available(self) -> int:
        """Pages a new reservation can still get: the free pages nobody
        reserved, plus the overcommit headroom not yet used."""
        return max(0, self.free - self.reserved) + max(0, self.overcommit - self.surplus)

    @property
    def sysfs_dir(self) -> str:
        return f"/sys/{HUGEPAGES_DIR}/hugepages-{self.page_size // 1024}kB"

    def grow_command(self, pages_needed: int) -> str:
        """The shell command that makes room for ``pages_needed`` more pages."""
        target = self.total + max(0, pages_needed - self.available)
        return f"echo {target} > {self.sysfs_dir}/nr_hugepages"

    def as_dict(self) -> dict:
        return {
            "available": self.available,
            "free": self.free,
            "nodes": [dataclasses.asdict(n) for n in self.nodes],
            "overcommit": self.overcommit,
            "page_size": self.page_size,
            "reserved": self.reserved,
            "surplus": self.surplus,
            "total": self.total,
        }


def _size_of(name: str) -> Optional[int]:
    m = re.fullmatch(r"hugepages-(\d+)kB", name)
    return int(m.group(1)) * 1024 if m else None


def hugetlb_sizes(roots: Optional[Roots] = None) -> List[int]:
    """The hugetlb page sizes this kernel offers (bytes, ascending); empty
    without hugetlb (no ``/sys/kernel/mm/hugepages``)."""
    r = _roots(roots)
    try:
        names = os.listdir(os.path.join(r.sys, HUGEPAGES_DIR))
    except OSError:
        return []
    return sorted(s for s in map(_size_of, names) if s)


def _node_pools(r: Roots, page_size: int) -> List[NodePool]:
    base = os.path.join(r.sys, "devices/system/node")
    try:
        names = os.listdir(base)
    except OSError:
        return []
    out = []
    for name in names:
        m = re.fullmatch(r"node(\d+)", name)
        if not m:
            continue
        d = os.path.join(base, name, "hugepages", f"hugepages-{page_size // 1024}kB")
        vals = [_int(_read(os.path.join(d, f), quiet=True))
                for f in ("nr_hugepages", "free_hugepages", "surplus_hugepages")]
        if any(v is None for v in vals):
            continue
        out.append(NodePool(int(m.group(1)), *vals))
    return sorted(out, key=lambda n: n.node)


def hugetlb_pool(page_size: int, roots: Optional[Roots] = None) -> Optional[HugePool]:
    """The pool of ``page_size`` bytes, or None where the kernel has no such size."""
    r = _roots(roots)
    d = os.path.join(r.sys, HUGEPAGES_DIR, f"hugepages-{page_size // 1024}kB")
    if not os.path.isdir(d):
        return None

    def get(name: str) -> int:
        return _int(_read(os.path.join(d, name), quiet=True)) or 0

    return HugePool(
        page_size=page_size,
        total=get("nr_hugepages"),
        free=get("free_hugepages"),
        reserved=get("resv_hugepages"),
        surplus=get("surplus_hugepages"),
        overcommit=get("nr_overcommit_hugepages"),
        nodes=_node_pools(r, page_size),
    )


def hugetlb_pools(roots: Optional[Roots] = None) -> Dict[int, HugePool]:
    """Every pool, by page size."""
    r = _roots(roots)
    out = {}
    for size in hugetlb_sizes(r):
        pool = hugetlb_pool(size, r)
        if pool is not None:
            out[size] = pool
    return out


def default_hugetlb_size(roots: Optional[Roots] = None) -> Optional[int]:
    """``Hugepagesize`` of ``/proc/meminfo`` (the default pool), in bytes."""
    r = _roots(roots)
    text = _read(os.path.join(r.proc, "meminfo"), quiet=True) or ""
    m = re.search(r"^Hugepagesize:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def cpu_has_gigantic_pages(roots: Optional[Roots] = None) -> Optional[bool]:
    """Whether the CPU maps 1 GiB pages (x86 ``pdpe1gb``); None when
    ``/proc/cpuinfo`` does not say (other architectures: ask sysfs)."""
    r = _roots(roots)
    text = _read(os.path.join(r.proc, "cpuinfo"), quiet=True)
    if not text:
        return None
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    if flags is None:
        return None
    return "pdpe1gb" in flags.group(1).split()


def gigantic_supported(roots: Optional[Roots] = None) -> bool:
    """True when the kernel offers a 1 GiB pool (its sysfs directory exists)
    and the CPU, where it says, has ``pdpe1gb``."""
    r = _roots(roots)
    return GIGANTIC in hugetlb_sizes(r) and cpu_has_gigantic_pages(r) is not False


@dataclasses.dataclass(frozen=True)
class HugetlbCgroup:
    """The hugetlb cgroup limit of a process for one page size (bytes);
    ``limit_bytes`` None means unlimited."""

    version: int
    directory: str
    page_size: int
    limit_bytes: Optional[int]
    usage_bytes: Optional[int]

    @property
    def available_bytes(self) -> Optional[int]:
        if self.limit_bytes is None:
            return None
        return max(0, self.limit_bytes - (self.usage_bytes or 0))


def _size_label(page_size: int) -> str:
    # The controller's file names: hugetlb.2MB.max, hugetlb.1GB.limit_in_bytes.
    for unit, shift in (("GB", 30), ("MB", 20), ("KB", 10)):
        if page_size >= 1 << shift and page_size % (1 << shift) == 0:
            return f"{page_size >> shift}{unit}"
    return f"{page_size}B"


def hugetlb_cgroup(page_size: int, pid="self",
                   roots: Optional[Roots] = None) -> Optional[HugetlbCgroup]:
    """The tightest hugetlb cgroup limit on ``pid`` for ``page_size`` (the
    process's cgroup or an ancestor, v1 ``hugetlb`` controller or v2
    ``hugetlb.<size>.max``), or None when no hugetlb controller applies."""
    r = _roots(roots)
    text = _read(os.path.join(_pid_dir(r, pid), "cgroup"), quiet=True) or ""
    label = _size_label(page_size)
    for root, mount_point, fstype, opts in _mounts(r, pid):
        if fstype == "cgroup2":
            rel = next((line.split(":", 2)[2] for line in text.splitlines()
                        if line.startswith("0::")), None)
            limit_name, usage_name, version = (f"hugetlb.{label}.max",
                                               f"hugetlb.{label}.current", 2)
        elif "hugetlb" in opts:
            rel = next((line.split(":", 2)[2] for line in text.splitlines()
                        if "hugetlb" in line.split(":")[1].split(",")), None)
            limit_name, usage_name, version = (f"hugetlb.{label}.limit_in_bytes",
                                               f"hugetlb.{label}.usage_in_bytes", 1)
        else:
            continue
        if rel is None:
            continue
        if root != "/" and rel.startswith(root):
            rel = rel[len(root):]
        base = _under_sys(r, mount_point)
        here = os.path.join(base, rel.lstrip("/"))
        best: Optional[HugetlbCgroup] = None
        d = here
        while True:
            raw = _read(os.path.join(d, limit_name), quiet=True)
            if raw is not None:
                raw = raw.strip()
                limit = None if raw == "max" else _int(raw)
                if limit is not None and limit >= _UNLIMITED:
                    limit = None
                usage = _int(_read(os.path.join(d, usage_name), quiet=True))
                cg = HugetlbCgroup(version, d, page_size, limit, usage)
                if cg.available_bytes is not None and (
                        best is None or best.available_bytes is None
                        or cg.available_bytes < best.available_bytes):
                    best = cg
                elif best is None:
                    best = cg
            if os.path.normpath(d) == os.path.normpath(base) or len(d) <= len(base):
                break
            d = os.path.dirname(d)
        if best is not None:
            return best
    return None


def hugetlb_meminfo(roots: Optional[Roots] = None) -> Dict[str, int]:
    """The ``HugePages_*`` and ``Hugetlb`` lines of ``/proc/meminfo`` (pages;
    ``Hugetlb`` in bytes)."""
    r = _roots(roots)
    text = _read(os.path.join(r.proc, "meminfo"), quiet=True) or ""
    out: Dict[str, int] = {}
    for m in re.finditer(r"^(HugePages_\w+|Hugetlb):\s+(\d+)(\s+kB)?", text, re.M):
        out[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return out
