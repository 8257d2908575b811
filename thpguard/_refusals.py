"""Why ``MADV_COLLAPSE`` refuses a block: the causes the repair engine
names when a block answers EINVAL (or ENOMEM for a hole, EBUSY in a
userfaultfd-registered mapping), read from the target's mappings
(``/proc/PID/smaps``) and THP switch, never guessed.

The engine (:mod:`thpguard.repair`) scopes each decision to a block and a
time; this module only finds the cause and words it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from . import kernel


def _vmas(target, block: int, pmd: int) -> List[kernel.Vma]:
    return [v for v in target.mappings() if v.start < block + pmd and v.end > block]


def diagnose(target, block: int, pmd: int, address: int, size: int) -> Tuple[bool, str]:
    """Why MADV_COLLAPSE answers EINVAL (or ENOMEM, for a hole) on
    ``block`` of the region ``[address, address + size)``: (whole range?,
    reason)."""
    if target.thp_disabled():
        return True, ("THP is disabled for this process by prctl(PR_SET_THP_DISABLE); "
                      "clear it, or set it with PR_THP_DISABLE_EXCEPT_ADVISED (Linux 6.18)")
    try:
        vmas = _vmas(target, block, pmd)
        gap = kernel.first_gap([(v.start, v.end) for v in vmas], block, block + pmd)
    except OSError:
        vmas, gap = [], None
    if gap is not None:
        return False, (f"block {block:#x} has a hole at {gap[0]:#x}-{gap[1]:#x}: that part was "
                       "unmapped by code outside thpguard, and a huge page cannot span a hole")
    if len(vmas) > 1:
        parts = ", ".join(
            f"{v.start:#x}-{v.end:#x} {v.perms}{' mlocked' if 'lo' in v.vm_flags else ''}"
            for v in vmas)
        return False, (f"block {block:#x} spans {len(vmas)} mappings ({parts}): part of it was "
                       "mprotect()ed or mlock()ed, and a huge page cannot cross mappings; undo "
                       "that to have it repaired")
    if len(vmas) == 1 and "nh" in vmas[0].vm_flags:
        whole = vmas[0].start <= address and vmas[0].end >= address + size
        what = "the region" if whole else f"block {block:#x}"
        return whole, (f"{what} is marked MADV_NOHUGEPAGE; madvise(MADV_HUGEPAGE) "
                       "it again, then use it in hot() to resume repairs")
    busy = _userfault(block, vmas)
    if busy is not None:
        return False, busy
    return False, (f"MADV_COLLAPSE answers EINVAL for block {block:#x} "
                   "(no known cause: THP not allowed there)")


def userfault_reason(target, block: int, pmd: int) -> Optional[str]:
    """Why a block of a mapping registered with userfaultfd refuses
    MADV_COLLAPSE (EBUSY on Linux 6.18; EINVAL for a page still marked
    write-protected), or None if its mapping is not registered."""
    possible = getattr(target, "userfault_possible", None)
    if possible is not None and not possible():
        return None
    try:
        return _userfault(block, _vmas(target, block, pmd))
    except OSError:
        return None


def _userfault(block: int, vmas: List[kernel.Vma]) -> Optional[str]:
    if len(vmas) != 1 or not {"um", "uw"} & set(vmas[0].vm_flags):
        return None
    # mm/khugepaged.c: in a mapping registered with userfaultfd an empty or
    # zero-page entry refuses the collapse.
    return (f"block {block:#x} is in a mapping registered with userfaultfd (a fork='copy' "
            "region with copy_mode 'userfault', or another user of userfaultfd), and "
            "MADV_COLLAPSE refuses such a block while any of its pages is empty or the "
            "shared zero page (read, never written): writing those pages lets it collapse")
