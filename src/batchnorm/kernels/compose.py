"""The compose sequences: reduce → combine → apply (and back) from any backend's four primitives.

They live here, inside ``kernels/``, so that :mod:`batchnorm.kernels.backend`'s default sequences need nothing from
:mod:`batchnorm.functional` (which re-exports every name of this module it used to define: ``Combine``,
``update_running``, ``eval_scale_shift``, ``compose_train_forward`` ...). One definition of the math:

* :class:`Combine` — the *combine* step (identity for plain BN; sync and renorm subclass it);
* :func:`_forward_steps` / :func:`_backward_steps` — reduce → combine → apply with a backend ``ops`` and a combine;
* :func:`compose_train_forward` / :func:`compose_train_backward` — the protocol's default plain sequences;
* :func:`update_running` — the running update (guard selected on the device, no host read);
* :func:`eval_scale_shift` — the eval constants ``a, b`` of ``y = a·x + b``.

Shape: per-feature quantities are ``(G, C)`` (G ghost groups), as in :mod:`batchnorm.kernels.backend`.

Example::

    >>> import torch
    >>> from batchnorm.kernels.composite import COMPOSITE
    >>> from batchnorm.kernels.backend import Settings
    >>> y, stats, invstd, finite = compose_train_forward(COMPOSITE, torch.randn(8, 3), Settings(axis=1), None, None, None)
    >>> tuple(stats.shape), finite
    ((3, 1, 3), None)

Reference: Ioffe & Szegedy (2015), Algorithms 1 and 2; Ioffe (2017) for the ``r, d`` correction.
"""

from __future__ import annotations

import contextlib

import torch

from . import torch_ops as _t
from .backend import Settings


