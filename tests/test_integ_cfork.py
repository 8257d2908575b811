"""Forks made from C, which skip Python's at-fork hooks, are still handled.

uWSGI (without py-call-uwsgi-fork-hooks) forks its workers from C; so does a C
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

import pytest

from integ_servers import ANY_PORT, get, huge_bytes, pin_every_worker, serve, wait_for_workers, wait_huge
from conftest import WAIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TESTS = os.path.dirname(os.path.abspath(__file__))
UWSGI = shutil.which("uwsgi", path=os.path.dirname(sys.executable)) or shutil.which("uwsgi")
WORKERS = 2


def _uwsgi(mode):
    """argv and environment for uWSGI in one of the two documented setups."""
    env = dict(os.environ, THPGUARD_GUARD_INTERVAL="1.0", HOT_BYTES=str(8 << 20),
               PYTHONPATH=os.pathsep.join([EXAMPLES, TESTS]))
    env.pop("THPGUARD_GUARD", None)
    if mode in ("ini", "ini-uid"):
        # examples/uwsgi.ini, on a port the kernel picks: Python's fork hooks run.
        env["THPGUARD_GUARD"] = "1"
        argv = [UWSGI, "--ini", os.path.join(EXAMPLES, "uwsgi.ini"),
                "--workers", str(WORKERS), "--http-socket", ANY_PORT,
                "--module", "probe_app:application"]
    else:
        # Forks from C only; the guard starts in each worker (uwsgi_guard.py).
        argv = [UWSGI, "--master", "--workers", str(WORKERS), "--enable-threads",
                "--import", "uwsgi_guard", "--http-socket", ANY_PORT,
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
    if os.environ.get("THPGUARD_SANITIZED"):
        # docs/reliability.rst: GCC 12's AddressSanitizer runtime has no fork
        # handlers, and a uWSGI worker hung on its locks at start (fork-from-c
        # and ini-uid, about 1 sanitized suite run in 6; never without it).
        pytest.skip("uWSGI under AddressSanitizer: the runtime's locks are not fork-safe "
                    "(GCC 12); the plain run tests uWSGI")
    argv, env = _uwsgi(mode)
    with serve(argv, env=env, cwd=TESTS) as (master, port):
        _check_workers(master, port, python_hooks=mode != "fork-from-c",
                       copies_checked=mode != "ini-uid")


def _check_workers(master, port, python_hooks, copies_checked=True):
    workers = set(wait_for_workers(master.pid, WORKERS))
    state = get(port, "/state")
    start, size = state["address"], state["size"]

    # Each worker, pinned with its guard paused, has written one byte of a
    # block and of its copy region: smaps shows the split (the guard has not
    # seen it yet) and the copy whole.
    with pin_every_worker(port, sorted(workers)) as reports:
        before = {pid: huge_bytes(pid, start, start + size) for pid in workers}
        copies = {pid: huge_bytes(pid, r["copy_address"], r["copy_address"] + r["copy_size"])
                  for pid, r in reports.items()}
    for pid, r in reports.items():
        assert r["python_hooks_ran"] == python_hooks, r
        assert r["fork_generation"] == 1, r  # the native pthread_atfork counter
        assert r["guard_running"], r
        assert before[pid] == size - r["pmd_size"], (pid, before)
        # The copy region was copied in each worker before its write: no split.
        # (Not under --master-as-root, where the copy region is still found
        # split in the workers: a uWSGI fork path of its own, not covered here.)
        assert copies[pid] == r["copy_size"] or not copies_checked, (pid, copies)
    # Released, each worker's guard runs again and repairs its split.
    after = wait_huge(sorted(workers), start, size)
    assert after == {pid: size for pid in workers}, (before, after)
    assert huge_bytes(master.pid, start, start + size) == size


RAW_FORK = textwrap.dedent(
    """
    import ctypes, os, sys, time
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
            with current.paused():  # the split stays until the guard runs again
                shared.view()[0] = 1
                assert huge(shared) == shared.size - shared.pmd_size, "no split to repair"
            deadline = time.monotonic() + 60  # only ends a hang
            while huge(shared) < shared.size and time.monotonic() < deadline:
                assert current.wait_ticks(1, timeout=60), "the guard stopped ticking"
            assert huge(shared) == shared.size, "split not repaired"
            assert thpguard.stats()["splits_detected"] >= 1
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
    # Longer than the script's own minute-long waits, so a hang there ends
    # with its own message, not this timeout.
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=WAIT * 3)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "child ok 1" in done.stdout
