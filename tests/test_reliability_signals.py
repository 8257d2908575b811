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

import pytest

from conftest import WAIT, read_pipe, sigint_default, skip_thp

# A region whose copy takes long enough for a signal to land inside it:
# the child's fresh pages are first-touch (cold), tens to hundreds of ms.
SIZE = 512 << 20

SCRIPT = r"""
import json, os, signal, sys, time
import thpguard
from thpguard import _fork, _native

who, signame, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
report_fd, held_fd, release_fd = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
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


def hold_the_child(**kwargs):
    # In the child, before its copy (after-fork callbacks run in descending
    # order; the region's copy has order 10): say so, with the pid, and wait
    # until the test has sent its signal. The parent meanwhile waits for
    # this child's copy, so the signal lands inside the fork's hooks on
    # either side (the parent waiting for the copy, the child about to copy).
    os.write(held_fd, str(os.getpid()).encode())
    os.read(release_fd, 1)


_fork.subscribe("t-hold", after_in_child=hold_the_child, order=10 ** 6)
# The parent waits for the copy however slow this host is (the bounded
# wait is another test's subject).
thpguard.backends.COPY_WAIT_SECONDS = 300.0
parent = os.getpid()
print("forking", flush=True)
interrupted = None
pid = None
try:
    pid = os.fork()
    if (os.getpid() != parent) == (who == "child"):
        # The side under test: the signal is delivered once fork() has
        # returned; wait for it (a minute only turns its loss into a failure).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
except (KeyboardInterrupt, SystemExit) as exc:
    interrupted = type(exc).__name__
mine = os.getpid() != parent
if (who == "child") != mine:
    # not the side under test: wait quietly, then leave
    if mine:
        os._exit(0)
    os.waitpid(-1, 0)
    sys.exit(0)
# The guard repairs blocks the kernel gave small pages; a minute only bounds that.
deadline = time.monotonic() + 60
while not region.coverage().complete and time.monotonic() < deadline:
    time.sleep(0.05)
# Ground truth: each side owns its huge pages now, so a write splits nothing.
complete_before = region.coverage().complete
view[::2 << 20] = b"\x08" * (size // (2 << 20))
cov = region.coverage()
report = {
    "interrupted": interrupted, "handled": handled, "pid_known": pid is not None,
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
    child in its fork hooks before it copies: the child is held there (it
    waits on a pipe) until the signal was sent, so the signal always lands
    inside the hooks on the side under test. os.fork() returns after the hooks finished, then
    KeyboardInterrupt (SIGINT) or the SIGTERM handler's SystemExit is raised,
    with the child's pid already returned to the parent;
    the guard runs again, later hooks ran, the region is the process's own
    (a write splits no block) and the data is intact."""
    r, w = os.pipe()
    held_r, held_w = os.pipe()
    release_r, release_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, who, signame, str(SIZE), str(w),
                             str(held_w), str(release_r)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            pass_fds=(w, held_w, release_r), preexec_fn=sigint_default)
    for fd in (w, held_w, release_r):
        os.close(fd)
    err = ""
    try:
        line = proc.stdout.readline().strip()  # EOF if the script dies: no hang
        assert line == "forking", f"script said {line!r}; stderr: {proc.stderr.read()[-2000:]}"
        child = read_pipe(held_r, "the forked child to reach its fork hooks", n=32)
        assert child, f"the script died before its child reached its hooks; stderr: {proc.stderr.read()[-2000:]}"
        target = proc.pid if who == "parent" else int(child)
        os.kill(target, getattr(signal, signame))
        os.write(release_w, b"x")  # the child may copy now
        try:
            out, err = proc.communicate(timeout=WAIT * 2)  # beyond the script's own minute
        except subprocess.TimeoutExpired:
            pytest.fail(f"waited {WAIT * 2:g} s for the script to report and exit "
                        f"(signal sent to the {who})")
        data = read_pipe(r, "the report", n=1 << 16)
    finally:
        os.close(release_w)
        os.close(held_r)
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert data, f"no report; exit {proc.returncode}; stderr: {err[-2000:]}"
    report = json.loads(data)
    expected = "KeyboardInterrupt" if signame == "SIGINT" else "SystemExit"
    assert report["interrupted"] == expected, (report, err[-2000:])
    assert "Exception ignored" not in err, err[-2000:]
    assert report["pid_known"], report
    if signame == "SIGTERM":
        assert report["handled"] == [signal.SIGTERM]
    assert report["guard_running"], report
    assert report["later_hooks"] == [who], report
    if not report["complete_before"]:
        skip_thp("the kernel gave the copy small pages (memory busy or fragmented): "
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
    if (os.getpid() != parent) == point.startswith("child"):
        # The side hit: the signal is delivered once fork() has returned;
        # wait for it (a minute only turns its loss into a failure).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
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
        try:
            out, err = proc.communicate(timeout=WAIT * 2)
        except subprocess.TimeoutExpired:
            pytest.fail(f"waited {WAIT * 2:g} s for the script to report and exit "
                        f"(a signal raised at {point})")
        data = read_pipe(r, "the report", n=1 << 16)
    finally:
        os.close(r)
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


LANDING_SCRIPT = r"""
import json, os, signal, sys
import thpguard
from thpguard import _fork

class Tick(Exception):
    pass

def on_usr1(signum, frame):
    raise Tick()

def marker():
    pass

signal.signal(signal.SIGUSR1, on_usr1)
# Raised as the fork's first before-fork callback runs: held through the fork.
_fork.subscribe("t-raise", before=lambda: signal.raise_signal(signal.SIGUSR1), order=-10 ** 6)
parent = os.getpid()
where = pid = None
try:
    pid = os.fork()
    stored = True  # no call on this line: no profile event
except Tick:
    where = "fork"
try:
    child = os.getpid() != parent  # the first call after the fork
except Tick:
    where, child = where or "first call", False
if child:
    os._exit(0)
try:
    marker()
except Tick:
    where = where or "second call"
os.waitpid(pid, 0)
print(json.dumps({"where": where, "pid_known": pid is not None}))
"""


def test_held_exception_lands_at_the_first_call_after_fork():
    """A handler's exception held through a fork is raised in the parent at
    the first function call after the statement that stored fork()'s pid,
    not on the fork line (where it would lose the pid): docs/reliability.rst
    says so, and this is what a ``try`` around ``os.fork()`` alone misses."""
    out = subprocess.run([sys.executable, "-c", LANDING_SCRIPT], capture_output=True, text=True,
                         timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert "Exception ignored" not in out.stderr, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"where": "first call", "pid_known": True}, report


EXIT_SCRIPT = r"""
import os, signal, sys
import thpguard

def on_term(signum, frame):
    sys.exit(7)

signal.signal(signal.SIGTERM, on_term)
size = 32 << 20
region = thpguard.alloc(size, fork="copy", copy_mode=sys.argv[1])
view = region.view()
view[::4096] = b"\x05" * (size // 4096)
thpguard.install(interval=0.05)
os.write(1, b"ready\n")
while True:
    pid = os.fork()
    if pid == 0:
        region.view()[0] = 1
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("copy_mode", ["eager", "auto"])
def test_sigterm_handler_that_exits_while_forking_in_a_loop(copy_mode):
    """SIGTERM at a random moment of a fork loop with a ``copy`` region and
    the guard, its handler calling sys.exit(7): the process always exits 7,
    never with "Exception ignored" (before the hold: 53 of 60 runs exited 7;
    3 printed "Exception ignored" and 7 hung)."""
    import random
    import time

    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", EXIT_SCRIPT, copy_mode],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "ready\n", proc.stderr.read()[-2000:]
            time.sleep(random.uniform(0.02, 0.3))
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert "Exception ignored" not in err and "Traceback" not in err, err[-2000:]
        assert proc.returncode == 7, (proc.returncode, err[-2000:])


PROFILER_SCRIPT = r"""
import json, os, signal, sys, threading, time
import thpguard
from thpguard import _fork

handled = []
signal.signal(signal.SIGUSR1, lambda signum, frame: handled.append(os.getpid()))
_fork.subscribe("t-raise", before=lambda: signal.raise_signal(signal.SIGUSR1),
                after_in_child=lambda late: signal.raise_signal(signal.SIGUSR1))
calls = []
sys.setprofile(lambda frame, event, arg: calls.append(event) if len(calls) < 10 else None)
parent = os.getpid()
pid = os.fork()
deadline = time.monotonic() + 60  # a bound on a lost signal, not a timing
while not handled and time.monotonic() < deadline:
    time.sleep(0.001)
sys.setprofile(None)
deadline = time.monotonic() + 60
while threading.active_count() > 1 and time.monotonic() < deadline:
    time.sleep(0.001)  # the thread that tripped the handler is ending
report = {"handled": handled == [os.getpid()], "pid_known": pid is not None,
          "profiled": bool(calls), "threads": sorted(t.name for t in threading.enumerate())}
if pid == 0:
    os.write(1, ("child " + json.dumps(report) + "\n").encode())
    os._exit(0)
os.waitpid(pid, 0)
os.write(1, ("parent " + json.dumps(report) + "\n").encode())
"""


def test_held_signal_with_another_profiler_set():
    """With another profiler set (never displaced), a signal held through the
    fork still reaches its handler once fork() returned, in the parent and
    in the child (a thread watches the caller's frame there, started after
    threading's own after-fork work, and is gone by then)."""
    out = subprocess.run([sys.executable, "-c", PROFILER_SCRIPT], capture_output=True, text=True,
                         timeout=WAIT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    reports = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert set(reports) == {"parent", "child"}, out.stdout
    for side, text in reports.items():
        report = json.loads(text)
        assert report["handled"] and report["pid_known"] and report["profiled"], (side, report)
        assert report["threads"] == ["MainThread"], (side, report)


ASYNCIO_SCRIPT = r"""
import asyncio, json, os, signal
import thpguard
from thpguard import _fork

calls = []
thpguard.install(interval=0.05)  # its restart after each fork defers handlers too

async def main():
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: calls.append(1))
    # Each SIGUSR1 arrives inside the parent's after-fork hooks, while they hold signals.
    _fork.subscribe("t-usr1", after_in_parent=lambda: os.kill(os.getpid(), signal.SIGUSR1))
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        await asyncio.sleep(0.05)
    _fork.unsubscribe("t-usr1")
    os.kill(os.getpid(), signal.SIGUSR1)  # and one outside any fork
    deadline = loop.time() + 60  # a hang bound only
    while len(calls) < 6 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    # A second delivery of any of them was written to the wakeup fd before
    # this last signal's byte, so it is seen by the time this one is.
    seen = len(calls)
    os.kill(os.getpid(), signal.SIGUSR1)
    while len(calls) == seen and loop.time() < deadline:
        await asyncio.sleep(0.01)
    print(json.dumps({"calls": len(calls) - 1}))

asyncio.run(main())
"""


def test_asyncio_signal_held_through_a_fork_runs_its_callback_once():
    """asyncio learns of a signal from its wakeup fd (its Python handler does
    nothing): a signal held through a fork was written there when it
    arrived and must not be written again when the hold ends (before: each
    of the 5 signals sent during a fork ran the callback twice, 11 calls)."""
    out = subprocess.run([sys.executable, "-c", ASYNCIO_SCRIPT], capture_output=True, text=True,
                         timeout=2 * WAIT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"calls": 6}, out.stdout


TWO_SIGNALS_SCRIPT = r"""
import json, os, signal, time
import thpguard
from thpguard import _fork

class Tick(Exception):
    pass

def on_usr1(signum, frame):
    raise Tick()

seen = []
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))

def both():
    signal.raise_signal(signal.SIGUSR1)
    signal.raise_signal(signal.SIGUSR2)

_fork.subscribe("t-raise", before=both, order=-10 ** 6)
parent = os.getpid()
ticks = 0
try:
    pid = os.fork()
    if os.getpid() != parent:
        os._exit(0)
except Tick:
    ticks += 1
deadline = time.monotonic() + 60  # a bound on a lost signal, not a timing
while not seen and time.monotonic() < deadline:
    time.sleep(0.001)
os.waitpid(-1, 0)
print(json.dumps({"ticks": ticks, "usr2": seen}))
"""


def test_two_held_signals_the_first_raising():
    """Two signals held through one fork, the first one's handler raising:
    the exception reaches the program and the second handler still runs
    (each signal is marked as arrived before any handler runs)."""
    out = subprocess.run([sys.executable, "-c", TWO_SIGNALS_SCRIPT], capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"ticks": 1, "usr2": [signal.SIGUSR2]}, report


THREAD_FORK_SCRIPT = r"""
import json, os, signal, sys, threading, time
import thpguard
from thpguard import _fork

where = sys.argv[1]
signal.signal(signal.SIGINT, signal.default_int_handler)
terms = []
signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
inside, done = threading.Event(), threading.Event()
report = {}

def forker():
    inside.wait(60)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        got = {"handler": repr(signal.getsignal(signal.SIGINT))[:40], "interrupted": False}
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(500):
                time.sleep(0.001)
        except KeyboardInterrupt:
            got["interrupted"] = True
        got["terms"] = len(terms)
        got["after"] = repr(signal.getsignal(signal.SIGTERM))[:40]
        os.write(w, json.dumps(got).encode())
        os._exit(0)
    os.close(w)
    report.update(json.loads(os.read(r, 4096)))
    os.close(r)
    os.waitpid(pid, 0)
    done.set()

def wait_in_hook():
    if threading.current_thread() is threading.main_thread():
        inside.set()
        done.wait(60)

thread = threading.Thread(target=forker)
thread.start()
if where == "deferred":
    with _fork.signals_deferred():
        inside.set()
        done.wait(60)
else:
    _fork.subscribe("t-wait", before=wait_in_hook)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
thread.join()
print(json.dumps(report))
"""


@pytest.mark.parametrize("where", ["deferred", "fork_hooks"])
def test_child_forked_from_a_thread_while_main_holds_signals(where):
    """A child forked from another thread while the main thread is inside
    ``signals_deferred()`` or inside a fork's hooks inherits the main
    thread's recorder as its handlers: the child takes it over and puts the
    program's handlers back once its fork() returned, so its own SIGINT and
    SIGTERM reach them (before the fix: neither ran, the recorder stayed;
    with a fork loop in the main thread 48 of 74 children got no
    KeyboardInterrupt)."""
    out = subprocess.run([sys.executable, "-c", THREAD_FORK_SCRIPT, where], capture_output=True,
                         text=True, timeout=WAIT, preexec_fn=sigint_default)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["interrupted"] and report["terms"] == 1, report
    assert "record" not in report["after"], report


FLOOD_SCRIPT = r"""
import json, os, signal, subprocess, sys, time
import thpguard
from thpguard import _forksignals

class Boom(Exception):
    pass

armed = [False]

def on_usr1(signum, frame):
    # Raise where it hurts most: in thpguard's own signal code (the profile
    # function that ends a fork), else once per fork as it returns.
    if frame is not None and frame.f_code.co_filename.endswith("_forksignals.py"):
        raise Boom()
    if armed[0]:
        armed[0] = False
        raise Boom()

signal.signal(signal.SIGUSR1, on_usr1)
thpguard.install(interval=0.05)
region = thpguard.alloc(4 << 20, fork="copy", copy_mode="eager")
flood = subprocess.Popen([sys.executable, "-c",
                          "import os, signal, sys\n"
                          "while True: os.kill(int(sys.argv[1]), signal.SIGUSR1)",
                          str(os.getpid())])
forks = booms = 0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        armed[0] = True
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        forks += 1
        armed[0] = False
        os.waitpid(pid, 0)
    except Boom:
        armed[0] = False
        booms += 1
armed[0] = False
flood.kill()
flood.wait()
time.sleep(1)
guard = thpguard.guard()
print(json.dumps({"forks": forks, "booms": booms, "running": bool(guard and guard.running),
                  "waits": len(getattr(_forksignals._post, "waits", [])),
                  "profile": repr(sys.getprofile()),
                  "handler": signal.getsignal(signal.SIGUSR1) is on_usr1}))
"""


@pytest.mark.xfail(strict=False, reason="open: in 3 of 18 runs of an 8 s flood the guard still "
                   "stayed stopped with one fork waiting (its restart and finish pending, the "
                   "profile function unset); the last exceptions of those runs landed at the "
                   "first step of the _before hook and inside _Held.restore")
def test_raising_handler_flood_while_forking_keeps_the_guard(require_thp):
    """A flood of SIGUSR1 whose handler raises, over a fork loop with a
    ``copy`` region and the guard: whatever step of the profile function
    the exception lands at, the fork's work due after it ran (the guard is
    running again, no fork left waiting, the handler back) and no handler's
    exception is swallowed by a log call (before the fix the guard was off
    in 2 of 4 runs of a review's repro, one fork left waiting; a stress
    test: the exact step is placed in the next test)."""
    out = subprocess.run([sys.executable, "-c", FLOOD_SCRIPT, "3"], capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Logging error" not in out.stderr, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["forks"] > 0 and report["booms"] > 0, report
    assert report["running"] and report["waits"] == 0 and report["handler"], report
    assert report["profile"] == "None", report


STEP_SCRIPT = r"""
import _thread, json, os, signal, sys, time
import thpguard
from thpguard import _forksignals

class Boom(Exception):
    pass

signal.signal(signal.SIGUSR1, lambda signum, frame: (_ for _ in ()).throw(Boom()))
thpguard.install(interval=0.05)
# A real SIGUSR1 marked as arrived at one exact step of the profile
# function that ends a fork, once the fork's hooks are over and its work
# is due (as it looks up the forks waiting, before any of their work):
# its handler raises there.
waits, placed = _forksignals._waits, []

def _waits():
    event = sys._getframe(1)
    if (not placed and os.getpid() == parent and event.f_code.co_name == "_profile"
            and event.f_locals["frame"].f_code.co_name == "<module>" and waits()):
        placed.append(1)
        _thread.interrupt_main(signal.SIGUSR1)
    return waits()

_forksignals._waits = _waits
parent = os.getpid()
booms = 0
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
except Boom:
    booms += 1
time.sleep(0.5)
guard = thpguard.guard()
print(json.dumps({"placed": len(placed), "booms": booms, "running": bool(guard and guard.running),
                  "waits": len(getattr(_forksignals._post, "waits", [])),
                  "profile": repr(sys.getprofile())}))
"""


def test_handler_raising_inside_the_profile_step_keeps_the_fork_work():
    """A handler's exception that lands in the profile function between two
    steps (not inside a piece of the fork's work) leaves it only after the
    fork's work ran: the guard is restarted, no fork is left waiting
    (before the fix the exception left at once, CPython unset the profile
    function and the guard stayed off with the fork's work pending)."""
    out = subprocess.run([sys.executable, "-c", STEP_SCRIPT], capture_output=True, text=True,
                         timeout=WAIT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Logging error" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["placed"] == 1 and report["booms"] == 1, report
    assert report["running"] and report["waits"] == 0 and report["profile"] == "None", report
