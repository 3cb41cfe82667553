"""numba CPU kernels for *reduce* and *apply*, forward and backward (same signatures as torch_ops).

Canonical view: a tensor whose memory is dense (contiguous in *some* dimension order) is viewed as
``(A, C, B)``: ``A`` = product of the dims physically before the feature axis, ``C`` the features,
``B`` = product of the dims physically after it. NCHW contiguous is ``(N, C, H·W)``; channels-last
NCHW, ``(N, L, C)`` with ``axis=-1`` and dense ``(N, C)`` have ``B == 1`` and are passed as 2-D
``(rows, C)`` arrays, the others as 3-D ``(A, C, B)``; the rank selects the loop strategy when numba
types a call, so only the strategies a program uses get compiled. Two loop strategies:

* ``B > 1`` (feature axis not innermost): per segment and feature, one pass over the ``(a, c)``
  rows of ``B`` contiguous values accumulating shifted float64 sums (see :func:`_reduce_rows`).
* ``B == 1`` (feature axis innermost): the same sums vectorized over the contiguous features
  (see :func:`_reduce_cols`).

Parallelism: the ``A`` rows (and, when there are fewer rows than threads, the features) are cut
into *segments*; each segment writes its own partial ``(count, mean, m2)`` or backward sums, and
the partials are merged serially at the end (Chan, Golub & LeVeque 1979). Accumulation is always
float64 and per-feature constants of the apply steps are float64; outputs are in the input's dtype
and statistics in the statistics dtype of torch_ops (float32 for float32 input, float64 for
float64). Masks are a ``(A, B)`` uint8 view; ghost groups are ``rows_per_group`` consecutive ``A``
rows (``group_size`` samples of axis 0 times the ``A`` rows each sample spans).

Besides the four step functions, :func:`train_forward` and :func:`train_backward` run plain batch
norm's whole forward (with the running update) or backward as one kernel call each: on small and
mid-size tensors the glue between three separate steps cost more than the loops.

Anything the view does not cover (odd strides, a ghost split when axis 0 is not the outermost
dimension in memory, other devices and dtypes) is delegated to :mod:`batchnorm.kernels.torch_ops`.
Compiled code is cached on disk by numba (``cache=True``: next to this module in ``__pycache__``, or
wherever ``NUMBA_CACHE_DIR`` points). Outputs of at least :data:`buffers.MIN_BYTES` come from the
output-buffer cache of :mod:`batchnorm.kernels.buffers`.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.extending import overload
from numba.np.ufunc import parallel as _parallel

from .. import activations as _activations
from . import buffers
from . import torch_ops as _t

# Activation codes: batchnorm.activations.TABLE[name].code (the branches of _act/_dact below).
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
    if code == 6:
        return math.tanh(z)
    # 7: relu6 = hardtanh(0, 6); NaN falls through both tests and stays NaN, as in torch
    if z > 6:
        return z * 0 + 6
    return z if not z < 0 else z * 0


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
    if code == 6:
        th = math.tanh(z)
        return 1 - th * th
    return 1.0 if 0 < z < 6 else 0.0  # 7: relu6 (hardtanh(0, 6): zero at both kinks, as torch)


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
    """B > 1: per segment (rows a0..a1, features c0..c1) and feature, one pass of shifted float64 sums.

    ``S1 = Σ (x − K)``, ``S2 = Σ (x − K)²`` with ``K`` the feature's first counted value in the segment,
    so ``m2 = S2 − S1²/n`` has no E[x²] − E[x]² cancellation (see :func:`_reduce_cols`); writes
    ``acc[s, c] = (count, mean, m2)`` (left at zero when nothing in the segment counts).
    """
    B = x.shape[2]
    for s in prange(seg.shape[0]):
        a0, a1, c0, c1 = seg[s, 0], seg[s, 1], seg[s, 2], seg[s, 3]
        for c in range(c0, c1):
            K = 0.0
            found = not has_mask
            if found:
                K = x[a0, c, 0]
            else:
                for a in range(a0, a1):
                    for b in range(B):
                        if m[a, b]:
                            K = x[a, c, b]
                            found = True
                            break
                    if found:
                        break
            if not found:
                continue
            s1 = 0.0
            s2 = 0.0
            n = 0.0
            for a in range(a0, a1):
                if has_mask:
                    for b in range(B):
                        on = m[a, b] != 0
                        d = x[a, c, b] - K if on else 0.0
                        s1 += d
                        s2 += d * d
                        n += 1.0 if on else 0.0
                else:
                    for b in range(B):
                        d = x[a, c, b] - K
                        s1 += d
                        s2 += d * d
                    n += B
            acc[s, c, 0] = n
            acc[s, c, 1] = K + s1 / n
            acc[s, c, 2] = s2 - s1 * s1 / n


@njit(parallel=True, cache=True, fastmath=_REASSOC)
def _reduce_cols(x, m, has_mask, seg, acc):
    """B == 1 (x is (A, C)): one pass per segment of rows, with loops over contiguous features.

    Each segment accumulates shifted sums ``S1 = Σ (x − K)`` and ``S2 = Σ (x − K)²`` in float64, where
    ``K`` is the segment's first counted row: the shift removes the offset, so ``m2 = S2 − S1²/n``
    loses only ``ε₆₄ · (mean − K)² / var`` (no E[x²] − E[x]² cancellation). Writes the segment's
    ``(count, mean, m2)`` to ``acc[s, 0:3, :]`` (the count is per row: masks have no feature axis).
    """
    C = x.shape[1]
    for s in prange(seg.shape[0]):
        a0, a1 = seg[s, 0], seg[s, 1]
        k0 = a0
        if has_mask:
            while k0 < a1 and not m[k0, 0]:
                k0 += 1
        if k0 == a1:
            for c in range(C):
                acc[s, 0, c] = 0.0
                acc[s, 1, c] = 0.0
                acc[s, 2, c] = 0.0
            continue
        K = np.empty(C)
        s1 = np.zeros(C)
        s2 = np.zeros(C)
        for c in range(C):
            K[c] = x[k0, c]
        n = 0.0
        for a in range(k0, a1):
            if has_mask and not m[a, 0]:
                continue
            n += 1.0
            for c in range(C):
                d = x[a, c] - K[c]
                s1[c] += d
                s2[c] += d * d
        inv_n = 1.0 / n
        for c in range(C):
            acc[s, 0, c] = n
            acc[s, 1, c] = K[c] + s1[c] * inv_n
            acc[s, 2, c] = s2[c] - s1[c] * s1[c] * inv_n


@njit(cache=True)
def _merge_cols(acc, seg_group, G):
    """Chan merge of the ``(S, 3, C)`` segment partials of :func:`_reduce_cols` into ``(G, C, 3)``."""
    S, C = acc.shape[0], acc.shape[2]
    n = np.zeros(G)
    mean = np.zeros((G, C))
    m2 = np.zeros((G, C))
    for s in range(S):
        g = seg_group[s]
        nb = acc[s, 0, 0]
        if nb == 0:
            continue
        tot = n[g] + nb
        f = nb / tot
        h = n[g] * nb / tot
        for c in range(C):
            d = acc[s, 1, c] - mean[g, c]
            mean[g, c] += d * f
            m2[g, c] += acc[s, 2, c] + d * d * h
        n[g] = tot
    out = np.empty((G, C, 3))
    for g in range(G):
        for c in range(C):
            out[g, c, 0] = n[g]
            out[g, c, 1] = mean[g, c]
            out[g, c, 2] = m2[g, c]
    return out


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
    A, C = x.shape[0], x.shape[1]
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
        a0, a1 = seg[s, 0], seg[s, 1]
        g = a0 // rpg  # segments never straddle groups
        if code == 0 and not inv:
            for a in range(a0, a1):
                for c in range(C):
                    d = dy[a, c]
                    s1[c] += d
                    s2[c] += d * (t[a, c] - p[g, c])
            for c in range(C):
                s2[c] *= q[g, c]
        elif code == 1 and not inv:
            for a in range(a0, a1):
                for c in range(C):
                    xh = (t[a, c] - p[g, c]) * q[g, c]
                    d = dy[a, c] if xh * kz[g, c] + bz[g, c] > 0 else 0.0
                    s1[c] += d
                    s2[c] += d * xh
        else:
            for a in range(a0, a1):
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
    A, C = t.shape[0], t.shape[1]
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
# per-feature constants and the running update (tiny serial kernels: one call instead of ~20 torch ops)
# --------------------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def _clamped(wc, eps):
    """memory="save"'s γ rule: ``|γ| < eps`` is used as ``±eps`` (sign kept, sign(0) = +1)."""
    if abs(wc) < eps:
        return -eps if wc < 0 else eps
    return wc


