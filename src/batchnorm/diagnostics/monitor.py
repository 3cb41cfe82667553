"""monitor: per-step summaries of what every BN-like layer of a model sees and produces."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..functional import batch_stats
from ..layers.base import BatchNorm
from ..layers.interop import _ModulesAfter
from ..layers.sync import SyncBatchNorm, _group_world
from ._common import after_modules, bn_features, bn_kind, bn_layers, check_model, feature_axis, unknown_error

__all__ = ["Monitor", "monitor", "STATISTICS"]

#: Names of the statistics a record can carry, in the order they are recorded for one layer call.
STATISTICS = (
    "count",
    "batch_mean",
    "batch_var",
    "running_mean",
    "running_var",
    "mean_gap",
    "var_ratio",
    "input_percentiles",
    "output_skewness",
    "output_excess_kurtosis",
    "relu_zero_fraction",
    "collapsed",
)


def _check_int(value: Any, name: str, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or None" if allow_none else ""
        raise ValueError(f"monitor expected {name} to be an int >= {low}{extra}, got {value!r}.")
    return value


def _check_percentiles(percentiles: Any) -> tuple[float, ...]:
    try:
        ps = tuple(float(p) for p in percentiles)
    except TypeError:
        ps = ()
    if not ps or any(not 0.0 <= p <= 100.0 for p in ps) or list(ps) != sorted(ps):
        raise ValueError(
            f"monitor expected percentiles to be a non-empty increasing sequence of numbers in [0, 100], got "
            f"{percentiles!r}. Ioffe & Szegedy's Figure 1 uses (15, 50, 85)."
        )
    return ps


def _clean(v: Any) -> Any:
    """Plain-JSON version of a record value: non-finite floats become None."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, list):
        return [_clean(u) for u in v]
    if isinstance(v, dict):
        return {k: _clean(u) for k, u in v.items()}
    return v


