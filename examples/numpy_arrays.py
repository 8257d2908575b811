"""numpy arrays in huge pages that survive fork (run: python numpy_arrays.py)."""

import os
import sys

import numpy as np

import thpguard
import thpguard.numpy

# An array that owns its huge-page region (8 MiB: four 2 MiB pages).
table = thpguard.numpy.zeros((1024, 1024), dtype=np.float64)
region = thpguard.numpy.region_of(table)
print("array coverage:", region.coverage().ratio)

# Zero-copy over a region you allocated yourself.
with thpguard.alloc(4 << 20) as raw:
    view = raw.view()
    counts = np.frombuffer(view, dtype=np.int64)
    counts[:] = 7
    print("frombuffer shares memory:", view[:8].tobytes() == counts[:1].tobytes())
    del counts, view  # release the buffer before the region closes

# After fork, a write splits the writer's 2 MiB block; collapse repairs it.
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    table[0, 0] = 1.0
    before = region.coverage()
    after = region.collapse().coverage
    print(f"child: {before.split_blocks} split block(s), repaired: {after.complete}", flush=True)
    os._exit(0 if after.complete else 1)
_, status = os.waitpid(pid, 0)
assert status == 0