@njit(cache=True)
def _constants(st, w, b, eps, clamp, out, inv, scale, shift):
    """Merged ``st[g, c] = (count, mean, m2)`` → ``out = (count, mean, var)``, ``inv`` and apply constants.

    ``var = m2 / max(count, 1)`` (biased), ``inv = invstd = 1 / sqrt(var + eps)``, ``scale = γ · invstd``,
    ``shift = β − mean · scale``. ``clamp`` (memory="save"): ``|γ| < eps`` is used as ``±eps``.
    """
    G, C = st.shape[0], st.shape[1]
    for g in range(G):
        for c in range(C):
            n = st[g, c, 0]
            mu = st[g, c, 1]
            var = st[g, c, 2] / max(n, 1.0)
            iv = 1.0 / math.sqrt(var + eps)
            wc = _clamped(w[c], eps) if clamp else w[c]
            sc = wc * iv
            out[0, g, c] = n
            out[1, g, c] = mu
            out[2, g, c] = var
            inv[g, c] = iv
            scale[g, c] = sc
            shift[g, c] = b[c] - mu * sc


@njit(cache=True)
def _bwd_constants(mean, invstd, w, b, eps, inv, p, q, kz, bz, k):
    """Per-(group, feature) constants of plain BN's backward: ``x̂ = (t − p) · q``, ``z = x̂ · kz + bz``, ``k = kz · invstd``.

    ``inv=False``: ``p, q = mean, invstd``. ``inv=True`` (memory="save", t is the output): γ is clamped
    to ``±eps`` as in the forward and ``p, q = β, 1 / γ``.
    """
    G, C = invstd.shape
    for g in range(G):
        for c in range(C):
            wc = _clamped(w[c], eps) if inv else w[c]
            kz[g, c] = wc
            bz[g, c] = b[c]
            k[g, c] = wc * invstd[g, c]
            if inv:
                p[g, c] = b[c]
                q[g, c] = 1.0 / wc
            else:
                p[g, c] = mean[g, c]
                q[g, c] = invstd[g, c]


