"""The repair engine: which blocks to collapse, how, and what came of it.

One engine serves the guard thread, :meth:`thpguard.Region.collapse`, :func:`thpguard.hot`
and ``thpguard guard PID``. It plans from a :class:`~thpguard.Coverage`
(the block model decides what is repairable), submits bounded chunks to a
:class:`CollapseTarget` (this process: ``madvise``; another one:
``process_madvise``), backs off on ENOMEM, EBUSY or persistent EAGAIN, and
diagnoses EINVAL: the decision is scoped to the block and to a time, and
names the real cause (a mapping split by ``mprotect``/``mlock``,
``MADV_NOHUGEPAGE``, ``prctl(PR_SET_THP_DISABLE)``). ENOMEM from a block
with a hole in it (part of the range unmapped by outside code answers
ENOMEM on every try) is scoped the same way, instead of backing off
forever. It keeps the counters and emits the :class:`~thpguard.events.Event` stream; it holds no module
state (each repaired range has its ``RepairState``).
"""

from __future__ import annotations

import errno as _errno
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Tuple

from . import _native, _refusals, kernel, pagemap
from .blocks import Coverage
from .events import BACKOFF, DISABLED, FAILED, REPAIRED, SPLIT, Event, counters, emit, errname

__all__ = ["CollapseTarget", "LocalTarget", "RemoteTarget", "RepairPolicy", "RepairState",
           "RepairEngine", "Outcome"]

#: Seconds before a block (or region) that answered EINVAL is looked at again.
DEFAULT_RECHECK = 10.0


class CollapseTarget(Protocol):
    """Where collapses happen. ``collapse`` returns one errno per chunk
    (0: collapsed); the other two answer the EINVAL diagnosis."""

    pid: int

    def collapse(self, start: int, length: int, chunk: int, max_retries: int) -> List[int]: ...

    def mappings(self) -> List[kernel.Vma]: ...

    def thp_disabled(self) -> bool: ...


class LocalTarget:
    """This process: ``MADV_COLLAPSE`` through the native core (GIL released)."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def collapse(self, start: int, length: int, chunk: int, max_retries: int) -> List[int]:
        return _native.collapse(start, length, chunk, max_retries)

    def mappings(self) -> List[kernel.Vma]:
        return kernel.read_smaps("self", kernel.Roots())

    def userfault_possible(self) -> bool:
        """Whether this process has thpguard copy regions registered with
        userfaultfd; asks the native core, without reading /proc (an EBUSY
        may come from a full memory cgroup, where reading smaps allocates)."""
        return bool(_native.copy_stats()["regions"])

    def thp_disabled(self) -> bool:
        try:
            value = _native.thp_disable_get()
        except OSError:
            return False
        # Linux 6.18: PR_GET_THP_DISABLE returns 3 with PR_THP_DISABLE_EXCEPT_ADVISED,
        # under which advised regions still collapse; 1 disables THP completely.
        return bool(value & 1 and not value & 2)


class TargetGone(Exception):
    """The target process exited."""


class RemoteTarget:
    """Another process: ``process_madvise(MADV_COLLAPSE)`` (Linux 6.1) on a
    pidfd, one block per call. Needs CAP_SYS_NICE and ptrace read access:
    EPERM raises :class:`PermissionError`, a gone process :class:`TargetGone`."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd

    def collapse(self, start: int, length: int, chunk: int, max_retries: int) -> List[int]:
        errs = []
        for at in range(start, start + length, chunk):
            err = 0
            for _ in range(max_retries + 1):
                try:
                    _native.process_madvise(self.pidfd, [(at, min(chunk, start + length - at))],
                                            _native.MADV_COLLAPSE)
                    err = 0
                except OSError as exc:
                    err = exc.errno or _errno.EIO
                    if err == _errno.EPERM:
                        raise PermissionError(err, "process_madvise(MADV_COLLAPSE) was refused "
                                              "(EPERM): it needs CAP_SYS_NICE and ptrace access "
                                              f"to PID {self.pid}") from None
                    if err == _errno.ESRCH:
                        raise TargetGone(self.pid) from None
                if err != _errno.EAGAIN:
                    break
            errs.append(err)
        return errs

    def mappings(self) -> List[kernel.Vma]:
        return kernel.read_smaps(self.pid, kernel.Roots())

    def thp_disabled(self) -> bool:
        try:
            return kernel.read_status(self.pid, kernel.Roots()).thp_enabled is False
        except OSError:
            return False


