"""The one module that hooks fork().

Other modules subscribe here instead of calling :func:`os.register_at_fork`
themselves, so the order of fork work is decided in one place: ``before``
callbacks run in ascending ``order``, the ``after_*`` callbacks in
descending order, mirroring them.

SIGINT and SIGTERM that arrive while the hooks run (the parent waiting
for a ``copy`` child, the child copying) are held: Python handlers for them
are replaced by a recorder for the duration, every callback finishes, and
the signals are sent again to the forking thread once ``os.fork()`` has
returned, so ``KeyboardInterrupt`` (or the program's own handler) comes
from the line that called it. CPython ignores exceptions raised inside
at-fork hooks ("Exception ignored in"), so raising there would lose the
signal and skip the callbacks after it.

Forks that bypass Python (a C extension calling ``fork()``) do not run
these hooks. The native ``pthread_atfork`` handler counts every fork, so
:func:`check` notices such a child on its next call and runs the
``after_in_child`` callbacks late, with ``late=True``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

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


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _run(callback: Callback, caught: Optional[List[int]] = None, **kwargs) -> None:
    try:
        callback(**kwargs)
    except KeyboardInterrupt:
        if caught is None:
            raise  # not inside a fork hook: raise as usual
        # SIGINT before the recorder was in place: deliver it after fork too.
        if signal.SIGINT not in caught:
            caught.append(signal.SIGINT)
    except Exception:  # a fork hook must never break the fork itself
        log.exception("thpguard fork callback %r failed", callback)


def _deliver_after_return(signums: List[int], caller) -> None:
    """Send ``signums`` to this thread once the frame ``caller`` has moved
    past its call of os.fork() (or left the stack); at most 10 s later."""
    target = threading.get_ident()
    lasti = caller.f_lasti if caller is not None else None

    def deliver() -> None:
        deadline = time.monotonic() + 10.0
        while caller is not None and time.monotonic() < deadline:
            at = sys._current_frames().get(target)
            while at is not None and at is not caller:
                at = at.f_back
            if at is None or caller.f_lasti != lasti:
                break
            time.sleep(0.001)
        for signum in signums:
            try:
                signal.pthread_kill(target, signum)
            except (OSError, ValueError):
                os.kill(os.getpid(), signum)

    threading.Thread(target=deliver, name="thpguard-fork-signal", daemon=True).start()


@contextlib.contextmanager
def _signals_held(caller) -> Iterator[List[int]]:
    """Record SIGINT/SIGTERM instead of running their Python handlers while
    the block runs; re-send them once fork() returned to ``caller``.

    Signals left to the kernel (SIG_DFL, SIG_IGN) and handlers installed
    outside Python are not touched; in a thread that may not set handlers
    (not the main one) nothing is held.
    """
    caught: List[int] = []
    saved = {}

    def record(signum, frame) -> None:
        if signum not in caught:
            caught.append(signum)

    try:
        for signum in _HELD_SIGNALS:
            old = signal.getsignal(signum)
            if callable(old):
                signal.signal(signum, record)
                saved[signum] = old
    except ValueError:  # signal.signal only works in the main thread
        pass
    try:
        yield caught
    finally:
        # Restore last: a signal between here and fork()'s return would run
        # its handler inside this hook, where CPython drops the exception.
        for signum, old in saved.items():
            signal.signal(signum, old)
        if caught:
            _deliver_after_return(caught, caller)


def _before() -> None:
    for _, before, _, _ in _ordered(reverse=False):
        if before:
            _run(before)


def _after_in_parent() -> None:
    with _signals_held(sys._getframe(1)) as caught:
        for _, _, parent, _ in _ordered(reverse=True):
            if parent:
                _run(parent, caught)


def _after_in_child(late: bool = False) -> None:
    global _lock
    _lock = threading.Lock()  # another parent thread may have held it
    if not late:
        _native.fork_claim()  # os.fork: this hook is the one handler
    # os.fork: the caller of this hook called fork(); late: check() runs
    # outside any fork hook, so its callbacks may raise as usual.
    held = contextlib.nullcontext([]) if late else _signals_held(sys._getframe(1))
    with held as caught:
        for _, _, _, child in _ordered(reverse=True):
            if child:
                _run(child, caught if not late else None, late=late)


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
