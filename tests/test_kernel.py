"""thpguard.kernel: sysfs and /proc parsers against fake trees, and a few
checks against this host's real files."""

import errno
import json
import logging
import os
import platform
import subprocess
import sys

import pytest

from thpguard import _checks, _cliverify, kernel
from fakekernel import SMAPS_ANON, SMAPS_FILE, FakeNative, FakeTree
from conftest import skip_thp

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _fresh_warnings():
    kernel.reset_warnings()
    kernel.registry.clear()
    yield
    kernel.registry.reset()


def use_native(monkeypatch, native):
    kernel.registry.set_native(native)


# -- THP settings ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["always", "madvise", "never"])
def test_enabled_and_defrag_modes(tmp_path, mode):
    """The bracketed value of enabled/defrag is read for every mode."""
    t = FakeTree(tmp_path, enabled=mode, defrag="defer+madvise")
    assert kernel.thp_mode("enabled", t.roots) == mode
    assert kernel.thp_mode("defrag", t.roots) == "defer+madvise"


def test_mode_missing_file_is_none_and_warns_once(tmp_path, caplog):
    """A kernel without THP gives None for each mode and one warning per file."""
    t = FakeTree(tmp_path, thp=False)
    with caplog.at_level(logging.WARNING, logger="thpguard.kernel"):
        assert kernel.thp_mode("enabled", t.roots) is None
        assert kernel.thp_mode("enabled", t.roots) is None
    assert len([r for r in caplog.records if "enabled" in r.getMessage()]) == 1


def test_mode_garbage_is_none(tmp_path):
    """A choice file without brackets and with several words reads as None."""
    t = FakeTree(tmp_path)
    t.write(f"{t.thp}/enabled", "always madvise never\n")
    assert kernel.thp_mode("enabled", t.roots) is None
    t.write(f"{t.thp}/enabled", "")
    assert kernel.thp_mode("enabled", t.roots) is None
    t.write(f"{t.thp}/enabled", "\xff\xfe[madv")
    assert kernel.thp_mode("enabled", t.roots) is None


def test_pmd_size_read(tmp_path):
    """hpage_pmd_size gives the PMD size in bytes, also when it is not 2 MiB."""
    assert kernel.pmd_size(FakeTree(tmp_path / "a").roots) == 2 * MiB
    assert kernel.pmd_size(FakeTree(tmp_path / "b", pmd=512 * MiB).roots) == 512 * MiB


def test_pmd_size_missing_falls_back_on_x86_64_only(tmp_path, monkeypatch, caplog):
    """Before 4.16 there is no hpage_pmd_size: x86-64 assumes 2 MiB and says so."""
    t = FakeTree(tmp_path, pmd=None)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with caplog.at_level(logging.WARNING, logger="thpguard.kernel"):
        assert kernel.pmd_size(t.roots) == 2 * MiB
    assert "assuming 2 MiB" in caplog.text
    kernel.reset_warnings()
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert kernel.pmd_size(t.roots) is None


def test_pmd_size_garbage_or_no_thp(tmp_path):
    """A non-power-of-two or non-number is None; no THP directory at all is None."""
    t = FakeTree(tmp_path / "a")
    for bad in ("3000000\n", "banana\n", "0\n", "-2097152\n"):
        t.write(f"{t.thp}/hpage_pmd_size", bad)
        assert kernel.pmd_size(t.roots) is None
    assert kernel.pmd_size(FakeTree(tmp_path / "b", thp=False).roots) is None


def test_mthp_sizes(tmp_path):
    """Per-size directories map to their enabled value; shmem-only sizes are left out."""
    t = FakeTree(tmp_path, mthp={2048: "inherit", 64: "always", 16: "never"})
    os.makedirs(f"{t.thp}/hugepages-8kB")  # shmem-only: no "enabled"
    assert kernel.mthp_sizes(t.roots) == {16384: "never", 65536: "always", 2 * MiB: "inherit"}


