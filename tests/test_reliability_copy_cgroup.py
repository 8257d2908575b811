"""The `copy` fork policy under a memory cgroup with no room for the copy,
and a child that never finishes its copy: the child keeps the region shared
(ERROR log, stats().copy_fallbacks) instead of being OOM-killed, and the
parent's wait is bounded. Real memory cgroups, real signals; the cgroup is
removed even when a test fails."""

import json
import os
import select
import subprocess
import sys
import time

import pytest

from conftest import WAIT, read_pipe, wait_child
from test_reliability_cgroup import memory_cgroup  # noqa: F401 - the fixture

SIZE = 64 << 20

SCRIPT = r"""
import json, logging, os, sys, time
import thpguard
from thpguard import backends

logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")
size, wait, hold = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "hold"
if wait != "auto":
    backends.COPY_WAIT_SECONDS = float(wait)
if hold:
    from thpguard import _fork

    def hold_the_child(**kwargs):
        # In the child, before its copy (after-fork callbacks run in
        # descending order; the region's copy has order 10): a copy that
        # does not finish, until the test sends a line.
        os.read(0, 1)

    _fork.subscribe("t-hold", after_in_child=hold_the_child, order=10 ** 6)
sys.stdin.readline()  # moved into the cgroup (or not needed)
region = thpguard.alloc(size, fork="copy", copy_mode="eager")  # the parent waits for the copy
view = region.view()
for off in range(0, size, 4096):
    view[off] = (off // 4096) % 251
print("allocated", flush=True)
sys.stdin.readline()  # limit set
r, w = os.pipe()
started = time.monotonic()
pid = os.fork()
if pid == 0:
    os.close(r)
    ok = all(view[off] == (off // 4096) % 251 for off in range(0, size, 1 << 20))
    st = thpguard.stats()
    os.write(w, json.dumps({"data_ok": ok, "copy_fallbacks": st.copy_fallbacks,
                            "complete": region.coverage().complete}).encode())
    os._exit(0)
spent = time.monotonic() - started
os.close(w)
with os.fdopen(r) as f:
    child = f.read()
_, status = os.waitpid(pid, 0)
print(json.dumps({"spent": spent, "child": json.loads(child) if child else None,
                  "status": status, "timeouts": thpguard.stats().copy_wait_timeouts}), flush=True)
"""


def _start(wait="auto", size=SIZE, hold=False):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(size), wait,
                             "hold" if hold else "free"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _say(proc, line=""):
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _finish(proc, timeout, on_timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        on_timeout()
        out, err = proc.communicate(timeout=WAIT)
        pytest.fail(f"the fork did not return within {timeout} s; stderr: {err[-2000:]}")
    return out, err


def _read_until(fd, text, what, timeout=WAIT):
    """What the pipe ``fd`` gave until ``text`` appeared in it; fails naming
    ``what`` after ``timeout`` seconds or at EOF without it."""
    got = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in got:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"waited {timeout:g} s for {what}; got {got.decode()[-2000:]!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            pytest.fail(f"the script exited before {what}; got {got.decode()[-2000:]!r}")
        got += chunk
    return got.decode()


@pytest.mark.parametrize("oom_killer", ["enabled", "disabled"])
def test_copy_without_cgroup_room_stays_shared(require_collapse, memory_cgroup, oom_killer):  # noqa: F811
    """A `copy` child in a memory cgroup with 24 MiB of room and a 64 MiB
    region: the child is not OOM-killed (exit 0), keeps the region shared
    with the right data, logs one ERROR naming the region and the cgroup,
    counts stats().copy_fallbacks = 1, and fork() returns promptly, also
    with the cgroup's OOM killer disabled."""
    group = memory_cgroup
    if group.version != 1 and oom_killer == "disabled":
        pytest.skip("memory.oom_control is cgroup v1 only")
    proc = _start()
    try:
        group.add(proc.pid)
        _say(proc)
        assert proc.stdout.readline().strip() == "allocated"
        if oom_killer == "disabled":
            with open(os.path.join(group.path, "memory.oom_control"), "w") as f:
                f.write("1")
        group.set_limit(group.read("usage") + (24 << 20))
        failcnt = group.read("failcnt")
        _say(proc)
        out, err = _finish(proc, WAIT, lambda: group.set_limit(1 << 40))
    finally:
        if proc.poll() is None:
            group.set_limit(1 << 40)
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out.splitlines()[-1])
    assert os.WIFEXITED(report["status"]) and os.WEXITSTATUS(report["status"]) == 0, report
    assert report["child"]["data_ok"] and report["child"]["copy_fallbacks"] == 1, report
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "stays shared" in errors[0] and "memory cgroup" in errors[0], err
    # fork() returned promptly: the parent had the child's word before its
    # bounded wait ran out (the library's own account, not a clock here).
    assert report["timeouts"] == 0, report
    print(f"copy fork in a v{group.version} memory cgroup, OOM killer {oom_killer}: fork() "
          f"returned in {report['spent'] * 1000:.1f} ms, child exit 0, copy_fallbacks 1")
    # Ground truth: the cgroup never hit its limit for the copy.
    assert group.read("failcnt") == failcnt


