"""Input validation shared by every layer and function.

Each message says what was expected, what was received and what to do instead; the tests pin the
wording, so change a message here and in ``tests/test_errors.py`` together.
"""

from __future__ import annotations

import math

import torch

from . import activations as _activations

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class StateDictShapeError(RuntimeError, ValueError):
    """A checkpoint tensor's shape does not fit the layer: a RuntimeError like torch's, and a ValueError as before."""


def state_shape_error(
    layer: str, key: str, got: tuple[int, ...], want: tuple[int, ...], num_features: int
) -> StateDictShapeError:
    """The error of a wrong-shaped ``load_state_dict`` entry; the caller raises it before loading anything."""
    if len(got) == 1:
        fix = f"Build the layer with num_features={got[0]} to load this checkpoint"
    else:
        fix = "The checkpoint's entry is not a per-feature vector: check that it was saved from a batch norm layer"
    return StateDictShapeError(
        f"{layer}.load_state_dict: '{key}' has shape {got} in the checkpoint but this layer expects {want} "
        f"(num_features={num_features}). {fix}; nothing was loaded into this layer."
    )


def check_input(x: object, name: str = "BatchNorm") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expected a torch.Tensor input, got {type(x).__name__}. Convert it with torch.as_tensor(x).")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} expected a floating-point input (float16, bfloat16, float32 or float64), got dtype {x.dtype}. "
            "Convert it first, e.g. x.float()."
        )
    if x.dim() < 2:
        raise ValueError(
            f"{name} expected an input with at least 2 dimensions (N, C, ...), got a {x.dim()}D input of shape "
            f"{tuple(x.shape)}. Put the samples of a batch along a batch axis, e.g. x.reshape(N, C)."
        )
    return x


def check_axis_type(axis: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(
            f"axis must be an int, got {type(axis).__name__} {axis!r}. Pass the index of the feature axis: "
            "axis=1 for (N, C, ...) inputs, axis=-1 for (N, ..., C) inputs."
        )
    return axis


def normalize_axis(axis: int, ndim: int, shape: tuple[int, ...] | None = None) -> int:
    check_axis_type(axis)
    if not -ndim <= axis < ndim:
        where = f" of shape {tuple(shape)}" if shape is not None else ""
        raise ValueError(
            f"axis={axis} is out of range for a {ndim}D input{where}: expected an integer in [{-ndim}, {ndim - 1}]. "
            "Use axis=1 for (N, C, ...) inputs and axis=-1 for channels-last (N, ..., C) inputs."
        )
    return axis % ndim


def check_features(x: torch.Tensor, axis: int, num_features: int, name: str = "BatchNorm") -> None:
    if x.shape[axis] == 0:  # never suggest num_features=0: the constructor refuses it
        raise ValueError(
            f"{name} expected {num_features} features along axis {axis}, got input of shape {tuple(x.shape)} "
            "with 0 there: an input needs at least one feature. Check what feeds this layer (an empty slice or a "
            "wrong reshape), or pass axis= pointing at the feature axis (e.g. axis=-1 for (N, L, C) input)."
        )
    if x.shape[axis] != num_features:
        raise ValueError(
            f"{name} expected {num_features} features along axis {axis}, got input of shape {tuple(x.shape)} "
            f"with {x.shape[axis]} there. Build the layer with num_features={x.shape[axis]}, or pass axis= "
            "pointing at the feature axis (e.g. axis=-1 for (N, L, C) input)."
        )


def check_momentum(momentum: float | None) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be None or a number in [0, 1], got {momentum!r}. It is the weight of the new batch "
            "(PyTorch convention): a Keras/Flax momentum of 0.99 is momentum=0.01 here; pass momentum=None for a "
            "cumulative average."
        )
    return float(momentum)


def check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (float(eps) > 0.0 and math.isfinite(eps)):
        raise ValueError(
            f"eps must be a finite number > 0, got {eps!r}. It keeps 1/sqrt(var + eps) finite for constant "
            "features: pass eps=1e-5 (PyTorch's default) or 1e-3 (Keras')."
        )
    return float(eps)


