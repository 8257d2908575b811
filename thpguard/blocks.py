"""The block model: what each PMD-size block of a range holds, and :class:`Coverage`.

This is the one classifier every layer uses (:meth:`thpguard.Region.coverage`,
``thpguard status``/``watch``/``guard``, :func:`thpguard.hot`, the guard,
the metrics). It turns the runs a ``PAGEMAP_SCAN`` returns into one kind per
whole PMD-size block:

``huge``
    PMD-mapped, present, holding data (not the huge zero page).
``zero``
    mapped to the huge zero page (a read of a never-written block): no data.
``split``
    every base page holds data (present or swapped) but the block is not
    PMD-mapped: the shape a write after ``fork()`` leaves behind.
``partial``
    some base pages hold data, some are empty (never touched, or freed with
    ``MADV_DONTNEED``).
``absent``
    no data at all.

A ``partial`` block is repaired only where the kernel's own khugepaged
would collapse it: when its empty pages are at most
``khugepaged/max_ptes_none`` (default 511, so one page of data is enough;
0 means never). ``MADV_COLLAPSE`` itself ignores that limit, so the rule
is thpguard's choice: it never builds a huge page the kernel's policy would
refuse, and it never undoes a ``MADV_DONTNEED`` an operator limited this way.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["ABSENT", "HUGE", "ZERO", "SPLIT", "PARTIAL", "BlockMap", "Coverage", "classify"]

ABSENT = "absent"
HUGE = "huge"
ZERO = "zero"
SPLIT = "split"
PARTIAL = "partial"

SOURCE_PAGEMAP_SCAN = "pagemap_scan"
SOURCE_SMAPS = "smaps"

# PAGEMAP_SCAN categories (uapi linux/fs.h, Linux 6.7); the native layer
# passes them through unchanged.
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6

_PAGE = mmap.PAGESIZE

Run = Tuple[int, int, int]  # (start, end, categories)


@dataclass(frozen=True)
class BlockMap:
    """Per-block detail of a range: the blocks that are not ``huge`` or empty.

    ``split`` and ``zero`` are block start addresses; ``partial`` maps a
    block start to its number of empty base pages; ``huge_runs`` are the
    ``(start, end)`` runs mapped by huge pages. Only blocks that lie wholly
    inside the range are classified.
    """

    start: int
    end: int
    pmd_size: int
    split: Tuple[int, ...]
    partial: Dict[int, int]
    zero: Tuple[int, ...]
    huge_runs: Tuple[Tuple[int, int], ...]

    @property
    def data_blocks(self) -> frozenset:
        """Every whole block holding data (huge, split or partial); made on
        first use, so a scan of a fully huge range stays one step per run."""
        cached = self.__dict__.get("_data_blocks")
        if cached is None:
            blocks = set(self.split) | set(self.partial)
            for lo, hi in self.huge_runs:
                blocks.update(range(lo - (lo - self.start) % self.pmd_size, hi, self.pmd_size))
            cached = frozenset(blocks)
            object.__setattr__(self, "_data_blocks", cached)
        return cached

    def blocks(self) -> range:
        """Start addresses of every whole block in the range."""
        first = -(-self.start // self.pmd_size) * self.pmd_size
        last = self.end - (self.end - first) % self.pmd_size if self.end > first else first
        return range(first, last, self.pmd_size)

    def kind(self, block: int) -> str:
        """The kind of the block starting at ``block``."""
        if block in self.partial:
            return PARTIAL
        if block in self.data_blocks:
            return SPLIT if block in self.split else HUGE
        return ZERO if block in self.zero else ABSENT

    def absent(self) -> List[int]:
        """Blocks holding no data (never touched, or the zero page)."""
        return [b for b in self.blocks() if b not in self.data_blocks]

    def repairable(self, max_ptes_none: Optional[int]) -> List[int]:
        """Blocks a repair should collapse: split ones, and partial ones with
        at most ``max_ptes_none`` empty pages (None: none of them)."""
        out = list(self.split)
        if max_ptes_none is not None and self.partial:
            out.extend(b for b, holes in self.partial.items() if holes <= max_ptes_none)
            out.sort()
        return out


def classify(runs: Iterable[Run], start: int, end: int, pmd: int,
             page: int = _PAGE) -> Tuple[int, int, BlockMap]:
    """(huge bytes, present bytes, :class:`BlockMap`) of ``[start, end)``.

    ``runs`` are PAGEMAP_SCAN results. Huge bytes count PMD-mapped present
    pages that hold data (never the huge zero page, never a non-present
    PMD); present bytes count every present page, zero pages included.
    """
    huge = present = 0
    first = -(-start // pmd) * pmd
    data: Dict[int, int] = {}
    zero: set = set()
    huge_runs: List[Tuple[int, int]] = []
    for lo, hi, cats in runs:
        lo, hi = max(lo, start), min(hi, end)
        if lo >= hi:
            continue
        if cats & PAGE_IS_PRESENT:
            present += hi - lo
        is_zero = cats & PAGE_IS_PFNZERO
        if cats & PAGE_IS_HUGE and cats & PAGE_IS_PRESENT and not is_zero:
            huge += hi - lo
            if huge_runs and huge_runs[-1][1] == lo:
                huge_runs[-1] = (huge_runs[-1][0], hi)
            else:
                huge_runs.append((lo, hi))
            continue
        has_data = cats & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED) and not is_zero
        if not has_data and not is_zero:
            continue
        at = max(lo, first)
        while at < hi:
            block = at - (at - first) % pmd
            upto = min(hi, block + pmd)
            if block + pmd <= end:
                if has_data:
                    data[block] = data.get(block, 0) + upto - at
                else:
                    zero.add(block)
            at = upto
    # A PMD maps a whole block: data runs never share a block with a huge run.
    split = tuple(sorted(b for b, n in data.items() if n >= pmd))
    partial = {b: (pmd - n) // page for b, n in sorted(data.items()) if n < pmd}
    return huge, present, BlockMap(
        start=start, end=end, pmd_size=pmd, split=split, partial=partial,
        zero=tuple(sorted(zero - set(data))), huge_runs=tuple(huge_runs),
    )


def merge_blocks(blocks: Sequence[int], pmd: int) -> Tuple[Tuple[int, int], ...]:
    """Sorted block starts as merged ``(start, end)`` ranges."""
    merged: List[List[int]] = []
    for block in blocks:
        if merged and merged[-1][1] == block:
            merged[-1][1] = block + pmd
        else:
            merged.append([block, block + pmd])
    return tuple((lo, hi) for lo, hi in merged)


@dataclass(frozen=True)
class Coverage:
    """How much of a range the kernel maps with PMD-size huge pages.

    All sizes are bytes. ``huge_bytes`` counts PMD-mapped pages that hold
    data (the huge zero page is not huge here: it holds nothing);
    ``present_bytes`` every page in memory (zero pages included, swapped
    pages not), so a block whose data is swapped out is ``split`` or
    ``partial`` while adding nothing to ``present_bytes``: a partial range
    with ``present_bytes == 0`` is data in swap. ``split_ranges`` lists
    ``(start, end)`` ranges of ``split`` blocks (every page holds data, not
    PMD-mapped: split after fork, or never huge) and ``partial_ranges`` those
    of ``partial`` blocks (some pages hold data); see :mod:`thpguard.blocks`.
    Both are None when the kernel offers no per-range detail (no
    PAGEMAP_SCAN, Linux < 6.7, or a process not allowed to read its own
    page map: ``source == "smaps"``).
    """

    start: int
    total_bytes: int
    huge_bytes: int
    present_bytes: int
    split_ranges: Optional[Tuple[Tuple[int, int], ...]]
    pmd_size: int
    source: str
    partial_ranges: Optional[Tuple[Tuple[int, int], ...]] = None
    blocks: Optional[BlockMap] = field(default=None, compare=False, repr=False)

    @classmethod
    def from_runs(cls, runs: Iterable[Run], start: int, end: int, pmd: int) -> "Coverage":
        huge, present, blocks = classify(runs, start, end, pmd)
        return cls(start, end - start, huge, present, merge_blocks(blocks.split, pmd), pmd,
                   SOURCE_PAGEMAP_SCAN, merge_blocks(sorted(blocks.partial), pmd), blocks)

    @property
    def ratio(self) -> float:
        """``huge_bytes / total_bytes`` (0.0 for an empty range)."""
        return self.huge_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def split_bytes(self) -> Optional[int]:
        """Bytes in ``split_ranges``; None without per-range detail."""
        if self.split_ranges is None:
            return None
        return sum(end - start for start, end in self.split_ranges)

    @property
    def split_blocks(self) -> Optional[int]:
        """Number of PMD-size blocks in ``split_ranges``; None without detail."""
        split = self.split_bytes
        return None if split is None else split // self.pmd_size

    @property
    def partial_blocks(self) -> Optional[int]:
        """Number of ``partial`` blocks; None without detail."""
        if self.partial_ranges is None:
            return None
        return sum(end - start for start, end in self.partial_ranges) // self.pmd_size

    @property
    def not_huge_blocks(self) -> int:
        """Blocks holding data in small pages; estimated from bytes (rounded
        up) without per-block detail, where a block split after fork stays
        present and a never-touched one is not."""
        if self.split_ranges is not None:
            return (self.split_blocks or 0) + (self.partial_blocks or 0)
        return max(0, -(-(self.present_bytes - self.huge_bytes) // self.pmd_size))

    @property
    def complete(self) -> bool:
        """True when every byte of the range is PMD-mapped."""
        return self.huge_bytes == self.total_bytes

    def as_dict(self) -> dict:
        """A JSON-ready dict of every field and property."""
        def ranges(value):
            return None if value is None else [list(r) for r in value]

        return {
            "start": self.start,
            "total_bytes": self.total_bytes,
            "huge_bytes": self.huge_bytes,
            "present_bytes": self.present_bytes,
            "ratio": self.ratio,
            "split_ranges": ranges(self.split_ranges),
            "split_bytes": self.split_bytes,
            "split_blocks": self.split_blocks,
            "partial_ranges": ranges(self.partial_ranges),
            "partial_blocks": self.partial_blocks,
            "pmd_size": self.pmd_size,
            "source": self.source,
        }
