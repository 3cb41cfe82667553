"""Batch normalization as pure functions: reduce → combine → apply.

1. **reduce** — per-feature local statistics ``(count, mean, m2)`` over every axis but the
   feature axis, only where ``mask`` is true, per ghost group (:func:`batchnorm.kernels`).
2. **combine** — turn local statistics into the ones that normalize (:class:`Combine`; plain BN
   keeps them, sync BN all-reduces them, batch renorm adds the ``r, d`` correction) and update the
   running estimates (:func:`update_running`).
3. **apply** — ``y = x · a + b`` with one ``a, b`` per feature (and group).

The backward has the same shape: reduce ``(Σ dy, Σ dy·x̂)`` → combine → apply
``dx = k · (dy − mean(dy) − x̂ · mean(dy·x̂))``. It is written out analytically in
:class:`_TrainNorm`; double backward re-traces the same formula with differentiable torch ops.

Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015 (Algorithms 1 and 2).
"""

from __future__ import annotations

import warnings

import torch

from . import _checks
from .kernels import dispatch
from .kernels import torch_ops as _t
from .kernels.backend import SavedState, Settings
from .kernels.compose import (  # noqa: F401 - re-exported: the compose sequences live in kernels/
    _PLAIN,
    Combine,
    _affine,
    _backward_steps,
    _forward_steps,
    _plain,
    compose_train_backward,
    compose_train_forward,
    eval_scale_shift,
    update_running,
)
from .kernels.composite import COMPOSITE

__all__ = ["Combine", "batch_stats", "batch_norm", "merge_stats", "update_running"]


