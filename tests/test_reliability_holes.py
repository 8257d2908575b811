"""Regions whose range outside code changed: part unmapped, another mapping
placed in the hole, part mprotect-ed. close() never unmaps what is not the
region's, and the guard says once that a hole cannot be repaired. Checked
against /proc/self/maps and the bytes of the other mapping."""

import ctypes
import logging
import mmap

import pytest

import thpguard
from thpguard import _native
from conftest import WAIT, wait_until

PAGE = mmap.PAGESIZE
MAP_FIXED_NOREPLACE = 0x100000
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _maps():
    """(start, end) of every VMA of this process, from /proc/self/maps."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def _mapped(lo, hi):
    """True when every byte of [lo, hi) is in some VMA."""
    at = lo
    for start, end in sorted(_maps()):
        if start <= at < end:
            at = end
        if at >= hi:
            return True
    return False


def _unmapped(lo, hi):
    return not any(start < hi and lo < end for start, end in _maps())


def _map_at(addr, size):
    """Another mapping placed exactly at ``addr`` (as a later mmap may land there)."""
    got = _libc.mmap(addr, size, PROT_RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                     -1, 0)
    if got in (None, ctypes.c_void_p(-1).value) or got != addr:
        pytest.fail(f"could not map at {addr:#x}: errno {ctypes.get_errno()}")
    ctypes.memmove(addr, b"not the region's", 16)
    return addr


def _close_keeps_the_other_mapping(region, other, size, caplog):
    """close() leaves ``other`` (in a hole of the region) mapped and intact,
    with one ERROR naming the region."""
    with caplog.at_level(logging.ERROR, logger="thpguard"):
        region.close()
    assert region.closed
    assert _mapped(other, other + size)
    assert ctypes.string_at(other, 16) == b"not the region's"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"{region.address:#x}" in errors[0].getMessage()
    # It says whether the user must act: not for the data, only if it repeats.
    assert "Nothing needs doing for the data" in errors[0].getMessage()


@pytest.mark.parametrize("hole", ["block", "page"])
def test_close_keeps_a_mapping_that_landed_in_a_hole(region_factory, hole, caplog):
    """Outside code unmaps part of a region and another mapping lands there:
    close() leaves that mapping (and its bytes) alone, logs one ERROR naming
    the region, and the region counts as closed."""
    region = region_factory(8 << 20)
    pmd = region.pmd_size
    lo, size = (region.address + pmd, pmd) if hole == "block" else (region.address + pmd + 7 * PAGE, PAGE)
    _native.unmap(lo, size)
    other = _map_at(lo, size)
    try:
        _close_keeps_the_other_mapping(region, other, size, caplog)
        region.close()  # idempotent, still harmless
        assert ctypes.string_at(other, 16) == b"not the region's"
    finally:
        _libc.munmap(other, size)


@pytest.mark.parametrize("hole", ["block", "page"])
def test_close_keeps_an_advised_mapping_that_would_merge(region_factory, hole, caplog):
    """Another mapping put into a hole and given MADV_HUGEPAGE has the
    region's flags, so the kernel would merge it into the region's VMA:
    the region's mapping refuses that merge, /proc/self/maps shows the other
    mapping as a VMA of its own, and close() leaves it and its bytes alone."""
    region = region_factory(8 << 20)
    pmd = region.pmd_size
    lo, size = (region.address + pmd, pmd) if hole == "block" else (region.address + pmd + 7 * PAGE, PAGE)
    _native.unmap(lo, size)
    other = _map_at(lo, size)
    _native.madvise(other, size, _native.MADV_HUGEPAGE)
    try:
        assert (region.address, region.address + region.size) not in _maps()  # not merged
        assert (other, other + size) in _maps()
        _close_keeps_the_other_mapping(region, other, size, caplog)
    finally:
        _libc.munmap(other, size)


def test_close_unmaps_a_region_after_mprotect_is_undone(region_factory, caplog):
    """A partial mprotect undone again merges the region's pieces back (their
    page offsets continue each other): close() unmaps all of it, no ERROR."""
    region = region_factory(8 << 20)
    at = region.address + region.pmd_size
    assert _libc.mprotect(at, PAGE, mmap.PROT_READ) == 0
    assert (region.address, region.address + region.size) not in _maps()
    assert _libc.mprotect(at, PAGE, PROT_RW) == 0
    assert (region.address, region.address + region.size) in _maps()
    lo, hi = region.address, region.address + region.size
    with caplog.at_level(logging.ERROR, logger="thpguard"):
        region.close()
    assert _unmapped(lo, hi)
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]


@pytest.mark.parametrize("advice", ["DONTFORK", "NOHUGEPAGE"])
def test_close_unmaps_a_region_advised_in_part(region_factory, caplog, advice):
    """madvise() on one block of a region (fork or huge page advice) splits
    its VMA into pieces that differ in that flag only: still all the
    region's, unmapped by close() without an ERROR."""
    region = region_factory(8 << 20)
    code = {"DONTFORK": 10, "NOHUGEPAGE": 15}[advice]
    _native.madvise(region.address + region.pmd_size, region.pmd_size, code)
    assert (region.address, region.address + region.size) not in _maps()
    lo, hi = region.address, region.address + region.size
    with caplog.at_level(logging.ERROR, logger="thpguard"):
        region.close()
    assert _unmapped(lo, hi)
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]