class Monitor:
    """Context manager that records per-feature summaries of every BN-like layer; see :func:`monitor`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 1,
        percentiles: Sequence[float] = (15, 50, 85),
        feature: int = 0,
        max_steps: int | None = 1000,
        var_threshold: float | None = None,
        gamma_threshold: float = 1e-3,
    ) -> None:
        self.model = check_model(model, "monitor")
        self.every = int(_check_int(every, "every", 1))  # type: ignore[arg-type]
        self.percentiles = _check_percentiles(percentiles)
        if isinstance(feature, bool) or not isinstance(feature, int):
            raise TypeError(f"monitor expected feature to be an int (a feature index), got {type(feature).__name__}.")
        self.feature = feature
        self.max_steps = _check_int(max_steps, "max_steps", 2, allow_none=True)
        if var_threshold is not None and not (isinstance(var_threshold, (int, float)) and var_threshold >= 0):
            raise ValueError(f"monitor expected var_threshold to be a number >= 0 or None (the layer's eps), got {var_threshold!r}.")
        if not (isinstance(gamma_threshold, (int, float)) and not isinstance(gamma_threshold, bool) and gamma_threshold >= 0):
            raise ValueError(f"monitor expected gamma_threshold to be a number >= 0, got {gamma_threshold!r}.")
        self.var_threshold = var_threshold
        self.gamma_threshold = float(gamma_threshold)
        self.layers = bn_layers(model)
        for name, m in self.layers:
            if bn_kind(m) == "unknown":
                raise unknown_error(m, f"layer '{name}'", "monitor", "monitor cannot know what it normalizes or "
                                    "outputs, and its records would not be batch norm's")
            c = bn_features(m)
            if not -c <= feature < c:
                raise ValueError(
                    f"monitor expected feature to index every monitored layer's features, got feature={feature} but "
                    f"layer '{name}' has {c} features. Pick a feature index below {c} (it is the feature whose "
                    "input percentiles are recorded)."
                )
        self.step = -1  # index of the current model forward; the first forward is step 0
        self.stride = self.every
        self._records: list[dict[str, Any]] = []
        self._steps: list[int] = []
        self._recording = False
        self._pending: dict[int, dict[str, Any]] = {}
        self._handles: list[Any] = []

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        if self._handles:
            raise RuntimeError("this monitor is already active; use one `with monitor(model)` block at a time.")
        self._handles.append(self.model.register_forward_pre_hook(self._count))
        for name, m in self.layers:
            self._handles.append(m.register_forward_pre_hook(self._before, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._make_after(name), with_kwargs=True))
            after = after_modules(m)
            if after and not _fused(m):  # the normalization's output is what its first drop/act child receives
                self._handles.append(after[0].register_forward_pre_hook(self._make_site(name, m)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()
        self._recording = False

    # -- hooks -------------------------------------------------------------------------------
    def _count(self, module: nn.Module, args: Any) -> None:
        self.step += 1
        self._recording = self.step % self.stride == 0
        if not self._recording:
            return
        self._steps.append(self.step)
        if self.max_steps is not None and len(self._steps) > self.max_steps:
            # thin: keep every second kept step, so the kept steps still span the whole run evenly
            self.stride *= 2
            self._steps = [s for s in self._steps if s % self.stride == 0]
            self._records = [r for r in self._records if r["step"] % self.stride == 0]
            self._recording = self.step % self.stride == 0

    def _before(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        if not self._recording:
            return
        rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        pending: dict[str, Any] = {
            # running estimates *before* this forward updates them: the ones eval mode would have used
            "running": (None if rm is None else rm.detach().clone(), None if rv is None else rv.detach().clone()),
            "x": x,
            "mask": kwargs.get("mask", args[1] if len(args) > 1 else None),
            "done": False,
        }
        if _fused(module):  # every buffer as it was, for the same normalization without the activation
            pending["buffers"] = {k: None if v is None else v.detach().clone() for k, v in module._buffers.items()}
        self._pending[id(module)] = pending

    def _make_site(self, name: str, layer: nn.Module):
        def site(module: nn.Module, args: Any) -> None:
            pending = self._pending.get(id(layer))
            if not self._recording or pending is None or pending["done"] or not args:
                return
            pending["done"] = True  # read now: an in-place activation overwrites this tensor next
            self._take(name, layer, pending, args[0])

        return site

    def _make_after(self, name: str):
        def after(module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
            if not self._recording:
                return
            pending = self._pending.pop(id(module), None)
            if pending is None or pending["done"]:
                return
            if after_modules(module) and not _fused(module):
                raise RuntimeError(
                    f"monitor: layer '{name}' ({type(module).__name__}) did not call its "
                    f"{type(after_modules(module)[0]).__name__} module after normalizing, so its normalization's "
                    "output was not seen (its output includes its drop/act modules). Monitor it without them."
                )
            if _fused(module):
                output = _normalization(name, module, pending)
            self._take(name, module, pending, output)

        return after

    def _take(self, name: str, module: nn.Module, pending: dict[str, Any], y: Any) -> None:
        x = pending["x"]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.numel() == 0:
            return
        with torch.no_grad():
            self._record(name, module, x.detach(), y.detach(), pending["mask"], pending["running"])

    def _record(self, name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: Any, running: Any) -> None:
        axis = feature_axis(module) % x.dim()
        m = mask if isinstance(mask, torch.Tensor) else None
        mean, var, count = batch_stats(x, axis=axis, mask=m)
        eps = float(getattr(module, "eps", 1e-5))
        shape = [1] * y.dim()
        shape[axis] = -1
        # the output's shape moments in float64: a float32 mean would carry a rounding error of
        # ulp(β) into every deviation, which dominates when |γ| is small (a nearly collapsed feature)
        y64 = y.to(torch.float64)
        ymean, yvar, _ = batch_stats(y64, axis=axis, mask=m)
        z = (y64 - ymean.reshape(shape)) / yvar.sqrt().reshape(shape)
        skew = batch_stats(z**3, axis=axis, mask=m)[0]
        kurt = batch_stats(z**4, axis=axis, mask=m)[0] - 3.0
        relu_zero = batch_stats((y <= 0).to(mean.dtype), axis=axis, mask=m)[0]
        # percentiles of one feature's input over the positions that count (Ioffe & Szegedy, Fig. 1)
        vals = x.select(axis, self.feature)
        if m is not None:
            vals = vals[m.expand(vals.shape)]
        vals_np = vals.detach().to("cpu", torch.float64).reshape(-1).numpy()
        pct = np.percentile(vals_np, self.percentiles).tolist() if vals_np.size else [float("nan")] * len(self.percentiles)
        threshold = eps if self.var_threshold is None else float(self.var_threshold)
        collapsed = var < threshold
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            collapsed = collapsed | (weight.detach().abs().to(var.device) < self.gamma_threshold)
        base = {"layer": name, "step": self.step, "training": bool(module.training)}
        out: list[tuple[str, Any]] = [
            ("count", float(count.min())),
            ("batch_mean", mean.tolist()),
            ("batch_var", var.tolist()),
        ]
        rm, rv = running
        if rm is not None and rv is not None:
            rm64, rv64 = rm.to(var.device, mean.dtype), rv.to(var.device, var.dtype)
            out += [
                ("running_mean", rm64.tolist()),
                ("running_var", rv64.tolist()),
                ("mean_gap", ((mean - rm64).abs() / (rv64 + eps).sqrt()).tolist()),
                ("var_ratio", ((var + eps) / (rv64 + eps)).tolist()),
            ]
        out += [
            ("input_percentiles", [float(p) for p in pct]),
            ("output_skewness", skew.tolist()),
            ("output_excess_kurtosis", kurt.tolist()),
            ("relu_zero_fraction", relu_zero.tolist()),
            ("collapsed", torch.nonzero(collapsed).reshape(-1).tolist()),
        ]
        for stat, values in out:
            rec = dict(base, statistic=stat, values=values)
            if stat == "input_percentiles":
                rec["feature"] = self.feature % int(x.shape[axis])
                rec["percentiles"] = list(self.percentiles)
            self._records.append(rec)

    # -- results -------------------------------------------------------------------------------
    @property
    def records(self) -> list[dict[str, Any]]:
        """Plain dicts ``{"layer", "step", "training", "statistic", "values"}`` (copies), in recording order."""
        return [dict(r) for r in self._records]

    @property
    def recorded_steps(self) -> list[int]:
        """The model-forward indices whose records are kept (after any thinning)."""
        return list(self._steps)

    def series(self, layer: str, statistic: str) -> tuple[list[int], list[Any]]:
        """``(steps, values)`` of one layer's statistic over time."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; expected one of {', '.join(STATISTICS)}.")
        rows = [r for r in self._records if r["layer"] == layer and r["statistic"] == statistic]
        return [r["step"] for r in rows], [r["values"] for r in rows]

    def to_json(self, indent: int | None = None) -> str:
        """The records as a JSON list (strict JSON: NaN and ±inf become ``null``)."""
        return json.dumps([_clean(r) for r in self._records], indent=indent, allow_nan=False)

    def plot(self, path: str | Path, layers: Iterable[str] | None = None) -> Path:
        """Draw, per layer, the input percentile bands, the train/eval gap and the output shape; save to ``path``.

        Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Returns the path.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as err:  # pragma: no cover - matplotlib is in the [lab] extra
            raise ImportError("Monitor.plot needs matplotlib: pip install 'batchnorm[lab]'.") from err
        names = list(dict.fromkeys(r["layer"] for r in self._records)) if layers is None else list(layers)
        if not names:
            raise ValueError(
                "Monitor.plot has nothing to draw: no records (or none for the requested layers). Run forwards "
                "of the model inside the `with monitor(model)` block first."
            )
        fig = Figure(figsize=(15, 3.4 * len(names)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(names), 3, squeeze=False)
        for row, name in zip(axes, names):
            self._plot_percentiles(row[0], name)
            self._plot_gap(row[1], name)
            self._plot_shape(row[2], name)
        fig.suptitle("batchnorm.diagnostics.monitor")
        path = Path(path)
        fig.savefig(path, dpi=90)
        return path

    def _plot_percentiles(self, ax: Any, name: str) -> None:
        steps, pct = self.series(name, "input_percentiles")
        arr = np.array([[np.nan if v is None else v for v in p] for p in pct], dtype=float).reshape(len(steps), -1)
        feat = next((r["feature"] for r in self._records if r["layer"] == name and r["statistic"] == "input_percentiles"), self.feature)
        ps = self.percentiles
        if len(steps):
            if len(ps) >= 2:
                ax.fill_between(steps, arr[:, 0], arr[:, -1], alpha=0.25, label=f"p{ps[0]:g}–p{ps[-1]:g}")
            for j, p in enumerate(ps):
                ax.plot(steps, arr[:, j], lw=1.2, label=f"p{p:g}")
        ax.set_title(f"{name}: input of feature {feat} (percentiles)")
        ax.set_xlabel("step")
        ax.set_ylabel("input value")
        ax.legend(loc="best", fontsize=8)

    def _plot_gap(self, ax: Any, name: str) -> None:
        steps, gap = self.series(name, "mean_gap")
        _, ratio = self.series(name, "var_ratio")
        if steps:
            ax.plot(steps, [np.nanmean(np.array(g, float)) for g in gap], label="mean |μ_B − μ_run| / σ_run")
            ax.plot(steps, [np.nanmean(np.array(r, float)) for r in ratio], label="mean (σ²_B + ε) / (σ²_run + ε)")
            ax.axhline(1.0, color="gray", lw=0.6, ls=":")
        else:
            ax.text(0.5, 0.5, "no running estimates", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name}: train/eval gap")
        ax.set_xlabel("step")
        ax.set_ylabel("gap (running-std units) / variance ratio")
        ax.legend(loc="best", fontsize=8)

    def _plot_shape(self, ax: Any, name: str) -> None:
        for stat, label in (
            ("output_skewness", "mean skewness"),
            ("output_excess_kurtosis", "mean excess kurtosis"),
            ("relu_zero_fraction", "fraction a ReLU zeroes"),
        ):
            steps, vals = self.series(name, stat)
            if steps:
                ax.plot(steps, [np.nanmean(np.array(v, float)) if len(v) else np.nan for v in vals], label=label)
        ax.axhline(0.0, color="gray", lw=0.6, ls=":")
        ax.set_title(f"{name}: output shape")
        ax.set_xlabel("step")
        ax.set_ylabel("value (averaged over features)")
        ax.legend(loc="best", fontsize=8)


def _fused(module: nn.Module) -> bool:
    """One of our layers with a fused activation: its output is ``act(BN(x))``, so BN's own is recomputed."""
    return isinstance(module, BatchNorm) and module.__dict__.get("activation") not in (None, "identity")


