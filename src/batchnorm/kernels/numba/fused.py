"""Plain batch norm's one-call sequences and the tiny per-feature kernels they use (numba backend).

One kernel call per direction: reduce → statistics → running update → apply (training forward),
reduce ``(Σ dz, Σ dz·x̂)`` → means → ``dx``, ``dγ``, ``dβ`` (backward), running constants → apply (eval).
They are optimizations of the rules written once in torch in :mod:`batchnorm.functional` (numba twins:
:func:`_update_running` of ``update_running``, :func:`_clamped` of ``_affine``'s ``|γ| < eps`` clamp,
:func:`_constants` of ``eval_scale_shift``); ``tests/test_fused.py`` compares each pair.

The loop strategy is chosen when numba *types* a call, from the rank of the canonical array, so only
the strategies a program uses get compiled.

Shape: see each kernel. Reference: Ioffe & Szegedy (2015), Algorithms 1 and 2.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from numba.extending import overload

from .loops import (
    _CACHE,
    _apply_cols,
    _apply_rows,
    _bwd_apply,
    _bwd_apply_cols,
    _bwd_reduce,
    _bwd_reduce_cols,
    _merge_cols,
    _merge_segments,
    _reduce_cols,
    _reduce_rows,
)


# --------------------------------------------------------------------------------------------
# per-feature constants and the running update (tiny serial kernels: one call instead of ~20 torch ops)
# --------------------------------------------------------------------------------------------
@njit(inline="always", cache=_CACHE)
def _clamped(wc, eps):
    """memory="save"'s γ rule: ``|γ| < eps`` is used as ``±eps`` (sign kept, sign(0) = +1)."""
    if abs(wc) < eps:
        return -eps if wc < 0 else eps
    return wc


@njit(cache=_CACHE)
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


@njit(cache=_CACHE)
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


@njit(cache=_CACHE)
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


@njit(cache=_CACHE)
def _reduce_merged(x, m, has_mask, seg, seg_group, G):
    """Merged per-group ``(count, mean, m2)`` as a float64 ``(G, C, 3)`` array (the array's loop strategy)."""
    return _reduce_layout(x, m, has_mask, seg, seg_group, G)


@njit(cache=_CACHE)
def _apply_any(x, y, scale, shift, rpg, code, slope):
    _apply_layout(x, y, scale, shift, rpg, code, slope)


@njit(cache=_CACHE)
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


@njit(cache=_CACHE)
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


@njit(cache=_CACHE)
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


@njit(cache=_CACHE)
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


@njit(cache=_CACHE)
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
