"""``thpguard run -- CMD ...``: start a program with thpguard configured.

The program is executed (``exec``, same pid) with the ``THPGUARD_*``
variables set, so a Python program that imports thpguard installs the
guard at import and allocates with the chosen default fork policy,
without a code change. Unlike setting the variables by hand, the values
are checked here first: a typo is an error now, not a log line later.
It configures only programs that import thpguard themselves (directly or
through a library); nothing is injected into other processes.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Dict, List, Mapping, Optional, Sequence

from thpguard.errors import InvalidArgumentError, InvalidTypeError
from thpguard.guard import (
    DEFAULT_INTERVAL,
    ENV_GUARD,
    ENV_GUARD_INTERVAL,
    Guard,
    _check_seconds,
    install,
)
from thpguard.region import ENV_FORK_POLICY, _check_policy

__all__ = ["ENV_GUARD", "ENV_GUARD_INTERVAL", "ENV_FORK_POLICY", "environment", "run"]


def environment(
    *,
    guard: bool = True,
    interval: Optional[float] = None,
    fork_policy: Optional[str] = None,
    base: Optional[Mapping[str, str]] = None,
) -> Dict[str, str]:
    """The environment for :func:`run`: ``base`` (default ``os.environ``) plus
    the ``THPGUARD_*`` variables for these settings.

    ``guard`` sets ``THPGUARD_GUARD=1`` (False sets ``0``); ``interval``
    (seconds, > 0) sets ``THPGUARD_GUARD_INTERVAL``; ``fork_policy`` (one of
    ``share``, ``copy``, ``wipe``, ``private``) sets ``THPGUARD_FORK_POLICY``.
    Settings left None keep whatever ``base`` has.
    """
    env = dict(os.environ if base is None else base)
    if not isinstance(guard, bool):
        raise InvalidTypeError(f"guard must be True or False, got {guard!r}")
    env[ENV_GUARD] = "1" if guard else "0"
    if interval is not None:
        # The guard's own check: what passes here, the guard accepts.
        env[ENV_GUARD_INTERVAL] = repr(_check_seconds("interval", interval))
    if fork_policy is not None:
        env[ENV_FORK_POLICY] = _check_policy(fork_policy)
    return env


def run(
    command: Sequence[str],
    *,
    guard: bool = True,
    interval: Optional[float] = None,
    fork_policy: Optional[str] = None,
) -> None:
    """Replace this process by ``command`` with thpguard configured.

    Returns only by raising: :class:`~thpguard.errors.InvalidArgumentError`
    for bad settings or an empty command, :class:`FileNotFoundError` when
    the program is not found on ``PATH``.
    """
    argv: List[str] = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InvalidArgumentError("no command given: thpguard run [options] -- PROGRAM [ARGS...]")
    env = environment(guard=guard, interval=interval, fork_policy=fork_policy)
    program = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
    if program is None:
        raise FileNotFoundError(2, f"program not found on PATH: {argv[0]}", argv[0])
    os.execve(program, argv, env)


log = logging.getLogger("thpguard")

# -- THPGUARD_GUARD at import ----------------------------------------------------------

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _install_from_environment() -> Optional[Guard]:
    """Install the guard when ``THPGUARD_GUARD`` asks for it; never raises."""
    raw = os.environ.get(ENV_GUARD, "").strip().lower()
    if raw in _FALSE:
        return None
    if raw not in _TRUE:
        log.error("%s=%r not understood: expected 1 or 0 (or true/false, yes/no, on/off); "
                  "the guard stays off", ENV_GUARD, os.environ.get(ENV_GUARD))
        return None
    interval = DEFAULT_INTERVAL
    raw_interval = os.environ.get(ENV_GUARD_INTERVAL, "").strip()
    if raw_interval:
        try:
            interval = _check_seconds(ENV_GUARD_INTERVAL, float(raw_interval))
        except ValueError as exc:
            problem = str(exc) if isinstance(exc, InvalidArgumentError) else (
                f"{ENV_GUARD_INTERVAL} must be a number of seconds, got {raw_interval!r}")
            log.error("%s; using the default, %s s", problem, DEFAULT_INTERVAL)
            interval = DEFAULT_INTERVAL
    try:
        return install(interval)
    except Exception:  # the importing service must keep running
        log.exception("could not install the guard from %s", ENV_GUARD)
        return None
