"""numba CPU kernels for *reduce* and *apply*, forward and backward (same signatures as torch_ops).

Canonical view: a tensor whose memory is dense (contiguous in *some* dimension order) is viewed as
``(A, C, B)``: ``A`` = product of the dims physically before the feature axis, ``C`` the features,
``B`` = product of the dims physically after it. NCHW contiguous is ``(N, C, H·W)``; channels-last
NCHW, ``(N, L, C)`` with ``axis=-1`` and dense ``(N, C)`` are ``(rows, C, 1)``. Two loop strategies:

* ``B > 1`` (feature axis not innermost): each ``(a, c)`` row of ``B`` contiguous values is one
  unit of work; a row's statistics are computed exactly in float64 (two passes while the row is
  in cache) and Chan-merged into the running per-feature result.
* ``B == 1`` (feature axis innermost): blocks of a few rows are reduced with vectorizable loops
  over ``C`` (two passes per block, in cache), then Chan-merged per feature.

Parallelism: the ``A`` rows (and, when there are fewer rows than threads, the features) are cut
into *segments*; each segment writes its own partial ``(count, mean, m2)`` or backward sums, and
the partials are merged serially at the end (Chan, Golub & LeVeque 1979). Accumulation is always
float64; outputs are in the statistics dtype of torch_ops (float32 for float32 input, float64 for
float64). Masks are a ``(A, B)`` uint8 view; ghost groups are ``rows_per_group`` consecutive ``A``
rows (``group_size`` samples of axis 0 times the ``A`` rows each sample spans).

Anything the view does not cover (odd strides, a ghost split when axis 0 is not the outermost
dimension in memory, other devices and dtypes) is delegated to :mod:`batchnorm.kernels.torch_ops`.
Compiled code is cached on disk by numba (``cache=True``: next to this module in ``__pycache__``, or
wherever ``NUMBA_CACHE_DIR`` points).
"""

from __future__ import annotations

import math
import sys

import numba
import numpy as np
import torch
from numba import njit, prange

from . import torch_ops as _t

# Activation codes shared with torch_ops.ACTIVATIONS (index = code).
ACTIVATIONS = _t.ACTIVATIONS
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327

SUPPORTED_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# elementwise activation helpers (code is loop-invariant; kept scalar so LLVM can unswitch)
# --------------------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def _act(z, code, slope):
    if code == 0:
        return z
    if code == 1:
        return z if z > 0 else z * 0
    if code == 2:
        return z if z > 0 else z * slope
    if code == 3:
        return z / (1 + math.exp(-z))
    if code == 4:
        return 0.5 * z * (1 + math.erf(z * _SQRT1_2))
    if code == 5:
        return 1 / (1 + math.exp(-z))
    return math.tanh(z)


