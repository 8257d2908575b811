"""Forks made by a signal handler while another fork's hooks run: a
SIGCHLD handler that reaps and forks again (a pre-fork server's respawn
loop). Each nested fork runs its own hooks in full and the outer fork's
before-fork work runs once (a second run takes its non-reentrant locks
twice and hangs the process). Real forks and signals; the children are
counted by the parent's waitpid."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import itertools, json, os, signal, sys, threading, time
import thpguard

threads = []
_start = threading.Thread.start
def counted_start(self):
    threads.append(self.name)
    _start(self)
threading.Thread.start = counted_start

if sys.argv[1] == "guard":
    thpguard.install(interval=0.05)
region = thpguard.alloc(4 << 20)
# Handlers nest: the signals a fork held run their handler as soon as
# os.fork() returns, inside the handler that forked, and (before Python
# 3.10) between almost any two bytecodes. So every count is one C call: a
# ticket from the counter reserves a child before its fork (a nested
# handler never gets the same one), and the lists record pids.
tickets = itertools.count()
made, reaped = [], []

def spawn():
    if next(tickets) >= 60:
        return
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    made.append(pid)

def on_chld(signum, frame):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped.append(pid)
    spawn()

signal.signal(signal.SIGCHLD, on_chld)
for _ in range(4):
    spawn()
deadline = time.monotonic() + 60
while (len(made) < 60 or len(reaped) < len(made)) and time.monotonic() < deadline:
    time.sleep(0.01)
g = thpguard.guard()
print(json.dumps({"made": len(made), "reaped": len(reaped), "same_pids": sorted(made) == sorted(reaped),
                  "threads": sorted(set(threads)),
                  "guard_running": g is not None and g.running}), flush=True)
region.close()
"""


def _run(script: str, *args: str, hang: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter; it must exit 0. A hang (120 s)
    fails the test with ``hang`` as the likely cause."""
    try:
        out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process hung ({hang}): {exc.stderr!r}")
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("guard", ["guard", "noguard"])
@pytest.mark.parametrize("run", range(8))
def test_sigchld_handler_that_forks(guard, run):
    """A SIGCHLD handler that forks 60 children, with and without the guard:
    every child is made and reaped, nothing hangs, the guard runs at the
    end, and no thread but the guard's is started. (With the guard it hung 3 times in 80 runs while a handler could
    run in the middle of the guard thread's start: it started a second
    thread that no fork stopped.)"""
    out = _run(SCRIPT, guard, hang="a nested fork's hooks deadlocked")
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["made"] == 60 and report["reaped"] == 60 and report["same_pids"], report
    # The signals a nested fork held go out when its own fork() returns,
    # without a thread (a thread started around a fork can break
    # threading's books in the child).
    assert report["threads"] == (["thpguard-guard"] if guard == "guard" else []), report
    if guard == "guard":
        assert report["guard_running"], report


ALARM_SCRIPT = r"""
import json, os, signal, time
import thpguard

region = thpguard.alloc(4 << 20, fork="share")
thpguard.install(interval=0.05)

class Tick(Exception):
    pass

armed = False
def on_alrm(signum, frame):
    if armed:
        raise Tick()

signal.signal(signal.SIGALRM, on_alrm)
signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
forks = ticks = 0
while forks < 200:
    try:
        armed = True
        pid = os.fork()
        armed = False
        if pid == 0:
            os._exit(0)
        forks += 1
        os.waitpid(pid, 0)
    except Tick:
        armed = False
        ticks += 1
signal.setitimer(signal.ITIMER_REAL, 0)
time.sleep(0.05)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
g = thpguard.guard()
print(json.dumps({"forks": forks, "ticks": ticks, "forks_seen": thpguard.stats()["forks_seen"],
                  "guard_running": g is not None and g.running}), flush=True)
region.close()
"""


@pytest.mark.xfail(strict=False, reason="four raising handlers in a row as the hold is taken "
                   "skip thpguard's before-fork work (then an after-fork hook's, or a hang); 0 of "
                   "51 runs at load 5-6 since three hooks stand in for a skipped one, 7 or 8 of 36 "
                   "with one (docs/reliability.rst)")
@pytest.mark.parametrize("run", range(3))
def test_raising_alarm_handler_around_fork(run):
    """A SIGALRM every 0.3 ms whose handler raises, around os.fork() with a
    ``share`` region and the guard: the exception never escapes a fork hook
    (CPython would print "Exception ignored" and skip the rest of the
    hook), and every fork pauses and resumes the guard."""
    out = _run(ALARM_SCRIPT, hang="the before-fork work lost, the open cause above")
    # A second handler that raises on entry to thpguard's unraisablehook
    # wrapper, before its first line, is CPython's own report of an exception
    # no Python code can catch (docs/reliability.rst); no hook lost its work.
    ignored = [chunk for chunk in out.stderr.split("Exception ignored")[1:]
               if "thpguard" in chunk and not chunk.startswith(" in sys.unraisablehook")]
    assert not ignored, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["forks"] == 200 and report["guard_running"], report
    # forks whose exception came from fork() after the child was made count too
    assert report["forks_seen"] >= 200, report


ORDER_SCRIPT = r"""
import json, os, signal, sys
import thpguard
from thpguard import _fork

region = thpguard.alloc(4 << 20)
runs = []  # one entry per run of the before-fork callbacks
_fork.subscribe("test-order", before=lambda: runs.append(1), order=100)

class Tick(Exception):
    pass

def on_alrm(signum, frame):
    raise Tick()

def on_usr1(signum, frame):  # a respawn handler: forks
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

signal.signal(signal.SIGALRM, on_alrm)
signal.signal(signal.SIGUSR1, on_usr1)
# Chooses when a real signal arrives: on the plan's n-th attempt to take the
# hold, just before it (R: a handler that raises, F: one that forks).
plan, attempts, real_hold = sys.argv[1], [0], _fork._hold
def hold():
    step = plan[attempts[0]] if attempts[0] < len(plan) else "."
    attempts[0] += 1
    if step != ".":
        signal.raise_signal(signal.SIGALRM if step == "R" else signal.SIGUSR1)
    return real_hold()
_fork._hold = hold
ticks = 0
for _ in range(2):
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    except Tick:
        ticks += 1
print(json.dumps({"runs": len(runs), "ticks": ticks}), flush=True)
region.close()
"""


@pytest.mark.parametrize("plan, nested", [(".", 0), ("R", 0), ("RR", 0), ("RRR", 0), ("F", 1),
                                          ("FR", 1), ("RF", 1), ("RRF", 1), ("FRF", 2)])
def test_skipped_and_nested_before_hooks_run_the_fork_work_once(plan, nested):
    """Two forks, with handlers that raise (R) or fork (F) as the hold is
    taken, in the order of the plan: each fork, nested ones too, runs its
    before-fork callbacks exactly once (twice takes their locks twice and
    hangs; none skips the fork's work), up to three raising handlers in a
    row. Before, a fork made while a stand-in hook re-ran a skipped one
    (RF) ran its own callbacks twice and hung."""
    out = _run(ORDER_SCRIPT, plan, hang=f"plan {plan}: before-fork work run twice?")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"runs": 2 + nested, "ticks": plan.count("R") and 1}, (plan, report)
