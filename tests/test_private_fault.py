"""A child that touches a `private` region's placeholder dies of SIGSEGV, as
designed, but first says which region, which policy and what to use instead;
other segmentation faults keep going to the handler installed before."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest


def _run(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if "ASAN_OPTIONS" in env:
        # Under tests/sanitize.sh: these crashes are intended, not reports.
        env["ASAN_OPTIONS"] += ":handle_segv=0"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=120, env=env)


CHILD_TOUCHES = """
    import os, sys, thpguard
    r = thpguard.alloc(4 << 20, fork="private", populate=False{name})
    v = r.view()
    pid = os.fork()
    if pid == 0:
        v[(3 << 20) + 5] = 7          # the placeholder in this child
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(r.address, r.address + r.size, os.WIFSIGNALED(status) and os.WTERMSIG(status))
"""


def test_child_touching_private_region_is_told_why():
    """The child dies of SIGSEGV after a message naming region, range, fault address and policy."""
    done = _run(CHILD_TOUCHES.format(name=', name="weights"'))
    start, end, sig = map(int, done.stdout.split())
    assert sig == signal.SIGSEGV, done.stderr
    message = done.stderr
    assert "touched the thpguard region 'weights'" in message
    assert f"at {start:#x}-{end:#x} (fault at {start + (3 << 20) + 5:#x})" in message
    assert "fork policy is 'private' (MADV_DONTFORK)" in message
    assert "fork='share'" in message and "fork='wipe'" in message


def test_unnamed_private_region_message():
    """Without a name the message gives the range alone."""
    done = _run(CHILD_TOUCHES.format(name=""))
    start, _end, sig = map(int, done.stdout.split())
    assert sig == signal.SIGSEGV and f"touched the thpguard region at {start:#x}-" in done.stderr


def test_other_faults_reach_the_previous_handler():
    """A fault outside every placeholder goes to the handler that was there (faulthandler)."""
    done = _run("""
        import ctypes, faulthandler, thpguard
        faulthandler.enable()
        r = thpguard.alloc(2 << 20, fork="private")
        ctypes.string_at(8)   # unmapped page 0, not a placeholder
    """)
    assert done.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in done.stderr
    assert "thpguard region" not in done.stderr


def test_handler_removed_with_the_last_placeholder():
    """Once the last private region is closed, SIGSEGV has its default action again, silently."""
    done = _run("""
        import ctypes, os, thpguard
        r = thpguard.alloc(2 << 20, fork="private")
        addr = r.address
        r.close()
        pid = os.fork()
        if pid == 0:
            ctypes.string_at(8)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(os.WTERMSIG(status))
    """)
    assert done.stdout.split() == [str(int(signal.SIGSEGV))] and "thpguard" not in done.stderr


def test_handler_comes_back_after_a_reset():
    """A crash handler that reset SIGSEGV to the default does not leave later regions unexplained."""
    done = _run("""
        import faulthandler, os, thpguard
        faulthandler.enable()
        first = thpguard.alloc(2 << 20, fork="private")
        faulthandler.disable()          # puts back what it saved: the default action
        first.close()
        r = thpguard.alloc(2 << 20, fork="private", name="later")
        v = r.view()
        pid = os.fork()
        if pid == 0:
            v[0] = 1
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(os.WTERMSIG(status))
    """)
    assert done.stdout.split() == [str(int(signal.SIGSEGV))]
    assert "touched the thpguard region 'later'" in done.stderr


def test_ignored_sigsegv_fault_dies_where_it_faulted():
    """With SIGSEGV ignored before, a real fault dies at its own address (not a jump to SIG_IGN's 0x1)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("needs strace to see the fault addresses the kernel reports")
    script = textwrap.dedent("""
        import ctypes, signal, thpguard
        signal.signal(signal.SIGSEGV, signal.SIG_IGN)
        r = thpguard.alloc(2 << 20, fork="private")
        ctypes.string_at(16)
    """)
    done = subprocess.run([strace, "-f", "-e", "trace=none", "-e", "signal=SIGSEGV", "-qq",
                           sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    faults = [line for line in done.stderr.splitlines() if "si_addr=" in line]
    assert faults and "+++ killed by SIGSEGV" in done.stderr, done.stderr
    assert all("si_addr=0x10}" in line for line in faults), faults


def test_real_fault_after_a_chaining_handler_and_a_new_region_dies_once():
    """A handler installed over ours (faulthandler), then a new private region: a real fault dies, no endless loop."""
    done = _run("""
        import ctypes, faulthandler, thpguard
        first = thpguard.alloc(2 << 20, fork="private")
        faulthandler.enable()          # saves our handler as the one to chain to
        first.close()
        later = thpguard.alloc(2 << 20, fork="private")
        ctypes.string_at(16)
    """)
    assert done.returncode == -signal.SIGSEGV, done.stderr[-2000:]
    assert done.stderr.count("Fatal Python error: Segmentation fault") == 1
