"""SyncBatchNorm: batch statistics of the union of the batches of every process in a group.

Only the *combine* step changes (see :mod:`batchnorm.functional`): the local per-feature
``(count, mean, m2)`` of every process are gathered with one ``torch.distributed`` collective and
merged exactly (Chan et al.), and in the backward the two per-feature sums ``(Σ dy, Σ dy·x̂)`` are
all-reduced. Reduce and apply are the same kernels as :class:`~batchnorm.BatchNorm`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .. import _checks
from .. import functional as F
from .base import BatchNorm


def _group_world(process_group) -> int:
    """World size of ``process_group`` (default group if None), or 1 outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _collective_failed(what: str, world: int, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"SyncBatchNorm: the {what} across the {world} processes of the process group failed "
        f"({type(err).__name__}: {err}). Another process probably died, raised an error, or did not reach this "
        "layer within the process group's timeout (set it with torch.distributed.init_process_group(timeout=...)). "
        "Every process must run the same SyncBatchNorm layers in the same order, also with an empty batch; "
        "if that cannot be guaranteed, use a per-process BatchNorm instead."
    )


class SyncCombine(F.Combine):
    """*Combine* across processes: exact merge of ``(count, mean, m2)`` and an all-reduce of the backward sums.

    Forward: one ``all_gather`` of ``[count, mean, m2, positions]`` per process (in float64), then
    ``n = Σ_r n_r``, ``μ = Σ_r n_r μ_r / n``, ``M2 = Σ_r M2_r + Σ_r n_r (μ_r − μ)²`` — every term is
    centred, so there is no ``E[x²] − E[x]²`` cancellation, and a process with an empty batch
    (``n_r = 0``) contributes nothing but still takes part in the collective. Backward: one
    ``all_reduce(SUM)`` of ``(Σ dy, Σ dy·x̂)``. Both happen inside the autograd function on detached
    tensors, so autograd never differentiates through a collective.

    Shape: every statistic is ``(G, C)`` (G = 1 unless ghost groups are used; groups with the same
    index are merged across processes).
    """

    def __init__(self, process_group, world: int, positions: int, shape: tuple[int, ...], masked: bool, name: str):
        self.process_group = process_group
        self.world = world
        self.positions = positions
        self.shape = shape
        self.masked = masked
        self.name = name

    def stats(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
        dtype = mean.dtype
        positions = torch.full_like(count, float(self.positions))
        local = torch.stack([count, mean, m2, positions]).to(torch.float64)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        try:
            dist.all_gather(gathered, local.contiguous(), group=self.process_group)
        except Exception as err:  # gloo raises RuntimeError/DistBackendError; say what it means here
            raise _collective_failed("all_gather of batch statistics", self.world, err) from err
        allstats = torch.stack(gathered)  # (W, 4, G, C)
        counts, means, m2s, pos = allstats.unbind(1)
        n = counts.sum(0)
        mu = (counts * means).sum(0) / n.clamp_min(1)
        total_m2 = m2s.sum(0) + (counts * (means - mu) ** 2).sum(0)
        n_global = int(n.min())
        if n_global <= 1 and not (n_global == 0 and int(pos.sum(0).max()) == 0):
            err = _checks.too_few_values(n_global, self.shape, self.masked, self.name)
            raise ValueError(
                f"{err} (The count is global: summed over the {self.world} processes of the process group; "
                f"this process's input has shape {self.shape}.)"
            )
        return n.to(count.dtype), mu.to(dtype), total_m2.to(dtype)

    def grads(self, sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor):
        both = torch.stack([sum_dy, sum_dy_xhat]).contiguous()
        try:
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=self.process_group)
        except Exception as err:
            raise _collective_failed("all_reduce of gradient sums", self.world, err) from err
        return both[0], both[1]


class SyncBatchNorm(BatchNorm):
    r"""Batch normalization whose training statistics are those of the union of all processes' batches.

    With processes ``r = 1..W`` of ``process_group`` holding batches ``B_r`` (any sizes, empty
    allowed), training normalizes every process's input with the statistics of ``∪_r B_r``::

        μ = Σ_r Σ_{i∈B_r} x_ic / n          σ² = Σ_r Σ_{i∈B_r} (x_ic − μ)² / n          n = Σ_r |B_r|

    and updates the running estimates with them (unbiased ``σ² · n/(n − 1)``), so every process ends
    with the same running statistics. The backward all-reduces ``(Σ dy, Σ dy·x̂)``, so the input
    gradient on each process is the gradient of the *sum* of all processes' losses — exactly what a
    single process would compute on the concatenated batch. Parameter gradients stay local (DDP
    all-reduces them). The "more than 1 value per feature" check uses the global count ``n``.

    Evaluation mode, ``torch.distributed`` not initialized, or a group of one process: exactly
    :class:`BatchNorm` (no collective at all). As ``torch.nn.SyncBatchNorm``, every process of the
    group must call the layer the same number of times in the same order (also with an empty batch);
    a process that dies makes the others fail with a RuntimeError once the collective notices (at
    the latest after the process group's timeout). Runs on CPU with gloo; CUDA with NCCL is expected
    to work but is untested here. Double backward through synchronized statistics is not supported.

    Args: as :class:`BatchNorm` (other keyword options, such as a fused activation, are passed on to
    it), plus ``process_group`` (None: the default group).

    Shape: as :class:`BatchNorm`: ``(N, C, *)`` or ``(N, *, C)`` with ``axis=-1``; ``N`` may differ
    between processes and may be 0.

    Example (in a script started with ``torchrun --nproc_per_node=2 train.py``, after
    ``torch.distributed.init_process_group("gloo")``, convert a model and wrap it:
    ``DistributedDataParallel(batchnorm.convert(model, to=batchnorm.SyncBatchNorm))``; see
    ``examples/ddp_train.py``). Outside torch.distributed it is BatchNorm::

        >>> layer = SyncBatchNorm(8)
        >>> x = torch.randn(4, 8, 10)
        >>> torch.equal(layer(x), BatchNorm(8)(x))
        True

    Reference: Ioffe & Szegedy (2015); synchronized BN as in Peng et al., "MegDet: A Large
    Mini-Batch Object Detector", CVPR 2018, and ``torch.nn.SyncBatchNorm``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        bias: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, axis=axis, device=device, dtype=dtype,
            bias=bias, **options,
        )
        self.process_group = process_group
        self._local: tuple[int, tuple[int, ...]] = (0, ())

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` spelling of ``batchnorm.convert(module, to=cls)``.

        Returns a new model (the original is untouched; torch's version converts in place).
        """
        from ..tools.convert import convert

        return convert(module, to=cls, process_group=process_group)

    def _validated(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        x, axis = super()._validated(x)
        # remember positions per feature of this process's batch: the global empty-batch check needs it
        self._local = (x.numel() // max(x.shape[axis], 1), tuple(x.shape))
        return x, axis

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``x`` with the statistics of all processes' batches (training) or the running ones."""
        self._masked = mask is not None
        return super().forward(x, mask)

    def _combine(self) -> F.Combine:
        world = _group_world(self.process_group)
        if world <= 1 or not self.training:
            return F.Combine()
        positions, shape = self._local
        return SyncCombine(self.process_group, world, positions, shape, getattr(self, "_masked", False), "SyncBatchNorm")

    def _group_size(self, x: torch.Tensor) -> int | None:
        return None
