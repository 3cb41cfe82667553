"""The device-agnostic torch path of *reduce* and *apply*, forward and backward.

Every function here works on any device, dtype and memory format, and is built only from
differentiable torch operations, so the double-backward path can trace through it.

The four steps take the call's :class:`batchnorm.kernels.backend.Settings` record ``s`` (the same
signatures as the :class:`~batchnorm.kernels.backend.Backend` primitives, which the composite backend
is); the helpers (``expand``, ``_group_sum``) take plain ``axis`` / ``group_size``.

Shapes: ``x`` has its feature axis at ``axis`` (C features). Per-feature quantities are ``(G, C)``
where ``G`` is the number of ghost groups (1 unless ``group_size`` splits axis 0 into consecutive
virtual batches of ``group_size`` rows; the last group may be shorter). ``m`` is a mask already
broadcast by :func:`batchnorm._checks.mask_for` (size 1 along the feature axis), or None.
"""

from __future__ import annotations

import torch

from .. import activations as _activations
from .backend import Settings

#: Fused activations (names in code order) — read from the one table, :mod:`batchnorm.activations`.
ACTIVATIONS = tuple(_activations.TABLE)


def activation_code(activation: str | None) -> int:
    """The numba code of ``activation`` (None → identity)."""
    return _activations.code_of(activation)


def act(z: torch.Tensor, activation: str | None, negative_slope: float = 0.01) -> torch.Tensor:
    """The fused activation ``act(z)`` (gelu is the exact erf form, as ``torch.nn.GELU()``)."""
    if activation is None or activation == "identity":
        return z
    return _activations.TABLE[activation].forward(z, negative_slope)


def act_grad(z: torch.Tensor, activation: str | None, negative_slope: float = 0.01) -> torch.Tensor:
    """``d act / dz`` at ``z`` (at a kink the left value, as PyTorch: relu'(0) = 0, leaky_relu'(0) = slope)."""
    return _activations.get(activation).derivative(z, negative_slope)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in at least float32 (float64 for float64 input)."""
    return torch.promote_types(dtype, torch.float32)


def num_groups(n: int, group_size: int | None) -> int:
    if group_size is None or n == 0:
        return 1
    return -(-n // group_size)


def _other_dims(x: torch.Tensor, axis: int, keep_batch: bool) -> list[int]:
    return [d for d in range(x.dim()) if d != axis and not (keep_batch and d == 0)]


def _group_sum(t: torch.Tensor, x: torch.Tensor, axis: int, group_size: int | None) -> torch.Tensor:
    """Sum ``t`` (broadcastable to x, or x-shaped) into ``(G, C)``."""
    t = t.expand(*x.shape[:axis], t.shape[axis], *x.shape[axis + 1 :]) if t.shape[axis] == 1 else t
    if group_size is None:
        s = t.sum(_other_dims(x, axis, False)) if x.dim() > 1 else t
        return s.reshape(1, -1)
    dims = _other_dims(x, axis, True)
    # (N, C): the two kept dims stay in order; 2-D input is already (N, C) (sum(dim=[]) would reduce all)
    rows = t.sum(dims) if dims else t
    n = x.shape[0]
    index = torch.arange(n, device=x.device) // group_size
    out = rows.new_zeros(num_groups(n, group_size), rows.shape[1])
    return out.index_add(0, index, rows)


def expand(v: torch.Tensor, x: torch.Tensor, axis: int, group_size: int | None) -> torch.Tensor:
    """Broadcast a per-(group, feature) ``(G, C)`` tensor against ``x``."""
    shape = [1] * x.dim()
    shape[axis] = v.shape[1]
    if group_size is None or v.shape[0] == 1:
        return v.reshape(shape)
    index = torch.arange(x.shape[0], device=x.device) // group_size
    shape[0] = x.shape[0]
    return v.index_select(0, index).reshape(shape)


def reduce(
    x: torch.Tensor, s: Settings, m: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-pass per-feature ``(count, mean, m2)`` with ``m2 = Σ (x − mean)²`` (no E[x²] − E[x]²).

    Reads ``s.axis`` and ``s.group_size``.
    """
    axis, group_size = s.axis, s.group_size
    xs = x.to(stat_dtype(x.dtype))
    c = x.shape[axis]
    if m is None:
        ones = xs.new_ones([1] * x.dim())
        ones = ones.expand(*[n if d != axis else 1 for d, n in enumerate(x.shape)])
        count = _group_sum(ones, x, axis, group_size).expand(-1, c)
        total = _group_sum(xs, x, axis, group_size)
    else:
        mf = m.to(xs.dtype)
        count = _group_sum(mf, x, axis, group_size).expand(-1, c)
        # where, not a product: a NaN/Inf at a masked-out position must not count (NaN·0 = NaN)
        total = _group_sum(torch.where(m, xs, 0.0), x, axis, group_size)
    mean = total / count.clamp_min(1)
    centred = xs - expand(mean, x, axis, group_size)
    if m is not None:
        centred = torch.where(m, centred, 0.0)
    m2 = _group_sum(centred * centred, x, axis, group_size)
    return count.contiguous(), mean, m2


