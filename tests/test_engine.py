"""The engine's one answer to each question, checked against the kernel's ground truth.

Each test pins a place where two parts of thpguard used to disagree: the
block model (coverage, status, the C library), the repair engine (EINVAL
scoped to the block), processes that may not open their own page map, the
capability registry, the native contract and ``verify`` without the native
module.
"""

import ctypes
import errno
import json
import os
import re
import subprocess
import sys
import time

import pytest

import thpguard
from thpguard import _native, _procmap, blocks, kernel, pagemap
from thpguard.guard import state_of

from conftest import (
    has_pagemap_scan,
    run_in_child,
    sharer,
    smaps_huge_bytes,
    smaps_vma,
    wait_until,
)

MADV_DONTNEED = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def require_scan(require_thp):
    if not has_pagemap_scan():
        pytest.skip("per-block detail needs PAGEMAP_SCAN (Linux 6.7)")


def _status_vma(address):
    pc = _procmap.scan_process(os.getpid())
    return next(v for v in pc.vmas if v.start <= address < v.end)


def _one_page_block(region, pmd):
    """Leave one 4 KiB page of data in the first block (the rest freed)."""
    _native.madvise(region.address + 4096, pmd - 4096, MADV_DONTNEED)


# -- one block model ---------------------------------------------------------------------


