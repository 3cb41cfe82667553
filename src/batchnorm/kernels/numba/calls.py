"""The numba kernels' Python entry points: tensors in, plan + arrays, kernel call, tensors out.

Every function takes the call's :class:`batchnorm.kernels.backend.Settings` record ``s``; the same
signatures as :mod:`batchnorm.kernels.torch_ops` for the four steps (``reduce``, ``apply``,
``backward_reduce``, ``backward_apply``) plus plain batch norm's one-call sequences
(``train_forward``, ``train_backward``, ``eval_forward``) and the running update. A tensor the
kernels cannot take (not dense, other dtype or device) goes to the torch path or returns None.
:class:`batchnorm.kernels.numba.NumbaBackend` calls these through :mod:`.ops`.

Shape: ``x`` any dense layout with C at ``axis``; per-feature tensors ``(G, C)``.
Reference: Ioffe & Szegedy (2015), Algorithms 1 and 2.
"""

from __future__ import annotations

import numpy as np
import torch

from ... import activations as _activations
from .. import torch_ops as _t
from ..backend import Settings
from .fused import (
    _apply_any,
    _bwd_sums_any,
    _dx_any,
    _eval_fwd,
    _reduce_merged,
    _train_bwd,
    _train_fwd,
    _update_running,
)
from .plans import (
    _NP,
    SUPPORTED_DTYPES,
    _arr,
    _mask,
    _out,
    _per_group,
    _Plan,
    _plan,
    _vec,
)


def reduce(x: torch.Tensor, s: Settings, m: torch.Tensor | None = None):
    """Per-feature ``(count, mean, m2)`` (each ``(G, C)``) as :func:`torch_ops.reduce`; float64 inside."""
    p = _plan(x, s.axis, s.group_size)
    if p is None or x.requires_grad and torch.is_grad_enabled():
        return _t.reduce(x, s, m)
    st = _reduce_merged(_arr(x, p), _mask(m, p), m is not None, p.seg, p.seg_group, p.G)
    out = torch.from_numpy(st).to(_t.stat_dtype(x.dtype))
    return out[..., 0].contiguous(), out[..., 1].contiguous(), out[..., 2].contiguous()


