"""describe: one readable table of every BN-like layer of a model."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._common import (
    after_modules,
    bn_features,
    bn_kind,
    bn_layers,
    call,
    check_model,
    feature_axis,
    is_frozen,
    preserved,
)

__all__ = ["Description", "describe"]

_COLUMNS = ("layer", "type", "features", "input_shape", "reduction_axes", "samples_per_statistic", "momentum", "running")


class Description:
    """The result of :func:`describe`: ``.rows`` (list of dicts) and a fixed-width table as ``str()``."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    @staticmethod
    def _cell(key: str, value: Any) -> str:
        if value is None:
            return "unknown" if key in ("input_shape", "reduction_axes", "samples_per_statistic") else "-"
        if key in ("input_shape", "reduction_axes") and isinstance(value, tuple):
            return str(tuple(int(v) for v in value))
        if key == "samples_per_statistic" and isinstance(value, int):
            return f"{value:,}"
        return str(value)

    def __str__(self) -> str:
        if not self.rows:
            return "no BN-like layers"
        header = {k: k.replace("_", " ") for k in _COLUMNS}
        cells = [header] + [{k: self._cell(k, r.get(k)) for k in _COLUMNS} for r in self.rows]
        width = {k: max(len(c[k]) for c in cells) for k in _COLUMNS}
        lines = ["  ".join(c[k].ljust(width[k]) for k in _COLUMNS).rstrip() for c in cells]
        lines.insert(1, "  ".join("-" * width[k] for k in _COLUMNS))
        notes = sorted({r["note"] for r in self.rows if r.get("note")})
        return "\n".join(lines + [f"note: {n}" for n in notes])

    __repr__ = __str__

    def __len__(self) -> int:
        return len(self.rows)


def _running_state(m: nn.Module) -> str:
    rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    if rm is None or rv is None:
        return "none (batch statistics in train and eval)"
    mean_abs = float(rm.detach().abs().float().mean())
    mean_var = float(rv.detach().float().mean())
    nbt = getattr(m, "num_batches_tracked", None)
    seen = "frozen" if is_frozen(m) else (f"{int(nbt)} batches" if nbt is not None else "? batches")
    return f"{seen}, mean|μ|={mean_abs:.3g}, mean σ²={mean_var:.3g}"


def _row(name: str, m: nn.Module, shape: tuple[int, ...] | None) -> dict[str, Any]:
    axis = feature_axis(m)
    row: dict[str, Any] = {
        "layer": name,
        "type": type(m).__name__,
        "features": bn_features(m),
        "axis": axis,
        "input_shape": shape,
        "reduction_axes": None,
        "samples_per_statistic": None,
        "momentum": None,
        "running": _running_state(m),
        "mode": "train" if m.training else "eval",
        "note": "",
    }
    if not is_frozen(m):
        mom = getattr(m, "momentum", None)
        row["momentum"] = "cumulative (None)" if mom is None else float(mom)
    if shape is not None and len(shape) >= 2 and -len(shape) <= axis < len(shape):
        ax = axis % len(shape)
        reduce = tuple(d for d in range(len(shape)) if d != ax)
        row["reduction_axes"] = reduce
        count = math.prod(shape[d] for d in reduce)
        vbs = getattr(m, "virtual_batch_size", None)
        if isinstance(vbs, int) and shape[0] > 0:
            # a ghost batch: at most virtual_batch_size rows of axis 0 per statistic
            count = count // shape[0] * min(vbs, shape[0])
            row["note"] = "GhostBatchNorm counts one virtual batch (virtual_batch_size rows of axis 0)"
        if type(m).__name__ == "SyncBatchNorm":
            row["note"] = "SyncBatchNorm counts this process's batch; training merges all processes' batches"
        row["samples_per_statistic"] = count
    kind = bn_kind(m)
    if is_frozen(m):
        row["note"] = f"{type(m).__name__} reduces nothing: it applies fixed statistics"
    elif kind == "unknown":
        row["note"] = (f"{type(m).__name__} does more than batch norm (its own forward or other children): what it "
                       "normalizes is not known")
    elif shape is None and not hasattr(m, "last_input_shape"):
        row["note"] = "torch.nn layers do not record their input shape: pass example_input to describe()"
    if kind == "act" and not row["note"]:
        names = "/".join(type(c).__name__ for c in after_modules(m))
        row["note"] = f"{type(m).__name__} applies its own {names} after normalizing"
    return row