@njit(cache=True)
def _update_running(count, mean, var, rm, rv, nbt, has_nbt, momentum, cumulative):
    """In-place running update from ``(G, C)`` batch statistics; returns whether they were finite.

    Same rule as :func:`batchnorm.functional.update_running`: ``μ_B = mean_g(mean)``,
    ``σ²_B = mean_g(var · n / max(n − 1, 1))``; ``num_batches_tracked += finite``; the buffers move by
    ``f = momentum`` (or ``1 / num_batches_tracked``) only when the batch is finite and every count is > 1.
    """
    G, C = mean.shape
    new_m = np.empty(C)
    new_v = np.empty(C)
    finite = True
    enough = True
    for c in range(C):
        sm = 0.0
        sv = 0.0
        for g in range(G):
            n = count[g, c]
            if not n > 1:
                enough = False
            sm += mean[g, c]
            sv += var[g, c] * n / max(n - 1.0, 1.0)
        new_m[c] = sm / G
        new_v[c] = sv / G
        if not (np.isfinite(new_m[c]) and np.isfinite(new_v[c])):
            finite = False
    if has_nbt and finite:
        nbt[0] += 1
    if cumulative:
        f = 1.0 / max(float(nbt[0]), 1.0)
    else:
        f = momentum
    if finite and enough:
        for c in range(C):
            rm[c] = rm[c] + f * (new_m[c] - rm[c])
            rv[c] = rv[c] + f * (new_v[c] - rv[c])
    return finite


