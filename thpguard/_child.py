"""Run a function in a forked child and get its result back.

Private: the one fork-run-report-reap helper that thpguard's tests and
benchmarks share (they both import the installed package, so it lives
here rather than in either of them). Nothing in the library's public API
depends on it.

The child runs the function, sends back its return value or its exception
(with the child's traceback) as a pickle, and always leaves with
``os._exit``, so nothing of the parent (a test runner, atexit handlers)
runs twice. The parent never waits without a limit: a child that sends
nothing within ``timeout`` seconds is killed and reaped, and the error
says what was awaited; a child that died says how (exit status, or the
signal that killed it).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import sys
import time
import traceback
from typing import Any, Callable, NoReturn, Optional

#: Seconds the parent waits for a child's next message by default. Long on
#: purpose: it only turns a hang into a failure, it never times anything.
#: Read when a wait starts, so a caller on a slow machine (the test suite
#: under emulation) may raise it for every wait at once.
DEFAULT_TIMEOUT = 60.0

#: The default of every ``timeout`` below: DEFAULT_TIMEOUT as it is when the wait starts.
DEFAULT: Any = object()


def _limit(timeout: Any) -> Optional[float]:
    return DEFAULT_TIMEOUT if timeout is DEFAULT else timeout

_HEADER = struct.Struct("<Q")

#: The parent's pipe ends of the children still open here. A later child
#: closes its copies, so no child keeps another child's pipe open (its EOF
#: must mean that its parent is gone).
_parent_ends: set = set()


class ChildError(RuntimeError):
    """The child raised, died without a result, or hung (and was killed).

    ``pid`` is the child's pid; ``status`` its wait status once reaped
    (None while it has not been); the message says which case it was.
    """

    def __init__(self, message: str, pid: int, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.status = status


def describe_status(status: int) -> str:
    """A wait status in words: ``exited with status 1``, ``killed by signal 9 (SIGKILL)``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown"
        core = ", core dumped" if os.WCOREDUMP(status) else ""
        return f"killed by signal {number} ({name}{core})"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"wait status {status:#x}"


class Channel:
    """Pickled objects, one frame each, over a pair of pipe ends."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj)
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def recv(self, timeout: Any = DEFAULT) -> Any:
        """The next object; EOFError when the other side closed its end,
        TimeoutError when none came within ``timeout`` seconds (None: no limit)."""
        timeout = _limit(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        (length,) = _HEADER.unpack(self._exactly(_HEADER.size, deadline))
        return pickle.loads(self._exactly(length, deadline))

    def _exactly(self, n: int, deadline: Optional[float]) -> bytes:
        chunks = []
        while n:
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                if not select.select([self.read_fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(self.read_fd, min(n, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class _ToParent(Channel):
    """The child's end: what ``fn`` sends is marked as a message, so it
    never looks like the child's result."""

    def send(self, obj: Any) -> None:
        super().send(("message", obj))

    def _report(self, frame) -> None:
        super().send(frame)