def _normalization(name: str, layer: nn.Module, pending: dict[str, Any]) -> torch.Tensor | None:
    """What our ``layer``'s normalization computed in the call just made, without its fused activation: the same
    forward on a shallow twin (its own attribute dict, every buffer as it was before the call, no activation),
    called outside the hooks; the layer itself is not touched."""
    x, mask = pending["x"], pending["mask"]
    if not isinstance(x, torch.Tensor):
        return None
    if isinstance(layer, SyncBatchNorm) and layer.training and _group_world(layer.process_group) > 1:
        raise RuntimeError(
            f"monitor: layer '{name}' (SyncBatchNorm) has a fused activation={layer.activation!r}, so its output is "
            "not batch norm's, and in training across processes its normalization cannot be recomputed without "
            "another collective. Monitor it in a model built without the fused activation, or in eval mode."
        )
    twin = object.__new__(type(layer))
    state = {k: v for k, v in layer.__dict__.items() if k not in _PER_CALL}
    state["_buffers"], state["activation"] = pending["buffers"], None
    twin.__dict__.update(state)
    base = layer._base if isinstance(layer, _ModulesAfter) else type(layer)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the call itself has warned already (non-finite statistics)
        return base.forward(twin, x) if mask is None else base.forward(twin, x, mask)