def apply(x: torch.Tensor, s: Settings, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``y = act(x · scale + shift)`` per feature (and group), returned in x's dtype and memory format.

    Reads ``s.axis``, ``s.group_size``, ``s.activation``, ``s.negative_slope``.
    """
    xs = x.to(scale.dtype)
    y = torch.addcmul(expand(shift, x, s.axis, s.group_size), xs, expand(scale, x, s.axis, s.group_size))
    return act(y, s.activation, s.negative_slope).to(x.dtype)


def _dz_xhat(dy, t, s: Settings, p, q, zscale, zshift):
    """``(dz, x̂)``: ``dz = dy · act'(z)`` with ``z = x̂ · zscale + zshift``.

    ``s.save`` False: ``t`` is the input, ``x̂ = (t − p) · q`` (p, q = mean, invstd).
    ``s.save`` True (memory-saving mode): ``t`` is the output ``y`` of an invertible activation,
    ``z = act⁻¹(y)`` and ``x̂ = (z − p) · q`` (p, q = zshift, 1 / zscale).
    """
    sd = p.dtype
    activation, slope = s.activation, s.negative_slope
    e = lambda v: expand(v, t, s.axis, s.group_size)  # noqa: E731
    ts, dys = t.to(sd), dy.to(sd)
    if s.save:
        if activation == "leaky_relu":
            neg = ~(ts > 0)
            ts = torch.where(neg, ts / slope, ts)
            dys = torch.where(neg, dys * slope, dys)
        return dys, (ts - e(p)) * e(q)
    xhat = (ts - e(p)) * e(q)
    if activation is None or activation == "identity":
        return dys, xhat
    one = torch.ones_like(p[:1])
    z = xhat * e(zscale if zscale is not None else one) + e(zshift if zshift is not None else one * 0)
    return dys * act_grad(z, activation, slope), xhat


def backward_reduce(dy, x, s: Settings, mean, invstd, zscale=None, zshift=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ dz, Σ dz · x̂)`` per feature over *all* positions (masked ones included: they are normalized too).

    ``dz = dy`` without activation; see :func:`_dz_xhat` for the fused activation and memory-saving forms.
    """
    dz, xhat = _dz_xhat(dy, x, s, mean, invstd, zscale, zshift)
    return _group_sum(dz, x, s.axis, s.group_size), _group_sum(dz * xhat, x, s.axis, s.group_size)


def backward_apply(dy, x, s: Settings, mean, invstd, k, mean_dy, mean_dy_xhat, m, zscale=None, zshift=None):
    """``dx = k · (dz − m · (mean(dz) + x̂ · mean(dz · x̂)))``; ``m`` is 1 where a position counted."""
    e = lambda v: expand(v, x, s.axis, s.group_size)  # noqa: E731
    dz, xhat = _dz_xhat(dy, x, s, mean, invstd, zscale, zshift)
    corr = e(mean_dy) + xhat * e(mean_dy_xhat)
    if m is not None:
        corr = torch.where(m, corr, 0.0)  # masked positions: dx = k·dz even where x̂ is not finite
    return (e(k) * (dz - corr)).to(x.dtype)
