"""Reliability: bad arguments and bad text give documented exceptions, never a crash."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import thpguard
from thpguard import _native, pagemap
from conftest import skip_thp
from thpguard.errors import (
    InvalidArgumentError,
    RegionClosedError,
    ThpguardError,
)

from reliability_support import (  # noqa: F401
    COUNTS,
    leaked_regions,
    no_faults,
    own_mappings,
    region_shaped_mappings,
    run_child,
)

PMD = thpguard.region.kernel.pmd_size()
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: Values of every kind a caller might pass by mistake.
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.just(object()),
)
#: Sizes that are cheap to try: bad ones, small ones, unmappable ones.
sizes = st.one_of(
    junk,
    st.integers(min_value=-(2**64), max_value=0),
    st.integers(min_value=1, max_value=4 * PMD),
    st.integers(min_value=2**41, max_value=2**80),
)
DOCUMENTED = (ThpguardError,)


def _documented(call, *args, **kwargs):
    """Run ``call``; any exception must be one of thpguard's (also a
    ValueError/TypeError/OSError subclass), with a message."""
    COUNTS["inputs_tried"] += 1
    try:
        return call(*args, **kwargs)
    except DOCUMENTED as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return exc


@FUZZ
@example(size=2**63 - 1, fork="share", populate=False, strict=False)
@example(size=2**64, fork="copy", populate=True, strict=False)
@given(size=sizes, fork=st.one_of(junk, st.sampled_from(thpguard.POLICIES)),
       populate=st.one_of(st.booleans(), junk), strict=st.one_of(st.booleans(), junk))
def test_alloc_arguments(require_thp, size, fork, populate, strict):
    """alloc() with any arguments returns a region or raises a documented
    error; a failed alloc leaves no mapping behind."""
    before = region_shaped_mappings()
    got = _documented(thpguard.alloc, size, fork=fork, populate=populate, strict=strict)
    if isinstance(got, thpguard.Region):
        assert got.size >= size and got.size % PMD == 0
        got.close()
    assert not leaked_regions(before)


MADV_DONTNEED = 4


@pytest.fixture(scope="module")
def split_region():
    """A region whose first block is split before each use (see _split)."""
    region = thpguard.alloc(2 * PMD)
    yield region
    region.close()


def _split(region):
    # Dropping one 4 KiB page of a PMD-mapped block makes the kernel split
    # it (a partial unmap): the block is then partial, one page short, and
    # needs a real collapse (khugepaged's max_ptes_none allows it unless an
    # operator set it to 0).
    _native.madvise(region.address + 4096, 4096, MADV_DONTNEED)
    cov = region.coverage()
    assert cov.partial_blocks == 1 and cov.split_blocks == 0
    if kernel.khugepaged_settings()["max_ptes_none"] == 0:
        skip_thp("khugepaged/max_ptes_none is 0: partial blocks are left alone")


@FUZZ
@given(chunk=st.one_of(junk, st.integers(min_value=-5, max_value=2**70)),
       max_retries=st.one_of(junk, st.integers(min_value=-5, max_value=2**40)))
def test_collapse_arguments(require_thp, split_region, chunk, max_retries):
    """Region.collapse() with any chunk and max_retries on a split region
    repairs it or raises a documented error."""
    _split(split_region)
    got = _documented(split_region.collapse, chunk=chunk, max_retries=max_retries)
    if isinstance(got, thpguard.CollapseResult):
        assert got.coverage.complete, got


@FUZZ
@given(start=st.one_of(junk, st.integers(min_value=0, max_value=2**65)),
       end=st.one_of(junk, st.integers(min_value=0, max_value=2**65)),
       pmd=st.one_of(st.none(), junk, st.sampled_from([PMD, 4096, 1 << 30])),
       pid=st.one_of(st.just("self"), st.just(os.getpid()), junk,
                     st.text(alphabet="/.x0123456789", max_size=12)))
def test_coverage_arguments(start, end, pmd, pid):
    """pagemap.coverage() on any range, PMD size and pid answers or raises a
    documented error."""
    got = _documented(pagemap.coverage, start, end, pmd, pid)
    if isinstance(got, thpguard.Coverage):
        assert 0 <= got.huge_bytes <= got.total_bytes


@FUZZ
@given(op=st.one_of(junk, st.sampled_from(sorted(_native.FAULT_OPS))),
       err=st.one_of(junk, st.integers(min_value=-5, max_value=2**40)),
       count=st.one_of(junk, st.integers(min_value=-5, max_value=2**40)))
def test_fault_inject_arguments(no_faults, op, err, count):  # noqa: F811
    """fault_inject() accepts what it documents and rejects the rest clearly."""
    _documented(_native.fault_inject, op, err, count)
    _native.fault_clear()


@FUZZ
@given(spec=st.one_of(
    st.text(max_size=40),
    st.lists(
        st.tuples(st.sampled_from(["collapse", "map", "scan", "mremap", "bogus", ""]),
                  st.sampled_from(["EAGAIN", "ENOMEM", "12", "-1", "errorcode", "²", "", "x"]),
                  st.sampled_from(["", "1", "0", "-3", "x", "²", "99999999999999"])),
        max_size=4,
    ).map(lambda items: ",".join(":".join(p for p in t if p != "") for t in items)),
))
def test_fault_spec_parser(no_faults, spec):  # noqa: F811
    """THPGUARD_FAULTS text of any shape arms faults or raises
    InvalidArgumentError naming the bad entry."""
    got = _documented(_native._faults_from_environment, spec)
    if isinstance(got, Exception):
        assert isinstance(got, InvalidArgumentError)
    _native.fault_clear()


# -- lifetime misuse ---------------------------------------------------------


def test_use_after_close_and_double_close(region_factory):
    """Every method of a closed region raises RegionClosedError; close() twice
    is harmless."""
    region = region_factory(PMD)
    region.close()
    region.close()
    for call in (region.view, region.coverage, region.collapse, region.populate):
        with pytest.raises(RegionClosedError, match="closed"):
            call()
    assert region.closed and region not in thpguard.regions()


def test_close_with_live_view_refuses(region_factory):
    """close() while a view is alive raises BufferError and unmaps nothing;
    after the view is released it closes."""
    region = region_factory(PMD)
    view = region.view()
    view[0] = 7
    with pytest.raises(BufferError, match="release"):
        region.close()
    assert view[0] == 7 and not region.closed
    view.release()
    region.close()
    assert region.closed


def test_close_from_another_thread_while_repair_runs(region_factory, pmd):
    """close() from one thread while another repairs in a loop: the repair
    thread ends with RegionClosedError (never a crash or a call on freed
    memory), close() returns, and the mapping is gone."""
    errors = []
    for _ in range(20):
        region = region_factory(8 * pmd)
        started = threading.Event()

        def repair():
            started.set()
            try:
                while True:
                    region.collapse(chunk=pmd)
            except RegionClosedError:
                return
            except BaseException as exc:
                errors.append(repr(exc))

        t = threading.Thread(target=repair)
        t.start()
        started.wait()
        region.close()
        t.join(10)
        assert not t.is_alive()
        assert all(not (lo <= region.address < hi) for lo, hi in own_mappings(1))
    assert not errors, errors


def _private_in_child(region):
    closed_before = region.closed
    try:
        region.view()
        viewed = "no error"
    except RegionClosedError as exc:
        viewed = str(exc)
    region.close()
    region.close()
    return closed_before, viewed, region.closed


def test_close_private_region_in_child(region_factory, pmd):
    """In a child a `private` region is closed already; view() says it is not
    mapped here; close() there is harmless and the parent's data survives."""
    region = region_factory(2 * pmd, fork="private")
    view = region.view()
    view[:4] = b"keep"
    try:
        # The view is alive at fork: the child inherits it (unusable there).
        closed_before, viewed, closed_after = run_child(_private_in_child, region)
        assert closed_before and closed_after
        assert "not mapped" in viewed
        assert bytes(view[:4]) == b"keep"
    finally:
        view.release()
    # A mapping made in the parent after the child exits lands anywhere:
    # the parent's own region is still intact and usable.
    assert region.coverage().complete


