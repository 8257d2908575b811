"""The memory cgroup of a process (v1 and v2), from ``/proc/PID/cgroup``."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import List, Optional, Tuple

from ._files import Roots, _int, _pid_dir, _read, _roots

# v1 reports "no limit" as PAGE_COUNTER_MAX pages, rounded: anything this big.
_UNLIMITED = 1 << 60


@dataclasses.dataclass
class MemoryCgroup:
    """The memory cgroup of a process. Sizes in bytes; ``limit_bytes`` is
    None when no limit applies (on this cgroup or any ancestor)."""

    version: int
    path: str
    directory: str
    limit_bytes: Optional[int]
    usage_bytes: Optional[int]
    limit_file: str

    @property
    def available_bytes(self) -> Optional[int]:
        if self.limit_bytes is None or self.usage_bytes is None:
            return None
        return max(0, self.limit_bytes - self.usage_bytes)

    @property
    def room_bytes(self) -> Optional[int]:
        """Bytes the cgroup can still charge before its limit: what is
        available plus its page cache (reclaimable); None without a limit."""
        if self.limit_bytes is None or self.usage_bytes is None:
            return None
        fields = {}
        for line in (_read(os.path.join(self.directory, "memory.stat"), quiet=True) or "").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                fields[parts[0]] = _int(parts[1]) or 0
        # v1 prints the hierarchical totals as total_*; v2 has the plain names.
        cache = sum(fields.get("total_" + name, fields.get(name, 0))
                    for name in ("inactive_file", "active_file"))
        return self.limit_bytes - self.usage_bytes + cache


def _mounts(roots: Roots, pid) -> List[Tuple[str, str, str, List[str]]]:
    """(root, mount point, fstype, super options) of the cgroup mounts."""
    text = _read(os.path.join(_pid_dir(roots, pid), "mountinfo"), quiet=True) or ""
    out = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or not tail[0].startswith("cgroup"):
            continue
        out.append((fields[3], fields[4], tail[0], tail[2].split(",")))
    return out


def _under_sys(roots: Roots, mount_point: str) -> str:
    """Map a real mount point below /sys into the (maybe fake) sys root."""
    if mount_point == "/sys" or mount_point.startswith("/sys/"):
        return os.path.join(roots.sys, mount_point[len("/sys/"):])
    return mount_point


def _paths(text: str) -> Tuple[Optional[str], Optional[str]]:
    """(v1 memory controller's path, v2 path) from ``/proc/PID/cgroup``
    text: ``N:memory[,...]:/path`` lines (v1) and the ``0::/path`` line (v2).
    A hybrid host (systemd's "hybrid" mode) has both."""
    v1_path = v2_path = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2].strip()
        elif "memory" in parts[1].split(","):
            v1_path = parts[2].strip()
    return v1_path, v2_path


def cgroup_path(pid="self", roots: Optional[Roots] = None) -> Optional[str]:
    """The path of the cgroup that governs *pid*'s memory, as
    ``/proc/PID/cgroup`` prints it: the v1 memory controller's where the
    host has one (v1 only, or hybrid, whose v2 tree holds no controllers
    then and usually shows ``/``), else the v2 path; None if unreadable."""
    text = _read(os.path.join(_pid_dir(_roots(roots), pid), "cgroup"), quiet=True)
    if text is None:
        return None
    v1_path, v2_path = _paths(text)
    return v1_path if v1_path is not None else v2_path


def memory_cgroup(pid="self", roots: Optional[Roots] = None) -> Optional[MemoryCgroup]:
    """Memory limit and usage of the cgroup *pid* is in, v1 or v2, or None
    if there is no memory controller for it (or nothing readable)."""
    r = _roots(roots)
    text = _read(os.path.join(_pid_dir(r, pid), "cgroup"), quiet=True)
    if text is None:
        return None
    v1_path, v2_path = _paths(text)
    mounts = _mounts(r, pid)
    if v1_path is not None:
        mount = next((m for m in mounts if m[2] == "cgroup" and "memory" in m[3]), None)
        base, mroot = (_under_sys(r, mount[1]), mount[0]) if mount else (
            os.path.join(r.sys, "fs/cgroup/memory"), "/")
        return _memcg_v1(base, _rel(v1_path, mroot), v1_path)
    if v2_path is not None:
        mount = next((m for m in mounts if m[2] == "cgroup2"), None)
        base, mroot = (_under_sys(r, mount[1]), mount[0]) if mount else (
            os.path.join(r.sys, "fs/cgroup"), "/")
        return _memcg_v2(base, _rel(v2_path, mroot), v2_path)
    return None


def _rel(path: str, mount_root: str) -> str:
    # Inside a cgroup namespace or a bind mount, the mount's root is a prefix
    # of the path /proc/PID/cgroup prints.
    if mount_root not in ("", "/") and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root):]
    return path.strip("/")


def _limit(value: Optional[int]) -> Optional[int]:
    return None if value is None or value >= _UNLIMITED else value


def _memcg_v1(base: str, rel: str, shown: str) -> Optional[MemoryCgroup]:
    directory = os.path.join(base, rel)
    limit_file = os.path.join(directory, "memory.limit_in_bytes")
    limit = _int(_read(limit_file, quiet=True))
    usage = _int(_read(os.path.join(directory, "memory.usage_in_bytes"), quiet=True))
    if limit is None and usage is None:
        return None
    # memory.stat's hierarchical_memory_limit includes the ancestors' limits.
    stat = _read(os.path.join(directory, "memory.stat"), quiet=True) or ""
    m = re.search(r"^hierarchical_memory_limit\s+(\d+)$", stat, re.M)
    effective = _limit(limit)
    hier = _limit(int(m.group(1))) if m else None
    if hier is not None and (effective is None or hier < effective):
        effective = hier
    return MemoryCgroup(1, shown, directory, effective, usage, limit_file)


def _memcg_v2(base: str, rel: str, shown: str) -> Optional[MemoryCgroup]:
    directory = os.path.join(base, rel)
    usage = _int(_read(os.path.join(directory, "memory.current"), quiet=True))
    if usage is None:
        return None  # memory controller not enabled for this cgroup
    limit, limit_file = None, os.path.join(directory, "memory.max")
    parts = rel.split("/") if rel else []
    for i in range(len(parts), -1, -1):
        d = os.path.join(base, *parts[:i])
        value = (_read(os.path.join(d, "memory.max"), quiet=True) or "").strip()
        if value and value != "max":
            v = _int(value)
            if v is not None and (limit is None or v < limit):
                limit, limit_file = v, os.path.join(d, "memory.max")
    return MemoryCgroup(2, shown, directory, limit, usage, limit_file)
