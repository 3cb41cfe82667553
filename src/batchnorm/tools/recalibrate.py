"""recalibrate: precise BN — replace running estimates with exact population statistics."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as bnf
from ..layers.base import BatchNorm
from .convert import bn_kind

__all__ = ["recalibrate", "RecalibrationReport"]


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate` did, per BN layer (qualified module names).

    ``recalibrated``: names whose running statistics were replaced; ``counts``: values per feature
    each of them saw; ``skipped``: name → why it was left unchanged (never ran, ran more than once in
    one forward, frozen, no running statistics); ``batches``: forward passes run.
    """

    recalibrated: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0


def _recalibratable(m: nn.Module) -> bool:
    """Has running buffers (what eval normalizes with), whatever track_running_stats says now."""
    return isinstance(m, (_BatchNorm, BatchNorm)) and m.running_mean is not None and m.running_var is not None


class _Accumulator:
    """Exact population ``(count, mean, m2)`` per feature, merged batch by batch (Chan et al.)."""

    def __init__(self, axis: int):
        self.axis = axis
        self.count = self.mean = self.m2 = None
        self.calls = 0
        self.max_calls = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.calls += 1
        if x.numel() == 0:
            return
        mean, var, count = bnf.batch_stats(x.detach().to(torch.float64), axis=self.axis, mask=mask)
        m2 = var * count
        if self.count is None:
            self.count, self.mean, self.m2 = count, mean, m2
        else:
            self.count, self.mean, self.m2 = bnf.merge_stats(self.count, self.mean, self.m2, count, mean, m2)


def _merge_across_processes(layer: nn.Module, a: _Accumulator) -> None:
    """For a synchronized layer in a process group of several: the population of all processes' data."""
    import torch.distributed as dist

    from ..layers.sync import SyncBatchNorm, _group_world

    if not isinstance(layer, (SyncBatchNorm, nn.SyncBatchNorm)):
        return
    group = getattr(layer, "process_group", None)
    world = _group_world(group)
    if world <= 1:
        return
    c = layer.num_features
    device = layer.running_mean.device
    local = torch.zeros(4, c, dtype=torch.float64, device=device)
    if a.count is not None:
        local[0], local[1], local[2] = a.count.to(device), a.mean.to(device), a.m2.to(device)
    local[3] = float(a.max_calls)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    g = torch.stack(gathered)
    n = g[:, 0].sum(0)
    mean = (g[:, 0] * g[:, 1]).sum(0) / n.clamp_min(1)
    m2 = g[:, 2].sum(0) + (g[:, 0] * (g[:, 1] - mean) ** 2).sum(0)
    a.max_calls = int(g[:, 3].max())  # every process makes the same choice
    a.count, a.mean, a.m2 = (n, mean, m2) if float(n.min()) > 0 else (None, None, None)


def _pick_input(batch: Any, input_key: str | int | Callable | None) -> Any:
    if callable(input_key):
        return input_key(batch)
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        if input_key is None:
            raise ValueError(
                f"recalibrate got a dict batch with keys {sorted(map(str, batch))} and no input_key. Pass "
                "input_key='<the key of the model input>', or a callable input_key=lambda batch: ... ."
            )
        return batch[input_key]
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("recalibrate got an empty tuple/list as a batch; expected (inputs, ...) or a tensor.")
        return batch[input_key if input_key is not None else 0]
    raise TypeError(
        f"recalibrate expected batches that are tensors, tuples/lists (input first), or dicts (with input_key=), "
        f"got {type(batch).__name__}. Pass input_key=callable that returns the model input from a batch."
    )