def test_mthp_old_kernel_is_empty(tmp_path):
    """Kernels before 6.8 have no per-size directories: an empty dict."""
    assert kernel.mthp_sizes(FakeTree(tmp_path, mthp={}).roots) == {}
    assert kernel.mthp_sizes(FakeTree(tmp_path / "x", thp=False).roots) == {}


def test_khugepaged_missing_and_garbage(tmp_path):
    """Missing or non-numeric tunables are None; present ones are ints."""
    t = FakeTree(tmp_path)
    os.unlink(f"{t.thp}/khugepaged/max_ptes_shared")  # before 5.8
    t.write(f"{t.thp}/khugepaged/pages_to_scan", "lots\n")
    k = kernel.khugepaged_settings(t.roots)
    assert k["max_ptes_shared"] is None and k["pages_to_scan"] is None
    assert k["scan_sleep_millisecs"] == 10000
    assert set(k) == set(kernel.KHUGEPAGED_FIELDS)


def test_set_test_roots(tmp_path, monkeypatch):
    """kernel.set_test_roots redirects every reader (the explicit test seam)."""
    t = FakeTree(tmp_path, enabled="always")
    monkeypatch.setattr(kernel._files, "_test_roots", None)
    kernel.set_test_roots(t.roots)
    assert kernel.thp_mode("enabled") == "always"
    assert kernel.kernel_release() == "6.18.0-fake"
    assert not kernel.Roots.from_env().is_real


# -- /proc -------------------------------------------------------------------


def test_read_smaps_fields(tmp_path):
    """Each VMA has its range, perms, path, sizes in bytes, THPeligible and VmFlags."""
    t = FakeTree(tmp_path)
    vmas = kernel.read_smaps("self", t.roots)
    assert len(vmas) == 2
    f, a = vmas
    assert f.path == "/usr/bin/cat" and f.thp_eligible is False and f.perms == "r--p"
    assert a.start == 0x7F0000000000 and a.size == 8 * MiB and a.path == ""
    assert a.rss == 8 * MiB and a.anon_huge_bytes == 6 * MiB
    assert a.thp_eligible is True and a.advised_huge and "ac" in a.vm_flags


def test_read_smaps_old_kernel_and_garbage(tmp_path, caplog):
    """No THPeligible (before 4.15) is None; unknown lines are skipped with one warning."""
    t = FakeTree(tmp_path)
    old = SMAPS_ANON.replace("THPeligible:    1\n", "").replace("VmFlags: rd wr mr mw me ac hg\n", "")
    garbage = "not a line\x00\nRss: lots kB\n" + SMAPS_FILE + "Weird: 1 2 3\nAlsoWeird\n"
    t.process("77", smaps=garbage + old[: len(old) - 5])  # truncated too
    with caplog.at_level(logging.WARNING, logger="thpguard.kernel"):
        vmas = kernel.read_smaps(77, t.roots)
    assert [v.path for v in vmas] == ["/usr/bin/cat", ""]
    assert vmas[1].thp_eligible is None and vmas[1].vm_flags == []
    assert vmas[1].anon_huge_bytes == 6 * MiB
    assert caplog.text.count("does not understand") == 1


def test_read_smaps_missing_process_raises(tmp_path):
    """A process that is gone raises FileNotFoundError, so callers can say so."""
    t = FakeTree(tmp_path)
    with pytest.raises(FileNotFoundError):
        kernel.read_smaps(424242, t.roots)


def test_read_status(tmp_path):
    """THP_enabled, Threads, PPid and CapEff are parsed; a missing THP_enabled is None."""
    t = FakeTree(tmp_path)
    t.process("5", thp_enabled=0, threads=7, ppid=3)
    st = kernel.read_status(5, t.roots)
    assert st.thp_enabled is False and st.threads == 7 and st.ppid == 3 and st.cap_eff == 0x1FFFFFFFFFF
    t.process("6", thp_enabled=None)  # kernels before 5.0
    assert kernel.read_status(6, t.roots).thp_enabled is None


