"""The numba kernels registered as ``torch.library`` custom ops (``torch.ops.batchnorm.*``).

Registering them makes them opaque, shape-known nodes for ``torch.compile`` and ``torch.export``:
each op has a fake (meta) implementation that only computes output shapes, and ``apply`` (used on
its own by the evaluation path, where gradients may still flow to ``x``, ``weight`` and ``bias``)
has an autograd formula. The training path differentiates through
:class:`batchnorm.functional._TrainNorm`, whose forward and backward call these ops.

This module has the same four functions, with the same signatures (tensors and the call's
:class:`batchnorm.kernels.backend.Settings` record ``s``), as :mod:`batchnorm.kernels.torch_ops` and
:mod:`batchnorm.kernels.numba.calls` (``reduce``, ``apply``, ``backward_reduce``, ``backward_apply``); the
numba backend calls them. It is the one place where ``s`` is unpacked into primitives: a custom op's
schema takes only tensors and plain numbers/strings, so every op takes the same settings tail
(:data:`_TAIL`, made by :func:`_cfg`) and turns it back into a (cached) record with :func:`_settings`. It also offers the numba
path's one-call sequences for plain batch norm (``train_forward``, ``train_backward``,
``eval_forward``) and its
running update (``update_running``), eager only: while compiling they return None and the caller
runs the three steps through the registered ops.
"""

from __future__ import annotations

import functools

import torch

from .. import safety
from .. import torch_ops as _t
from ..backend import Settings
from . import calls as cpu

_LIB = "batchnorm"

#: The settings tail every custom op takes, in this order (what :func:`_cfg` returns).
_TAIL = "int axis, int? group_size, str activation, float negative_slope, bool save"


def _cfg(s: Settings) -> tuple:
    """``s`` as the primitives of :data:`_TAIL` (the only place a record is unpacked)."""
    return s.axis, s.group_size, s.activation or "identity", float(s.negative_slope), bool(s.save)


@functools.lru_cache(maxsize=256)
def _settings(axis: int, group_size: int | None, activation: str, negative_slope: float, save: bool) -> Settings:
    """The record back from :data:`_TAIL`'s primitives (``eps`` is not used by the four steps)."""
    return Settings(axis=axis, group_size=group_size, activation=None if activation == "identity" else activation,
                    negative_slope=negative_slope, save=save)


def _op(name: str, tensors: str, returns: str):
    """Register ``batchnorm::name(tensors, <settings tail>) -> returns`` (CPU) around the decorated kernel call."""
    return torch.library.custom_op(f"{_LIB}::{name}", mutates_args=(), device_types="cpu",
                                   schema=f"({tensors}, {_TAIL}) -> {returns}")


def _g(x: torch.Tensor, s: Settings) -> tuple[int, int]:
    """The ``(G, C)`` shape of per-feature results."""
    return _t.num_groups(x.shape[0], s.group_size), x.shape[s.axis]


# ---------------------------------------------------------------------------- reduce
@_op("reduce", "Tensor x, Tensor? m", "(Tensor, Tensor, Tensor)")
def _reduce_op(x, m, *cfg):
    with torch.no_grad(), safety.kernel_guard():
        return cpu.reduce(x, _settings(*cfg), m)


@_reduce_op.register_fake
def _(x, m, *cfg):
    shape, sd = _g(x, _settings(*cfg)), _t.stat_dtype(x.dtype)
    return x.new_empty(shape, dtype=sd), x.new_empty(shape, dtype=sd), x.new_empty(shape, dtype=sd)


# ---------------------------------------------------------------------------- apply
@_op("apply", "Tensor x, Tensor scale, Tensor shift", "Tensor")
def _apply_op(x, scale, shift, *cfg):
    with torch.no_grad(), safety.kernel_guard():
        return cpu.apply(x, _settings(*cfg), scale, shift)


@_apply_op.register_fake
def _(x, scale, shift, *cfg):
    return torch.empty_like(x)


def _apply_setup(ctx, inputs, output):
    x, scale, shift, *cfg = inputs
    ctx.save_for_backward(x, scale, shift)
    ctx.settings = _settings(*cfg)


def _apply_backward(ctx, dy):
    x, scale, shift = ctx.saved_tensors
    s = ctx.settings
    e = lambda v: _t.expand(v, x, s.axis, s.group_size)  # noqa: E731
    xs = x.to(scale.dtype)
    dz = dy.to(scale.dtype)
    if s.activation is not None:
        dz = dz * _t.act_grad(torch.addcmul(e(shift), xs, e(scale)), s.activation, s.negative_slope)
    dx = (dz * e(scale)).to(x.dtype) if ctx.needs_input_grad[0] else None
    dscale = _t._group_sum(dz * xs, x, s.axis, s.group_size).reshape(scale.shape) if ctx.needs_input_grad[1] else None
    dshift = _t._group_sum(dz, x, s.axis, s.group_size).reshape(shift.shape) if ctx.needs_input_grad[2] else None
    return (dx, dscale, dshift) + (None,) * len(_cfg(s))


