"""``thpguard guard PID``: repair another process through the repair engine.

The engine (:mod:`thpguard.repair`) plans from the process's per-VMA block
model and collapses with ``process_madvise(MADV_COLLAPSE)`` (a
:class:`~thpguard.repair.RemoteTarget`), with a rate limit, a back-off on
ENOMEM/EBUSY and EINVAL scoped to the block with its cause.
"""

from __future__ import annotations

import errno
import os
import select
import time

from . import _checks, kernel
from ._checks import fmt_bytes
from .cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    AccessError,
    UnsupportedHostError,
    UsageError,
    _emit_json,
)


def _guard_preflight(pid: int) -> int:
    """Check privileges before touching anything; return a pidfd."""
    from . import _native  # noqa: PLC0415

    roots = kernel.Roots.from_env()
    if not os.path.exists(os.path.join(roots.proc, str(pid))):
        raise AccessError(f"no process with PID {pid}")
    nice = _checks.has_capability(_checks.CAP_SYS_NICE)
    if nice is False:
        raise AccessError(
            f"guard needs CAP_SYS_NICE to call process_madvise(MADV_COLLAPSE) on PID {pid}, and this "
            "process lacks it: run it as root, or with the capability "
            "(systemd: AmbientCapabilities=CAP_SYS_NICE)")
    try:
        os.close(os.open(os.path.join(roots.proc, str(pid), "pagemap"), os.O_RDONLY))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise AccessError(f"guard needs ptrace read access to PID {pid} (same user and dumpable, or "
                             f"CAP_SYS_PTRACE): opening /proc/{pid}/pagemap failed with "
                             f"{errno.errorcode[exc.errno]}") from None
        if exc.errno == errno.ESRCH and os.path.exists(os.path.join(roots.proc, str(pid))):
            raise AccessError(f"PID {pid} has no user memory (a kernel thread, or a zombie): "
                              "nothing to guard") from None
        raise AccessError(f"PID {pid}: {exc.strerror}") from None
    try:
        return _native.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise AccessError(f"no process with PID {pid}") from None
        if exc.errno == errno.ENOSYS:
            raise UnsupportedHostError("guard needs pidfd_open (Linux 5.3)") from None
        raise AccessError(f"pidfd_open({pid}) failed: {exc.strerror or exc}") from None


def _guard_pass(pid, pidfd, args, budget, states) -> dict:
    """One scan-and-repair pass through the repair engine (``process_madvise``)."""
    from . import _procmap  # noqa: PLC0415
    from .blocks import SOURCE_PAGEMAP_SCAN, Coverage  # noqa: PLC0415
    from .repair import RemoteTarget, RepairEngine, RepairState, TargetGone  # noqa: PLC0415

    pc = _procmap.scan_process(pid)
    if pc.source != _procmap.SOURCE_PAGEMAP_SCAN:
        raise UnsupportedHostError("guard needs PAGEMAP_SCAN (Linux 6.7) to find split blocks")
    engine = RepairEngine(RemoteTarget(pid, pidfd))
    pmd = pc.pmd_size
    vmas = [v for v in pc.vmas if v.advised or (args.all_eligible and v.thp_eligible)]
    repaired, failed, refused = [], {}, []
    found = 0
    now = time.monotonic()
    for v in vmas:
        if v.blocks is None:
            continue
        found += len(v.blocks.split) + len(v.blocks.partial)
        st = states.setdefault((v.start, v.end), RepairState())
        if now < st.backoff_until:
            continue
        cov = Coverage(v.start, v.size, v.huge_bytes, v.present_bytes or 0, (), pmd,
                       SOURCE_PAGEMAP_SCAN, (), v.blocks)
        for call in engine.plan(st, cov, v.start, v.size, v.size, pmd, now):
            budget.wait(call[1])
            try:
                ((start, _, errs, spent),) = engine.run([call], pmd, 0)
            except PermissionError as exc:
                raise AccessError(f"PID {pid}: {exc.strerror}") from None
            except TargetGone:
                raise _procmap.ProcessGone(pid) from None
            err = errs[0]
            if err == 0:
                st.blocked.pop(start, None)
                repaired.append({"address": start, "bytes": pmd, "seconds": round(spent, 6)})
                continue
            name = errno.errorcode.get(err, str(err))
            failed[name] = failed.get(name, 0) + 1
            if err == errno.EINVAL:
                whole, reason = engine.diagnose(start, pmd, v.start, v.size)
                st.blocked[start] = (now + 10.0, reason)
                refused.append({"address": start, "reason": reason})
            elif err in (errno.ENOMEM, errno.EBUSY):
                # The kernel is short of memory (or the memcg is full):
                # this VMA waits, doubling up to a minute.
                st.backoff_delay = min(60.0, max(args.interval, st.backoff_delay * 2))
                st.backoff_until = time.monotonic() + st.backoff_delay
                break
    return {"split_found": found, "repaired": repaired, "failed": failed, "refused": refused,
            "vmas": len(vmas)}