def _to(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def recalibrate(
    model: nn.Module,
    data: Iterable,
    *,
    num_batches: int | None = None,
    progress: bool = True,
    input_key: str | int | Callable[[Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> RecalibrationReport:
    r"""Precise BN: set every BN layer's running statistics to the exact population statistics (in place).

    The model runs in training mode (as during training: batch statistics normalize, dropout is on)
    over ``data`` under ``torch.no_grad()``; no parameter changes. A forward pre-hook on every
    BN layer with running statistics records the per-feature ``(n_b, μ_b, M2_b)`` of its input in
    every batch ``b`` (over all axes but the layer's ``axis``; only where its ``mask`` is true), and
    merges them exactly (Chan et al.)::

        n = Σ_b n_b      μ = Σ_b n_b μ_b / n      σ² = (Σ_b M2_b + Σ_b n_b (μ_b − μ)²) / (n − 1)

    then sets ``running_mean = μ`` and ``running_var = σ²`` (unbiased, like every running variance
    here). Batches are weighted by their sample count, so an uneven last batch counts exactly as much
    as it should; this is *not* the mean of per-batch variances (which misses the spread of the batch
    means). The running estimates are kept fixed during the pass (``momentum`` is 0 meanwhile; batch
    renorm reads them in training) and written only at the end.

    Afterwards every module's train/eval mode and every layer's ``momentum`` are as before, and
    ``num_batches_tracked`` is unchanged: it counts training steps, which recalibration is not (and
    it is batch renorm's warm-up clock, which must not be reset). A layer that never ran, or ran more than once in one forward (a
    shared layer: its inputs come from different distributions), keeps its old statistics and is
    listed in ``report.skipped`` with a warning. ``FrozenBatchNorm`` layers and layers with
    no running buffers (built with ``track_running_stats=False``) are left alone. Works for every variant (ghost, renorm, masked):
    the population statistics are what evaluation normalizes with. Synchronized layers
    (:class:`~batchnorm.SyncBatchNorm`, ``torch.nn.SyncBatchNorm``) inside an initialized process
    group merge their populations across the group, so every process ends with the statistics of
    all processes' data; then every process must call ``recalibrate`` with the same number of batches.

    Args:
        model: any module; changed in place.
        data: an iterable of batches (e.g. a ``DataLoader``): tensors, tuples/lists (the input is
            element 0, or ``input_key`` if an int), or dicts (``input_key`` names the input). A callable
            ``input_key(batch)`` returns the input; a tuple it returns is unpacked as ``model(*inputs)``.
        num_batches: use at most this many batches (None: all of ``data``).
        progress: show a tqdm progress bar.
        device: move inputs here (default: the device of the model's first parameter or buffer).

    Returns: a :class:`RecalibrationReport`.

    Shape: inputs as the model takes them; per layer, the statistics are ``(C,)``.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchNorm(8))
        >>> data = [(torch.randn(n, 4) * 3 + 1, torch.zeros(n)) for n in (32, 32, 7)]  # (input, label)
        >>> report = recalibrate(model, data, progress=False)
        >>> report.recalibrated, report.counts, report.batches
        (['1'], {'1': 71}, 3)
        >>> h = torch.cat([model[0](x) for x, _ in data]).detach()
        >>> torch.allclose(model[1].running_var, h.var(0), rtol=1e-4)   # exact population variance
        True

    Reference: Y. Wu and J. Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (precise BN); fvcore's
    ``update_bn_stats``; ``torch.optim.swa_utils.update_bn``; T. Chan, G. Golub and R. LeVeque,
    "Updating formulae and a pairwise algorithm for computing sample variances", 1979.
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"recalibrate expected num_batches to be None or a positive int, got {num_batches!r}.")
    report = RecalibrationReport()
    layers: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        kind = bn_kind(m)
        if kind == "unknown":  # its own forward may normalize something other than its input: cannot be measured
            report.skipped[name] = (f"{type(m).__name__}: a batch norm with its own forward or child modules; "
                                    "what it normalizes is not known, so its statistics were left unchanged")
        elif _recalibratable(m):
            layers[name] = m
        elif isinstance(m, (_BatchNorm, BatchNorm)):
            report.skipped[name] = "no running statistics to recalibrate (built with track_running_stats=False)"
        elif "FrozenBatchNorm" in type(m).__name__:
            report.skipped[name] = f"{type(m).__name__}: its statistics are fixed on purpose (unfreeze it first)"
    if any("own forward" in v for v in report.skipped.values()):
        warnings.warn("recalibrate: left unchanged: " + "; ".join(
            f"'{k}': {v}" for k, v in report.skipped.items() if "own forward" in v), stacklevel=2)
    if not layers:
        warnings.warn("recalibrate: the model has no BN layer with running statistics; nothing to do.", stacklevel=2)
        return report

    device = torch.device(device) if device is not None else _model_device(model)
    modes = {m: m.training for m in model.modules()}
    saved = {
        name: (m.momentum, m.running_mean.clone(), m.running_var.clone(),
               None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
        for name, m in layers.items()
    }
    acc = {name: _Accumulator(int(getattr(m, "axis", 1))) for name, m in layers.items()}
    hooks = []
    for name, m in layers.items():
        def hook(module, args, kwargs, _acc=acc[name]):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                _acc.add(x, mask)

        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for m in layers.values():
            m.momentum = 0.0  # the running estimates stay fixed during the pass (renorm layers read them)
        model.train()
        total = num_batches
        if total is None and hasattr(data, "__len__"):
            total = len(data)  # type: ignore[arg-type]
        from tqdm.auto import tqdm

        batches = data if num_batches is None else itertools.islice(data, num_batches)
        with torch.no_grad():
            for batch in tqdm(batches, total=total, disable=not progress, desc="recalibrate", leave=False):
                inputs = _to(_pick_input(batch, input_key), device)
                for a in acc.values():
                    a.calls = 0
                if isinstance(inputs, tuple) and callable(input_key):
                    model(*inputs)
                else:
                    model(inputs)
                for a in acc.values():
                    a.max_calls = max(a.max_calls, a.calls)
                report.batches += 1
    finally:
        for h in hooks:
            h.remove()
        for name, m in layers.items():
            momentum, rm, rv, nbt = saved[name]
            m.momentum = momentum
            with torch.no_grad():
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)
        for m, mode in modes.items():
            m.training = mode

    for name, m in layers.items():
        _merge_across_processes(m, acc[name])
    for name, m in layers.items():
        a = acc[name]
        if a.max_calls > 1:
            report.skipped[name] = (
                f"ran {a.max_calls} times in one forward (a shared layer sees different distributions); "
                "its running statistics were left unchanged"
            )
            continue
        if a.count is None or float(a.count.min()) < 2:
            seen = 0 if a.count is None else int(a.count.min())
            report.skipped[name] = f"saw {seen} values per feature (never ran, or empty inputs); left unchanged"
            continue
        n = a.count
        with torch.no_grad():
            m.running_mean.copy_(a.mean.to(m.running_mean.dtype))
            m.running_var.copy_((a.m2 / (n - 1)).to(m.running_var.dtype))
        report.recalibrated.append(name)
        report.counts[name] = int(n.min())
    problems = {k: v for k, v in report.skipped.items() if "left unchanged" in v}
    if problems:
        lines = "; ".join(f"'{k}': {v}" for k, v in problems.items())
        warnings.warn(f"recalibrate: {len(problems)} BN layer(s) were not recalibrated: {lines}.", stacklevel=2)
    return report