def test_mostly_empty_block_is_partial_everywhere(require_scan, region_factory, pmd):
    """A block holding one 4 KiB page is 'partial' (not split, not huge) in
    coverage(), in thpguard status and in smaps alike."""
    region = region_factory(2 * pmd)
    for _ in range(5):
        _one_page_block(region, pmd)
        cov = region.coverage()
        vma = _status_vma(region.address)
        truth = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
        if truth == pmd:
            break  # khugepaged (max_ptes_none 511) did not fill the block between the reads
    assert cov.blocks.kind(region.address) == blocks.PARTIAL
    assert cov.blocks.partial == {region.address: pmd // 4096 - 1}
    assert cov.split_blocks == 0 and cov.partial_blocks == 1
    assert vma.split_blocks == 0 and vma.partial_blocks == 1
    assert cov.huge_bytes == vma.huge_bytes == truth == pmd


def test_mostly_empty_block_follows_max_ptes_none(require_scan, require_collapse, region_factory,
                                                  pmd):
    """collapse() repairs a partial block only where khugepaged's
    max_ptes_none would (511 empty pages here allowed by the default)."""
    region = region_factory(2 * pmd)
    _one_page_block(region, pmd)
    limit = kernel.khugepaged_settings()["max_ptes_none"]
    result = region.collapse()
    truth = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
    if limit is not None and limit >= pmd // 4096 - 1:
        assert result.attempted_bytes == pmd and truth == region.size
    else:
        assert result.attempted_bytes == 0 and truth == pmd


def test_huge_zero_page_is_not_huge_in_python_or_c(require_scan, pmd):
    """A block read before any write maps the huge zero page: no data, so
    neither coverage() nor tg_huge_bytes count it as huge (smaps agrees)."""
    addr = _native.map_aligned(2 * pmd, pmd)
    try:
        _native.madvise(addr, 2 * pmd, _native.MADV_HUGEPAGE)
        _native.madvise(addr, pmd, _native.MADV_POPULATE_READ)
        ctypes.c_char.from_address(addr + pmd).value = b"x"  # block 2: a real THP
        cov = pagemap.coverage(addr, addr + 2 * pmd, pmd)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            c_huge, c_present = _native.huge_bytes(fd, addr, addr + 2 * pmd)
        finally:
            os.close(fd)
        truth = smaps_huge_bytes(os.getpid(), addr, addr + 2 * pmd)
        assert cov.blocks.kind(addr) in (blocks.ZERO, blocks.ABSENT)
        assert cov.blocks.kind(addr + pmd) == blocks.HUGE
        assert cov.huge_bytes == c_huge == truth == pmd
        assert c_present == cov.present_bytes
        assert cov.blocks.absent() == [addr]
    finally:
        _native.unmap(addr, 2 * pmd)


def test_split_blocks_is_a_count_in_every_type(split_and_repair, region_factory, pmd):
    """split_blocks is an int in Coverage and in status's VMA; the addresses
    have their own name; huge bytes are called huge_bytes in both."""
    region = region_factory(2 * pmd)
    with sharer():  # shares until the block ends: the write splits
        region.view()[pmd] = 1
        cov = region.coverage()
        vma = _status_vma(region.address)
        assert smaps_huge_bytes(os.getpid(), region.address, region.address + 2 * pmd) == pmd
        assert cov.split_blocks == vma.split_blocks == 1
        assert vma.split_block_addresses == [region.address + pmd]
        assert cov.huge_bytes == vma.huge_bytes == vma.as_dict()["huge_bytes"] == pmd


# -- EINVAL scoped to the block ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["mprotect", "mlock"])
def test_einval_on_one_block_keeps_the_region_repaired(split_and_repair, require_scan,
                                                       region_factory, pmd, how):
    """A partial mprotect/mlock of one page refuses MADV_COLLAPSE (EINVAL) for
    that block only: the guard names the cause, and fork splits elsewhere in
    the region are still repaired."""
    region = region_factory(4 * pmd)
    page = region.address + pmd + 8192
    rc = (libc.mprotect(ctypes.c_void_p(page), 4096, 1) if how == "mprotect"
          else libc.mlock(ctypes.c_void_p(page), 4096))
    assert rc == 0, os.strerror(ctypes.get_errno())
    if not any(v.start == page and ("lo" in v.vm_flags or v.perms.startswith("r-"))
               for v in kernel.read_smaps()):
        # AddressSanitizer intercepts mlock() and does nothing (tests/sanitize.sh).
        pytest.skip(f"{how}() did not change the mapping here")
    guard = thpguard.install(interval=0.01)
    view = region.view()
    try:
        def truth():
            return sum(v.huge_bytes or 0 for v in kernel.read_smaps()
                       if region.address <= v.start and v.end <= region.address + region.size)

        with sharer():  # shares until the block ends: the writes split
            with guard.paused():
                view[2 * pmd] = 1  # fork splits elsewhere in the region
                view[3 * pmd] = 1
                assert truth() == pmd, "the writes did not split blocks 2 and 3"
            wait_until(lambda: hex(region.address + pmd) in thpguard.stats().blocks_disabled
                       and truth() == 3 * pmd,
                       lambda: f"the guard to disable the {how} block and repair the others "
                               f"(stats {thpguard.stats()}, {truth()} bytes huge)")
        s = thpguard.stats()
        reason = s.blocks_disabled.get(hex(region.address + pmd), "")
        assert "mprotect()ed or mlock()ed" in reason and "spans 3 mappings" in reason, s
        assert s.regions_disabled == {}
        assert truth() == 3 * pmd  # every block but the mprotect/mlock one
    finally:
        del view
        guard.stop()
        if how == "mlock":
            libc.munlock(ctypes.c_void_p(page), 4096)
        else:
            libc.mprotect(ctypes.c_void_p(page), 4096, 3)


def test_collapse_names_the_cause_of_einval(split_and_repair, require_scan, region_factory,
                                            pmd):
    """Region.collapse() reports which block refused and why."""
    region = region_factory(2 * pmd)
    page = region.address + 8192
    try:
        with sharer():  # shares until the block ends: the write splits
            region.view()[0] = 1
            assert not region.coverage().complete, "the write did not split the block"
            assert libc.mprotect(ctypes.c_void_p(page), 4096, 1) == 0
            result = region.collapse()
            assert list(result.refused) == [region.address]
            assert "spans 3 mappings" in result.refused[region.address]
    finally:
        libc.mprotect(ctypes.c_void_p(page), 4096, 3)


# -- processes that may not open their own page map -------------------------------------------


def _dropped_child(pmd, dumpable_again):
    """In a child: drop to nobody, use a region, report what was measured."""
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    if dumpable_again:
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: own files readable again
        first = thpguard.alloc(pmd).coverage().source  # opens as nobody
        libc.prctl(4, 0, 0, 0, 0)
    else:
        first = None
    try:
        os.close(os.open("/proc/self/pagemap", os.O_RDONLY))
        denied = False
    except PermissionError:
        denied = True
    region = thpguard.alloc(2 * pmd)
    cov = region.coverage()
    return first, denied, cov.source, cov.huge_bytes, region.size


def test_setuid_worker_measures_from_smaps(require_thp, pmd):
    """A child that setuid()s away from root cannot open its page map: alloc()
    and coverage() work (smaps, no per-block detail), no PermissionError, and
    root's descriptor is not kept (it would show frame numbers)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to setuid()")
    first, denied, source, huge, size = run_in_child(_dropped_child, pmd, False)
    assert denied and source == blocks.SOURCE_SMAPS and huge == size


def test_non_dumpable_process_keeps_its_descriptor(require_thp, pmd):
    """An unprivileged process that sets PR_SET_DUMPABLE=0 keeps the page map
    descriptor it opened before, so coverage keeps its per-block detail."""
    if os.geteuid() != 0:
        pytest.skip("needs root to setuid()")
    first, denied, source, huge, size = run_in_child(_dropped_child, pmd, True)
    assert first == source == blocks.SOURCE_PAGEMAP_SCAN
    assert denied and huge == size


def test_setuid_worker_guard_repairs_and_warns_once(split_and_repair, pmd):
    """The guard of a worker that dropped privileges still repairs splits
    (smaps fallback) and warns about the page map once."""
    if os.geteuid() != 0:
        pytest.skip("needs root to setuid()")
    code = f"""
import logging, os, time, io
stream = io.StringIO()
logging.basicConfig(stream=stream, level=logging.WARNING)
import thpguard
region = thpguard.alloc({2 * pmd})
g = thpguard.install(interval=0.01)
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # shares the region until the parent closes the pipe
    os.close(w); os.read(r, 1); os._exit(0)
os.close(r)
with g.paused():  # the split stays until the guard runs again
    region.view()[0] = 1
    split = not region.coverage().complete
deadline = time.monotonic() + 60  # only ends a hang
while not region.coverage().complete and time.monotonic() < deadline:
    g.wait_ticks(1, timeout=60)
print(split, region.coverage().complete, region.coverage().source,
      stream.getvalue().count("/proc/self/pagemap cannot be opened"))
os.close(w); os.waitpid(pid, 0)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "smaps", "1"], done.stdout + done.stderr


