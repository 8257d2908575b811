"""The node agent's settings: one schema for the config file and the flags.

The file is TOML (``tomllib``, Python 3.11+): operators edit it by hand and
TOML keeps comments, takes sizes as ``"256M"`` strings and is parsed by the
standard library, so the agent needs no extra dependency. On Python 3.9 and
3.10 the agent reads TOML with ``tomli`` when it is installed, and a file
whose name ends in ``.json`` (the same keys as JSON) everywhere.

Every key is optional; unknown keys are errors (a typo must not silently
leave the default in place). See ``docs/agent.rst`` for the schema.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
from typing import Any, Dict, List, Optional, Tuple

from .errors import InvalidArgumentError

DEFAULT_METRICS_PORT = 9464


class ConfigError(InvalidArgumentError):
    """The config file or a flag holds a value the agent cannot use."""


@dataclasses.dataclass
class Selection:
    """Which processes the agent looks at. Empty lists mean "any"; a
    process must match every non-empty list (PIDs, command patterns,
    cgroup prefixes) and no exclude pattern."""

    pids: List[int] = dataclasses.field(default_factory=list)
    commands: List[str] = dataclasses.field(default_factory=list)
    cgroups: List[str] = dataclasses.field(default_factory=list)
    exclude_commands: List[str] = dataclasses.field(default_factory=list)

    def everything(self) -> bool:
        return not (self.pids or self.commands or self.cgroups)


@dataclasses.dataclass
class AgentConfig:
    """Every setting of the node agent. Sizes in bytes, times in seconds."""

    interval: float = 2.0
    rate: int = 256 << 20
    cpu: float = 0.25
    stall_share: float = 0.2
    min_process_bytes: int = 64 << 20
    min_vma_bytes: int = 4 << 20
    repair_shared: bool = False
    advised_only: bool = False
    log_format: str = "text"
    state_file: Optional[str] = None
    select: Selection = dataclasses.field(default_factory=Selection)
    metrics_address: str = "127.0.0.1"
    metrics_port: Optional[int] = None
    metrics_per_pid: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", re.I)


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or a string such as ``"256M"`` or ``"1G"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size (bytes, or a string like \"256M\"), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: expected a size of 0 bytes or more, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m:
            return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]
    raise ConfigError(f"{key}: expected a size (bytes, or a string like \"256M\"), got {value!r}")


def _number(value: Any, key: str, low: float, high: Optional[float] = None, *, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    bad = value <= low if open_low else value < low
    if bad or (high is not None and value > high):
        rng = f"more than {low}" if open_low else f"at least {low}"
        if high is not None:
            rng += f" and at most {high}"
        raise ConfigError(f"{key}: expected a number {rng}, got {value!r}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _strings(value: Any, key: str) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a list of non-empty strings, got {value!r}")
    return list(value)


def _pids(value: Any, key: str) -> List[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in value):
        raise ConfigError(f"{key}: expected a list of process ids (positive integers), got {value!r}")
    return list(value)


def _cgroup(path: str) -> str:
    # Compared against /proc/PID/cgroup paths, which start with "/".
    return "/" + path.strip("/")


def split_address(text: str) -> Tuple[str, int]:
    """``"ADDR:PORT"`` or ``"PORT"`` -> (address, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"metrics: expected PORT or ADDRESS:PORT (port 0-65535), got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


_TOP = {"interval", "rate", "cpu", "stall_share", "min_process_bytes", "min_vma_bytes",
        "repair_shared", "advised_only", "log_format", "state_file", "select", "metrics"}
_SELECT = {"pids", "commands", "cgroups", "exclude_commands"}
_METRICS = {"address", "port", "per_pid"}


def _unknown(table: Dict[str, Any], known: set, where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; known keys: {', '.join(sorted(known))}")


def from_mapping(data: Dict[str, Any], base: Optional[AgentConfig] = None) -> AgentConfig:
    """Validate a parsed config file (a dict) into an :class:`AgentConfig`."""
    if not isinstance(data, dict):
        raise ConfigError("the config file must hold a table (TOML) or an object (JSON) at the top")
    _unknown(data, _TOP, "config")
    cfg = dataclasses.replace(base or AgentConfig())
    cfg.select = dataclasses.replace(cfg.select)
    if "interval" in data:
        cfg.interval = _number(data["interval"], "interval", 0.0, 365 * 86400.0)
    if "rate" in data:
        cfg.rate = parse_size(data["rate"], "rate")
        if cfg.rate <= 0:
            raise ConfigError("rate: expected more than 0 bytes per second")
    if "cpu" in data:
        cfg.cpu = _number(data["cpu"], "cpu", 0.0, 1.0)
    if "stall_share" in data:
        cfg.stall_share = _number(data["stall_share"], "stall_share", 0.0, 1.0)
    for key in ("min_process_bytes", "min_vma_bytes"):
        if key in data:
            setattr(cfg, key, parse_size(data[key], key))
    for key in ("repair_shared", "advised_only"):
        if key in data:
            setattr(cfg, key, _bool(data[key], key))
    if "log_format" in data:
        if data["log_format"] not in ("text", "json"):
            raise ConfigError(f"log_format: expected \"text\" or \"json\", got {data['log_format']!r}")
        cfg.log_format = data["log_format"]
    if "state_file" in data:
        if not isinstance(data["state_file"], str):
            raise ConfigError(f"state_file: expected a path, got {data['state_file']!r}")
        cfg.state_file = data["state_file"] or None
    sel = data.get("select", {})
    if not isinstance(sel, dict):
        raise ConfigError("select: expected a table")
    _unknown(sel, _SELECT, "[select]")
    if "pids" in sel:
        cfg.select.pids = _pids(sel["pids"], "select.pids")
    if "commands" in sel:
        cfg.select.commands = _strings(sel["commands"], "select.commands")
    if "cgroups" in sel:
        cfg.select.cgroups = [_cgroup(c) for c in _strings(sel["cgroups"], "select.cgroups")]
    if "exclude_commands" in sel:
        cfg.select.exclude_commands = _strings(sel["exclude_commands"], "select.exclude_commands")
    met = data.get("metrics", {})
    if not isinstance(met, dict):
        raise ConfigError("metrics: expected a table")
    _unknown(met, _METRICS, "[metrics]")
    if "address" in met:
        if not isinstance(met["address"], str) or not met["address"]:
            raise ConfigError(f"metrics.address: expected an address, got {met['address']!r}")
        cfg.metrics_address = met["address"]
    if "port" in met:
        port = met["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"metrics.port: expected a port 0-65535, got {port!r}")
        cfg.metrics_port = port
    if "per_pid" in met:
        cfg.metrics_per_pid = _bool(met["per_pid"], "metrics.per_pid")
    return cfg


def _parse_toml(text: str, path: str) -> Dict[str, Any]:
    try:
        import tomllib as toml  # noqa: PLC0415 - Python 3.11+
    except ImportError:
        try:
            import tomli as toml  # type: ignore[no-redef]  # noqa: PLC0415
        except ImportError:
            raise ConfigError(f"{path}: reading TOML needs Python 3.11 or the tomli package; "
                              "install tomli, or write the same keys as JSON in a .json file") from None
    try:
        return toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


#: A config file is a few hundred bytes; /dev/zero or a huge file is an error, not a read forever.
MAX_CONFIG_BYTES = 1 << 20


def load(path: str, base: Optional[AgentConfig] = None) -> AgentConfig:
    """Read and validate the config file at *path* (TOML, or JSON if it ends
    in ``.json``). Raises :class:`ConfigError` saying what is wrong."""
    try:
        # O_NONBLOCK: a FIFO would otherwise block the agent (and a SIGHUP
        # reload) until something writes to it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"the config file {path} is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"the config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    else:
        data = _parse_toml(text, path)
    try:
        return from_mapping(data, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
