"""The node agent's operations side: structured log lines, budgets, counts."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from typing import Dict

class AgentLog:
    """Structured log lines: ``text`` (``time level event key=value ...``)
    or ``json`` (one object per line, sorted keys)."""

    def __init__(self, fmt: str = "text", stream=None) -> None:
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()

    def __call__(self, event: str, level: str = "info", **fields) -> None:
        now = time.time()
        if self.fmt == "json":
            line = json.dumps(dict(fields, event=event, level=level, time=round(now, 3)), sort_keys=True)
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
            parts = " ".join(f"{k}={_text(v)}" for k, v in sorted(fields.items()))
            line = f"{stamp} {level} {event} {parts}".rstrip()
        with self.lock:
            try:
                print(line, file=self.stream, flush=True)
            except (OSError, ValueError):
                pass


def _text(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class TokenBucket:
    """At most *rate* units per second, bursts of one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.tokens = self.rate
        self.last = time.monotonic()

    def delay(self, amount: float) -> float:
        """Seconds to wait before *amount* may be spent (0: take it now)."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        need = min(amount, self.rate)
        if self.tokens >= need:
            self.tokens -= amount
            return 0.0
        return (need - self.tokens) / self.rate


class CpuBudget:
    """The agent's own CPU time (user + system, so collapse copies count)
    stays under *share* of wall time, over windows of a few seconds."""

    WINDOW = 5.0

    def __init__(self, share: float) -> None:
        self.share = share
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.wall0, self.cpu0 = now, time.process_time()

    def delay(self) -> float:
        now = time.monotonic()
        used = time.process_time() - self.cpu0
        allowed_wall = used / self.share
        wait = allowed_wall - (now - self.wall0)
        if wait <= 0 and now - self.wall0 > self.WINDOW:
            self._reset(now)  # idle time is not saved up for later bursts
        return max(0.0, wait)


@dataclasses.dataclass
class Counts:
    """Repairs, shared blocks seen and refusals (errno name -> calls)."""

    repaired_blocks: int = 0
    repaired_bytes: int = 0
    shared_skipped: int = 0
    failures: Dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, other: "Counts") -> None:
        self.repaired_blocks += other.repaired_blocks
        self.repaired_bytes += other.repaired_bytes
        self.shared_skipped += other.shared_skipped
        for k, v in other.failures.items():
            self.failures[k] = self.failures.get(k, 0) + v
