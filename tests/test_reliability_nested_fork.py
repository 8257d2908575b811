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
import json, os, signal, sys, time
import thpguard

if sys.argv[1] == "guard":
    thpguard.install(interval=0.05)
region = thpguard.alloc(4 << 20)
made = reaped = 0

def spawn():
    global made
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    made += 1

def on_chld(signum, frame):
    global reaped
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped += 1
    if made < 60:
        spawn()

signal.signal(signal.SIGCHLD, on_chld)
for _ in range(4):
    spawn()
deadline = time.monotonic() + 60
while (made < 60 or reaped < made) and time.monotonic() < deadline:
    time.sleep(0.01)
g = thpguard.guard()
print(json.dumps({"made": made, "reaped": reaped,
                  "guard_running": g is not None and g.running}), flush=True)
region.close()
"""


@pytest.mark.parametrize("guard", ["guard", "noguard"])
@pytest.mark.parametrize("run", range(3))
def test_sigchld_handler_that_forks(guard, run):
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT, guard], capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process hung (a nested fork's hooks deadlocked): {exc.stderr!r}")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["made"] == 60 and report["reaped"] == 60, report
    if guard == "guard":
        assert report["guard_running"], report
