"""The ``"composite"`` backend: plain differentiable torch ops on any device, dtype and layout.

Every primitive is built from ordinary torch operations (:mod:`batchnorm.kernels.torch_ops` holds
them), so it runs wherever torch runs and autograd can trace it (double backward, ``torch.func``).
It is the fallback of every other backend and the reference the tests compare them with. ``"torch"``
is an accepted alias of its name.

Shape: as :mod:`batchnorm.kernels.backend`.

Example::

    >>> import torch
    >>> from batchnorm.kernels.composite import COMPOSITE
    >>> from batchnorm.kernels.backend import Settings
    >>> count, mean, m2 = COMPOSITE.reduce(torch.randn(8, 3), Settings(axis=1), None)
    >>> tuple(mean.shape)
    (1, 3)

Reference: Ioffe & Szegedy (2015), Algorithm 1 (two-pass statistics here, Chan et al. 1979 merges).
"""

from __future__ import annotations

from . import torch_ops as _t
from .backend import Backend, Settings


class CompositeBackend(Backend):
    """Reduce/apply forward and backward as plain torch ops (any device, dtype, layout)."""

    name = "composite"

    def supports(self, x, s: Settings | None = None) -> bool:
        return True

    def reduce(self, x, s: Settings, m):
        return _t.reduce(x, s.axis, m, s.group_size)

    def apply(self, x, s: Settings, scale, shift):
        return _t.apply(x, s.axis, scale, shift, s.group_size, s.activation, s.negative_slope)

    def backward_reduce(self, dy, t, s: Settings, p, q, zscale=None, zshift=None):
        return _t.backward_reduce(dy, t, s.axis, p, q, s.group_size, s.activation, s.negative_slope, zscale, zshift,
                                  s.save)

    def backward_apply(self, dy, t, s: Settings, p, q, k, mean_dz, mean_dzx, m, zscale=None, zshift=None):
        return _t.backward_apply(dy, t, s.axis, p, q, k, mean_dz, mean_dzx, m, s.group_size, s.activation,
                                 s.negative_slope, zscale, zshift, s.save)


COMPOSITE = CompositeBackend()
