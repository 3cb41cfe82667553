"""The numba backend: :class:`batchnorm.kernels.backend.Backend` over the CPU kernels.

Every call goes through :mod:`.ops` (eager: straight into the njit kernels;
under ``torch.compile``: the registered custom ops) inside :func:`batchnorm.kernels.safety.kernel_guard`
(serializes kernel launches while numba's threading layer is not known to be thread-safe). Where the
kernels cannot take a tensor (odd strides, other dtypes/devices) a sequence falls back to the shared
default, i.e. the composite primitives.

Shape: as :mod:`batchnorm.kernels.backend`.

Example::

    >>> import torch
    >>> from batchnorm.kernels.numba import NUMBA
    >>> from batchnorm.kernels.backend import Settings
    >>> y, stats, invstd, finite = NUMBA.train_forward(torch.randn(16, 4), Settings(axis=1), None, None, None)
    >>> tuple(stats.shape)                  # (count, mean, biased var) × G groups × C features
    (3, 1, 4)

Reference: docs/kernels.md (loop strategies, one-call sequences); Ioffe & Szegedy (2015).
"""

from __future__ import annotations

import contextlib

import torch

from .. import safety
from ..backend import Backend, Settings
from . import ops as _ops
from .plans import supports as _supports

_NO_GUARD = contextlib.nullcontext()


def _guard():
    """safety.kernel_guard() around eager kernel calls; while compiling, the custom ops (numba/ops.py) guard themselves."""
    return _NO_GUARD if torch.compiler.is_compiling() else safety.kernel_guard()


class NumbaBackend(Backend):
    """Reduce/apply and plain BN's one-call sequences as numba kernels (CPU, float32/float64, dense)."""

    name = "numba"

    def supports(self, x: torch.Tensor, s: Settings | None = None) -> bool:
        """CPU, float32/float64, memory dense in some dimension order, not empty."""
        return _supports(x)

    # -- primitives (the signatures of the protocol; ops.py unpacks ``s`` only at the custom-op boundary) --
    def reduce(self, x, s: Settings, m):
        with _guard():
            return _ops.reduce(x, s, m)

    def apply(self, x, s: Settings, scale, shift):
        with _guard():
            return _ops.apply(x, s, scale, shift)

    def backward_reduce(self, dy, t, s: Settings, p, q, zscale=None, zshift=None):
        with _guard():
            return _ops.backward_reduce(dy, t, s, p, q, zscale, zshift)

    def backward_apply(self, dy, t, s: Settings, p, q, k, mean_dz, mean_dzx, m, zscale=None, zshift=None):
        with _guard():
            return _ops.backward_apply(dy, t, s, p, q, k, mean_dz, mean_dzx, m, zscale, zshift)

    # -- fused sequences (same rules as the defaults; None from the kernels → the default) --
    def train_forward(self, x, s: Settings, m, weight, bias, running=None):
        with _guard():
            res = _ops.train_forward(x, s, m, weight, bias, running)
        return res if res is not None else super().train_forward(x, s, m, weight, bias, running)

    def train_backward(self, dy, t, s: Settings, stats, invstd, weight, bias, count, m, needs):
        with _guard():
            res = _ops.train_backward(dy, t, s, stats, invstd, weight, bias, count, m, needs)
        if res is not None:
            return res
        return super().train_backward(dy, t, s, stats, invstd, weight, bias, count, m, needs)

    def eval_forward(self, x, s: Settings, weight, bias, running_mean, running_var):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            # the one-call kernel has no autograd: the default (constants, then the differentiable apply)
            return super().eval_forward(x, s, weight, bias, running_mean, running_var)
        with _guard():
            y = _ops.eval_forward(x, s, weight, bias, running_mean, running_var)
        return y if y is not None else super().eval_forward(x, s, weight, bias, running_mean, running_var)

    def update_running(self, running_mean, running_var, mean, var, count, momentum, num_batches_tracked=None):
        with _guard():
            ok = _ops.update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
        if ok is not None:
            return ok
        return super().update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)


NUMBA = NumbaBackend()


def warm_up(kernels: str = "all", stop=None) -> bool:
    """Compile (or load from numba's disk cache) the kernels of the common calls: float32 and float64,
    features innermost (2-D view) and not (3-D view), training forward and backward, eval, masks.

    ``kernels="smoke"``: only the float32, features-innermost training forward without mask (a small compile,
    for tests of the warm-up machinery; ``BATCHNORM_WARMUP_KERNELS=smoke``). ``stop``: a callable checked before
    each group of kernels; when it returns True the warm-up returns False at once (the interpreter is exiting:
    :func:`batchnorm.kernels.warmup._at_exit`). True when every kernel is ready.

    Runs in the background process and thread of :mod:`batchnorm.kernels.warmup`. Every tensor reaches the kernels as a
    C-contiguous canonical array (:func:`.plans._arr` copies a zero-stride or other non-dense ``dy``, as
    ``y.sum().backward()`` makes), so the signatures compiled here are the ones later calls use.
    """
    s = Settings(axis=1)
    stop = stop or (lambda: False)
    if kernels == "smoke":
        x, w, b = torch.randn(8, 3), torch.ones(3), torch.zeros(3)
        NUMBA.train_forward(x, s, None, w, b, None)
        return True
    for dtype in (torch.float32, torch.float64):
        for shape in ((8, 3), (4, 3, 5)):
            if stop():
                return False
            x = torch.randn(shape, dtype=dtype)
            w, b = torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)
            rm, rv, nbt = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype), torch.zeros((), dtype=torch.long)
            mask = torch.ones((shape[0],) + shape[2:], dtype=torch.bool).unsqueeze(1)
            for m in (None, mask):
                if stop():
                    return False
                y, stats, invstd, _ = NUMBA.train_forward(x, s, m, w, b, (rm, rv, nbt, 0.1))
                NUMBA.train_backward(torch.randn_like(y), x, s, stats, invstd, w, b, None, m, (True, True, True))
            # the backward primitives (the renorm and sync combines run them step by step)
            k, z = w.reshape(1, -1), b.reshape(1, -1)
            sums = NUMBA.backward_reduce(y, x, s, stats[1], invstd, k, z)
            NUMBA.backward_apply(y, x, s, stats[1], invstd, k, sums[0], sums[1], mask, k, z)
            NUMBA.eval_forward(x, s, w, b, rm, rv)
            with torch.no_grad():
                NUMBA.apply(x, s, w.reshape(1, -1), b.reshape(1, -1))
                NUMBA.reduce(x, s, None)
    return True