# --------------------------------------------------------------------------------------------
# plain batch norm, one call per direction: reduce → statistics (→ running update) → apply
# --------------------------------------------------------------------------------------------
# The loop strategy is chosen when numba *types* a call, from the rank of the canonical array
# (2-D ``(A, C)``: features innermost; 3-D ``(A, C, B)``): only the strategy a program uses gets
# compiled, which halves the cold first call. The stubs below are never run as Python.
def _reduce_layout(x, m, has_mask, seg, seg_group, G):
    raise NotImplementedError("typed by numba only")


@overload(_reduce_layout)
def _reduce_layout_typed(x, m, has_mask, seg, seg_group, G):
    if x.ndim == 2:
        def cols(x, m, has_mask, seg, seg_group, G):
            acc = np.empty((seg.shape[0], 3, x.shape[1]))
            _reduce_cols(x, m, has_mask, seg, acc)
            return _merge_cols(acc, seg_group, G)

        return cols

    def rows(x, m, has_mask, seg, seg_group, G):
        acc = np.zeros((seg.shape[0], x.shape[1], 3))
        _reduce_rows(x, m, has_mask, seg, acc)
        return _merge_segments(acc, seg_group, G)

    return rows


def _apply_layout(x, y, scale, shift, rpg, code, slope):
    raise NotImplementedError("typed by numba only")


@overload(_apply_layout)
def _apply_layout_typed(x, y, scale, shift, rpg, code, slope):
    kernel = _apply_cols if x.ndim == 2 else _apply_rows
    return lambda x, y, scale, shift, rpg, code, slope: kernel(x, y, scale, shift, rpg, code, slope)


def _bwd_reduce_layout(dy, t, p, q, kz, bz, seg, rpg, code, slope, inv, acc):
    raise NotImplementedError("typed by numba only")


@overload(_bwd_reduce_layout)
def _bwd_reduce_layout_typed(dy, t, p, q, kz, bz, seg, rpg, code, slope, inv, acc):
    kernel = _bwd_reduce_cols if t.ndim == 2 else _bwd_reduce
    return lambda dy, t, p, q, kz, bz, seg, rpg, code, slope, inv, acc: kernel(
        dy, t, p, q, kz, bz, seg, rpg, code, slope, inv, acc)


def _bwd_apply_layout(dy, t, dx, p, q, kz, bz, k, mdz, mdzx, u, v, m, has_mask, rpg, code, slope, inv):
    raise NotImplementedError("typed by numba only")


@overload(_bwd_apply_layout)
def _bwd_apply_layout_typed(dy, t, dx, p, q, kz, bz, k, mdz, mdzx, u, v, m, has_mask, rpg, code, slope, inv):
    kernel = _bwd_apply_cols if t.ndim == 2 else _bwd_apply
    return lambda dy, t, dx, p, q, kz, bz, k, mdz, mdzx, u, v, m, has_mask, rpg, code, slope, inv: kernel(
        dy, t, dx, p, q, kz, bz, k, mdz, mdzx, u, v, m, has_mask, rpg, code, slope, inv)


@njit(cache=True)
def _reduce_merged(x, m, has_mask, seg, seg_group, G):
    """Merged per-group ``(count, mean, m2)`` as a float64 ``(G, C, 3)`` array (the array's loop strategy)."""
    return _reduce_layout(x, m, has_mask, seg, seg_group, G)


@njit(cache=True)
def _apply_any(x, y, scale, shift, rpg, code, slope):
    _apply_layout(x, y, scale, shift, rpg, code, slope)


@njit(cache=True)
def _train_fwd(x, m, has_mask, seg, seg_group, G, rpg, w, b, eps, clamp, code, slope, y, out, inv,
               upd, rm, rv, nbt, has_nbt, momentum, cumulative):
    """Training forward of plain BN: statistics into ``out``/``inv``, running update if ``upd``, ``y``.

    Returns whether the batch statistics were finite (always True when ``upd`` is False).
    """
    C = x.shape[1]
    st = _reduce_merged(x, m, has_mask, seg, seg_group, G)
    scale = np.empty((G, C))
    shift = np.empty((G, C))
    _constants(st, w, b, eps, clamp, out, inv, scale, shift)
    finite = True
    if upd:
        finite = _update_running(out[0], out[1], out[2], rm, rv, nbt, has_nbt, momentum, cumulative)
    _apply_any(x, y, scale, shift, rpg, code, slope)
    return finite


