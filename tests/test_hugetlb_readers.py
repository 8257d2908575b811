"""The hugetlb pool readers, on fake sysfs/procfs trees (text only) and on
the running kernel's own files."""

from __future__ import annotations

import os

from thpguard import kernel
from fakekernel import FakeTree

MB2, GB1 = 2 << 20, 1 << 30


def _pool(tree, size, total, free, resv, surp, over, nodes=None):
    d = f"kernel/mm/hugepages/hugepages-{size // 1024}kB"
    for name, value in (("nr_hugepages", total), ("free_hugepages", free),
                        ("resv_hugepages", resv), ("surplus_hugepages", surp),
                        ("nr_overcommit_hugepages", over)):
        tree.write(os.path.join(tree.sys, d, name), f"{value}\n")
    for node, (t, f, s) in (nodes or {}).items():
        nd = f"devices/system/node/node{node}/hugepages/hugepages-{size // 1024}kB"
        for name, value in (("nr_hugepages", t), ("free_hugepages", f), ("surplus_hugepages", s)):
            tree.write(os.path.join(tree.sys, nd, name), f"{value}\n")


def test_pools_per_size_and_node(tmp_path):
    """Pool counts per size and per node, the available pages and the grow command."""
    tree = FakeTree(tmp_path)
    _pool(tree, MB2, 10, 6, 2, 1, 3, {0: (6, 4, 1), 1: (4, 2, 0)})
    _pool(tree, GB1, 1, 1, 0, 0, 0)
    pools = kernel.hugetlb_pools(tree.roots)
    assert sorted(pools) == [MB2, GB1]
    p = pools[MB2]
    assert (p.total, p.free, p.reserved, p.surplus, p.overcommit) == (10, 6, 2, 1, 3)
    # free nobody reserved (6 - 2) + overcommit headroom (3 - 1)
    assert p.available == 6
    assert [(n.node, n.total, n.free, n.surplus) for n in p.nodes] == [(0, 6, 4, 1), (1, 4, 2, 0)]
    assert p.grow_command(8) == "echo 12 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    assert p.grow_command(2) == "echo 10 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    assert kernel.hugetlb_pool(4 << 20, tree.roots) is None
    assert p.as_dict()["available"] == 6


def test_no_hugetlb_at_all(tmp_path):
    """A kernel without hugetlb reads as no sizes, no pools, no cgroup limit."""
    tree = FakeTree(tmp_path)
    assert kernel.hugetlb_sizes(tree.roots) == []
    assert kernel.hugetlb_pools(tree.roots) == {}
    assert not kernel.gigantic_supported(tree.roots)
    assert kernel.hugetlb_cgroup(MB2, roots=tree.roots) is None


def test_gigantic_needs_pool_dir_and_cpu_flag(tmp_path):
    """1 GiB support needs the pool directory and, where cpuinfo says, pdpe1gb."""
    tree = FakeTree(tmp_path)
    _pool(tree, GB1, 0, 0, 0, 0, 0)
    tree.write(os.path.join(tree.proc, "cpuinfo"), "processor\t: 0\nflags\t\t: fpu pse pdpe1gb lm\n")
    assert kernel.gigantic_supported(tree.roots)
    tree.write(os.path.join(tree.proc, "cpuinfo"), "processor\t: 0\nflags\t\t: fpu pse lm\n")
    assert kernel.cpu_has_gigantic_pages(tree.roots) is False
    assert not kernel.gigantic_supported(tree.roots)


