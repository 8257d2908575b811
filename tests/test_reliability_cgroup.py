"""Reliability: a memory cgroup with no room for repair copies."""

from __future__ import annotations

import errno
import os
import time

import pytest

import thpguard
from thpguard._child import Child

from conftest import REQUIRE_THP, WAIT, checksum
from reliability_support import COUNTS

NAME = f"thpguard-test-{os.getpid()}"
#: Room left above the child's usage: less than one 2 MiB page.
HEADROOM = 1536 << 10


class MemoryCgroup:
    """A child memory cgroup (v1 memory controller, or v2 memory.max)."""

    def __init__(self, path: str, version: int) -> None:
        self.path = path
        self.version = version

    @classmethod
    def create(cls, name: str):
        """Create ``name`` under this process's memory cgroup, or return the
        reason it cannot be done."""
        reasons = []
        for version, base in _memory_hierarchies():
            for parent in (_own_cgroup(version, base), base):
                path = os.path.join(parent, name)
                try:
                    os.mkdir(path)
                except OSError as exc:
                    reasons.append(f"mkdir {path}: {exc.strerror}")
                    continue
                group = cls(path, version)
                if os.path.exists(group._file("limit")):
                    return group
                reasons.append(f"{path}: no memory controller file")
                group.remove()
        return reasons or ["no cgroup memory controller mounted"]

    def _file(self, what: str) -> str:
        names = {
            1: {"limit": "memory.limit_in_bytes", "usage": "memory.usage_in_bytes",
                "failcnt": "memory.failcnt"},
            2: {"limit": "memory.max", "usage": "memory.current",
                "failcnt": "memory.events"},
        }
        return os.path.join(self.path, names[self.version][what])

    def read(self, what: str) -> int:
        with open(self._file(what)) as f:
            text = f.read()
        if what == "failcnt" and self.version == 2:
            fields = dict(line.split() for line in text.splitlines())
            return int(fields.get("max", 0))
        text = text.strip()
        return 1 << 62 if text == "max" else int(text)

    def set_limit(self, limit: int) -> None:
        with open(self._file("limit"), "w") as f:
            f.write(str(limit))

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def remove(self) -> None:
        """rmdir, retried: the kernel frees an emptied cgroup asynchronously."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.01)
        os.rmdir(self.path)


def _memory_hierarchies():
    """(version, mount point) of the memory controller hierarchies, v1 first."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, fstype, opts = line.split()[:4]
            if fstype == "cgroup" and "memory" in opts.split(","):
                found.append((1, mnt))
            elif fstype == "cgroup2":
                try:
                    with open(os.path.join(mnt, "cgroup.controllers")) as c:
                        if "memory" in c.read().split():
                            found.append((2, mnt))
                except OSError:
                    pass
    return sorted(found)


def _own_cgroup(version: int, mount: str) -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if (version == 1 and "memory" in controllers.split(",")) or (
                version == 2 and controllers == ""
            ):
                return os.path.join(mount, path.lstrip("/"))
    return mount


@pytest.fixture
def memory_cgroup(require_thp):
    """A fresh child memory cgroup, removed after the test even on failure."""
    group = MemoryCgroup.create(NAME)
    if isinstance(group, list):
        reason = "no writable memory cgroup: " + "; ".join(group)
        if REQUIRE_THP and os.geteuid() == 0:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield group
    finally:
        group.remove()