@njit(cache=True)
def _eval_fwd(x, y, rm, rv, w, b, eps, code, slope, rpg):
    """Evaluation forward: the apply constants of running statistics (count 1, mean ``rm``, m2 ``rv``), then apply."""
    C = rm.shape[0]
    st = np.empty((1, C, 3))
    for c in range(C):
        st[0, c, 0] = 1.0
        st[0, c, 1] = rm[c]
        st[0, c, 2] = rv[c]
    out = np.empty((3, 1, C))
    inv = np.empty((1, C))
    scale = np.empty((1, C))
    shift = np.empty((1, C))
    _constants(st, w, b, eps, False, out, inv, scale, shift)
    _apply_layout(x, y, scale, shift, rpg, code, slope)


@njit(cache=True)
def _bwd_sums_any(dy, t, p, q, kz, bz, seg, seg_group, G, rpg, code, slope, inv):
    """``(Σ dz, Σ dz · x̂)`` per group as a float64 ``(G, C, 2)`` array (either loop strategy)."""
    C = t.shape[1]
    acc = np.zeros((seg.shape[0], C, 2))
    _bwd_reduce_layout(dy, t, p, q, kz, bz, seg, rpg, code, slope, inv, acc)
    sums = np.zeros((G, C, 2))
    for s in range(seg.shape[0]):
        g = seg_group[s]
        for c in range(C):
            sums[g, c, 0] += acc[s, c, 0]
            sums[g, c, 1] += acc[s, c, 1]
    return sums


@njit(cache=True)
def _dx_any(dy, t, dx, p, q, kz, bz, k, sums, count, m, has_mask, rpg, code, slope, inv):
    """``dx = k · (dz − m · (mean(dz) + x̂ · mean(dz · x̂)))`` with means over each group's ``count``."""
    G, C = p.shape
    mdz = np.empty((G, C))
    mdzx = np.empty((G, C))
    u = np.empty((G, C))
    v = np.empty((G, C))
    for g in range(G):
        for c in range(C):
            n = max(count[g, 0 if count.shape[1] == 1 else c], 1.0)
            m1 = sums[g, c, 0] / n
            m2 = sums[g, c, 1] / n
            uc = k[g, c] * m2 * q[g, c]
            mdz[g, c] = m1
            mdzx[g, c] = m2
            u[g, c] = uc
            v[g, c] = k[g, c] * m1 - uc * p[g, c]
    _bwd_apply_layout(dy, t, dx, p, q, kz, bz, k, mdz, mdzx, u, v, m, has_mask, rpg, code, slope, inv)


@njit(cache=True)
def _train_bwd(dy, t, m, has_mask, seg, seg_group, G, rpg, mean, invstd, w, b, eps, inv, code, slope, count,
               need_dx, dx, dw, db):
    """Backward of plain BN: ``dw = Σ dz · x̂`` and ``db = Σ dz`` (over groups), and ``dx`` if ``need_dx``."""
    C = t.shape[1]
    p = np.empty((G, C))
    q = np.empty((G, C))
    kz = np.empty((G, C))
    bz = np.empty((G, C))
    k = np.empty((G, C))
    _bwd_constants(mean, invstd, w, b, eps, inv, p, q, kz, bz, k)
    sums = _bwd_sums_any(dy, t, p, q, kz, bz, seg, seg_group, G, rpg, code, slope, inv)
    for c in range(C):
        s0 = 0.0
        s1 = 0.0
        for g in range(G):
            s0 += sums[g, c, 0]
            s1 += sums[g, c, 1]
        dw[c] = s1
        db[c] = s0
    if need_dx:
        _dx_any(dy, t, dx, p, q, kz, bz, k, sums, count, m, has_mask, rpg, code, slope, inv)


# --------------------------------------------------------------------------------------------
# python side: cached plans (canonical view + parallel segments), fallbacks
# --------------------------------------------------------------------------------------------
class _Plan:
    """How a tensor of one shape/stride/axis/grouping is cut for the kernels (cached per signature)."""

    __slots__ = ("perm", "identity", "axis", "A", "C", "B", "shape", "phys", "rpg", "G", "seg", "seg_group", "nbytes",
                 "inverse", "lshape", "lstrides")


