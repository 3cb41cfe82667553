"""Plans and views: how any dense tensor becomes the canonical array the numba loops take.

A tensor whose memory is dense (contiguous in *some* dimension order) is viewed as ``(A, C, B)``:
``A`` = product of the dims physically before the feature axis, ``C`` the features, ``B`` = product
of the dims physically after it. NCHW contiguous is ``(N, C, H·W)``; channels-last NCHW, ``(N, L, C)``
with ``axis=-1`` and dense ``(N, C)`` have ``B == 1`` and are passed as 2-D ``(rows, C)`` arrays.
Masks are a ``(A, B)`` uint8 view; ghost groups are ``rows_per_group`` consecutive ``A`` rows.
Outputs are new tensors in the input's memory order (never views, so in-place consumers work);
outputs of at least :data:`batchnorm.kernels.buffers.MIN_BYTES` come from the output-buffer cache.
A plan is cached per (shape, strides, axis, group size, threads, itemsize).

Shape: see each function. Reference: the strided-view idea of NumPy's ``as_strided``.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch
from numba.np.ufunc import parallel as _parallel

from .. import buffers

SUPPORTED_DTYPES = (torch.float32, torch.float64)


class _Plan:
    """How a tensor of one shape/stride/axis/grouping is cut for the kernels (cached per signature)."""

    __slots__ = ("perm", "identity", "axis", "A", "C", "B", "shape", "phys", "rpg", "G", "seg", "seg_group", "nbytes",
                 "inverse", "lshape", "lstrides")


def _perm_of(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[int] | None:
    """A dimension order in which memory of (shape, strides) is contiguous (identity if it already is), or None."""
    def dense(order):
        expect = 1
        for d in reversed(order):
            if shape[d] != 1 and strides[d] != expect:
                return False
            expect *= shape[d]
        return True

    ident = list(range(len(shape)))
    if dense(ident):
        return ident
    # order dims by stride, largest first (size-1 dims may sit anywhere: contiguity ignores them)
    perm = sorted(ident, key=lambda d: (-strides[d], d))
    return perm if dense(perm) else None


@functools.lru_cache(maxsize=1024)
def _plan_for(shape, strides, axis, group_size, threads, itemsize) -> _Plan | None:
    perm = _perm_of(shape, strides)
    if perm is None:
        return None
    ax = perm.index(axis)
    phys = tuple(shape[d] for d in perm)
    A = math.prod(phys[:ax])
    B = math.prod(phys[ax + 1 :])
    rows = 1
    if group_size is not None:
        if axis == 0 or perm[0] != 0 or ax == 0:
            return None  # ghost groups need axis 0 outermost in memory
        rows = A // shape[0]
    p = _Plan()
    p.perm, p.identity, p.axis, p.A, p.C, p.B, p.phys = perm, perm == list(range(len(shape))), ax, A, shape[axis], B, phys
    p.shape = (A, p.C) if B == 1 else (A, p.C, B)  # the array's rank selects the loop strategy
    p.rpg = A if group_size is None else rows * group_size
    p.G = -(-A // p.rpg)
    p.seg, p.seg_group = _segments(A, p.C, B, p.rpg, p.G, threads)
    p.nbytes = A * p.C * B * itemsize
    p.inverse = [perm.index(d) for d in range(len(perm))]
    p.lshape = tuple(shape)
    lstrides, acc = [0] * len(shape), 1
    for d in reversed(perm):  # x's own strides, without gaps: outputs get x's memory order
        lstrides[d] = acc
        acc *= shape[d]
    p.lstrides = tuple(lstrides)
    return p


def _threads() -> int:
    """numba's current thread count (the public getter takes two locks per call; this is called per kernel call)."""
    if _parallel._is_initialized:
        return _parallel._get_num_threads()
    return numba.get_num_threads()


def _plan(x: torch.Tensor, axis: int, group_size: int | None) -> _Plan | None:
    if x.device.type != "cpu" or x.dtype not in SUPPORTED_DTYPES or x.numel() == 0:
        return None
    return _plan_for(tuple(x.shape), x.stride(), axis, group_size, _threads(), x.element_size())


_dense = functools.lru_cache(maxsize=1024)(lambda shape, strides: _perm_of(shape, strides) is not None)