def apply(x: torch.Tensor, s: Settings, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``y = act(x · scale + shift)`` per feature (and group), in x's dtype and memory format."""
    p = _plan(x, s.axis, s.group_size)
    if p is None or torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        return _t.apply(x, s, scale, shift)
    y, ya = _out(p, x.dtype)
    _apply_any(_arr(x, p), ya, _per_group(scale, p, np.float64), _per_group(shift, p, np.float64), p.rpg,
               _CODES[s.activation], float(s.negative_slope))
    return y


_CODES = {None: 0, **{a.name: a.code for a in _activations.TABLE.values()}}  # activation → kernel code
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


def train_forward(x, s: Settings, m, weight, bias, running=None):
    """Plain batch norm's whole training forward in one kernel call: reduce → batch statistics → apply.

    ``running = (running_mean, running_var, num_batches_tracked, momentum)`` also updates the running
    estimates in the same call (rule of :func:`batchnorm.functional.update_running`) when the buffers
    are CPU float32/float64. Returns ``(y, stats, invstd, finite)``: ``stats`` is ``(3, G, C)`` =
    (count, mean, biased var) and ``invstd`` ``(G, C)``, in the statistics dtype; ``finite`` is None
    when the running estimates were not updated here. None when the kernels cannot take ``x``. ``s.save``
    (memory="save") clamps ``|γ| < eps → ±eps``.

    Shape: ``x`` any dense layout with C at ``axis``; ``weight``, ``bias`` ``(C,)`` or None; ``y`` like ``x``.
    Reference: Ioffe & Szegedy (2015), Algorithms 1 and 2.
    """
    p = _plan(x, s.axis, s.group_size)
    if p is None:
        return None
    sd = _NP[x.dtype]  # the statistics dtype is the input's for the dtypes the kernels take
    out = np.empty((3, p.G, p.C), sd)
    inv = np.empty((p.G, p.C), sd)
    y, ya = _out(p, x.dtype)
    ra = _running_args(running)
    finite = _train_fwd(_arr(x, p), _mask(m, p), m is not None, p.seg, p.seg_group, p.G,
                        p.rpg, _vec(weight, p.C, 1.0), _vec(bias, p.C, 0.0), float(s.eps), bool(s.save),
                        _CODES[s.activation], float(s.negative_slope), ya, out, inv, *ra)
    return y, torch.from_numpy(out), torch.from_numpy(inv), (bool(finite) if ra[0] else None)



def eval_forward(x, s: Settings, weight, bias, running_mean, running_var):
    """Evaluation-mode batch norm in one kernel call: ``y = act(γ·(x − μ)/sqrt(σ² + eps) + β)`` with running μ, σ².

    The constants are formed in float64 (as :func:`batchnorm.functional.eval_scale_shift`, but never
    narrower than float64). Returns None when the kernels cannot take ``x`` or the buffers (CPU
    float32/float64 only). No autograd: callers use it when no gradient is needed.

    Shape: ``x`` any dense layout with C at ``axis``; parameters and buffers ``(C,)``; output like ``x``.
    Reference: Ioffe & Szegedy (2015), Algorithm 2, step 11.
    """
    p = _plan(x, s.axis, None)
    if p is None:
        return None
    try:
        rm, rv = running_mean.detach().numpy(), running_var.detach().numpy()
    except (RuntimeError, TypeError):
        return None
    if rm.dtype not in _F_TYPES or rv.dtype not in _F_TYPES:
        return None
    y, ya = _out(p, x.dtype)
    _eval_fwd(_arr(x, p), ya, rm, rv, _vec(weight, p.C, 1.0), _vec(bias, p.C, 0.0), float(s.eps), _CODES[s.activation],
              float(s.negative_slope), p.rpg)
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


def backward_reduce(dy, x, s: Settings, mean, invstd, zscale=None, zshift=None):
    """``(Σ dz, Σ dz · x̂)`` per feature, as :func:`torch_ops.backward_reduce` (float64 sums)."""
    p = _plan(x, s.axis, s.group_size)
    if p is None:
        return _t.backward_reduce(dy, x, s, mean, invstd, zscale, zshift)
    ta, dya, pa, qa, kz, bz = _bwd_prep(dy, x, p, mean, invstd, zscale, zshift)
    sums = _bwd_sums_any(dya, ta, pa, qa, kz, bz, p.seg, p.seg_group, p.G, p.rpg, _CODES[s.activation],
                         float(s.negative_slope), bool(s.save))
    out = torch.from_numpy(sums).to(mean.dtype)
    return out[..., 0].contiguous(), out[..., 1].contiguous()


def backward_apply(dy, x, s: Settings, mean, invstd, k, mean_dy, mean_dy_xhat, m, zscale=None, zshift=None):
    """``dx = k · (dz − m · (mean(dz) + x̂ · mean(dz · x̂)))`` as :func:`torch_ops.backward_apply`."""
    p = _plan(x, s.axis, s.group_size)
    if p is None:
        return _t.backward_apply(dy, x, s, mean, invstd, k, mean_dy, mean_dy_xhat, m, zscale, zshift)
    ta, dya, pa, qa, kz, bz = _bwd_prep(dy, x, p, mean, invstd, zscale, zshift)
    f = lambda v: _per_group(v, p, np.float64)  # noqa: E731
    # the kernel takes (Σ dz, Σ dz·x̂) and counts: pass the means with a count of one
    sums = np.stack([f(mean_dy), f(mean_dy_xhat)], axis=-1)
    dx, dxa = _out(p, x.dtype)
    _dx_any(dya, ta, dxa, pa, qa, kz, bz, f(k), sums, np.ones((p.G, 1)), _mask(m, p), m is not None, p.rpg,
            _CODES[s.activation], float(s.negative_slope), bool(s.save))
    return dx


def train_backward(dy, t, s: Settings, stats, invstd, weight, bias, count, m, needs=(True, True, True)):
    """Plain batch norm's whole backward in one kernel call: reduce ``(Σ dz, Σ dz·x̂)`` → means → apply ``dx``.

    ``t`` is the input (``s.save`` False; ``stats`` the ``(3, G, C)`` (count, mean, var) of
    :func:`train_forward`) or the output of memory="save" (``stats`` unused, ``x̂ = (act⁻¹(y) − β) / γ``
    with γ clamped to ``±eps`` as in the forward). ``count``: ``(G, C)`` or ``(G, 1)`` counted values,
    or None to take them from ``stats``. ``needs`` says which of ``(dx, dγ, dβ)`` to return (others are
    None). Returns None when the kernels cannot take ``t``.

    Shape: ``dy``, ``t`` and ``dx`` like the layer input; ``dγ``, ``dβ`` ``(C,)`` in the parameters' dtype.
    Reference: the analytic backward ``dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy·x̂))`` (Ioffe & Szegedy 2015).
    """
    p = _plan(t, s.axis, s.group_size)
    if p is None:
        return None
    inv = bool(s.save)
    iv = invstd.numpy()
    st = stats.numpy() if stats is not None else None
    dx, dxa = _out(p, t.dtype) if needs[0] else (None, np.empty((1,) * len(p.shape), _NP[t.dtype]))
    dw, dwa = _grad_out(weight, needs[1], p.C)
    db, dba = _grad_out(bias, needs[2], p.C)
    cn = count.numpy() if count is not None else st[0]
    _train_bwd(_arr(dy if dy.dtype == t.dtype else dy.to(t.dtype), p), _arr(t, p), _mask(m, p),
               m is not None, p.seg, p.seg_group, p.G, p.rpg, iv if inv else st[1], iv, _vec(weight, p.C, 1.0),
               _vec(bias, p.C, 0.0), float(s.eps), inv, _CODES[s.activation], float(s.negative_slope),
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