def test_parent_wait_is_bounded(require_collapse):
    """A `copy` child that does not finish its copy (held in its fork hooks
    until the test lets it go): the parent's fork() returns after
    COPY_WAIT_SECONDS with one ERROR and stats().copy_wait_timeouts = 1,
    while the child is still held; the child, let go, finishes."""
    proc = _start(wait="1.0", size=256 << 20, hold=True)
    try:
        _say(proc)
        assert proc.stdout.readline().strip() == "allocated"
        _say(proc)
        # The parent prints its report only after the child exits: let the
        # child go once the parent's fork() has returned (its ERROR line).
        # That line coming while the child is held shows the wait is bounded.
        early = _read_until(proc.stderr.fileno(), "not waiting longer",
                            "the parent's ERROR that it stopped waiting for the held child")
        _say(proc)  # the child may copy now
        out, err = _finish(proc, WAIT, lambda: None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = json.loads(out.splitlines()[-1])
    # The library's account: it gave up waiting once, after its limit (no
    # upper bound on a clock here: the ERROR came while the child was held).
    assert report["timeouts"] == 1, (report, early + err[-2000:])
    assert report["spent"] >= 1.0, report
    assert os.WIFEXITED(report["status"]) and os.WEXITSTATUS(report["status"]) == 0, report
    assert report["child"]["data_ok"], report


def _fake_v2_cgroup_with_4_mib_room(tmp_path):
    from fakekernel import FakeTree

    t = FakeTree(tmp_path)
    base = f"{t.sys}/fs/cgroup"
    t.write(f"{base}/svc/memory.max", f"{64 << 20}\n")
    t.write(f"{base}/svc/web/memory.max", "max\n")
    t.write(f"{base}/svc/web/memory.current", f"{62 << 20}\n")
    t.write(f"{base}/svc/web/memory.stat", f"anon {60 << 20}\ninactive_file {1 << 20}\n"
                                           f"active_file {1 << 20}\n")
    t.process("self", cgroup="0::/svc/web\n",
              mountinfo="30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n")
    return t


def _fork_with_4_mib_room(tmp_path, monkeypatch, report):
    """Fork while kernel.memory_cgroup() reads a fake v2 cgroup with 4 MiB
    of room; the child sends ``report()``'s dict and exits. Returns the
    cgroup the parent read, the child's dict and its wait status."""
    from thpguard import kernel

    t = _fake_v2_cgroup_with_4_mib_room(tmp_path)
    monkeypatch.setattr(kernel._files, "_test_roots", None)
    kernel.set_test_roots(t.roots)
    try:
        cg = kernel.memory_cgroup()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.write(w, json.dumps(report()).encode())
            finally:
                os._exit(0)
    finally:
        kernel.set_test_roots(None)
    os.close(w)
    child = json.loads(read_pipe(r, "the child's report", pid, n=1 << 16))
    os.close(r)
    return cg, child, wait_child(pid, "the child to exit after its report")


def test_copy_room_check_reads_a_v2_cgroup(require_collapse, tmp_path, monkeypatch):
    """The room check in a cgroup v2 (``0::/path`` in /proc/self/cgroup, the
    lowest memory.max up the tree, memory.current, the file cache in
    memory.stat): with 4 MiB of room and a 32 MiB region the child of a real
    `copy` fork keeps the region shared with the right data and counts
    copy_fallbacks = 1. The cgroup files are a fake tree (kernel.set_test_roots):
    on a host whose memory controller is bound to cgroup v1 no v2 cgroup
    can limit memory; the v1 tests above limit it for real."""
    import thpguard

    size = 32 << 20
    region = thpguard.alloc(size, fork="copy", copy_mode="eager")
    try:
        view = region.view()
        view[::4096] = b"\x05" * (size // 4096)
        cg, child, status = _fork_with_4_mib_room(tmp_path, monkeypatch, lambda: {
            "ok": bytes(view[::4096]) == b"\x05" * (size // 4096),
            "fallbacks": thpguard.stats().copy_fallbacks})
        assert cg.version == 2 and cg.room_bytes == 4 << 20
        assert os.waitstatus_to_exitcode(status) == 0
        assert child == {"ok": True, "fallbacks": 1}, child
    finally:
        view.release()
        region.close()


def test_lazy_copy_child_needs_no_cgroup_room(require_collapse, tmp_path, monkeypatch):
    """A userfault `copy` region charges nothing at fork (each written block
    is charged when it is copied, as the kernel's COW would be): with 4 MiB
    of room and a 32 MiB region the child logs no ERROR, counts no
    copy_fallbacks, and its first write still copies the whole block."""
    import thpguard
    from thpguard import _native, kernel

    if not kernel.capabilities().copy_userfault.available:
        pytest.skip(f"needs userfaultfd block copy: {kernel.capabilities().copy_userfault.reason}")
    size = 32 << 20
    region = thpguard.alloc(size, fork="copy", copy_mode="lazy")
    try:
        view = region.view()
        view[::4096] = b"\x05" * (size // 4096)

        def report():
            view[0] = 6
            return {"ok": bytes(view[4096::4096]) == b"\x05" * (size // 4096 - 1),
                    "fallbacks": thpguard.stats().copy_fallbacks,
                    "copies": _native.copy_stats()["copies"],
                    "complete": region.coverage().complete}

        cg, child, status = _fork_with_4_mib_room(tmp_path, monkeypatch, report)
        assert cg.room_bytes == 4 << 20
    finally:
        view.release()
        region.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert child == {"ok": True, "fallbacks": 0, "copies": 1, "complete": True}, child