def describe(model: nn.Module, example_input: Any = None) -> Description:
    r"""A table of every BN-like layer: type, features, reduction axes, samples per statistic, momentum, running state.

    Per layer (every batch norm the tools recognize, :func:`batchnorm.tools.bn_kind`: torch's, ``batchnorm.BatchNorm``
    and variants, FrozenBatchNorm, timm's ``BatchNormAct2d``, torchvision's ``FrozenBatchNorm2d``, ...; one that does
    more than batch norm is listed with a note saying so):

    * ``input_shape``: the last input shape seen (see below), or unknown;
    * ``reduction_axes``: every axis but the feature axis (``.axis`` on our layers, 1 on torch's):
      ``(0, 2, 3)`` for ``(N, C, H, W)``, ``(0,)`` for ``(N, C)``, ``(0, 1)`` for ``(N, L, C)`` with
      ``axis=-1``;
    * ``samples_per_statistic``: the product of those axes' sizes, ``N·H·W`` for images (one
      mean and variance per channel pools every pixel of every image); GhostBatchNorm counts one
      virtual batch; a mask lowers it (not shown); SyncBatchNorm shows this process's share;
    * ``momentum`` (``cumulative (None)`` for a cumulative average), ``running``: ``num_batches_tracked``,
      mean ``|running_mean|``, mean ``running_var``, or ``none`` (``track_running_stats=False``);
    * in ``.rows`` also ``axis``, ``mode`` (train/eval) and ``note``.

    With ``example_input`` (a tensor; a tuple/list is unpacked into ``model(*x)``, a dict into
    ``model(**x)``) it runs one forward in eval mode under ``torch.no_grad()`` with hooks that
    capture each layer's input shape, then puts everything back (parameters, buffers, training
    flags, attributes such as ``last_input_shape``, the global RNG): no state changes. Without it
    the shapes come from ``last_input_shape``, which our layers record on every forward;
    ``torch.nn`` layers do not, so theirs are ``unknown``.

    Returns:
        a :class:`Description`: ``print(describe(model))`` shows the table, ``.rows`` holds dicts.

    Shape: ``example_input`` as ``model`` accepts it.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> print(describe(net, torch.randn(16, 3, 32, 32)))      # samples per statistic 16·30·30 = 14,400
        layer  type         features  input shape      reduction axes  samples per statistic ...

    Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", ICML 2015 (Section 3.2: for convolutions the statistics are
    per feature map, over the mini-batch and all spatial locations, "effective mini-batch of size
    m' = m·p·q").
    """
    check_model(model, "describe")
    layers = bn_layers(model)
    shapes: dict[int, tuple[int, ...]] = {}
    if example_input is not None:
        with preserved(model):

            def capture(module: nn.Module, args: Any, kwargs: dict) -> None:
                x = args[0] if args else kwargs.get("x", kwargs.get("input"))
                if isinstance(x, torch.Tensor):
                    shapes[id(module)] = tuple(x.shape)

            handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for _, m in layers]
            try:
                model.eval()
                with torch.no_grad():
                    call(model, example_input)
            finally:
                for h in handles:
                    h.remove()
    rows = []
    for name, m in layers:
        if example_input is not None:
            shape = shapes.get(id(m))
        else:
            last = getattr(m, "last_input_shape", None)
            shape = tuple(last) if last is not None else None
        rows.append(_row(name, m, shape))
    if example_input is not None:
        for r, (_, m) in zip(rows, layers):
            if id(m) not in shapes:
                r["note"] = "not called by the forward of example_input"
    return Description(rows)
