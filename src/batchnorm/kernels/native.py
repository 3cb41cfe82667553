"""The ``"native"`` backend: ATen's own batch norm (CPU kernel, cuDNN, MIOpen) for plain batch norm.

It serves *plain* batch norm only — no mask, no ghost groups, the plain combine, ``memory="default"``
— on any device, for a feature axis that can be viewed as torch's channel axis (:func:`viewable`):
``axis=1`` on a contiguous or channels-last tensor, or the last axis of a contiguous tensor
(``(N, ..., C)`` is viewed as the 2-D batch ``(N·…, C)``). Its primitives (reduce, apply, backward) are the composite backend's; its fused
sequences call ``torch.native_batch_norm`` on the CPU and ``torch.batch_norm`` elsewhere (which
picks cuDNN / MIOpen), so the backward is ATen's too, and double backward works through ATen's own
derivative formulas.

How it keeps every promise of docs/semantics.md:

* biased variance normalizes, unbiased is stored, ``momentum`` is torch's weight of the new value;
  ``momentum=None`` (cumulative average) passes ``1 / (num_batches_tracked + 1)``;
* **a non-finite batch never updates the running estimates**: ATen updates the buffers in place, so a
  copy of the ``(C,)`` buffers is taken first; on the CPU the saved batch mean and ``1/σ`` of
  ``native_batch_norm`` are checked (a NaN/Inf mean, or ``1/σ`` that is NaN or 0 — the variance of
  huge finite inputs overflowing — counts as non-finite); a bad batch restores the copy, leaves
  ``num_batches_tracked`` alone and reports ``finite=False`` so the caller warns. Off the CPU (the
  *GPU route*: :func:`batchnorm.kernels.dispatch.device_type` is not ``"cpu"``) nothing is read back by
  the host (:func:`_device_update`): with triton, ATen (cuDNN) runs without running buffers and one triton
  launch checks its batch mean and ``1/σ``, selects the running update and advances ``num_batches_tracked``
  by the flag (a step costs torch's own launches); without triton (:func:`_aten_guard`) ATen updates copies of
  the buffers, the buffers take them by ``torch.where`` on a 0-d flag (a finite updated running variance: a
  NaN/Inf batch mean or variance makes it NaN/Inf), and ``num_batches_tracked`` advances by that flag. Either
  way the flag is returned as a 0-d bool *device tensor*. ``num_batches_tracked`` counts only finite batches;
* float16/bfloat16 inputs: ATen's mixed-precision kernel reduces in float32, returns the input's dtype
  and keeps float32 parameters and buffers;
* the fused activation is applied as a second (differentiable) op; outputs are ordinary autograd
  outputs, so in-place consumers (``ReLU(inplace=True)``, ``+=``) work;
* meta tensors: ATen's meta kernels give shapes, no value is read (no finiteness check, as torch);
  a meta layer given a CPU input raises ATen's device-mismatch ``RuntimeError``.

Shape: ``x`` ``(N, C, *)`` with ``axis=1`` (contiguous or channels-last) or contiguous ``(N, *, C)`` with
``axis=-1``; parameters and
buffers ``(C,)``; output like ``x`` (same dtype and memory format).

Example::

    >>> import torch
    >>> from batchnorm.kernels.native import NATIVE
    >>> from batchnorm.kernels.backend import Settings
    >>> rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    >>> y, _, _, finite = NATIVE.train_forward(torch.randn(8, 3), Settings(axis=1), None, None, None,
    ...                                        (rm, rv, nbt, 0.1))
    >>> finite, int(nbt)
    (True, 1)

Reference: ``torch.nn.functional.batch_norm`` / ``aten::native_batch_norm``; Ioffe & Szegedy (2015).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import activations as _activations
from .backend import Settings
from .composite import CompositeBackend

_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)
_all = np.logical_and.reduce  # C-level reductions (ndarray.all goes through a Python wrapper)
_isfinite = np.isfinite
_dot = np.dot
_finite = math.isfinite  # (numpy scalar arithmetic would warn on inf − inf)
_nbn = torch.native_batch_norm


def _stats_finite(mean: torch.Tensor, invstd: torch.Tensor) -> bool:
    """The batch's statistics are usable: finite mean, ``1/σ`` neither NaN nor 0 (0: the variance overflowed)."""
    if mean.dtype not in _NUMPY_DTYPES:
        mean, invstd = mean.float(), invstd.float()
    return bool(_all(_isfinite(mean.detach().numpy())) and _all(invstd.detach().numpy() > 0))