@njit(inline="always", cache=True)
def _dact(z, code, slope):
    """d act / dz at z."""
    if code == 0:
        return 1.0
    if code == 1:
        return 1.0 if z > 0 else 0.0
    if code == 2:
        return 1.0 if z > 0 else slope
    if code == 3:
        s = 1 / (1 + math.exp(-z))
        return s * (1 + z * (1 - s))
    if code == 4:
        return 0.5 * (1 + math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * math.exp(-0.5 * z * z)
    if code == 5:
        s = 1 / (1 + math.exp(-z))
        return s * (1 - s)
    th = math.tanh(z)
    return 1 - th * th


@njit(inline="always", cache=True)
def _dz_xhat(dyv, tv, p, q, kz, bz, code, slope, inv):
    """(dz, x̂) at one position: dz = dy · act'(z), z = x̂ · kz + bz.

    ``inv=False``: ``tv`` is the input and ``x̂ = (tv − p) · q``. ``inv=True`` (memory-saving mode,
    invertible activations only): ``tv`` is the output ``y``, ``z = act⁻¹(y)``, ``x̂ = (z − p) · q``.
    """
    if inv:
        if code == 2 and not tv > 0:
            return dyv * slope, (tv / slope - p) * q
        return dyv, (tv - p) * q
    xh = (tv - p) * q
    if code == 0:
        return dyv, xh
    return dyv * _dact(xh * kz + bz, code, slope), xh


# --------------------------------------------------------------------------------------------
# reduce
# --------------------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def _merge_into(acc, s, c, n, mu, m2):
    """Chan merge of (n, mu, m2) into acc[s, c, 0:3] = (count, mean, m2)."""
    if n == 0:
        return
    na = acc[s, c, 0]
    if na == 0:
        acc[s, c, 0] = n
        acc[s, c, 1] = mu
        acc[s, c, 2] = m2
        return
    tot = na + n
    d = mu - acc[s, c, 1]
    acc[s, c, 1] += d * (n / tot)
    acc[s, c, 2] += m2 + d * d * (na * n / tot)
    acc[s, c, 0] = tot


# Reductions may reorder their float64 sums ("reassoc") so LLVM vectorizes them; nothing else is relaxed.
_REASSOC = {"reassoc"}


@njit(parallel=True, cache=True, fastmath=_REASSOC)
def _reduce_rows(x, m, has_mask, seg, acc):
    """B > 1: per (a, c) row exact stats, merged per segment. seg[s] = (a0, a1, c0, c1)."""
    B = x.shape[2]
    for s in prange(seg.shape[0]):
        for a in range(seg[s, 0], seg[s, 1]):
            for c in range(seg[s, 2], seg[s, 3]):
                tot = 0.0
                n = 0.0
                if has_mask:
                    for b in range(B):
                        if m[a, b]:
                            tot += x[a, c, b]
                            n += 1.0
                else:
                    for b in range(B):
                        tot += x[a, c, b]
                    n = float(B)
                if n == 0:
                    continue
                mu = tot / n
                m2 = 0.0
                if has_mask:
                    for b in range(B):
                        if m[a, b]:
                            d = x[a, c, b] - mu
                            m2 += d * d
                else:
                    for b in range(B):
                        d = x[a, c, b] - mu
                        m2 += d * d
                _merge_into(acc, s, c, n, mu, m2)


@njit(parallel=True, cache=True, fastmath=_REASSOC)
def _reduce_cols(x, m, has_mask, seg, acc, block):
    """B == 1 (x is (A, C)): blocks of rows reduced with loops over contiguous features, merged per segment.

    Segments cover whole rows (all C features), so the count is one scalar per block (the mask is per row).
    """
    C = x.shape[1]
    for s in prange(seg.shape[0]):
        a0, a1 = seg[s, 0], seg[s, 1]
        tot = np.zeros(C)
        sq = np.zeros(C)
        mean = np.zeros(C)
        m2 = np.zeros(C)
        n_acc = 0.0
        for r0 in range(a0, a1, block):
            r1 = min(r0 + block, a1)
            n = 0.0
            for c in range(C):
                tot[c] = 0.0
                sq[c] = 0.0
            for a in range(r0, r1):
                if has_mask and not m[a, 0]:
                    continue
                n += 1.0
                for c in range(C):
                    tot[c] += x[a, c]
            if n == 0:
                continue
            inv_n = 1.0 / n
            for c in range(C):
                tot[c] *= inv_n
            for a in range(r0, r1):
                if has_mask and not m[a, 0]:
                    continue
                for c in range(C):
                    d = x[a, c] - tot[c]
                    sq[c] += d * d
            # Chan merge of the block (n, tot, sq) into the segment (n_acc, mean, m2), vectorized over C
            new_n = n_acc + n
            f = n / new_n
            g = n_acc * n / new_n
            for c in range(C):
                d = tot[c] - mean[c]
                mean[c] += d * f
                m2[c] += sq[c] + d * d * g
            n_acc = new_n
        for c in range(C):
            acc[s, c, 0] = n_acc
            acc[s, c, 1] = mean[c]
            acc[s, c, 2] = m2[c]


@njit(cache=True)
def _merge_segments(acc, seg_group, G):
    S, C = acc.shape[0], acc.shape[1]
    out = np.zeros((G, C, 3))
    for s in range(S):  # merge every segment's partial into its group
        g = seg_group[s]
        for c in range(C):
            _merge_into(out, g, c, acc[s, c, 0], acc[s, c, 1], acc[s, c, 2])
    return out


# --------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _apply_rows(x, y, scale, shift, rpg, code, slope):
    """B > 1: y[a, c, :] = act(x[a, c, :] · scale[g, c] + shift[g, c])."""
    A, C, B = x.shape
    for r in prange(A * C):
        a = r // C
        c = r - a * C
        g = a // rpg
        sc = scale[g, c]
        sh = shift[g, c]
        if code == 0:
            for b in range(B):
                y[a, c, b] = x[a, c, b] * sc + sh
        elif code == 1:
            for b in range(B):
                z = x[a, c, b] * sc + sh
                y[a, c, b] = z if z > 0 else z * 0
        else:
            for b in range(B):
                y[a, c, b] = _act(x[a, c, b] * sc + sh, code, slope)


@njit(parallel=True, cache=True)
def _apply_cols(x, y, scale, shift, rpg, code, slope):
    """B == 1 (x, y are (A, C)): y[a, :] = act(x[a, :] · scale[g, :] + shift[g, :])."""
    A, C = x.shape
    for a in prange(A):
        g = a // rpg
        if code == 0:
            for c in range(C):
                y[a, c] = x[a, c] * scale[g, c] + shift[g, c]
        elif code == 1:
            for c in range(C):
                z = x[a, c] * scale[g, c] + shift[g, c]
                y[a, c] = max(z, z * 0)
        else:
            for c in range(C):
                y[a, c] = _act(x[a, c] * scale[g, c] + shift[g, c], code, slope)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=_REASSOC)
