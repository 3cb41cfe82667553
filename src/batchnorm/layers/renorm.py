"""BatchRenorm: batch normalization whose training output is corrected toward the running estimates."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import functional as bnf
from ..kernels import dispatch
from ..kernels.backend import SavedState
from .base import BatchNorm


@torch.library.custom_op("batchnorm::renorm_keep", mutates_args=())
def _keep(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that AOT autograd must save for the backward instead of recomputing it there.

    Why: under ``torch.compile(backend="aot_eager")`` the min-cut partitioner recomputed ``r`` and ``d`` in the
    backward graph from the running buffers, which the forward graph has already updated in place, so the weight
    gradient used the *new* running estimates (relative error 0.2-0.4 in probes). A custom op is never recomputed.
    """
    return t.clone()


@_keep.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def _check_limit(value: float, name: str, low: float, why: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < low:
        raise ValueError(f"BatchRenorm expected {name} >= {low:g}, got {value!r}. {why}")
    return float(value)


class RenormCombine(bnf.Combine):
    """The *combine* step of batch renormalization: batch statistics plus the ``(r, d)`` correction.

    ``r = clamp(σ_B / σ, 1/r_max, r_max)``, ``d = clamp((μ_B − μ) / σ, −d_max, d_max)`` with
    ``σ_B = sqrt(var_B + eps)`` (biased batch variance), ``σ = sqrt(running_var + eps)`` and
    ``μ = running_mean`` as they are when :meth:`correction` runs (before this step's update).
    ``r_max`` and ``d_max`` may be floats or 0-d tensors (the warm-up ramp, no host sync).

    Shape: running buffers ``(C,)``; ``mean, var`` and the returned ``r, d`` are ``(G, C)``.

    Example::

        >>> comb = RenormCombine(torch.zeros(2), torch.ones(2), 0.0, r_max=2.0, d_max=1.0)
        >>> comb.correction(torch.tensor([[0.5, 3.0]]), torch.tensor([[9.0, 0.25]]))
        (tensor([[2.0000, 0.5000]]), tensor([[0.5000, 1.0000]]))

    Reference: Ioffe, "Batch Renormalization", NeurIPS 2017, Algorithm 1.
    """

    def __init__(self, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, r_max, d_max) -> None:
        self.running_mean = running_mean
        self.running_var = running_var
        self.eps = eps
        self.r_max = r_max
        self.d_max = d_max

    def correction(self, mean: torch.Tensor, var: torch.Tensor):
        # r and d are constants for the backward (stop-gradient in the paper): computed from detached statistics
        # (not under no_grad, which torch.export records as an op that torch.export.save cannot serialize)
        mean, var = mean.detach(), var.detach()
        sd = mean.dtype
        sigma = torch.sqrt(self.running_var.to(device=mean.device, dtype=sd) + self.eps)
        r = torch.sqrt(var + self.eps) / sigma
        d = (mean - self.running_mean.to(device=mean.device, dtype=sd)) / sigma
        if isinstance(self.r_max, torch.Tensor) or isinstance(self.d_max, torch.Tensor):
            r_max = torch.as_tensor(self.r_max, dtype=sd, device=mean.device)
            d_max = torch.as_tensor(self.d_max, dtype=sd, device=mean.device)
            r = torch.minimum(torch.maximum(r, 1.0 / r_max), r_max)
            d = torch.minimum(torch.maximum(d, -d_max), d_max)
        else:  # plain floats: two fused clamps, no tensors to build
            r = r.clamp(1.0 / self.r_max, self.r_max)
            d = d.clamp(-self.d_max, self.d_max)
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            r, d = _keep(r), _keep(d)  # saved, not recomputed from the updated running buffers (see _keep)
        return r, d


class _FusedRenorm(torch.autograd.Function):
    """Batch renorm's training step on a backend with fused renorm sequences (triton's ``renorm_forward`` /
    ``renorm_backward``: 3 launches each way, the running update and the warm-up ramp inside the forward's finalize).

    The same math as :class:`RenormCombine` composed by ``functional._TrainNorm`` (``r, d`` from the running
    estimates before the update, constants for the backward); double backward re-traces the composite formula.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, m, s, ops, limits, running, stash):
        r_max, d_max, warmup = limits
        y, stats, invstd, rd, finite = ops.renorm_forward(x, s, m, weight, bias, running[0], running[1], r_max, d_max,
                                                          running, warmup=warmup)
        stash.append(finite)
        if s.save:  # memory="save": the output, the count per group (one column), not the input
            ctx.save_for_backward(y, m, invstd, weight, bias, rd, stats[0][:, :1])
        else:
            ctx.save_for_backward(x, m, invstd, weight, bias, rd, stats)
        ctx.state = SavedState(s, ops, bnf._PLAIN, False, True)  # (the combine field: local statistics)
        return y

    @staticmethod
    def backward(ctx, dy):
        st = ctx.state
        s = st.settings
        t, m, invstd, weight, bias, rd, saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formula itself
            return bnf._double_backward(ctx, dy, t, weight, bias, m, rd[0], rd[1])
        count, stats = (saved, None) if s.save else (None, saved)
        grads = st.backend.renorm_backward(dy, t, s, stats, invstd, weight, bias, count, m, ctx.needs_input_grad[:3],
                                           rd)
        return (*grads, None, None, None, None, None, None)


class BatchRenorm(BatchNorm):
    r"""Batch Renormalization: training normalizes with batch statistics *corrected* toward the running ones.

    Training, per feature, with batch mean ``μ_B`` and biased batch variance ``σ²_B`` (only where
    ``mask`` is true), and the running estimates as they are *before* this step's update::

        σ_B = sqrt(σ²_B + eps)            σ = sqrt(running_var + eps)          μ = running_mean
        r   = clamp(σ_B / σ, 1/r_max, r_max)          (no gradient)
        d   = clamp((μ_B − μ) / σ, −d_max, d_max)     (no gradient)
        y   = γ · ((x − μ_B) / σ_B · r + d) + β

    then the running estimates update exactly as in :class:`BatchNorm` (unbiased variance,
    ``momentum`` = weight of the new batch, default 0.01: Keras' 0.99, torchrl's 0.01). When the
    clamps do not bind, ``y`` equals the inference output ``γ · (x − μ) / σ + β``, so training and
    inference agree; gradients still flow through ``μ_B`` and ``σ_B``. Evaluation is plain
    inference with the running estimates. The backward treats ``r`` and ``d`` as constants.

    **Warm-up.** With ``warmup_steps = T > 0``, at training step ``t`` (the value of
    ``num_batches_tracked`` before the step, i.e. the number of batches the running estimates have
    absorbed) the limits are ``r_max(t) = 1 + (r_max − 1) · min(t/T, 1)`` and
    ``d_max(t) = d_max · min(t/T, 1)``: step 0 is plain batch norm, and the correction is relaxed
    linearly while the running estimates become trustworthy. No extra buffer is used, so the state
    dict is exactly :class:`BatchNorm`'s (``torch.nn.BatchNorm*d`` checkpoints load; a loaded
    checkpoint with ``num_batches_tracked ≥ T`` starts fully relaxed). Batches with non-finite
    statistics do not advance ``num_batches_tracked`` and so do not advance the ramp.
    ``r_max`` and ``d_max`` must be finite when ``warmup_steps > 0``; without warm-up ``inf`` means no clamp.
    For any other schedule (the paper holds plain BN for 5k steps, then relaxes), keep
    ``warmup_steps=0`` and assign ``layer.r_max`` / ``layer.d_max`` from the training loop: they are
    read at every training step.

    **track_running_stats=False** leaves nothing to correct toward: the layer is then plain
    :class:`BatchNorm` with batch statistics in training and evaluation.

    **Versus Keras 3** (``BatchNormalization(renorm=True)``): Keras keeps a *separate* pair of
    renorm averages (``renorm_mean``, ``renorm_stddev``, updated with ``renorm_momentum``) for
    ``r, d``, tracks the inference statistics as a moving standard deviation (its variance is
    ``moving_stddev² − eps``, averaged from biased batch variances), floors ``renorm_stddev`` at
    ``sqrt(eps)``, takes ``rmin``, ``rmax``, ``dmax`` independently (unset = no clamp, the default)
    and has no built-in warm-up.
    Here ``r, d`` use the same running mean/variance that inference uses, with the unbiased
    variance, so a checkpoint has the :class:`BatchNorm` keys and nothing else.

    Args:
        num_features, eps, momentum, affine, track_running_stats, axis, device, dtype, bias: as
            :class:`BatchNorm` (``bias=False`` keeps ``γ`` and drops ``β``).
        activation, negative_slope, memory, backend: keyword-only, as :class:`BatchNorm` (fused activation,
            memory="save", kernel path).
        r_max: ≥ 1; bound of the scale correction (1 → no scale correction). Paper: 3.
        d_max: ≥ 0; bound of the shift correction in units of σ (0 → none). Paper: 5.
        warmup_steps: training steps over which the limits ramp from (1, 0) to (r_max, d_max).

    Shape: as :class:`BatchNorm`: any rank ≥ 2, C at ``axis``; output like the input.

    Example::

        >>> layer = BatchRenorm(32, r_max=3.0, d_max=5.0, warmup_steps=5000)
        >>> y = layer(torch.randn(4, 32, 16, 16))        # small batches are fine
        >>> layer.num_batches_tracked                     # the warm-up clock
        tensor(1)

    Reference: S. Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models", NeurIPS 2017.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        device: Any = None,
        dtype: Any = None,
        bias: bool = True,
        **options: Any,
    ) -> None:
        self.r_max = _check_limit(
            r_max, "r_max", 1.0, "r bounds sigma_batch / sigma_running in [1/r_max, r_max]; r_max=1 disables the "
            "scale correction (the paper uses 3)."
        )
        self.d_max = _check_limit(
            d_max, "d_max", 0.0, "d bounds (mean_batch - mean_running) / sigma_running in [-d_max, d_max]; d_max=0 "
            "disables the shift correction (the paper uses 5)."
        )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(
                f"BatchRenorm expected warmup_steps to be an int >= 0, got {warmup_steps!r}. It is the number of "
                "training steps over which r_max ramps from 1 and d_max from 0 (0 = no warm-up)."
            )
        if warmup_steps > 0 and not (math.isfinite(self.r_max) and math.isfinite(self.d_max)):
            raise ValueError(
                f"BatchRenorm expected finite r_max and d_max with warmup_steps={warmup_steps}, got r_max={r_max!r}, "
                f"d_max={d_max!r}. The warm-up ramps linearly toward them; pass finite limits or warmup_steps=0."
            )
        self.warmup_steps = warmup_steps
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, axis=axis, device=device, dtype=dtype, bias=bias,
            **options,  # activation=, negative_slope=, memory=, backend=: as BatchNorm
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"

    def current_limits(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """``(r_max(t), d_max(t))`` for the next training step (floats without warm-up, 0-d tensors with it)."""
        if self.warmup_steps == 0 or self.num_batches_tracked is None:
            return self.r_max, self.d_max
        frac = (self.num_batches_tracked.to(torch.float64) / self.warmup_steps).clamp(max=1.0)
        return 1.0 + (self.r_max - 1.0) * frac, self.d_max * frac

    def _combine(self) -> bnf.Combine:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return bnf.Combine()
        r_max, d_max = self.current_limits()
        return RenormCombine(self.running_mean, self.running_var, self.eps, r_max, d_max)

    def _fused_training(self, x: torch.Tensor, mask, axis: int, s) -> torch.Tensor | None:
        """A training step with running estimates on a backend with fused renorm sequences (triton: the GPU route, or
        ``backend="triton"``): 3 launches forward, 3 backward, the warm-up ramp evaluated in the kernel from
        ``num_batches_tracked`` (:meth:`current_limits`' rule). None where the common path serves the call (another
        backend, an empty batch, ``torch.compile`` / export / ``torch.func``, a subclass with its own combine).
        A subclass that overrides :meth:`current_limits` gets its limits passed as they are."""
        cls = type(self)
        if cls._combine is not BatchRenorm._combine:
            return None
        route = self._fused_route(x, mask, axis, s, "renorm_forward")
        if route is None:
            return None
        ops, w, b, rm, rv, nbt, m = route
        bnf._check_enough(x, axis, m, s.group_size, cls.__name__, dispatch.device_type(x) == "cpu")
        if cls.current_limits is BatchRenorm.current_limits:
            limits = (self.r_max, self.d_max, self.warmup_steps if nbt is not None else 0)
        else:
            limits = (*self.current_limits(), 0)
        stash: list = []
        y = _FusedRenorm.apply(x, w, b, m, s, ops, limits, (rm, rv, nbt, self.momentum), stash)
        self._report_fused(x, m, stash[0], stacklevel=7)
        return y
