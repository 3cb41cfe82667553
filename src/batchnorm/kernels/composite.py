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
    """Reduce/apply forward and backward as plain torch ops (any device, dtype, layout).

    The primitives *are* the functions of :mod:`batchnorm.kernels.torch_ops` (same signatures).
    """

    name = "composite"

    def supports(self, x, s: Settings | None = None) -> bool:
        return True

    reduce = staticmethod(_t.reduce)
    apply = staticmethod(_t.apply)
    backward_reduce = staticmethod(_t.backward_reduce)
    backward_apply = staticmethod(_t.backward_apply)


COMPOSITE = CompositeBackend()