def _bwd_reduce(dy, t, p, q, kz, bz, seg, rpg, code, slope, inv, acc):
    """acc[s, c] += (Σ dz, Σ dz · x̂) over segment s (all positions, masked ones included)."""
    B = t.shape[2]
    for s in prange(seg.shape[0]):
        for a in range(seg[s, 0], seg[s, 1]):
            g = a // rpg
            for c in range(seg[s, 2], seg[s, 3]):
                pc, qc, kc, bc = p[g, c], q[g, c], kz[g, c], bz[g, c]
                s1 = 0.0
                s2 = 0.0
                if code == 0 and not inv:
                    for b in range(B):
                        d = dy[a, c, b]
                        s1 += d
                        s2 += d * ((t[a, c, b] - pc) * qc)
                elif code == 1 and not inv:
                    for b in range(B):
                        xh = (t[a, c, b] - pc) * qc
                        d = dy[a, c, b] if xh * kc + bc > 0 else 0.0
                        s1 += d
                        s2 += d * xh
                else:
                    for b in range(B):
                        dz, xh = _dz_xhat(dy[a, c, b], t[a, c, b], pc, qc, kc, bc, code, slope, inv)
                        s1 += dz
                        s2 += dz * xh
                acc[s, c, 0] += s1
                acc[s, c, 1] += s2


@njit(parallel=True, cache=True, fastmath=_REASSOC)
def _bwd_reduce_cols(dy, t, p, q, kz, bz, seg, rpg, code, slope, inv, acc):
    """B == 1 variant of :func:`_bwd_reduce` ((A, C) arrays, whole-row segments, loops over features)."""
    C = t.shape[1]
    for s in prange(seg.shape[0]):
        s1 = np.zeros(C)
        s2 = np.zeros(C)
        for a in range(seg[s, 0], seg[s, 1]):
            g = a // rpg
            if code == 0 and not inv:
                for c in range(C):
                    d = dy[a, c]
                    s1[c] += d
                    s2[c] += d * ((t[a, c] - p[g, c]) * q[g, c])
            elif code == 1 and not inv:
                for c in range(C):
                    xh = (t[a, c] - p[g, c]) * q[g, c]
                    d = dy[a, c] if xh * kz[g, c] + bz[g, c] > 0 else 0.0
                    s1[c] += d
                    s2[c] += d * xh
            else:
                for c in range(C):
                    dz, xh = _dz_xhat(dy[a, c], t[a, c], p[g, c], q[g, c], kz[g, c], bz[g, c], code, slope, inv)
                    s1[c] += dz
                    s2[c] += dz * xh
        for c in range(C):
            acc[s, c, 0] = s1[c]
            acc[s, c, 1] = s2[c]


@njit(parallel=True, cache=True)
def _bwd_apply_cols(dy, t, dx, p, q, kz, bz, k, mdz, mdzx, u, v, m, has_mask, rpg, code, slope, inv):
    """B == 1 variant of :func:`_bwd_apply` on (A, C) arrays."""
    A, C = t.shape
    for a in prange(A):
        g = a // rpg
        on = 1.0 if (not has_mask) or m[a, 0] != 0 else 0.0
        if code == 0 and not inv:
            for c in range(C):
                dx[a, c] = k[g, c] * dy[a, c] - on * (u[g, c] * t[a, c] + v[g, c])
        else:
            for c in range(C):
                dz, xh = _dz_xhat(dy[a, c], t[a, c], p[g, c], q[g, c], kz[g, c], bz[g, c], code, slope, inv)
                dx[a, c] = k[g, c] * (dz - on * (mdz[g, c] + xh * mdzx[g, c]))