def test_read_vmstat_only_thp(tmp_path):
    """Only thp_* counters, as ints; garbage lines are ignored."""
    t = FakeTree(tmp_path)
    t.write(f"{t.proc}/vmstat", "nr_free_pages 1\nthp_split_pmd 2\nthp_broken x\nthp_fault_alloc 3 4\n")
    assert kernel.read_vmstat(t.roots) == {"thp_split_pmd": 2}
    os.unlink(f"{t.proc}/vmstat")
    assert kernel.read_vmstat(t.roots) == {}


def test_buddyinfo_free_huge_bytes(tmp_path):
    """Free memory in blocks of order >= 9 (2 MiB with 4 KiB pages) is summed over zones."""
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        pytest.skip("order arithmetic below assumes 4 KiB pages")
    t = FakeTree(tmp_path)
    t.buddyinfo([100, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3])
    zones = kernel.read_buddyinfo(t.roots)
    assert [z.zone for z in zones] == ["DMA", "Normal"]
    # DMA: order 9: 1, order 10: 3 ; Normal: order 9: 2, order 10: 3
    assert kernel.free_huge_bytes(t.roots) == (1 + 2) * 2 * MiB + (3 + 3) * 4 * MiB
    t.write(f"{t.proc}/buddyinfo", "garbage\nNode 0, zone Normal 1 x 3\n")
    assert kernel.free_huge_bytes(t.roots) is None


def test_memory_cgroup_v1(tmp_path):
    """v1: the memory controller's limit (hierarchical if lower) and usage."""
    t = FakeTree(tmp_path)
    d = f"{t.sys}/fs/cgroup/memory/svc/a"
    t.write(f"{d}/memory.limit_in_bytes", "9223372036854771712\n")
    t.write(f"{d}/memory.usage_in_bytes", f"{100 * MiB}\n")
    t.write(f"{d}/memory.stat", f"cache 0\nhierarchical_memory_limit {512 * MiB}\n")
    t.process("self", cgroup="4:memory:/svc/a\n3:cpu:/\n0::/\n",
              mountinfo="35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n")
    cg = kernel.memory_cgroup("self", t.roots)
    assert cg.version == 1 and cg.path == "/svc/a"
    assert cg.limit_bytes == 512 * MiB and cg.usage_bytes == 100 * MiB
    assert cg.available_bytes == 412 * MiB


def test_memory_cgroup_v1_unlimited(tmp_path):
    """v1 without any limit reads limit None (the huge PAGE_COUNTER_MAX value)."""
    t = FakeTree(tmp_path)
    d = f"{t.sys}/fs/cgroup/memory/x"
    t.write(f"{d}/memory.limit_in_bytes", "9223372036854771712\n")
    t.write(f"{d}/memory.usage_in_bytes", "4096\n")
    t.process("self", cgroup="4:memory:/x\n")  # no mountinfo: conventional path
    cg = kernel.memory_cgroup("self", t.roots)
    assert cg.limit_bytes is None and cg.available_bytes is None and cg.usage_bytes == 4096


def test_memory_cgroup_v2_ancestor_limit(tmp_path):
    """v2: the lowest memory.max among the cgroup and its ancestors applies."""
    t = FakeTree(tmp_path)
    base = f"{t.sys}/fs/cgroup"
    t.write(f"{base}/svc/memory.max", f"{256 * MiB}\n")
    t.write(f"{base}/svc/web/memory.max", "max\n")
    t.write(f"{base}/svc/web/memory.current", f"{10 * MiB}\n")
    t.process("self", cgroup="0::/svc/web\n",
              mountinfo="30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n")
    cg = kernel.memory_cgroup("self", t.roots)
    assert cg.version == 2 and cg.limit_bytes == 256 * MiB and cg.usage_bytes == 10 * MiB
    assert cg.limit_file.endswith("svc/memory.max")


