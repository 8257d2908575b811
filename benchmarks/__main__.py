"""``python -m benchmarks``: run the benchmarks, print one table each.

Exit status: 0 when every selected benchmark ran (or was skipped for a
stated reason), 1 when one failed, 2 for bad arguments, 128 + the signal's
number when SIGINT, SIGTERM or SIGHUP stopped the run. A stopped run gives
back the hugetlb pool pages it added, as every run does, and still writes
the JSON of the benchmarks that finished, with ``"interrupted"`` naming the
signal and the benchmark it stopped (None: it came between two).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import signal
import sys
import traceback

from . import BENCHMARKS, DEFAULT
from . import _harness, _signals
from ._harness import Result, Settings, Skipped, fmt_bytes, format_table, host_info, now

SCHEMA = 1


def _parse(argv):
    names = [b.NAME for b in BENCHMARKS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="thpguard benchmarks: every figure a ratio against a baseline measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (about 2 minutes)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"run only these: {', '.join(names)}")
    parser.add_argument("--json", metavar="PATH", help="write every raw sample, the host and the versions here (gzip-compressed if PATH ends in .gz)")
    parser.add_argument("--plot", metavar="PATH", help="write the PNG plot here (needs matplotlib)")
    parser.add_argument(
        "--max-gib", type=float, metavar="N", help="leave out region sizes above N GiB (shared hosts)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    selected = list(DEFAULT)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        selected = [b for b in BENCHMARKS if b.NAME in wanted]
    return args, selected


def main(argv=None) -> int:
    args, selected = _parse(argv)
    if args.list:
        for bench in BENCHMARKS:
            extra = "" if bench in DEFAULT else " (only with --only)"
            print(f"{bench.NAME:10} {bench.TITLE}{extra}")
        return 0
    settings = Settings.make(args.quick)
    if args.max_gib is not None:
        if args.max_gib <= 0:
            print("--max-gib must be > 0", file=sys.stderr)
            return 2
        settings.max_bytes = int(args.max_gib * (1 << 30))
    started = now()
    host = host_info()
    when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    mode = "quick (smaller sizes, fewer repetitions)" if settings.quick else "full"
    print(
        f"thpguard {host['thpguard']} benchmarks, {mode}; {when.isoformat()}\n"
        f"host {host['hostname']}: Linux {host['kernel']}, {host['cpu']} x{host['cpus']}, "
        f"{fmt_bytes(host['mem_total_bytes'] or 0)}, THP enabled={_choice(host['thp']['enabled'])} "
        f"defrag={_choice(host['thp']['defrag'])}, load {host['loadavg']}"
    )
    print(
        f"ratios: medians of {settings.reps} interleaved repetitions after {settings.warmup} warm-up round(s)"
        " (where a benchmark's line says rounds=N: N rounds and its own warm-up; service, snapshot and"
        " pool discard no round, each run warms its own service; the JSON's settings.per_benchmark"
        " says what each ran)",
        flush=True,
    )
    print(flush=True)
    results = []
    failed = False
    interrupted = None
    rounds = {}
    previous = _signals.stop_on_signals()
    try:
        for bench in selected:
            t0 = now()
            _harness.ROUNDS_RUN.clear()
            try:
                result = bench.run(settings)
            except Skipped as exc:
                result = Result(bench.NAME, bench.TITLE, skipped=str(exc))
            except Exception:
                failed = True
                result = Result(bench.NAME, bench.TITLE, skipped="FAILED:\n" + traceback.format_exc())
            except KeyboardInterrupt as exc:
                # Every with-block below has given back what it took (pool pages, lock).
                signame = _signame(exc)
                interrupted = {"signal": signame, "benchmark": bench.NAME}
                result = Result(bench.NAME, bench.TITLE, skipped=f"interrupted by {signame}: no results")
            result.seconds = now() - t0
            if settings.quick:
                result.title += " [quick: smaller sizes, fewer repetitions]"
            results.append(result)
            rounds[bench.NAME] = _rounds_run(result, settings)
            print(format_table(result) + "\n", flush=True)
            if interrupted:
                break
    except KeyboardInterrupt as exc:
        # Between two benchmarks (printing a table): every result so far is whole.
        interrupted = {"signal": _signame(exc), "benchmark": None}
    finally:
        # A second signal while the JSON is written ends the process as usual.
        _signals.restore(previous)
    total = now() - started
    print(f"total {total:.0f} s; load at the end {_loadavg()}")
    document = {
        "schema": SCHEMA,
        "date": when.isoformat(),
        "quick": settings.quick,
        # The defaults, and what each benchmark really ran (service, snapshot
        # and pool run their own rounds without a discarded one, for example).
        "settings": {"reps": settings.reps, "warmup": settings.warmup, "per_benchmark": rounds},
        "host": host,
        "thpguard": host["thpguard"],
        "versions": _versions(),
        "loadavg_end": _loadavg(),
        "total_seconds": total,
        "interrupted": interrupted,
        "results": [r.as_dict() for r in results],
    }
    if args.json:
        # A full snapshot run keeps millions of batch latencies: .gz keeps them small.
        opener = gzip.open if args.json.endswith(".gz") else open
        with opener(args.json, "wt") as f:
            json.dump(document, f, indent=1, sort_keys=True)
        print(f"raw samples written to {args.json}")
    if args.plot:
        try:
            from . import plot

            plot.plot(document, args.plot)
            print(f"plot written to {args.plot}")
        except ImportError as exc:
            print(f"no plot: {exc} (pip install '.[bench]')", file=sys.stderr)
    if interrupted:
        during = f"during {interrupted['benchmark']}" if interrupted["benchmark"] else "between benchmarks"
        print(f"interrupted by {interrupted['signal']} {during}; the benchmarks before it finished",
              file=sys.stderr)
        return 128 + getattr(signal, interrupted["signal"])
    return 1 if failed else 0


def _signame(exc: KeyboardInterrupt) -> str:
    return exc.name if isinstance(exc, _signals.Interrupted) else "SIGINT"


def _rounds_run(result, settings) -> dict:
    """The rounds ``result``'s benchmark ran: its interleave() calls' reps
    and warm-up rounds (``"measured"``), or, for those that loop on their
    own, its ``rounds`` parameter or the defaults (``"declared"``)."""
    runs = sorted(set(_harness.ROUNDS_RUN))
    if len(runs) == 1:
        return {"reps": runs[0][0], "warmup": runs[0][1], "source": "measured"}
    if runs:
        return {"reps": [r for r, _ in runs], "warmup": [w for _, w in runs], "source": "measured"}
    return {"reps": result.params.get("rounds", settings.reps), "warmup": settings.warmup, "source": "declared"}


def _choice(text):
    if not text:
        return "?"
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return text


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _versions() -> dict:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("numpy", "cffi", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
