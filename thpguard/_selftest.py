"""The live self-test behind ``thpguard verify``.

For each fork policy it allocates a small region through the public API,
forks, and checks in the child what the policy promises, against the
kernel's own account (PAGEMAP_SCAN through ``coverage()``, and the child's
smaps). Every step is timed. Children report through a pipe and always
leave with ``os._exit``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

from . import _native, kernel
from .region import POLICIES
from ._checks import FAIL, OK, Check, fmt_bytes



def _s(seconds: float) -> float:
    # Microsecond resolution; every duration in the JSON is in seconds.
    return round(seconds, 6)


def _pattern(size: int) -> bytes:
    # 251 is prime: no 4 KiB page or 2 MiB block repeats another's content.
    block = bytes(range(251))
    return (block * (size // len(block) + 1))[:size]


def _vma_of(address: int) -> Optional[kernel.Vma]:
    for vma in kernel.read_smaps("self", kernel.Roots()):
        if vma.start <= address < vma.end:
            return vma
    return None


def _smaps_huge(address: int) -> Optional[int]:
    vma = _vma_of(address)
    return None if vma is None else vma.huge_bytes


class _Child:
    """What a child measured, sent to the parent as JSON."""

    def __init__(self) -> None:
        self.problems: List[str] = []
        self.timings: Dict[str, float] = {}
        self.facts: Dict[str, object] = {}

    def expect(self, condition: bool, problem: str) -> bool:
        if not condition:
            self.problems.append(problem)
        return condition

    def timed(self, name: str, fn):
        started = time.perf_counter()
        result = fn()
        self.timings[name] = _s(time.perf_counter() - started)
        return result

    def as_dict(self) -> dict:
        return {"problems": self.problems, "timings": self.timings, "facts": self.facts}


def _last_block(region) -> int:
    """Offset of the region's last PMD block: the second of the default four,
    the only one of a one-block region (``verify --size 2M`` or less)."""
    return min(region.pmd_size, region.size - region.pmd_size)


def _child_share(region, view, expected: bytearray, c: _Child) -> None:
    pmd = region.pmd_size
    c.expect(region.coverage().complete, "not PMD-mapped right after fork")
    offset = _last_block(region) + 123
    expected[offset] = (expected[offset] + 1) % 256

    def write():
        view[offset] = expected[offset]

    c.timed("split_write_seconds", write)
    cov = c.timed("detect_seconds", region.coverage)
    c.facts["split_blocks"] = cov.split_blocks
    if region.direct_cow and kernel.thp_cow_mode() in ("madvise", "always"):
        # Direct COW: the kernel copies the whole huge page on the write,
        # nothing splits and nothing needs repair.
        c.facts["direct_cow"] = True
        c.expect(cov.complete, "the write after fork split a block although direct COW is on")
        c.expect(c.timed("verify_seconds", lambda: view.tobytes() == expected), "data differs after the write")
        huge = _smaps_huge(region.address)
        c.facts["smaps_anon_huge_bytes"] = huge
        c.expect(huge == region.size, f"smaps AnonHugePages {huge} != region size {region.size}")
        return
    c.expect(not cov.complete, "the write after fork did not split the block (kernel copied 2 MiB?)")
    collapse = kernel.capabilities().collapse
    if not collapse.available:
        c.expect(False, f"the split was detected but cannot be repaired: {collapse.reason}")
        return
    result = c.timed("repair_seconds", region.collapse)
    c.facts["collapsed_bytes"] = result.collapsed_bytes
    c.expect(result.ok, f"collapse did not repair the split: {result.failures}")
    same = c.timed("verify_seconds", lambda: view.tobytes() == expected)
    c.expect(same, "data differs after repair")
    huge = _smaps_huge(region.address)
    c.facts["smaps_anon_huge_bytes"] = huge
    c.expect(huge == region.size, f"smaps AnonHugePages {huge} != region size {region.size}")


def _child_copy(region, view, expected: bytearray, c: _Child) -> None:
    c.expect(region.coverage().complete, "child's copy is not PMD-mapped")
    offset = _last_block(region) + 7
    expected[offset] = (expected[offset] + 1) % 256

    def write():
        view[offset] = expected[offset]

    c.timed("write_seconds", write)
    cov = c.timed("detect_seconds", region.coverage)
    c.expect(cov.complete, "a write in the child split a block of a copy region")
    c.facts["copy_mode"] = region.copy_mode
    if region.copy_mode == "userfault":
        stats = _native.copy_stats()
        c.facts["block_copies"] = stats["copies"]
        c.expect(stats["copies"] >= 1 and not stats["cow_fallbacks"],
                 f"the userfaultfd handler did not copy the written block ({stats})")
    c.expect(c.timed("verify_seconds", lambda: view.tobytes() == expected), "child's copy differs from the parent's data")
    huge = _smaps_huge(region.address)
    c.facts["smaps_anon_huge_bytes"] = huge
    c.expect(huge == region.size, f"smaps AnonHugePages {huge} != region size {region.size}")


def _child_wipe(region, view, expected: bytearray, c: _Child) -> None:
    page = os.sysconf("SC_PAGE_SIZE")

    # Write before reading: a read first maps the huge zero page, and kernels
    # before 6.13 split it on the next write instead of allocating a huge page.
    def write():
        view[0] = 1

    c.timed("write_seconds", write)
    cov = region.coverage()
    c.facts["huge_bytes_after_write"] = cov.huge_bytes
    c.expect(cov.huge_bytes >= region.pmd_size, "a write in the wiped child did not get a huge page")
    zero = c.timed("verify_seconds", lambda: view[0] == 1 and not any(view[1:page])
                   and not any(view[page::page]))
    c.expect(zero, "a wipe region is not zero-filled in the child")


def _child_private(region, view, expected: bytearray, c: _Child) -> None:
    del view  # never touch it: it is not mapped here
    c.expect(region.closed, "a private region reports itself open in the child")
    vma = _vma_of(region.address)
    c.facts["child_vma_perms"] = None if vma is None else vma.perms
    c.expect(vma is None or not vma.perms.startswith("r"),
             "a private region is readable in the child (MADV_DONTFORK ignored?)")


_CHILD = {"share": _child_share, "copy": _child_copy, "wipe": _child_wipe, "private": _child_private}

_PROMISE = {
    "share": "child split detected and repaired, data intact",
    "copy": "child has its own huge pages, writes do not split",
    "wipe": "child sees zeros, its writes get huge pages",
    "private": "child has no mapping",
}


def run_policy(policy: str, size: int) -> Check:
    """Allocate *size* bytes with *policy*, fork, check the promise; one Check."""
    import thpguard  # noqa: PLC0415 - the public API, above this module's layer on purpose

    name, title = f"selftest_{policy}", f"self-test {policy}"
    timings: Dict[str, float] = {}
    problems: List[str] = []
    started = time.perf_counter()
    try:
        region = thpguard.alloc(size, fork=policy)
    except (OSError, thpguard.ThpguardError) as exc:
        return Check(name, title, FAIL, f"alloc failed: {exc}", measurements={"timings": timings})
    timings["alloc_seconds"] = _s(time.perf_counter() - started)
    view = region.view()
    facts: Dict[str, object] = {}
    try:
        expected = bytearray(_pattern(region.size))
        view[:] = expected
        cov = region.coverage()
        facts["degraded"] = region.degraded
        if not cov.complete:
            problems.append(f"only {fmt_bytes(cov.huge_bytes)} of {fmt_bytes(cov.total_bytes)} "
                            f"PMD-mapped after alloc ({region.degraded or 'unknown reason'})")
        report = _fork_and_check(policy, region, view, expected, timings)
        problems += report.get("problems", [])
        timings.update(report.get("timings", {}))
        facts.update(report.get("facts", {}))
        # The parent keeps its huge pages and its data whatever the child did.
        after = region.coverage()
        parent_expected = bytes(_pattern(region.size))
        if not after.complete:
            problems.append("the parent lost huge pages after the child ran")
        if view.tobytes() != parent_expected:
            problems.append("the parent's data changed")
    finally:
        view.release()
        region.close()
    timings["total_seconds"] = _s(time.perf_counter() - started)
    measurements = {"facts": dict(sorted(facts.items())), "size": region.size,
                    "timings": dict(sorted(timings.items()))}
    if problems:
        return Check(name, title, FAIL, "; ".join(problems), measurements=measurements)
    steps = ", ".join(f"{k[:-len('_seconds')]} {v * 1000:.2f}" for k, v in timings.items()
                      if k != "total_seconds")
    return Check(name, title, OK, f"{_PROMISE[policy]} (ms: {steps})", measurements=measurements)


def _fork_and_check(policy, region, view, expected, timings) -> dict:
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: report and leave with os._exit, whatever happens
        status = 0
        try:
            os.close(read_end)
            c = _Child()
            try:
                _CHILD[policy](region, view, expected, c)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                c.problems.append(f"child raised {type(exc).__name__}: {exc}")
            data = json.dumps(c.as_dict()).encode()
            while data:
                data = data[os.write(write_end, data):]
        except BaseException:  # noqa: BLE001
            status = 1
        finally:
            os._exit(status)
    timings["fork_seconds"] = _s(time.perf_counter() - started)
    os.close(write_end)
    chunks = []
    try:
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    try:
        report = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        report = {}
    if not report:
        report = {"problems": [f"the child died without a report (wait status {status})"]}
    return report


def run(size: int, policies=POLICIES) -> List[Check]:
    """Run the self-test for each policy; a list of Checks with measurements."""
    return [run_policy(p, size) for p in policies]
