"""thpguard.launch: exec a program with the THPGUARD_* variables, checked first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import thpguard
from thpguard import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "env_configured.py")


def test_environment_sets_the_variables():
    """environment() adds exactly the documented variables to the base."""
    env = launch.environment(interval=0.25, fork_policy="copy", base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "THPGUARD_GUARD": "1", "THPGUARD_GUARD_INTERVAL": "0.25",
                   "THPGUARD_FORK_POLICY": "copy"}
    assert launch.environment(guard=False, base={})["THPGUARD_GUARD"] == "0"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"interval": 0}, ValueError),
        ({"interval": float("nan")}, ValueError),
        ({"interval": "1"}, TypeError),
        ({"fork_policy": "sometimes"}, ValueError),
        ({"guard": "yes"}, TypeError),
    ],
)
def test_bad_settings_are_refused_before_exec(kwargs, error):
    with pytest.raises(error) as info:
        launch.environment(**kwargs)
    assert isinstance(info.value, thpguard.ThpguardError)


def test_run_refuses_empty_and_unknown_commands():
    with pytest.raises(ValueError, match="no command"):
        launch.run(["--"])
    with pytest.raises(FileNotFoundError, match="not found"):
        launch.run(["thpguard-no-such-program-x"])


def test_run_configures_an_unchanged_program(require_thp):
    """run() execs the program: its guard runs at the interval, with the policy given."""
    code = ("import sys; from thpguard import launch; "
            f"launch.run(['--', sys.executable, {EXAMPLE!r}], interval=0.02, fork_policy='share')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("THPGUARD_GUARD")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "guard: running, interval: 0.02, policy: share" in done.stdout
    assert "child: split True, coverage 1.00 after waiting" in done.stdout