HYBRID_CGROUP = ("12:pids:/user.slice\n4:memory:/process_api/abc\n3:cpu,cpuacct:/\n"
                 "1:name=systemd:/user.slice/session-1.scope\n0::/\n")


@pytest.mark.parametrize("text,expected", [
    ("0::/system.slice/redis.service\n", "/system.slice/redis.service"),  # v2 only
    ("4:memory:/svc/a\n3:cpu:/\n", "/svc/a"),  # v1 only
    (HYBRID_CGROUP, "/process_api/abc"),  # hybrid: memory is v1, the v2 tree says "/"
    ("0::/\n5:hugetlb,memory:/b\n", "/b"),  # co-mounted controllers, any order
    ("garbage\n7:memory\n0::/x\n", "/x"),  # lines it does not understand are skipped
])
def test_cgroup_path_formats(tmp_path, monkeypatch, text, expected):
    """The cgroup shown for a process is the one that governs its memory, in
    every /proc/PID/cgroup format (v1 N:memory:/path, v2 0::/path, and a
    hybrid host that has both); through kernel.set_test_roots as status does."""
    from thpguard import _procmap
    t = FakeTree(tmp_path)
    t.process(4242, cgroup=text)
    monkeypatch.setattr(kernel._files, "_test_roots", None)
    kernel.set_test_roots(t.roots)
    try:
        assert kernel.cgroup_path(4242) == expected
        assert _procmap.cgroup_of(4242) == expected
    finally:
        kernel.set_test_roots(None)


def test_status_shows_the_memory_cgroup_on_a_hybrid_host(tmp_path, monkeypatch, capsys):
    """`thpguard status --json` of a process on a hybrid host names its v1
    memory cgroup, not the v2 root "/"."""
    from thpguard import cli
    t = FakeTree(tmp_path)
    t.process(4242, cgroup=HYBRID_CGROUP)
    t.write(f"{t.proc}/4242/stat", "4242 (fake) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n")
    t.write(f"{t.proc}/4242/pagemap", "")  # PAGEMAP_SCAN: ENOTTY, so smaps is read
    monkeypatch.setattr(kernel._files, "_test_roots", None)
    kernel.set_test_roots(t.roots)
    try:
        rc = cli.main(["status", "--json", "4242"])
    finally:
        kernel.set_test_roots(None)
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    assert doc["processes"][0]["cgroup"] == "/process_api/abc"


def test_memory_cgroup_none(tmp_path):
    """No memory controller (v2 without memory.current, or no cgroup file): None."""
    t = FakeTree(tmp_path)
    t.process("self", cgroup="0::/\n")
    assert kernel.memory_cgroup("self", t.roots) is None
    os.unlink(f"{t.proc}/self/cgroup")
    assert kernel.memory_cgroup("self", t.roots) is None


# -- capabilities --------------------------------------------------------------


def test_capabilities_new_kernel(tmp_path, monkeypatch):
    """A 6.18-like kernel: every probe works, direct COW absent."""
    t = FakeTree(tmp_path)
    use_native(monkeypatch, FakeNative())
    c = kernel.capabilities(roots=t.roots)
    assert c.collapse.available and c.pagemap_scan.available and c.populate_write.available
    assert c.process_madvise.available
    assert not c.direct_cow.available and "not merged" in c.direct_cow.reason
    assert c.pmd_size == 2 * MiB and c.enabled == "madvise" and c.thp_disable == 0
    assert kernel.capabilities(roots=t.roots) is c
    assert kernel.capabilities(refresh=True, roots=t.roots) is not c