class Child:
    """A forked child running ``fn(*args)`` (``fn(channel, *args)`` with
    ``channel=True``, for a conversation with the parent).

    In the parent, :meth:`send` and :meth:`recv` talk to the child's
    channel, :meth:`result` waits for what ``fn`` returned and reaps the
    child. Used as a context manager, a child still running at the end of
    the block is killed and reaped, so no test leaves one behind.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, channel: bool = False) -> None:
        self.name = getattr(fn, "__qualname__", repr(fn))
        self.status: Optional[int] = None
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            for fd in _parent_ends | {down_w, up_r}:
                os.close(fd)
            _parent_ends.clear()
            _serve(fn, args, _ToParent(down_r, up_w), channel)
        os.close(down_r)
        os.close(up_w)
        self.pid = pid
        self._channel = Channel(up_r, down_w)
        _parent_ends.update((up_r, down_w))

    def send(self, obj: Any) -> None:
        """Send ``obj`` to the child's channel."""
        self._channel.send(obj)

    def recv(self, timeout: Any = DEFAULT, what: str = "a message") -> Any:
        """The next object the child sent with ``channel.send``.

        Raises ChildError (after killing and reaping the child) when the
        child returned or raised instead, died, or sent nothing within
        ``timeout`` seconds; ``what`` names the awaited message in that error.
        """
        kind, value = self._next(_limit(timeout), what)
        if kind == "message":
            return value
        if kind == "ok":
            self._reap()
            raise ChildError(f"child {self.pid} ({self.name}) returned {value!r} "
                             f"while the parent waited for {what}", self.pid, self.status)
        raise self._failed(value)

    def result(self, timeout: Any = DEFAULT) -> Any:
        """What ``fn`` returned, once the child has exited (it is reaped).

        Raises ChildError with the child's traceback when ``fn`` raised,
        with its exit status or signal when it died without a result, and
        after killing it when no result came within ``timeout`` seconds.
        Messages the child sent and nobody received are skipped.
        """
        timeout = _limit(timeout)
        deadline = time.monotonic() + timeout
        while True:
            kind, value = self._next(max(0.0, deadline - time.monotonic()), "its result", timeout)
            if kind == "ok":
                self._reap()
                if self.status != 0:
                    raise ChildError(f"child {self.pid} ({self.name}) sent its result, then "
                                     f"{describe_status(self.status)}", self.pid, self.status)
                return value
            if kind == "error":
                raise self._failed(value)

    def kill(self) -> None:
        """SIGKILL the child if it has not been reaped yet, and reap it."""
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap()

    def close(self) -> None:
        self.kill()
        if self._channel.read_fd in _parent_ends:
            _parent_ends.difference_update((self._channel.read_fd, self._channel.write_fd))
            self._channel.close()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _next(self, timeout: float, what: str, limit: Optional[float] = None):
        try:
            return self._channel.recv(timeout)
        except TimeoutError:
            self.kill()
            raise ChildError(f"child {self.pid} ({self.name}) did not send {what} within "
                             f"{limit or timeout:g} s (a hang after fork?); killed it",
                             self.pid, self.status) from None
        except EOFError:
            self._reap()
            raise ChildError(f"child {self.pid} ({self.name}) {describe_status(self.status)} "
                             f"before sending {what}", self.pid, self.status) from None

    def _failed(self, detail: str) -> ChildError:
        self._reap()
        return ChildError(f"child {self.pid} ({self.name}) raised "
                          f"({describe_status(self.status)}):\n{detail}", self.pid, self.status)

    def _reap(self) -> None:
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]


def leave(status: int) -> NoReturn:
    """End a forked child now: flush Python's stdout and stderr (what the
    child printed), then os._exit, never returning into the parent's code."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def _serve(fn, args, channel: "_ToParent", with_channel: bool) -> None:  # pragma: no cover
    """The child's side: run, report, and always leave with os._exit."""
    status = 1
    try:
        try:
            value = fn(channel, *args) if with_channel else fn(*args)
            frame = ("ok", value)
            status = 0
        except BaseException as exc:  # everything goes back to the parent
            frame = ("error", f"{exc!r}\n{traceback.format_exc()}")
        try:
            channel._report(frame)
        except Exception as exc:  # an unpicklable result, most likely
            status = 1
            channel._report(("error", f"could not send the result back: {exc!r}"))
    finally:
        leave(status)


def run(fn: Callable[..., Any], *args: Any, timeout: Any = DEFAULT,
        send: Optional[Callable[[], Any]] = None) -> Any:
    """Fork, run ``fn(*args)`` in the child and return what it returned.

    With ``send``, the parent computes ``send()`` after the fork and the
    child calls ``fn(*args, received)`` with it. Raises ChildError when the
    child raised, died, or gave no result within ``timeout`` seconds.
    """
    if send is None:
        with Child(fn, *args) as child:
            return child.result(timeout)
    with Child(_receive_then_call, fn, args, channel=True) as child:
        child.send(send())
        return child.result(timeout)


def _receive_then_call(channel, fn, args):  # pragma: no cover - runs in the child
    return fn(*args, channel.recv(timeout=None))
