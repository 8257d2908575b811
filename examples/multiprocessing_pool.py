"""A multiprocessing Pool (fork start method) over a share and a copy region.

Run: python multiprocessing_pool.py
"""

import multiprocessing
import os

import thpguard

# Allocated before the pool forks, so every worker inherits both regions.
# "share": copy-on-write; a worker's write splits its 2 MiB block, and the
#          worker repairs it (explicitly here; the guard does it by itself).
# "copy":  each worker gets its own huge pages at fork: writes never split.
shared = thpguard.alloc(8 << 20, fork="share")
copied = thpguard.alloc(8 << 20, fork="copy")


def work(block: int):
    """Read both regions, write one byte of a block in each, repair, report."""
    pmd = shared.pmd_size
    total = sum(shared.view()[::pmd]) + sum(copied.view()[::pmd])
    shared.view()[block * pmd] = 1  # splits this block in this worker
    copied.view()[block * pmd] = 1  # this worker's own huge page: no split
    split = shared.coverage().split_blocks
    repaired = shared.collapse().coverage
    return os.getpid(), total, split, repaired.ratio, copied.coverage().ratio


if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(2) as pool:
        for pid, total, split, shared_ratio, copy_ratio in pool.map(work, range(4)):
            print(f"worker {pid}: split blocks {split}, share coverage "
                  f"{shared_ratio:.2f} after repair, copy coverage {copy_ratio:.2f}")
    print(f"parent: share {shared.coverage().ratio:.2f}, copy {copied.coverage().ratio:.2f}")