def test_region_stays_huge_and_one_vma(region_factory):
    """The mapping that refuses merges is still one VMA over exactly the
    region, and populating it still gives PMD-mapped blocks (PAGEMAP_SCAN)."""
    region = region_factory(8 << 20)
    assert (region.address, region.address + region.size) in _maps()
    if not region.degraded:
        assert region.coverage().complete


def test_close_unmaps_a_region_split_by_mprotect(region_factory, caplog):
    """A region split into several VMAs by a partial mprotect is still all
    the region's: close() unmaps every byte of it, without an ERROR."""
    region = region_factory(8 << 20)
    assert _libc.mprotect(region.address + region.pmd_size, PAGE, mmap.PROT_READ) == 0
    lo, hi = region.address, region.address + region.size
    with caplog.at_level(logging.ERROR, logger="thpguard"):
        region.close()
    assert _unmapped(lo, hi)
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]


def test_close_of_an_intact_region_unmaps_it(region_factory):
    """The plain case: close() unmaps the region's whole range."""
    region = region_factory(4 << 20)
    lo, hi = region.address, region.address + region.size
    region.close()
    assert _unmapped(lo, hi)


def test_guard_reports_a_hole_once(region_factory, caplog):
    """The guard meets a hole punched by outside code (MADV_COLLAPSE: ENOMEM
    on every try): one `disabled` event naming the hole, no back-off loop;
    only the block with the hole is set aside, as an EINVAL block is."""
    region = region_factory(8 << 20)
    pmd = region.pmd_size
    _native.unmap(region.address + pmd + 10 * PAGE, PAGE)  # block 1 is no longer huge
    assert not region.coverage().complete  # block 1 split (or partial: one page gone)
    events = []
    with caplog.at_level(logging.WARNING, logger="thpguard"):
        g = thpguard.install(interval=0.01, backoff_initial=0.01, backoff_max=0.02,
                             on_event=events.append)
        try:
            wait_until(lambda: any(e.kind == "disabled" and e.address == region.address
                                   for e in events),
                       lambda: f"the guard's disabled event for the hole (events: "
                               f"{[(e.kind, e.reason) for e in events][-10:]})")
            # 50 more ticks in which nothing more may be reported.
            assert g.wait_ticks(50, timeout=WAIT), "the guard stopped ticking"
        finally:
            g.stop()
    mine = [e for e in events if e.address == region.address]
    disabled = [e for e in mine if e.kind == "disabled"]
    assert len(disabled) == 1, [(e.kind, e.reason) for e in mine]
    assert "unmapped" in disabled[0].reason and f"{region.address + pmd + 10 * PAGE:#x}" in disabled[0].reason
    assert not [e for e in mine if e.kind == "backoff"], [(e.kind, e.reason) for e in mine]
    assert sum(e.failures.get("ENOMEM", 0) for e in mine if e.kind == "failed") <= 1
    st = thpguard.stats()
    assert hex(region.address + pmd) in st.blocks_disabled, st.blocks_disabled
    assert hex(region.address) not in st.regions_disabled


