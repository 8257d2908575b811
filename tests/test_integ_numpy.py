"""numpy and torch over thpguard regions: zero copy, ownership, fork repair."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import thpguard
import thpguard.numpy as tnp
from conftest import run_in_child, smaps_huge_bytes, smaps_vma

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name):
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name)],
                          capture_output=True, text=True, timeout=120)


def test_zeros_is_zero_copy_and_huge(require_thp, pmd):
    """zeros() gives a plain ndarray over a region the kernel maps with PMDs."""
    array = tnp.zeros((512, 1024), dtype=np.float64)  # 4 MiB
    region = tnp.region_of(array)
    assert type(array) is np.ndarray and array.shape == (512, 1024)
    assert not array.any()
    assert array.__array_interface__["data"][0] == region.address
    array[1, 2] = 3.5
    assert np.frombuffer(region.view(), np.float64)[1024 + 2] == 3.5
    vma = smaps_vma(os.getpid(), region.address)
    assert vma.fields["AnonHugePages"] == region.size == 2 * pmd


def test_alloc_kwargs_pass_through(require_thp):
    """Keyword arguments reach alloc(): fork policy, populate."""
    array = tnp.empty(1000, "u1", fork="wipe", populate=False)
    region = tnp.region_of(array)
    assert region.fork == "wipe"
    assert region.coverage().present_bytes == 0
    with pytest.raises(TypeError):
        tnp.empty(10, "u1", colour="red")


def test_array_owns_its_region(require_thp):
    """A slice alone keeps the mapping; the last reference unmaps it."""
    array = tnp.zeros(1 << 20, dtype=np.uint8)
    address = tnp.region_of(array).address
    tail = array[10:20]
    del array
    gc.collect()
    assert smaps_vma(os.getpid(), address) is not None
    assert tnp.region_of(tail).address == address
    with pytest.raises(BufferError):
        tnp.region_of(tail).close()
    tail[:] = 1
    del tail
    gc.collect()
    assert smaps_vma(os.getpid(), address) is None


def test_order_dtype_and_asarray(require_thp):
    """Fortran order, structured dtypes, and asarray() over a region at an offset."""
    f = tnp.empty((3, 4), "i8", order="F")
    assert f.flags.f_contiguous and f.strides == (8, 24)
    rec = tnp.zeros(5, [("x", "f4"), ("y", "i2")])
    assert rec.dtype.names == ("x", "y")
    with thpguard.alloc(2 << 20) as region:
        words = tnp.asarray(region, "u4", offset=4096)
        words[0] = 0xDEADBEEF
        shape, owner = words.shape, tnp.region_of(words)
        del words  # the region cannot close while an array uses it
        assert shape == (((2 << 20) - 4096) // 4,) and owner is region
        assert bytes(region.view()[4096:4100]) == (0xDEADBEEF).to_bytes(4, "little")
    assert tnp.zeros(0).shape == (0,)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: tnp.empty(-1), ValueError),
        (lambda: tnp.empty("10"), TypeError),
        (lambda: tnp.empty(True), TypeError),
        (lambda: tnp.empty(10, object), TypeError),
        (lambda: tnp.empty(10, order="K"), ValueError),
        (lambda: tnp.asarray(b"abc"), TypeError),
    ],
)
def test_bad_input_is_refused(call, error):
    """Bad shapes, dtypes, orders and regions raise with a clear message."""
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, thpguard.ThpguardError)


def test_asarray_refuses_too_big_a_shape(require_thp):
    with thpguard.alloc(2 << 20) as region:
        with pytest.raises(ValueError, match="needs"):
            tnp.asarray(region, "f8", (1 << 20,))
        with pytest.raises(ValueError, match="offset"):
            tnp.asarray(region, offset=-1)


def test_child_write_split_is_repaired(require_thp, pmd):
    """After fork a child's write splits its block (smaps); collapse repairs it."""
    array = tnp.zeros(4 * pmd // 8, dtype=np.float64)
    region = tnp.region_of(array)

    def child():
        array[0] = 1.0
        split = smaps_vma(os.getpid(), region.address).fields["AnonHugePages"]
        region.collapse()
        repaired = smaps_vma(os.getpid(), region.address).fields["AnonHugePages"]
        return split, repaired

    split, repaired = run_in_child(child)
    assert split == 3 * pmd and repaired == 4 * pmd
    assert array[0] == 0.0  # copy-on-write: the parent's data is its own


def test_copy_policy_array_stays_valid_in_child(require_thp, pmd):
    """A 'copy' array keeps its address in the child, with its data, and never splits."""
    array = tnp.zeros(2 * pmd // 4, dtype=np.uint32, fork="copy")
    array[:] = np.arange(array.size, dtype=np.uint32)
    region = tnp.region_of(array)

    def child():
        array[0] = 7  # the child's own huge page since the fork: no split
        huge = smaps_huge_bytes(os.getpid(), region.address, region.address + region.size)
        return huge, int(array[1:].sum(dtype=np.uint64)), int(array[0])

    huge, rest, first = run_in_child(child)
    assert huge == region.size
    assert rest == int(np.arange(1, array.size, dtype=np.uint64).sum()) and first == 7
    assert array[0] == 0


def test_numpy_example_runs(require_thp):
    """examples/numpy_arrays.py (included in the docs) runs as documented."""
    done = run_example("numpy_arrays.py")
    assert done.returncode == 0, done.stderr
    assert "array coverage: 1.0" in done.stdout
    assert "frombuffer shares memory: True" in done.stdout
    assert "child: 1 split block(s), repaired: True" in done.stdout


# -- torch (CPU build), where installed ----------------------------------------


def test_torch_tensors_share_region_memory(require_thp):
    """torch.from_numpy and torch.frombuffer see the region's bytes, no copy."""
    torch = pytest.importorskip("torch")
    array = tnp.zeros((256, 1024), dtype=np.float32)
    tensor = torch.from_numpy(array)
    tensor[3, 4] = 2.5
    assert array[3, 4] == 2.5
    assert tensor.data_ptr() == tnp.region_of(array).address
    region = thpguard.alloc(2 << 20)
    address = region.address
    flat = torch.frombuffer(region.view(), dtype=torch.int32)
    assert flat.data_ptr() == address
    flat[7] = 99
    assert np.frombuffer(region.view(), np.int32)[7] == 99
    with pytest.raises(BufferError):
        region.close()
    del region, array
    gc.collect()
    assert smaps_vma(os.getpid(), address) is not None  # the tensor keeps it mapped
    assert smaps_vma(os.getpid(), address).fields["AnonHugePages"] == 2 << 20


def test_torch_example_runs(require_thp):
    """examples/torch_tensors.py (included in the docs) runs as documented."""
    pytest.importorskip("torch")
    done = run_example("torch_tensors.py")
    assert done.returncode == 0, done.stderr
    assert "from_numpy coverage: 1.0" in done.stdout
    assert "frombuffer shape: (4096, 256) coverage: 1.0" in done.stdout
