"""Shared pieces of the kernel readers: where /sys and /proc are, and how a
file is read without raising on a kernel that looks different."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from typing import Optional

log = logging.getLogger("thpguard.kernel")

THP_DIR = "kernel/mm/transparent_hugepage"

@dataclasses.dataclass(frozen=True)
class Roots:
    """Where sysfs and procfs are mounted; tests point these at fake trees."""

    sys: str = "/sys"
    proc: str = "/proc"

    @classmethod
    def from_env(cls) -> "Roots":
        """Roots from ``THPGUARD_SYSFS_ROOT`` / ``THPGUARD_PROC_ROOT``, else the real ones."""
        return cls(
            sys=os.environ.get("THPGUARD_SYSFS_ROOT") or "/sys",
            proc=os.environ.get("THPGUARD_PROC_ROOT") or "/proc",
        )

    @property
    def is_real(self) -> bool:
        """True when both roots are the host's own mounts."""
        return self.sys == "/sys" and self.proc == "/proc"


def _roots(roots: Optional[Roots]) -> Roots:
    return roots if roots is not None else Roots.from_env()


# -- low-level readers --------------------------------------------------

_warned: set = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str, *args) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


def _read(path: str, *, quiet: bool = False) -> Optional[str]:
    """Text of *path*, or None (logged once) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        if not quiet:
            _warn_once(path, "%s is missing on this kernel", path)
    except OSError as exc:
        if not quiet:
            _warn_once(path, "cannot read %s: %s", path, exc.strerror or exc)
    except ValueError:
        # A path built from file contents (cgroup, mountinfo) with a NUL.
        if not quiet:
            _warn_once(path, "cannot read %r: the path holds a NUL byte", path)
    return None


def _bracketed(text: Optional[str]) -> Optional[str]:
    """The selected value of a sysfs choice file: ``always [madvise] never``."""
    if text is None:
        return None
    m = re.search(r"\[([^\]\s]+)\]", text)
    if m:
        return m.group(1)
    # A few old kernels and some tunables print just the value.
    words = text.split()
    if len(words) == 1 and re.fullmatch(r"[a-z][a-z0-9_+-]*", words[0]):
        return words[0]
    return None


def _int(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _pid_dir(roots: Roots, pid) -> str:
    return os.path.join(roots.proc, str(pid))


def reset_warnings() -> None:
    """Forget which problems were logged, so each is logged once more (tests)."""
    with _warned_lock:
        _warned.clear()
