"""The numba kernels registered as ``torch.library`` custom ops (``torch.ops.batchnorm.*``).

Registering them makes them opaque, shape-known nodes for ``torch.compile`` and ``torch.export``:
each op has a fake (meta) implementation that only computes output shapes, and ``apply`` (used on
its own by the evaluation path, where gradients may still flow to ``x``, ``weight`` and ``bias``)
has an autograd formula. The training path differentiates through
:class:`batchnorm.functional._TrainNorm`, whose forward and backward call these ops.

This module has the same four functions as :mod:`batchnorm.kernels.torch_ops` and
:mod:`batchnorm.kernels.numba.calls` (``reduce``, ``apply``, ``backward_reduce``, ``backward_apply``); it is
what :func:`batchnorm.kernels.dispatch.select` returns for the numba path. It also offers the numba
path's one-call sequences for plain batch norm (``train_forward``, ``train_backward``,
``eval_forward``) and its
running update (``update_running``), eager only: while compiling they return None and the caller
runs the three steps through the registered ops.
"""

from __future__ import annotations

import torch

from .. import safety
from .. import torch_ops as _t
from . import calls as cpu

_LIB = "batchnorm"


def _g(x: torch.Tensor, group_size: int | None) -> int:
    return _t.num_groups(x.shape[0], group_size)


# ---------------------------------------------------------------------------- reduce
@torch.library.custom_op(f"{_LIB}::reduce", mutates_args=(), device_types="cpu")
def _reduce_op(
    x: torch.Tensor, axis: int, m: torch.Tensor | None, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad(), safety.kernel_guard():
        return cpu.reduce(x, axis, m, group_size)


@_reduce_op.register_fake
def _(x, axis, m, group_size):
    shape = (_g(x, group_size), x.shape[axis])
    sd = _t.stat_dtype(x.dtype)
    return x.new_empty(shape, dtype=sd), x.new_empty(shape, dtype=sd), x.new_empty(shape, dtype=sd)


# ---------------------------------------------------------------------------- apply
@torch.library.custom_op(f"{_LIB}::apply", mutates_args=(), device_types="cpu")
def _apply_op(
    x: torch.Tensor,
    axis: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
    group_size: int | None,
    activation: str,
    negative_slope: float,
) -> torch.Tensor:
    with torch.no_grad(), safety.kernel_guard():
        return cpu.apply(x, axis, scale, shift, group_size, activation, negative_slope)


@_apply_op.register_fake
def _(x, axis, scale, shift, group_size, activation, negative_slope):
    return torch.empty_like(x)


def _apply_setup(ctx, inputs, output):
    x, axis, scale, shift, group_size, activation, negative_slope = inputs
    ctx.save_for_backward(x, scale, shift)
    ctx.cfg = (axis, group_size, activation, negative_slope)


def _apply_backward(ctx, dy):
    x, scale, shift = ctx.saved_tensors
    axis, group_size, activation, negative_slope = ctx.cfg
    e = lambda v: _t.expand(v, x, axis, group_size)  # noqa: E731
    xs = x.to(scale.dtype)
    dz = dy.to(scale.dtype)
    if activation != "identity":
        dz = dz * _t.act_grad(torch.addcmul(e(shift), xs, e(scale)), activation, negative_slope)
    dx = (dz * e(scale)).to(x.dtype) if ctx.needs_input_grad[0] else None
    dscale = _t._group_sum(dz * xs, x, axis, group_size).reshape(scale.shape) if ctx.needs_input_grad[2] else None
    dshift = _t._group_sum(dz, x, axis, group_size).reshape(shift.shape) if ctx.needs_input_grad[3] else None
    return dx, None, dscale, dshift, None, None, None


_apply_op.register_autograd(_apply_backward, setup_context=_apply_setup)


# ---------------------------------------------------------------------------- backward kernels
@torch.library.custom_op(f"{_LIB}::backward_reduce", mutates_args=(), device_types="cpu")
def _backward_reduce_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    axis: int,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    group_size: int | None,
    activation: str,
    negative_slope: float,
    zscale: torch.Tensor | None,
    zshift: torch.Tensor | None,
    from_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), safety.kernel_guard():
        return cpu.backward_reduce(
            dy, x, axis, mean, invstd, group_size, activation, negative_slope, zscale, zshift, from_output
        )


@_backward_reduce_op.register_fake
def _(dy, x, axis, mean, invstd, group_size, activation, negative_slope, zscale, zshift, from_output):
    shape = (_g(x, group_size), x.shape[axis])
    return mean.new_empty(shape), mean.new_empty(shape)