# -- capability registry, native contract, verify ---------------------------------------------


def test_capabilities_is_exported_and_probed_once():
    """thpguard.capabilities() is the registry's cached answer."""
    assert thpguard.capabilities() is kernel.capabilities() is kernel.registry.get()
    assert thpguard.capabilities(refresh=True) is kernel.capabilities()


def _compile(cdef_text, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "native"))
    try:
        import build_cffi
    finally:
        sys.path.pop(0)
    src = tmp_path / "check.c"
    src.write_text('#include <stddef.h>\n#include "thpguard.h"\n#include "thpguard_testing.h"\n'
                   + build_cffi.strict_checks(cdef_text) + "\n")
    return subprocess.run(["cc", "-std=gnu11", "-fsyntax-only", "-I", os.path.join(ROOT, "native"),
                           str(src)], capture_output=True, text=True)


@pytest.mark.parametrize("old,new", [
    ("int tg_madvise(void *addr, size_t len, int advice);",
     "int tg_madvise(void *addr, size_t len, long advice);"),
    ("unsigned max_retries", "int max_retries"),
    ("int tg_unmap(void *addr, size_t size);", "int tg_unmap(void *addr);"),
    ("uint64_t *walk_end);", "uint32_t *walk_end);"),
    ("    uint64_t categories;", "    uint32_t categories;"),
])
def test_cdef_drift_fails_the_build(tmp_path, old, new):
    """A cdef that differs from thpguard.h in width, signedness, arity or
    struct layout does not compile; the shipped one does."""
    if subprocess.run(["which", "cc"], capture_output=True).returncode:
        pytest.skip("no C compiler")
    cdef = open(os.path.join(ROOT, "native", "cdef.h")).read()
    assert old in cdef
    assert _compile(cdef, tmp_path).returncode == 0
    broken = _compile(cdef.replace(old, new), tmp_path)
    assert broken.returncode != 0 and re.search(r"conflicting types|static assert", broken.stderr)


def test_fault_injection_is_not_in_the_public_header():
    """The shipped C contract does not declare the test hook."""
    header = open(os.path.join(ROOT, "native", "thpguard.h")).read()
    assert "tg_fault" not in header and "TG_FAULT" not in header


_NO_NATIVE = "import sys; sys.modules['thpguard._cffi'] = None; from thpguard import cli; " \
             "sys.exit(cli.main({argv!r}))"