@pytest.mark.parametrize("move, expected", [
    (True, "copy: 2 MiB block copies by userfaultfd (UFFDIO_MOVE)"),
    (False, "copy: 2 MiB block copies by userfaultfd (mremap: one VMA per copied block)"),
    (None, "copy: the whole region at fork (no userfaultfd: "),
])
def test_direct_cow_line_says_what_each_policy_does(tmp_path, monkeypatch, move, expected):
    """Without direct COW, verify's line says in one sentence what share and
    copy do instead: splits re-collapsed, and the copy's mechanism."""
    t = FakeTree(tmp_path)
    probe = None if move is None else {"stage": "ok", "errno": 0, "source": "syscall",
                                       "user_mode_only": False, "move": move}
    use_native(monkeypatch, FakeNative(copy_probe=probe))
    c = kernel.capabilities(roots=t.roots)
    check = _checks.check_direct_cow(_checks.HostContext(c, t.roots))
    assert check.status == _checks.NA
    assert check.detail.startswith(f"{c.direct_cow.reason}; share: splits re-collapsed; {expected}")
    assert "instead" not in check.detail


def test_capabilities_old_kernel(tmp_path, monkeypatch):
    """A 5.15-like kernel: no MADV_COLLAPSE, PAGEMAP_SCAN gives ENOTTY; reasons name versions."""
    t = FakeTree(tmp_path, mthp={})
    use_native(monkeypatch, FakeNative(known=(14, 23), scan_errno=errno.ENOTTY))
    c = kernel.capabilities(roots=t.roots)
    assert not c.collapse.available and "6.1" in c.collapse.reason
    assert not c.pagemap_scan.available and "6.7" in c.pagemap_scan.reason
    assert c.populate_write.available


def test_capabilities_prctl_disabled(tmp_path, monkeypatch):
    """A THP-disabled process is told apart from a kernel without MADV_COLLAPSE."""
    t = FakeTree(tmp_path)
    use_native(monkeypatch, FakeNative(collapse_errno=errno.EINVAL, thp_disable=1))
    c = kernel.capabilities(roots=t.roots)
    assert not c.collapse.available and "THP-disabled" in c.collapse.reason
    ok, why = kernel.can_get_huge_pages(c)
    assert not ok and "prctl" in why


def test_capabilities_direct_cow(tmp_path, monkeypatch):
    """thp_cow sysfs, MADV_THP_COW setting the tc VmFlag and thp_cow_* counters
    make direct_cow available with its mode."""
    t = FakeTree(tmp_path, thp_cow="madvise")
    use_native(monkeypatch, FakeNative(known=(14, 23, 25, 257), tc_tree=t))
    c = kernel.capabilities(roots=t.roots)
    assert c.direct_cow.available and "madvise" in c.direct_cow.reason and c.thp_cow == "madvise"
    assert kernel.direct_cow_interface(t.roots, refresh=True).available
    t.set_mode("thp_cow", "never")
    c = kernel.capabilities(refresh=True, roots=t.roots)
    assert not c.direct_cow.available and c.direct_cow.reason == "thp_cow is never"
    check = _checks.check_direct_cow(_checks.HostContext(c, t.roots))
    assert check.status == _checks.WARN and check.fix == (os.path.join(t.thp, "thp_cow"), "madvise")


