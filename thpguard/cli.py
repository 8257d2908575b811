"""The ``thpguard`` command: verify, status, watch, guard.

Human text goes to stdout, diagnostics to stderr. ``--json`` prints one
object (``watch``, ``guard``: one object per line) with sorted keys and a
``schema_version``; every duration in it is in seconds, named ``*_seconds``.
Exit codes (each a distinct cause a script can test):

== ==========================================================================
0  fine
1  a check failed, or a repair did not take
2  usage error (bad arguments)
3  no such process, or no permission (privilege, ptrace access, not root)
4  unsupported host (not Linux, no THP, native module missing, no PAGEMAP_SCAN)
130 interrupted (Ctrl-C), after printing what was done
== ==========================================================================
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import re
import select
import signal
import sys
import time
from typing import List, Optional

from . import _checks, kernel
from ._checks import FAIL, NA, OK, WARN, Check, HostContext, fmt_bytes
from .errors import ThpguardError

# 2: every duration in seconds (``*_seconds``; was ``*_ms`` and ``ms``), ``time`` became
# ``timestamp_seconds``, exit codes 3 and 4.
SCHEMA_VERSION = 2
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_ACCESS, EXIT_UNSUPPORTED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_CODES_HELP = ("exit status: 0 ok; 1 a check failed or a repair did not take; 2 usage error; "
                   "3 no such process or no permission; 4 unsupported host; 130 interrupted (Ctrl-C).")
VERDICT_CERTAIN, VERDICT_NOT_CERTAIN, VERDICT_UNSUPPORTED = "certain", "not_certain", "unsupported"


class CliError(Exception):
    """A failure the command reports in one line and an exit code."""

    exit_code = EXIT_USAGE


class UsageError(CliError):
    """Bad arguments: exit 2."""


class AccessError(CliError):
    """No such process, or no permission to do it: exit 3."""

    exit_code = EXIT_NO_ACCESS


class UnsupportedHostError(CliError):
    """This host cannot do it at all (kernel or build): exit 4."""

    exit_code = EXIT_UNSUPPORTED


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default unless it is off/None or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    try:
        from . import __version__  # noqa: PLC0415

        return __version__
    except ImportError:
        return "unknown"


def _emit_json(obj: dict, stream=None) -> None:
    out = dict(obj, schema_version=SCHEMA_VERSION)
    print(json.dumps(out, sort_keys=True), file=stream or sys.stdout, flush=True)


def _err(message: str) -> None:
    print(f"thpguard: {message}", file=sys.stderr, flush=True)


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 8M, 512K or 1G, got {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def _pid(text: str) -> int:
    if text == "self":
        return os.getpid()
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a process id (a positive integer), got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


# -- verify -------------------------------------------------------------


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify", help="check whether this host can keep huge pages across fork, with a live self-test",
        description="Check the host's THP settings and kernel features, then run a live self-test "
                    "of every fork policy. Exit 0 when the host can give THP certainty, 1 when a "
                    "check failed, 4 when the host is unsupported.",
        epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object (see the schema in the docs)")
    out.add_argument("--quiet", "-q", action="store_true", help="print the verdict line only")
    p.add_argument("--pid", type=_pid, help="check this process's prctl and cgroup instead of our own")
    p.add_argument("--size", type=_size, default=None,
                   help="bytes per self-test region (default: 4 huge pages)")
    p.add_argument("--skip-selftest", action="store_true", help="host checks only, no live test")
    p.add_argument("--fix", action="store_true",
                   help="as root, write the advised sysfs values (each change is printed)")
    p.set_defaults(func=_cmd_verify)


def _unsupported_reason(roots: kernel.Roots) -> Optional[str]:
    if platform.system() != "Linux":
        return f"thpguard needs Linux, this is {platform.system()}"
    if not os.path.isdir(os.path.join(roots.sys, kernel.THP_DIR)):
        return f"this kernel has no transparent huge pages ({os.path.join(roots.sys, kernel.THP_DIR)} is missing)"
    try:
        from . import _native  # noqa: F401,PLC0415
    except ImportError as exc:
        return f"the native module is not built ({exc}); reinstall thpguard"
    return None


def _apply_fixes(checks: List[Check], quiet: bool) -> List[dict]:
    applied = []
    for c in checks:
        if c.fix is None or c.status not in (WARN, FAIL):
            continue
        path, value = c.fix
        try:
            with open(path) as f:
                before = kernel._bracketed(f.read())
        except OSError:
            before = None
        entry = {"check": c.name, "path": path, "before": before, "value": value, "error": None}
        try:
            with open(path, "w") as f:
                f.write(value + "\n")
        except OSError as exc:
            entry["error"] = exc.strerror or str(exc)
            _err(f"--fix: could not write {value!r} to {path}: {entry['error']}")
        else:
            if not quiet:
                print(f"fix: wrote {value} to {path} (was {before})")
        applied.append(entry)
    return applied


def _verdict(checks: List[Check], unsupported: Optional[str]):
    failed = [c for c in checks if c.status == FAIL]
    warned = [c for c in checks if c.status == WARN]
    if unsupported:
        return VERDICT_UNSUPPORTED, EXIT_UNSUPPORTED, f"UNSUPPORTED: {unsupported}"
    if failed:
        names = ", ".join(c.title for c in failed)
        first = next((c.advice for c in failed if c.advice), "")
        line = f"NOT CERTAIN: {len(failed)} check(s) failed ({names})"
        if first:
            line += f"; first change: {first}"
        return VERDICT_NOT_CERTAIN, EXIT_FAILED, line
    extra = f", {len(warned)} warning(s)" if warned else ""
    return (VERDICT_CERTAIN, EXIT_OK,
            f"CERTAIN: this host keeps thpguard regions huge-page backed across fork{extra}")


def _timings_text(c: Check) -> str:
    t = (c.measurements or {}).get("timings", {})
    names = [("alloc", "alloc"), ("fork", "fork"), ("split_write", "split"), ("write", "write"),
             ("detect", "detect"), ("repair", "repair"), ("verify", "verify")]
    return "  ".join(f"{label} {t[k + '_seconds'] * 1000:.2f}" for k, label in names
                     if k + "_seconds" in t)


def _print_verify_text(header: str, checks: List[Check], line: str, size: Optional[int]) -> None:
    print(header)
    width = max((len(c.title) for c in checks if not c.name.startswith("selftest_")), default=10)
    for c in checks:
        if c.name.startswith("selftest_"):
            continue
        print(f"  {c.status:<4}  {c.title:<{width}}  {c.detail}")
        if c.advice and c.status in (WARN, FAIL):
            print(f"  {'':<4}  {'':<{width}}  -> {c.advice}")
    tests = [c for c in checks if c.name.startswith("selftest_")]
    if tests:
        print(f"self-test ({fmt_bytes(size)} region per policy; times in ms):")
        for c in tests:
            policy = c.name[len("selftest_"):]
            text = _timings_text(c) if c.status == OK else c.detail
            print(f"  {c.status:<4}  {policy:<8} {text}")
    print(line)


def _cmd_verify(args) -> int:
    roots = kernel.Roots.from_env()
    if args.fix and os.geteuid() != 0:
        raise AccessError("verify --fix writes to /sys and must run as root; it changed nothing. "
                         "Run it as root, or apply the advice by hand.")
    if args.pid is not None and not os.path.exists(os.path.join(roots.proc, str(args.pid))):
        raise AccessError(f"no process with PID {args.pid}")
    started = time.perf_counter()
    unsupported = _unsupported_reason(roots)
    caps = kernel.capabilities(refresh=True, roots=roots)
    ctx = HostContext(caps, roots, args.pid)
    size = args.size or 4 * (caps.pmd_size or 2 * 1024 * 1024)
    checks = _checks.host_checks(ctx, headroom=max(64 << 20, 2 * size))
    fixes: List[dict] = []
    if args.fix:
        fixes = _apply_fixes(checks, args.quiet or args.json)
        if fixes:
            caps = kernel.capabilities(refresh=True, roots=roots)
            ctx = HostContext(caps, roots, args.pid)
            checks = _checks.host_checks(ctx, headroom=max(64 << 20, 2 * size))
    if not unsupported and not args.skip_selftest:
        ok, why = kernel.can_get_huge_pages(caps)
        if ok:
            from . import _selftest  # noqa: PLC0415 - imports the region layer

            # Progress only for a person watching: never into JSON, a pipe or a log.
            progress = sys.stderr.isatty() and not args.json and not args.quiet
            for n, policy in enumerate(_selftest.POLICIES, 1):
                if progress:
                    print(f"\rself-test {n}/{len(_selftest.POLICIES)}: {policy} "
                          f"({fmt_bytes(size)})...", end="", file=sys.stderr, flush=True)
                checks.append(_selftest.run_policy(policy, size))
            if progress:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
        else:
            checks.append(Check("selftest", "self-test", FAIL, f"not run: {why}"))
    verdict, code, line = _verdict(checks, unsupported)
    if any(f["error"] for f in fixes) and code == EXIT_OK:
        code = EXIT_FAILED
    elapsed = time.perf_counter() - started
    if args.json:
        _emit_json({
            "capabilities": caps.as_dict(),
            "checks": [c.as_dict() for c in checks],
            "command": "verify",
            "elapsed_seconds": round(elapsed, 3),
            "exit_code": code,
            "fixes": fixes,
            "host": {"kernel_release": caps.kernel_release, "machine": caps.machine,
                     "pid": args.pid if args.pid is not None else os.getpid()},
            "selftest_size": None if args.skip_selftest or unsupported else size,
            "thpguard_version": _version(),
            "verdict": verdict,
            "verdict_text": line,
        })
    elif args.quiet:
        print(line)
    else:
        who = f"PID {args.pid}" if args.pid is not None else f"pid {os.getpid()}"
        header = (f"thpguard verify: Linux {caps.kernel_release} {caps.machine}, {who}, "
                  f"{elapsed:.2f} s")
        _print_verify_text(header, checks, line, None if args.skip_selftest else size)
    return code


# -- status -------------------------------------------------------------


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="per-VMA huge-page coverage of processes",
                       description="Show, per VMA of each process, its range, size, THP "
                                   "eligibility, PMD-mapped bytes and split blocks (PMD-size blocks "
                                   "fully mapped but not PMD-mapped), with totals. By default only "
                                   "the VMAs that matter for huge pages are listed: thpguard regions "
                                   "(marked '*', with their name), VMAs advised MADV_HUGEPAGE or "
                                   "holding huge pages, and anonymous VMAs of at least one huge page; "
                                   "--all lists every VMA.",
                       epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter)
    p.add_argument("pids", nargs="*", type=_pid, metavar="PID",
                   help="processes to show (default: every readable process with huge-page VMAs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--only-eligible", action="store_true", help="only VMAs that may get THP (THPeligible: 1)")
    p.add_argument("--all", action="store_true", help="list every VMA, not only those that matter for huge pages")
    p.add_argument("--prometheus", action="store_true",
                   help="print node_exporter textfile-collector metrics instead of the table")
    p.add_argument("--prometheus-file", metavar="PATH",
                   help="write those metrics to PATH atomically (e.g. .../textfile/thpguard.prom)")
    p.add_argument("--prometheus-per-pid", action="store_true",
                   help="label the metrics with pid and VMA address too (new series at every restart)")
    p.set_defaults(func=_cmd_status)


def _scan_or_error(pid: int, errors: list):
    from . import _procmap  # noqa: PLC0415

    try:
        return _procmap.scan_process(pid)
    except _procmap.ProcessGone:
        errors.append({"pid": pid, "errno": "ESRCH", "message": f"no process with PID {pid}"})
    except PermissionError as exc:
        errors.append({"pid": pid, "errno": errno.errorcode.get(exc.errno, "EACCES"), "message": exc.strerror})
    except OSError as exc:
        errors.append({"pid": pid, "errno": errno.errorcode.get(exc.errno or 0, "?"),
                       "message": f"PID {pid}: {exc.strerror or exc}"})
    return None


def _interesting(pc) -> bool:
    return any(v.advised or v.pmd_mapped_bytes for v in pc.vmas)


_ANON_PATHS = ("", "[heap]")


def _matters(v, pmd_size: int) -> bool:
    """Whether a VMA says anything about huge pages (what status lists without --all)."""
    if getattr(v, "region", None) is not None or v.advised or v.pmd_mapped_bytes:
        return True
    anonymous = v.path in _ANON_PATHS or v.path.startswith("[anon")
    return anonymous and v.size >= pmd_size


def _shown_vmas(pc, args) -> list:
    return [v for v in pc.vmas
            if (v.thp_eligible or not args.only_eligible)
            and (args.all or _matters(v, pc.pmd_size or 2 << 20))]


def _print_process(pc, args) -> None:
    t = pc.totals(args.only_eligible)
    split = "?" if t["split_blocks"] is None else t["split_blocks"]
    shown = _shown_vmas(pc, args)
    hidden = t["vmas"] - len(shown)
    print(f"PID {pc.pid} ({pc.name}): {fmt_bytes(t['pmd_mapped_bytes'])} PMD-mapped, "
          f"{split} split block(s), {t['vmas']} VMAs [{pc.source}]"
          + (f"; {hidden} VMA(s) without huge-page interest hidden (--all shows them)" if hidden else ""))
    # [vsyscall] sits at ffffffffff600000: 16 hex digits where user space needs 12.
    digits = max([12] + [len(f"{v.end:x}") for v in shown])
    rng = 2 * digits + 1
    print(f"  {'range':<{rng}}  {'size':>7} {'elig':>4} {'adv':>3} {'pmd-mapped':>10} {'split':>5}  path")
    for v in shown:
        elig = {True: "yes", False: "no", None: "?"}[v.thp_eligible]
        vsplit = "?" if v.split_blocks is None else len(v.split_blocks)
        region = getattr(v, "region", None)
        path = v.path if region is None else f"* thpguard region {region!r}" if region else "* thpguard region"
        print(f"  {v.start:0{digits}x}-{v.end:0{digits}x}  {fmt_bytes(v.size):>7} {elig:>4} "
              f"{'hg' if v.advised else '':>3} {fmt_bytes(v.pmd_mapped_bytes):>10} {vsplit:>5}  {path}")
    print(f"  {'total (all ' + str(t['vmas']) + ' VMAs)':<{rng}}  {fmt_bytes(t['size']):>7} {'':>4} {'':>3} "
          f"{fmt_bytes(t['pmd_mapped_bytes']):>10} {split:>5}")


def _cmd_status(args) -> int:
    errors: list = []
    pids = args.pids
    explicit = bool(pids)
    if not explicit:
        roots = kernel.Roots.from_env()
        pids = sorted(int(n) for n in os.listdir(roots.proc) if n.isdigit())
    found = []
    for pid in pids:
        pc = _scan_or_error(pid, errors if explicit else [])
        if pc is not None and (explicit or _interesting(pc)):
            found.append(pc)
    if args.prometheus or args.prometheus_file:
        from . import metrics  # noqa: PLC0415 - only these flags need it

        text = metrics.textfile(found, per_pid=args.prometheus_per_pid)
        if args.prometheus_file:
            metrics.write_textfile(args.prometheus_file, text)
        else:
            sys.stdout.write(text)
    elif args.json:
        _emit_json({
            "command": "status",
            "errors": errors,
            "processes": [{
                "cgroup": pc.cgroup, "name": pc.name, "pid": pc.pid, "pmd_size": pc.pmd_size,
                "source": pc.source,
                "totals": pc.totals(args.only_eligible),
                "vmas": [v.as_dict() for v in _shown_vmas(pc, args)],
            } for pc in found],
        })
    else:
        for pc in found:
            _print_process(pc, args)
        if not found and not errors:
            print("no process with huge-page VMAs found")
    for e in errors:
        _err(e["message"])
    return EXIT_NO_ACCESS if errors else EXIT_OK


# -- watch --------------------------------------------------------------


def _add_watch(sub) -> None:
    p = sub.add_parser("watch", help="coverage of a process over time, with splits and repairs",
                       description="Sample a process's THP coverage every INTERVAL seconds and "
                                   "print splits and repairs as they happen, until the process "
                                   "exits or Ctrl-C.",
                       epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter)
    p.add_argument("pid", type=_pid, metavar="PID")
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="S", help="seconds between samples")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N samples (default 0: no limit)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample, one per line")
    p.set_defaults(func=_cmd_watch)


def _split_set(pc) -> set:
    return {b for v in pc.vmas if v.thp_eligible for b in (v.split_blocks or ())}


def _cmd_watch(args) -> int:
    from . import _procmap  # noqa: PLC0415

    before: Optional[set] = None
    samples = 0
    try:
        while True:
            try:
                pc = _procmap.scan_process(args.pid)
            except _procmap.ProcessGone:
                if samples == 0:
                    raise AccessError(f"no process with PID {args.pid}") from None
                if args.json:
                    _emit_json({"command": "watch", "event": "exit", "pid": args.pid, "samples": samples,
                                "timestamp_seconds": time.time()})
                else:
                    print(f"PID {args.pid} exited")
                return EXIT_OK
            except PermissionError as exc:
                raise AccessError(exc.strerror) from None
            t = pc.totals(only_eligible=True)
            now = _split_set(pc)
            new = sorted(now - before) if before is not None else []
            repaired = sorted(before - now) if before is not None else []
            before = now
            samples += 1
            if args.json:
                _emit_json({"command": "watch", "event": "sample", "pid": args.pid,
                            "timestamp_seconds": time.time(),
                            "totals": t, "split": [hex(b) for b in new],
                            "repaired": [hex(b) for b in repaired]})
            else:
                ratio = t["pmd_mapped_bytes"] / t["eligible_bytes"] if t["eligible_bytes"] else 0.0
                split = "?" if t["split_blocks"] is None else t["split_blocks"]
                events = "".join([f"  +{len(new)} split ({', '.join(hex(b) for b in new[:3])})" if new else "",
                                  f"  {len(repaired)} repaired" if repaired else ""])
                print(f"{time.strftime('%H:%M:%S')}  PMD-mapped {fmt_bytes(t['pmd_mapped_bytes'])} of "
                      f"{fmt_bytes(t['eligible_bytes'])} eligible ({ratio:.0%})  split {split}{events}",
                      flush=True)
            if args.count and samples >= args.count:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        if args.json:
            _emit_json({"command": "watch", "event": "interrupted", "exit_code": EXIT_INTERRUPTED,
                        "pid": args.pid, "samples": samples, "timestamp_seconds": time.time()})
        else:
            print(f"interrupted after {samples} sample(s) of PID {args.pid}", flush=True)
        return EXIT_INTERRUPTED


# -- guard --------------------------------------------------------------


def _add_guard(sub) -> None:
    p = sub.add_parser("guard", help="repair split huge pages in another process (process_madvise)",
                       description="Re-collapse split PMD-size blocks in another process with "
                                   "process_madvise(MADV_COLLAPSE), for services that cannot import "
                                   "thpguard. Needs CAP_SYS_NICE and ptrace access to the process. "
                                   "Runs until the process exits (or one pass with --once); Ctrl-C "
                                   "prints what was repaired and exits 130.",
                       epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter)
    p.add_argument("pid", type=_pid, metavar="PID")
    p.add_argument("--all-eligible", action="store_true",
                   help="repair every THP-eligible VMA, not only MADV_HUGEPAGE ones (VmFlags hg)")
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="S", help="seconds between scans")
    p.add_argument("--rate", type=_size, default=256 << 20, metavar="BYTES",
                   help="at most this many bytes collapsed per second (default 256M)")
    p.add_argument("--once", action="store_true", help="one scan and repair pass, then exit")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per repair pass, one per line; errors and the summary too")
    p.set_defaults(func=_cmd_guard)


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
        raise AccessError(f"PID {pid}: {exc.strerror}") from None
    try:
        return _native.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise AccessError(f"no process with PID {pid}") from None
        if exc.errno == errno.ENOSYS:
            raise UnsupportedHostError("guard needs pidfd_open (Linux 5.3)") from None
        raise AccessError(f"pidfd_open({pid}) failed: {exc.strerror or exc}") from None


def _guard_pass(pid, pidfd, args, budget) -> dict:
    from . import _native, _procmap  # noqa: PLC0415

    pc = _procmap.scan_process(pid)
    if pc.source != _procmap.SOURCE_PAGEMAP_SCAN:
        raise UnsupportedHostError("guard needs PAGEMAP_SCAN (Linux 6.7) to find split blocks")
    targets = [(b, v) for v in pc.vmas
               if (v.advised or (args.all_eligible and v.thp_eligible))
               for b in (v.split_blocks or ())]
    repaired, failed = [], {}
    pmd = pc.pmd_size
    for block, _vma in targets:
        budget.wait(pmd)
        started = time.perf_counter()
        try:
            _native.process_madvise(pidfd, [(block, pmd)], _native.MADV_COLLAPSE)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise AccessError(f"process_madvise(MADV_COLLAPSE) on PID {pid} was refused (EPERM): "
                                 "guard needs CAP_SYS_NICE and ptrace access to it") from None
            if exc.errno == errno.ESRCH:
                raise _procmap.ProcessGone(pid) from None
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            failed[name] = failed.get(name, 0) + 1
            continue
        repaired.append({"address": block, "bytes": pmd,
                         "seconds": round(time.perf_counter() - started, 6)})
    return {"split_found": len(targets), "repaired": repaired, "failed": failed,
            "vmas": sum(1 for v in pc.vmas if v.advised or (args.all_eligible and v.thp_eligible))}


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


def _cmd_guard(args) -> int:
    from . import _procmap  # noqa: PLC0415

    if args.rate <= 0:
        # 0 became 1 byte/s in _RateLimit: one block, then weeks of waiting.
        raise UsageError(f"--rate must be more than 0 bytes per second, got {args.rate}")
    pidfd = _guard_preflight(args.pid)
    budget = _RateLimit(args.rate)
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
                result = _guard_pass(args.pid, pidfd, args, budget)
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
                for name, n in result["failed"].items():
                    print(f"{time.strftime('%H:%M:%S')}  {n} block(s) not repaired: {name} "
                          "(retried next pass)", flush=True)
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


# -- entry point --------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="thpguard",
        description="Transparent huge pages that survive fork(): check a host, inspect and repair processes.",
        epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"thpguard {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_verify(sub)
    _add_status(sub)
    _add_watch(sub)
    _add_guard(sub)
    _add_run(sub)
    return p


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a program with the guard configured (THPGUARD_* variables)",
                       description="Execute COMMAND with THPGUARD_GUARD=1 (and the other settings) in "
                                   "its environment, checked first. Only programs that import "
                                   "thpguard are affected.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--no-guard", action="store_true", help="set THPGUARD_GUARD=0 instead of 1")
    p.add_argument("--interval", type=float, metavar="S", help="guard interval in seconds")
    p.add_argument("--fork-policy", metavar="POLICY", help="default fork policy for alloc()")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from . import launch  # noqa: PLC0415

    try:
        launch.run(args.command, guard=not args.no_guard, interval=args.interval,
                   fork_policy=args.fork_policy)
    except ThpguardError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except FileNotFoundError as exc:
        _err(str(exc.strerror or exc))
        return 127
    return EXIT_OK  # not reached: run() execs or raises


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``thpguard`` command line; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except CliError as exc:
        _err(str(exc))
        if getattr(args, "json", False) and args.command in ("watch", "guard"):
            # A consumer reading the JSON lines sees why the stream ended.
            _emit_json({"command": args.command, "event": "error", "exit_code": exc.exit_code,
                        "message": str(exc), "pid": getattr(args, "pid", None),
                        "timestamp_seconds": time.time()})
        return exc.exit_code
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # past verify's progress line and the echoed ^C
        _err(f"interrupted during {args.command}")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (| head): not an error of ours.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
