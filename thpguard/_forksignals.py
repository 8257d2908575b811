"""Signals held while fork()'s hooks run (see :mod:`thpguard._fork`).

From the first before-fork callback until ``os.fork()`` has returned to
its caller and the caller stored the pid, the Python handlers of every
signal are replaced by a recorder (:class:`_Held`), in the parent and, by
inheritance, in the child; then the real handlers go back and what was
recorded is raised again in the forking thread. ``sys.setprofile`` tells
when fork() has returned (:func:`_when_returned`), for each of several
nested forks (a handler that forks as another fork ends); recorded
signals are marked as arrived for their handlers
(``_thread.interrupt_main``), so they run at the interpreter's next check
with no thread or timer involved. Only where another profiler is set does
a thread watch the caller's frame instead (:func:`_deliver_after_return`).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import _signal

# The C functions under signal.getsignal/signal.signal: no Python code (no
# point where a handler may run) between two swaps of _hold.
_getsignal, _setsignal = _signal.getsignal, _signal.signal

log = logging.getLogger("thpguard")


# Every signal a Python handler may take: its handler would run (and may
# raise) inside a hook, between two steps of the fork's work.
_HELD_SIGNALS = sorted(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))


# Python 3.10 added interrupt_main(signum) (PyErr_SetInterruptEx).
_INTERRUPT_TAKES_SIGNUM = sys.version_info >= (3, 10)


def _trip(signums: List[int]) -> None:
    """Mark ``signums`` as arrived for their Python handlers, in the main
    thread, all in one C call, as signals that arrived just now: the
    handlers run at the interpreter's next check (in the main thread, just
    after this call), in order, and one that raises leaves the others
    pending, as CPython does. (Python 3.9 runs each handler as its signal
    is raised: one that raises there drops the rest.) Left out: signals of
    asyncio's ``add_signal_handler``, whose handler does nothing: the loop
    reads the wakeup fd, which their arrival wrote already; marking them
    again would write it twice and run the program's callback twice."""
    real = {s: _real_handler(s, _getsignal(s)) for s in signums}  # behind our recorders
    signums = [s for s in signums if getattr(real[s], "__qualname__", "") != "_sighandler_noop"
               or getattr(real[s], "__module__", "") != "asyncio.unix_events"]
    if _INTERRUPT_TAKES_SIGNUM:
        list(map(_thread.interrupt_main, signums))
    else:
        list(map(signal.raise_signal, signums))


def _trip_after(exc: Optional[BaseException], signums: List[int]) -> None:
    """Run the handlers of ``signums`` (:func:`_trip`), then raise ``exc``,
    which a handler raised before them; if one of them raises, its
    exception comes out instead, with ``exc`` as its context (nothing is
    dropped unseen)."""
    if exc is None:
        _trip(signums)
        return
    try:
        _trip(signums)
    except BaseException as later:
        later.__context__ = exc
        raise
    raise exc


