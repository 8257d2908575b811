"""thpguard's exceptions, and the one place that turns errno into them.

Every exception the library raises on purpose derives from
:class:`ThpguardError`. Bad arguments also derive from :class:`ValueError`
or :class:`TypeError`, and failed system calls from :class:`OSError`, so
callers that already catch those keep working.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Optional, Tuple

__all__ = [
    "ThpguardError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "RegionClosedError",
    "HugePagesUnavailableError",
    "UnsupportedError",
    "KernelCallError",
]


class ThpguardError(Exception):
    """Base class of every error thpguard raises on purpose."""


class InvalidArgumentError(ThpguardError, ValueError):
    """An argument has the right type but a value thpguard cannot use."""


class InvalidTypeError(ThpguardError, TypeError):
    """An argument has the wrong type."""


class RegionClosedError(ThpguardError, ValueError):
    """The region is closed, or not mapped in this process.

    ``region`` is the :class:`~thpguard.Region` concerned.
    """

    def __init__(self, message: str, region: object = None) -> None:
        super().__init__(message)
        self.region = region

    def __reduce__(self):
        # The region stays behind: its mapping belongs to this process.
        return type(self), (str(self),)


class HugePagesUnavailableError(ThpguardError):
    """Huge pages cannot be had for a region that asked for them strictly.

    ``reason`` says why in words; ``setting`` names the file or switch
    responsible (for example ``/sys/kernel/mm/transparent_hugepage/enabled``
    or ``prctl(PR_SET_THP_DISABLE)``) or is None.
    """

    def __init__(self, reason: str, setting: Optional[str] = None) -> None:
        message = reason if setting is None else f"{reason} ({setting})"
        super().__init__(message)
        self.reason = reason
        self.setting = setting

    def __reduce__(self):
        return type(self), (self.reason, self.setting)


class UnsupportedError(ThpguardError):
    """The running kernel lacks a feature the call needs.

    ``feature`` names it (for example ``"MADV_COLLAPSE"``).
    """

    def __init__(self, feature: str, message: str) -> None:
        super().__init__(message)
        self.feature = feature

    def __reduce__(self):
        return type(self), (self.feature, str(self))


class KernelCallError(ThpguardError, OSError):
    """A system call failed.

    ``errno`` and ``strerror`` are those of :class:`OSError`; ``operation``
    names the call (``"madvise(MADV_COLLAPSE)"``), ``range`` is the
    ``(start, length)`` in bytes it applied to, or None.
    """

    def __init__(
        self,
        err: int,
        operation: str,
        range: Optional[Tuple[int, int]] = None,
        hint: str = "",
    ) -> None:
        strerror = os.strerror(err)
        where = ""
        if range is not None:
            where = f" on {range[0]:#x}+{range[1]:#x}"
        message = f"{operation}{where} failed: {strerror} ({_errno.errorcode.get(err, err)})"
        if hint:
            message += f"; {hint}"
        OSError.__init__(self, err, message)
        self.operation = operation
        self.range = range
        self.hint = hint

    def __reduce__(self):
        return type(self), (self.errno, self.operation, self.range, self.hint)

    def __str__(self) -> str:
        return self.strerror


# What to tell a caller for errno values with a well-known cause.
_HINTS = {
    _errno.EPERM: "this needs more privilege (root, or CAP_SYS_NICE and ptrace access for another process)",
    _errno.EACCES: "permission denied; run as the process owner or root",
    _errno.ESRCH: "no such process; it may have exited",
    _errno.ENOSYS: "the running kernel does not have this system call",
    _errno.ENOTTY: "the running kernel does not have this ioctl",
}


def kernel_error(
    err: int, operation: str, range: Optional[Tuple[int, int]] = None
) -> KernelCallError:
    """Build the exception for a system call that failed with ``err``."""
    return KernelCallError(err, operation, range, _HINTS.get(err, ""))