class Combine:
    """The *combine* step: identity for plain batch norm.

    Variants override one method each:

    * :meth:`stats` maps local ``(count, mean, m2)`` (each ``(G, C)``) to the statistics that
      normalize (sync BN: an all-reduce across processes);
    * :meth:`grads` does the same for the backward sums ``(Σ dy, Σ dy·x̂)``;
    * :meth:`correction` returns constants ``(r, d)`` so that ``x̂' = x̂ · r + d`` (batch renorm), or None.
    """

    def stats(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
        return count, mean, m2

    def grads(self, sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor):
        return sum_dy, sum_dy_xhat

    def correction(self, mean: torch.Tensor, var: torch.Tensor):
        return None


_PLAIN = Combine()


def check_cumulative(momentum, num_batches_tracked) -> None:
    """Refuse ``momentum=None`` (the cumulative average ``1/num_batches_tracked``) without the counter it reads."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked; pass it, or a float momentum.")


def update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor,
    momentum: float | None,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Update running estimates in place; return a bool tensor, True where the batch was accepted.

    With ``G`` groups (ghost batches; ``G = 1`` otherwise) of biased variances ``var_g`` over
    ``n_g`` values: ``μ_B = mean_g(mean_g)``, ``σ²_B = mean_g(var_g · n_g / (n_g − 1))`` (unbiased), then
    ``running = (1 − f) · running + f · new`` with ``f = momentum``, or ``f = 1 / num_batches_tracked``
    (cumulative average) when momentum is None (PyTorch semantics).

    A batch whose statistics are not all finite changes nothing (running estimates and
    ``num_batches_tracked``); a batch with ≤ 1 value per feature (an empty one) only counts in
    ``num_batches_tracked``, as in PyTorch. No host synchronisation and no host-to-device copy happens
    here: the update is *selected* (``torch.where`` on the 0-d flag), never branched on, and a float
    ``momentum`` enters ``torch.lerp`` as a Python scalar.

    Shape: running buffers ``(C,)``; ``mean, var, count`` are ``(G, C)``.

    Example::

        >>> rm, rv, nbt = torch.zeros(2), torch.ones(2), torch.tensor(0)
        >>> ok = update_running(rm, rv, torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 3.0]]),
        ...                     torch.tensor([[4.0, 4.0]]), momentum=0.5, num_batches_tracked=nbt)
        >>> rm.tolist(), rv.tolist(), int(nbt)        # 0.5·mean, 0.5·1 + 0.5·3·4/3
        ([0.5, 1.0], [2.5, 2.5], 1)

    Reference: Ioffe & Szegedy (2015), Algorithm 2 (unbiased population variance); the moving
    average and ``momentum=None`` are ``torch.nn.BatchNorm*d``'s.
    """
    # torch.export records no_grad as a higher-order op that torch.export.save cannot serialize; the statistics
    # reaching here under export are detached already (functional.normalize's traced route)
    with contextlib.nullcontext() if torch.compiler.is_exporting() else torch.no_grad():
        unbiased = var * count / (count - 1).clamp_min(1)
        new_mean = mean.mean(0)
        new_var = unbiased.mean(0)
        finite = torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
        enough = (count > 1).all()
        if num_batches_tracked is not None:
            num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
        if momentum is None:
            check_cumulative(momentum, num_batches_tracked)
            f = 1.0 / num_batches_tracked.clamp_min(1).to(new_mean.dtype)
        else:
            f = float(momentum)  # a kernel argument: no tensor, no host-to-device copy
        ok = finite & enough
        rm = torch.lerp(running_mean.to(new_mean.dtype), new_mean, f)
        rv = torch.lerp(running_var.to(new_var.dtype), new_var, f)
        running_mean.copy_(torch.where(ok, rm, running_mean.to(rm.dtype)))
        running_var.copy_(torch.where(ok, rv, running_var.to(rv.dtype)))
    return finite


def _plain(combine: Combine) -> bool:
    """True for plain batch norm's combine (no cross-process statistics, no r, d correction)."""
    return type(combine).stats is Combine.stats and type(combine).correction is Combine.correction \
        and type(combine).grads is Combine.grads


def _affine(weight, bias, r, d, clamp, eps, like):
    """``kz = γ·r`` and ``bz = β + γ·d`` as ``(1, C)`` (or ``(G, C)``) tensors in ``like``'s dtype.

    ``clamp`` (memory="save"): ``|γ| < eps`` is used as ``±eps`` (sign kept, sign(0) = +1), so the
    affine map stays invertible and ``x̂ = (z − bz) / kz`` stays finite. (The numba twin of this rule
    is ``cpu._clamped``; ``tests/test_fused.py`` compares them.)
    """
    w = weight.detach().to(like.dtype).reshape(1, -1) if weight is not None else torch.ones_like(like[:1])
    if clamp:
        w = torch.where(w.abs() < eps, torch.where(w < 0, -eps, eps).to(w.dtype), w)
    b = bias.detach().to(like.dtype).reshape(1, -1) if bias is not None else torch.zeros_like(like[:1])
    return (w * r if r is not None else w), (b + w * d if d is not None else b)


def _forward_steps(ops, x, s: Settings, m, weight, bias, combine):
    """reduce → combine → apply with backend ``ops``: ``(y, stats, invstd, r, d)``; ``stats`` = (count, mean, var) ``(3, G, C)``."""
    count, mean, m2 = combine.stats(*ops.reduce(x, s, m))
    var = m2 / count.clamp_min(1)
    invstd = torch.rsqrt(var + s.eps)
    corr = combine.correction(mean, var)
    r, d = corr if corr is not None else (None, None)
    kz, bz = _affine(weight, bias, r, d, s.save, s.eps, mean)
    scale = kz * invstd
    y = ops.apply(x, s, scale, bz - mean * scale)
    return y, torch.stack((count.expand_as(mean), mean, var)), invstd, r, d


def _backward_steps(ops, dy, t, s: Settings, stats, invstd, weight, bias, count, m, needs, combine, r, d):
    """reduce ``(Σ dz, Σ dz·x̂)`` → combine → apply ``dx``, plus ``dγ, dβ``: ``(dx, dγ, dβ)`` (None where not needed).

    ``t`` is the input (``stats`` its (count, mean, var)) or, with ``s.save``, the output (``count`` given).
    """
    if count is None:
        count = stats[0]
    kz, bz = _affine(weight, bias, r, d, s.save, s.eps, invstd)
    p, q = (bz, 1.0 / kz) if s.save else (stats[1], invstd)
    sum_dy, sum_dyx = ops.backward_reduce(dy, t, s, p, q, kz, bz)
    dx = dweight = dbias = None
    if needs[0]:
        all_dy, all_dyx = combine.grads(sum_dy, sum_dyx)
        n = count.clamp_min(1)
        dx = ops.backward_apply(dy, t, s, p, q, kz * invstd, all_dy / n, all_dyx / n, m, kz, bz)
    if needs[1] and weight is not None:
        dw = sum_dyx * r if r is not None else sum_dyx
        if d is not None:
            dw = dw + d * sum_dy
        dweight = dw.sum(0).to(weight.dtype)
    if needs[2] and bias is not None:
        dbias = sum_dy.sum(0).to(bias.dtype)
    return dx, dweight, dbias


def compose_train_forward(ops, x, s: Settings, m, weight, bias):
    """The protocol's default ``train_forward``: plain BN as reduce → combine → apply; ``finite`` None."""
    y, stats, invstd, _, _ = _forward_steps(ops, x, s, m, weight, bias, _PLAIN)
    return y, stats, invstd, None


def compose_train_backward(ops, dy, t, s: Settings, stats, invstd, weight, bias, count, m, needs):
    """The protocol's default ``train_backward``: plain BN's analytic backward from the primitives."""
    return _backward_steps(ops, dy, t, s, stats, invstd, weight, bias, count, m, needs, _PLAIN, None, None)


def eval_scale_shift(weight, bias, running_mean, running_var, eps, dtype=None):
    """Inference constants ``a = γ / sqrt(σ² + ε)``, ``b = β − μ · a``, so that eval-mode BN is ``y = a·x + b``.

    Shape: weight, bias (or None), running_mean, running_var ``(C,)``; returns two ``(1, C)`` tensors in
    float32 or wider (float64 for float64 buffers, or when ``dtype``, the input's dtype, is float64).

    Example::

        >>> a, b = eval_scale_shift(None, None, torch.tensor([1.0]), torch.tensor([4.0]), 0.0)
        >>> a.tolist(), b.tolist()
        ([[0.5]], [[-0.5]])

    Reference: Ioffe & Szegedy (2015), Algorithm 2, step 11 (inference is a per-feature affine map).
    """
    sd = _t.stat_dtype(running_mean.dtype if dtype is None else torch.promote_types(running_mean.dtype, dtype))
    invstd = torch.rsqrt(running_var.to(sd) + eps) if eps >= 0 else torch.ones_like(running_var, dtype=sd)
    a = invstd * weight.to(sd) if weight is not None else invstd
    b = -running_mean.to(sd) * a
    if bias is not None:
        b = b + bias.to(sd)
    return a.reshape(1, -1), b.reshape(1, -1)
