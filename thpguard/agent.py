"""The node agent: huge pages kept for processes that do not import thpguard.

:class:`Agent` scans the selected processes of a host (all of them, or by
PID, command name or cgroup), finds PMD-size blocks of private anonymous
memory that hold data on small pages (split after a fork, or never huge),
and collapses them from outside with ``process_madvise(MADV_COLLAPSE)``
(Linux 6.1+). For processes of other users it needs CAP_SYS_NICE
(``process_madvise`` on another process), CAP_SYS_PTRACE (ptrace read
access to read their memory map and to act on them) and CAP_DAC_READ_SEARCH
(``/proc/PID/pagemap`` is mode 0400, owned by the process's user).

What it never touches: VMAs advised ``MADV_NOHUGEPAGE``, processes that
disabled THP with ``prctl(PR_SET_THP_DISABLE)``, processes with less
anonymous memory than ``min_process_bytes``, VMAs smaller than
``min_vma_bytes``, blocks with absent pages (a collapse would fill them and
grow the process), and, unless ``repair_shared``, blocks that still share
pages with another process (a fork child): collapsing those costs a new
2 MiB page while the sharer lives, and the block becomes exclusive, so
repairable for free, when the sharer exits or writes.

Repairs go through the library's repair engine (:mod:`thpguard.repair`:
a ``RemoteTarget`` on a pidfd, EAGAIN/ENOMEM/EBUSY back-off and EINVAL
diagnosis per VMA) and the block model (:mod:`thpguard.blocks`); the agent
chooses what to repair and when.

Budgets: at most ``rate`` bytes collapsed per second for the whole agent,
at most ``cpu`` of one CPU (scan and collapse, which the kernel runs in the
agent's own thread), one block per call (the kernel holds the target's
``mmap_lock`` for write per block) and at most ``stall_share`` of any
second spent collapsing in one process.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import signal
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from . import _agentscan, kernel
from ._agentconfig import AgentConfig
from ._agentops import AgentLog, Counts, CpuBudget, TokenBucket
from .blocks import SOURCE_PAGEMAP_SCAN, BlockMap, Coverage
from .repair import RemoteTarget, RepairEngine, RepairPolicy, RepairState, TargetGone

__all__ = ["Agent", "AgentLog"]

_ERRNAME = errno.errorcode.get
_PASS_REPAIR_LIMIT = 30.0  # seconds of repair per pass before looking again


class _Tracked:
    """A process the agent knows: identity (PID and start time), pidfd, the
    repair engine on it with one state per VMA, and what it logged once."""

    def __init__(self, info: _agentscan.ProcessInfo, pidfd: int) -> None:
        self.info = info
        self.pidfd = pidfd
        self.engine = RepairEngine(RemoteTarget(info.pid, pidfd))
        self.states: Dict[Tuple[int, int], RepairState] = {}  # VMA -> engine state
        self.logged: set = set()
        self.backoff_until = 0.0  # EPERM: until a reload
        self.window_start = 0.0
        self.busy = 0.0
        self.counts = Counts()
        self.last_scan: Optional[_agentscan.ProcessScan] = None

    @property
    def key(self) -> Tuple[int, int]:
        return self.info.pid, self.info.start_time

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class Agent:
    """The node agent. :meth:`run` loops until stopped; :meth:`run_pass`
    does one scan-and-repair pass (tests and ``--once`` use it).

    Hooks in *on_pass* are called after each pass with the agent (the
    state file hooks in there).
    """

    def __init__(self, config: AgentConfig, log: Optional[AgentLog] = None,
                 roots: Optional[kernel.Roots] = None) -> None:
        self.config = config
        self.log = log or AgentLog(config.log_format)
        self.roots = roots or kernel.Roots.from_env()
        self.pmd = kernel.pmd_size(self.roots) or 2 << 20
        self.tracked: Dict[int, _Tracked] = {}
        self.totals = Counts()
        self.by_group: Dict[Tuple[str, ...], Counts] = {}  # (cgroup, command[, pid]) -> counts
        self.passes = 0
        self.exited = 0
        self.started = time.monotonic()
        self.cpu_started = time.process_time()
        self.throttled_seconds = 0.0
        self.on_pass: List[Callable[["Agent"], None]] = []
        # Held while the pass changes what the metrics thread reads (re-entrant:
        # _forget runs both inside and outside held sections).
        self.lock = threading.RLock()
        self._logged: set = set()
        self.stop_signal: Optional[int] = None  # what ended run(): SIGTERM or SIGINT
        self._stop = False
        self._reload = False
        self._end: Optional[float] = None  # run(duration=): when to stop, monotonic
        self._wake_r = self._wake_w = -1
        self._apply_budgets()

    def _apply_budgets(self) -> None:
        self.bytes_budget = TokenBucket(self.config.rate)
        self.cpu_budget = CpuBudget(self.config.cpu)
        # One block per collapse call; no retry inside a call (the next pass retries).
        self.policy = RepairPolicy(chunk=self.pmd, max_retries=0)

    # -- signals and sleeping -------------------------------------------

    def request_stop(self) -> None:
        """Ask :meth:`run` to finish the current block and return."""
        self._stop = True
        self._poke()

    def request_reload(self) -> None:
        self._reload = True
        self._poke()

    def _poke(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    def _halting(self) -> bool:
        """Stop or reload asked, or run()'s duration is over."""
        return self._stop or self._reload or (self._end is not None and time.monotonic() >= self._end)

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to *seconds*, waking early for a signal and never past
        run()'s duration (a budget's wait would otherwise outlast it). False
        when the agent should stop what it is doing (stop or reload asked,
        or the duration over)."""
        if self._halting():
            return False
        if self._end is not None:
            seconds = min(seconds, self._end - time.monotonic())
        if seconds > 0:
            if self._wake_r >= 0:
                ready, _, _ = select.select([self._wake_r], [], [], seconds)
                if ready:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
            else:
                time.sleep(seconds)
        return not self._halting()

    # -- one pass -------------------------------------------------------

    def _once(self, t: Optional[_Tracked], what: str, level: str = "warning", **fields) -> None:
        """Log *what* once per process (per PID and start time), or once
        for the agent when *t* is None."""
        logged = t.logged if t is not None else self._logged
        if what in logged:
            return
        logged.add(what)
        self.log(what, level, **fields)

    def _track(self, info: _agentscan.ProcessInfo) -> Optional[_Tracked]:
        t = self.tracked.get(info.pid)
        if t is not None and t.info.start_time == info.start_time:
            t.info = info
            return t
        if t is not None:  # the PID was reused: the process we knew is gone
            self._forget(t)
        from . import _native  # noqa: PLC0415

        try:
            pidfd = _native.pidfd_open(info.pid)
        except OSError:
            return None
        try:
            # A PID reused between reading the start time and pidfd_open
            # would give a pidfd to another process: check after the open.
            if _agentscan.start_time(info.pid, self.roots) != info.start_time:
                raise _agentscan.ProcessGone(info.pid)
        except (_agentscan.ProcessGone, OSError):
            os.close(pidfd)
            return None
        t = _Tracked(info, pidfd)
        with self.lock:
            self.tracked[info.pid] = t
        self.log("process", pid=info.pid, command=info.command, cgroup=info.cgroup or "-")
        return t

    def _forget(self, t: _Tracked) -> None:
        """Drop *t* (exited, PID reused, or no longer selected)."""
        with self.lock:
            if not _alive(t):
                self.exited += 1
            t.close()
            if self.tracked.get(t.info.pid) is t:
                del self.tracked[t.info.pid]

    def _select(self) -> Tuple[List[_Tracked], set]:
        """(processes to scan this pass, keys of every process still wanted)."""
        cfg, me = self.config, os.getpid()
        chosen: List[_Tracked] = []
        wanted: set = set()
        pids = cfg.select.pids or _agentscan.list_pids(self.roots)
        for pid in pids:
            if pid == me:
                continue
            info = _agentscan.process_info(pid, self.roots)
            if info is None or info.rss_anon is None or not _agentscan.matches(info, cfg.select):
                continue
            if info.rss_anon < cfg.min_process_bytes:
                continue
            t = self._track(info)
            if t is None:
                continue
            wanted.add(t.key)
            if info.thp_enabled is False:
                self._once(t, "thp_disabled", "info", pid=pid, command=info.command,
                           reason="the process disabled THP with prctl(PR_SET_THP_DISABLE); left alone")
                continue
            chosen.append(t)
        return chosen, wanted

    def _scan(self, t: _Tracked) -> Optional[_agentscan.ProcessScan]:
        info = t.info
        try:
            ps = _agentscan.scan(info.pid, info.start_time, self.config, self.pmd, self.roots)
        except _agentscan.ProcessGone:
            self._forget(t)
            return None
        except PermissionError as exc:
            self._once(t, "permission", pid=info.pid, command=info.command, errno=_ERRNAME(exc.errno, "?"),
                       reason="cannot read its smaps or pagemap: the agent needs ptrace read access "
                              "(CAP_SYS_PTRACE, or the same user and a dumpable process) and, for "
                              "another user's pagemap (mode 0400), CAP_DAC_READ_SEARCH; it is left alone")
            return None
        except OSError as exc:
            self._once(t, "scan_error", pid=info.pid, command=info.command,
                       errno=_ERRNAME(exc.errno or 0, "?"), reason=exc.strerror or str(exc))
            return None
        with self.lock:
            t.last_scan = ps
        if ps.shared_blocks and not self.config.repair_shared:
            t.counts.shared_skipped += ps.shared_blocks
            self.totals.shared_skipped += ps.shared_blocks
        return ps

    def run_pass(self) -> Dict[str, int]:
        """Scan every selected process once and repair within the budgets.
        Returns this pass's counts (``repaired_blocks``, ``candidates`` ...)."""
        chosen, wanted = self._select()
        with self.lock:
            for t in list(self.tracked.values()):
                if t.key not in wanted:
                    self._forget(t)
        queues: List[Tuple[_Tracked, Deque[int]]] = []
        candidates = 0
        for t in chosen:
            if not self._sleep(self.cpu_budget.delay()):
                break
            ps = self._scan(t)
            if ps is not None and ps.candidates:
                candidates += len(ps.candidates)
                queues.append((t, collections.deque(ps.candidates)))
        before = self.totals.repaired_blocks
        self._repair(queues)
        self.passes += 1
        for hook in self.on_pass:
            hook(self)
        return {"processes": len(chosen), "candidates": candidates,
                "repaired_blocks": self.totals.repaired_blocks - before}

    def _stalled(self, t: _Tracked, now: float) -> float:
        """Seconds until *t* may be collapsed in again (0: now)."""
        if now - t.window_start >= 1.0:
            t.window_start, t.busy = now, 0.0
        if t.busy < self.config.stall_share:
            return 0.0
        return t.window_start + 1.0 - now

    def _paused(self, t: _Tracked, block: int, now: float) -> bool:
        """Whether the engine's state for the block's VMA says not now."""
        vma = t.last_scan.candidate_vmas.get(block) if t.last_scan else None
        st = t.states.get(vma)
        if st is None:
            return False
        return (now < st.backoff_until or (st.disabled is not None and now < st.disabled_until)
                or now < st.blocked.get(block, (0.0, ""))[0])

    def _repair(self, queues: List[Tuple[_Tracked, Deque[int]]]) -> None:
        deadline = time.monotonic() + _PASS_REPAIR_LIMIT
        while queues and time.monotonic() < deadline:
            waits = []
            for t, q in list(queues):
                now = time.monotonic()
                if not q or t.pidfd < 0 or t.backoff_until > now:
                    queues.remove((t, q))
                    continue
                if self._paused(t, q[0], now):
                    q.popleft()  # the engine holds this VMA or block back: no budget spent
                    continue
                stalled = self._stalled(t, now)
                if stalled:
                    waits.append(stalled)
                    continue
                # CPU first: the byte bucket takes its tokens when it says 0.
                wait = self.cpu_budget.delay() or self.bytes_budget.delay(self.pmd)
                if wait:
                    self.throttled_seconds += wait
                    if not self._sleep(wait):
                        return
                    continue
                self._collapse(t, q.popleft())
            if waits and len(waits) == len(queues):
                if not self._sleep(min(waits)):
                    return
            elif self._halting():
                return

    def _collapse(self, t: _Tracked, block: int) -> None:
        """Repair one block through the engine (accounting, back-off and
        EINVAL decisions are the engine's, per VMA)."""
        vma = t.last_scan.candidate_vmas[block] if t.last_scan else None
        if vma is None:
            return
        pmd = self.pmd
        st = t.states.setdefault(vma, RepairState())
        blocks = BlockMap(block, block + pmd, pmd, (block,), {}, (), frozenset((block,)))
        cov = Coverage(block, pmd, 0, pmd, ((block, block + pmd),), pmd, SOURCE_PAGEMAP_SCAN, (), blocks)
        started = time.perf_counter()
        try:
            out = t.engine.repair(st, cov, vma[0], vma[1] - vma[0], pmd, self.policy)
        except TargetGone:
            self._forget(t)
            return
        except PermissionError:
            t.backoff_until = float("inf")
            self._once(t, "permission", pid=t.info.pid, command=t.info.command, errno="EPERM",
                       reason="process_madvise(MADV_COLLAPSE) refused: the agent needs CAP_SYS_NICE "
                              "and ptrace access (CAP_SYS_PTRACE) to this process; it is left alone")
            return
        finally:
            t.busy += time.perf_counter() - started
        c = Counts(repaired_blocks=out.blocks, repaired_bytes=out.blocks * pmd, failures=dict(out.failures))
        key = (t.info.cgroup, t.info.command)
        if self.config.metrics_per_pid:
            key += (str(t.info.pid),)
        with self.lock:
            t.counts.add(c)
            self.totals.add(c)
            self.by_group.setdefault(key, Counts()).add(c)
        info = t.info
        if st.disabled:
            self._once(t, f"refused:{vma}", "info", pid=info.pid, command=info.command,
                       vma=f"{vma[0]:#x}-{vma[1]:#x}", reason=st.disabled)
        elif block in st.blocked:
            self._once(t, f"refused:{vma}", "info", pid=info.pid, command=info.command,
                       block=f"{block:#x}", reason=st.blocked[block][1])
        if out.failures and st.backoff_until > time.monotonic():
            name = ",".join(sorted(out.failures))
            self._once(t, f"backoff:{name}", "info", pid=info.pid, command=info.command, errno=name,
                       seconds=round(st.backoff_delay, 3),
                       reason="no free huge page (ENOMEM), memory cgroup charge (EBUSY) or pages "
                              "busy for many passes (EAGAIN); the engine backs off this VMA")

    # -- running --------------------------------------------------------

    def summary(self) -> dict:
        """Totals since start, JSON-ready."""
        return {
            "cpu_seconds": round(time.process_time() - self.cpu_started, 3),
            "elapsed_seconds": round(time.monotonic() - self.started, 3),
            "failures": dict(sorted(self.totals.failures.items())),
            "passes": self.passes,
            "processes_exited": self.exited,
            "processes_tracked": len(self.tracked),
            "repaired_blocks": self.totals.repaired_blocks,
            "repaired_bytes": self.totals.repaired_bytes,
            "shared_blocks_skipped": self.totals.shared_skipped,
            "throttled_seconds": round(self.throttled_seconds, 3),
        }

    def processes(self) -> List[dict]:
        """Per-process detail (``thpguard status`` shows it from the state file)."""
        out = []
        for t in self.tracked.values():
            ps = t.last_scan
            out.append({
                "anon_bytes": ps.anon_bytes if ps else None,
                "cgroup": t.info.cgroup, "command": t.info.command,
                "failures": dict(t.counts.failures),
                "huge_bytes": ps.huge_bytes if ps else None,
                "pid": t.info.pid,
                "repaired_bytes": t.counts.repaired_bytes,
                "shared_blocks": ps.shared_blocks if ps else None,
                "small_blocks": ps.small_blocks if ps else None,
                "start_time": t.info.start_time,
            })
        return sorted(out, key=lambda p: p["pid"])

    def reconfigure(self, config: AgentConfig) -> None:
        """Use *config* from the next pass on (SIGHUP)."""
        self.config = config
        self.log.fmt = config.log_format
        self._apply_budgets()
        for t in self.tracked.values():
            t.logged.discard("permission")
            if t.backoff_until == float("inf"):
                t.backoff_until = 0.0

    def run(self, duration: Optional[float] = None,
            reload: Optional[Callable[[], AgentConfig]] = None,
            start_fields: Optional[dict] = None) -> dict:
        """Pass after pass every ``interval`` seconds until SIGTERM/SIGINT
        (or *duration* seconds); SIGHUP calls *reload* for a new config.
        The ``start`` event (with *start_fields*) is logged once the signal
        handlers are in place. Returns :meth:`summary`, also logged as the
        ``stop`` event."""
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        main = threading.current_thread() is threading.main_thread()
        old = {}
        if main:
            old_fd = signal.set_wakeup_fd(self._wake_w)
            for sig, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop),
                                 (signal.SIGHUP, self._on_hup)):
                old[sig] = signal.signal(sig, handler)
        end = self._end = None if duration is None else time.monotonic() + duration
        self.log("start", **(start_fields or {}))
        try:
            while not self._stop:
                if self._reload:
                    self._reload = False
                    self._do_reload(reload)
                began = time.monotonic()
                self.run_pass()
                if end is not None and time.monotonic() >= end:
                    break
                self._sleep(self.config.interval - (time.monotonic() - began))
        finally:
            if main:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
                signal.set_wakeup_fd(old_fd)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
            for t in list(self.tracked.values()):
                t.close()
            result = self.summary()
            self.log("stop", **result)
        return result

    def _on_stop(self, signum, frame) -> None:
        self._stop = True
        self.stop_signal = signum

    def _on_hup(self, signum, frame) -> None:
        self._reload = True

    def _do_reload(self, reload: Optional[Callable[[], AgentConfig]]) -> None:
        if reload is None:
            self.log("reload", "warning", reason="no config file to reload")
            return
        try:
            cfg = reload()
        except Exception as exc:  # a bad file must not stop a running agent
            self.log("reload", "error", reason=f"kept the old configuration: {exc}")
            return
        self.reconfigure(cfg)
        self.log("reload", config=_config_fields(cfg))


def _alive(t: _Tracked) -> bool:
    """Whether the process behind the pidfd still runs (pidfd polls readable at exit)."""
    if t.pidfd < 0:
        return False
    ready, _, _ = select.select([t.pidfd], [], [], 0)
    return not ready


def _config_fields(cfg: AgentConfig) -> dict:
    d = cfg.as_dict()
    return {k: d[k] for k in ("interval", "rate", "cpu", "stall_share", "min_process_bytes",
                              "min_vma_bytes", "repair_shared", "advised_only")} | {"select": d["select"]}
