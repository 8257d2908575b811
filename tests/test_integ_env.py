"""Configuration without code changes: THPGUARD_* variables, end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "env_configured.py")


def run(**variables):
    env = {k: v for k, v in os.environ.items() if not k.startswith("THPGUARD_")}
    env["THPGUARD_REQUIRE_THP"] = os.environ.get("THPGUARD_REQUIRE_THP", "")
    env.update(variables)
    done = subprocess.run([sys.executable, EXAMPLE], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_guard_and_interval_from_environment(require_thp):
    """THPGUARD_GUARD=1 installs the guard at import, at the given interval; it repairs."""
    done = run(THPGUARD_GUARD="1", THPGUARD_GUARD_INTERVAL="0.02")
    assert "guard: running, interval: 0.02, policy: share" in done.stdout
    assert "child: split True, coverage 1.00 after waiting" in done.stdout


def test_without_variables_nothing_is_installed(require_thp):
    """No THPGUARD_GUARD: no guard, the split stays (the default is share)."""
    done = run()
    assert "guard: off, interval: None, policy: share" in done.stdout
    assert "child: split True, coverage 0.00 after waiting" in done.stdout


@pytest.mark.parametrize("policy", ["copy", "wipe", "share"])
def test_fork_policy_from_environment(require_thp, policy):
    """THPGUARD_FORK_POLICY sets the default policy of alloc() (and thpguard.numpy)."""
    done = run(THPGUARD_GUARD="1", THPGUARD_GUARD_INTERVAL="0.02", THPGUARD_FORK_POLICY=policy)
    assert f"policy: {policy}" in done.stdout
    if policy == "copy":
        # The child's pages are its own from the fork: writes split nothing.
        assert "child: split False, coverage 1.00 after waiting" in done.stdout
    elif policy == "wipe":
        # Empty in the child: each write faults in a fresh huge page.
        assert "child: split False, coverage 1.00 after waiting" in done.stdout
    else:
        assert "child: split True, coverage 1.00 after waiting" in done.stdout


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"THPGUARD_GUARD": "maybe"}, "THPGUARD_GUARD"),
        ({"THPGUARD_GUARD": "1", "THPGUARD_GUARD_INTERVAL": "soon"}, "THPGUARD_GUARD_INTERVAL"),
        ({"THPGUARD_FORK_POLICY": "sometimes"}, "THPGUARD_FORK_POLICY"),
    ],
)
def test_bad_values_are_reported_and_do_not_break_the_program(require_thp, variables, message):
    """A bad value is named on stderr; the program runs on with the default."""
    done = run(**variables)
    assert message in done.stderr
    assert "guard:" in done.stdout and "child:" in done.stdout