@pytest.mark.parametrize("argv", [["verify"], ["verify", "--json"]])
def test_verify_without_native_module_is_unsupported(argv):
    """Without the native extension, verify says UNSUPPORTED with the reason and
    exits with the unsupported-host status (cli.EXIT_UNSUPPORTED)."""
    from thpguard import cli

    done = subprocess.run([sys.executable, "-c", _NO_NATIVE.format(argv=argv)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_UNSUPPORTED, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    if "--json" in argv:
        doc = json.loads(done.stdout)
        assert doc["verdict"] == "unsupported" and "native module" in doc["verdict_text"]
    else:
        assert "UNSUPPORTED: the native module is not built" in done.stdout


@pytest.mark.parametrize("argv", [["status"], ["status", "--json", "1"], ["watch", "--count", "1", "1"],
                                  ["guard", "--once", "1"], ["run", "--", "true"]])
def test_other_commands_without_native_module_exit_4(argv):
    """status, watch, guard and run without the native extension say so and exit 4, no traceback."""
    from thpguard import cli

    done = subprocess.run([sys.executable, "-c", _NO_NATIVE.format(argv=argv)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_UNSUPPORTED, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "native module is not built" in done.stderr


def test_api_without_native_module_raises_unsupported():
    """import thpguard works without the extension; alloc() raises UnsupportedError."""
    code = ("import sys; sys.modules['thpguard._cffi'] = None; import thpguard\n"
            "print(thpguard.capabilities().collapse.available)\n"
            "try:\n    thpguard.alloc(1)\nexcept thpguard.UnsupportedError as e:\n    print('unsupported')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "unsupported"], done.stdout + done.stderr


def test_c_library_classifies_blocks_like_python(require_scan, pmd):
    """tg_block_counts (the C library) and the Python block model give every
    kind the same count on memory that holds each kind; smaps agrees on the
    huge bytes."""
    addr = _native.map_aligned(5 * pmd, pmd)
    try:
        for at in range(addr + pmd, addr + 2 * pmd, 4096):
            ctypes.c_char.from_address(at).value = b"x"  # before MADV_HUGEPAGE: small pages
        _native.madvise(addr, 5 * pmd, _native.MADV_HUGEPAGE)
        ctypes.c_char.from_address(addr).value = b"x"  # block 0: a THP
        ctypes.c_char.from_address(addr + 2 * pmd).value = b"x"  # block 2: a THP ...
        _native.madvise(addr + 2 * pmd + 4096, 4096, MADV_DONTNEED)  # ... one page short
        _native.madvise(addr + 3 * pmd, pmd, _native.MADV_POPULATE_READ)  # block 3: zero page
        cov = pagemap.coverage(addr, addr + 5 * pmd, pmd)
        kinds = [cov.blocks.kind(addr + i * pmd) for i in range(5)]
        assert kinds == [blocks.HUGE, blocks.SPLIT, blocks.PARTIAL, blocks.ZERO, blocks.ABSENT]
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            c = _native.block_counts(fd, addr, addr + 5 * pmd, pmd)
        finally:
            os.close(fd)
        assert {k: c[k] for k in ("huge", "split", "partial", "zero", "absent")} == \
            {k: kinds.count(k) for k in ("huge", "split", "partial", "zero", "absent")}
        truth = smaps_huge_bytes(os.getpid(), addr, addr + 5 * pmd)
        assert c["huge_bytes"] == cov.huge_bytes == truth == pmd
        assert c["present_bytes"] == cov.present_bytes
    finally:
        _native.unmap(addr, 5 * pmd)


def test_alloc_and_fork_ask_the_registry_not_the_kernel(require_thp, pmd):
    """The capability registry answers alloc() and fork() from its cache: each
    madvise advice is probed once, however many regions and forks follow."""
    asked = []

    class Counting:
        def __getattr__(self, name):
            return getattr(_native, name)

        def advice_known(self, advice):
            asked.append(advice)
            return _native.advice_known(advice)

    kernel.registry.set_native(Counting())
    try:
        for _ in range(3):
            region = thpguard.alloc(pmd, fork="copy")
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            region.close()
        assert asked and len(asked) == len(set(asked))
    finally:
        kernel.registry.reset()


def test_region_says_what_maps_it(region_factory, pmd):
    """A region names its backend and page size; an unknown backend is refused."""
    region = region_factory(pmd)
    assert (region.backend, region.page_size) == ("thp", pmd)
    assert region_factory(pmd, fork="copy").copy_mode in ("eager", "kernel", "userfault")
    with pytest.raises(thpguard.InvalidArgumentError, match="unknown backend"):
        thpguard.alloc(pmd, backend="nope")