class _RateLimit:
    """Token bucket: at most *rate* bytes per second, bursts of one second."""

    def __init__(self, rate: int) -> None:
        self.rate = max(1, rate)
        self.tokens = float(self.rate)
        self.last = time.monotonic()

    def wait(self, amount: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= amount or amount > self.rate and self.tokens >= self.rate:
                self.tokens -= amount
                return
            time.sleep((amount - self.tokens) / self.rate)


def cmd_guard(args) -> int:
    from . import _procmap  # noqa: PLC0415

    if args.rate <= 0:
        # 0 became 1 byte/s in _RateLimit: one block, then weeks of waiting.
        raise UsageError(f"--rate must be more than 0 bytes per second, got {args.rate}")
    pidfd = _guard_preflight(args.pid)
    budget = _RateLimit(args.rate)
    states: dict = {}  # per VMA: the repair engine's back-off and EINVAL decisions
    total = passes = 0

    def summary(event: str, text: str, code: int) -> int:
        if args.json:
            _emit_json({"command": "guard", "event": event, "exit_code": code, "passes": passes,
                        "pid": args.pid, "repaired_blocks": total, "timestamp_seconds": time.time()})
        else:
            print(f"{text}; {total} block(s) repaired in {passes} pass(es)", flush=True)
        return code

    try:
        while True:
            try:
                result = _guard_pass(args.pid, pidfd, args, budget, states)
            except _procmap.ProcessGone:
                return summary("exit", f"PID {args.pid} exited", EXIT_OK)
            total += len(result["repaired"])
            passes += 1
            if args.json:
                _emit_json(dict(result, command="guard", event="pass", pid=args.pid,
                                timestamp_seconds=time.time()))
            else:
                for r in result["repaired"]:
                    print(f"{time.strftime('%H:%M:%S')}  repaired {r['address']:#x} "
                          f"({fmt_bytes(r['bytes'])}) in {r['seconds'] * 1000:.2f} ms", flush=True)
                for r in result["refused"]:
                    print(f"{time.strftime('%H:%M:%S')}  {r['address']:#x} not repaired: "
                          f"{r['reason']}", flush=True)
                for name, n in result["failed"].items():
                    if name != "EINVAL":
                        print(f"{time.strftime('%H:%M:%S')}  {n} block(s) not repaired: {name} "
                              "(retried later)", flush=True)
            if args.once:
                if not args.json and not result["split_found"]:
                    print(f"PID {args.pid}: no split blocks in {result['vmas']} guarded VMA(s)")
                return EXIT_FAILED if result["failed"] else EXIT_OK
            # Sleep until the next pass, or wake at once when the process exits.
            ready, _, _ = select.select([pidfd], [], [], args.interval)
            if ready:
                return summary("exit", f"PID {args.pid} exited", EXIT_OK)
    except KeyboardInterrupt:
        return summary("interrupted", f"interrupted: guarded PID {args.pid}", EXIT_INTERRUPTED)
    finally:
        os.close(pidfd)
