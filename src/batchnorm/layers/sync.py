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
from .. import functional as bnf
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


class ProcessGroupMismatchError(RuntimeError, ValueError):
    """The processes of a group called a :class:`SyncBatchNorm` with different feature counts or dtypes.

    Raised on every rank (each sees all ranks' values), before any collective whose size depends on
    them, so no rank aborts inside the communication backend. A ``RuntimeError`` as torch's
    collective errors, and a ``ValueError`` as the other input errors of this package.
    """


# input dtypes by code for the rank agreement check (0: any other dtype)
_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else 0


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]).replace("torch.", "") if 0 < code < len(_DTYPES) else "another dtype"


def _mismatch(name: str, world: int, table: list[tuple[int, int]]) -> ProcessGroupMismatchError:
    """Error naming every rank's (features, input dtype); ``table[r]`` is rank r's pair."""
    ranks = "; ".join(f"rank {r}: {c} features, {_dtype_name(d)}" for r, (c, d) in enumerate(table))
    what = []
    if len({c for c, _ in table}) > 1:
        what.append("feature counts")
    if len({d for _, d in table}) > 1:
        what.append("input dtypes")
    return ProcessGroupMismatchError(
        f"{name}: the {world} processes of the process group disagree on the {' and '.join(what)} of this layer "
        f"({ranks}). Every process must build the same model (same num_features for each SyncBatchNorm) and feed "
        "inputs of the same dtype (cast with x.to(dtype), or use the same autocast settings on every rank); "
        "no collective was run with mismatched sizes."
    )


class SyncCombine(bnf.Combine):
    """*Combine* across processes: exact merge of ``(count, mean, m2)`` and an all-reduce of the backward sums.

    Before the first gather of a layer, one fixed-size ``all_gather`` of ``(features, dtype, groups)``
    checks that every rank agrees (a mismatch would make gloo abort the process on the size-dependent
    gather); every later gather carries ``(features, dtype)`` too, so a rank that changes its input
    dtype later is caught before the dtype-dependent backward all-reduce. Disagreement raises
    :class:`ProcessGroupMismatchError` on every rank.

    Forward: one ``all_gather`` of ``[count, mean, m2, positions]`` per process (in float64), then
    ``n = Σ_r n_r``, ``μ = Σ_r n_r μ_r / n``, ``M2 = Σ_r M2_r + Σ_r n_r (μ_r − μ)²`` — every term is
    centred, so there is no ``E[x²] − E[x]²`` cancellation, and a process with an empty batch
    (``n_r = 0``) contributes nothing but still takes part in the collective. Backward: one
    ``all_reduce(SUM)`` of ``(Σ dy, Σ dy·x̂)``. Both happen inside the autograd function on detached
    tensors, so autograd never differentiates through a collective.

    Shape: every statistic is ``(G, C)`` (G = 1 unless ghost groups are used; groups with the same
    index are merged across processes).
    """

    def __init__(
        self,
        process_group,
        world: int,
        positions: int,
        shape: tuple[int, ...],
        masked: bool,
        name: str,
        dtype: torch.dtype | None = None,
        agreed: set | None = None,
    ):
        self.process_group = process_group
        self.world = world
        self.positions = positions
        self.shape = shape
        self.masked = masked
        self.name = name
        self.dtype_code = _dtype_code(dtype) if dtype is not None else 0
        self.agreed = agreed  # the layer's set of process groups already known to agree on the feature count

    def _agree(self, features: int, groups: int) -> None:
        """Once per layer and process group: a fixed-size all_gather of (features, dtype, groups) from every rank.

        Every later statistics gather is ``4·G·C + 2`` float64 values, so it only runs once the ranks
        are known to agree on ``G·C``; it carries the dtype code, checked on every step at no extra cost.
        """
        key = (id(self.process_group), self.world)
        if self.agreed is not None and key in self.agreed:
            return
        meta = torch.tensor([features, self.dtype_code, groups], dtype=torch.int64)
        table = [torch.empty_like(meta) for _ in range(self.world)]
        try:
            dist.all_gather(table, meta, group=self.process_group)
        except Exception as err:
            raise _collective_failed("check that all processes agree on the feature count", self.world, err) from err
        rows = [tuple(int(v) for v in t) for t in table]
        if len(set(rows)) > 1:
            raise _mismatch(self.name, self.world, [(c * g, d) for c, d, g in rows])
        if self.agreed is not None:
            self.agreed.add(key)

    def stats(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
        dtype = mean.dtype
        groups, features = count.shape[-2:] if count.dim() >= 2 else (1, count.shape[-1])
        self._agree(int(features), int(groups))
        positions = torch.full_like(count, float(self.positions))
        local = torch.stack([count, mean, m2, positions]).to(torch.float64)
        tail = torch.tensor([float(features), float(self.dtype_code)], dtype=torch.float64)
        flat = torch.cat([local.reshape(-1), tail])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        try:
            dist.all_gather(gathered, flat, group=self.process_group)
        except Exception as err:  # gloo raises RuntimeError/DistBackendError; say what it means here
            raise _collective_failed("all_gather of batch statistics", self.world, err) from err
        codes = [(int(g[-2]), int(g[-1])) for g in gathered]
        if len(set(codes)) > 1:  # e.g. one rank switched to float64 after the first step: raise before backward
            raise _mismatch(self.name, self.world, codes)
        allstats = torch.stack([g[:-2].reshape(local.shape) for g in gathered])  # (W, 4, G, C)
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
    All ranks must agree on ``num_features`` and the input dtype: checked once per layer before any
    size-dependent collective (one 3-element gather), then on every step inside the statistics
    gather; a mismatch raises :class:`ProcessGroupMismatchError` (a ``RuntimeError`` and a
    ``ValueError``) on every rank, naming each rank's feature count and dtype.

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
        self._local: tuple[int, tuple[int, ...], torch.dtype | None] = (0, (), None)
        self._agreed: set = set()  # process groups whose ranks agreed on this layer's feature count

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
        self._local = (x.numel() // max(x.shape[axis], 1), tuple(x.shape), x.dtype)
        return x, axis

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``x`` with the statistics of all processes' batches (training) or the running ones."""
        self._masked = mask is not None
        return super().forward(x, mask)

    def _combine(self) -> bnf.Combine:
        world = _group_world(self.process_group)
        if world <= 1 or not self.training:
            return bnf.Combine()
        positions, shape, dtype = self._local
        return SyncCombine(
            self.process_group, world, positions, shape, getattr(self, "_masked", False), "SyncBatchNorm",
            dtype, self.__dict__.setdefault("_agreed", set()),
        )

    def _group_size(self, x: torch.Tensor) -> int | None:
        return None
