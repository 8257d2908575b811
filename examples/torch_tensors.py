"""torch CPU tensors over thpguard memory, without a copy (run: python torch_tensors.py)."""

import numpy as np
import torch

import thpguard
import thpguard.numpy

# From a region-backed numpy array: the tensor keeps the array (and so the
# region) alive.
array = thpguard.numpy.zeros((1024, 512), dtype=np.float32)
weights = torch.from_numpy(array)
weights += 1.0
print("from_numpy coverage:", thpguard.numpy.region_of(array).coverage().ratio)

# From a region's view: torch.frombuffer keeps the memoryview alive.
region = thpguard.alloc(4 << 20)
embedding = torch.frombuffer(region.view(), dtype=torch.float32).view(-1, 256)
embedding.fill_(0.5)
print("frombuffer shape:", tuple(embedding.shape), "coverage:", region.coverage().ratio)