#: per-layer caches and counters a twin must not share (fast-path plans, checked settings, refused batches)
_PER_CALL = ("_fast", "_settings", "_checked_input", "_refused_flags", "_refused_device", "_refused_total")


def monitor(
    model: nn.Module,
    *,
    every: int = 1,
    percentiles: Sequence[float] = (15, 50, 85),
    feature: int = 0,
    max_steps: int | None = 1000,
    var_threshold: float | None = None,
    gamma_threshold: float = 1e-3,
) -> Monitor:
    r"""Watch every BN-like layer of ``model``: a context manager that records per-feature summaries.

    BN-like layers are those every tool of the package recognizes (:func:`batchnorm.tools.bn_kind`):
    ``torch.nn`` batch norms (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``), :class:`batchnorm.BatchNorm` and every
    subclass (BatchRenorm, GhostBatchNorm, ...), :class:`batchnorm.FrozenBatchNorm`, timm's ``BatchNormAct2d``,
    ``SyncBatchNormAct`` and ``FrozenBatchNormAct2d``, torchvision's/detectron2's ``FrozenBatchNorm2d``. A
    ``_BatchNorm`` subclass with its own ``forward`` or other children is refused (ValueError naming it): what it
    normalizes is not known. A *step* is one call of ``model`` (the first call inside the
    block is step 0); steps ``0, every, 2·every, ...`` are recorded, in training and evaluation alike.
    For every recorded call of a layer with input ``x`` (positions where its ``mask`` is true only;
    statistics from :func:`batchnorm.functional.batch_stats`) and output ``y``, per feature ``c``:

    ==========================  ===============================================================
    ``count``                   positions per statistic ``n`` (the smallest over features)
    ``batch_mean``              ``μ_B = mean(x)``
    ``batch_var``               ``σ²_B = mean((x − μ_B)²)`` (biased: what training normalizes with)
    ``running_mean/_var``       the running estimates *before* this call updated them (what eval
                                mode would have used); absent without running estimates
    ``mean_gap``                ``|μ_B − μ_run| / sqrt(σ²_run + ε)``: the train/eval gap of the
                                mean in running-std units
    ``var_ratio``               ``(σ²_B + ε) / (σ²_run + ε)``: the squared ratio of the eval and
                                train scales (1 = no gap)
    ``input_percentiles``       the ``percentiles`` of feature ``feature``'s input (Ioffe &
                                Szegedy, Figure 1; numpy's linear interpolation)
    ``output_skewness``         ``mean(z³)`` with ``z = (y − mean y) / std y`` (float64): BN fixes
                                two moments, not the shape (NaN for a constant feature)
    ``output_excess_kurtosis``  ``mean(z⁴) − 3`` (0 for a Gaussian)
    ``relu_zero_fraction``      fraction of outputs ``y ≤ 0``: what a following ReLU would zero
    ``collapsed``               indices of features with ``σ²_B < var_threshold`` (default: the
                                layer's ε, below which the normalized output carries almost no
                                signal) or ``|γ| < gamma_threshold`` (default 1e-3)
    ==========================  ===============================================================

    ``y`` is what the normalization computes, ``γ·x̂ + β``, so the skewness is that of ``x̂`` times the sign
    of ``γ`` and the kurtosis that of ``x̂``; also where the layer applies more. For timm's ``BatchNormAct2d``
    (and ours that :func:`batchnorm.convert` built with its ``drop``/``act`` modules) ``y`` is what its first
    ``drop``/``act`` module receives, not the activated output; for our layers with a fused ``activation`` it is
    the same normalization recomputed without the activation (one more normalize per recorded call; a
    ``SyncBatchNorm`` with a fused activation training across processes is refused with a RuntimeError, since that
    would take another collective). GhostBatchNorm and SyncBatchNorm are
    summarized over the whole local batch (not per ghost batch, not across processes). A layer
    called several times in one step (shared weights) gets one set of records per call, in call order.

    Memory is bounded: a record holds summaries (at most ``C`` numbers, ``len(percentiles)`` for the
    percentiles), never tensors, and at most ``max_steps`` recorded steps are kept. When a new step
    would exceed that, every second kept step is dropped and the recording stride doubles, so the
    kept steps always span the whole run evenly: at most ``max_steps × (layer calls per step) × 12``
    records of ≤ C values each (``max_steps=None``: unbounded). Hooks are removed on exit and the
    model is never modified.

    Args:
        model: any ``nn.Module``.
        every: record every ``every``-th model call.
        percentiles: increasing percentiles in [0, 100] of the chosen feature's input.
        feature: index of the feature whose input percentiles are recorded (every layer must have it).
        max_steps: bound on the number of kept recorded steps (≥ 2), or None.
        var_threshold, gamma_threshold: collapse thresholds (see above).

    Returns:
        a :class:`Monitor`: ``.records`` (list of plain dicts ``layer, step, training, statistic,
        values``; the percentile records also carry ``feature`` and ``percentiles``),
        ``.series(layer, statistic)``, ``.to_json()``, ``.plot(path)``.

    Shape: the layers' inputs as they accept them; ``values`` are lists of length C.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU())
        >>> with monitor(model, every=10) as mon:
        ...     for _ in range(100):
        ...         model(torch.randn(64, 10))
        >>> steps, gap = mon.series("1", "mean_gap")       # steps 0, 10, ..., 90
        >>> mon.plot("bn.png")

    Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", ICML 2015 (Figure 1: the 15th/50th/85th percentiles of a
    sigmoid input over training).
    """
    return Monitor(
        model, every=every, percentiles=percentiles, feature=feature, max_steps=max_steps,
        var_threshold=var_threshold, gamma_threshold=gamma_threshold,
    )
