"""hugetlb checks behind ``thpguard verify``: the pools per size and NUMA
node, 1 GiB support, the hugetlb cgroup limit, and a one-page test mapping.

The hugetlb backend is opt-in: an empty pool is not a failure of the host
(``n/a``) unless the caller said how many pages it wants
(``verify --hugetlb-pool N``). Only then does a check carry a ``fix``, so
``verify --fix`` never grows a pool on its own.
"""

from __future__ import annotations

import errno
import os
from typing import List, Optional

from . import kernel
from ._checks import FAIL, NA, OK, WARN, Check, HostContext, fmt_bytes


def _name(ctx: HostContext, size: int) -> str:
    if size == ctx.caps.pmd_size:
        return "hugetlb_pool_pmd"
    return "hugetlb_pool_gigantic" if size == kernel.GIGANTIC else "hugetlb_pool_other"


def check_pool(ctx: HostContext, pool: kernel.HugePool, wanted: Optional[int]) -> Check:
    """One pool: its counts, per node, and whether it holds ``wanted`` pages."""
    title = f"hugetlb pool {fmt_bytes(pool.page_size)}"
    nodes = ", ".join(f"node{n.node} {n.free}/{n.total} free" for n in pool.nodes)
    detail = (f"{pool.available} available: total {pool.total}, free {pool.free}, reserved "
              f"{pool.reserved}, surplus {pool.surplus} of overcommit {pool.overcommit}"
              + (f" ({nodes})" if nodes else ""))
    path = os.path.join(ctx.roots.sys, kernel.hugetlb.HUGEPAGES_DIR,
                        f"hugepages-{pool.page_size // 1024}kB", "nr_hugepages")
    if wanted is not None:
        if pool.available >= wanted:
            return Check(_name(ctx, pool.page_size), title, OK, detail + f"; holds {wanted} pages")
        target = str(pool.total + wanted - pool.available)
        grow = (wanted - pool.available) * pool.page_size
        avail = _mem_available(ctx)
        if avail is not None and grow > avail:
            # The kernel would take every free page it finds for the pool,
            # starving everything else on the host: no fix is offered.
            return Check(_name(ctx, pool.page_size), title, FAIL,
                         detail + f"; {wanted} pages wanted, {fmt_bytes(grow)} more than now "
                         f"but only {fmt_bytes(avail)} of memory is available (MemAvailable)",
                         f"ask for fewer pages, or free memory first; growing the pool this "
                         f"much would leave nothing for the rest of the host")
        return Check(_name(ctx, pool.page_size), title, WARN,
                     detail + f"; {wanted} pages wanted",
                     f"echo {target} > {path} (as root; at boot: hugepages= on the kernel "
                     "command line, or vm.nr_hugepages in sysctl.d)", (path, target))
    if pool.available == 0:
        return Check(_name(ctx, pool.page_size), title, NA,
                     detail + "; hugetlb regions of this size fall back to THP or fail",
                     f"to reserve N pages: echo N > {path}")
    return Check(_name(ctx, pool.page_size), title, OK, detail)


def _mem_available(ctx: HostContext) -> Optional[int]:
    """MemAvailable of ``/proc/meminfo`` in bytes, None where unknown."""
    try:
        with open(os.path.join(ctx.roots.proc, "meminfo")) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_gigantic(ctx: HostContext) -> Check:
    feat = ctx.caps.hugetlb_gigantic
    return Check("hugetlb_gigantic", "1 GiB hugetlb pages", OK if feat.available else NA, feat.reason)


def check_hugetlb_cgroup(ctx: HostContext, size: int, wanted: Optional[int]) -> Check:
    title = "hugetlb cgroup"
    pid = ctx.pid if ctx.pid is not None else "self"
    cg = kernel.hugetlb_cgroup(size, pid, ctx.roots)
    if cg is None:
        return Check("hugetlb_cgroup", title, NA, "no hugetlb controller applies: no cgroup limit")
    if cg.limit_bytes is None:
        return Check("hugetlb_cgroup", title, OK, f"v{cg.version} {cg.directory}: no limit")
    detail = (f"v{cg.version} {cg.directory}: {fmt_bytes(cg.usage_bytes)} of "
              f"{fmt_bytes(cg.limit_bytes)} of {fmt_bytes(size)} pages used")
    need = (wanted or 1) * size
    if (cg.available_bytes or 0) < need:
        return Check("hugetlb_cgroup", title, WARN, detail + f"; {fmt_bytes(need)} wanted",
                     "raise the cgroup's hugetlb limit (v2 hugetlb.<size>.max, "
                     "v1 hugetlb.<size>.limit_in_bytes)")
    return Check("hugetlb_cgroup", title, OK, detail)