def test_view_of_private_region_in_child_then_new_mapping(region_factory, pmd):
    """The hole a `private` region leaves in a child stays reserved: a new
    mapping there cannot land on top of it, even after close()."""

    def child(region):
        spans = own_mappings(1)
        reserved = any(lo <= region.address and region.address + region.size <= hi
                       for lo, hi in spans)
        fresh = [thpguard.alloc(pmd, populate=False) for _ in range(4)]
        overlaps = any(
            r.address < region.address + region.size and region.address < r.address + r.size
            for r in fresh
        )
        for r in fresh:
            r.close()
        return reserved, overlaps

    region = region_factory(4 * pmd, fork="private")
    reserved, overlaps = run_child(child, region)
    assert reserved and not overlaps


# -- sysfs and /proc parsers on random and truncated text ----------------------

from thpguard import kernel  # noqa: E402

THP = "sys/kernel/mm/transparent_hugepage"
#: Files of a fake tree, each with a real-looking sample to mutate.
SAMPLES = {
    f"{THP}/enabled": "always [madvise] never\n",
    f"{THP}/defrag": "always defer defer+madvise [madvise] never\n",
    f"{THP}/shmem_enabled": "always within_size advise [never] deny force\n",
    f"{THP}/thp_cow": "always [madvise] never\n",
    f"{THP}/hpage_pmd_size": "2097152\n",
    f"{THP}/khugepaged/max_ptes_shared": "256\n",
    f"{THP}/khugepaged/pages_to_scan": "4096\n",
    f"{THP}/hugepages-2048kB/enabled": "always inherit [madvise] never\n",
    f"{THP}/hugepages-64kB/enabled": "always inherit madvise [never]\n",
    "proc/sys/kernel/osrelease": "6.18.44\n",
    "proc/vmstat": "nr_free_pages 123\nthp_split_pmd 7\nthp_collapse_alloc 3\n",
    "proc/buddyinfo": "Node 0, zone   Normal   10  5  3  2  1  0  0  1  2  3  4\n",
    "proc/self/status": "Name:\tpython\nPPid:\t1\nThreads:\t1\nUid:\t0\t0\t0\t0\n"
                        "CapEff:\t000001ffffffffff\nTHP_enabled:\t1\n",
    "proc/self/cgroup": "4:memory:/a/b\n0::/\n",
    "proc/self/mountinfo": "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
    "proc/self/smaps": (
        "7f0000000000-7f0000400000 rw-p 00000000 00:00 0 \n"
        "Size:               4096 kB\nRss:                4096 kB\n"
        "AnonHugePages:      4096 kB\nTHPeligible:    1\nVmFlags: rd wr mr mw me ac hg\n"
    ),
    "sys/fs/cgroup/memory/a/b/memory.limit_in_bytes": "9223372036854771712\n",
    "sys/fs/cgroup/memory/a/b/memory.usage_in_bytes": "1048576\n",
    "sys/fs/cgroup/memory/a/b/memory.stat": "hierarchical_memory_limit 1073741824\n",
}