def supports(x: torch.Tensor) -> bool:
    """True when the numba kernels can take ``x`` at all (CPU, float32/float64, dense memory)."""
    if x.device.type != "cpu" or x.dtype not in SUPPORTED_DTYPES or x.numel() == 0:
        return False
    if torch.compiler.is_compiling():  # traced: no cache wrapper in the graph
        return _perm_of(tuple(x.shape), x.stride()) is not None
    return _dense(tuple(x.shape), x.stride())


def _segments(A: int, C: int, B: int, rpg: int, G: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the rows (per group) and, when rows are few, the features, into parallel work units."""
    want = max(1, -(-4 * threads // G))
    segs, groups = [], []
    for g in range(G):
        a0, a1 = g * rpg, min(A, (g + 1) * rpg)
        pa = max(1, min(a1 - a0, want))
        # B == 1 kernels loop over all features of a row (vectorized); B > 1 may also split features
        pc = 1 if B == 1 else max(1, min(C, -(-want // pa)))
        for i in range(pa):
            r0, r1 = a0 + (a1 - a0) * i // pa, a0 + (a1 - a0) * (i + 1) // pa
            for j in range(pc):
                segs.append((r0, r1, C * j // pc, C * (j + 1) // pc))
                groups.append(g)
    return np.asarray(segs, dtype=np.int64).reshape(-1, 4), np.asarray(groups, dtype=np.int64)


def _arr(t: torch.Tensor, p: _Plan) -> np.ndarray:
    """``t`` (x-shaped: x itself, dy, y) as the canonical C-contiguous array (``(A, C)`` or ``(A, C, B)``).

    Copies only if its layout differs from x's. Always C-contiguous, so the kernels see one array type
    per dtype and rank: a ``dy`` with zero strides (``y.sum().backward()`` expands a scalar) or another
    non-dense view would otherwise be a new numba signature, compiled on its first call in the caller's
    thread, after the warm-up (seconds).
    """
    a = t.detach().numpy()
    if not p.identity:
        a = a.transpose(p.perm)
    a = a.reshape(p.shape)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _out(p: _Plan, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A new x-shaped output in x's memory order, and its canonical array (large ones from the buffer cache).

    The tensor is never a view (no ``permute`` of a physical-order tensor): outputs of an autograd
    Function that are views cannot be modified in place (``ReLU(inplace=True)``, ``out += identity``).
    """
    if p.nbytes < buffers.MIN_BYTES:  # small: a plain tensor (the allocator recycles these cheaply)
        if p.identity:
            t = torch.empty(p.phys, dtype=dtype)
            return t, t.numpy().reshape(p.shape)
        t = torch.empty_strided(p.lshape, p.lstrides, dtype=dtype)
        return t, t.numpy().transpose(p.perm).reshape(p.shape)
    t, phys = buffers.empty(p.phys, p.perm, dtype)
    if t._base is not None:  # a permuted view of the buffer: the same memory as a tensor of its own
        t = torch.empty(0, dtype=dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    return t, phys.reshape(p.shape)


_NO_MASK = np.zeros((1, 1), dtype=np.uint8)


def _mask(m: torch.Tensor | None, p: _Plan) -> np.ndarray:
    if m is None:
        return _NO_MASK
    mp = m.permute(p.perm).squeeze(p.axis)
    return mp.contiguous().reshape(p.A, p.B).view(torch.uint8).numpy()


@functools.lru_cache(maxsize=64)
def _filled(C: int, fill: float) -> np.ndarray:
    return np.full(C, fill)


def _vec(v: torch.Tensor | None, C: int, fill: float) -> np.ndarray:
    """A per-feature parameter as a ``(C,)`` array (its own memory, no copy), or ``fill`` when None."""
    if v is None:
        return _filled(C, fill)
    v = v.detach()
    return (v if v.dtype in SUPPORTED_DTYPES else v.double()).numpy()


def _per_group(v, p: _Plan, dtype) -> np.ndarray:
    """A per-feature quantity (torch or NumPy ``(1, C)``, ``(G, C)``, ``(C,)``, scalar) as contiguous ``(G, C)``."""
    a = np.asarray(v.detach().numpy() if isinstance(v, torch.Tensor) else v, dtype=dtype)
    if a.shape != (p.G, p.C):
        a = np.broadcast_to(a.reshape(1, -1) if a.ndim == 1 else a, (p.G, p.C))
    return np.ascontiguousarray(a)


_NP = {torch.float32: np.float32, torch.float64: np.float64}