def _device_type(x: torch.Tensor) -> str:
    """:func:`batchnorm.kernels.dispatch.device_type`, looked up at call time (the one device check; tests patch it)."""
    from . import dispatch  # (dispatch imports this module)

    return dispatch.device_type(x)


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: every value of ``t`` is finite. ``t · 0 == 0`` holds exactly for finite values (NaN and ±Inf
    give NaN): three kernels, where ``torch.isfinite(t).all()`` takes five (ATen composes isfinite from four)."""
    return torch.mul(t, 0).eq(0).all()


_GUARD_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_importable: list = []


def _triton_guard(rm: torch.Tensor, rv: torch.Tensor):
    """The triton backend when its one-launch guard (:meth:`~batchnorm.kernels.triton.TritonBackend.update_from_invstd`)
    can update these buffers — triton installed, buffers on a CUDA device (CPU ones under ``TRITON_INTERPRET=1``),
    contiguous, of one float dtype — else None: the ATen guard (:func:`_aten_guard`) serves."""
    from .triton import backend as tb

    if not _importable:
        _importable.append(tb.importable())
    if not _importable[0] or rm.dtype not in _GUARD_DTYPES or rv.dtype != rm.dtype:
        return None
    if rm.device.type != ("cpu" if tb.interpreting() else "cuda") or rv.device != rm.device:
        return None
    if not (rm.is_contiguous() and rv.is_contiguous()) or rm.requires_grad or rv.requires_grad:
        return None
    return tb.TRITON


def _device_update(xv, weight, bias, rm, rv, nbt, momentum, eps):
    """ATen's training call with the non-finite guard kept on the device: ``(y, finite)``, ``finite`` a 0-d bool tensor.

    No value is read by the host (the GPU route: no sync, CUDA-graph capturable). With triton (:func:`_triton_guard`):
    ATen's call *without* running buffers (``_batch_norm_impl_index``: cuDNN / MIOpen / ATen's kernel, exactly what
    ``torch.batch_norm`` picks) returns the batch mean and ``1/σ`` it normalized with, and one triton launch does the
    rest: the finite flag, the selected running update (``σ²_B = 1/invstd² − eps``, unbiased by ``n/(n − 1)``; the
    cumulative weight for ``momentum=None``) and ``num_batches_tracked += finite`` — in place of torch's own
    ``num_batches_tracked += 1``, so a step launches as many kernels as ``torch.nn.BatchNorm2d``'s. Without triton:
    :func:`_aten_guard`.
    """
    tr = _triton_guard(rm, rv)
    if tr is None:
        return _aten_guard(xv, weight, bias, rm, rv, nbt, momentum, eps)
    y, mean, invstd = torch._batch_norm_impl_index(xv, weight, bias, None, None, True, 0.0, eps,
                                                   torch.backends.cudnn.enabled)[:3]
    n = xv.numel() // xv.shape[1]
    return y, tr.update_from_invstd(rm, rv, nbt, mean.detach(), invstd.detach(), n, momentum, eps)


def _aten_guard(xv, weight, bias, rm, rv, nbt, momentum, eps):
    """The device-side guard with ATen ops only (no triton): ``(y, finite)``, ``finite`` a 0-d bool tensor.

    No value is read by the host (the GPU route: no sync, CUDA-graph capturable). ATen updates *copies* of the running
    buffers (its backward may save the buffers it was given, so they must not change after the call); the buffers then
    take the copies by ``torch.where`` on one flag, "the new running variance is finite" (:func:`finite_flag`), and
    ``num_batches_tracked`` advances by it. ``momentum=None`` (cumulative average): ATen writes the batch's own mean and unbiased variance
    (momentum 1 into zeroed scratch) and the weight ``1 / num_batches_tracked`` is applied on the device. Cost beyond
    torch's call: six small ``(C,)`` kernels (one multi-tensor copy, three for the flag, two selects).

    Shape: ``xv`` ``(N, C, *)``; ``rm, rv`` ``(C,)``; ``nbt`` 0-d or None. Reference: docs/semantics.md.
    """
    if momentum is not None:
        new_m, new_v = torch._foreach_mul((rm, rv), 1.0)  # one multi-tensor launch on CUDA (exact copies)
        y = torch.batch_norm(xv, weight, bias, new_m, new_v, True, momentum, eps, True)
        finite = finite_flag(new_v)
        if nbt is not None:
            nbt.add_(finite)
    else:
        scratch = torch.zeros((2,) + tuple(rm.shape), dtype=rm.dtype, device=rm.device)
        y = torch.batch_norm(xv, weight, bias, scratch[0], scratch[1], True, 1.0, eps, True)
        finite = finite_flag(scratch)
        nbt.add_(finite)  # momentum=None always has num_batches_tracked (checked by the layer / batch_norm)
        f = nbt.clamp_min(1).reciprocal().to(rm.dtype)
        new_m, new_v = torch.lerp(rm, scratch[0], f), torch.lerp(rv, scratch[1], f)
    torch.where(finite, new_m, rm, out=rm)
    torch.where(finite, new_v, rv, out=rv)
    return y, finite


def _factor(momentum: float | None, nbt: torch.Tensor) -> float:
    """ATen's running-update weight: ``momentum``, or ``1 / (batches so far + 1)`` (cumulative average, None).

    ``num_batches_tracked`` is counted after ATen's call (only for finite batches), hence the ``+ 1``.
    """
    return momentum if momentum is not None else 1.0 / (int(nbt) + 1)


def _keep_if_finite(finite: bool, rm, rv, nbt, old_m, old_v) -> bool:
    """Count a finite batch in ``num_batches_tracked``; otherwise put the running buffers back (snapshot)."""
    if finite:
        if nbt is not None:
            nbt.add_(1)
    else:
        rm.copy_(old_m)
        rv.copy_(old_v)
    return finite

class Guard:
    """The non-finite guard of a CPU training call: ``native_batch_norm`` updates the running buffers in place, so
    their values are copied first and put back when the batch's statistics are not finite.

    Built once per pair of ``(C,)`` contiguous float32/float64/float16 CPU buffers (a layer's plan keeps it): NumPy
    views and memoryviews of their storage and a snapshot array. Per call (:meth:`update`): two memoryview copies (a
    ``memcpy`` each), ATen's call, one check, ``num_batches_tracked += 1``. The check: ATen's update
    ``running ← (1 − f)·running + f·new`` (``f > 0``) makes the new running variance NaN or ±Inf whenever the batch
    variance is NaN or infinite, and ATen computes the variance from deviations to the mean, so a NaN/Inf mean makes
    it NaN/Inf too: a finite ``Σ running_var`` (Python's ``sum`` over a memoryview for C ≤ 64, a NumPy dot product
    above) proves the batch good. Otherwise (or ``f = 0``) the saved statistics decide exactly
    (:func:`_stats_finite`: finite mean, ``1/σ`` neither NaN nor 0), so old non-finite buffers or a sum that merely
    overflows never refuse a good batch.

    Shape: ``rm, rv`` ``(C,)``; ``xv`` ``(N, C, *)``. Example: ``Guard(rm, rv).update(x, None, None, rm, rv, nbt, 0.1,
    1e-5)`` returns ``(y, finite)``. Reference: docs/semantics.md ("a non-finite batch never updates the
    running estimates").
    """

    __slots__ = ("ptrs", "rm", "rv", "old_m", "old_v", "rv_np", "small")

    def __init__(self, rm: torch.Tensor, rv: torch.Tensor):
        rm_np, rv_np = rm.numpy(), rv.numpy()
        self.ptrs = (rm.data_ptr(), rv.data_ptr())
        snap = np.empty((2, rm_np.shape[0]), rm_np.dtype)
        self.rm, self.rv, self.old_m, self.old_v = map(memoryview, (rm_np, rv_np, snap[0], snap[1]))
        self.rv_np = rv_np
        self.small = rv_np.shape[0] <= 64 and rv_np.dtype != np.float16

    @staticmethod
    def fits(rm: torch.Tensor, rv: torch.Tensor) -> bool:
        """True for buffers a guard can view: contiguous CPU tensors of one NumPy-supported dtype."""
        return (rm.device.type == "cpu" and rm.dtype in _NUMPY_DTYPES and rv.dtype == rm.dtype
                and rm.is_contiguous() and rv.is_contiguous() and rm.requires_grad is rv.requires_grad is False)

    def update(self, xv, weight, bias, rm, rv, nbt, f: float, eps: float):
        """``native_batch_norm`` with the running update, undone when the batch is not finite: ``(y, finite)``."""
        self.old_m[:] = self.rm
        self.old_v[:] = self.rv
        y, mean, invstd = _nbn(xv, weight, bias, rm, rv, True, f, eps)
        total = sum(self.rv) if self.small else _dot(self.rv_np, self.rv_np)
        if (f > 0 and _finite(total)) or _stats_finite(mean, invstd):
            if nbt is not None:
                nbt.add_(1)
            return y, True
        self.rm[:] = self.old_m
        self.rv[:] = self.old_v
        return y, False


_CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def viewable(x: torch.Tensor, axis: int) -> bool:
    """True when C at ``axis`` can be torch's channel axis, in a layout ATen handles correctly.

    ``axis=1`` on a contiguous tensor, or on a channels-last (3-D: ``channels_last_3d``) one whose spatial
    sizes are all > 1; or the last axis of a contiguous tensor (viewed as ``(N·…, C)``). Other layouts go
    elsewhere: torch 2.13's CPU BatchNorm2d returns a wrong input gradient for a channels-last input with
    W = 1 and a contiguous gradient (``tests/test_fused.py::test_gradient_exact_for_ambiguous_channels_last_layout``).
    """
    if x.is_contiguous():
        return axis == 1 or axis == x.dim() - 1
    fmt = _CL.get(x.dim())
    return axis == 1 and fmt is not None and 1 not in x.shape[2:] and x.is_contiguous(memory_format=fmt)


def params_ok(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """ATen's dtype rule: parameters/buffers share one dtype, the input's or (half inputs) float32."""
    dt = None
    for t in tensors:
        if t is None:
            continue
        if dt is None:
            dt = t.dtype
        elif t.dtype != dt:
            return False
    return dt is None or dt == x.dtype or (dt == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))


def _act(y: torch.Tensor, s: Settings) -> torch.Tensor:
    if s.activation is None or s.activation == "identity":
        return y
    return _activations.TABLE[s.activation].forward(y, s.negative_slope)


class NativeBackend(CompositeBackend):
    """Plain batch norm through ATen (``native_batch_norm`` on CPU, ``batch_norm`` → cuDNN/MIOpen elsewhere)."""

    name = "native"
    differentiable = True

    def train_forward(self, x, s: Settings, m, weight, bias, running=None):
        """``(y, None, None, finite)``; ``y`` carries ATen's autograd graph; ``finite`` is None without ``running``."""
        shape, axis = x.shape, s.axis
        xv = x if axis == 1 else x.view(-1, shape[axis])
        finite = None
        dt = _device_type(x)
        if running is None:
            if dt == "cpu":
                y = torch.native_batch_norm(xv, weight, bias, None, None, True, 0.0, s.eps)[0]
            else:
                y = torch.batch_norm(xv, weight, bias, None, None, True, 0.0, s.eps, True)
        else:
            rm, rv, nbt, momentum = running
            if dt == "cpu" and rm.device == x.device and not torch.compiler.is_compiling():
                f = _factor(momentum, nbt)
                if Guard.fits(rm, rv):  # the snapshot: memoryview copies cost less than torch's clone
                    y, finite = Guard(rm, rv).update(xv, weight, bias, rm, rv, nbt, f, s.eps)
                else:  # bfloat16 or strided buffers: torch copies
                    old_m, old_v = rm.clone(), rv.clone()
                    y, mean, invstd = _nbn(xv, weight, bias, rm, rv, True, f, s.eps)
                    finite = _keep_if_finite(_stats_finite(mean, invstd), rm, rv, nbt, old_m, old_v)
            elif dt == "meta" or rm.device != x.device or torch.compiler.is_compiling():
                # shapes only (meta), ATen's own device-mismatch error, or a traced graph: nothing to check
                f = 0.0 if momentum is None else momentum
                y = torch.batch_norm(xv, weight, bias, rm, rv, True, f, s.eps, True)
                if nbt is not None and rm.device == x.device:
                    nbt.add_(1)
                finite = True
            else:  # CUDA, MPS, ...: torch.batch_norm picks cuDNN / MIOpen; the guard stays on the device
                y, finite = _device_update(xv, weight, bias, rm, rv, nbt, momentum, s.eps)
        if axis != 1:
            y = y.view(shape)
        return _act(y, s), None, None, finite

    def eval_forward(self, x, s: Settings, weight, bias, running_mean, running_var):
        """``act(γ·(x − μ)/sqrt(σ² + eps) + β)`` with the running statistics, through ATen (differentiable)."""
        shape, axis = x.shape, s.axis
        xv = x if axis == 1 else x.view(-1, shape[axis])
        if _device_type(x) == "cpu":
            y = torch.native_batch_norm(xv, weight, bias, running_mean, running_var, False, 0.0, s.eps)[0]
        else:
            y = torch.batch_norm(xv, weight, bias, running_mean, running_var, False, 0.0, s.eps, True)
        if axis != 1:
            y = y.view(shape)
        return _act(y, s)

    def plan(self, key, x, s: Settings, mode: str, momentum, rm, rv):
        """A :class:`Plan` of this CPU call when one can serve it (NumPy-viewable buffers), else None."""
        if _device_type(x) != "cpu" or not Plan.servable(x, mode, rm, rv):
            return None
        return Plan(key, tuple(x.shape), mode, s, momentum, rm, rv)

    def train_backward(self, dy, t, s, stats, invstd, weight, bias, count, m, needs):  # pragma: no cover
        raise RuntimeError("the native backend's outputs carry ATen's autograd graph; _TrainNorm never drives it")


NATIVE = NativeBackend()


class Plan:
    """A layer's native CPU call for one input signature, prepared once: the layer's fast path (``BatchNorm.forward``).

    The layer keeps one plan per ``(input shape, training)`` and runs it while everything the slow path would
    read to decide is unchanged (:attr:`key`, built by the layer: input shape/strides/dtype, the layer's settings,
    parameter and buffer objects, :func:`batchnorm.kernels.dispatch.decision_state`). A plan does exactly what
    :meth:`NativeBackend.train_forward` / :meth:`~NativeBackend.eval_forward` do for that call, minus the checks
    and decisions already taken: ``mode`` is ``"update"`` (batch statistics, running update under a
    :class:`Guard` made once), ``"batch"`` (batch statistics, no update) or ``"eval"`` (running statistics).

    Shape: ``x`` as at plan time; ``view`` is ``(-1, C)`` for a last feature axis (``(N, …, C)`` seen as 2-D) or None.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.BatchNorm(4)
        >>> _ = bn(torch.randn(8, 4)); _ = bn(torch.randn(8, 4))   # the first call prepares, the second runs it
        >>> next(iter(bn.__dict__["_fast"].values())).mode
        'update'

    Reference: ``torch.nn.modules.batchnorm._BatchNorm.forward`` (what it does per call is all a plan does).
    """

    __slots__ = ("key", "tensors", "shape", "view", "mode", "eps", "momentum", "settings", "act", "guard")

    def __init__(self, key, shape, mode: str, s: Settings, momentum, rm, rv):
        self.key, self.shape, self.mode, self.settings = key, shape, mode, s
        self.eps, self.momentum = s.eps, momentum
        self.view = None if s.axis == 1 else (-1, shape[s.axis])
        self.act = s.activation not in (None, "identity")
        self.tensors = (None,) * 5  # the layer's (weight, bias, running_mean, running_var, num_batches_tracked)
        self.guard = Guard(rm, rv) if mode == "update" else None


    @staticmethod
    def servable(x: torch.Tensor, mode: str, rm, rv) -> bool:
        """True when a plan can serve this (already natively dispatched, CPU) call: NumPy-viewable CPU buffers."""
        if x.numel() == 0:
            return False
        if mode != "update":
            return True
        return Guard.fits(rm, rv)

    def run(self, x, weight, bias, rm, rv, nbt):
        """``(y, finite)``: the call, on ``x`` and the layer's current tensors (``finite`` True unless refused)."""
        xv = x if self.view is None else x.view(self.view)
        mode, finite = self.mode, True
        if mode == "update":
            guard = self.guard
            if (rm.data_ptr(), rv.data_ptr()) != guard.ptrs:  # storage swapped in place (swap_tensors)
                guard = self.guard = Guard(rm, rv)
            f = _factor(self.momentum, nbt)
            y, finite = guard.update(xv, weight, bias, rm, rv, nbt, f, self.eps)
        elif mode == "eval":
            y = _nbn(xv, weight, bias, rm, rv, False, 0.0, self.eps)[0]
        else:
            y = _nbn(xv, weight, bias, None, None, True, 0.0, self.eps)[0]
        if self.view is not None:
            y = y.view(self.shape)
        if self.act:
            y = _act(y, self.settings)
        return y, finite
