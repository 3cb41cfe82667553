"""FrozenBatchNorm: batch normalization with every statistic and parameter fixed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _checks
from .. import functional as bnf
from . import _export


class FrozenBatchNorm(nn.Module):
    """Batch normalization with fixed statistics and affine parameters: ``y = x · scale + shift``.

    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias − running_mean · scale``, in
    training and evaluation alike. All four tensors are *buffers* (no parameters), so optimizers do
    not see them and gradients flow only to ``x``. Use it to fine-tune with small batches, where
    batch statistics would be noise (detectron2 and torchvision freeze the BN of pretrained backbones).

    Loads the state dict of a :class:`BatchNorm` or ``torch.nn.BatchNorm*d`` (``num_batches_tracked``
    is accepted and dropped; a checkpoint of an ``affine=False`` (or ``bias=False``) layer, which has
    no ``weight`` (``bias``), loads with ``weight = 1`` (``bias = 0``)). :meth:`from_batchnorm` builds one from a
    layer directly. ``mask`` is accepted for interface parity and changes nothing (no statistics).

    Shape:
        Input any rank ≥ 2 with C at ``axis``; output the same shape, dtype and memory format.

    Example::

        >>> bn = torch.nn.BatchNorm2d(8).eval()
        >>> frozen = FrozenBatchNorm(8)
        >>> frozen.load_state_dict(bn.state_dict())
        <All keys matched successfully>
        >>> x = torch.randn(2, 8, 4, 4)
        >>> torch.allclose(frozen(x), bn(x), atol=1e-6)
        True

    Reference: Ioffe & Szegedy (2015), Algorithm 2 (inference); the frozen layer of torchvision and
    detectron2 (``FrozenBatchNorm2d``).
    """

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, *, axis: int = 1, device: Any = None, dtype: Any = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = _checks.check_num_features(num_features, "FrozenBatchNorm")
        self.eps = _checks.check_eps(eps)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}.")
        self.axis = axis
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.last_input_shape: tuple[int, ...] | None = None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, axis={self.axis}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        if prefix + "running_mean" in state_dict:
            # a BatchNorm with affine=False (or bias=False) has no weight (bias): γ = 1, β = 0
            state_dict.setdefault(prefix + "weight", torch.ones_like(self.weight))
            state_dict.setdefault(prefix + "bias", torch.zeros_like(self.bias))
        for name in ("weight", "bias", "running_mean", "running_var"):
            k = prefix + name
            # inside a model (prefix set) torch's rule: every matching tensor copied, one error lists all mismatches
            if prefix == "" and k in state_dict and tuple(state_dict[k].shape) != (self.num_features,):
                raise _checks.state_shape_error(
                    "FrozenBatchNorm", k, tuple(state_dict[k].shape), (self.num_features,), self.num_features
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A FrozenBatchNorm with ``bn``'s statistics, affine parameters, eps, axis, device and dtype (copied).

        ``bn``: a :class:`BatchNorm` (any variant) or ``torch.nn.BatchNorm*d`` with running estimates;
        ``torch.nn`` layers have the feature axis at 1. Example:
        ``frozen = FrozenBatchNorm.from_batchnorm(torch.nn.BatchNorm2d(8))``.
        """
        rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        if rm is None or rv is None:
            raise ValueError(
                f"FrozenBatchNorm.from_batchnorm expected a batch-norm layer with running estimates, got "
                f"{type(bn).__name__} without running_mean/running_var (track_running_stats=False?). Freeze a layer "
                "that tracked statistics, or recalibrate it first."
            )
        frozen = cls(rm.shape[0], float(getattr(bn, "eps", 1e-5)), axis=int(getattr(bn, "axis", 1)), device=rm.device, dtype=rm.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(rm)
            frozen.running_var.copy_(rv)
            if getattr(bn, "weight", None) is not None:
                frozen.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-feature ``(scale, shift)`` of the affine map, each ``(C,)``."""
        a, b = bnf.eval_scale_shift(self.weight, self.bias, self.running_mean, self.running_var, self.eps)
        return a[0], b[0]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``y = x · scale + shift``; ``mask`` is accepted for interface parity and changes nothing."""
        if _export.active(x):  # fx: a leaf call; jit.trace/export: ATen's batch_norm in eval mode
            return _export.fx_leaf(self, x, mask) if isinstance(x, torch.fx.Proxy) else _export.lowered(self, x, False)
        x, axis = _checks.layer_input(self, x, "FrozenBatchNorm")
        _checks.mask_for(x, axis, mask)
        self.__dict__["last_input_shape"] = tuple(x.shape)  # plain attribute: skip nn.Module.__setattr__'s checks
        return bnf.normalize(
            x, self.weight, self.bias, axis=axis, eps=self.eps, use_batch_stats=False,
            running_mean=self.running_mean, running_var=self.running_var, name="FrozenBatchNorm",
        )