@pytest.mark.parametrize("what", ["no tc VmFlag", "no counters"])
def test_capabilities_other_thp_cow_is_not_direct_cow(tmp_path, monkeypatch, what):
    """A kernel with its own thp_cow file and another meaning for advice 257
    (no tc VmFlag, or no thp_cow_* counters) is never taken for direct COW,
    and verify --fix does not write its thp_cow."""
    t = FakeTree(tmp_path, thp_cow="never")
    if what == "no tc VmFlag":
        native = FakeNative(known=(14, 23, 25, 257))
        expected = "tc VmFlag"
    else:
        native = FakeNative(known=(14, 23, 25, 257), tc_tree=t)
        t.write(f"{t.proc}/vmstat", "thp_fault_alloc 5\nthp_split_pmd 2\n")
        expected = "thp_cow_*"
    use_native(monkeypatch, native)
    c = kernel.capabilities(roots=t.roots)
    assert not c.direct_cow.available
    assert "not the direct-COW interface" in c.direct_cow.reason and expected in c.direct_cow.reason
    assert not kernel.direct_cow_interface(t.roots, refresh=True).available
    check = _checks.check_direct_cow(_checks.HostContext(c, t.roots))
    assert check.status == _checks.NA and check.fix is None
    # Even handed a fix for it, --fix refuses to write that file.
    path = os.path.join(t.thp, "thp_cow")
    planted = _checks.Check("direct_cow", "direct COW", _checks.WARN, "x", "y", (path, "madvise"))
    entries = _cliverify._apply_fixes([planted], True, t.roots)
    assert entries and "not the direct-COW interface" in entries[0]["error"]
    with open(path) as f:
        assert kernel._bracketed(f.read()) == "never"


def test_capabilities_without_native(tmp_path, monkeypatch):
    """Without the native module every feature is unavailable, saying why."""
    t = FakeTree(tmp_path)
    kernel.registry.set_native(None, "native module not available (x)")
    c = kernel.capabilities(roots=t.roots)
    assert all(not f.available and "native" in f.reason for f in c.features.values())


def test_as_dict_is_json_ready_and_sorted(tmp_path, monkeypatch):
    """as_dict() serialises to JSON with sorted keys at every level."""
    t = FakeTree(tmp_path)
    use_native(monkeypatch, FakeNative())
    d = kernel.capabilities(roots=t.roots).as_dict()
    assert json.loads(json.dumps(d)) == d
    assert list(d) == sorted(d) and list(d["features"]) == sorted(d["features"])
    assert d["features"]["collapse"]["available"] is True and d["mthp"]["2097152"] == "inherit"


@pytest.mark.parametrize("enabled,pmd_mode,collapse,expect", [
    ("madvise", "inherit", True, True),
    ("always", "inherit", False, True),
    ("never", "inherit", True, True),  # MADV_COLLAPSE ignores "never"
    ("never", "inherit", False, False),
    ("madvise", "never", False, False),
    ("never", "always", False, True),  # the per-size setting overrides the global one
    ("never", "madvise", False, True),
])
def test_can_get_huge_pages(tmp_path, monkeypatch, enabled, pmd_mode, collapse, expect):
    """THP never without collapse, or a PMD size set to never, means no huge pages."""
    t = FakeTree(tmp_path, enabled=enabled, mthp={2048: pmd_mode})
    use_native(monkeypatch, FakeNative(known=(14, 23, 25) if collapse else (14, 23)))
    ok, why = kernel.can_get_huge_pages(kernel.capabilities(roots=t.roots))
    assert ok is expect
    if not ok:
        assert "never" in why


def test_can_get_huge_pages_unknown_pmd(tmp_path, monkeypatch):
    """An unknown PMD size is a clear no."""
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    t = FakeTree(tmp_path, pmd=None)
    use_native(monkeypatch, FakeNative())
    ok, why = kernel.can_get_huge_pages(kernel.capabilities(roots=t.roots))
    assert not ok and "PMD" in why


def test_except_advised_flag_is_not_fully_disabled(tmp_path, monkeypatch):
    """6.18 PR_THP_DISABLE_EXCEPT_ADVISED (get returns 3) still allows advised huge pages."""
    t = FakeTree(tmp_path)
    use_native(monkeypatch, FakeNative(thp_disable=3))
    c = kernel.capabilities(roots=t.roots)
    assert c.thp_disabled_except_advised and not c.thp_disabled_completely
    assert kernel.can_get_huge_pages(c)[0]


# -- the real host ------------------------------------------------------------------


