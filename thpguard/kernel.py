"""Minimal kernel readers (placeholder until the full capabilities module)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

SYS_THP = "/sys/kernel/mm/transparent_hugepage"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _bracketed(text: Optional[str]) -> Optional[str]:
    if not text:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text


def pmd_size() -> int:
    text = _read(os.path.join(SYS_THP, "hpage_pmd_size"))
    return int(text) if text else 2 << 20


def thp_cow_mode() -> Optional[str]:
    return _bracketed(_read(os.path.join(SYS_THP, "thp_cow")))


def can_get_huge_pages() -> Tuple[bool, str]:
    if _bracketed(_read(os.path.join(SYS_THP, "enabled"))) == "never":
        return False, "THP is disabled: /sys/kernel/mm/transparent_hugepage/enabled is never"
    status = _read("/proc/self/status") or ""
    for line in status.splitlines():
        if line.startswith("THP_enabled:") and line.split()[1] == "0":
            return False, "THP is disabled for this process by prctl(PR_SET_THP_DISABLE)"
    return True, ""


@dataclass
class Vma:
    start: int
    end: int
    perms: str
    path: str
    fields: Dict[str, int] = field(default_factory=dict)
    thp_eligible: Optional[bool] = None
    vm_flags: List[str] = field(default_factory=list)


def read_smaps(pid="self") -> List[Vma]:
    vmas: List[Vma] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                vmas.append(Vma(start, end, head[1], head[5] if len(head) > 5 else ""))
            elif head[0] == "THPeligible:":
                vmas[-1].thp_eligible = head[1] == "1"
            elif head[0] == "VmFlags:":
                vmas[-1].vm_flags = head[1:]
            elif len(head) == 3 and head[2] == "kB":
                vmas[-1].fields[head[0][:-1]] = int(head[1]) * 1024
    return vmas
