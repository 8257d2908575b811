"""The one module that hooks fork().

Other modules subscribe here instead of calling :func:`os.register_at_fork`
themselves, so the order of fork work is decided in one place: ``before``
callbacks run in ascending ``order``, the ``after_*`` callbacks in
descending order, mirroring them.

Signals with a Python handler (SIGINT, SIGTERM, a SIGALRM of
``signal.setitimer``...) that arrive while the hooks run (the parent
waiting for a ``copy`` child, the child copying) are held: their handlers
are replaced by a recorder from the first ``before`` callback to the last
``after_*`` callback, in the parent and in the child (which inherits the
recorder), every callback finishes, and the signals go to their handlers
once ``os.fork()`` has returned and the caller has stored its result: at
the first function call or return after the statement that called fork()
(raising on the fork line itself would lose the child's pid). CPython
ignores exceptions raised inside at-fork hooks ("Exception ignored in"),
so raising there would lose the signal and skip the callbacks after it.

Forks that bypass Python (a C extension calling ``fork()``) do not run
these hooks. The native ``pthread_atfork`` handler counts every fork, so
:func:`check` notices such a child on its next call and runs the
``after_in_child`` callbacks late, with ``late=True``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _native
from ._forksignals import _adopt_inherited, _hold, _holding, _release, _when_returned
from ._forksignals import deferred as signals_deferred  # noqa: F401 (used by the guard)

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

    def _for_child(self, caught: Optional[List[int]] = None) -> None:
        # A lock another parent thread held at fork stays held forever in the
        # child, where that thread does not exist: every entry is rebuilt.
        self._lock = threading.Lock()
        items, self._items = self._items, {}
        for key, obj in items.items():
            inherit = self._inherit.get(key)
            if inherit is not None:
                try:
                    self._items[key] = inherit(obj)
                except KeyboardInterrupt:
                    if caught is None:
                        raise
                    if signal.SIGINT not in caught:  # delivered after fork() returns
                        caught.append(signal.SIGINT)
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


def _run_all(callbacks, **kwargs) -> None:
    for callback in callbacks:
        if callback:
            _run(callback, **kwargs)


def _hook_caller():
    """In a fork hook (called from C): the Python frame that called
    os.fork(), or None where fork() came from C with no Python frame below."""
    try:
        return sys._getframe(2)
    except ValueError:
        return None


_AS_HOOK = object()  # _before called by CPython, not by a stand-in hook


def _fork_key(caller) -> tuple:
    """What tells one fork from another: the frame that called os.fork()
    and where in it (a nested fork made by a handler has the handler's)."""
    return (caller, caller.f_lasti if caller is not None else -1)


def _before(caller=_AS_HOOK) -> None:
    # Held from the first before-fork callback to the last after-fork one,
    # in both processes: CPython reports an exception raised in any at-fork
    # hook as "Exception ignored" and drops it (and the signal with it).
    # The hold names its fork (_fork_key): the _BEFORE_AGAIN hooks run this
    # hook again only when the hold in place is not this fork's, never
    # because of a nested fork (a handler that forks while this hook runs,
    # in _hold before its signal is swapped) whose hooks ran meanwhile: the
    # before-fork callbacks take non-reentrant locks.
    if caller is _AS_HOOK:
        caller = _hook_caller()
    held = None
    try:
        held = _hold()
        held.fork = _fork_key(caller)
        _run_all((before for _, before, _, _ in _ordered(reverse=False)), caught=held.caught)
    except BaseException as exc:  # a handler's, before the hold was in place
        if held is None:
            # A _BEFORE_AGAIN hook runs this one again; its hold raises this then.
            _holding.early = getattr(_holding, "early", []) + [exc]
        elif isinstance(exc, KeyboardInterrupt):
            if signal.SIGINT not in held.caught:
                held.caught.append(signal.SIGINT)
        else:
            held.raised.append(exc)


class _Unraisable:
    """Wraps ``sys.unraisablehook``: an exception a program's signal handler
    raised on entry to :func:`_before` or one of ``_BEFORE_AGAIN`` (before any
    of their code, so they cannot
    catch it) is kept, and :func:`_hold` raises it again once fork() has
    returned; anything else goes to the hook that was there."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, unraisable) -> None:
        # By identity: the object of another report may compare in odd ways.
        if any(unraisable.object is hook for hook in (_before,) + _BEFORE_AGAIN) \
                and unraisable.exc_value is not None:
            _holding.early = getattr(_holding, "early", []) + [unraisable.exc_value]
            return
        self.inner(unraisable)


def _catch_unraisable() -> None:
    if not isinstance(sys.unraisablehook, _Unraisable):  # the program set its own since
        sys.unraisablehook = _Unraisable(sys.unraisablehook)


def _make_before_again(i: int) -> Callable[[], None]:
    """The i-th of :data:`_BEFORE_AGAIN` (the 0th runs last)."""

    def before_again() -> None:
        # A signal that arrived just before fork() runs its handler on entry
        # to the first hook, before any code of it; if that raised, CPython
        # dropped the exception and skipped the hook: run it now (these
        # hooks run next), unless the hold in place is this fork's.
        caller = _hook_caller()
        held = getattr(_holding, "held", None)
        if held is None or held.fork != _fork_key(caller):
            _before(caller)
        if i == 0:
            # The before phase is over: a hold left in place (its after-fork
            # hook skipped) must not pass for a later fork from the same line.
            held = getattr(_holding, "held", None)
            if held is not None:
                held.fork = None
        _catch_unraisable()

    before_again.__name__ = before_again.__qualname__ = f"_before_again{i}"
    return before_again


#: Three chances for a skipped _before: a second signal whose handler raises
#: can arrive on entry to the hook that was to run it (seen at a SIGALRM
#: every 0.3 ms on a busy host: no hold, and then no fork work at all).
_BEFORE_AGAIN = tuple(_make_before_again(i) for i in range(3))


def _after_in_parent() -> None:
    held = getattr(_holding, "held", None) or _hold()  # a fork whose before hook did not run
    try:
        for _, _, parent, _ in _ordered(reverse=True):
            if parent:
                _run(parent, held.caught)
    finally:
        _release(_hook_caller())


def _after_in_child(late: bool = False) -> None:
    global _lock
    held = None
    if not late:
        # The child inherits the recorder as its handler; what the parent
        # recorded before fork() is the parent's to deliver.
        held = getattr(_holding, "held", None)
        # Forked from a thread that was not the parent's main one (or with
        # no hold from before fork): the handlers here may be recorders of
        # the parent's main thread, which no code in this child ends.
        foreign = held is None or not held.main
        held = held or _hold()
        held.caught.clear()
        held.raised = []
        if foreign:
            _adopt_inherited(held)
    try:
        _lock = threading.Lock()  # another parent thread may have held it
        state._for_child(None if late else held.caught)
        if not late:
            _native.fork_claim()  # os.fork: this hook is the one handler
        # late: check() runs outside any fork hook, so its callbacks may raise as usual.
        for _, _, _, child in _ordered(reverse=True):
            if child:
                _run(child, held.caught if not late else None, late=late)
    finally:
        if not late:
            _release(_hook_caller())


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
    _when_returned(frame.f_back if frame is not None else None, callback=callback)


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


_catch_unraisable()
_native.atfork_install()
_native.fork_claim()  # nothing to handle for forks made before import
for _again in _BEFORE_AGAIN:  # before callbacks run last registered first
    os.register_at_fork(before=_again)
os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
