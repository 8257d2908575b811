"""SIGTERM, SIGHUP and SIGINT during a benchmark run: one way out.

A hugetlb step grows the host's pool and gives the pages back when its
``with`` block ends. Ctrl-C (KeyboardInterrupt) unwinds through those blocks;
SIGTERM (``timeout``, a service manager, ``kill``) and SIGHUP (the terminal
went away) would end the process on the spot and leave the pages in the
pool. :func:`stop_on_signals` turns all three into :class:`Interrupted`, a
KeyboardInterrupt, so every ``finally`` and ``__exit__`` runs and the entry
point can still write the results of the benchmarks that finished.

While the pool is being grown or given back (a sysfs write and the count of
what it added) the signal waits: :func:`deferred` holds it until the block
ends, so the count of pages to give back is never lost half-way.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Dict, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; :attr:`signum` says which."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_deferring = 0
_pending: list = []


def _handler(owner: int):
    def handle(signum, frame):
        if os.getpid() != owner:
            # A forked child that inherited the handler: end as the signal
            # would have ended it (its parent does the unwinding).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _deferring:
            _pending.append(signum)
            return
        raise Interrupted(signum)

    return handle


def stop_on_signals() -> Dict[int, object]:
    """Make SIGTERM, SIGHUP and SIGINT raise :class:`Interrupted` in this
    process (main thread only); returns the previous handlers for
    :func:`restore`."""
    handle = _handler(os.getpid())
    return {signum: signal.signal(signum, handle) for signum in SIGNALS}


def restore(previous: Dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold :class:`Interrupted` until the block ends (re-entrant), then raise it."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Interrupted(signum)
