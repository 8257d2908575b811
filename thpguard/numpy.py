"""numpy arrays backed by thpguard regions.

:func:`empty` and :func:`zeros` allocate a :class:`~thpguard.Region` and
return a plain :class:`numpy.ndarray` over it, without copying. The array
owns the region: its ``base`` keeps the region (and its mapping) alive
for as long as the array or any view of it lives, and the region cannot
be closed under it. :func:`region_of` finds the region behind an array,
for :meth:`~thpguard.Region.coverage` or :meth:`~thpguard.Region.collapse`.

numpy is imported lazily, so ``import thpguard`` never needs it.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence, Tuple, Union

import thpguard.region
from thpguard import _native
from thpguard.errors import InvalidArgumentError, InvalidTypeError

__all__ = ["empty", "zeros", "asarray", "region_of"]

Shape = Union[int, Sequence[int]]


def _np():
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a test dependency
        raise ImportError("thpguard.numpy needs numpy: pip install numpy") from None
    return numpy


class _RegionOwner:
    """The ``base`` of a region-backed array: holds the region and a view.

    numpy keeps the object that exports ``__array_interface__`` as the
    array's ``base``; holding a memoryview of the region here makes
    :meth:`Region.close` refuse (BufferError) while any array lives.
    """

    __slots__ = ("region", "_view", "__array_interface__")

    def __init__(self, region, offset: int, nbytes: int) -> None:
        self.region = region
        self._view = region.view()
        self.__array_interface__ = {
            "version": 3,
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (_native.buffer_address(self._view) + offset, False),
        }


def _shape(shape: Shape) -> Tuple[int, ...]:
    if isinstance(shape, bool):
        raise InvalidTypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    try:
        dims = (operator.index(shape),)
    except TypeError:
        try:
            dims = tuple(operator.index(d) for d in shape)
        except TypeError:
            raise InvalidTypeError(
                f"shape must be an int or a sequence of ints, got {shape!r}"
            ) from None
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(f"shape must not have negative dimensions, got {dims}")
    return dims


def _wrap(region, shape: Tuple[int, ...], dtype, order: str, offset: int = 0):
    np = _np()
    if order not in ("C", "F"):
        raise InvalidArgumentError(f"order must be 'C' or 'F', got {order!r}")
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise InvalidTypeError(
            f"dtype {dtype} holds Python objects; region memory can hold plain data only"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    flat = np.asarray(_RegionOwner(region, offset, nbytes))
    # Both steps return views of a contiguous buffer: nothing is copied.
    return flat.view(dtype).reshape(shape, order=order)


def empty(shape: Shape, dtype: Any = float, *, order: str = "C", **alloc_kwargs):
    """A new array of ``shape`` and ``dtype`` in its own huge-page region.

    Like :func:`numpy.empty`, but the memory is a :class:`~thpguard.Region`
    allocated with ``thpguard.alloc(nbytes, **alloc_kwargs)`` (``fork``,
    ``populate``, ``strict``). The region is rounded up to the PMD size
    (2 MiB on x86-64), so small arrays waste memory. The contents are
    unspecified (in practice zero: fresh anonymous memory).
    """
    np = _np()
    dims = _shape(shape)
    nbytes = math.prod(dims) * np.dtype(dtype).itemsize
    region = thpguard.region.alloc(max(nbytes, 1), **alloc_kwargs)
    try:
        return _wrap(region, dims, dtype, order)
    except BaseException:
        region.close()
        raise


def zeros(shape: Shape, dtype: Any = float, *, order: str = "C", **alloc_kwargs):
    """Like :func:`empty`, and every element is zero.

    Fresh anonymous memory is zero-filled by the kernel, so nothing is
    written: a populated region stays PMD-mapped.
    """
    return empty(shape, dtype, order=order, **alloc_kwargs)


def asarray(region, dtype: Any = "u1", shape: Optional[Shape] = None, *, offset: int = 0,
            order: str = "C"):
    """A zero-copy array over an existing region that keeps it alive.

    ``shape`` defaults to as many ``dtype`` items as fit after ``offset``
    (bytes).
    """
    np = _np()
    if not isinstance(region, thpguard.region.Region):
        raise InvalidTypeError(f"region must be a thpguard.Region, got {type(region).__name__}")
    itemsize = np.dtype(dtype).itemsize
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= region.size:
        raise InvalidArgumentError(
            f"offset must be an int of bytes in [0, {region.size}], got {offset!r}"
        )
    dims = _shape((region.size - offset) // itemsize if shape is None else shape)
    nbytes = math.prod(dims) * itemsize
    if offset + nbytes > region.size:
        raise InvalidArgumentError(
            f"shape {dims} of {np.dtype(dtype)} needs {nbytes} bytes at offset {offset}; "
            f"the region has {region.size} bytes"
        )
    return _wrap(region, dims, dtype, order, offset)


def region_of(array) -> Optional["thpguard.region.Region"]:
    """The region behind ``array`` (or any view of it), or None."""
    base = array
    while base is not None:
        if isinstance(base, _RegionOwner):
            return base.region
        base = getattr(base, "base", None)
    return None
