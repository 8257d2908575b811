"""The ``thpguard`` command: verify, status, watch, guard, run, agent.

Human text goes to stdout, diagnostics to stderr. ``--json`` prints one
object (``watch``, ``guard``: one object per line) with sorted keys and a
``schema_version``; every duration in it is in seconds, named ``*_seconds``.
Exit codes (each a distinct cause a script can test):

=== =========================================================================
0   fine
1   a check failed, or a repair did not take
2   usage error (bad arguments)
3   no such process, or no permission (privilege, ptrace access, not root)
4   unsupported host (not Linux, no THP, native module missing, no PAGEMAP_SCAN)
126 ``run``: the program cannot be executed; 127 ``run``: it was not found
130 interrupted (Ctrl-C), after printing what was done
=== =========================================================================
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import sys
import time
from typing import List, Optional

from . import kernel
from ._checks import fmt_bytes
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


_MAX_SECONDS = 365 * 86400.0  # time.sleep() and select() overflow on inf or 1e308


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= _MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds (at most {_MAX_SECONDS:.0f}), got {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of samples (0 or more), got {text!r}")
    return int(text)


# -- verify -------------------------------------------------------------


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify", help="check whether this host can keep huge pages across fork, with a live self-test",
        description="Check the host's THP settings and kernel features, then run a live self-test "
                    "of every fork policy. Exit 0 when the host can give THP certainty, 1 when a "
                    "check failed, 3 when --fix is run without root or --pid names a process that "
                    "does not exist or may not be read, 4 when the host is unsupported.",
        epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object (see the schema in the docs)")
    out.add_argument("--quiet", "-q", action="store_true", help="print the verdict line only")
    p.add_argument("--pid", type=_pid, help="check this process's prctl and cgroup instead of our own")
    p.add_argument("--size", type=_size, default=None,
                   help="bytes per self-test region (default: 4 huge pages)")
    p.add_argument("--skip-selftest", action="store_true", help="host checks only, no live test")
    p.add_argument("--fix", action="store_true",
                   help="as root, write the advised sysfs values, printing each (pools: only with --hugetlb-pool)")
    p.add_argument("--hugetlb-pool", type=int, metavar="PAGES", default=None,
                   help="check that the hugetlb pool holds PAGES free pages (with --fix: grow it)")
    p.add_argument("--hugetlb-page-size", type=_size, metavar="SIZE", default=None,
                   help="page size of --hugetlb-pool (default: the PMD size, 2M on x86-64)")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    from ._cliverify import cmd_verify  # noqa: PLC0415

    return cmd_verify(args)


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
    p.add_argument("--allow-unsafe-dir", action="store_true",
                   help="with --prometheus-file: write even where other users could redirect "
                        "the file (a directory on the path they may change, or their symlink)")
    p.add_argument("--agent-state", metavar="PATH", default="/run/thpguard/agent.json", help="add the "
                   "node agent's per-process rows from its state file (default: %(default)s, if it exists)")
    p.set_defaults(func=_cmd_status)


def _scan_or_error(pid: int, errors: list):
    from . import _procmap  # noqa: PLC0415

    try:
        return _procmap.scan_process(pid)
    except _procmap.ProcessGone as exc:
        errors.append({"pid": pid, "errno": "ESRCH", "message": str(exc)})
    except PermissionError as exc:
        errors.append({"pid": pid, "errno": errno.errorcode.get(exc.errno, "EACCES"), "message": exc.strerror})
    except OSError as exc:
        errors.append({"pid": pid, "errno": errno.errorcode.get(exc.errno or 0, "?"),
                       "message": f"PID {pid}: {exc.strerror or exc}"})
    return None


def _interesting(pc) -> bool:
    return any(v.advised or v.huge_bytes for v in pc.vmas)


_ANON_PATHS = ("", "[heap]")


def _matters(v, pmd_size: int) -> bool:
    """Whether a VMA says anything about huge pages (what status lists without --all)."""
    if getattr(v, "region", None) is not None or v.advised or v.huge_bytes:
        return True
    anonymous = v.path in _ANON_PATHS or v.path.startswith("[anon")
    return anonymous and v.size >= pmd_size


def _shown_vmas(pc, args) -> list:
    return [v for v in pc.vmas
            if (v.thp_eligible or not args.only_eligible)
            and (args.all or _matters(v, pc.pmd_size or 2 << 20))]


def _print_process(pc, args, agent_row: Optional[str] = None) -> None:
    t = pc.totals(args.only_eligible)
    split = "?" if t["split_blocks"] is None else t["split_blocks"]
    shown = _shown_vmas(pc, args)
    hidden = t["vmas"] - len(shown)
    print(f"PID {pc.pid} ({pc.name}): {fmt_bytes(t['huge_bytes'])} PMD-mapped, "
          f"{split} split block(s), {t['vmas']} VMAs [{pc.source}]"
          + (f"; {hidden} VMA(s) without huge-page interest hidden (--all shows them)" if hidden else ""))
    if agent_row is not None:
        print(agent_row)
    if t["copy_pool_bytes"]:
        print(f"  {pc.pool_note(t)}: spare huge pages of the lazy copy")
    # [vsyscall] sits at ffffffffff600000: 16 hex digits where user space needs 12.
    digits = max([12] + [len(f"{v.end:x}") for v in shown])
    rng = 2 * digits + 1
    print(f"  {'range':<{rng}}  {'size':>7} {'elig':>4} {'adv':>3} {'pmd-mapped':>10} {'split':>5}  path")
    for v in shown:
        elig = {True: "yes", False: "no", None: "?"}[v.thp_eligible]
        vsplit = "?" if v.split_blocks is None else v.split_blocks
        path = getattr(v, "label", v.path)
        print(f"  {v.start:0{digits}x}-{v.end:0{digits}x}  {fmt_bytes(v.size):>7} {elig:>4} "
              f"{'hg' if v.advised else '':>3} {fmt_bytes(v.huge_bytes):>10} {vsplit:>5}  {path}")
    print(f"  {'total (all ' + str(t['vmas']) + ' VMAs)':<{rng}}  {fmt_bytes(t['size']):>7} {'':>4} {'':>3} "
          f"{fmt_bytes(t['huge_bytes']):>10} {split:>5}")


def _cmd_status(args) -> int:
    errors: list = []
    pids = args.pids
    explicit = bool(pids)
    if not explicit:
        roots = kernel.Roots.from_env()
        pids = sorted(int(n) for n in os.listdir(roots.proc) if n.isdigit())
    from ._cliagent import agent_line, agent_state  # noqa: PLC0415

    agent_rows = agent_state(args.agent_state)
    found = []
    for pid in pids:
        pc = _scan_or_error(pid, errors if explicit else [])
        if pc is not None and (explicit or _interesting(pc) or pc.pid in agent_rows):
            found.append(pc)
    if args.prometheus or args.prometheus_file:
        from . import metrics  # noqa: PLC0415 - only these flags need it

        text = metrics.textfile(found, per_pid=args.prometheus_per_pid)
        if args.prometheus_file:
            try:
                metrics.write_textfile(args.prometheus_file, text,
                                       allow_unsafe_dir=args.allow_unsafe_dir)
            except metrics.TextfileError as exc:
                raise UsageError(str(exc.strerror or exc)) from None
        else:
            sys.stdout.write(text)
    elif args.json:
        _emit_json({
            "command": "status",
            "errors": errors,
            "processes": [{
                "agent": agent_rows.get(pc.pid), "cgroup": pc.cgroup, "name": pc.name, "pid": pc.pid, "pmd_size": pc.pmd_size,
                "source": pc.source,
                "totals": pc.totals(args.only_eligible),
                "vmas": [v.as_dict() for v in _shown_vmas(pc, args)],
            } for pc in found],
        })
    else:
        for pc in found:
            row = agent_rows.get(pc.pid)
            _print_process(pc, args, None if row is None else agent_line(row))
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
    p.add_argument("--count", type=_count, default=0, metavar="N", help="stop after N samples (default 0: no limit)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample, one per line")
    p.set_defaults(func=_cmd_watch)


def _cmd_watch(args) -> int:
    from . import _procmap  # noqa: PLC0415

    before: Optional[set] = None
    samples = 0
    try:
        while True:
            try:
                pc = _procmap.scan_process(args.pid)
            except _procmap.ProcessGone as exc:
                if samples == 0:
                    raise AccessError(str(exc)) from None
                if args.json:
                    _emit_json({"command": "watch", "event": "exit", "pid": args.pid, "samples": samples,
                                "timestamp_seconds": time.time()})
                else:
                    print(f"PID {args.pid} exited")
                return EXIT_OK
            except PermissionError as exc:
                raise AccessError(exc.strerror) from None
            t = pc.totals(only_eligible=True)
            now = pc.split_addresses()
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
                ratio = t["huge_bytes"] / t["eligible_bytes"] if t["eligible_bytes"] else 0.0
                split = "?" if t["split_blocks"] is None else t["split_blocks"]
                events = "".join([f"  +{len(new)} split ({', '.join(hex(b) for b in new[:3])})" if new else "",
                                  f"  {len(repaired)} repaired" if repaired else ""])
                pool = f"  [{pc.pool_note(t)}]" if t["copy_pool_bytes"] else ""
                print(f"{time.strftime('%H:%M:%S')}  PMD-mapped {fmt_bytes(t['huge_bytes'])} of "
                      f"{fmt_bytes(t['eligible_bytes'])} eligible ({ratio:.0%})  split {split}{events}{pool}",
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


def _cmd_guard(args) -> int:
    from ._cliguard import cmd_guard  # noqa: PLC0415

    return cmd_guard(args)


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
    from ._cliagent import add_agent  # noqa: PLC0415 - the node agent's flags and command
    add_agent(sub)
    return p


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a program with the guard configured (THPGUARD_* variables)",
                       description="Execute COMMAND with THPGUARD_GUARD=1 (and the other settings) in "
                                   "its environment, checked first. Only programs that import "
                                   "thpguard are affected.",
                       epilog="exit status: COMMAND's own once it runs (it replaces thpguard, same PID); "
                              "2 a bad setting; 126 COMMAND not executable; 127 COMMAND not found on PATH.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--no-guard", action="store_true", help="set THPGUARD_GUARD=0 instead of 1")
    p.add_argument("--interval", type=float, metavar="S", help="guard interval in seconds (default 0.05)")
    p.add_argument("--fork-policy", metavar="POLICY", help="default fork policy for alloc() (default share)")
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
    except OSError as exc:
        what = exc.strerror or str(exc)
        if exc.filename and str(exc.filename) not in what:
            what = f"{exc.filename}: {what}"
        _err(what)
        # As shells do: 127 not found, 126 found but not runnable (no x bit, not a program).
        return 127 if isinstance(exc, FileNotFoundError) else 126
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
    except ImportError:
        try:
            from . import _native  # noqa: F401,PLC0415 - the usual cause
        except ImportError as exc:
            _err(f"{args.command}: the native module is not built ({exc}); reinstall thpguard")
            return EXIT_UNSUPPORTED
        raise
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
