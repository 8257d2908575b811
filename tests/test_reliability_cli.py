"""The command line against processes that are not what it expects (zombies,
kernel threads, processes that exit mid-scan) and against values that used
to escape its checks (tiny self-test sizes, infinite intervals)."""

import os
import random
import subprocess
import sys
import threading

import pytest

from thpguard import cli, kernel
from conftest import (WAIT, communicate_within, readline_within, skip_thp, stop_process, wait_child,
                      wait_until)

KTHREAD = 0x00200000  # PF_KTHREAD in /proc/PID/stat flags (include/linux/sched.h)


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def zombie():
    """A child that has exited and is not reaped yet (State: Z)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        # WNOWAIT: see that it has exited, and leave it unreaped.
        wait_until(lambda: os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT),
                   f"child {pid} to exit")
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
        yield pid
    finally:
        wait_child(pid, "the zombie to be reaped")


def _kernel_thread() -> int:
    for name in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[6]) & KTHREAD:
            return int(name)
    pytest.skip("no kernel thread visible in /proc")


@pytest.mark.parametrize("command", [["watch", "--count", "1"], ["guard", "--once"], ["status"]])
def test_zombie_is_named(zombie, command, capsys):
    """watch, guard and status on a zombie say so in one line and exit 3."""
    code, out, err = _run(capsys, command[0], *command[1:], str(zombie))
    assert code == cli.EXIT_NO_ACCESS, (out, err)
    assert "zombie" in err and str(zombie) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["watch", "--count", "1"], ["guard", "--once"], ["status"]])
def test_kernel_thread_is_named(command, capsys):
    """watch, guard and status on a kernel thread say it is one and exit 3."""
    if os.geteuid() != 0 and command[0] == "guard":
        pytest.skip("guard checks its privileges first")
    pid = _kernel_thread()
    code, out, err = _run(capsys, command[0], *command[1:], str(pid))
    assert code == cli.EXIT_NO_ACCESS, (out, err)
    assert "kernel thread" in err and str(pid) in err
    assert "No such process" not in err


def _target_code():
    # Many VMAs make one scan long enough for the exit to land inside it.
    return ("import mmap, sys, time\n"
            "maps = [mmap.mmap(-1, 8192) for _ in range(3000)]\n"
            "for m in maps: m[0] = 1\n"
            "print('ready', flush=True)\n"
            "delay = float(sys.stdin.readline())\n"
            "time.sleep(delay)\n")


@pytest.mark.parametrize("command", ["watch", "guard"])
def test_process_exiting_mid_scan(command):
    """10 targets that exit at a random moment while watch/guard scan them
    every millisecond: every run ends with exit 0, never a traceback."""
    if command == "guard" and os.geteuid() != 0:
        pytest.skip("guard needs CAP_SYS_NICE")
    rng = random.Random(13)
    bad = []
    for _ in range(10):
        target = subprocess.Popen([sys.executable, "-c", _target_code()], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        watcher = None
        try:
            assert readline_within(target, target.stdout, "the target's ready line").strip() == "ready"
            watcher = subprocess.Popen([sys.executable, "-m", "thpguard", command, "--json",
                                        "--interval", "0.001", str(target.pid)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # One pass done: the target was seen alive.
            first = readline_within(watcher, watcher.stdout, f"{command}'s first pass")
            target.stdin.write(f"{rng.uniform(0, 0.03)}\n")
            target.stdin.flush()
            # Reap at once sometimes (the /proc entry vanishes), sometimes late (a zombie).
            if rng.random() < 0.5:
                target.wait(timeout=WAIT)
            out, err = communicate_within(watcher, f"{command} to exit once its target was gone")
            target.wait(timeout=WAIT)
        finally:
            for proc in (watcher, target):
                if proc is not None:
                    stop_process(proc)
        if watcher.returncode != 0 or "Traceback" in err or not first:
            bad.append((watcher.returncode, out[-200:], err[-600:]))
    assert not bad, bad


@pytest.mark.parametrize("size", ["2M", "1M", "4K"])
def test_verify_small_sizes_are_certain(require_thp, size):
    """`verify --size 2M` or smaller (one huge page per region) gives the
    same verdict as the default size on this host: CERTAIN when that is."""
    default = subprocess.run([sys.executable, "-m", "thpguard", "verify", "--quiet"],
                             capture_output=True, text=True, timeout=300)
    if not default.stdout.startswith("CERTAIN"):
        skip_thp(f"this host is not certain at the default size: {default.stdout.strip()}")
    out = subprocess.run([sys.executable, "-m", "thpguard", "verify", "--size", size],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].startswith("CERTAIN"), out.stdout


@pytest.mark.parametrize("command", [["watch", "1", "--count", "1"], ["guard", "1", "--once"]])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e308", "1e400", "infinity"])
def test_interval_must_be_finite(command, value, capsys):
    """--interval inf, nan or beyond a year is a usage error naming the
    value, never an OverflowError."""
    code, out, err = _run(capsys, *command, f"--interval={value}")
    assert code == cli.EXIT_USAGE
    assert "--interval" in err and value in err
    assert "Traceback" not in err and "Overflow" not in err
