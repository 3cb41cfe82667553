"""GhostBatchNorm: batch normalization over consecutive virtual batches of the batch axis."""

from __future__ import annotations

from typing import Any

import torch

from .. import _checks
from ..kernels import dispatch
from . import _export
from .base import BatchNorm


class GhostBatchNorm(BatchNorm):
    r"""Ghost Batch Normalization: in training, each virtual batch of ``virtual_batch_size`` rows is normalized alone.

    Training: axis 0 is split into consecutive virtual batches ``B_g`` of ``virtual_batch_size``
    rows (the last one may be shorter, as long as it has more than one counted value per feature);
    each is normalized with its own statistics, over all its positions where ``mask`` is true::

        y = γ · (x − μ_g) / sqrt(σ²_g + eps) + β             for x in B_g (σ²_g biased)
        running_mean ← (1 − momentum) · running_mean + momentum · mean_g(μ_g)
        running_var  ← (1 − momentum) · running_var  + momentum · mean_g(σ²_g · n_g / (n_g − 1))

    The running estimates update *once per forward*, with the plain mean over virtual batches of
    their means and of their unbiased variances (a shorter last batch weighs as much as a full one).
    Evaluation uses the running estimates and no ghost batches (tf.keras applied ghost batches at
    inference too, TF issue #23050, which makes a sample's prediction depend on its batch neighbours).
    With ``track_running_stats=False`` evaluation normalizes with the statistics of the whole batch.
    ``virtual_batch_size ≥ N`` gives exactly :class:`BatchNorm`.
    A virtual batch with ≤ 1 counted value per feature is an error that names it; with a mask that count is
    data, so it is checked only eagerly on the CPU: on the GPU route and under ``torch.compile`` (no host read)
    such a virtual batch is normalized without error and the step leaves the running estimates unchanged.

    Use it to keep the regularizing noise of small-batch statistics while training with large
    batches (large-batch training, data-parallel steps with big per-device batches).

    Args:
        num_features, eps, momentum, affine, track_running_stats, axis, device, dtype, bias: as
            :class:`BatchNorm` (``bias=False`` keeps ``γ`` and drops ``β``).
        activation, negative_slope, memory, backend: keyword-only, as :class:`BatchNorm` (fused activation,
            memory="save", kernel path).
        virtual_batch_size: rows of axis 0 per virtual batch, ≥ 2. The feature axis cannot be 0.

    Shape: input ``(N, C, *)`` (or C at ``axis`` ≠ 0), any rank ≥ 2; output the same.

    Example::

        >>> gbn = GhostBatchNorm(64, virtual_batch_size=32)
        >>> y = gbn(torch.randn(256, 64))                 # 8 virtual batches of 32 rows
        >>> gbn.num_batches_tracked                       # one running update per forward
        tensor(1)

    Reference: E. Hoffer, I. Hubara and D. Soudry, "Train longer, generalize better: closing the
    generalization gap in large batch training of neural networks", NeurIPS 2017 (Ghost Batch Normalization).
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        device: Any = None,
        dtype: Any = None,
        bias: bool = True,
        **options: Any,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 2:
            raise ValueError(
                f"GhostBatchNorm expected virtual_batch_size to be an int >= 2, got {virtual_batch_size!r}. A virtual "
                "batch of one row has no statistics; use at least 2 (typical values are 16-128)."
            )
        if axis == 0:
            raise ValueError(_axis0_message(axis, None))
        self.virtual_batch_size = virtual_batch_size
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, axis=axis, device=device, dtype=dtype, bias=bias,
            **options,  # activation=, negative_slope=, memory=, backend=: as BatchNorm
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _group_size(self, x: torch.Tensor) -> int | None:
        return self.virtual_batch_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``x``; in training each virtual batch uses its own statistics (see the class docstring)."""
        if _export.tracing(x):  # fx/jit/export: BatchNorm.forward decides (no checks on Proxies)
            return super().forward(x, mask)
        x = _checks.check_input(x, "GhostBatchNorm")
        axis = _checks.normalize_axis(self.axis, x.dim(), x.shape)
        if axis == 0:
            raise ValueError(_axis0_message(self.axis, tuple(x.shape)))
        if self.training and x.numel() > 0 and x.shape[axis] == self.num_features:
            if mask is None or (dispatch.device_type(x) == "cpu" and not torch.compiler.is_compiling()):
                self._check_virtual_batches(x, axis, mask)  # a mask's counts are data: read only where it is free
        return super().forward(x, mask)

    def _check_virtual_batches(self, x: torch.Tensor, axis: int, mask: torch.Tensor | None) -> None:
        """Refuse a virtual batch with ≤ 1 counted value per feature, naming which one."""
        rows, vbs = x.shape[0], self.virtual_batch_size
        groups = -(-rows // vbs)
        m = _checks.mask_for(x, axis, mask)
        if m is None:
            per_row = x.numel() // (rows * x.shape[axis])
            last = rows - (groups - 1) * vbs
            counts = [per_row * vbs] * (groups - 1) + [per_row * last]
        else:
            full = m.expand(*[s if d != axis else 1 for d, s in enumerate(x.shape)]).squeeze(axis)
            per_row_t = full.reshape(rows, -1).sum(1)
            index = torch.arange(rows, device=x.device) // vbs
            counts = per_row_t.new_zeros(groups).index_add(0, index, per_row_t).tolist()
        worst = min(range(groups), key=lambda g: counts[g])
        n = int(counts[worst])
        if n <= 1:
            start, stop = worst * vbs, min((worst + 1) * vbs, rows)
            how = " (counting only positions where mask is True)" if m is not None else ""
            raise ValueError(
                f"GhostBatchNorm expected more than 1 value per feature in every virtual batch when training, got {n}"
                f"{how} in virtual batch {worst} (rows {start}..{stop - 1} of {rows}, virtual_batch_size={vbs}) for "
                f"input of shape {tuple(x.shape)}. Instead: use a batch size that is a multiple of "
                f"virtual_batch_size (e.g. DataLoader(..., drop_last=True)), a larger virtual_batch_size, or "
                "model.eval() to normalize with the running estimates."
            )


def _axis0_message(axis: int, shape: tuple[int, ...] | None) -> str:
    where = f" for input of shape {shape}" if shape is not None else ""
    return (
        f"GhostBatchNorm splits axis 0 into virtual batches, so the feature axis cannot be axis 0, got axis={axis}"
        f"{where}. Put the batch first and the features at axis=1 or axis=-1 (e.g. x.movedim(0, -1))."
    )