def check_test_mapping(ctx: HostContext, size: int, wanted: Optional[int]) -> Check:
    """Map, touch and unmap one page of ``size``, read back from smaps.

    Only when the caller said it means to use the pool (``wanted``): the
    page is a free page of a pool others may be counting on (a process
    whose ``MAP_PRIVATE`` hugetlb pages are shared with a child needs a
    free page for each copy-on-write, and gets SIGBUS without one), so
    ``verify`` alone never takes one.
    """
    title = "hugetlb test page"
    if wanted is None:
        return Check("hugetlb_test_map", title, NA,
                     "not run: it would take a free page from the pool for a moment; "
                     "pass --hugetlb-pool N to run it")
    if not ctx.roots.is_real:
        return Check("hugetlb_test_map", title, NA, "not run against a fake /sys or /proc")
    try:
        from . import _native  # noqa: PLC0415
    except ImportError as exc:
        return Check("hugetlb_test_map", title, NA, f"native module not available ({exc})")
    flags = _native.MAP_HUGETLB | ((size.bit_length() - 1) << _native.MAP_HUGE_SHIFT)
    try:
        addr = _native.map_flags(0, size, flags)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            return Check("hugetlb_test_map", title, NA,
                         f"no free {fmt_bytes(size)} page to test with (the pool is empty or in use)")
        return Check("hugetlb_test_map", title, FAIL, f"mmap(MAP_HUGETLB) failed: {exc}")
    try:
        _native.populate_write(addr, size, os.sysconf("SC_PAGE_SIZE"))
        vma = next((v for v in kernel.read_smaps("self") if v.start == addr), None)
        page = vma.fields.get("KernelPageSize") if vma else None
    except OSError as exc:
        return Check("hugetlb_test_map", title, FAIL, f"touching the page failed: {exc}")
    finally:
        _native.unmap(addr, size)
    if page != size:
        return Check("hugetlb_test_map", title, FAIL,
                     f"smaps shows KernelPageSize {fmt_bytes(page)} for a {fmt_bytes(size)} page")
    return Check("hugetlb_test_map", title, OK,
                 f"mapped and touched one {fmt_bytes(size)} page (smaps KernelPageSize {fmt_bytes(page)})")


def bad_args(caps: kernel.Capabilities, pages: Optional[int],
             page_size: Optional[int]) -> Optional[str]:
    """What is wrong with ``--hugetlb-pool`` / ``--hugetlb-page-size``, or None."""
    if pages is not None and pages < 0:
        return f"--hugetlb-pool must be 0 or more pages, got {pages}"
    if page_size is not None and page_size not in caps.hugetlb_sizes:
        have = ", ".join(fmt_bytes(s) for s in caps.hugetlb_sizes) or "none"
        return f"--hugetlb-page-size {page_size}: no such hugetlb pool here (sizes: {have})"
    return None


def hugetlb_checks(ctx: HostContext, wanted: Optional[int] = None,
                   page_size: Optional[int] = None) -> List[Check]:
    """Every hugetlb check, in display order; ``wanted`` pages of
    ``page_size`` (default the PMD size) is what the caller means to use."""
    sizes = list(ctx.caps.hugetlb_sizes)
    if not sizes:
        return [Check("hugetlb", "hugetlb", NA, ctx.caps.hugetlb.reason)]
    size = page_size or (ctx.caps.pmd_size if ctx.caps.pmd_size in sizes else sizes[0])
    out = []
    for s in sizes:
        pool = kernel.hugetlb_pool(s, ctx.roots)
        if pool is not None:
            out.append(check_pool(ctx, pool, wanted if s == size else None))
    out.append(check_gigantic(ctx))
    out.append(check_hugetlb_cgroup(ctx, size, wanted))
    out.append(check_test_mapping(ctx, size, wanted))
    return out
