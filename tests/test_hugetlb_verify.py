"""thpguard verify's hugetlb checks: fake trees for the pool arithmetic and
--fix, the real kernel for the one-page test mapping."""

from __future__ import annotations

import json
import os

import pytest

from thpguard import cli, kernel
from fakekernel import FakeNative, FakeTree
from test_cli import validate
from test_hugetlb_readers import _pool

MB2, GB1 = 2 << 20, 1 << 30


@pytest.fixture
def fake(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    monkeypatch.setattr(kernel._files, "_test_roots", t.roots)
    kernel.registry.set_native(FakeNative())
    yield t
    kernel.registry.reset()


def verify(capsys, *argv):
    code = cli.main(["verify", "--json", "--skip-selftest", *argv])
    doc = json.loads(capsys.readouterr().out)
    validate(doc)
    return code, {c["name"]: c for c in doc["checks"]}, doc


def nr(t, size):
    with open(os.path.join(t.sys, f"kernel/mm/hugepages/hugepages-{size // 1024}kB/nr_hugepages")) as f:
        return int(f.read())


def test_empty_pools_are_not_failures(fake, capsys):
    """Empty pools are n/a with advice and no fix: the hugetlb backend is opt-in."""
    _pool(fake, MB2, 0, 0, 0, 0, 0, {0: (0, 0, 0)})
    _pool(fake, GB1, 0, 0, 0, 0, 0)
    code, checks, doc = verify(capsys)
    assert code == 0
    assert checks["hugetlb_pool_pmd"]["status"] == "n/a"
    assert "echo N >" in checks["hugetlb_pool_pmd"]["advice"]
    assert checks["hugetlb_pool_pmd"]["fix"] is None
    assert checks["hugetlb_pool_gigantic"]["status"] == "n/a"
    assert checks["hugetlb_cgroup"]["status"] == "n/a"
    assert checks["hugetlb_test_map"]["status"] == "n/a"  # never on a fake tree
    assert doc["capabilities"]["hugetlb_sizes"] == [MB2, GB1]


def test_pool_counts_per_node_in_the_detail(fake, capsys):
    """The pool check shows the available pages and each node's share."""
    _pool(fake, MB2, 8, 5, 1, 0, 2, {0: (4, 3, 0), 1: (4, 2, 0)})
    _, checks, _ = verify(capsys)
    c = checks["hugetlb_pool_pmd"]
    assert c["status"] == "ok" and c["detail"].startswith("6 available")
    assert "node0 3/4 free" in c["detail"] and "node1 2/4 free" in c["detail"]


def test_fix_never_grows_a_pool_unless_asked(fake, capsys, monkeypatch):
    """verify --fix grows a pool only when --hugetlb-pool asks, by what is missing."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # --fix refuses fake roots (it writes only the real /sys): let it write this tree.
    monkeypatch.setattr(kernel.Roots, "is_real", property(lambda self: True))
    _pool(fake, MB2, 1, 1, 0, 0, 0)
    verify(capsys, "--fix")
    assert nr(fake, MB2) == 1
    code, checks, doc = verify(capsys, "--fix", "--hugetlb-pool", "4")
    assert nr(fake, MB2) == 4  # 1 page there, 3 more wanted
    assert [f["check"] for f in doc["fixes"]] == ["hugetlb_pool_pmd"]
    assert checks["hugetlb_pool_pmd"]["status"] == "warn"  # the fake kernel frees nothing


def test_fix_never_grows_a_pool_beyond_the_available_memory(fake, capsys, monkeypatch):
    """--hugetlb-pool asking for more than MemAvailable fails with no fix: the kernel would take all memory."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # --fix refuses fake roots (it writes only the real /sys): let it write this tree.
    monkeypatch.setattr(kernel.Roots, "is_real", property(lambda self: True))
    _pool(fake, MB2, 1, 1, 0, 0, 0)
    fake.write(os.path.join(fake.proc, "meminfo"), "MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n")
    code, checks, doc = verify(capsys, "--fix", "--hugetlb-pool", "100000000")
    c = checks["hugetlb_pool_pmd"]
    assert nr(fake, MB2) == 1 and doc["fixes"] == []
    assert c["status"] == "fail" and c["fix"] is None and "MemAvailable" in c["detail"]
    code, checks, doc = verify(capsys, "--fix", "--hugetlb-pool", "4")
    assert nr(fake, MB2) == 4  # 6 MiB more fits in 4 GiB


def test_wanted_pages_and_bad_page_size(fake, capsys):
    """--hugetlb-pool sets what the pool must hold; an unknown page size is a usage error."""
    _pool(fake, MB2, 2, 2, 0, 0, 0)
    code, checks, _ = verify(capsys, "--hugetlb-pool", "2")
    assert checks["hugetlb_pool_pmd"]["status"] == "ok"
    code, checks, _ = verify(capsys, "--hugetlb-pool", "3")
    c = checks["hugetlb_pool_pmd"]
    assert c["status"] == "warn" and c["fix"]["value"] == "3"
    assert cli.main(["verify", "--skip-selftest", "--hugetlb-page-size", "4M"]) == 2
    assert "no such hugetlb pool" in capsys.readouterr().err


def test_no_hugetlb_kernel(fake, capsys):
    """A kernel without hugetlb gets one n/a line."""
    _, checks, _ = verify(capsys)
    assert checks["hugetlb"]["status"] == "n/a" and "no hugetlb pools" in checks["hugetlb"]["detail"]


def test_one_page_test_mapping_on_this_host(hugepool, capsys):
    """The one-page test mapping runs only with --hugetlb-pool (plain verify
    never takes a free page others may count on), works here and gives its
    page back."""
    if kernel.pmd_size() not in kernel.hugetlb_sizes():
        pytest.skip("no hugetlb pool of the PMD size")
    hugepool(1)
    free = kernel.hugetlb_meminfo()["HugePages_Free"]
    _, checks, _ = verify(capsys)
    c = checks["hugetlb_test_map"]
    assert c["status"] == "n/a" and "--hugetlb-pool" in c["detail"]
    _, checks, _ = verify(capsys, "--hugetlb-pool", "1")
    c = checks["hugetlb_test_map"]
    assert c["status"] == "ok" and "KernelPageSize 2M" in c["detail"]
    assert kernel.hugetlb_meminfo()["HugePages_Free"] == free  # unmapped again