def check_num_features(num_features: int, name: str = "BatchNorm") -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(
            f"{name} expected num_features to be a positive int, got {num_features!r}. Pass the size of the "
            f"feature axis, e.g. {name}(64) for (N, 64, H, W) input."
        )
    return num_features


def mask_for(x: torch.Tensor, axis: int, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Return ``mask`` broadcast to ``x``'s shape with a size-1 feature axis, or None."""
    if mask is None:
        return None
    expected = tuple(s for d, s in enumerate(x.shape) if d != axis)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mask must be a boolean torch.Tensor of shape {expected}, got {type(mask).__name__}. "
            "Build it with torch.as_tensor(mask, dtype=torch.bool)."
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a boolean tensor, got dtype {mask.dtype}. Pass mask.bool(), or build it with a "
            "comparison such as torch.arange(L) < lengths[:, None]."
        )
    try:
        full = torch.broadcast_shapes(tuple(mask.shape), expected)
    except RuntimeError:
        full = None
    if full != expected:
        raise ValueError(
            f"mask must have the shape of the input without the feature axis, {expected} (or broadcast to it), "
            f"got {tuple(mask.shape)} for input of shape {tuple(x.shape)} with axis={axis}. Pass a mask without the "
            "feature axis: a padding mask for (N, C, L) input is (N, L); for (N, L, C) input with axis=-1 it is also (N, L)."
        )
    if mask.device != x.device:
        raise ValueError(
            f"mask must be on the input's device ({x.device}), got a mask on {mask.device}. "
            "Move it with mask.to(x.device)."
        )
    return mask.expand(expected).unsqueeze(axis)


def too_few_values(n: int, shape: tuple[int, ...], masked: bool, name: str = "BatchNorm") -> ValueError:
    how = " (counting only positions where mask is True)" if masked else ""
    # BatchRenorm needs > 1 value too (x̂ is 0 and carries no gradient): do not send its users to itself
    renorm = "" if name == "BatchRenorm" else "use batchnorm.BatchRenorm (which also behaves well with small batches), "
    return ValueError(
        f"{name} expected more than 1 value per feature when training, got {n}{how} for input of shape {shape}. "
        "Statistics of one value are undefined. Instead: call model.eval() to normalize with the running "
        f"estimates, use a larger batch, {renorm}"
        "or use a batch-independent norm such as torch.nn.GroupNorm or torch.nn.LayerNorm."
    )


ACTIVATIONS = _activations.NAMES  # the one table: batchnorm.activations
MEMORY_MODES = ("default", "save")


def check_activation(activation: str | None, negative_slope: float, memory: str, name: str = "BatchNorm") -> None:
    """Validate the fused activation and memory mode (memory="save" needs an invertible activation)."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{name} expected activation to be one of {ACTIVATIONS}, got {activation!r}. Pass one of those names, "
            "or apply your activation after the layer."
        )
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"{name} expected negative_slope to be a float, got {type(negative_slope).__name__}.")
    if memory not in MEMORY_MODES:
        raise ValueError(f"{name} expected memory to be one of {MEMORY_MODES}, got {memory!r}.")
    if memory == "save":
        if not _activations.get(activation).invertible:
            raise ValueError(
                f"{name}: memory='save' recovers the normalized input from the output, so the activation must be "
                f"invertible, got activation={activation!r}. Use activation='leaky_relu' (negative_slope > 0) or "
                "None/'identity', or keep memory='default'."
            )
        if activation == "leaky_relu" and not negative_slope > 0:
            raise ValueError(
                f"{name}: memory='save' with leaky_relu needs negative_slope > 0 to invert it, got {negative_slope}. "
                "Pass a positive negative_slope (e.g. 0.01), or use memory='default'."
            )


def layer_input(layer: object, x: object, name: str) -> tuple[torch.Tensor, int]:
    """Validate ``x`` for a per-feature layer (``layer.axis``, ``layer.num_features``); return ``(x, axis ≥ 0)``."""
    x = check_input(x, name)
    axis = normalize_axis(layer.axis, x.dim(), x.shape)  # type: ignore[attr-defined]
    check_features(x, axis, layer.num_features, name)  # type: ignore[attr-defined]
    return x, axis