def _until(predicate, timeout=WAIT):
    """In the child: poll ``predicate`` until true or ``timeout`` seconds
    passed (then the parent's checks say what was missing)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def _child(channel, region, pmd, repairer):
    """Runs inside the cgroup: split, repair under the limit, then above it.

    ``repairer`` "collapse" calls Region.collapse(); "guard" leaves the
    repairs to the background guard and reads its events and stats.
    """
    view = region.view()
    channel.recv(timeout=None)  # moved into the cgroup
    events = []
    if repairer == "guard":
        guard = thpguard.install(interval=0.01, backoff_initial=0.02, backoff_max=0.1,
                                 on_event=events.append)
        assert guard.wait_ticks(3, timeout=WAIT), "the guard did not tick"
    # Warm up the code paths (and their copy-on-write heap pages) before
    # the limit is set, so the limited phase allocates little but THPs.
    region.coverage()
    region.collapse()
    channel.send("warm")
    channel.recv(timeout=None)  # limit set
    for off in range(0, region.size, pmd):
        view[off] ^= 0x5A  # splits each shared block in this process
    expected = checksum(view)
    if repairer == "guard":
        _until(lambda: sum(e.kind == "backoff" for e in events) >= 3)
        failures = {}
        for e in events:
            if e.kind == "failed":
                for name, n in e.failures.items():
                    err = getattr(errno, name)
                    failures[err] = failures.get(err, 0) + n
        backoffs = [e.delay for e in events if e.kind == "backoff"]
        stats = thpguard.stats()
        report = (failures, backoffs, dict(stats.repair_failures), stats.guard_running)
    else:
        limited = region.collapse(chunk=pmd)
        report = (limited.failures,)
    limited_cov = region.coverage()
    intact_limited = checksum(view) == expected
    channel.send((report, limited_cov.split_blocks, intact_limited))
    channel.recv(timeout=None)  # limit raised
    if repairer == "guard":
        _until(lambda: region.coverage().complete)
        failures = {}
    else:
        failures = region.collapse(chunk=pmd).failures
    intact_raised = checksum(view) == expected
    channel.send((failures, region.coverage().complete, intact_raised))


@pytest.mark.parametrize("repairer", ["collapse", "guard"])
def test_repairs_fail_under_memory_limit_then_succeed(memory_cgroup, pmd, repairer):
    """In a cgroup whose limit leaves no room for a 2 MiB copy, collapse
    fails with ENOMEM/EBUSY per block, says so, keeps every byte and the
    process running; the guard backs off with growing delays instead of
    retrying at once; raising the limit lets the same repairs succeed."""
    if repairer == "guard" and not hasattr(thpguard, "install"):
        pytest.skip("the background guard is not in this tree")
    blocks = 4
    region = thpguard.alloc(blocks * pmd)
    view = region.view()
    for b in range(blocks):
        view[b * pmd : (b + 1) * pmd] = bytes([b + 7]) * pmd
    parent_sum = checksum(view)
    child = Child(_child, region, pmd, repairer, channel=True)
    try:
        memory_cgroup.add(child.pid)
        child.send("go")
        assert child.recv(what="its warm-up") == "warm"
        failcnt = memory_cgroup.read("failcnt")
        memory_cgroup.set_limit(memory_cgroup.read("usage") + HEADROOM)
        child.send("go")
        report, split_blocks, intact = child.recv(what="its repairs under the limit")
        failures = report[0]
        COUNTS["cgroup_limited_repairs"] += sum(failures.values())
        assert intact, "data changed while repairs failed"
        assert split_blocks == blocks, "no block could be repaired under the limit"
        assert set(failures) <= {errno.ENOMEM, errno.EBUSY} and failures, failures
        if repairer == "collapse":
            assert sum(failures.values()) == blocks
        else:
            _, backoffs, stats_failures, running = report
            assert running, "the guard thread died"
            assert len(backoffs) >= 3 and backoffs == sorted(backoffs), backoffs
            assert sum(stats_failures.values()) >= sum(failures.values())
        assert memory_cgroup.read("failcnt") > failcnt, "the kernel saw the limit hit"
        memory_cgroup.set_limit(1 << 30)
        child.send("go")
        failures, complete, intact = child.recv(what="its repairs after the limit was raised")
        assert failures == {} and complete and intact
        child.result()  # it exited cleanly
        assert checksum(view) == parent_sum
    finally:
        child.close()
        view.release()
        region.close()
