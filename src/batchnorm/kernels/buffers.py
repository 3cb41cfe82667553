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
* The cache is bounded by what the workload needs: live plus free buffers never exceed the largest
  set of outputs that were alive at the same time (``peak_live_bytes``, :data:`WORKLOAD_FACTOR` = 1),
  so the cache never makes the process hold more output memory than its own peak. A training loop
  (same sizes every step) reuses every buffer; when sizes vary (last batch, random crops) a miss
  first releases the least recently returned free buffers to make room, and a freed buffer that
  would not fit is handed back to the system at once.
* ``BATCHNORM_BUFFER_CACHE`` additionally caps the bytes of *free* buffers (default 1 GiB; ``0``
  turns caching off, outputs are then plain ``torch.empty_like``). :func:`set_limit` changes the
  cap at run time, :func:`empty_cache` releases every free buffer and restarts the peak,
  :func:`cache_info` reports hits, misses, evictions and the bytes live, held and allowed.
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

import mmap
import os
import sys
import threading
import weakref

import numpy as np
import torch

#: Outputs at least this large come from the cache (smaller ones: ``torch.empty``, which recycles them cheaply).
MIN_BYTES = 256 << 10
#: Live plus free cache-class bytes never exceed this multiple of the largest live set seen (peak of outputs in use).
WORKLOAD_FACTOR = 1.0
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
_MMAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


def _fresh_large(size: int) -> np.ndarray:
    """A new 2 MiB-aligned ``size``-byte buffer of its own private anonymous mapping.

    Its own mapping (not malloc's heap) so that releasing it returns the memory to the system at
    once: evicted buffers must not linger in the heap as resident memory. Private, so a forked child
    writing an output never touches its parent's memory.
    """
    if _MMAP_FLAGS and sys.platform.startswith("linux"):
        region = mmap.mmap(-1, size + _ALIGN, flags=_MMAP_FLAGS)
        raw = np.frombuffer(region, dtype=np.uint8)  # keeps the mapping alive; unmapped when the last view goes
    else:  # pragma: no cover - other platforms: the heap
        raw = np.empty(size + _ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    buf = raw[start : start + size]
    if _MADVISE is not None:
        _MADVISE(buf.ctypes.data, size, _MADV_HUGEPAGE)
    return buf


class _Cache:
    """Free buffers by size class, bounded by the workload's largest live set (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free: dict[int, list[tuple[int, np.ndarray]]] = {}  # size -> [(tick returned, buffer)], oldest first
        self.held = 0  # bytes of free buffers kept
        self.live = 0  # bytes of cache-class buffers in use by live outputs
        self.peak = 0  # largest self.live seen (since the last empty_cache)
        self.tick = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.lock = threading.Lock()

    def budget(self) -> int:
        """Most bytes (live + free) the cache lets exist: the largest live set seen, times :data:`WORKLOAD_FACTOR`."""
        return int(WORKLOAD_FACTOR * self.peak)

    def take(self, size: int) -> np.ndarray:
        with self.lock:
            self.live += size
            if self.live > self.peak:
                self.peak = self.live
            stack = self.free.get(size)
            if stack:
                self.held -= size
                self.hits += 1
                buf = stack.pop()[1]
                if not stack:
                    del self.free[size]
                return buf
            self.misses += 1
            # a new buffer is about to exist: drop the oldest free ones so live + free stays within the budget
            self._evict_to(self.budget() - self.live)
        if size < _ALIGN:  # small class: 64-byte aligned is enough
            raw = np.empty(size + 64, dtype=np.uint8)
            start = (-raw.ctypes.data) % 64
            return raw[start : start + size]
        return _fresh_large(size)

    def give(self, buf: np.ndarray) -> None:
        size = buf.nbytes
        with self.lock:
            self.live -= size
            if self.held + size <= min(self.limit, self.budget() - self.live):
                self.tick += 1
                self.free.setdefault(size, []).append((self.tick, buf))
                self.held += size

    def _evict_to(self, room: int) -> None:
        """Release the least recently returned free buffers until at most ``room`` bytes are held (lock held)."""
        while self.held > max(room, 0) and self.free:
            size = min(self.free, key=lambda k: self.free[k][0][0])
            stack = self.free[size]
            stack.pop(0)
            if not stack:
                del self.free[size]
            self.held -= size
            self.evictions += 1

    def clear(self) -> int:
        with self.lock:
            freed, self.free, self.held = self.held, {}, 0
            self.peak = self.live
        return freed


_CACHE = _Cache(_limit_from_env())


def empty_cache() -> int:
    """Release every cached free buffer and restart the peak from the current live set; return the bytes released.

    Buffers in use are untouched. Call it after a phase with larger batches than what follows (the
    budget follows the largest live set seen, so it would otherwise keep room for them).
    """
    return _CACHE.clear()


def cache_info() -> dict[str, int]:
    """Counters of the output-buffer cache.

    ``hits``/``misses`` (outputs served from a free buffer or freshly allocated), ``evictions`` (free
    buffers released to stay within the budget), ``held_bytes`` (free buffers kept), ``live_bytes``
    (buffers of outputs still alive), ``peak_live_bytes`` (largest live set since the last
    :func:`empty_cache`), ``budget_bytes`` (most live + free bytes allowed: ``WORKLOAD_FACTOR`` x peak)
    and ``limit_bytes`` (``BATCHNORM_BUFFER_CACHE`` / :func:`set_limit`: a cap on ``held_bytes``).
    """
    with _CACHE.lock:
        return {
            "hits": _CACHE.hits, "misses": _CACHE.misses, "evictions": _CACHE.evictions, "held_bytes": _CACHE.held,
            "live_bytes": _CACHE.live, "peak_live_bytes": _CACHE.peak, "budget_bytes": _CACHE.budget(),
            "limit_bytes": _CACHE.limit,
        }


def set_limit(nbytes: int) -> None:
    """Cap the bytes of free buffers kept (0 disables caching); excess free buffers are released now."""
    if nbytes < 0:
        raise ValueError(f"set_limit expected a byte count >= 0, got {nbytes}. Pass 0 to disable the cache.")
    with _CACHE.lock:
        _CACHE.limit = int(nbytes)
        _CACHE._evict_to(_CACHE.limit)


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
