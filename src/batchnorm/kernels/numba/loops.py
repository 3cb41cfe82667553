"""The numba loops of reduce, apply and backward (parallel over segments of rows, float64 accumulation).

Part of the numba backend (:mod:`batchnorm.kernels.numba`). Each kernel takes the canonical array of
:mod:`.plans` — ``(A, C)`` when the feature axis is innermost in memory, ``(A, C, B)`` otherwise — and
the parallel segments cut there. Two loop strategies:

* ``B > 1`` (feature axis not innermost): per segment and feature, one pass over the ``(a, c)``
  rows of ``B`` contiguous values accumulating shifted float64 sums (see :func:`_reduce_rows`).
* ``B == 1`` (feature axis innermost): the same sums vectorized over the contiguous features
  (see :func:`_reduce_cols`).

Each segment writes its own partial ``(count, mean, m2)`` or backward sums; the partials are merged
serially at the end (Chan, Golub & LeVeque 1979). Activation codes are
``batchnorm.activations.TABLE[name].code`` (the branches of :func:`_act` / :func:`_dact`).
Compiled code is cached on disk (numba's ``cache=True``; ``NUMBA_CACHE_DIR``) wherever numba finds a writable
place (:func:`batchnorm.kernels.warmup.cache_location`); with none, the kernels compile uncached.

Shape: see each kernel. Reference: Chan, Golub & LeVeque (1979); Ioffe & Szegedy (2015).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..warmup import cache_location

# no writable cache location anywhere (read-only tree and home): compile uncached instead of failing at import
_CACHE = cache_location()[0] is not None

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# --------------------------------------------------------------------------------------------
# elementwise activation helpers (code is loop-invariant; kept scalar so LLVM can unswitch)
# --------------------------------------------------------------------------------------------
@njit(inline="always", cache=_CACHE)
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


@njit(inline="always", cache=_CACHE)
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


@njit(inline="always", cache=_CACHE)
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
@njit(inline="always", cache=_CACHE)
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


@njit(parallel=True, cache=_CACHE, fastmath=_REASSOC)
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


@njit(parallel=True, cache=_CACHE, fastmath=_REASSOC)
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


@njit(cache=_CACHE)
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


@njit(cache=_CACHE)
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
@njit(parallel=True, cache=_CACHE)
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


@njit(parallel=True, cache=_CACHE)
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
@njit(parallel=True, cache=_CACHE, fastmath=_REASSOC)
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


@njit(parallel=True, cache=_CACHE, fastmath=_REASSOC)
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


@njit(parallel=True, cache=_CACHE)
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


@njit(parallel=True, cache=_CACHE)
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
