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
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from . import _native

log = logging.getLogger("thpguard")

Callback = Optional[Callable[..., None]]


class ProcessState:
    """Everything a process owns that a child must not simply inherit.

    Modules keep their per-process objects (counters, locks, caches, the
    pagemap descriptor) here instead of in module globals: :meth:`get`
    makes one on first use, and after ``fork()`` the child starts with what
    each entry's ``inherit`` function makes of the parent's object, or with a
    fresh one from ``factory`` (the default). Nothing else rebinds module
    state across fork.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: Dict[str, Any] = {}
        self._inherit: Dict[str, Optional[Callable[[Any], Any]]] = {}

    def get(self, key: str, factory: Callable[[], Any],
            inherit: Optional[Callable[[Any], Any]] = None) -> Any:
        """This process's object under ``key``; made by ``factory`` on first use.

        ``inherit(parent_object)`` gives the child's object after fork; without
        it a child starts from ``factory()``.
        """
        try:
            return self._items[key]
        except KeyError:
            pass
        with self._lock:
            if key not in self._items:
                self._items[key] = factory()
                self._inherit[key] = inherit
            return self._items[key]

    def _for_child(self) -> None:
        # A lock another parent thread held at fork stays held forever in the
        # child, where that thread does not exist: every entry is rebuilt.
        self._lock = threading.Lock()
        items, self._items = self._items, {}
        for key, obj in items.items():
            inherit = self._inherit.get(key)
            if inherit is not None:
                try:
                    self._items[key] = inherit(obj)
                except Exception:  # a fork hook must never break the fork itself
                    log.exception("thpguard: per-process state %r not carried into the child", key)


#: The one per-process state (see :class:`ProcessState`).
state = ProcessState()

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


def _run_all(callbacks, **kwargs) -> None:
    # Ctrl-C inside one `before` hook must not skip the others (the region
    # layer's fork lock, the guard's stop): every hook runs, then the first
    # interruption goes on. The after-fork hooks hold the signals instead.
    interrupted: Optional[BaseException] = None
    for callback in callbacks:
        if callback:
            try:
                _run(callback, **kwargs)
            except BaseException as exc:
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _before() -> None:
    _run_all(before for _, before, _, _ in _ordered(reverse=False))


def _after_in_parent() -> None:
    with _signals_held(sys._getframe(1)) as caught:
        for _, _, parent, _ in _ordered(reverse=True):
            if parent:
                _run(parent, caught)


def _after_in_child(late: bool = False) -> None:
    global _lock
    _lock = threading.Lock()  # another parent thread may have held it
    state._for_child()
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


def after_fork_returns(callback: Callable[[], None]) -> None:
    """Call ``callback`` in the parent once ``fork()`` has returned to its caller.

    For threads stopped before fork (the guard): Python 3.13 checks whether
    the parent is multi-threaded, and warns, after the at-fork hooks have run
    (Modules/posixmodule.c, warn_about_fork_with_threads), so a thread
    started inside a hook would trigger the warning. A one-shot profile
    function waits for the first event in the frame that called fork() (its
    ``c_return``), runs ``callback`` and removes itself. Where a profiler is
    already set, or the caller is unknown, ``callback`` runs at once.
    """
    frame = sys._getframe()
    while frame is not None and frame.f_code is not _after_in_parent.__code__:
        frame = frame.f_back
    caller = frame.f_back if frame is not None else None
    if caller is None or sys.getprofile() is not None:
        callback()  # never displace a profiler (3.13 may then warn)
        return

    def profile(frame, event, arg):
        at = caller
        while at is not None and at is not frame:
            at = at.f_back
        if at is None:
            return  # still inside the fork hooks
        sys.setprofile(None)
        callback()

    sys.setprofile(profile)


def wait_task_gone(tid: Optional[int]) -> None:
    """Wait until the kernel has removed a joined thread.

    ``Thread.join`` returns when the thread's Python code is done, a few
    microseconds before the kernel task exits; forking in that window
    forks a process that still has two threads.
    """
    if tid is None:
        return
    path = f"/proc/self/task/{tid}"
    # Its exit is a few instructions away, but a busy machine may not run
    # it for a while; the deadline only guards against a reused thread id.
    deadline = time.monotonic() + 60.0
    pause = 0.00005
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, 0.001)


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
