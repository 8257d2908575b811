"""What the guard costs and how fast it repairs, measured in one run.

1. CPU time of the guard thread per tick with 1 GiB and with 8 GiB guarded
   (warm, fully PMD-mapped memory: the steady state), next to one bare
   PAGEMAP_SCAN of the same region in a thread after the same idle time,
   measured interleaved, as a ratio.
2. Time from a child's write to its block being PMD-mapped again, by
   PAGEMAP_SCAN polled in the child: 100 writes at a random phase of the
   tick, with the default interval and inside hot().
3. Memory cost of a repair: Pss of the region in parent and child after a
   child split N blocks, before and after the child's guard repaired them.
4. fork() latency of a process with 1 GiB guarded, guard running against
   no guard, interleaved.

Usage: python -m benchmarks.guard_numbers [--big-gib 8] [--json]
(as a module: run as a script, its folder would go first on sys.path and
the benchmark modules there could shadow installed packages)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time

import thpguard
from thpguard import kernel, pagemap
from thpguard._child import Child

from ._harness import CHILD_TIMEOUT, in_child

GIB = 1 << 30


def region_pss(pid, region):
    total = 0
    for vma in kernel.read_smaps(pid):
        if vma.start >= region.address and vma.end <= region.address + region.size:
            total += vma.fields.get("Pss", 0)
    return total


def cpu_per_tick(sizes_gib, seconds=3.0):
    """Guard CPU per tick against one bare scan of the same regions."""
    out = {}
    for gib in sizes_gib:
        region = thpguard.alloc(gib * GIB)
        assert region.coverage().complete, "region not fully PMD-mapped; numbers would be wrong"
        guard = thpguard.install(interval=0.05)
        guard.wait_ticks(2, timeout=30)
        tick_cpu, scan_cpu = [], []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            before = thpguard.stats()
            guard.wait_ticks(5, timeout=30)
            after = thpguard.stats()
            tick_cpu.append((after.tick_cpu_seconds - before.tick_cpu_seconds)
                            / (after.ticks + after.hot_ticks - before.ticks - before.hot_ticks))
            # Interleaved baseline: the same scan without the guard's logic,
            # in a thread of its own after the same idle time, as a tick.
            spent = []

            def bare_scans():
                for _ in range(5):
                    time.sleep(guard.interval)
                    c0 = time.thread_time()
                    pagemap.coverage(region.address, region.address + region.size,
                                     region.pmd_size)
                    spent.append(time.thread_time() - c0)

            worker = threading.Thread(target=bare_scans)
            worker.start()
            worker.join()
            scan_cpu.append(sum(spent) / len(spent))
        guard.stop()
        region.close()
        tick, scan = statistics.median(tick_cpu), statistics.median(scan_cpu)
        out[f"{gib}GiB"] = {
            "tick_cpu_us": tick * 1e6,
            "bare_scan_cpu_us": scan * 1e6,
            "tick_over_bare_scan": tick / scan if scan else None,
            "cpu_share_of_one_core_at_50ms": tick / 0.05,
            "samples": len(tick_cpu),
        }
    return out


def _child_latencies(region, n, in_hot):
    pmd = region.pmd_size
    guard = thpguard.guard()
    guard.wait_ticks(1, timeout=30)
    rng = random.Random(os.getpid())
    latencies = []
    context = thpguard.hot(region) if in_hot else None
    if context is not None:
        context.__enter__()
    view = region.view()
    interval = guard.hot_interval if in_hot else guard.interval
    for i in range(n):
        block = region.address + i * pmd
        time.sleep(rng.uniform(0, interval))  # a random phase against the ticks
        t0 = time.perf_counter()
        view[i * pmd] = 1
        while not pagemap.coverage(block, block + pmd, pmd).complete:
            time.sleep(0.0002)
        latencies.append(time.perf_counter() - t0)
    view.release()
    if context is not None:
        context.__exit__(None, None, None)
    return latencies


def repair_latency(n=100, in_hot=False):
    """Seconds from a child's write to its block PMD-mapped again."""
    guard = thpguard.install(interval=0.05)
    region = thpguard.alloc(n * kernel.pmd_size())
    latencies = in_child(_child_latencies, region, n, in_hot)
    region.close()
    guard.stop()
    return {
        "n": len(latencies),
        "interval_ms": (guard.hot_interval if in_hot else guard.interval) * 1e3,
        "median_ms": statistics.median(latencies) * 1e3,
        "p90_ms": statistics.quantiles(latencies, n=10)[-1] * 1e3,
        "worst_ms": max(latencies) * 1e3,
        "median_over_interval": statistics.median(latencies)
        / (guard.hot_interval if in_hot else guard.interval),
    }


def _split_then_repair(channel, region, blocks):
    pmd = region.pmd_size
    view = region.view()
    for b in range(blocks):
        view[b * pmd] = 1
    view.release()
    channel.send("split")  # split, not repaired
    channel.recv(timeout=None)
    guard = thpguard.install(interval=0.01)
    while not region.coverage().complete:
        guard.wait_ticks(1, timeout=30)
    channel.send("repaired")
    channel.recv(timeout=None)


def repair_memory(blocks=32):
    """Pss of a shared region in parent + child: split versus repaired."""
    region = thpguard.alloc(64 * kernel.pmd_size())
    pmd = region.pmd_size
    with Child(_split_then_repair, region, blocks, channel=True) as child:
        child.recv(CHILD_TIMEOUT, what="its blocks split")
        split_total = region_pss(os.getpid(), region) + region_pss(child.pid, region)
        child.send("repair")
        child.recv(CHILD_TIMEOUT, what="its blocks repaired")
        repaired_total = region_pss(os.getpid(), region) + region_pss(child.pid, region)
        child.send("exit")
        child.result(CHILD_TIMEOUT)
    region.close()
    return {
        "blocks": blocks,
        "pss_split_bytes": split_total,
        "pss_repaired_bytes": repaired_total,
        "extra_bytes_per_repaired_block": (repaired_total - split_total) / blocks,
        "extra_over_block_size": (repaired_total - split_total) / blocks / pmd,
    }


def fork_latency(rounds=40):
    """fork()+exit+wait of a process with 1 GiB guarded: guard on / off, interleaved."""
    region = thpguard.alloc(GIB)
    with_guard, without = [], []
    for i in range(rounds):
        for on in ((True, False) if i % 2 else (False, True)):
            guard = thpguard.install(interval=0.05) if on else None
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            elapsed = time.perf_counter() - t0
            os.waitpid(pid, 0)
            (with_guard if on else without).append(elapsed)
            if guard is not None:
                guard.stop()
    region.close()
    on, off = statistics.median(with_guard), statistics.median(without)
    return {"rounds": rounds, "median_ms_guard": on * 1e3, "median_ms_no_guard": off * 1e3,
            "guard_over_no_guard": on / off}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big-gib", type=int, default=8, help="the larger guarded size (GiB)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    ok, reason = kernel.can_get_huge_pages()
    if not ok:
        print(f"guard_numbers: needs huge pages: {reason}", file=sys.stderr)
        return 2
    results = {
        "kernel": os.uname().release,
        "load_average_at_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "cpu_per_tick": cpu_per_tick([1, args.big_gib]),
        "write_to_pmd_mapped": repair_latency(),
        "write_to_pmd_mapped_in_hot": repair_latency(in_hot=True),
        "repair_memory": repair_memory(),
        "fork_latency_1GiB": fork_latency(),
    }
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        for section, values in results.items():
            print(f"{section}: {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
