"""SIGINT and SIGTERM that land while a `copy` fork's hooks work (the parent
waiting for the child's copy, the child copying): the hooks finish (the
copy, the guard restarted, hooks registered later) and the signal is
delivered once os.fork() has returned. Real signals, sent by another
process; checked against the region's page tables and the wait status."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import sigint_default
from reliability_support import children

# A region whose copy takes long enough for a signal to land inside it:
# the child's fresh pages are first-touch (cold), tens to hundreds of ms.
SIZE = 512 << 20

SCRIPT = r"""
import json, os, signal, sys, time
import thpguard
from thpguard import _native

who, signame, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
report_fd = int(sys.argv[4])
sig = getattr(signal, signame)
handled = []
if sig == signal.SIGTERM:
    def on_term(signum, frame):
        handled.append(signum)
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, on_term)

region = thpguard.alloc(size, fork="copy", copy_mode="eager")  # the parent waits for the copy
view = region.view()
view[::4096] = b"\x07" * (size // 4096)
guard = thpguard.install(interval=0.05)
later = []
os.register_at_fork(after_in_parent=lambda: later.append("parent"),
                    after_in_child=lambda: later.append("child"))
parent = os.getpid()
print("forking", flush=True)
interrupted = None
started = time.monotonic()
pid = spent = None
try:
    pid = os.fork()
    spent = time.monotonic() - started
    # The signal comes once fork() has returned (within milliseconds).
    time.sleep(3 if (pid == 0) != (who == "child") else 1)
except (KeyboardInterrupt, SystemExit) as exc:
    interrupted = type(exc).__name__
mine = os.getpid() != parent
if (who == "child") != mine:
    # not the side under test: wait quietly, then leave
    if mine:
        os._exit(0)
    os.waitpid(-1, 0)
    sys.exit(0)
time.sleep(0.3)  # a few guard ticks
# Ground truth: each side owns its huge pages now, so a write splits nothing.
complete_before = region.coverage().complete
view[::2 << 20] = b"\x08" * (size // (2 << 20))
cov = region.coverage()
report = {
    "interrupted": interrupted, "handled": handled, "spent": spent, "pid_known": pid is not None,
    "guard_running": thpguard.guard() is not None and thpguard.guard().running,
    "later_hooks": later, "complete_before": complete_before, "complete": cov.complete, "split": cov.split_blocks,
    "data_ok": bytes(view[4096:8192:4096]) == b"\x07",
}
os.write(report_fd, json.dumps(report).encode())
if mine:
    os._exit(0)
os.waitpid(-1, 0)
"""


@pytest.mark.parametrize("who", ["parent", "child"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_during_copy_fork(require_collapse, who, signame):
    """A signal to the parent while it waits for the child's copy, or to the
    child while it copies: os.fork() returns after the hooks finished, then
    KeyboardInterrupt (SIGINT) or the SIGTERM handler's SystemExit is raised,
    with the child's pid already returned to the parent;
    the guard runs again, later hooks ran, the region is the process's own
    (a write splits no block) and the data is intact."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, who, signame, str(SIZE), str(w)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            pass_fds=(w,), preexec_fn=sigint_default)
    os.close(w)
    try:
        assert proc.stdout.readline().strip() == "forking"
        deadline = time.monotonic() + 20
        target = proc.pid
        if who == "child":
            while not children(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.001)
            target = children(proc.pid)[0]
        time.sleep(0.05)
        os.kill(target, getattr(signal, signame))
        with os.fdopen(r) as f:
            data = f.read()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert data, f"no report; exit {proc.returncode}; stderr: {err[-2000:]}"
    report = json.loads(data)
    if report["spent"] is not None and report["spent"] < 0.05:
        pytest.skip(f"the copy took {report['spent']:.3f} s: the signal landed after the fork")
    expected = "KeyboardInterrupt" if signame == "SIGINT" else "SystemExit"
    assert report["interrupted"] == expected, (report, err[-2000:])
    assert "Exception ignored" not in err, err[-2000:]
    assert report["pid_known"], report
    if signame == "SIGTERM":
        assert report["handled"] == [signal.SIGTERM]
    assert report["guard_running"], report
    assert report["later_hooks"] == [who], report
    if not report["complete_before"]:
        pytest.skip("the kernel gave the copy small pages (memory busy or fragmented): "
                    "nothing to tell a split from")
    assert report["complete"] and report["split"] == 0, (report, err[-2000:])
    assert report["data_ok"], report


POINT_SCRIPT = r"""
import json, os, signal, sys, time
import thpguard
from thpguard import _fork

point, signame, report_fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
sig = getattr(signal, signame)
handled = []
if sig == signal.SIGTERM:
    def on_term(signum, frame):
        handled.append(signum)
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, on_term)
ran = []
injected = []

def inject(where):
    def hook(**kwargs):
        if where == point:
            injected.append(where)
            signal.raise_signal(sig)  # its Python handler would run at the next bytecode
        ran.append(where)
    return hook

FIRST, LAST = -10 ** 6, 10 ** 6
# before callbacks run in ascending order, after callbacks in descending order
_fork.subscribe("t-before-first", before=inject("before_first"), order=FIRST)
_fork.subscribe("t-before-last", before=inject("before_last"), order=LAST)
_fork.subscribe("t-after-last", after_in_parent=inject("parent_last"),
                after_in_child=inject("child_last"), order=FIRST)
_fork.subscribe("t-after-first", after_in_child=inject("child_first"), order=LAST)
_fork.state.get("t-state", lambda: 0, lambda old: inject("child_state")() or old)
parent = os.getpid()
interrupted = pid = None
try:
    pid = os.fork()
    time.sleep(2)  # the signal comes once fork() has returned (within milliseconds)
except (KeyboardInterrupt, SystemExit) as exc:
    interrupted = type(exc).__name__
mine = os.getpid() != parent
if point.startswith("child") != mine:
    if mine:
        os._exit(0)
    os.waitpid(-1, 0)
    sys.exit(0)
report = {"interrupted": interrupted, "handled": handled, "pid_known": pid is not None,
          "ran": ran, "injected": injected}
os.write(report_fd, json.dumps(report).encode())
if mine:
    os._exit(0)
os.waitpid(-1, 0)
"""

_EXPECTED_HOOKS = {
    False: ["before_first", "before_last", "parent_last"],
    True: ["before_first", "before_last", "child_state", "child_first", "child_last"],
}


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point", ["before_first", "before_last", "parent_last",
                                   "child_state", "child_first", "child_last"])
def test_signal_at_each_point_of_a_fork(point, signame):
    """A signal raised at each point of a fork's hooks (the first and last
    before-fork callback, the last after-fork callback in the parent, the
    child's per-process state and its first and last callback): every hook
    still runs, nothing is reported as "Exception ignored", and the signal
    is delivered once, after os.fork() returned its pid, on the side it hit."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", POINT_SCRIPT, point, signame, str(w)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            pass_fds=(w,), preexec_fn=sigint_default)
    os.close(w)
    try:
        with os.fdopen(r) as f:
            data = f.read()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert data, f"no report; exit {proc.returncode}; stderr: {err[-2000:]}"
    report = json.loads(data)
    assert report["injected"] == [point], report
    assert "Exception ignored" not in err, err[-2000:]
    expected = "KeyboardInterrupt" if signame == "SIGINT" else "SystemExit"
    assert report["interrupted"] == expected, (report, err[-2000:])
    assert report["pid_known"], report
    if signame == "SIGTERM":
        assert report["handled"] == [signal.SIGTERM], report
    assert report["ran"] == _EXPECTED_HOOKS[point.startswith("child")], report
