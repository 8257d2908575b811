"""``thpguard agent``: the node agent's command line, and its rows in
``thpguard status`` (see :mod:`thpguard.agent`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import Optional

from . import _checks, kernel
from ._checks import fmt_bytes
from ._cliverify import _unsupported_reason
from .cli import (EXIT_CODES_HELP, EXIT_INTERRUPTED, EXIT_OK, SCHEMA_VERSION, AccessError,
                  UnsupportedHostError, UsageError, _emit_json, _err, _HelpFormatter, _pid,
                  _positive_float, _size)
from .errors import ThpguardError


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction above 0 and at most 1, got {text!r}")
    return value


def add_agent(sub) -> None:
    p = sub.add_parser(
        "agent", epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter,
        help="node agent: keep huge pages in any process (process_madvise), within budgets",
        description="Scan the selected processes of this host (default: all) and collapse PMD-size "
                    "blocks of private anonymous memory that sit on small pages, with "
                    "process_madvise(MADV_COLLAPSE). Never touches MADV_NOHUGEPAGE VMAs, "
                    "prctl THP-disabled processes, small memory, or (unless --repair-shared) blocks "
                    "still shared with another process. Needs CAP_SYS_NICE, CAP_SYS_PTRACE and "
                    "CAP_DAC_READ_SEARCH (or root). SIGHUP rereads --config, SIGTERM stops with a "
                    "summary. Flags override the config file.")
    p.add_argument("--config", metavar="PATH", help="TOML config file (JSON if it ends in .json)")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration, print it as JSON and exit (0 valid, 2 invalid)")
    p.add_argument("--pid", type=_pid, action="append", metavar="PID",
                   help="only this process (repeatable)")
    p.add_argument("--command", action="append", metavar="PATTERN",
                   help="only processes whose command name (comm) matches this glob (repeatable)")
    p.add_argument("--cgroup", action="append", metavar="PATH",
                   help="only processes in this cgroup or below, e.g. /system.slice/redis.service")
    p.add_argument("--exclude-command", action="append", metavar="PATTERN",
                   help="never processes whose command name matches this glob (repeatable)")
    p.add_argument("--interval", type=_positive_float, metavar="S", help="seconds between passes (2)")
    p.add_argument("--rate", type=_size, metavar="BYTES", help="bytes collapsed per second, whole agent (256M)")
    p.add_argument("--cpu", type=_fraction, metavar="FRACTION", help="share of one CPU the agent may use (0.25)")
    p.add_argument("--stall-share", type=_fraction, metavar="FRACTION",
                   help="share of each second spent collapsing in any one process (0.2)")
    p.add_argument("--min-process-bytes", type=_size, metavar="BYTES",
                   help="skip processes with less anonymous memory (64M)")
    p.add_argument("--min-vma-bytes", type=_size, metavar="BYTES", help="skip smaller VMAs (4M)")
    p.add_argument("--repair-shared", action="store_true", default=None,
                   help="also collapse blocks still shared with another process (costs memory)")
    p.add_argument("--advised-only", action="store_true", default=None,
                   help="only MADV_HUGEPAGE VMAs (VmFlags hg), as khugepaged in madvise mode")
    p.add_argument("--metrics", metavar="[ADDR:]PORT",
                   help="serve Prometheus metrics on this port (needs prometheus_client)")
    p.add_argument("--metrics-per-pid", action="store_true", default=None,
                   help="add a pid label to the metrics (series churn as processes come and go)")
    p.add_argument("--log-format", choices=("text", "json"), help="log lines on stderr (text)")
    p.add_argument("--state-file", metavar="PATH", help="write per-process detail here after each pass")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--once", action="store_true", help="one pass, then exit")
    run.add_argument("--duration", type=_positive_float, metavar="S", help="stop after S seconds")
    p.set_defaults(func=cmd_agent)


def _agent_config(args):
    from . import _agentconfig as ac  # noqa: PLC0415

    cfg = ac.load(args.config) if args.config else ac.AgentConfig()
    for flag, field in (("interval", "interval"), ("rate", "rate"), ("cpu", "cpu"),
                        ("stall_share", "stall_share"), ("min_process_bytes", "min_process_bytes"),
                        ("min_vma_bytes", "min_vma_bytes"), ("repair_shared", "repair_shared"),
                        ("advised_only", "advised_only"), ("log_format", "log_format"),
                        ("state_file", "state_file"), ("metrics_per_pid", "metrics_per_pid")):
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, field, value)
    if cfg.rate <= 0:
        raise ac.ConfigError(f"--rate must be more than 0 bytes per second, got {cfg.rate}")
    if args.metrics:
        cfg.metrics_address, cfg.metrics_port = ac.split_address(args.metrics)
    sel = cfg.select
    sel.pids = args.pid or sel.pids
    sel.commands = args.command or sel.commands
    sel.cgroups = ["/" + c.strip("/") for c in args.cgroup or ()] or sel.cgroups
    sel.exclude_commands = sel.exclude_commands + (args.exclude_command or [])
    return cfg


def _agent_preflight(caps) -> None:
    from . import _native  # noqa: PLC0415

    for name in ("pagemap_scan", "process_madvise"):
        feature = caps.features[name]
        if not feature.available:
            raise UnsupportedHostError(f"the agent needs {name}: {feature.reason}")
    # The collapse probe runs in this process: ENOMEM (no free huge page just
    # now) or our own prctl says nothing about collapsing in other processes.
    # Only a kernel without MADV_COLLAPSE (before 6.1) is unsupported.
    if not caps.collapse.available and not _native.advice_known(_native.MADV_COLLAPSE):
        raise UnsupportedHostError(f"the agent needs MADV_COLLAPSE: {caps.collapse.reason}")
    if _checks.has_capability(_checks.CAP_SYS_NICE) is False:
        raise AccessError("the agent needs CAP_SYS_NICE for process_madvise(MADV_COLLAPSE) on other "
                         "processes, and this process lacks it: run it as root, or with the capability "
                         "(systemd: AmbientCapabilities=CAP_SYS_NICE CAP_SYS_PTRACE CAP_DAC_READ_SEARCH)")


def _write_state(agent, path: str) -> None:
    from . import metrics  # noqa: PLC0415 - its atomic writer

    state = {"pid": os.getpid(), "processes": agent.processes(), "schema_version": SCHEMA_VERSION,
             "summary": agent.summary(), "time": time.time()}
    try:
        metrics.write_textfile(path, json.dumps(state, sort_keys=True) + "\n")
    except (OSError, ThpguardError) as exc:
        agent._once(None, "state_file", "warning", path=path, reason=str(exc))


def cmd_agent(args) -> int:
    from . import _agentconfig, agent as agent_mod  # noqa: PLC0415

    try:
        cfg = _agent_config(args)
    except _agentconfig.ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.check:
        _emit_json({"command": "agent", "config": cfg.as_dict(), "valid": True})
        return EXIT_OK
    roots = kernel.Roots.from_env()
    unsupported = _unsupported_reason(roots)
    if unsupported:
        raise UnsupportedHostError(unsupported)
    caps = kernel.capabilities(roots=roots)
    _agent_preflight(caps)
    log = agent_mod.AgentLog(cfg.log_format)
    agent = agent_mod.Agent(cfg, log, roots)
    if cfg.state_file:
        agent.on_pass.append(lambda a: _write_state(a, a.config.state_file) if a.config.state_file else None)
    server = None
    if cfg.metrics_port is not None:
        from . import _agentmetrics  # noqa: PLC0415
        from .errors import UnsupportedError  # noqa: PLC0415

        try:
            server = _agentmetrics.MetricsServer(agent, cfg.metrics_address, cfg.metrics_port)
        except UnsupportedError as exc:
            raise UnsupportedHostError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {cfg.metrics_address}:{cfg.metrics_port}: "
                             f"{exc.strerror or exc}") from None
    missing = [name for name, bit in (("CAP_SYS_PTRACE", _checks.CAP_SYS_PTRACE),
                                      ("CAP_DAC_READ_SEARCH", _checks.CAP_DAC_READ_SEARCH))
               if _checks.has_capability(bit) is False]
    if missing:
        log("capabilities", "warning", missing=",".join(missing),
            reason="only processes of the agent's own user that are dumpable can be read; others "
                   "are logged once each and left alone")
    start = {"pid": os.getpid(), "kernel": caps.kernel_release, "pmd_size": agent.pmd,
             "metrics": f"{server.address}:{server.port}" if server else "off",
             "config": agent_mod._config_fields(cfg)}
    try:
        if args.once:
            log("start", **start)
            agent.run_pass()
            for t in list(agent.tracked.values()):
                t.close()
            log("stop", **agent.summary())
        else:
            reload = (lambda: _agent_config(args)) if args.config else None
            agent.run(duration=args.duration, reload=reload, start_fields=start)
    finally:
        if server is not None:
            server.close()
    # SIGTERM is the service manager's clean stop; Ctrl-C reads as interrupted.
    return EXIT_INTERRUPTED if agent.stop_signal == signal.SIGINT else EXIT_OK


# -- thpguard status --------------------------------------------------


AGENT_STATE = "/run/thpguard/agent.json"


def agent_state(path: Optional[str]) -> dict:
    """The node agent's per-process rows by PID, or {} (no agent, unreadable)."""
    if not path:
        return {}
    try:
        with open(path) as f:
            state = json.load(f)
        rows = {row["pid"]: row for row in state.get("processes", [])}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        _err(f"ignoring the agent state file {path}: {exc}")
        return {}
    from . import _agentscan  # noqa: PLC0415

    out = {}
    for pid, row in rows.items():
        try:  # a row about an earlier process with this PID is not about this one
            if _agentscan.start_time(pid, kernel.Roots.from_env()) == row.get("start_time"):
                out[pid] = row
        except (_agentscan.ProcessGone, OSError, ValueError):
            pass
    return out


def agent_line(row: dict) -> str:
    failures = ", ".join(f"{k} {v}" for k, v in sorted(row.get("failures", {}).items())) or "none"
    shared = row.get("shared_blocks")
    return (f"  agent: repaired {fmt_bytes(row.get('repaired_bytes', 0))}, "
            f"{'?' if shared is None else shared} shared block(s) left for the sharer, "
            f"refused: {failures}")