def _cgroup_v2(tree, limits):
    tree.write(os.path.join(tree.proc, "self/cgroup"), "0::/app/worker\n")
    tree.write(os.path.join(tree.proc, "self/mountinfo"),
               f"30 25 0:26 / {tree.sys}/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    for rel, (limit, usage) in limits.items():
        d = os.path.join(tree.sys, "fs/cgroup", rel)
        tree.write(os.path.join(d, "hugetlb.2MB.max"), f"{limit}\n")
        tree.write(os.path.join(d, "hugetlb.2MB.current"), f"{usage}\n")


def test_cgroup_v2_tightest_limit_of_the_ancestors(tmp_path):
    """cgroup v2: the tightest hugetlb.<size>.max of the cgroup and its ancestors applies."""
    tree = FakeTree(tmp_path)
    _cgroup_v2(tree, {"app/worker": ("max", 0), "app": (8 << 20, 2 << 20)})
    cg = kernel.hugetlb_cgroup(MB2, roots=tree.roots)
    assert cg is not None and cg.version == 2
    assert (cg.limit_bytes, cg.available_bytes) == (8 << 20, 6 << 20)


def test_cgroup_v2_unlimited(tmp_path):
    """cgroup v2 'max' reads as no limit."""
    tree = FakeTree(tmp_path)
    _cgroup_v2(tree, {"app/worker": ("max", 0)})
    cg = kernel.hugetlb_cgroup(MB2, roots=tree.roots)
    assert cg is not None and cg.limit_bytes is None and cg.available_bytes is None


def test_cgroup_v1_hugetlb_controller(tmp_path):
    """cgroup v1: the hugetlb controller's limit and usage per size."""
    tree = FakeTree(tmp_path)
    tree.write(os.path.join(tree.proc, "self/cgroup"), "7:hugetlb:/batch\n4:memory:/batch\n")
    tree.write(os.path.join(tree.proc, "self/mountinfo"),
               f"35 25 0:31 / {tree.sys}/fs/cgroup/hugetlb rw - cgroup cgroup rw,hugetlb\n")
    d = os.path.join(tree.sys, "fs/cgroup/hugetlb/batch")
    tree.write(os.path.join(d, "hugetlb.1GB.limit_in_bytes"), f"{2 << 30}\n")
    tree.write(os.path.join(d, "hugetlb.1GB.usage_in_bytes"), f"{1 << 30}\n")
    cg = kernel.hugetlb_cgroup(GB1, roots=tree.roots)
    assert cg is not None and cg.version == 1 and cg.available_bytes == 1 << 30
    assert kernel.hugetlb_cgroup(MB2, roots=tree.roots) is None


def test_meminfo_and_capabilities_on_this_host():
    """On this host the readers agree with capabilities() and a missing controller reads as None."""
    info = kernel.hugetlb_meminfo()
    sizes = kernel.hugetlb_sizes()
    if not sizes:
        assert not kernel.capabilities().hugetlb.available
        return
    assert "HugePages_Total" in info and "HugePages_Free" in info
    caps = kernel.capabilities()
    assert list(caps.hugetlb_sizes) == sizes
    assert caps.as_dict()["hugetlb_sizes"] == sizes
    assert caps.hugetlb_gigantic.available == kernel.gigantic_supported()
    # this host's cgroup setup has no hugetlb controller: absence reads as None
    cg = kernel.hugetlb_cgroup(sizes[0])
    assert cg is None or cg.page_size == sizes[0]


def test_shortfall_names_the_pool_command_or_the_cgroup(tmp_path, monkeypatch):
    """What alloc() and the fork check say when pages cannot be had."""
    from thpguard.backends import pool_shortfall

    tree = FakeTree(tmp_path)
    _pool(tree, MB2, 10, 10, 0, 0, 0)
    _cgroup_v2(tree, {"app/worker": (4 << 20, 0)})
    monkeypatch.setenv("THPGUARD_SYSFS_ROOT", tree.sys)
    monkeypatch.setenv("THPGUARD_PROC_ROOT", tree.proc)
    assert pool_shortfall(MB2, 2) is None
    msg = pool_shortfall(MB2, 3)
    assert "hugetlb cgroup" in msg and "raise its limit" in msg
    msg = pool_shortfall(MB2, 11)
    assert "echo 11 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages" in msg
    assert "no 1 GiB hugetlb pool" in pool_shortfall(GB1, 1)