def merge_stats(
    count_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    count_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge two sets of ``(count, mean, m2)`` statistics (Chan, Golub & LeVeque 1979).

    ``n = n_a + n_b``, ``δ = μ_b − μ_a``, ``μ = μ_a + δ·n_b/n``, ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``.
    Exact in exact arithmetic and stable in floating point; empty sides (count 0) are allowed.

    Shape: any matching shapes; returns the same shape.

    Example::

        >>> a, b = torch.randn(5, 3), torch.randn(7, 3)
        >>> ma, va, na = batch_stats(a, axis=1); mb, vb, nb = batch_stats(b, axis=1)
        >>> n, m, m2 = merge_stats(na, ma, va * na, nb, mb, vb * nb)
        >>> torch.allclose(m2 / n, torch.cat([a, b]).var(0, unbiased=False))
        True
    """
    count = count_a + count_b
    safe = count.clamp_min(1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe)
    return count, mean, m2


def batch_stats(
    x: torch.Tensor, *, axis: int = 1, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-feature batch mean, biased variance and sample count.

    ``mean_c = Σ_i m_i x_ic / n_c``, ``var_c = Σ_i m_i (x_ic − mean_c)² / n_c`` (two passes: no
    ``E[x²] − E[x]²`` cancellation), ``n_c = Σ_i m_i``, where ``i`` runs over every position of every
    axis except ``axis`` and ``m`` is the mask (all true if None). A feature with no counted value
    (empty input, all-false mask) gets ``mean = var = 0`` with ``count = 0``, not NaN: that is the
    identity of :func:`merge_stats`, so empty chunks merge harmlessly; check ``count`` before using it.

    Shape:
        x: ``(..., C, ...)`` with C at ``axis``; mask: x's shape without ``axis`` (broadcastable).
        Returns three ``(C,)`` tensors in float32 (float64 for float64 input).

    Example::

        >>> x = torch.randn(8, 3, 5, 5)
        >>> mean, var, count = batch_stats(x)          # count = 8·5·5 = 200 per channel
        >>> torch.allclose(mean, x.mean((0, 2, 3)))
        True

    Reference: Ioffe & Szegedy (2015), Algorithm 1.
    """
    x = _checks.check_input(x, "batch_stats")
    ax = _checks.normalize_axis(axis, x.dim(), x.shape)
    m = _checks.mask_for(x, ax, mask)
    count, mean, m2 = dispatch.select(x).reduce(x, Settings(ax), m)
    return mean[0], m2[0] / count[0].clamp_min(1), count[0]


class _TrainNorm(torch.autograd.Function):
    """Normalize with batch statistics (+ fused activation); analytic backward; double backward by re-tracing.

    With ``z = x̂ · kz + bz`` (``kz = γ·r``, ``bz = β + γ·d``; r, d = 1, 0 unless batch renorm) and
    ``y = act(z)``. ``save=False`` keeps ``x`` for backward; ``save=True`` (memory="save", In-Place
    ABN) keeps only ``y`` (plus ``invstd`` and references to γ, β) and recovers
    ``x̂ = (act⁻¹(y) − bz) / kz``.

    Plain batch norm runs the backend's fused sequences (``train_forward`` / ``train_backward``: one
    kernel call per direction on numba, the composed steps elsewhere); the other combines run the same
    three steps with :class:`Combine` in the middle. State on ``ctx`` is a named record
    (:class:`batchnorm.kernels.backend.SavedState`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, m, s, ops, combine, running, stash):
        plain = combine is _PLAIN or _plain(combine)
        if plain:
            y, stats, invstd, finite = ops.train_forward(x, s, m, weight, bias, running)
            r = d = None
        else:
            y, stats, invstd, r, d = _forward_steps(ops, x, s, m, weight, bias, combine)
            finite = None
        # the statistics leave through ``stash`` (not as outputs: each output costs autograd bookkeeping)
        stash.extend((stats, finite))
        state = SavedState(s, ops, combine, plain, stats is not None)
        if s.save:
            # the count is the same for every feature (masks have no feature axis): one column is enough,
            # kept as Python numbers when that costs no device sync (CPU, eager), else as a tensor (the GPU route);
            # under torch.compile a copy (a view of ``stats``, which leaves through ``stash``, may not be saved)
            counts = stats[0][:, :1]
            if torch.compiler.is_compiling():
                counts = counts.clone()
            elif dispatch.device_type(x) == "cpu":
                state.counts, counts = counts.tolist(), None
            ctx.save_for_backward(y, m, invstd, weight, bias, r, d, counts)
        else:
            ctx.save_for_backward(x, weight, bias, m, invstd, r, d, stats)
        ctx.state = state
        return y

    @staticmethod
    def backward(ctx, dy):
        st = ctx.state
        s = st.settings
        if s.save:
            t, m, invstd, weight, bias, r, d, count = ctx.saved_tensors
            stats = None
            if count is None:
                count = torch.tensor(st.counts, dtype=invstd.dtype)
        else:
            t, weight, bias, m, invstd, r, d, stats = ctx.saved_tensors
            count = None
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formula itself
            return _double_backward(ctx, dy, t, weight, bias, m, r, d)
        needs = ctx.needs_input_grad[:3]
        if st.plain:
            grads = st.backend.train_backward(dy, t, s, stats, invstd, weight, bias, count, m, needs)
        else:
            grads = _backward_steps(st.backend, dy, t, s, stats, invstd, weight, bias, count, m, needs, st.combine,
                                    r, d)
        return (*grads, None, None, None, None, None, None)


def _composite(x, weight, bias, m, axis, eps, group_size, r=None, d=None, activation=None, slope=0.01, stats=None):
    """The training forward as plain differentiable torch ops (used for double backward).

    ``stats``: the ``(count, mean, m2)`` of ``x`` already reduced with grad, or None to reduce here.
    """
    count, mean, m2 = stats if stats is not None else _t.reduce(x, Settings(axis, group_size=group_size), m)
    invstd = torch.rsqrt(m2 / count.clamp_min(1) + eps)
    xhat = (x.to(mean.dtype) - _t.expand(mean, x, axis, group_size)) * _t.expand(invstd, x, axis, group_size)
    if r is not None:
        xhat = xhat * _t.expand(r, x, axis, group_size) + _t.expand(d, x, axis, group_size)
    shape = [1] * x.dim()
    shape[axis] = -1
    if weight is not None:
        xhat = xhat * weight.to(mean.dtype).reshape(shape)
    if bias is not None:
        xhat = xhat + bias.to(mean.dtype).reshape(shape)
    return _t.act(xhat, activation, slope).to(x.dtype)


_current_level = getattr(torch._C._functorch, "maybe_current_level", None)


def _functorch_active() -> bool:
    """True inside a torch.func transform (grad, vmap, jacrev, ...)."""
    return _current_level is not None and _current_level() is not None


_is_batched = getattr(torch._C._functorch, "is_batchedtensor", lambda t: False)


def _check_vmap_buffers(x, running_mean, running_var, name: str) -> None:
    """Under vmap, a batched input cannot update unbatched running buffers in place: torch's explanation."""
    if _is_batched(x) and not (_is_batched(running_mean) and _is_batched(running_var)):
        raise RuntimeError(
            f"{name} got a batched tensor as input while the running_mean or running_var, which will be updated in "
            "place, were not batched (torch.func.vmap). If you do not need running statistics, build the layer with "
            "track_running_stats=False; for an ensemble, vmap over torch.func.stack_module_state(models) so that "
            "every member has its own buffers; or run the layer in eval mode."
        )


def _traced_train(x, weight, bias, m, s: Settings, combine):
    """The training forward through :func:`_composite` (autograd differentiates it), with its statistics."""
    count, mean, m2 = _t.reduce(x, s, m)
    mean_c, var_c = mean.detach(), (m2 / count.clamp_min(1)).detach()
    corr = combine.correction(mean_c, var_c)
    r, d = corr if corr is not None else (None, None)
    y = _composite(x, weight, bias, m, s.axis, s.eps, s.group_size, r, d, s.activation, s.negative_slope,
                   stats=(count, mean, m2))
    return y, (count, mean_c, var_c)


def _double_backward(ctx, dy, x, weight, bias, m, r, d):
    """``create_graph=True``: the gradients of the composite formula, re-traced (every fused autograd Function's
    backward ends here); refused with ``memory="save"`` (no input kept) and for synchronized statistics."""
    st = ctx.state
    s = st.settings
    if s.save:
        raise NotImplementedError(
            "double backward (create_graph=True) is not available with memory='save': the input was "
            "not kept. Use memory='default' for gradient penalties."
        )
    if type(st.combine).stats is not Combine.stats:
        raise NotImplementedError(
            "double backward (create_graph=True) through synchronized batch statistics is not supported; "
            "compute the gradient penalty with a per-process BatchNorm instead."
        )
    inputs = [(i, t) for i, t in enumerate((x, weight, bias)) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        y = _composite(x, weight, bias, m, s.axis, s.eps, s.group_size, r, d, s.activation, s.negative_slope)
        grads = torch.autograd.grad(y, [t for _, t in inputs], dy, create_graph=True, allow_unused=True)
    out: list[torch.Tensor | None] = [None] * 9
    for (i, t), g in zip(inputs, grads):
        out[i] = g if g is not None else torch.zeros_like(t)
    return tuple(out)


def settings_for(axis: int, eps: float, group_size: int | None, activation: str | None, negative_slope: float,
                 memory: str, name: str = "BatchNorm") -> Settings:
    """The checked settings record of a call (activation and memory mode validated here)."""
    _checks.check_activation(activation, negative_slope, memory, name)
    return Settings(axis, eps, group_size, activation, float(negative_slope), memory == "save")


def normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    axis: int,
    eps: float,
    use_batch_stats: bool,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    update: bool = False,
    momentum: float | None = 0.1,
    num_batches_tracked: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    group_size: int | None = None,
    combine: Combine = _PLAIN,
    backend: str | None = None,
    name: str = "BatchNorm",
    activation: str | None = None,
    negative_slope: float = 0.01,
    memory: str = "default",
    settings: Settings | None = None,
    stacklevel: int = 4,
    on_refused=None,
) -> torch.Tensor:
    """The one code path behind every layer: validated input → reduce → combine → apply.

    ``axis`` must already be non-negative and checked. ``update=True`` updates the running buffers
    from the combined batch statistics (see :func:`update_running`). ``activation`` is fused into
    apply (forward) and into the backward kernels; ``memory="save"`` (training only) keeps the
    output instead of the input for backward (In-Place ABN, Rota Bulò et al. 2018). ``backend``
    forces a backend; otherwise :func:`batchnorm.kernels.dispatch.select` picks the cheapest one per
    call. ``settings`` (a layer's cached :class:`~batchnorm.kernels.backend.Settings`) replaces
    ``axis, eps, group_size, activation, negative_slope, memory`` when given (already checked). ``stacklevel``:
    where the non-finite-batch warning points, counted from :func:`_warn_not_finite` (layers pass 6: their caller).

    Refused batches (statistics not finite): on the CPU the warning is raised at once (reading the flag is free).
    On the GPU route (:func:`batchnorm.kernels.dispatch.device_type` is not ``"cpu"``) the flag stays a 0-d device
    tensor: ``on_refused(flag)`` receives it (a layer counts it on the device and reports later, see
    :attr:`batchnorm.BatchNorm.refused_batches`); without ``on_refused`` (the functional form) nothing is read back,
    and ``num_batches_tracked`` (not advanced by a refused batch) is the record. ``on_refused`` also receives
    ``False`` after each CPU warning, so a layer's count covers both routes.
    """
    s = settings if settings is not None else settings_for(axis, eps, group_size, activation, negative_slope, memory,
                                                            name)
    m = _checks.mask_for(x, axis, mask) if mask is not None else None
    local = type(combine).stats is Combine.stats  # no cross-process statistics
    if not use_batch_stats:
        if running_mean is None or running_var is None:
            raise ValueError(f"{name} has no running estimates to normalize with (track_running_stats=False).")
        return _eval(x, weight, bias, running_mean, running_var, s, backend)
    if x.numel() == 0 and local:
        # Empty batch: nothing to reduce; keep the graph connected (PyTorch does the same).
        if update and num_batches_tracked is not None:
            with torch.no_grad():
                num_batches_tracked.add_(1)
        c = x.shape[axis]
        sd = _t.stat_dtype(x.dtype)
        zeros, ones = x.new_zeros(c, dtype=sd), x.new_ones(c, dtype=sd)  # on x's device: no host data
        return COMPOSITE.eval_forward(x, s.replace(eps=-1.0), weight, bias, zeros, ones)
    on_cpu = dispatch.device_type(x) == "cpu"
    if local:
        _check_enough(x, axis, m, s.group_size, name, on_cpu and not torch.compiler.is_compiling())
    updating = update and running_mean is not None and running_var is not None
    plain = combine is _PLAIN or _plain(combine)
    params = (weight, bias, running_mean, running_var) if updating else (weight, bias)
    # torch.func transforms (grad, jacrev, vmap, ...) cannot run an autograd.Function written with a ctx-taking
    # forward, nor query layouts under vmap; torch.export must record one graph whatever the numba warm-up state:
    # both trace the same formula with plain differentiable torch ops (the composite backend)
    functorch = _functorch_active()
    traced = (functorch or torch.compiler.is_exporting()) and local
    if functorch and updating:
        _check_vmap_buffers(x, running_mean, running_var, name)
    ops = COMPOSITE if traced else dispatch.select(x, s, plain=plain, masked=m is not None, training=True,
                                                   backend=backend, params=params)
    running = (running_mean, running_var, num_batches_tracked, momentum) if updating else None
    if traced or (functorch and plain):
        y, stats = _traced_train(x, weight, bias, m, s, combine)
        finite = None
    elif ops.differentiable:  # native: ATen's autograd graph, running update and guard included
        y, stats, _, finite = ops.train_forward(x, s, m, weight, bias, running)
    else:
        stash: list = []  # (stats, finite); finite is set when the backend updated the buffers itself
        y = _TrainNorm.apply(x, weight, bias, m, s, ops, combine, running, stash)
        stats, finite = stash
    if updating:
        finite = _updated(ops, running, stats, finite)
        # is_compiling first: under torch.compile ``finite`` is a tensor and bool() would break the graph (and vmap
        # or export cannot read it either)
        if torch.compiler.is_compiling() or traced or functorch:
            pass
        elif on_cpu:
            if not bool(finite):
                _warn_not_finite(name, x, m, stacklevel)
                if on_refused is not None:
                    on_refused(False)
        elif on_refused is not None and isinstance(finite, torch.Tensor) and not finite.is_meta:
            on_refused(finite)  # the GPU route: no host read (see the docstring)
    return y


class RoutePlan:
    """A layer's call for one input signature on a backend without ATen's autograd (numba; triton, forced on CPU
    tensors), prepared once: the layer's fast path, as :class:`batchnorm.kernels.native.Plan` is for native.

    It does exactly what :func:`normalize` does for that plain call (no mask, local statistics), minus the
    checks and the :func:`batchnorm.kernels.dispatch.select` already made: ``mode`` ``"update"`` (batch
    statistics through :class:`_TrainNorm` and the running update of the backend's fused sequence, or
    :meth:`~batchnorm.kernels.backend.Backend.update_running` where the sequence leaves it), ``"batch"``
    (batch statistics, no update) or ``"eval"`` (``ops.eval_forward`` with the running statistics).

    Shape: ``x`` as at plan time. Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.BatchNorm(4, backend="composite")
        >>> _ = bn(torch.randn(8, 4)); _ = bn(torch.randn(8, 4))   # the first call prepares, the second runs it
        >>> type(next(iter(bn.__dict__["_fast"].values()))).__name__
        'RoutePlan'

    Reference: :func:`normalize` (the slow path it short-cuts).
    """

    __slots__ = ("key", "tensors", "shape", "mode", "settings", "ops", "momentum")

    def __init__(self, key, shape, mode: str, s: Settings, ops, momentum):
        self.key, self.shape, self.mode, self.settings, self.ops, self.momentum = key, shape, mode, s, ops, momentum
        self.tensors = (None,) * 5  # the layer's (weight, bias, running_mean, running_var, num_batches_tracked)

    @classmethod
    def build(cls, key, x: torch.Tensor, s: Settings, mode: str, momentum, ops) -> RoutePlan | None:
        """A plan for ``ops`` (the backend ``select`` chose), or None where only the slow path can serve."""
        if ops.differentiable or x.numel() == 0 or dispatch.device_type(x) != "cpu":
            return None
        return cls(key, tuple(x.shape), mode, s, ops, momentum)

    def run(self, x, weight, bias, rm, rv, nbt):
        """``(y, finite)``: the call on ``x`` and the layer's current tensors (``finite`` False: refused batch)."""
        mode, ops, s = self.mode, self.ops, self.settings
        if mode == "eval":
            return ops.eval_forward(x, s, weight, bias, rm, rv), True
        stash: list = []
        running = (rm, rv, nbt, self.momentum) if mode == "update" else None
        y = _TrainNorm.apply(x, weight, bias, None, s, ops, _PLAIN, running, stash)
        if mode != "update":
            return y, True
        return y, bool(_updated(ops, running, *stash))


def _updated(ops, running, stats, finite):
    """``finite`` of a training call whose backend sequence did the running update itself, else the update rule
    applied now (:meth:`~batchnorm.kernels.backend.Backend.update_running`; ``running = (mean, var, nbt, momentum)``)."""
    if finite is not None:
        return finite
    rm, rv, nbt, momentum = running
    return ops.update_running(rm, rv, stats[1], stats[2], stats[0], momentum, nbt)


def _warn_not_finite(name: str, x: torch.Tensor, m: torch.Tensor | None, stacklevel: int = 4) -> None:
    """The RuntimeWarning of a refused batch, naming the real cause (non-finite input, or overflow of finite input).

    ``stacklevel`` counts from this function (4: the caller of :func:`batch_norm`; layers pass their own depth).
    """
    with torch.no_grad():
        counted = x if m is None else torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
        finite_input = bool(torch.isfinite(counted).all())
    if finite_input:
        big = float(counted.abs().max()) if counted.numel() else 0.0
        sd = _t.stat_dtype(x.dtype)
        cause = (
            f"the input is finite, but values up to {big:.3g} overflow the {str(sd).replace('torch.', '')} "
            "statistics: their square exceeds its range. Compute this layer in float64 (layer.double() and "
            "x.double()), or rescale the input (e.g. divide it by a constant)"
        )
    else:
        cause = "NaN or Inf in the input"
    warnings.warn(
        f"{name}: batch statistics are not finite ({cause}); the running estimates and num_batches_tracked "
        "were left unchanged for this batch.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _check_enough(x: torch.Tensor, axis: int, m: torch.Tensor | None, group_size: int | None, name: str,
                  read_mask: bool = True) -> None:
    """Refuse a training batch with ≤ 1 counted value per feature (in any ghost group).

    Without a mask the count follows from the shape. With a mask it is data: it is read only where that is free
    (``read_mask``: eager on the CPU). On the GPU route and under ``torch.compile`` a masked batch with ≤ 1 counted
    value per feature is not an error: it is normalized (its output is finite) and leaves the running estimates
    unchanged (:func:`update_running` requires more than one value), as an empty batch does in PyTorch.
    """
    grouped = group_size is not None and axis != 0
    if m is None:
        n = x.numel() // x.shape[axis]
        if grouped:
            rows = x.shape[0]
            last = rows - (_t.num_groups(rows, group_size) - 1) * group_size
            n = n // rows * min(group_size, last)
        masked = False
    elif not read_mask:
        return
    else:
        flat = m.expand(*[s if d != axis else 1 for d, s in enumerate(x.shape)]).squeeze(axis)
        if grouped:
            per_row = flat.reshape(x.shape[0], -1).sum(1)
            index = torch.arange(x.shape[0], device=x.device) // group_size
            groups = per_row.new_zeros(_t.num_groups(x.shape[0], group_size))
            n = int(groups.index_add(0, index, per_row).min())
        else:
            n = int(flat.sum())
        masked = True
    if n <= 1:
        raise _checks.too_few_values(n, tuple(x.shape), masked, name)


def _eval(x, weight, bias, running_mean, running_var, s: Settings, backend):
    """Eval-mode batch norm with the running statistics, on the backend :func:`dispatch.select` picks
    (the composite one inside torch.func transforms, where layouts cannot be queried)."""
    if _functorch_active():
        ops = COMPOSITE
    else:
        ops = dispatch.select(x, s, training=False, backend=backend, params=(weight, bias, running_mean, running_var))
    return ops.eval_forward(x, s, weight, bias, running_mean, running_var)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def backend_for(layer, x: torch.Tensor, mask: torch.Tensor | None = None):
    """The backend ``layer(x, mask)`` would run on now (:func:`batchnorm.kernels.dispatch.chosen`)."""
    axis = _checks.normalize_axis(layer.axis, x.dim(), x.shape)
    rm, rv = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    batch = layer.training or rm is None or rv is None
    group = layer._group_size(x) if layer.training and hasattr(layer, "_group_size") else None
    s = settings_for(axis, layer.eps, group, getattr(layer, "activation", None), getattr(layer, "negative_slope", 0.01),
                     getattr(layer, "memory", "default"), type(layer).__name__)
    backend = getattr(layer, "backend", None)
    if not batch:
        return dispatch.select(x, s, training=False, backend=backend, params=(weight, bias, rm, rv))
    combine = layer._combine() if hasattr(layer, "_combine") else _PLAIN
    updating = layer.training and getattr(layer, "track_running_stats", False) and rm is not None
    params = (weight, bias, rm, rv) if updating else (weight, bias)
    return dispatch.select(x, s, plain=combine is _PLAIN or _plain(combine), masked=mask is not None, training=True,
                           backend=backend, params=params)


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    mask: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch normalization of ``x`` along feature axis ``axis`` (functional form).

    Training (or no running estimates): ``y = γ · (x − μ_B) / sqrt(σ²_B + ε) + β`` with the
    batch mean ``μ_B`` and *biased* variance ``σ²_B`` over every axis but ``axis`` (only where
    ``mask`` is true; every position is normalized). The running buffers, if given, are updated in
    place: ``running = (1 − momentum) · running + momentum · new`` with the *unbiased* variance
    (``momentum=None`` needs ``num_batches_tracked`` and gives a cumulative average).
    Evaluation: ``y = γ · (x − running_mean) / sqrt(running_var + ε) + β``.

    The backward is analytic (``dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy·x̂))``) and differentiable
    again, so gradient penalties work.

    Shape:
        x: ``(N, C, *)`` for ``axis=1`` or ``(N, *, C)`` for ``axis=-1``, any rank ≥ 2;
        running buffers, weight, bias: ``(C,)``; mask: x's shape without ``axis``. Output: x's shape,
        dtype and memory format.

    Example::

        >>> x = torch.randn(16, 4, 10)
        >>> rm, rv = torch.zeros(4), torch.ones(4)
        >>> y = batch_norm(x, rm, rv, training=True)   # rm, rv now moved 10% toward the batch
        >>> y.mean((0, 2)).abs().max() < 1e-5
        tensor(True)

    Reference: Ioffe & Szegedy (2015), Algorithms 1 and 2; ``torch.nn.functional.batch_norm``.
    """
    x = _checks.check_input(x, "batch_norm")
    ax = _checks.normalize_axis(axis, x.dim(), x.shape)
    eps = _checks.check_eps(eps)
    momentum = _checks.check_momentum(momentum)
    c = x.shape[ax]
    for label, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (c,):
            raise ValueError(
                f"batch_norm expected {label} of shape ({c},) for input of shape {tuple(x.shape)} with axis={axis}, "
                f"got {tuple(t.shape)}. Pass per-feature tensors of length {c}, or set axis= to the feature axis."
            )
    use_batch = training or running_mean is None or running_var is None
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError(
            "batch_norm expected num_batches_tracked with momentum=None (a cumulative average divides by it), "
            "got None. Pass num_batches_tracked=torch.tensor(0) (updated in place), or a float momentum."
        )
    return normalize(
        x, weight, bias, axis=ax, eps=eps, use_batch_stats=use_batch,
        running_mean=running_mean, running_var=running_var,
        update=training and running_mean is not None and running_var is not None,
        momentum=momentum, num_batches_tracked=num_batches_tracked, mask=mask, name="batch_norm",
    )
