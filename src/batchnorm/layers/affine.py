"""AffineOnly: the learnable per-feature affine map of batch norm, without the normalization."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _checks
from ..kernels import torch_ops as _t
from ..kernels.backend import Settings
from . import _export


class AffineOnly(nn.Module):
    r"""``y = γ · x + β`` per feature, with no normalization: batch norm with the statistics removed.

    The ablation the seeds ask about ("why does BN not simply learn ``γx + β``?"): same parameters
    as :class:`BatchNorm` (``weight`` γ, init 1; ``bias`` β, init 0), same axis and mask interface,
    but no statistics, no running estimates and identical behaviour in training and evaluation.
    ``mask`` is validated and otherwise ignored (every position is mapped). The product is computed
    in at least float32 (float64 for float64 input) and returned in the input's dtype.

    Args:
        num_features: C, the size of the feature axis.
        axis: the feature axis (1 for ``(N, C, *)``, -1 for ``(N, *, C)``).
        device, dtype: of the parameters.

    Shape: input any rank ≥ 2 with C at ``axis``; output the same shape and dtype.

    Example::

        >>> layer = AffineOnly(16)
        >>> x = torch.randn(8, 16, 10)
        >>> torch.equal(layer(x), x)                       # identity at initialization
        True

    Reference: the affine step of Ioffe & Szegedy (2015), Algorithm 1, alone (their Section 3
    explains why normalization must be part of the model, not a fixed preprocessing).
    """

    def __init__(self, num_features: int, *, axis: int = 1, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = _checks.check_num_features(num_features, "AffineOnly")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}.")
        self.axis = axis
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.last_input_shape: tuple[int, ...] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``γ = 1``, ``β = 0``."""
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, axis={self.axis}"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``y = γ · x + β``; ``mask`` is accepted for interface parity and changes nothing."""
        if isinstance(x, torch.fx.Proxy):  # a leaf call in fx graphs (the checks below cannot read a Proxy)
            return _export.fx_leaf(self, x, mask)
        x, axis = _checks.layer_input(self, x, "AffineOnly")
        _checks.mask_for(x, axis, mask)
        self.last_input_shape = tuple(x.shape)
        sd = _t.stat_dtype(torch.promote_types(x.dtype, self.weight.dtype))
        # the torch apply path: differentiable in x, weight and bias on every device
        return _t.apply(x, Settings(axis), self.weight.to(sd).reshape(1, -1), self.bias.to(sd).reshape(1, -1))