@njit(parallel=True, cache=True)
def _bwd_apply(dy, t, dx, p, q, kz, bz, k, mdz, mdzx, u, v, m, has_mask, rpg, code, slope, inv):
    """B > 1: dx = k · (dz − m · (mean(dz) + x̂ · mean(dz · x̂))).

    Without activation this is ``dx = k·dy − m·(u·t + v)`` with per-feature ``u = k·mean(dz·x̂)·q`` and
    ``v = k·mean(dz) − u·p``: one multiply-add per element.
    """
    A, C, B = t.shape
    for r in prange(A * C):
        a = r // C
        c = r - a * C
        g = a // rpg
        pc, qc, kc, bc = p[g, c], q[g, c], kz[g, c], bz[g, c]
        kk, m1, m2, uc, vc = k[g, c], mdz[g, c], mdzx[g, c], u[g, c], v[g, c]
        if code == 0 and not inv and not has_mask:
            for b in range(B):
                dx[a, c, b] = kk * dy[a, c, b] - (uc * t[a, c, b] + vc)
        elif code == 0 and not inv:
            for b in range(B):
                on = 1.0 if m[a, b] != 0 else 0.0
                dx[a, c, b] = kk * dy[a, c, b] - on * (uc * t[a, c, b] + vc)
        elif code == 1 and not inv and not has_mask:
            for b in range(B):
                xh = (t[a, c, b] - pc) * qc
                d = dy[a, c, b] if xh * kc + bc > 0 else 0.0
                dx[a, c, b] = kk * (d - (m1 + xh * m2))
        else:
            for b in range(B):
                dz, xh = _dz_xhat(dy[a, c, b], t[a, c, b], pc, qc, kc, bc, code, slope, inv)
                on = 1.0 if (not has_mask) or m[a, b] != 0 else 0.0
                dx[a, c, b] = kk * (dz - on * (m1 + xh * m2))


# --------------------------------------------------------------------------------------------
# python side: canonical views, segments, fallbacks
# --------------------------------------------------------------------------------------------
class _View:
    __slots__ = ("perm", "axis", "A", "C", "B", "rows_per_sample")

    def __init__(self, perm, axis, A, C, B, rows_per_sample):
        self.perm, self.axis, self.A, self.C, self.B, self.rows_per_sample = perm, axis, A, C, B, rows_per_sample


def fork_unsafe() -> bool:
    """True once numba's thread pool runs on GNU OpenMP: a forked child must not use it."""
    try:
        return numba.threading_layer() == "omp"
    except ValueError:  # no parallel kernel launched yet
        return False


def supports(x: torch.Tensor) -> bool:
    """True when the numba kernels can take ``x`` at all (CPU, float32/float64, dense memory)."""
    return x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES and x.numel() > 0 and _perm(x) is not None


def _perm(x: torch.Tensor) -> list[int] | None:
    """A dimension order in which ``x`` is contiguous (identity when it already is), or None."""
    if x.is_contiguous():
        return list(range(x.dim()))
    # order dims by stride, largest first (size-1 dims may sit anywhere: contiguity ignores them)
    perm = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    if x.permute(perm).is_contiguous():
        return perm
    return None


def _view(x: torch.Tensor, axis: int, group_size: int | None) -> _View | None:
    if not supports(x):
        return None
    perm = _perm(x)
    ax = perm.index(axis)
    shape = [x.shape[d] for d in perm]
    A = math.prod(shape[:ax])
    B = math.prod(shape[ax + 1 :])
    rows = 1
    if group_size is not None:
        if axis == 0 or perm[0] != 0 or ax == 0:
            return None  # ghost groups need axis 0 outermost in memory
        rows = A // x.shape[0]
    return _View(perm, ax, A, x.shape[axis], B, rows)


def _shape(v: _View) -> tuple[int, ...]:
    return (v.A, v.C) if v.B == 1 else (v.A, v.C, v.B)


def _np(t: torch.Tensor, v: _View) -> np.ndarray:
    """The canonical array: (A, C, B), or (A, C) when B == 1 (feature axis innermost)."""
    return t.detach().permute(v.perm).reshape(_shape(v)).numpy()


def _like(t: torch.Tensor, x: torch.Tensor, v: _View) -> np.ndarray:
    """``t`` (x-shaped, e.g. dy) as a canonical array in x's memory order (copy only if it differs)."""
    tp = t.detach().permute(v.perm)
    if not tp.is_contiguous():
        tp = tp.contiguous()
    return tp.reshape(_shape(v)).numpy()


