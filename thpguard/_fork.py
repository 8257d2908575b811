"""The one module that hooks fork().

Other modules subscribe here instead of calling :func:`os.register_at_fork`
themselves, so the order of fork work is decided in one place: ``before``
callbacks run in ascending ``order``, the ``after_*`` callbacks in
descending order, mirroring them.

Forks that bypass Python (a C extension calling ``fork()``) do not run
these hooks. The native ``pthread_atfork`` handler counts every fork, so
:func:`check` notices such a child on its next call and runs the
``after_in_child`` callbacks late, with ``late=True``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable, Dict, Optional, Tuple

from . import _native

log = logging.getLogger("thpguard")

Callback = Optional[Callable[..., None]]

_subscribers: Dict[str, Tuple[int, Callback, Callback, Callback]] = {}
_lock = threading.Lock()


def subscribe(
    name: str,
    *,
    before: Callback = None,
    after_in_parent: Callback = None,
    after_in_child: Callback = None,
    order: int = 0,
) -> None:
    """Add (or replace) the fork callbacks registered under ``name``.

    ``after_in_child`` is called with one keyword argument, ``late``: True
    when the fork bypassed Python and is handled on a later :func:`check`.
    """
    with _lock:
        _subscribers[name] = (order, before, after_in_parent, after_in_child)


def unsubscribe(name: str) -> None:
    with _lock:
        _subscribers.pop(name, None)


def _ordered(reverse: bool):
    return [s for _, s in sorted(_subscribers.items(), key=lambda kv: kv[1][0], reverse=reverse)]


def _run(callback: Callback, **kwargs) -> None:
    try:
        callback(**kwargs)
    except Exception:  # a fork hook must never break the fork itself
        log.exception("thpguard fork callback %r failed", callback)


def _before() -> None:
    for _, before, _, _ in _ordered(reverse=False):
        if before:
            _run(before)


def _after_in_parent() -> None:
    for _, _, parent, _ in _ordered(reverse=True):
        if parent:
            _run(parent)


def _after_in_child(late: bool = False) -> None:
    global _lock
    _lock = threading.Lock()  # another parent thread may have held it
    if not late:
        _native.fork_claim()  # os.fork: this hook is the one handler
    for _, _, _, child in _ordered(reverse=True):
        if child:
            _run(child, late=late)


def check() -> bool:
    """Handle a fork that bypassed Python's hooks; True if there was one.

    Cheap (one native call); the guard calls it every tick.
    """
    # The claim is atomic: of several threads asking at once, one handles it.
    if not _native.fork_claim():
        return False
    log.info("fork without Python's at-fork hooks noticed in pid %d", os.getpid())
    _after_in_child(late=True)
    return True


def generation() -> int:
    """How many forks made this process (0 in the original process)."""
    return _native.fork_generation()


def in_exec_child() -> bool:
    """True in the child of :mod:`subprocess` that is about to exec.

    CPython runs the at-fork hooks in that child only when ``preexec_fn``
    is given (Modules/_posixsubprocess.c); work done for the child there
    is wasted, since exec replaces the process.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_execute_child" and code.co_filename.endswith("subprocess.py"):
            return True
        frame = frame.f_back
    return False


_native.atfork_install()
_native.fork_claim()  # nothing to handle for forks made before import
os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