def test_left_mapped_range_is_never_unmapped_at_exit(require_thp):
    """After close() left a changed range mapped, the mapping that landed in
    the hole survives to the very end of the process: freeing what exit
    frees (module globals, the region) leaves it readable (the mmap object
    freed at exit used to unmap the whole range: SIGSEGV at exit)."""
    import subprocess
    import sys

    code = (
        "import ctypes, mmap, sys, thpguard\n"
        "from thpguard import _native\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.mmap.restype = ctypes.c_void_p\n"
        "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,"
        " ctypes.c_int, ctypes.c_long]\n"
        "region = thpguard.alloc(8 << 20)\n"
        "hole = region.address + region.pmd_size\n"
        "_native.unmap(hole, region.pmd_size)\n"
        "assert libc.mmap(hole, region.pmd_size, 3, 0x22 | 0x100000, -1, 0) == hole\n"
        "ctypes.memmove(hole, b'x', 1)\n"
        "region.close()\n"
        # What interpreter exit does: module globals cleared, objects freed.
        "import gc, thpguard._regions as r\n"
        "r._abandoned.clear(); del region; gc.collect()\n"
        "print('still mapped', ctypes.string_at(hole, 1).decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "still mapped x" in out.stdout, out.stdout


@pytest.mark.parametrize("hole", ["block", "page"])
def test_close_keeps_a_mapping_in_a_hole_of_a_lazy_copy_region(region_factory, hole, caplog):
    """A lazy (userfaultfd) ``copy`` region that has never been through a
    fork has one VMA of its own, as any region: an advised mapping put into
    a hole of it is seen, and close() leaves it and its bytes alone."""
    from thpguard import kernel
    feature = kernel.capabilities().copy_userfault
    if not feature.available:
        pytest.skip(f"needs userfaultfd block copy: {feature.reason}")
    region = region_factory(8 << 20, fork="copy", copy_mode="lazy")
    assert region.copy_mode == "userfault", region.copy_fallback_reason
    pmd = region.pmd_size
    lo, size = (region.address + pmd, pmd) if hole == "block" else (region.address + pmd + 7 * PAGE, PAGE)
    _native.unmap(lo, size)
    other = _map_at(lo, size)
    _native.madvise(other, size, _native.MADV_HUGEPAGE)
    try:
        _close_keeps_the_other_mapping(region, other, size, caplog)
    finally:
        _libc.munmap(other, size)


# A whole-block mapping next to mremap-ed blocks is not told apart
# (docs/reliability.rst): no ("block", "mremap").
@pytest.mark.parametrize("hole, method", [("block", "auto"), ("page", "auto"), ("page", "mremap")])
def test_close_keeps_a_mapping_in_a_hole_of_a_forked_lazy_copy_region(hole, method):
    """A lazy ``copy`` region after a fork in which both sides wrote (each
    copied blocks in): an advised mapping put into a hole of it is still
    seen, and close() leaves it and its bytes alone, in the parent and in
    the child; with UFFDIO_MOVE the range stays one VMA, with mremap each
    copied block is a VMA of its own (forced here), and a page-sized hole
    still shows. Run in a fresh process (the copy method is per process)."""
    import subprocess
    import sys

    from thpguard import kernel
    feature = kernel.capabilities().copy_userfault
    if not feature.available:
        pytest.skip(f"needs userfaultfd block copy: {feature.reason}")
    code = f"""
import ctypes, logging, mmap, os, sys, time
import thpguard
from thpguard import _native
errors = []
class Keep(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            errors.append(record.getMessage())
logging.getLogger("thpguard").addHandler(Keep())
if {method!r} != "auto":
    _native.copy_set_method({method!r})
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
PAGE = mmap.PAGESIZE
region = thpguard.alloc(8 << 20, fork="copy", copy_mode="lazy")
assert region.copy_mode == "userfault", region.copy_fallback_reason
pmd = region.pmd_size
view = region.view()
view[::PAGE] = b"\\x01" * ((8 << 20) // PAGE)
pid = os.fork()
for at in (0, 2 * pmd, 3 * pmd):  # both sides copy blocks in
    view[at + 5] = 2
time.sleep(0.05)
method = _native.copy_stats()["method"]
lo, size = (region.address + pmd, pmd) if {hole!r} == "block" else (region.address + pmd + 7 * PAGE, PAGE)
view.release()
_native.unmap(lo, size)
assert libc.mmap(lo, size, 3, 0x22 | 0x100000, -1, 0) == lo
_native.madvise(lo, size, _native.MADV_HUGEPAGE)
ctypes.memmove(lo, b"not the region's", 16)
region.close()
ok = ctypes.string_at(lo, 16) == b"not the region's"
side = "child" if pid == 0 else "parent"
os.write(1, " ".join([side, "kept" if ok else "lost", str(len(errors)), str(method)]).encode() + b"\\n")
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    lines = sorted(out.stdout.split("\n")[:-1])
    want = "mremap" if method == "mremap" else None
    assert [line.split()[:3] for line in lines] == [["child", "kept", "1"], ["parent", "kept", "1"]], \
        (out.stdout, out.stderr[-2000:])
    if want:
        assert all(line.split()[3] == want for line in lines), out.stdout