@dataclass
class RepairPolicy:
    """How the engine repairs. Sizes in bytes, times in seconds.

    ``chunk`` bytes per collapse call (a multiple of the PMD size);
    ``max_retries`` EAGAIN retries inside one call; ``backoff_initial`` and
    ``backoff_max`` bound the exponential pause after ENOMEM, EBUSY or
    ``eagain_ticks`` passes of EAGAIN in a row; ``recheck`` is how long an
    EINVAL decision holds before the block is looked at again.
    """

    chunk: int
    max_retries: int = 0
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    eagain_ticks: int = 20
    recheck: float = DEFAULT_RECHECK


class RepairState:
    """What the engine remembers about one repaired range (a region, a VMA)."""

    def __init__(self) -> None:
        self.first_seen: Dict[int, float] = {}  # block start -> monotonic time
        self.backoff_until = 0.0
        self.backoff_delay = 0.0
        self.eagain_ticks = 0
        self.disabled: Optional[str] = None  # the whole range, for a cause that covers it
        self.disabled_until = 0.0
        self.blocked: Dict[int, Tuple[float, str]] = {}  # block -> (until, reason)
        # smaps fallback (no per-block detail): split blocks seen last time.
        self.smaps_split = 0
        self.smaps_seen: List[float] = []  # when each of them was first seen
        self.smaps_cursor = 0  # offset where the next budget-limited pass starts

    def resume(self) -> None:
        """Forget every EINVAL decision and back-off (hot() entry)."""
        self.disabled = None
        self.blocked.clear()
        self.backoff_until = 0.0


@dataclass
class Outcome:
    """What one repair pass did: ``blocks`` collapsed, ``seconds`` in
    MADV_COLLAPSE, ``failures`` errno name -> blocks, ``submitted`` bytes."""

    blocks: int = 0
    seconds: float = 0.0
    failures: Dict[str, int] = field(default_factory=dict)
    submitted: int = 0
    calls: int = 0


def max_ptes_none() -> Optional[int]:
    """khugepaged's ``max_ptes_none`` (the partial-block rule of :mod:`thpguard.blocks`)."""
    return kernel.khugepaged_settings().get("max_ptes_none")