class _Deferred:
    """The stand-in handler of :func:`deferred`: records, never runs."""

    def __init__(self) -> None:
        self.caught: List[int] = []
        self.saved: Dict[int, Any] = {}
        self.raised: List[BaseException] = []

    def record(self, signum, frame) -> None:
        if signum not in self.caught:
            self.caught.append(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block with no Python signal handler running in it.

    A signal mask cannot promise that: a signal another thread takes runs
    its Python handler in the main thread at the next bytecode, whatever
    the main thread's mask. So the handlers are replaced by a recorder for
    the block; afterwards the real ones go back and what was recorded runs
    at once, in arrival order. A handler that runs (and raises) while they
    are swapped has its exception raised once the block is over. Outside
    the main thread nothing is needed: Python runs handlers only there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = _Deferred()
    try:
        for signum in _HELD_SIGNALS:
            while True:  # again if a handler raised between the two calls
                try:
                    old = _getsignal(signum)
                    if callable(old) and getattr(old, "__self__", None) is not held:
                        held.saved[signum] = old
                        _setsignal(signum, held.record)
                    break
                except BaseException as exc:  # the program's handler, raised here
                    held.raised.append(exc)
        yield
    finally:
        for signum, old in held.saved.items():
            while True:
                try:
                    if getattr(_getsignal(signum), "__self__", None) is held:
                        _setsignal(signum, old)
                    break
                except BaseException as exc:
                    held.raised.append(exc)
        _trip_after(held.raised[0] if held.raised else None, held.caught)


def _deliver_after_return(signums: List[int], caller) -> None:
    """Trip ``signums`` for this (the main) thread once the frame
    ``caller`` moved past its call of os.fork() (or left the stack), from a
    thread watching that frame: only where another profiler is set. It is
    started in the last after-fork hook, after threading's own after-fork
    work (a thread started before it is dropped from threading's books)."""
    target = threading.get_ident()
    lasti = caller.f_lasti if caller is not None else None

    def deliver() -> None:
        pause = 0.0001
        while caller is not None:
            at = sys._current_frames().get(target)
            if at is None:
                return  # the thread is gone; so are its handlers
            while at is not None and at is not caller:
                at = at.f_back
            if at is None or caller.f_lasti != lasti:
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        _trip(signums)

    threading.Thread(target=deliver, name="thpguard-fork-signal", daemon=True).start()


class _Held:
    """Signals recorded instead of handled during one fork: its
    :meth:`record` stands for the Python handlers from the first before-fork
    callback until fork() has returned and the caller stored the pid (put
    back inside a hook, a periodic SIGALRM would still hit the hook)."""

    def __init__(self) -> None:
        self.caught: List[int] = []
        self.saved: Dict[int, Any] = {}
        self.released = False  # the last after-fork callback is done
        self.finishing = False  # finish() will run once fork() returned
        self.caller = None  # the frame that called os.fork()
        self.lasti = -1
        self.outer: Optional["_Held"] = None  # the hold of a fork this one is nested in
        self.raised: List[BaseException] = []  # raised by handlers as the hold began
        self.main = False  # made in the main thread (it swapped the handlers)
        self.fork = None  # set by the before-fork hook that made it: which fork it is for

    def _inside(self, frame) -> bool:
        if not self.released:
            return True
        caller = self.caller
        if caller is None or caller.f_lasti != self.lasti:
            return False
        at = frame
        while at is not None and at is not caller:
            at = at.f_back
        return at is not None  # still in the fork's call, before its pid is stored

    def record(self, signum, frame) -> None:
        # In the profile function that runs finish(): the handler would
        # raise at its first step, outside any try.
        if self._inside(frame) or (self.finishing and _in_profile(frame)):
            # finish() (or _release, which puts the handlers back before it
            # reads this list) delivers it.
            if signum not in self.caught:
                self.caught.append(signum)
            return
        self.restore()
        handler = self.saved.get(signum)
        if callable(handler):
            handler(signum, frame)

    def restore(self) -> None:
        """Put the real handlers back where this recorder still stands."""
        for signum, old in self.saved.items():
            try:
                if _getsignal(signum) == self.record:
                    _setsignal(signum, old)
            except ValueError:  # not the main thread
                return

    def finish(self) -> None:
        """Once fork() returned and its pid is stored, in the forking thread:
        put the real handlers back, then mark what was recorded as arrived
        (their handlers run now, in order; one that raises leaves the
        others pending, as CPython does). An exception a handler raised as
        the hold began (before the fork) is raised after them."""
        self.restore()
        caught, self.caught = list(self.caught), []
        exc, self.raised = (self.raised[0] if self.raised else None), []
        _trip_after(exc, caught)


_holding = threading.local()


def _sigmask(how: int, mask, raised: List[BaseException]):
    """``pthread_sigmask(how, mask)``. A handler may run (and raise) inside
    the call, after the mask is set: what it raises is appended to
    ``raised``, never propagated, and the call is made again (the same
    mask), which runs the handlers it left pending. Returns the mask before
    the last call: the mask before this one only where ``how, mask`` change
    nothing (``SIG_BLOCK, ()``) or no handler raised."""
    while True:
        try:
            return _signal.pthread_sigmask(how, mask)
        except BaseException as exc:  # the program's handler, raised here
            raised.append(exc)


def _block_all(raised: List[BaseException]):
    """Block every signal a Python handler may take in this (the main)
    thread and run the handlers of those already pending; return the old
    mask (:func:`_sigmask`)."""
    old = _sigmask(signal.SIG_BLOCK, (), raised)
    _sigmask(signal.SIG_BLOCK, _HELD_SIGNALS, raised)
    return old


def _hold() -> _Held:
    """Record signals instead of running their Python handlers until
    fork() has returned (:func:`_release`), here and in the child. Handlers
    left to the kernel or installed outside Python are not touched, nor any
    outside the main thread. They are swapped with the signals blocked in
    this thread; what a handler raises meanwhile is raised after fork()."""
    raised: List[BaseException] = getattr(_holding, "early", [])
    _holding.early = []
    main = threading.current_thread() is threading.main_thread()
    old_mask = _block_all(raised) if main else None
    try:
        held = _Held()
        held.raised = raised
        held.main = main
        # A fork made by a handler inside another fork's hooks: its hold ends
        # with the outer one in place again (_release).
        held.outer = getattr(_holding, "held", None)
        _holding.held = held
        if main:
            for signum in _HELD_SIGNALS:
                old = _getsignal(signum)
                earlier = getattr(old, "__self__", None)
                if isinstance(earlier, _Held):  # an earlier fork's recorder, not put back yet
                    old = earlier.saved.get(signum, signal.SIG_DFL)
                if callable(old):
                    held.saved[signum] = old
                    _setsignal(signum, held.record)
    finally:
        if old_mask is not None:
            # Pending signals run the recorder now (or a handler outside our hold).
            _sigmask(signal.SIG_SETMASK, old_mask, raised)
    return held


def _real_handler(signum: int, handler: Any) -> Any:
    """The program's handler behind ``handler`` (through recorders)."""
    for _ in range(64):  # a chain of recorders is short; never loop forever
        owner = getattr(handler, "__self__", None)
        if not isinstance(owner, (_Held, _Deferred)):
            return handler
        handler = owner.saved.get(signum, signal.SIG_DFL)
    return signal.SIG_DFL


def _adopt_inherited(held: _Held) -> None:
    """In a child forked from a thread other than the parent's main one:
    ``held`` takes over the recorders of the parent's main thread (a fork's
    hold, a :func:`deferred` block) that no code here would put back. What
    they recorded is the parent's to deliver, not this child's."""
    if threading.current_thread() is not threading.main_thread():
        return
    old_mask = _block_all(held.raised)
    try:
        for signum in _HELD_SIGNALS:
            handler = _getsignal(signum)
            if getattr(handler, "__self__", None) is held:
                handler = held.saved.get(signum, signal.SIG_DFL)
            if not isinstance(getattr(handler, "__self__", None), (_Held, _Deferred)):
                continue
            real = _real_handler(signum, handler)
            if callable(real):
                held.saved[signum] = real
                _setsignal(signum, held.record)
            else:
                held.saved.pop(signum, None)
                _setsignal(signum, real)
    finally:
        _sigmask(signal.SIG_SETMASK, old_mask, held.raised)  # a handler outside our hold may raise


def _release(caller) -> None:
    """End the hooks' hold: put the real handlers back and deliver what was
    recorded once fork() has returned to ``caller`` and it moved on."""
    held = getattr(_holding, "held", None)
    _holding.held = held.outer if held is not None else None
    if held is None:
        return
    held.caller = caller
    held.lasti = caller.f_lasti if caller is not None else -1
    held.finishing = _can_wait(caller) and _when_returned(caller, restore=held.finish)
    if not held.finishing:
        # No profile function to finish with (another profiler, or no
        # caller): the handlers go back now, and a thread delivers. Back
        # first, then released: what the recorder takes until then is in
        # held.caught, read after.
        held.restore()
        held.released = True
        for exc in held.raised:
            log.error("thpguard: a signal handler raised %r as a fork began; it cannot be "
                      "raised again where fork() was called (another profiler is set)", exc)
        held.raised = []
        if held.caught:
            _deliver_after_return(list(held.caught), caller)
    else:
        held.released = True


# -- after fork() returned ----------------------------------------------------

_post = threading.local()  # this thread's forks waiting for fork() to return


class _Wait:
    """One fork waiting for its os.fork() call to return to ``caller``:
    ``callbacks`` run at the first profile event in ``caller`` (or above
    it), ``restore`` once ``caller`` moved past the call (stored the pid)
    or left the stack."""

    __slots__ = ("caller", "lasti", "callbacks", "restore")

    def __init__(self, caller) -> None:
        self.caller = caller
        self.lasti = caller.f_lasti
        self.callbacks: List[Callable[[], None]] = []
        self.restore: Optional[Callable[[], None]] = None


def _waits() -> List[_Wait]:
    waits = getattr(_post, "waits", None)
    if waits is None:
        waits = _post.waits = []
    return waits


def _can_wait(caller) -> bool:
    """Whether :func:`_when_returned` can wait for ``caller`` (known, and
    no other profiler set in this thread)."""
    current = sys.getprofile()
    return caller is not None and (current is None or current is _profile)


def _when_returned(caller, callback: Optional[Callable[[], None]] = None,
                   restore: Optional[Callable[[], None]] = None) -> bool:
    """Run ``callback`` at the first profile event in ``caller`` (fork()'s
    c_return) and ``restore`` at the first one after ``caller`` moved past
    the call (its pid stored); True. At once where the caller is unknown or
    another profiler is set (never displaced); False.

    Forks nest (a signal handler that forks while another fork's hooks, or
    the callbacks after it, run): each waits for its own caller."""
    if not _can_wait(caller):
        if callback is not None:
            callback()
        if restore is not None:
            restore()
        return False
    waits = _waits()
    wait = next((w for w in waits if w.caller is caller and w.lasti == caller.f_lasti), None)
    if wait is None:
        wait = _Wait(caller)
        waits.append(wait)
    if callback is not None:
        wait.callbacks.append(callback)
    if restore is not None:
        wait.restore = restore
    sys.setprofile(_profile)
    return True


def _on_stack(frame, caller) -> bool:
    """Whether ``caller`` is ``frame`` or one of the frames that called it."""
    at = frame
    while at is not None and at is not caller:
        at = at.f_back
    return at is not None


def _call(function: Callable[[], None], raised: List[BaseException]) -> None:
    """Call ``function``; what it raises is appended to ``raised``."""
    try:
        function()
    except BaseException as exc:
        raised.append(exc)


def _run_due(frame, waits: List[_Wait], raised: List[BaseException]) -> None:
    """Run the due work of the forks, the innermost first; each piece is
    dropped only after it ran (a handler may raise between two steps)."""
    for wait in reversed(list(waits)):
        caller = wait.caller
        at_call = caller.f_lasti == wait.lasti and _on_stack(frame, caller)
        if at_call and frame is not caller:
            continue  # still inside that fork's hooks
        for _ in range(len(wait.callbacks)):  # not those a callback adds
            _call(wait.callbacks[0], raised)
            del wait.callbacks[0]
        if at_call and wait.restore is not None and not raised:
            continue  # fork() returned, its pid not yet stored
        if wait.restore is not None:
            _call(wait.restore, raised)
            wait.restore = None
        if wait in waits:
            waits.remove(wait)


def _end_waits(waits: List[_Wait], raised: List[BaseException]) -> None:
    """Run the work of every fork still waiting: an exception is about to
    leave the profile function, and CPython unsets it."""
    while waits:
        wait = waits[-1]
        while wait.callbacks:
            _call(wait.callbacks[0], raised)
            del wait.callbacks[0]
        if wait.restore is not None:
            _call(wait.restore, raised)
            wait.restore = None
        waits.pop()


def _with_notes(raised: List[BaseException]) -> BaseException:
    """The first exception, the later ones as its notes (logged before 3.11)."""
    first = raised[0]
    for later in [exc for exc in raised[1:] if exc is not first]:
        if hasattr(first, "add_note"):
            first.add_note(f"thpguard: {later!r} was raised too as a fork ended")
        else:
            log.error("thpguard: %r raised as a fork ended, after another exception there; "
                      "it is not raised again", later)
    return first


def _profile(frame, event, arg) -> None:
    # No exception leaves before every due piece of work ran: raised from
    # here, it unsets the profile function, so the forks waiting end now.
    raised: List[BaseException] = []
    try:
        _run_due(frame, _waits(), raised)
    except BaseException as exc:  # a handler's, between two steps
        raised.append(exc)
    while True:
        try:
            try:
                waits = _waits()
                if raised:
                    _end_waits(waits, raised)
                if not waits:
                    sys.setprofile(None)
                break
            except BaseException as exc:  # a handler's, between two steps
                raised.append(exc)
        except BaseException as exc:  # one more, as the first was kept
            raised.append(exc)
    if raised:
        raise _with_notes(raised)


_PROFILE_CODES = frozenset(f.__code__ for f in (_profile, _run_due, _end_waits, _waits, _on_stack,
                                                _call, _with_notes))


def _in_profile(frame) -> bool:
    return frame is not None and frame.f_code in _PROFILE_CODES
