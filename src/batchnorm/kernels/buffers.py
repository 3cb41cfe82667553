"""Output buffers of the numba kernels: large ones come from a small cache of freed buffers.

Why: a fresh multi-megabyte allocation is fresh memory, and the operating system zero-fills every
page the first time it is touched. On the benchmark VM that first touch costs more than the kernel
that writes the values (a ``(64, 64, 56, 56)`` float32 output is 51 MB: about 5 ms of page faults
for a 2 ms apply). Training allocates the same sizes every step (``y`` in forward, ``dx`` in
backward), so outputs of at least :data:`MIN_BYTES` are carved from buffers that earlier outputs
released, the way PyTorch's CUDA caching allocator reuses device memory. PyTorch's CPU allocator
does not do this; ``THP_MEM_ALLOC_ENABLE=1`` only makes its faults cheaper.

Rules:

* A buffer returns to the cache only when the tensor that used it (and every view of it) is gone:
  its storage is a NumPy array watched by a weak reference. Nothing alive is ever reused.
* Sizes are rounded up to 2 MiB, buffers are 2 MiB-aligned and advised ``MADV_HUGEPAGE`` (Linux),
  so a new buffer is faulted in huge pages and a cached one fits any output of its size class.
* The cache keeps at most ``BATCHNORM_BUFFER_CACHE`` bytes of *free* buffers (default 1 GiB;
  ``0`` turns caching off, outputs are then plain ``torch.empty_like``). :func:`empty_cache`
  releases them; :func:`cache_info` reports hits, misses and bytes held.
* The tensors are ordinary CPU tensors in the input's dtype and memory format, except that their
  storage cannot be resized (``y.resize_()`` to a larger size raises, as for ``torch.from_numpy``).

Example::

    >>> from batchnorm.kernels import buffers
    >>> buffers.cache_info()["limit_bytes"]        # BATCHNORM_BUFFER_CACHE, default 1 GiB
    1073741824
    >>> freed = buffers.empty_cache()              # bytes of free buffers handed back

Reference: the caching-allocator idea of PyTorch's CUDA allocator (``torch.cuda.empty_cache``).
"""

from __future__ import annotations

import os
import sys
import threading
import weakref

import numpy as np
import torch

#: Outputs at least this large come from the cache (smaller ones: ``torch.empty``, which recycles them cheaply).
MIN_BYTES = 256 << 10
_ALIGN = 2 << 20  # one transparent huge page
_MADV_HUGEPAGE = 14


def _limit_from_env() -> int:
    raw = os.environ.get("BATCHNORM_BUFFER_CACHE", "")
    if not raw:
        return 1 << 30
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(
            f"BATCHNORM_BUFFER_CACHE must be a number of bytes (0 disables the output-buffer cache), got {raw!r}. "
            "Unset it for the default of 1 GiB."
        ) from None
    return max(0, value)


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):  # pragma: no cover - no libc madvise
        return None


_MADVISE = _madvise()


class _Cache:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free: dict[int, list[np.ndarray]] = {}
        self.held = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        with self.lock:
            stack = self.free.get(size)
            if stack:
                self.held -= size
                self.hits += 1
                return stack.pop()
            self.misses += 1
        if size < _ALIGN:  # small class: 64-byte aligned is enough
            raw = np.empty(size + 64, dtype=np.uint8)
            start = (-raw.ctypes.data) % 64
            return raw[start : start + size]
        raw = np.empty(size + _ALIGN, dtype=np.uint8)
        start = (-raw.ctypes.data) % _ALIGN
        buf = raw[start : start + size]
        if _MADVISE is not None:
            _MADVISE(buf.ctypes.data, size, _MADV_HUGEPAGE)
        return buf

    def give(self, buf: np.ndarray) -> None:
        size = buf.nbytes
        with self.lock:
            if self.held + size <= self.limit:
                self.free.setdefault(size, []).append(buf)
                self.held += size

    def clear(self) -> int:
        with self.lock:
            freed, self.free, self.held = self.held, {}, 0
        return freed


_CACHE = _Cache(_limit_from_env())


def empty_cache() -> int:
    """Release every cached free buffer; return the bytes released (buffers in use are untouched)."""
    return _CACHE.clear()


def cache_info() -> dict[str, int]:
    """``{"hits", "misses", "held_bytes", "limit_bytes"}`` of the output-buffer cache."""
    with _CACHE.lock:
        return {"hits": _CACHE.hits, "misses": _CACHE.misses, "held_bytes": _CACHE.held, "limit_bytes": _CACHE.limit}


def set_limit(nbytes: int) -> None:
    """Cap the bytes of free buffers kept (0 disables caching); excess free buffers are released now."""
    if nbytes < 0:
        raise ValueError(f"set_limit expected a byte count >= 0, got {nbytes}. Pass 0 to disable the cache.")
    with _CACHE.lock:
        _CACHE.limit = int(nbytes)
    if _CACHE.held > _CACHE.limit:
        _CACHE.clear()


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_LIVE: dict[int, tuple] = {}  # id(weakref) -> (weakref, buffer) for outputs in use


def _release(ref: weakref.ref) -> None:
    """Weakref callback: the output's array is gone, so its buffer may serve again."""
    try:
        _, buf = _LIVE.pop(id(ref))
    except (KeyError, TypeError):  # interpreter shutdown
        return
    _CACHE.give(buf)


def empty(physical_shape: tuple[int, ...], perm: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised tensor whose memory is contiguous in ``physical_shape`` (dims in order ``perm``).

    Returns the tensor in its logical shape (``physical_shape`` permuted back by ``perm``, so a
    channels-last input gets a channels-last output) and the NumPy array of its memory in physical order.
    """
    n = torch.empty((), dtype=dtype).element_size() if dtype not in _NP_DTYPES else np.dtype(_NP_DTYPES[dtype]).itemsize
    for s in physical_shape:
        n *= s
    identity = perm == list(range(len(perm)))
    if n < MIN_BYTES or _CACHE.limit == 0 or dtype not in _NP_DTYPES:
        t = torch.empty(physical_shape, dtype=dtype)
        arr = t.numpy()
    else:
        size = _size_class(n)
        buf = _CACHE.take(size)
        arr = buf[:n].view(_NP_DTYPES[dtype]).reshape(physical_shape)
        ref = weakref.ref(arr, _release)  # cheaper than weakref.finalize (a few µs per output)
        _LIVE[id(ref)] = (ref, buf)
        t = torch.from_numpy(arr)
    return (t if identity else t.permute(_inverse(perm))), arr


def _size_class(n: int) -> int:
    """Bytes actually reserved for an ``n``-byte output: 2 MiB multiples from 2 MiB up, else 1/8-power-of-two steps."""
    if n >= _ALIGN:
        return -(-n // _ALIGN) * _ALIGN
    step = max(4096, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv
