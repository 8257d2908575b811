"""The lazy ``copy`` mechanisms side by side, in the patched guest.

Run by tests/kernels/guest.sh when the runner is given ``--copy-compare``
(patched kernel only; root). In fresh processes, alternating the order
round by round, a ``copy`` region (``copy_mode="lazy"``) is filled, a
child keeps it shared, and the parent writes one byte into each 2 MiB
block, one block at a time with a short pause (the userfaultfd handler's
pool refills between writes, as between an application's writes); each
first write is timed. The mechanism follows ``thp_cow`` at allocation:

* ``kernel``: ``thp_cow=madvise``, the kernel's direct COW copies the
  block inside the write fault;
* ``userfault``: ``thp_cow=never``, thpguard's userfaultfd handler copies
  it (write-protect fault, copy into a pre-faulted huge page, move).

``thp_cow`` is restored afterwards, even on failure. Prints one JSON
object: the median first write per block of each mechanism, the ratio
per round and its median (kernel time over userfault time), and each
round's coverage after the writes. Under emulation (TCG) only the ratio
means anything, and even it is indicative only.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import thpguard
from thpguard import _child, kernel

THP_COW = "/sys/kernel/mm/transparent_hugepage/thp_cow"
MODES = {"kernel": "madvise", "userfault": "never"}


def _read_mode() -> str:
    with open(THP_COW) as f:
        text = f.read()
    return text[text.index("[") + 1:text.index("]")]


def _write_mode(value: str) -> None:
    with open(THP_COW, "w") as f:
        f.write(value)


def first_writes(expected: str, size: int, pause: float) -> dict:
    """In a fresh process: the parent's first write per block after fork."""
    pmd = kernel.pmd_size()
    region = thpguard.alloc(size, fork="copy", copy_mode="lazy")
    try:
        if region.copy_mode != expected:
            raise RuntimeError(f"copy_mode {region.copy_mode!r}, wanted {expected!r} "
                               f"(thp_cow={_read_mode()})")
        view = region.view()
        view[:] = b"\x07" * size
        time.sleep(0.05)  # the handler's pool fills
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # keeps the region shared until told to go
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        times = []
        try:
            for off in range(0, size, pmd):
                time.sleep(pause)
                t0 = time.perf_counter()
                view[off] = 1
                times.append(time.perf_counter() - t0)
            coverage = region.coverage().ratio
        finally:
            os.close(w)
            os.waitpid(pid, 0)
        ok = all(view[off] == 1 and view[off + 1] == 7 for off in range(0, size, pmd))
        view.release()
        return {"per_block_s": statistics.median(times), "coverage": coverage, "data_ok": ok}
    finally:
        region.close()


def main() -> int:
    size, rounds, pause = 16 * kernel.pmd_size(), 5, 0.02
    saved = _read_mode()
    samples = {name: [] for name in MODES}
    try:
        for i in range(rounds + 1):  # round 0 warms up, not counted
            order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
            for name in order:
                _write_mode(MODES[name])
                result = _child.run(first_writes, name, size, pause)
                if i:
                    samples[name].append(result)
    finally:
        _write_mode(saved)
    ratios = [k["per_block_s"] / u["per_block_s"]
              for k, u in zip(samples["kernel"], samples["userfault"])]
    print(json.dumps({
        "blocks": size // kernel.pmd_size(), "rounds": rounds, "pause_s": pause,
        "kernel_ms": round(statistics.median(s["per_block_s"] for s in samples["kernel"]) * 1e3, 3),
        "userfault_ms": round(statistics.median(s["per_block_s"] for s in samples["userfault"]) * 1e3, 3),
        "ratio_kernel_over_userfault": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "coverage_min": min(s["coverage"] for v in samples.values() for s in v),
        "data_ok": all(s["data_ok"] for v in samples.values() for s in v),
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