@st.composite
def mutated(draw, sample: str):
    """The sample truncated, with bytes replaced or inserted, or noise."""
    data = sample.encode()
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "noise", "missing", "same"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + draw(st.binary(min_size=1, max_size=3)) + data[i + 1 :]
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        junk_text = draw(st.sampled_from([b"\n", b" ", b"[", b"]", b":", b"-", b"\x00",
                                          b"99999999999999999999999", b"-1", b"kB", b"\xff"]))
        return data[:i] + junk_text + data[i:]
    if kind == "noise":
        return draw(st.binary(max_size=64))
    if kind == "missing":
        return None
    return data


trees = st.fixed_dictionaries({path: mutated(sample) for path, sample in SAMPLES.items()})


def _build(root, tree):
    for path, data in tree.items():
        if data is None:
            continue
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
    return kernel.Roots(sys=os.path.join(root, "sys"), proc=os.path.join(root, "proc"))


PARSERS = [
    ("thp_mode", lambda r: kernel.thp_mode("enabled", r)),
    ("thp_cow_mode", kernel.thp_cow_mode),
    ("pmd_size", kernel.pmd_size),
    ("mthp_sizes", kernel.mthp_sizes),
    ("khugepaged_settings", kernel.khugepaged_settings),
    ("kernel_release", kernel.kernel_release),
    ("read_vmstat", kernel.read_vmstat),
    ("read_buddyinfo", kernel.read_buddyinfo),
    ("free_huge_bytes", kernel.free_huge_bytes),
    ("memory_cgroup", lambda r: kernel.memory_cgroup("self", r)),
]
#: These open a /proc/PID file and raise OSError when it is missing, as
#: documented; they must parse any content they do get.
OPENERS = [
    ("read_smaps", lambda r: kernel.read_smaps("self", r), "proc/self/smaps"),
    ("read_status", lambda r: kernel.read_status("self", r), "proc/self/status"),
]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=trees)
def test_kernel_parsers_on_mutated_trees(tmp_path_factory, tree):
    """Every sysfs/proc reader returns (None or empty where the text makes
    no sense) on random, truncated and corrupted files; never raises."""
    roots = _build(str(tmp_path_factory.mktemp("tree")), tree)
    for name, call in PARSERS:
        COUNTS["inputs_tried"] += 1
        try:
            call(roots)
        except Exception as exc:  # noqa: BLE001 - any exception is the bug
            pytest.fail(f"{name} raised {exc!r}")
    for name, call, path in OPENERS:
        COUNTS["inputs_tried"] += 1
        try:
            call(roots)
        except OSError:
            assert tree[path] is None, f"{name}: OSError although {path} exists"
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{name} raised {exc!r}")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=trees)
def test_capabilities_and_can_get_huge_pages_on_mutated_trees(tmp_path_factory, tree):
    """capabilities() and can_get_huge_pages() on corrupted trees answer
    with a Capabilities object and a (bool, reason) pair."""
    roots = _build(str(tmp_path_factory.mktemp("tree")), tree)
    COUNTS["inputs_tried"] += 1
    caps = kernel.capabilities(refresh=True, roots=roots)
    assert isinstance(caps.as_dict(), dict)
    ok, reason = kernel.can_get_huge_pages(caps, roots)
    assert isinstance(ok, bool) and isinstance(reason, str) and reason


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=trees)
def test_verify_cli_on_mutated_trees(tmp_path_factory, tree):
    """`thpguard verify --json` pointed at a corrupted tree prints one JSON
    object and exits 0, 1, 2 or 4 (UNSUPPORTED: no THP directory), without
    a traceback."""
    import json
    import subprocess
    import sys

    roots = _build(str(tmp_path_factory.mktemp("tree")), tree)
    code = ("import sys\nfrom thpguard import cli, kernel\n"
            f"kernel.set_test_roots(kernel.Roots(sys={roots.sys!r}, proc={roots.proc!r}))\n"
            "sys.exit(cli.main(['verify', '--json']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    COUNTS["inputs_tried"] += 1
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.returncode in (0, 1, 2, 4), out.stderr[-2000:]
    assert isinstance(json.loads(out.stdout), dict)


# -- command line: PIDs, sizes, intervals ------------------------------------------

cli_text = st.one_of(
    st.sampled_from(["self", "1", "0", "-1", "2147483648", "99999999999999999999", "²", "",
                     "0x10", " 7", "1e3", "nan", "inf", "-0", "8M", "1G", "0K", "12QB"]),
    st.text(max_size=8),
)


def _no_tiny_rate(text):
    from thpguard import cli

    try:
        rate = cli._size(text)
    except Exception:  # noqa: BLE001 - junk stays junk
        return text
    return text if rate == 0 or rate >= 64 << 20 else "64M"


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=st.sampled_from(["status", "watch", "guard", "verify"]),
       pid=cli_text, value=cli_text)