class RepairEngine:
    """Scan bookkeeping and repair of ranges through one :class:`CollapseTarget`."""

    def __init__(self, target: CollapseTarget) -> None:
        self.target = target

    # -- observing ----------------------------------------------------------------

    def observe(self, st: RepairState, cov: Coverage, address: int, now: float) -> None:
        """Record the splits ``cov`` shows; emit ``split`` for new ones."""
        pmd = cov.pmd_size
        if cov.blocks is None:
            split = cov.not_huge_blocks
            new_count = split - st.smaps_split
            st.smaps_split = split
            del st.smaps_seen[split:]  # repaired elsewhere, or the other side exited
            if new_count > 0:
                st.smaps_seen.extend([now] * new_count)
                self._split(address, new_count, pmd)
            return
        current = set(cov.blocks.split) | set(cov.blocks.partial)
        for block in set(st.first_seen).difference(current):
            del st.first_seen[block]  # repaired elsewhere, or the other side exited
        new = current.difference(st.first_seen)
        for block in new:
            st.first_seen[block] = now
        if new:
            self._split(address, len(new), pmd)

    def _split(self, address: int, n: int, pmd: int) -> None:
        counters().add(splits_detected=n)
        emit(Event(SPLIT, os.getpid(), time.time(), address, n, n * pmd))

    # -- planning -----------------------------------------------------------------

    def plan(self, st: RepairState, cov: Coverage, address: int, size: int, budget: int,
             chunk: int, now: float) -> List[Tuple[int, int]]:
        """``(start, length)`` collapse calls for this pass, within ``budget`` bytes."""
        pmd = cov.pmd_size
        if cov.blocks is not None:
            limit = max_ptes_none() if cov.blocks.partial else None
            blocks = [b for b in cov.blocks.repairable(limit) if self._allowed(st, b, now)]
            ranges: List[Tuple[int, int]] = []
            for block in blocks:
                if ranges and ranges[-1][1] == block:
                    ranges[-1] = (ranges[-1][0], block + pmd)
                else:
                    ranges.append((block, block + pmd))
        elif not cov.complete:
            # smaps fallback (no per-block detail): try every block; untouched
            # ones answer EINVAL and are skipped. A pass cut short by the
            # budget resumes where the last one stopped.
            at = address + (st.smaps_cursor % size if size else 0)
            ranges = [(lo, hi) for lo, hi in ((at, address + size), (address, at)) if lo < hi]
        else:
            ranges = []
        calls: List[Tuple[int, int]] = []
        left = budget
        for lo, hi in ranges:
            at = lo
            while at < hi and left > 0:
                length = min(chunk, hi - at, max(pmd, left - left % pmd))
                calls.append((at, length))
                left -= length
                at += length
        return calls

    @staticmethod
    def _allowed(st: RepairState, block: int, now: float) -> bool:
        blocked = st.blocked.get(block)
        if blocked is None:
            return True
        if now < blocked[0]:
            return False
        return True  # re-check: try it again; EINVAL blocks it anew

    # -- the collapse calls ------------------------------------------------------------

    def run(self, calls: List[Tuple[int, int]], pmd: int, max_retries: int,
            stop: Optional[threading.Event] = None,
            lock: Optional[threading.Lock] = None,
            is_closed: Optional[Callable[[], bool]] = None,
            stop_on: Callable[[int], bool] = lambda err: False,
            absorbed: Optional[Dict[str, int]] = None,
            ) -> List[Tuple[int, int, List[int], float]]:
        """Make the calls; per call ``(start, length, errno per block, seconds)``.

        The GIL is released during each call; ``stop`` is checked between
        calls, so a fork waits for one chunk at most. ``lock`` is held
        around each call, and ``is_closed`` (checked under it) ends the
        pass when the range went away. A call over several blocks that
        fails is asked again block by block; an error of the whole call
        that no block repeats (a transient EAGAIN, say) is counted in
        ``absorbed`` by errno name, so it is not lost from the failures.
        """
        done = []
        for start, length in calls:
            if stop is not None and stop.is_set():
                break
            if lock is not None:
                lock.acquire()
            try:
                if is_closed is not None and is_closed():
                    break
                t0 = time.perf_counter()
                errs = self.target.collapse(start, length, length, max_retries)
                err = errs[0] if errs else 0
                per_block = [err] * (length // pmd)
                if err and length > pmd:
                    # One errno for several blocks: ask each block on its own
                    # (still under the lock), so a refusal (EINVAL) is pinned
                    # to the blocks that refuse.
                    per_block = [self.target.collapse(b, pmd, pmd, max_retries)[0]
                                 for b in range(start, start + length, pmd)]
                    if absorbed is not None and err != _errno.EINVAL and err not in per_block:
                        absorbed[errname(err)] = absorbed.get(errname(err), 0) + 1
                spent = time.perf_counter() - t0
            finally:
                if lock is not None:
                    lock.release()
            done.append((start, length, per_block, spent))
            if any(stop_on(e) for e in per_block):
                break
        return done

    # -- EINVAL ---------------------------------------------------------------------

    def diagnose(self, block: int, pmd: int, address: int, size: int) -> Tuple[bool, str]:
        """Why MADV_COLLAPSE answers EINVAL (or ENOMEM, for a hole) on
        ``block``: (whole range?, reason); found by ``_refusals.py``."""
        return _refusals.diagnose(self.target, block, pmd, address, size)

    def refusal(self, err: int, block: int, pmd: int, address: int, size: int) -> Optional[str]:
        """The cause of ``block``'s refusal with ``err``: EINVAL always has
        one; EBUSY only in a userfaultfd mapping (else the memory cgroup)."""
        if err == _errno.EINVAL:
            return self.diagnose(block, pmd, address, size)[1]
        return self.userfault_reason(block, pmd) if err == _errno.EBUSY else None

    def userfault_reason(self, block: int, pmd: int) -> Optional[str]:
        """Why a block of a userfaultfd-registered mapping refuses
        MADV_COLLAPSE (EBUSY), or None if its mapping is not registered."""
        return _refusals.userfault_reason(self.target, block, pmd)

    def recheck_disabled(self, st: RepairState, block: int, pmd: int, address: int, size: int,
                         now: float, recheck: float) -> bool:
        """True while a whole-range EINVAL decision still holds (re-diagnosed
        every ``recheck`` seconds; the repairs resume once its cause is gone)."""
        if st.disabled is None:
            return False
        if now < st.disabled_until:
            return True
        whole, reason = self.diagnose(block, pmd, address, size)
        if whole:
            st.disabled, st.disabled_until = reason, now + recheck
            return True
        st.disabled = None
        return False

    # -- one accounted pass ------------------------------------------------------------

    def repair(self, st: RepairState, cov: Coverage, address: int, size: int, budget: int,
               policy: RepairPolicy, *, stop: Optional[threading.Event] = None,
               lock: Optional[threading.Lock] = None,
               is_closed: Optional[Callable[[], bool]] = None) -> Outcome:
        """Repair what ``cov`` shows within ``budget`` bytes: counters, events,
        back-off and EINVAL decisions included."""
        done = Outcome()
        now = time.monotonic()
        pmd = cov.pmd_size
        if budget <= 0 or now < st.backoff_until:
            return done
        if self.recheck_disabled(st, address, pmd, address, size, now, policy.recheck):
            return done
        calls = self.plan(st, cov, address, size, budget, policy.chunk, now)
        if not calls:
            return done
        smaps = cov.blocks is None
        results = self.run(calls, pmd, policy.max_retries, stop, lock, is_closed,
                           stop_on=lambda e: e not in (0, _errno.EAGAIN, _errno.EINVAL),
                           absorbed=done.failures)
        latencies: List[float] = []
        fatal: Optional[int] = None
        einval: List[int] = []
        busy: List[int] = []
        enomem: List[int] = []
        smaps_ok = smaps_einval = 0
        for start, length, errs, spent in results:
            done.submitted += length
            done.calls += 1
            done.seconds += spent
            if smaps:
                st.smaps_cursor = (start + length - address) % size
            finished = time.monotonic()
            for i, err in enumerate(errs):
                block = start + i * pmd
                if err == 0 and smaps:
                    smaps_ok += 1  # maybe a block that was huge already: counted below
                elif err == 0:
                    done.blocks += 1
                    st.blocked.pop(block, None)
                    seen = st.first_seen.pop(block, None)
                    if seen is not None:
                        latencies.append(finished - seen)
                elif err == _errno.EINVAL and smaps:
                    smaps_einval += 1  # a block never touched, or THP not allowed here
                elif err == _errno.EINVAL:
                    einval.append(block)
                elif err == _errno.EBUSY and self.userfault_reason(block, pmd) is not None:
                    busy.append(block)  # not the memory cgroup: no back-off for the range
                    done.failures["EBUSY"] = done.failures.get("EBUSY", 0) + 1
                else:
                    done.failures[errname(err)] = done.failures.get(errname(err), 0) + 1
                    if err == _errno.ENOMEM:
                        enomem.append(block)
                    elif err != _errno.EAGAIN:
                        fatal = err
        if smaps and done.calls:
            einval = self._smaps_account(st, cov, address, size, done, latencies,
                                         smaps_ok, smaps_einval)
        self._account(address, pmd, done, latencies, einval)
        holes = self._holes(enomem, pmd)
        if len(holes) < len(enomem):
            fatal = fatal or _errno.ENOMEM  # short of memory: back off
        if einval or holes or busy:
            self._refused(st, einval + holes + busy, pmd, address, size, now, policy.recheck,
                          whole=smaps)
        self._backoff(st, address, policy, fatal, done)
        return done

    def _holes(self, blocks: List[int], pmd: int) -> List[int]:
        """The ENOMEM ``blocks`` that a hole in the mappings explains."""
        if not blocks:
            return []
        try:
            spans = [(v.start, v.end) for v in self.target.mappings()]
        except OSError:
            return []
        return [b for b in blocks if kernel.first_gap(spans, b, b + pmd) is not None]

    def _smaps_account(self, st, cov, address, size, done, latencies, ok, einval) -> List[int]:
        # MADV_COLLAPSE answers 0 on huge blocks too: count repairs from smaps.
        pmd = cov.pmd_size
        try:
            after = pagemap.smaps_coverage(address, address + size, pmd)
        except OSError:
            return []
        done.blocks = max(0, (after.huge_bytes - cov.huge_bytes) // pmd)
        # Splits made during the pass count here or never (scans compare with this).
        before, st.smaps_split = st.smaps_split, after.not_huge_blocks
        grown, finished = st.smaps_split - before + done.blocks, time.monotonic()
        latencies.extend(finished - seen for seen in st.smaps_seen[:done.blocks])
        del st.smaps_seen[:done.blocks]
        if grown > 0:
            st.smaps_seen.extend([finished] * grown)
            self._split(address, grown, pmd)
        del st.smaps_seen[st.smaps_split:]
        if ok == 0 and einval and st.smaps_split:
            # Present blocks that are not huge refuse the collapse: not
            # untouched blocks. Without per-block detail the range is the unit.
            return [address] * st.smaps_split
        return []

    def _account(self, address, pmd, done: Outcome, latencies, einval) -> None:
        c = counters()
        if done.blocks:
            with c.lock:
                c.repairs += done.blocks
                c.bytes_repaired += done.blocks * pmd
                c.repair_seconds += done.seconds
                c.last_repair_seconds = done.seconds / max(1, done.calls)
                if latencies:
                    c.last_repair_latency_seconds = latencies[-1]
            emit(Event(REPAIRED, os.getpid(), time.time(), address, done.blocks,
                       done.blocks * pmd, done.seconds, tuple(latencies)))
        if einval:
            done.failures["EINVAL"] = done.failures.get("EINVAL", 0) + len(einval)
        if done.failures:
            c.count_failures(done.failures)
            n_failed = sum(done.failures.values())
            emit(Event(FAILED, os.getpid(), time.time(), address, n_failed,
                       n_failed * pmd, failures=dict(done.failures)))

    def _refused(self, st, blocks, pmd, address, size, now, recheck, whole=False) -> None:
        # ``whole``: without per-block detail (smaps) the range is the unit.
        reasons: Dict[str, List[int]] = {}
        for block in sorted(set(blocks)):
            range_wide, reason = self.diagnose(block, pmd, address, size)
            if range_wide or whole:
                st.disabled, st.disabled_until = reason, now + recheck
                emit(Event(DISABLED, os.getpid(), time.time(), address, reason=reason))
                return
            if st.blocked.get(block, (0, None))[1] != reason:
                reasons.setdefault(reason, []).append(block)
            st.blocked[block] = (now + recheck, reason)
        for reason, found in reasons.items():
            emit(Event(DISABLED, os.getpid(), time.time(), address, len(found),
                       len(found) * pmd, reason=f"{reason} (looked at again every {recheck:g} s)"))

    def _backoff(self, st, address, policy: RepairPolicy, fatal, done: Outcome) -> None:
        if done.blocks:
            st.backoff_delay = 0.0
        if fatal is None and "EAGAIN" in done.failures:
            st.eagain_ticks += 1
            if st.eagain_ticks < policy.eagain_ticks:
                return
            fatal = _errno.EAGAIN
        elif fatal is None:
            st.eagain_ticks = 0
            return
        st.eagain_ticks = 0
        st.backoff_delay = min(policy.backoff_max, max(policy.backoff_initial, st.backoff_delay * 2))
        st.backoff_until = time.monotonic() + st.backoff_delay
        counters().add(backoffs=1)
        reason = f"MADV_COLLAPSE failed with {errname(fatal)} ({os.strerror(fatal)})"
        if fatal == _errno.EAGAIN:
            reason += f" on {policy.eagain_ticks} ticks in a row"
        emit(Event(BACKOFF, os.getpid(), time.time(), address,
                   delay=st.backoff_delay, reason=reason))