def _mask(m: torch.Tensor | None, x: torch.Tensor, axis: int, v: _View) -> np.ndarray:
    if m is None:
        return np.zeros((1, 1), dtype=np.uint8)
    mp = m.permute(v.perm).squeeze(v.axis)
    return mp.contiguous().reshape(v.A, v.B).view(torch.uint8).numpy()


def _rpg(v: _View, group_size: int | None) -> int:
    return v.A if group_size is None else v.rows_per_sample * group_size


def _segments(v: _View, group_size: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Cut the rows (per group) and, when rows are few, the features, into parallel work units."""
    threads = numba.get_num_threads()
    rpg = _rpg(v, group_size)
    G = -(-v.A // rpg)
    want = max(1, -(-4 * threads // G))
    segs, groups = [], []
    for g in range(G):
        a0, a1 = g * rpg, min(v.A, (g + 1) * rpg)
        pa = max(1, min(a1 - a0, want))
        # B == 1 kernels loop over all features of a row (vectorized); B > 1 may also split features
        pc = 1 if v.B == 1 else max(1, min(v.C, -(-want // pa)))
        for i in range(pa):
            r0, r1 = a0 + (a1 - a0) * i // pa, a0 + (a1 - a0) * (i + 1) // pa
            for j in range(pc):
                segs.append((r0, r1, v.C * j // pc, v.C * (j + 1) // pc))
                groups.append(g)
    return np.asarray(segs, dtype=np.int64).reshape(-1, 4), np.asarray(groups, dtype=np.int64), G


_HUGE = 4 << 20  # outputs at least this large get transparent-huge-page advice
_MADV_HUGEPAGE = 14


def _madvise():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        return None


_MADVISE = _madvise() if sys.platform.startswith("linux") else None


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` (same layout); large buffers are advised to use transparent huge pages.

    Fresh large allocations are fresh pages, and first-touch page faults can cost more than the
    kernel that writes them (4 KiB faults; about 1.5 ns per byte on the benchmark VM). ``madvise
    (MADV_HUGEPAGE)`` on the untouched buffer lets the kernel fault it in 2 MiB pages instead. It only
    concerns memory this module allocates for its own outputs; ``THP_MEM_ALLOC_ENABLE=1`` does the
    same for every PyTorch allocation.
    """
    y = torch.empty_like(x)
    nbytes = y.untyped_storage().nbytes()
    if _MADVISE is not None and nbytes >= _HUGE:
        page = 4096
        start = y.untyped_storage().data_ptr()
        lo = (start + page - 1) // page * page
        hi = (start + nbytes) // page * page
        if hi > lo:
            _MADVISE(lo, hi - lo, _MADV_HUGEPAGE)
    return y


def _per_group(v: torch.Tensor, G: int, C: int, dtype: torch.dtype) -> np.ndarray:
    """A per-feature quantity ((1, C), (G, C) or scalar-broadcastable) as a contiguous (G, C) array."""
    return v.detach().to(dtype).expand(G, C).contiguous().numpy()


def reduce(x: torch.Tensor, axis: int, m: torch.Tensor | None = None, group_size: int | None = None):
    """Per-feature ``(count, mean, m2)`` (each ``(G, C)``) as :func:`torch_ops.reduce`; float64 inside."""
    v = _view(x, axis, group_size)
    if v is None or x.requires_grad and torch.is_grad_enabled():
        return _t.reduce(x, axis, m, group_size)
    xa = _np(x, v)
    seg, seg_group, G = _segments(v, group_size)
    acc = np.zeros((seg.shape[0], v.C, 3))
    ma = _mask(m, x, axis, v)
    if v.B == 1:
        # blocks of rows that stay in L2 (256 KiB) between the two passes
        block = max(8, min(512, (1 << 18) // (v.C * x.element_size())))
        _reduce_cols(xa, ma, m is not None, seg, acc, block)
    else:
        _reduce_rows(xa, ma, m is not None, seg, acc)
    out = torch.from_numpy(_merge_segments(acc, seg_group, G)).to(_t.stat_dtype(x.dtype))
    return out[..., 0].contiguous(), out[..., 1].contiguous(), out[..., 2].contiguous()


def apply(x, axis, scale, shift, group_size=None, activation=None, negative_slope=0.01):
    """``y = act(x · scale + shift)`` per feature (and group), in x's dtype and memory format."""
    v = _view(x, axis, group_size)
    code = _t.activation_code(activation)
    if v is None or torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        return _t.apply(x, axis, scale, shift, group_size, activation, negative_slope)
    G = -(-v.A // _rpg(v, group_size))
    y = empty_like(x)
    if not y.permute(v.perm).is_contiguous():
        y = x.detach().clone()  # preserve x's layout exactly (empty_like may differ for odd size-1 strides)
    ya = _np(y, v)
    sc = _per_group(scale, G, v.C, x.dtype)
    sh = _per_group(shift, G, v.C, x.dtype)
    fn = _apply_cols if v.B == 1 else _apply_rows
    fn(_np(x, v), ya, sc, sh, _rpg(v, group_size), code, float(negative_slope))
    return y


def _bwd_args(dy, t, axis, p, q, group_size, zscale, zshift):
    v = _view(t, axis, group_size)
    if v is None:
        return None
    G = -(-v.A // _rpg(v, group_size))
    sd = _t.stat_dtype(t.dtype)
    one = torch.ones((1, v.C), dtype=sd)
    pa, qa = _per_group(p, G, v.C, t.dtype), _per_group(q, G, v.C, t.dtype)
    kz = _per_group(zscale if zscale is not None else one, G, v.C, t.dtype)
    bz = _per_group(zshift if zshift is not None else one * 0, G, v.C, t.dtype)
    return v, G, _like(dy.to(t.dtype), t, v), _np(t, v), pa, qa, kz, bz


def backward_reduce(dy, x, axis, mean, invstd, group_size, activation=None, negative_slope=0.01,
                    zscale=None, zshift=None, from_output=False):
    """``(Σ dz, Σ dz · x̂)`` per feature, as :func:`torch_ops.backward_reduce` (float64 sums)."""
    args = _bwd_args(dy, x, axis, mean, invstd, group_size, zscale, zshift)
    if args is None:
        return _t.backward_reduce(dy, x, axis, mean, invstd, group_size, activation, negative_slope,
                                  zscale, zshift, from_output)
    v, G, dya, ta, pa, qa, kz, bz = args
    seg, seg_group, _ = _segments(v, group_size)
    acc = np.zeros((seg.shape[0], v.C, 2))
    fn = _bwd_reduce_cols if v.B == 1 else _bwd_reduce
    fn(dya, ta, pa, qa, kz, bz, seg, _rpg(v, group_size), _t.activation_code(activation),
       float(negative_slope), bool(from_output), acc)
    if G == 1:
        sums = acc.sum(0)[None]
    else:
        sums = np.zeros((G, v.C, 2))
        np.add.at(sums, seg_group, acc)
    out = torch.from_numpy(sums).to(mean.dtype)
    return out[..., 0].contiguous(), out[..., 1].contiguous()


def backward_apply(dy, x, axis, mean, invstd, k, mean_dy, mean_dy_xhat, m, group_size, activation=None,
                   negative_slope=0.01, zscale=None, zshift=None, from_output=False):
    """``dx = k · (dz − m · (mean(dz) + x̂ · mean(dz · x̂)))`` as :func:`torch_ops.backward_apply`."""
    args = _bwd_args(dy, x, axis, mean, invstd, group_size, zscale, zshift)
    if args is None:
        return _t.backward_apply(dy, x, axis, mean, invstd, k, mean_dy, mean_dy_xhat, m, group_size, activation,
                                 negative_slope, zscale, zshift, from_output)
    v, G, dya, ta, pa, qa, kz, bz = args
    dx = empty_like(x)
    if not dx.permute(v.perm).is_contiguous():
        dx = x.detach().clone()
    C, sd = v.C, mean.dtype
    kk = k.to(sd).expand(G, C)
    u = kk * mean_dy_xhat.to(sd).expand(G, C) * invstd.to(sd).expand(G, C)
    w = kk * mean_dy.to(sd).expand(G, C) - u * mean.to(sd).expand(G, C)
    fn = _bwd_apply_cols if v.B == 1 else _bwd_apply
    fn(dya, ta, _np(dx, v), pa, qa, kz, bz, _per_group(k, G, C, x.dtype), _per_group(mean_dy, G, C, x.dtype),
       _per_group(mean_dy_xhat, G, C, x.dtype), _per_group(u, G, C, x.dtype), _per_group(w, G, C, x.dtype),
       _mask(m, x, axis, v), m is not None, _rpg(v, group_size), _t.activation_code(activation),
       float(negative_slope), bool(from_output))
    return dx
