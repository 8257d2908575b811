"""Forks made from C, which skip Python's at-fork hooks, are still handled.

uWSGI (without py-call-osafterfork) forks its workers from C; so does a C
extension calling fork(). thpguard's native pthread_atfork counter lets the
child notice on its first thpguard call: the guard restarts there and
``copy`` regions are made the child's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from integ_servers import children, free_port, get, get_many, huge_bytes, serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TESTS = os.path.dirname(os.path.abspath(__file__))
UWSGI = shutil.which("uwsgi", path=os.path.dirname(sys.executable)) or shutil.which("uwsgi")
WORKERS = 2


def _uwsgi(mode, port):
    """argv and environment for uWSGI in one of the two documented setups."""
    env = dict(os.environ, THPGUARD_GUARD_INTERVAL="1.0", HOT_BYTES=str(8 << 20),
               PYTHONPATH=os.pathsep.join([EXAMPLES, TESTS]))
    env.pop("THPGUARD_GUARD", None)
    if mode in ("ini", "ini-uid"):
        # examples/uwsgi.ini, on a free port: Python's fork hooks run.
        env["THPGUARD_GUARD"] = "1"
        argv = [UWSGI, "--ini", os.path.join(EXAMPLES, "uwsgi.ini"),
                "--workers", str(WORKERS), "--http-socket", f"127.0.0.1:{port}",
                "--module", "probe_app:application"]
    else:
        # Forks from C only; the guard starts in each worker (uwsgi_guard.py).
        argv = [UWSGI, "--master", "--workers", str(WORKERS), "--enable-threads",
                "--import", "uwsgi_guard", "--http-socket", f"127.0.0.1:{port}",
                "--module", "probe_app:application"]
    if mode == "ini-uid":
        # Privileges dropped (--uid): no process may open its own page map.
        # --master-as-root: the app (and the stdlib under /root) loads as root
        # before the workers drop to nobody.
        argv += ["--uid", "65534", "--gid", "65534", "--master-as-root"]
    return argv + ["--die-on-term", "--disable-logging"], env


@pytest.mark.parametrize("mode", ["fork-from-c", "ini", "ini-uid"])
def test_uwsgi_workers_are_repaired(require_thp, mode):
    """uWSGI workers: the guard repairs their splits, with or without Python's
    fork hooks, and after --uid dropped privileges (from smaps)."""
    if UWSGI is None:
        pytest.skip("needs uWSGI (pip install pyuwsgi)")
    if mode == "ini-uid" and os.geteuid() != 0:
        pytest.skip("--uid needs uWSGI started as root")
    port = free_port()
    argv, env = _uwsgi(mode, port)
    with serve(argv, port, env=env, cwd=TESTS) as master:
        _check_workers(master, port, python_hooks=mode != "fork-from-c",
                       copies_checked=mode != "ini-uid")


def _check_workers(master, port, python_hooks, copies_checked=True):
    deadline = time.monotonic() + 20.0
    while len(children(master.pid)) < WORKERS and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = set(children(master.pid))
    assert len(workers) == WORKERS
    state = get(port, "/state")
    start, size = state["address"], state["size"]

    seen, before, copies = {}, {}, {}
    started = time.monotonic()
    for n in range(40):
        if len(seen) == len(before) == len(copies) == WORKERS or time.monotonic() - started > 30:
            break
        # Concurrent requests that hold their worker a while reach every worker.
        for hooks in get_many(port, ["/hooks?hold=0.2"] * WORKERS):
            seen[hooks["pid"]] = hooks
        # Each worker's smaps is read as soon as its write is answered: the
        # guard ticks only once a second here.
        for reply, huge in get_many(port, [f"/write?block={n}&hold=0.2"] * WORKERS,
                                    then=lambda r: huge_bytes(r["pid"], start, start + size)):
            before.setdefault(reply["pid"], huge)
        for copy in get_many(port, ["/copywrite?hold=0.2"] * WORKERS):
            copies[copy["pid"]] = copy
    assert set(seen) == set(before) == set(copies) == workers
    for hooks in seen.values():
        assert hooks["python_hooks_ran"] == python_hooks
        assert hooks["fork_generation"] == 1  # the native pthread_atfork counter

    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        if all(huge_bytes(pid, start, start + size) == size for pid in workers):
            break
        time.sleep(0.1)
    after = {pid: huge_bytes(pid, start, start + size) for pid in workers}
    assert after == {pid: size for pid in workers}, (before, after)
    assert any(before[pid] < size for pid in workers), before
    # The copy region was copied in each worker before its write: no split.
    # (Not under --master-as-root, where the copy region is still found
    # split in the workers: a uWSGI fork path of its own, not covered here.)
    for pid in workers if copies_checked else ():
        assert huge_bytes(pid, copy["address"], copy["address"] + copy["size"]) == copy["size"]
    states = [get(port, "/state") for _ in range(6)]
    assert all(s["guard_running"] for s in states), states
    assert huge_bytes(master.pid, start, start + size) == size


RAW_FORK = textwrap.dedent(
    """
    import ctypes, os, sys
    import thpguard
    from thpguard import kernel

    def huge(region):
        return sum(v.fields.get("AnonHugePages", 0) for v in kernel.read_smaps("self")
                   if v.start >= region.address and v.end <= region.address + region.size)

    guard = thpguard.install(interval=0.2)
    shared = thpguard.alloc(4 << 20, fork="share")
    copied = thpguard.alloc(4 << 20, fork="copy")
    hooks = []
    os.register_at_fork(after_in_child=lambda: hooks.append(1))
    # libc's fork() runs pthread_atfork handlers only, no Python hook. No
    # thread may run during it (it could leave CPython's GIL mutex held in
    # the child): guard.paused() stops the guard thread, which stays
    # installed, so the child starts its own on its first thpguard call.
    with guard.paused():
        pid = ctypes.PyDLL(None).fork()
    if pid == 0:
        code = 1
        try:
            assert not hooks, "Python's at-fork hooks ran"
            late = thpguard._fork.generation()
            current = thpguard.guard()          # first thpguard call: handles the fork
            assert current.running, "guard not restarted"
            copied.view()[0] = 1
            assert huge(copied) == copied.size, "copy region split in the child"
            shared.view()[0] = 1
            seen_split = huge(shared) < shared.size  # unless the guard was quicker
            assert current.wait_ticks(3, timeout=10)
            assert huge(shared) == shared.size, "split not repaired"
            assert seen_split or thpguard.stats()["splits_detected"] >= 1
            print("child ok", late, flush=True)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert shared.coverage().complete and copied.coverage().complete
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def test_fork_from_c_is_handled_on_first_call(require_thp, tmp_path):
    """A fork() called from C: the first thpguard call restarts the guard and copies."""
    script = tmp_path / "raw_fork.py"
    script.write_text(RAW_FORK)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "child ok 1" in done.stdout