def fork_unsafe() -> bool:
    """True once numba's thread pool runs on GNU OpenMP: a forked child must not use it."""
    try:
        return numba.threading_layer() == "omp"
    except ValueError:  # no parallel kernel launched yet
        return False


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
    """``t`` (x-shaped: x itself, dy, y) as the canonical array (``(A, C)`` or ``(A, C, B)``); copies only if its layout differs."""
    a = t.detach().numpy()
    if not p.identity:
        a = a.transpose(p.perm)
    return a.reshape(p.shape)


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


def reduce(x: torch.Tensor, axis: int, m: torch.Tensor | None = None, group_size: int | None = None):
    """Per-feature ``(count, mean, m2)`` (each ``(G, C)``) as :func:`torch_ops.reduce`; float64 inside."""
    p = _plan(x, axis, group_size)
    if p is None or x.requires_grad and torch.is_grad_enabled():
        return _t.reduce(x, axis, m, group_size)
    st = _reduce_merged(_arr(x, p), _mask(m, p), m is not None, p.seg, p.seg_group, p.G)
    out = torch.from_numpy(st).to(_t.stat_dtype(x.dtype))
    return out[..., 0].contiguous(), out[..., 1].contiguous(), out[..., 2].contiguous()


def apply(x, axis, scale, shift, group_size=None, activation=None, negative_slope=0.01):
    """``y = act(x · scale + shift)`` per feature (and group), in x's dtype and memory format."""
    p = _plan(x, axis, group_size)
    if p is None or torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        return _t.apply(x, axis, scale, shift, group_size, activation, negative_slope)
    y, ya = _out(p, x.dtype)
    _apply_any(_arr(x, p), ya, _per_group(scale, p, np.float64), _per_group(shift, p, np.float64), p.rpg,
               _t.activation_code(activation), float(negative_slope))
    return y


_F_TYPES = (np.dtype(np.float32), np.dtype(np.float64))
_NO_NBT = np.zeros(1, np.int64)
_NO_RUNNING = (False, np.zeros(1, np.float32), np.zeros(1, np.float32), _NO_NBT, False, 0.0, False)


def _running_args(running):
    """``(upd, rm, rv, nbt, has_nbt, momentum, cumulative)`` for the kernels; ``upd=False`` if the buffers do not suit.

    They suit when they are CPU float32/float64 tensors of one dtype that need no gradient (``.numpy()``
    refuses the others) and ``num_batches_tracked`` is None or an int64 CPU tensor.
    """
    if running is None:
        return _NO_RUNNING
    rm, rv, nbt, momentum = running
    if momentum is None and nbt is None:
        return _NO_RUNNING
    try:
        rma, rva = rm.numpy(), rv.numpy()
        nb = nbt.view(1).numpy() if nbt is not None else _NO_NBT
    except (RuntimeError, TypeError):
        return _NO_RUNNING
    if rma.dtype != rva.dtype or rma.dtype not in _F_TYPES or rma.ndim != 1 or nb.dtype != np.int64:
        return _NO_RUNNING
    return True, rma, rva, nb, nbt is not None, 0.0 if momentum is None else float(momentum), momentum is None


def train_forward(x, axis, m, group_size, weight, bias, eps, activation=None, negative_slope=0.01, clamp=False,
                  running=None):
    """Plain batch norm's whole training forward in one kernel call: reduce → batch statistics → apply.

    ``running = (running_mean, running_var, num_batches_tracked, momentum)`` also updates the running
    estimates in the same call (rule of :func:`batchnorm.functional.update_running`) when the buffers
    are CPU float32/float64. Returns ``(y, stats, invstd, finite)``: ``stats`` is ``(3, G, C)`` =
    (count, mean, biased var) and ``invstd`` ``(G, C)``, in the statistics dtype; ``finite`` is None
    when the running estimates were not updated here. None when the kernels cannot take ``x``. ``clamp``: memory="save"'s
    ``|γ| < eps → ±eps``.

    Shape: ``x`` any dense layout with C at ``axis``; ``weight``, ``bias`` ``(C,)`` or None; ``y`` like ``x``.
    Reference: Ioffe & Szegedy (2015), Algorithms 1 and 2.
    """
    p = _plan(x, axis, group_size)
    if p is None:
        return None
    sd = _NP[x.dtype]  # the statistics dtype is the input's for the dtypes the kernels take
    out = np.empty((3, p.G, p.C), sd)
    inv = np.empty((p.G, p.C), sd)
    y, ya = _out(p, x.dtype)
    ra = _running_args(running)
    finite = _train_fwd(_arr(x, p), _mask(m, p), m is not None, p.seg, p.seg_group, p.G,
                        p.rpg, _vec(weight, p.C, 1.0), _vec(bias, p.C, 0.0), float(eps), bool(clamp),
                        _CODES[activation], float(negative_slope), ya, out, inv, *ra)
    return y, torch.from_numpy(out), torch.from_numpy(inv), (bool(finite) if ra[0] else None)