_apply_op.register_autograd(_apply_backward, setup_context=_apply_setup)


# ---------------------------------------------------------------------------- backward kernels
_STATS = "Tensor dy, Tensor x, Tensor mean, Tensor invstd"
_Z = "Tensor? zscale, Tensor? zshift"


@_op("backward_reduce", f"{_STATS}, {_Z}", "(Tensor, Tensor)")
def _backward_reduce_op(dy, x, mean, invstd, zscale, zshift, *cfg):
    with torch.no_grad(), safety.kernel_guard():
        return cpu.backward_reduce(dy, x, _settings(*cfg), mean, invstd, zscale, zshift)


@_backward_reduce_op.register_fake
def _(dy, x, mean, invstd, zscale, zshift, *cfg):
    shape = _g(x, _settings(*cfg))
    return mean.new_empty(shape), mean.new_empty(shape)


@_op("backward_apply", f"{_STATS}, Tensor k, Tensor mean_dy, Tensor mean_dy_xhat, Tensor? m, {_Z}", "Tensor")
def _backward_apply_op(dy, x, mean, invstd, k, mean_dy, mean_dy_xhat, m, zscale, zshift, *cfg):
    with torch.no_grad(), safety.kernel_guard():
        return cpu.backward_apply(dy, x, _settings(*cfg), mean, invstd, k, mean_dy, mean_dy_xhat, m, zscale, zshift)


@_backward_apply_op.register_fake
def _(dy, x, *rest):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------- kernel-module interface
# Eager calls go straight to the numba kernels: the dispatcher round trip of a Python custom op costs
# ~0.1 ms per call, which is the whole kernel time for mid-size tensors. Under torch.compile /
# torch.export (is_compiling) the ops are used, so graphs see opaque, shape-known nodes.
_compiling = torch.compiler.is_compiling


def reduce(x, s: Settings, m=None):
    """:func:`calls.reduce` (eager) or ``torch.ops.batchnorm.reduce`` (compiling; torch path when x needs a gradient)."""
    if not _compiling():  # cpu.reduce takes the (differentiable) torch path when x needs a gradient
        return cpu.reduce(x, s, m)
    if x.requires_grad and torch.is_grad_enabled():
        return _t.reduce(x, s, m)  # batch_stats on a graph: stay differentiable
    return _reduce_op(x, m, *_cfg(s))


def apply(x, s: Settings, scale, shift):
    """:func:`calls.apply` (eager) or ``torch.ops.batchnorm.apply`` (compiling; differentiable)."""
    if not _compiling():  # cpu.apply itself takes the (differentiable) torch path when a gradient is needed
        return cpu.apply(x, s, scale, shift)
    return _apply_op(x, scale, shift, *_cfg(s))


def backward_reduce(dy, x, s: Settings, mean, invstd, zscale=None, zshift=None):
    """:func:`calls.backward_reduce` (eager) or ``torch.ops.batchnorm.backward_reduce`` (compiling)."""
    if not _compiling():
        return cpu.backward_reduce(dy, x, s, mean, invstd, zscale, zshift)
    return _backward_reduce_op(dy, x, mean, invstd, zscale, zshift, *_cfg(s))


def backward_apply(dy, x, s: Settings, mean, invstd, k, mean_dy, mean_dy_xhat, m, zscale=None, zshift=None):
    """:func:`calls.backward_apply` (eager) or ``torch.ops.batchnorm.backward_apply`` (compiling)."""
    if not _compiling():
        return cpu.backward_apply(dy, x, s, mean, invstd, k, mean_dy, mean_dy_xhat, m, zscale, zshift)
    return _backward_apply_op(dy, x, mean, invstd, k, mean_dy, mean_dy_xhat, m, zscale, zshift, *_cfg(s))


# Plain batch norm's fused sequences and the running update: eager CPU calls only (under torch.compile the
# caller sees None and runs the three steps above through the registered ops).
def train_forward(x, s: Settings, m, weight, bias, running=None):
    """:func:`calls.train_forward` when eager (None while compiling, or when the kernels cannot take ``x``)."""
    return None if _compiling() else cpu.train_forward(x, s, m, weight, bias, running)


def train_backward(dy, t, s: Settings, stats, invstd, weight, bias, count, m, needs=(True, True, True)):
    """:func:`calls.train_backward` when eager (None while compiling)."""
    return None if _compiling() else cpu.train_backward(dy, t, s, stats, invstd, weight, bias, count, m, needs)


def update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked=None):
    """:func:`calls.update_running` when eager (None while compiling, or for buffers it does not take)."""
    if _compiling():
        return None
    return cpu.update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)


def eval_forward(x, s: Settings, weight, bias, running_mean, running_var):
    """:func:`calls.eval_forward` when eager (None while compiling, or for inputs/buffers it does not take)."""
    return None if _compiling() else cpu.eval_forward(x, s, weight, bias, running_mean, running_var)