def test_cli_arguments(capsys, command, pid, value):
    """Every subcommand with any PID, size or interval text exits with a
    documented code (0, 1, 2 usage, 3 no such process or permission, 4
    unsupported host), never with a traceback."""
    from thpguard import cli

    argv = {
        "status": ["status", pid, "--json"],
        "watch": ["watch", pid, "--count", "1", "--interval", value],
        # A tiny positive rate is a valid request to wait (1 byte/s: one
        # block in 24 days): rates here are junk, 0, or realistic.
        "guard": ["guard", pid, "--once", "--rate", _no_tiny_rate(value),
                  "--interval", "0.01"],
        "verify": ["verify", "--skip-selftest", "--pid", pid, "--size", value, "--json"],
    }[command]
    COUNTS["inputs_tried"] += 1
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    capsys.readouterr()
    assert code in (0, 1, 2, 3, 4), (argv, code)


MAP_COUNT_FULL = r"""
import thpguard
regions = []
try:
    while True:
        regions.append(thpguard.alloc(2 << 20, populate=False))
except thpguard.KernelCallError as exc:
    print(len(regions), exc)
"""


def test_alloc_at_max_map_count_says_so():
    """At vm.max_map_count mappings, alloc() names the limit instead of a bare EAGAIN/ENOMEM."""
    with open("/proc/sys/vm/max_map_count") as f:
        if int(f.read()) > 70000:
            pytest.skip("vm.max_map_count is raised here: reaching it takes too long")
    done = subprocess.run([sys.executable, "-c", MAP_COUNT_FULL], capture_output=True, text=True,
                          timeout=300)
    assert "vm.max_map_count" in done.stdout, done.stdout + done.stderr


PRIVATE_FULL = r"""
import os, thpguard
regions = []
try:
    while True:
        regions.append(thpguard.alloc(2 << 20, fork="private", populate=False))
except thpguard.KernelCallError as exc:
    print(len(regions), exc)
"""


def test_too_many_private_regions_says_the_limit():
    """Past the native table of private regions, alloc() names the limit and what to do, not a bare ENOSPC."""
    done = subprocess.run([sys.executable, "-c", PRIVATE_FULL], capture_output=True, text=True,
                          timeout=300)
    assert "at most 4096 open fork='private' regions" in done.stdout, done.stdout + done.stderr