_CODES = {None: 0, **{a.name: a.code for a in _activations.TABLE.values()}}


def eval_forward(x, axis, weight, bias, running_mean, running_var, eps, activation=None, negative_slope=0.01):
    """Evaluation-mode batch norm in one kernel call: ``y = act(γ·(x − μ)/sqrt(σ² + eps) + β)`` with running μ, σ².

    The constants are formed in float64 (as :func:`batchnorm.functional.eval_scale_shift`, but never
    narrower than float64). Returns None when the kernels cannot take ``x`` or the buffers (CPU
    float32/float64 only). No autograd: callers use it when no gradient is needed.

    Shape: ``x`` any dense layout with C at ``axis``; parameters and buffers ``(C,)``; output like ``x``.
    Reference: Ioffe & Szegedy (2015), Algorithm 2, step 11.
    """
    p = _plan(x, axis, None)
    if p is None:
        return None
    try:
        rm, rv = running_mean.detach().numpy(), running_var.detach().numpy()
    except (RuntimeError, TypeError):
        return None
    if rm.dtype not in _F_TYPES or rv.dtype not in _F_TYPES:
        return None
    y, ya = _out(p, x.dtype)
    _eval_fwd(_arr(x, p), ya, rm, rv, _vec(weight, p.C, 1.0), _vec(bias, p.C, 0.0), float(eps), _CODES[activation],
              float(negative_slope), p.rpg)
    return y


def update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked=None):
    """:func:`batchnorm.functional.update_running` in one kernel call; None if the buffers do not suit it.

    Buffers must be CPU float32/float64 tensors that need no gradient (and ``num_batches_tracked`` an
    int64 CPU tensor). Returns the Python bool "the batch statistics were finite".
    """
    ra = _running_args((running_mean, running_var, num_batches_tracked, momentum))
    if not ra[0] or mean.device.type != "cpu":
        return None
    f64 = lambda t: t.detach().numpy().astype(np.float64, copy=False)  # noqa: E731
    return bool(_update_running(f64(count), f64(mean), f64(var), *ra[1:]))


def _bwd_prep(dy, t, p: _Plan, pp, qq, zscale, zshift):
    f = lambda v: _per_group(v, p, np.float64)  # noqa: E731
    kz = f(zscale) if zscale is not None else np.ones((p.G, p.C))
    bz = f(zshift) if zshift is not None else np.zeros((p.G, p.C))
    dya = _arr(dy if dy.dtype == t.dtype else dy.to(t.dtype), p)
    return _arr(t, p), dya, f(pp), f(qq), kz, bz


def backward_reduce(dy, x, axis, mean, invstd, group_size, activation=None, negative_slope=0.01,
                    zscale=None, zshift=None, from_output=False):
    """``(Σ dz, Σ dz · x̂)`` per feature, as :func:`torch_ops.backward_reduce` (float64 sums)."""
    p = _plan(x, axis, group_size)
    if p is None:
        return _t.backward_reduce(dy, x, axis, mean, invstd, group_size, activation, negative_slope,
                                  zscale, zshift, from_output)
    ta, dya, pa, qa, kz, bz = _bwd_prep(dy, x, p, mean, invstd, zscale, zshift)
    sums = _bwd_sums_any(dya, ta, pa, qa, kz, bz, p.seg, p.seg_group, p.G, p.rpg, _t.activation_code(activation),
                         float(negative_slope), bool(from_output))
    out = torch.from_numpy(sums).to(mean.dtype)
    return out[..., 0].contiguous(), out[..., 1].contiguous()