@torch.library.custom_op(f"{_LIB}::backward_apply", mutates_args=(), device_types="cpu")
def _backward_apply_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    axis: int,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    k: torch.Tensor,
    mean_dy: torch.Tensor,
    mean_dy_xhat: torch.Tensor,
    m: torch.Tensor | None,
    group_size: int | None,
    activation: str,
    negative_slope: float,
    zscale: torch.Tensor | None,
    zshift: torch.Tensor | None,
    from_output: bool,
) -> torch.Tensor:
    with torch.no_grad(), safety.kernel_guard():
        return cpu.backward_apply(
            dy, x, axis, mean, invstd, k, mean_dy, mean_dy_xhat, m, group_size, activation, negative_slope,
            zscale, zshift, from_output,
        )


@_backward_apply_op.register_fake
def _(dy, x, axis, mean, invstd, k, mean_dy, mean_dy_xhat, m, group_size, activation, negative_slope, zscale,
      zshift, from_output):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------- kernel-module interface
# Eager calls go straight to the numba kernels: the dispatcher round trip of a Python custom op costs
# ~0.1 ms per call, which is the whole kernel time for mid-size tensors. Under torch.compile /
# torch.export (is_compiling) the ops are used, so graphs see opaque, shape-known nodes.
_compiling = torch.compiler.is_compiling


def _name(activation: str | None) -> str:
    return "identity" if activation is None else activation


def reduce(x, axis, m=None, group_size=None):
    """:func:`torch_ops.reduce` through ``torch.ops.batchnorm.reduce`` (torch path when x needs a gradient)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _t.reduce(x, axis, m, group_size)  # batch_stats on a graph: stay differentiable
    if not _compiling():
        return cpu.reduce(x, axis, m, group_size)
    return _reduce_op(x, axis, m, group_size)


def apply(x, axis, scale, shift, group_size=None, activation=None, negative_slope=0.01):
    """:func:`torch_ops.apply` through ``torch.ops.batchnorm.apply`` (differentiable)."""
    if not _compiling():  # cpu.apply itself takes the (differentiable) torch path when a gradient is needed
        return cpu.apply(x, axis, scale, shift, group_size, activation, negative_slope)
    return _apply_op(x, axis, scale, shift, group_size, _name(activation), float(negative_slope))


def backward_reduce(dy, x, axis, mean, invstd, group_size, activation=None, negative_slope=0.01,
                    zscale=None, zshift=None, from_output=False):
    """:func:`torch_ops.backward_reduce` through ``torch.ops.batchnorm.backward_reduce``."""
    if not _compiling():
        return cpu.backward_reduce(dy, x, axis, mean, invstd, group_size, activation, negative_slope, zscale,
                                   zshift, from_output)
    return _backward_reduce_op(dy, x, axis, mean, invstd, group_size, _name(activation), float(negative_slope),
                               zscale, zshift, bool(from_output))


def backward_apply(dy, x, axis, mean, invstd, k, mean_dy, mean_dy_xhat, m, group_size, activation=None,
                   negative_slope=0.01, zscale=None, zshift=None, from_output=False):
    """:func:`torch_ops.backward_apply` through ``torch.ops.batchnorm.backward_apply``."""
    if not _compiling():
        return cpu.backward_apply(dy, x, axis, mean, invstd, k, mean_dy, mean_dy_xhat, m, group_size, activation,
                                  negative_slope, zscale, zshift, from_output)
    return _backward_apply_op(dy, x, axis, mean, invstd, k, mean_dy, mean_dy_xhat, m, group_size, _name(activation),
                              float(negative_slope), zscale, zshift, bool(from_output))


# Plain batch norm's fused sequences and the running update: eager CPU calls only (under torch.compile the
# caller sees None and runs the three steps above through the registered ops).
def train_forward(x, axis, m, group_size, weight, bias, eps, activation=None, negative_slope=0.01, clamp=False,
                  running=None):
    """:func:`cpu.train_forward` when eager (None while compiling, or when the kernels cannot take ``x``)."""
    if _compiling():
        return None
    return cpu.train_forward(x, axis, m, group_size, weight, bias, eps, activation, negative_slope, clamp, running)


def train_backward(dy, t, axis, stats, invstd, weight, bias, count, m, group_size, eps, activation=None,
                   negative_slope=0.01, from_output=False, needs=(True, True, True)):
    """:func:`cpu.train_backward` when eager (None while compiling)."""
    if _compiling():
        return None
    return cpu.train_backward(dy, t, axis, stats, invstd, weight, bias, count, m, group_size, eps, activation,
                              negative_slope, from_output, needs)


def update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked=None):
    """:func:`cpu.update_running` when eager (None while compiling, or for buffers it does not take)."""
    if _compiling():
        return None
    return cpu.update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)


def eval_forward(x, axis, weight, bias, running_mean, running_var, eps, activation=None, negative_slope=0.01):
    """:func:`cpu.eval_forward` when eager (None while compiling, or for inputs/buffers it does not take)."""
    if _compiling():
        return None
    return cpu.eval_forward(x, axis, weight, bias, running_mean, running_var, eps, activation, negative_slope)
