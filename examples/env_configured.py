"""An unchanged program, configured from the environment only.

    THPGUARD_GUARD=1 THPGUARD_GUARD_INTERVAL=0.02 THPGUARD_FORK_POLICY=share \\
        python env_configured.py

It never calls thpguard.install() nor names a fork policy; the variables
decide both. A child writes one byte per 2 MiB block and, with a guard, waits
for it to repair what the writes split.
"""

import os
import sys

import thpguard
import thpguard.numpy

table = thpguard.numpy.zeros(8 << 20, dtype="u1")
region = thpguard.numpy.region_of(table)
guard = thpguard.guard()
print(f"guard: {'running' if guard and guard.running else 'off'}, "
      f"interval: {guard.interval if guard else None}, policy: {region.fork}")

sys.stdout.flush()
pid = os.fork()
if pid == 0:
    table[:: region.pmd_size] = 1  # one byte per block: splits each shared block
    written = region.coverage()
    for _ in range(600 if guard else 0):  # guard ticks, bounded so that a bug cannot hang it
        if region.coverage().complete:
            break
        guard.wait_ticks(1, timeout=60)
    # The guard may repair before `written` is measured: its counter tells.
    split = not written.complete or thpguard.stats()["splits_detected"] > 0
    print(f"child: split {split}, coverage {region.coverage().ratio:.2f} after waiting",
          flush=True)
    os._exit(0)
os.waitpid(pid, 0)