def backward_apply(dy, x, axis, mean, invstd, k, mean_dy, mean_dy_xhat, m, group_size, activation=None,
                   negative_slope=0.01, zscale=None, zshift=None, from_output=False):
    """``dx = k · (dz − m · (mean(dz) + x̂ · mean(dz · x̂)))`` as :func:`torch_ops.backward_apply`."""
    p = _plan(x, axis, group_size)
    if p is None:
        return _t.backward_apply(dy, x, axis, mean, invstd, k, mean_dy, mean_dy_xhat, m, group_size, activation,
                                 negative_slope, zscale, zshift, from_output)
    ta, dya, pa, qa, kz, bz = _bwd_prep(dy, x, p, mean, invstd, zscale, zshift)
    f = lambda v: _per_group(v, p, np.float64)  # noqa: E731
    # the kernel takes (Σ dz, Σ dz·x̂) and counts: pass the means with a count of one
    sums = np.stack([f(mean_dy), f(mean_dy_xhat)], axis=-1)
    dx, dxa = _out(p, x.dtype)
    _dx_any(dya, ta, dxa, pa, qa, kz, bz, f(k), sums, np.ones((p.G, 1)), _mask(m, p), m is not None, p.rpg,
            _t.activation_code(activation), float(negative_slope), bool(from_output))
    return dx


def train_backward(dy, t, axis, stats, invstd, weight, bias, count, m, group_size, eps, activation=None,
                   negative_slope=0.01, from_output=False, needs=(True, True, True)):
    """Plain batch norm's whole backward in one kernel call: reduce ``(Σ dz, Σ dz·x̂)`` → means → apply ``dx``.

    ``t`` is the input (``from_output=False``; ``stats`` the ``(3, G, C)`` (count, mean, var) of
    :func:`train_forward`) or the output of memory="save" (``stats`` unused, ``x̂ = (act⁻¹(y) − β) / γ``
    with γ clamped to ``±eps`` as in the forward). ``count``: ``(G, C)`` or ``(G, 1)`` counted values,
    or None to take them from ``stats``. ``needs`` says which of ``(dx, dγ, dβ)`` to return (others are
    None). Returns None when the kernels cannot take ``t``.

    Shape: ``dy``, ``t`` and ``dx`` like the layer input; ``dγ``, ``dβ`` ``(C,)`` in the parameters' dtype.
    Reference: the analytic backward ``dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy·x̂))`` (Ioffe & Szegedy 2015).
    """
    p = _plan(t, axis, group_size)
    if p is None:
        return None
    inv = bool(from_output)
    iv = invstd.numpy()
    st = stats.numpy() if stats is not None else None
    dx, dxa = _out(p, t.dtype) if needs[0] else (None, np.empty((1,) * len(p.shape), _NP[t.dtype]))
    dw, dwa = _grad_out(weight, needs[1], p.C)
    db, dba = _grad_out(bias, needs[2], p.C)
    cn = count.numpy() if count is not None else st[0]
    _train_bwd(_arr(dy if dy.dtype == t.dtype else dy.to(t.dtype), p), _arr(t, p), _mask(m, p),
               m is not None, p.seg, p.seg_group, p.G, p.rpg, iv if inv else st[1], iv, _vec(weight, p.C, 1.0),
               _vec(bias, p.C, 0.0), float(eps), inv, _CODES[activation], float(negative_slope),
               cn.astype(np.float64, copy=False), needs[0], dxa, dwa, dba)
    if dw is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    if db is not None and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    return dx, dw, db


def _grad_out(param: torch.Tensor | None, wanted: bool, C: int) -> tuple[torch.Tensor | None, np.ndarray]:
    """A ``(C,)`` gradient tensor the kernel writes into (the parameter's dtype when the kernels support it)."""
    if not wanted or param is None:
        return None, np.empty(C)
    g = torch.empty(C, dtype=param.dtype if param.dtype in SUPPORTED_DTYPES else torch.float64)
    return g, g.numpy()