def test_real_host_settings():
    """This host's sysfs parses: a mode for enabled/defrag and a power-of-two PMD size."""
    if not os.path.isdir("/sys/kernel/mm/transparent_hugepage"):
        skip_thp("no THP on this kernel (no /sys/kernel/mm/transparent_hugepage)")
    roots = kernel.Roots()
    assert kernel.thp_mode("enabled", roots) in ("always", "madvise", "never")
    assert kernel.thp_mode("defrag", roots) in ("always", "defer", "defer+madvise", "madvise", "never")
    size = kernel.pmd_size(roots)
    assert size and size & (size - 1) == 0
    assert kernel.kernel_release(roots) == os.uname().release


def test_real_smaps_matches_our_own_mapping():
    """An anonymous mmap of ours shows up in our own smaps with its exact size."""
    import mmap
    import ctypes

    m = mmap.mmap(-1, 3 * MiB)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        vmas = kernel.read_smaps("self", kernel.Roots())
        hit = [v for v in vmas if v.start <= addr < v.end]
        assert len(hit) == 1 and hit[0].fields.get("Size", 0) >= 3 * MiB
        assert all(v.vm_flags for v in vmas)
    finally:
        del addr
        import gc

        gc.collect()


def test_real_status_and_vmstat():
    """Our own status has Threads >= 1; vmstat has thp_split_pmd on any THP kernel."""
    st = kernel.read_status("self", kernel.Roots())
    assert st.threads >= 1 and st.ppid == os.getppid()
    if os.path.isdir("/sys/kernel/mm/transparent_hugepage"):
        assert "thp_split_pmd" in kernel.read_vmstat(kernel.Roots())


def _probe_under_prctl(flags):
    from thpguard import _native

    _native.thp_disable_set(1, flags)
    kernel.registry.clear()
    c = kernel.capabilities(refresh=True, roots=kernel.Roots())
    st = kernel.read_status("self", kernel.Roots())
    return (c.thp_disable, st.thp_enabled, c.collapse.available, c.collapse.reason,
            kernel.can_get_huge_pages(c)[0])


def test_real_prctl_disable_is_detected(require_thp):
    """In a child THP-disabled by prctl, the probe reports it and MADV_COLLAPSE is refused."""
    from conftest import run_in_child

    raw, status_enabled, collapse, reason, ok = run_in_child(_probe_under_prctl, 0)
    assert raw == 1 and status_enabled is False
    assert not collapse and "THP-disabled" in reason and not ok


def test_real_prctl_except_advised(require_thp):
    """6.18: with PR_THP_DISABLE_EXCEPT_ADVISED, PR_GET returns 3, status still says
    THP_enabled 1, and MADV_COLLAPSE works on an advised block."""
    from conftest import run_in_child

    try:
        raw, status_enabled, collapse, reason, ok = run_in_child(_probe_under_prctl, 2)
    except AssertionError as exc:
        if "EINVAL" in str(exc) or "Invalid argument" in str(exc):
            pytest.skip("kernel older than 6.18: no PR_THP_DISABLE_EXCEPT_ADVISED")
        raise
    assert raw == 3 and status_enabled is True
    assert collapse and ok, reason


FD_STARVED_PROBE = r"""
import os, resource, thpguard
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, hard), hard))
junk = []
try:
    while True:
        junk.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
starved = thpguard.capabilities()
for fd in junk:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
after = thpguard.capabilities()
print(starved.collapse.available, after.collapse.available, after.pagemap_scan.available)
"""


def test_capabilities_probed_without_file_descriptors_are_not_cached():
    """A probe that ran out of file descriptors is asked again later, not remembered for the process's life."""
    truth = kernel.capabilities(refresh=True)
    done = subprocess.run([sys.executable, "-c", FD_STARVED_PROBE], capture_output=True, text=True,
                          timeout=120)
    starved, collapse, scan = done.stdout.split()
    assert (collapse, scan) == (str(truth.collapse.available), str(truth.pagemap_scan.available)), done.stderr
