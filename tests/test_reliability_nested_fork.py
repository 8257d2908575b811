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
import json, os, signal, sys, threading, time
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
made = reaped = 0

def spawn():
    pid = os.fork()
    if pid == 0:
        os._exit(0)

def on_chld(signum, frame):
    global made, reaped
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped += 1
    # Handlers nest: the signals a fork held run their handler as soon as
    # os.fork() returns, inside this one. A child is counted before its fork
    # (check and count with no call between them, where no handler runs),
    # so a nested handler never sees a stale count and forks a 61st.
    if made < 60:
        made += 1
        spawn()

signal.signal(signal.SIGCHLD, on_chld)
for _ in range(4):
    made += 1
    spawn()
deadline = time.monotonic() + 60
while (made < 60 or reaped < made) and time.monotonic() < deadline:
    time.sleep(0.01)
g = thpguard.guard()
print(json.dumps({"made": made, "reaped": reaped, "threads": sorted(set(threads)),
                  "guard_running": g is not None and g.running}), flush=True)
region.close()
"""


@pytest.mark.parametrize("guard", ["guard", "noguard"])
@pytest.mark.parametrize("run", range(8))
def test_sigchld_handler_that_forks(guard, run):
    """A SIGCHLD handler that forks 60 children, with and without the guard:
    every child is made and reaped, nothing hangs, the guard runs at the
    end, and no thread but the guard's is started. (With the guard it hung 3 times in 80 runs while a handler could
    run in the middle of the guard thread's start: it started a second
    thread that no fork stopped.)"""
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT, guard], capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process hung (a nested fork's hooks deadlocked): {exc.stderr!r}")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["made"] == 60 and report["reaped"] == 60, report
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


@pytest.mark.xfail(strict=False, reason="open: at load 5-8, in 2 of 87 runs CPython reported a "
                   "Tick raised at the first line of an after-fork hook as ignored, which skips "
                   "that hook's work; one of them hung (docs/reliability.rst)")
@pytest.mark.parametrize("run", range(3))
def test_raising_alarm_handler_around_fork(run):
    """A SIGALRM every 0.3 ms whose handler raises, around os.fork() with a
    ``share`` region and the guard: the exception never escapes a fork hook
    (CPython would print "Exception ignored" and skip the rest of the
    hook), and every fork pauses and resumes the guard."""
    out = subprocess.run([sys.executable, "-c", ALARM_SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
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
