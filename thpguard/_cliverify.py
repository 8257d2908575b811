"""``thpguard verify``: host checks, the live self-test, the verdict and ``--fix``."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import List, Optional

from . import _checks, _hugechecks, kernel
from ._checks import FAIL, OK, WARN, Check, HostContext, fmt_bytes
from .cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNSUPPORTED,
    VERDICT_CERTAIN,
    VERDICT_NOT_CERTAIN,
    VERDICT_UNSUPPORTED,
    AccessError,
    UsageError,
    _emit_json,
    _err,
    _version,
)


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


def _apply_fixes(checks: List[Check], quiet: bool, roots: Optional[kernel.Roots] = None) -> List[dict]:
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
        if os.path.basename(path) == "thp_cow":
            # Only the interface thpguard knows: another kernel's thp_cow
            # file may mean something else entirely.
            ident = kernel.direct_cow_interface(roots, refresh=True)
            if not ident.available:
                entry["error"] = f"not the direct-COW interface thpguard knows ({ident.reason}); left unchanged"
                _err(f"--fix: did not write {value!r} to {path}: {entry['error']}")
                applied.append(entry)
                continue
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


def cmd_verify(args) -> int:
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
    bad = _hugechecks.bad_args(caps, args.hugetlb_pool, args.hugetlb_page_size)
    if bad:
        raise UsageError(bad)

    def all_checks():
        return (_checks.host_checks(ctx, headroom=max(64 << 20, 2 * size))
                + _hugechecks.hugetlb_checks(ctx, args.hugetlb_pool, args.hugetlb_page_size))

    checks = all_checks()
    fixes: List[dict] = []
    if args.fix:
        fixes = _apply_fixes(checks, args.quiet or args.json, roots)
        if fixes:
            caps = kernel.capabilities(refresh=True, roots=roots)
            ctx = HostContext(caps, roots, args.pid)
            checks = all_checks()
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


