"""adapt: BN statistics for the deployment distribution (covariate-shift adaptation), and prediction-time BN."""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import _checks
from .. import functional as bnf
from ..layers.standardizer import select_input
from .convert import bn_kind, unknown_error
from .recalibrate import _Accumulator, _merge_across_processes, _model_device, _to

__all__ = ["adapt", "prediction_time_bn", "AdaptReport", "AdaptRecord"]


@dataclass(frozen=True)
class AdaptRecord:
    """One BN layer in :func:`adapt`'s report.

    ``name``: qualified module name; ``kind``: its class; ``samples``: target samples it saw (entries of
    the batch axis); ``values``: values per feature (``samples`` × positions, fewer under a mask);
    ``target_weight``: ``n / (N + n)``, the weight the target statistics got (0 with ``prior=None``);
    ``mean_shift``: root mean square over features of ``(μ_t − μ_s) / σ_s``; ``std_shift``: the same of
    ``(σ_t − σ_s) / σ_s``: how far the target statistics are from the source ones, in source standard
    deviations (``σ_s = sqrt(running_var + eps)``, ``σ_t`` likewise from the unbiased target variance).
    """

    name: str
    kind: str
    samples: int
    values: int
    target_weight: float
    mean_shift: float
    std_shift: float


@dataclass
class AdaptReport:
    """What :func:`adapt` did: one :class:`AdaptRecord` per adapted layer, in the order the model runs them.

    Iterating yields the records; ``report["layer1.0.bn1"]`` is one by name. ``skipped``: name → why a layer
    kept its statistics (ran more than once in one forward); ``batches`` and ``samples``: what the loader gave.
    """

    prior: float | None
    records: list[AdaptRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0

    def __iter__(self) -> Iterator[AdaptRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, name: str) -> AdaptRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(f"no adapted layer named {name!r}; adapted: {[r.name for r in self.records]}")

    def table(self) -> str:
        """The records as a fixed-width text table (one line per layer)."""
        lines = [f"{'layer':<24} {'kind':<16} {'samples':>8} {'weight':>7} {'mean shift':>10} {'std shift':>9}"]
        lines += [f"{r.name:<24} {r.kind:<16} {r.samples:>8} {r.target_weight:>7.3f} {r.mean_shift:>10.3f} "
                  f"{r.std_shift:>+9.3f}" for r in self.records]
        return "\n".join(lines)


# -- which layers ------------------------------------------------------------------------------
def _bn_layers(model: nn.Module, who: str) -> dict[str, nn.Module]:
    """Every BN layer of ``model`` by the tools' rule (:func:`~batchnorm.tools.bn_kind`: torch's, ours, frozen ones
    of any library, timm's ``BatchNormAct2d``); an error for those without running statistics and for a batch norm
    that does more than batch norm in a way no tool knows (kind ``"unknown"``), before anything changes."""
    layers: dict[str, nn.Module] = {}
    stateless = []
    for name, m in model.named_modules():
        kind = bn_kind(m)
        if kind == "unknown":
            raise unknown_error(m, f"layer '{name or '<root>'}'", who,
                                f"{who} cannot know which statistics it normalizes with, and adapting them could change "
                                "the model in ways no one asked for (the model was left unchanged)")
        if kind is not None:
            if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
                stateless.append(f"'{name}' ({type(m).__name__})")
            else:
                layers[name] = m
    if stateless:
        raise ValueError(
            f"{who} expected every batch-norm layer to have running statistics (the source statistics it mixes with "
            f"the target ones), but {', '.join(stateless)} were built with track_running_stats=False: they already "
            "normalize every batch with its own statistics, in eval mode too. Give them running statistics (build "
            "them with track_running_stats=True and batchnorm.recalibrate on source data), or replace them."
        )
    if not layers:
        raise ValueError(
            f"{who} found no batch-norm layer in {type(model).__name__} (expected torch.nn.BatchNorm1d/2d/3d, "
            "torch.nn.SyncBatchNorm, batchnorm.BatchNorm or a variant, or batchnorm.FrozenBatchNorm); there are no "
            "statistics to adapt."
        )
    return layers


def _check_prior(prior: Any, who: str, allow_none: bool) -> float | None:
    if prior is None and allow_none:
        return None
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or math.isnan(prior) or prior < 0:
        also = " or None (keep the source statistics)" if allow_none else ""
        raise ValueError(
            f"{who} expected prior to be a number >= 0 (the pseudo sample size N of the source statistics; 0: target "
            f"statistics only){also}, got {prior!r}. Schneider et al. (2020) use N = 16 with small target batches."
        )
    return float(prior)


def _target_weight(prior: float | None, n: float) -> float:
    """``n / (N + n)``; 0 for ``prior=None`` or ``N = ∞``, 1 for ``N = 0``."""
    if prior is None or math.isinf(prior):
        return 0.0
    return n / (prior + n) if prior + n > 0 else 1.0


def _samples(x: torch.Tensor, axis: int) -> int:
    """Entries of the batch axis: axis 0, or axis 1 for a layer whose features are on axis 0."""
    return int(x.shape[1] if axis == 0 else x.shape[0])


def _layer_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    x = args[0] if args else kwargs.get("input", kwargs.get("x"))
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None, None, 1
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    axis = _checks.normalize_axis(int(getattr(module, "axis", 1)), x.dim(), x.shape)
    return x, mask, axis


def _mixed(source: tuple[torch.Tensor, torch.Tensor], mean_t: torch.Tensor, var_t: torch.Tensor,
           w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 − w)·(μ_s, σ²_s) + w·(μ_t, σ²_t)`` (``torch.lerp``), in the source buffers' dtype and device."""
    rm, rv = source
    if w == 1.0:
        return mean_t.to(rm.device, rm.dtype), var_t.to(rv.device, rv.dtype)
    return (torch.lerp(rm, mean_t.to(rm.device, rm.dtype), w), torch.lerp(rv, var_t.to(rv.device, rv.dtype), w))


class _Swap:
    """Normalize a BN layer (in eval mode) with statistics other than its buffers, for one call.

    The pre-hook puts new tensors in the layer's ``_buffers`` (the stored ones are never written, so
    autograd's saved tensors and the layer's state stay intact) and the post-hook puts the originals back.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.source = (layer._buffers["running_mean"], layer._buffers["running_var"])

    def put(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.layer._buffers["running_mean"], self.layer._buffers["running_var"] = mean, var

    def restore(self) -> None:
        self.layer._buffers["running_mean"], self.layer._buffers["running_var"] = self.source


@contextlib.contextmanager
def _hooked(layers: dict[str, nn.Module], prior: float | None, who: str,
            on_batch: Callable[[str, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], None] | None = None):
    """BN layers in eval mode normalizing each batch with ``(1 − w)·source + w·batch``, ``w = n/(N + n)``.

    ``on_batch(name, n, (mean, var, count))`` receives every call's float64 batch statistics (adapt's record).
    """
    swaps = {name: _Swap(m) for name, m in layers.items()}
    modes = {name: m.training for name, m in layers.items()}
    hooks = []
    for name, m in layers.items():
        def pre(module, args, kwargs, _name=name, _swap=swaps[name]):
            x, mask, axis = _layer_call(module, args, kwargs)
            if x is None or module.training:
                return None
            n = _samples(x, axis)
            w = _target_weight(prior, n)
            if (w == 0.0 and on_batch is None) or x.numel() == 0:
                return None
            xd = x.detach()
            stats = bnf.batch_stats(xd.double() if on_batch is not None else xd, axis=axis, mask=mask)
            if on_batch is not None:
                on_batch(_name, n, stats)
            if w == 0.0:
                return None
            mean_t, var_t, count = stats
            if w == 1.0 and float(count.min()) < 2:
                raise ValueError(
                    f"{who} with prior=0 normalizes with batch statistics only, but layer '{_name}' "
                    f"({type(module).__name__}) got {int(count.min())} value(s) per feature in a batch of input shape "
                    f"{tuple(x.shape)}: its variance is undefined. Use batches of at least 2 samples, or prior > 0 "
                    "(mixes in the source statistics)."
                )
            _swap.put(*_mixed(_swap.source, mean_t, var_t, w))
            return None

        def post(module, args, kwargs, output, _swap=swaps[name]):
            _swap.restore()

        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))
        m.eval()
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for name, m in layers.items():
            swaps[name].restore()
            m.training = modes[name]


# -- inputs ------------------------------------------------------------------------------------
def _input_of(batch: Any, key: str | int | Callable[[Any], Any] | None, i: int) -> Any:
    """The model input of one batch: the tensor, element 0 of a tuple/list, ``batch[key]``, or ``key(batch)``."""
    x = select_input(
        batch, key, i, "adapt", entry="the model input", named="the model input", returns="input",
        dict_hint="Pass key={example}, or key=lambda batch: (batch[{example}], batch['mask']) to call model(x, mask).")
    if callable(key) or key is not None or isinstance(batch, torch.Tensor):
        return x
    if isinstance(batch, (tuple, list)) and isinstance(x, torch.Tensor):
        for j, other in enumerate(batch[1:], 1):
            looks_like_mask = (isinstance(other, torch.Tensor) and other.dtype == torch.bool and other.dim() >= 2
                               and other.shape[0] == x.shape[0] and other.dim() == x.dim() - 1)
            if looks_like_mask:
                raise ValueError(
                    f"adapt got batch {i} as a {type(batch).__name__} whose element {j} is a boolean tensor of shape "
                    f"{tuple(other.shape)}, like a padding mask for the input of shape {tuple(x.shape)}; adapt takes "
                    "element 0 only, so padded positions would count toward the statistics. Pass "
                    f"key=lambda batch: (batch[0], batch[{j}]) to call model(x, mask), or key=0 if it is not a mask."
                )
        return x  # (x, y): the labels are not used
    raise TypeError(
        f"adapt expected batches that are tensors, (x, ...) tuples/lists or dicts (with key=), got "
        f"{type(batch).__name__} for batch {i}. Pass key=callable(batch) -> model input."
    )


def _shift(source: tuple[torch.Tensor, torch.Tensor], mean_t: torch.Tensor, var_t: torch.Tensor,
           eps: float) -> tuple[float, float]:
    rm, rv = (t.double().to(mean_t.device) for t in source)
    sd_s = torch.sqrt(rv + eps)
    sd_t = torch.sqrt(var_t.clamp_min(0) + eps)
    return (float(torch.sqrt((((mean_t - rm) / sd_s) ** 2).mean())),
            float(torch.sign((sd_t - sd_s).mean()) * torch.sqrt((((sd_t - sd_s) / sd_s) ** 2).mean())))


def _merge_samples(layer: nn.Module, samples: int) -> int:
    """Target samples of all processes for a synchronized layer in a process group (else this process's)."""
    from ..layers.sync import SyncBatchNorm, _group_world

    if not isinstance(layer, (SyncBatchNorm, nn.SyncBatchNorm)):
        return samples
    group = getattr(layer, "process_group", None)
    if _group_world(group) <= 1:
        return samples
    import torch.distributed as dist

    t = torch.tensor([float(samples)], dtype=torch.float64, device=layer.running_mean.device)
    dist.all_reduce(t, group=group)
    return int(t.item())


@torch.no_grad()
def adapt(
    model: nn.Module,
    data: Iterable,
    *,
    prior: float | None,
    num_batches: int | None = None,
    key: str | int | Callable[[Any], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> AdaptReport:
    r"""Covariate-shift adaptation: mix every BN layer's statistics with those of unlabeled target data (in place).

    For each BN layer, with source statistics ``(μ_s, σ²_s)`` (its running estimates) and the exact
    statistics ``(μ_t, σ²_t)`` of its input over all of ``data`` (Chan-merged over batches, unbiased
    variance, float64, only where its ``mask`` is true, as :func:`recalibrate`), and ``n`` target samples
    (entries of the batch axis), the new running estimates are (Schneider et al. 2020, eq. 2)::

        w = n / (N + n)        μ ← (1 − w) · μ_s + w · μ_t        σ² ← (1 − w) · σ²_s + w · σ²_t

    with ``N = prior``, the pseudo sample size of the source statistics: ``prior=0`` keeps the target
    statistics alone, larger priors trust the source more, ``prior=None`` (or ``math.inf``) keeps the
    source and only measures the shift (the report). Weights, biases, ``num_batches_tracked`` and
    ``momentum`` are untouched; only ``running_mean`` and ``running_var`` change.

    Each layer's target statistics are those of its input when the layers before it are adapted: during
    the pass every BN layer is in eval mode and normalizes each batch with ``(1 − w_b)·source + w_b·batch``
    (``w_b = n_b / (N + n_b)``, as :func:`prediction_time_bn`); the rest of the model keeps its mode (put
    it in eval mode yourself, so dropout is off). With ``prior=0`` this is precise BN on the target
    data (:func:`recalibrate`, up to dropout); with one batch, evaluation afterwards normalizes as
    :func:`prediction_time_bn` on that batch (up to the factor ``n/(n−1)`` of the stored unbiased variance).
    A layer that runs more than once in one forward keeps its statistics (``report.skipped``, with a
    warning). Works on ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``, :class:`~batchnorm.BatchNorm`
    and every variant, :class:`~batchnorm.FrozenBatchNorm` (its statistics are buffers too), and the other
    libraries' classes the tools recognize (:func:`~batchnorm.tools.bn_kind`: torchvision's ``FrozenBatchNorm2d``,
    timm's ``BatchNormAct2d``, whose normalization sees the layer's input); a ``_BatchNorm`` subclass with its own
    ``forward`` or other children is refused (ValueError naming it, nothing changed). Synchronized layers in a process group merge the target statistics of all processes.

    Args:
        model: any module with BN layers; changed in place (running statistics only).
        data: an iterable of batches from the deployment distribution (e.g. a ``DataLoader``); labels are
            not needed and not used: tensors, ``(x, y, ...)`` tuples/lists (x is taken), or dicts with ``key=``.
        prior: the pseudo sample size ``N`` (keyword, required): 0, a positive number, or None.
        num_batches: use at most this many batches (None: all).
        key: how to take the input from a batch, as :meth:`Standardizer.fit <batchnorm.Standardizer.fit>`:
            a dict key or tuple index, or a callable ``key(batch)``; a tuple it returns is unpacked as
            ``model(*inputs)`` (e.g. ``(x, mask)`` for padded sequences).
        device: move inputs here (default: the device of the model's first parameter or buffer).
        progress: show a tqdm progress bar.

    Returns: an :class:`AdaptReport` (one :class:`AdaptRecord` per layer: samples, target weight, shift).

    Raises: ``ValueError`` for a BN layer without running statistics (``track_running_stats=False``), a
    model without BN layers, an empty ``data``, a batch that carries a padding mask the model would not
    get, a ``prior`` that is not ``None`` or ``≥ 0``; ``TypeError`` for batches it cannot read.
    Nothing is changed when it raises.

    Shape: inputs as the model takes them; per layer, the statistics are ``(C,)``.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)).eval()
        >>> shifted = [(torch.randn(32, 4) * 3 + 1, torch.zeros(32)) for _ in range(4)]   # (x, y) batches
        >>> report = adapt(model, shifted, prior=16)
        >>> report["1"].samples, round(report["1"].target_weight, 3)
        (128, 0.889)

    Reference: S. Schneider, E. Rusak, L. Eck, O. Bringmann, W. Brendel and M. Bethge, "Improving robustness
    against common corruptions by covariate shift adaptation", NeurIPS 2020 (ResNet-50 on ImageNet-C: mCE
    76.7 % → 62.2 % with adapted statistics); Y. Li et al., "Revisiting batch normalization for practical
    domain adaptation" (AdaBN), 2016; T. Chan, G. Golub and R. LeVeque, 1979 (the merge).
    """
    prior = _check_prior(prior, "adapt", allow_none=True)
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"adapt expected num_batches to be None or a positive int, got {num_batches!r}.")
    if key is not None and not (callable(key) or isinstance(key, (str, int))):
        raise TypeError(f"adapt expected key to be None, a str/int index into each batch or a callable batch -> "
                        f"input, got {type(key).__name__}. Example: adapt(model, loader, prior=16, key='image').")
    if isinstance(data, torch.Tensor):
        data = (data,)
    layers = _bn_layers(model, "adapt")
    device = torch.device(device) if device is not None else _model_device(model)
    acc = {name: _Accumulator(0) for name in layers}
    samples = dict.fromkeys(layers, 0)

    def record(name: str, n: int, stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        # the accumulator of recalibrate, fed with the statistics the hook computed anyway
        a, (mean, var, count) = acc[name], stats
        a.calls += 1
        if a.count is None:
            a.count, a.mean, a.m2 = count, mean, var * count
        else:
            a.count, a.mean, a.m2 = bnf.merge_stats(a.count, a.mean, a.m2, count, mean, var * count)
        samples[name] += n

    report = AdaptReport(prior=prior)
    batches = data if num_batches is None else itertools.islice(data, num_batches)
    from tqdm.auto import tqdm

    with _hooked(layers, prior, "adapt", record):
        for i, batch in enumerate(tqdm(batches, disable=not progress, desc="adapt", leave=False)):
            inputs = _to(_input_of(batch, key, i), device)
            for a in acc.values():
                a.calls = 0
            model(*inputs) if isinstance(inputs, tuple) and callable(key) else model(inputs)
            for a in acc.values():
                a.max_calls = max(a.max_calls, a.calls)
            report.batches += 1
            report.samples += _samples(inputs[0] if isinstance(inputs, tuple) else inputs, 1)
    if report.batches == 0:
        raise ValueError(
            "adapt received no batches (an empty loader, or an iterator/generator that was already exhausted); "
            "the model was left unchanged. Pass unlabeled data from the deployment distribution, e.g. a DataLoader."
        )
    for name, m in layers.items():
        _merge_across_processes(m, acc[name])
        samples[name] = _merge_samples(m, samples[name])
    updates = {}
    for name, m in layers.items():
        a = acc[name]
        if a.max_calls > 1:
            report.skipped[name] = (f"ran {a.max_calls} times in one forward (a shared layer sees different "
                                    "distributions); its running statistics were left unchanged")
            continue
        if a.count is None or float(a.count.min()) < 2:
            seen = 0 if a.count is None else int(a.count.min())
            raise ValueError(
                f"adapt: layer '{name}' ({type(m).__name__}) saw {seen} value(s) per feature in {report.batches} "
                "batch(es); a variance needs at least 2 (it never ran, or its inputs were empty/fully masked). The "
                "model was left unchanged. Pass more target data, or check that the loader feeds this layer."
            )
        mean_t, var_t = a.mean, a.m2 / (a.count - 1)
        source = (m.running_mean, m.running_var)
        w = _target_weight(prior, samples[name])
        mean_shift, std_shift = _shift(source, mean_t, var_t, float(getattr(m, "eps", 1e-5)))
        updates[name] = _mixed(source, mean_t, var_t, w) if w > 0 else None
        report.records.append(AdaptRecord(name, type(m).__name__, samples[name], int(a.count.min()), w,
                                          mean_shift, std_shift))
    for name, new in updates.items():
        if new is not None:
            layers[name].running_mean.copy_(new[0])
            layers[name].running_var.copy_(new[1])
    if report.skipped:
        lines = "; ".join(f"'{k}': {v}" for k, v in report.skipped.items())
        warnings.warn(f"adapt: {len(report.skipped)} BN layer(s) were not adapted: {lines}.", stacklevel=3)
    return report


@contextlib.contextmanager
def prediction_time_bn(model: nn.Module, *, prior: float = 0) -> Iterator[nn.Module]:
    r"""Prediction-time BN: inside the block, every BN layer normalizes each batch with that batch's statistics.

    For a batch of ``n`` samples with per-feature batch mean ``μ_B`` and biased variance ``σ²_B`` (as
    training computes them), each BN layer normalizes with (Nado et al. 2020; mixed with the source
    statistics as Schneider et al. 2020)::

        w = n / (N + n)        μ = (1 − w) · running_mean + w · μ_B        σ² = (1 − w) · running_var + w · σ²_B

    ``prior=0`` (default) is pure prediction-time BN (the output equals the train-mode output, without
    any running update); ``N > 0`` trusts the source statistics as ``N`` pseudo samples. The running
    buffers are never written (each call normalizes with new tensors), parameters are untouched, and on
    exit every BN layer is back in the mode it had. Inside the block the BN layers are in eval mode (the
    other modules keep theirs); a BN layer put back in training mode inside the block trains as usual.
    Outputs depend on the batch composition: a batch of one class, or of one sample without spatial
    positions, is normalized badly (``prior=0`` and one value per feature is an error).

    The statistics are treated as constants (as in eval mode); gradients flow to the input and the
    parameters only. Works on the same layers as :func:`adapt`, and raises the same errors for layers
    without running statistics. Synchronized layers use each process's own test batch (no collective).

    Shape: inputs as the model takes them; each layer's batch statistics are ``(C,)``.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        >>> x = torch.randn(16, 1, 8, 8) * 2 + 1          # a test batch from a shifted distribution
        >>> with prediction_time_bn(model, prior=0):
        ...     y = model(x)
        >>> torch.allclose(y, model.train()(x), atol=1e-5)   # prior=0: the train-mode output
        True

    Reference: Z. Nado, S. Padhy, D. Sculley, A. D'Amour, B. Lakshminarayanan and J. Snoek, "Evaluating
    prediction-time batch normalization for robustness under covariate shift", arXiv:2006.10963, 2020;
    S. Schneider et al., NeurIPS 2020 (the prior ``N``).
    """
    prior_n = _check_prior(prior, "prediction_time_bn", allow_none=False)
    layers = _bn_layers(model, "prediction_time_bn")
    with _hooked(layers, prior_n, "prediction_time_bn"):
        yield model
