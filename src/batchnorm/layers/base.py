"""The layer: parameters and running estimates, choosing which statistics normalize.

Every variant (renorm, ghost, sync, ...) subclasses :class:`BatchNorm` and overrides one hook:
:meth:`BatchNorm._combine` (how batch statistics become the normalizing ones) or
:meth:`BatchNorm._group_size` (ghost batches). The math lives in :mod:`batchnorm.functional`.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _checks
from .. import functional as bnf
from ..kernels import dispatch
from . import _export


class BatchNorm(_BatchNorm):
    r"""Batch normalization over any rank and feature axis; a drop-in for ``torch.nn.BatchNorm1d/2d/3d``.

    Training: per feature ``c``, over every position ``i`` of every axis except ``axis`` (only where
    ``mask`` is true)::

        μ_B = mean_i x_ic            σ²_B = mean_i (x_ic − μ_B)²          (biased)
        y   = γ_c · (x − μ_B) / sqrt(σ²_B + eps) + β_c                   (every position)
        running_mean ← (1 − momentum) · running_mean + momentum · μ_B
        running_var  ← (1 − momentum) · running_var  + momentum · σ²_B · n / (n − 1)   (unbiased)

    ``momentum`` is the weight of the *new* batch (PyTorch's convention; Keras' 0.99 is 0.01 here);
    ``momentum=None`` uses ``1 / num_batches_tracked``, a cumulative average. Evaluation normalizes
    with the running estimates, unless ``track_running_stats=False``, in which case there are no
    running estimates and batch statistics are used in both modes. (As in PyTorch, it is the absence
    of the buffers that selects batch statistics in eval: setting ``layer.track_running_stats = False``
    on a built layer only stops the updates, and eval keeps using the stored estimates.)

    A training batch whose statistics are not finite leaves the running estimates and
    ``num_batches_tracked`` unchanged (with a warning); its output is still computed. On the CPU the
    ``RuntimeWarning`` comes at once. On a GPU (any device but the CPU) no step reads device data back
    (no host sync: CUDA graphs and ``torch.cuda.set_sync_debug_mode("error")`` work), so the refusal is
    *selected* on the device and the layer keeps the flags; one warning for all batches refused since the
    last report comes at the next point that reads them: :attr:`refused_batches`, ``train()`` / ``eval()``,
    ``state_dict()``, ``repr()``.

    Args:
        num_features: C, the size of the feature axis.
        eps: added to the variance for numerical stability.
        momentum: new-value weight of the running averages, or None for a cumulative average.
        affine: learn ``γ`` (``weight``, init 1) and ``β`` (``bias``, init 0).
        bias: with ``affine=True``, False drops ``β`` (keyword-only, as in ``torch.nn.BatchNorm*d``).
        track_running_stats: keep ``running_mean``, ``running_var``, ``num_batches_tracked``.
        axis: the feature axis: 1 for ``(N, C, *)``, -1 for ``(N, *, C)``.
        activation: None, ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"`` (erf form),
            ``"sigmoid"`` or ``"tanh"``, fused into the apply pass forward and backward:
            ``BatchNorm(C, activation="relu")`` equals ``BatchNorm(C)`` followed by ``torch.relu``.
        negative_slope: slope of ``leaky_relu`` for negative inputs.
        memory: ``"default"`` keeps the input for backward; ``"save"`` (In-Place ABN, Rota Bulò et al.
            2018; training with activation None/"identity"/"leaky_relu" only) keeps only the output and
            recovers ``x̂ = (act⁻¹(y) − β) / γ``; a ``γ`` with ``|γ| < eps`` is used as ``±eps`` in that mode.
        backend: kernel path, ``"auto"`` (default: numba on CPU for large float32/float64 tensors),
            ``"torch"`` or ``"numba"``; None reads ``BATCHNORM_BACKEND``. See docs/kernels.md.

    Shape:
        Input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)`` ... (any rank ≥ 2),
        or the same with C last and ``axis=-1``; any memory format. ``mask``: the input's shape
        without the feature axis (e.g. ``(N, L)`` for padded sequences), or broadcastable to it.
        Output: same shape, dtype and memory format as the input.

    Example::

        >>> bn = BatchNorm(64)                       # like torch.nn.BatchNorm2d(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))
        >>> seq = BatchNorm(16, axis=-1)             # (N, L, C) sequences with padding
        >>> x, lengths = torch.randn(4, 10, 16), torch.tensor([10, 7, 3, 9])
        >>> y = seq(x, mask=torch.arange(10) < lengths[:, None])

    Recognized as batch norm by the PyTorch ecosystem: an instance of
    ``torch.nn.modules.batchnorm._BatchNorm`` (so ``swa_utils.update_bn``, weight-decay filters and
    BN-freeze loops find it); traceable with ``torch.fx`` (a leaf call), ``torch.jit.trace`` and
    exportable (``torch.export``, ``torch.onnx.export``), where it lowers to ATen's batch norm.
    See docs/ecosystem.md.

    Reference: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", ICML 2015.
    """

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine", "axis"]

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    axis: int

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        device: Any = None,
        dtype: Any = None,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        memory: str = "default",
        backend: str | None = None,
    ) -> None:
        # nn.Module's init only: _NormBase.__init__ would build its own parameters and buffers; ours are below
        nn.Module.__init__(self)
        _checks.check_activation(activation, negative_slope, memory, type(self).__name__)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.memory = memory
        if backend is not None and backend not in dispatch.BACKENDS:
            raise ValueError(
                f"{type(self).__name__} expected backend to be None or one of {dispatch.BACKENDS}, got {backend!r}. "
                "Use backend='auto' (the cheapest backend per call), 'numba', 'native' or 'composite' ('torch' is an alias)."
            )
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.num_features = _checks.check_num_features(num_features, type(self).__name__)
        self.eps = _checks.check_eps(eps)
        self.momentum = _checks.check_momentum(momentum)
        self.axis = _checks.check_axis_type(axis)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.last_input_shape: tuple[int, ...] | None = None
        self.reset_parameters()
        _mark(self)  # what torch's SyncBatchNorm built on these tensors would drop (layers/interop.py)

    # -- state ---------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Reset running statistics and set ``γ = 1``, ``β = 0``."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        self._report_refused(stacklevel=4)  # warns only when GPU refusals are pending
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}, axis={self.axis}"
            + (f", activation={self.activation!r}" if self.activation is not None else "")
            + (f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else "")
            + (f", memory={self.memory!r}" if self.memory != "default" else "")
            + (f", backend={self.backend!r}" if self.backend is not None else "")
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # checkpoints older than version 2 have no num_batches_tracked: keep the layer's own
            # count (0 for a fresh layer), as torch.nn.BatchNorm*d does
            own = self.num_batches_tracked
            keep = own is not None and own.device.type != "meta"
            state_dict[key] = own if keep else torch.tensor(0, dtype=torch.long)
        for name in ("weight", "bias", "running_mean", "running_var"):
            k = prefix + name
            own = getattr(self, name)
            if prefix == "" and k in state_dict and own is not None and tuple(state_dict[k].shape) != tuple(own.shape):
                # loading this layer itself: a RuntimeError (as torch's size-mismatch error) and a ValueError, raised
                # before anything is copied. Inside a model (prefix set) torch's rule holds instead: every matching
                # tensor of every layer is copied and one RuntimeError lists all mismatches (nn.Module.load_state_dict)
                raise _checks.state_shape_error(
                    type(self).__name__, k, tuple(state_dict[k].shape), tuple(own.shape), self.num_features
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script``: refuse with one error naming what works instead (see docs/ecosystem.md)."""
        raise _export.script_error(self)

    # -- refused batches (non-finite statistics) ----------------------------------------------
    @property
    def refused_batches(self) -> int:
        """Training batches refused so far (statistics not finite: running estimates left unchanged), on any device.

        Reading it reports (one ``RuntimeWarning``) the GPU batches refused since the last report; this is a host
        read of a device count, so do it between steps, not inside one. On the CPU each refusal warned at its step.

        Example::

            >>> bn = BatchNorm(2)
            >>> bn.refused_batches
            0
        """
        return self._report_refused(stacklevel=3)

    def _record_refused(self, finite) -> None:
        """Called by :func:`batchnorm.functional.normalize` with a refused CPU batch (``False``, already warned)
        or with the 0-d device flag of a GPU step (True when accepted), which is kept, not read."""
        d = self.__dict__
        if finite is False:
            d["_refused_total"] = d.get("_refused_total", 0) + 1
            return
        flags = d.get("_refused_flags")
        if flags is None:
            flags = d["_refused_flags"] = []
        flags.append(finite)
        if len(flags) >= _FOLD:  # bounded memory: fold into one device count (a few launches per _FOLD steps)
            d["_refused_flags"] = []
            pending = _count_refused(flags)
            old = d.get("_refused_device")
            d["_refused_device"] = pending if old is None else old.to(pending.device) + pending

    def _report_refused(self, stacklevel: int = 2) -> int:
        """Read the device flags (a host sync), warn once for the batches they refused; the total so far."""
        d = self.__dict__
        flags, device_count = d.pop("_refused_flags", None), d.pop("_refused_device", None)
        if flags or device_count is not None:
            n = (int(_count_refused(flags)) if flags else 0) + (int(device_count) if device_count is not None else 0)
            if n:
                d["_refused_total"] = d.get("_refused_total", 0) + n
                warnings.warn(
                    f"{type(self).__name__}: {n} training batch(es) since the last report had statistics that are not "
                    "finite (NaN or Inf in the input, or values whose square overflows the statistics' dtype); the "
                    "running estimates and num_batches_tracked were left unchanged for them. (Off the CPU this is "
                    "reported when something reads it, not at the step: a per-step check would stall the device.)",
                    RuntimeWarning,
                    stacklevel=stacklevel + 1,
                )
        return d.get("_refused_total", 0)

    def train(self, mode: bool = True):
        """``nn.Module.train``; first reports GPU batches refused since the last report (see :attr:`refused_batches`)."""
        self._report_refused(stacklevel=3)  # warns only when GPU refusals are pending
        return super().train(mode)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._report_refused(stacklevel=5)  # warns only when GPU refusals are pending
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # -- hooks for variants (the *combine* step) ----------------------------------------------
    #: A variant's fused training step with running estimates, ``(x, mask, axis, settings) -> y``, or None (the
    #: common path); it returns None for calls it does not take. BatchRenorm and SyncBatchNorm set it (triton).
    _fused_training = None

    def _fused_route(self, x: torch.Tensor, mask, axis: int, s, sequence: str):
        """What every variant's :attr:`_fused_training` asks first: ``(ops, weight, bias, running_mean, running_var,
        num_batches_tracked, mask)`` when the backend :func:`~batchnorm.kernels.dispatch.select` picks for this
        training call has the fused ``sequence`` (e.g. ``"renorm_forward"``: triton, on the GPU route or forced),
        else None (the CPU without a forced triton, an empty or subclassed tensor, ``torch.compile`` / export /
        ``torch.func``)."""
        backend = self.__dict__.get("backend")
        if not dispatch.may_take_triton(x, backend):  # the CPU without a forced "triton": nothing more to ask
            return None
        if x.numel() == 0 or x.__class__ is not torch.Tensor:
            return None
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or bnf._functorch_active():
            return None
        params, bufs = self._parameters, self._buffers
        w, b = params.get("weight"), params.get("bias")
        rm, rv, nbt = bufs.get("running_mean"), bufs.get("running_var"), bufs.get("num_batches_tracked")
        m = _checks.mask_for(x, axis, mask) if mask is not None else None
        ops = dispatch.select(x, s, plain=False, masked=m is not None, training=True, backend=backend,
                              params=(w, b, rm, rv))
        if getattr(ops, sequence, None) is None:
            return None
        return ops, w, b, rm, rv, nbt, m

    def _report_fused(self, x: torch.Tensor, m, finite, stacklevel: int) -> None:
        """A fused step's refusal flag: warned at once on CPU tensors (reading it is free), else kept on the device
        and reported later (:attr:`refused_batches`). ``stacklevel`` as :func:`batchnorm.functional._warn_not_finite`'s."""
        if dispatch.device_type(x) == "cpu":
            if not bool(finite):
                bnf._warn_not_finite(type(self).__name__, x, m, stacklevel=stacklevel)
                self._record_refused(False)
        else:
            self._record_refused(finite)

    def _combine(self) -> bnf.Combine:
        """How batch statistics become the normalizing ones (identity here: the shared stateless instance)."""
        return bnf._PLAIN

    def _group_size(self, x: torch.Tensor) -> int | None:
        """Rows of axis 0 per ghost batch, or None for one batch."""
        return None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        """Rank restrictions of subclasses (BatchNorm1d/2d/3d); any rank ≥ 2 here."""

    # -- forward -------------------------------------------------------------------------------
    def _validated(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        d = self.__dict__
        # the checks run once per (input type, shape, dtype, eps, momentum, axis): eps and momentum are plain
        # attributes that users do reassign (m.momentum = 0.01), so they are part of the key
        key = (x.__class__, x.shape, x.dtype, self.eps, self.momentum, self.axis) if isinstance(x, torch.Tensor) else None
        hit = d.get("_checked_input")
        if hit is not None and hit[0] == key:
            d["last_input_shape"] = hit[2]
            return x, hit[1]
        name = type(self).__name__
        x = _checks.check_input(x, name)
        _checks.check_eps(self.eps)
        _checks.check_momentum(self.momentum)
        self._check_input_dim(x)
        axis = _checks.normalize_axis(self.axis, x.dim(), x.shape)
        _checks.check_features(x, axis, self.num_features, name)
        shape = tuple(x.shape)
        d["last_input_shape"] = shape  # plain attribute: skip nn.Module.__setattr__'s checks
        d["_checked_input"] = (key, axis, shape)
        return x, axis

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``x``; ``mask`` selects the positions that count toward the statistics."""
        d = self.__dict__
        # fast path: a plain call whose checks and backend choice were made before (see _prepare_fast)
        if mask is None and not _compiling() and x.__class__ is _Tensor and x.is_cpu:
            plans = d.get("_fast")
            if plans is not None and _tracing_state() is None and not _exporting() and _functorch_level() is None:
                shape = x.shape
                plan = plans.get((shape, d["training"]))
                if plan is not None:
                    params, bufs = self._parameters, self._buffers
                    w, b = params.get("weight"), params.get("bias")
                    rm, rv, nbt = bufs.get("running_mean"), bufs.get("running_var"), bufs.get("num_batches_tracked")
                    pw, pb, prm, prv, pnbt = plan.tensors
                    if (w is pw and b is pb and rm is prm and rv is prv and nbt is pnbt and plan.key == (
                            shape, x.stride(), x.dtype, _config(d), dispatch.decision_state())):
                        d["last_input_shape"] = plan.shape
                        y, finite = plan.run(x, w, b, rm, rv, nbt)
                        if not finite:
                            bnf._warn_not_finite(type(self).__name__, x, None, stacklevel=5)
                            self._record_refused(False)
                        return y
        active = _export.active(x)
        if active and (traced := _export.forward(self, x, mask)) is not None:  # fx/jit/export: see _export
            return traced
        x, axis = self._validated(x)
        # parameters and buffers read from their dicts once (nn.Module.__getattr__ is slow on a hot path)
        params, bufs = self._parameters, self._buffers
        rm, rv = bufs.get("running_mean"), bufs.get("running_var")
        training = self.training
        update = training and self.track_running_stats and rm is not None
        group = self._group_size(x) if training else None
        # the checked settings record is cached per layer; attributes users may reassign are its key
        key = (axis, self.eps, group, d.get("activation"), d.get("negative_slope", 0.01), d.get("memory", "default"))
        hit = d.get("_settings")
        if hit is None or hit[0] != key:
            hit = d["_settings"] = (key, bnf.settings_for(*key, type(self).__name__))
        use_batch = training or rm is None or rv is None
        fused = self._fused_training  # a variant's own fused training step (BatchRenorm, SyncBatchNorm on triton), or None
        if fused is not None and update and rv is not None and not active:
            y = fused(x, mask, axis, hit[1])
            if y is not None:
                return y
        y = bnf.normalize(
            x,
            params.get("weight"),
            params.get("bias"),
            axis=axis,
            eps=self.eps,
            # as torch.nn.BatchNorm*d: eval uses batch statistics only when there are no running buffers;
            # flipping ``track_running_stats`` to False on a built layer stops the updates, nothing more
            use_batch_stats=use_batch,
            running_mean=rm,
            running_var=rv,
            update=update,
            momentum=self.momentum,
            num_batches_tracked=bufs.get("num_batches_tracked") if update else None,
            mask=mask,
            # the combine only where batch statistics normalize (BatchRenorm's limits are not computed in eval)
            combine=self._combine() if use_batch else bnf._PLAIN,
            name=type(self).__name__,
            backend=d.get("backend"),
            settings=hit[1],
            stacklevel=6,
            on_refused=self._record_refused,
        )
        if mask is None and not active and x.__class__ is _Tensor and _functorch_level() is None:
            self._prepare_fast(x, hit[1], use_batch, update and rv is not None)
        return y

    def _prepare_fast(self, x: torch.Tensor, s, use_batch: bool, updating: bool) -> None:
        """After a successful plain call: keep the chosen backend's plan (:meth:`Backend.plan
        <batchnorm.kernels.backend.Backend.plan>`) for the next same-shaped one; :func:`dispatch.select` decides once.

        The native backend builds its own (:class:`~batchnorm.kernels.native.Plan`, CPU calls); for the backends
        :class:`~batchnorm.functional._TrainNorm` drives (numba, composite, triton forced on CPU tensors) the layer
        keeps a :class:`~batchnorm.functional.RoutePlan`: the same call minus the checks and the choice. Only for CPU
        calls, on layers whose combine and grouping are :class:`BatchNorm`'s (not renorm, ghost or sync) and that
        carry every setting of :data:`_CONFIG`. The plan's key holds what the checks and :func:`~batchnorm.kernels.dispatch.select` read: input shape, strides and dtype,
        the settings, the parameter and buffer objects (compared by identity), and
        :func:`~batchnorm.kernels.dispatch.decision_state`; ``_apply`` (``.to()``, ``.double()``, ...) drops the plans.
        """
        cls, d = type(self), self.__dict__
        if cls._combine is not BatchNorm._combine or cls._group_size is not BatchNorm._group_size:
            return
        if any(k not in d for k in _CONFIG) or not x.is_cpu or dispatch.device_type(x) != "cpu":
            return
        params, bufs = self._parameters, self._buffers
        w, b = params.get("weight"), params.get("bias")
        rm, rv, nbt = bufs.get("running_mean"), bufs.get("running_var"), bufs.get("num_batches_tracked")
        backend = d.get("backend")
        if use_batch:
            ops = dispatch.select(x, s, training=True, backend=backend, params=(w, b, rm, rv) if updating else (w, b))
        else:
            ops = dispatch.select(x, s, training=False, backend=backend, params=(w, b, rm, rv))
        mode = "update" if updating else "batch" if use_batch else "eval"
        shape = x.shape
        key = (shape, x.stride(), x.dtype, _config(d), dispatch.decision_state())
        plan = ops.plan(key, x, s, mode, d["momentum"], rm, rv)  # the chosen backend's own route (native) ...
        if plan is None:  # ... or the generic one of the backends _TrainNorm drives (numba, triton, composite)
            plan = bnf.RoutePlan.build(key, x, s, mode, d["momentum"], ops)
        if plan is None:
            return
        plan.tensors = (w, b, rm, rv, nbt)
        plans = d.get("_fast")
        if plans is None or len(plans) >= 8:  # a few shapes per layer (e.g. the last, smaller batch of an epoch)
            plans = d["_fast"] = _Plans()
        plans[(shape, d["training"])] = plan

    def __setstate__(self, state):
        super().__setstate__(state)
        _mark(self)  # copy.deepcopy and pickle re-create parameters without their attributes

    def _apply(self, *args, **kwargs):
        """``nn.Module._apply`` (``.to()``, ``.double()``, ``.cuda()``, ...), dropping the fast-path plans first."""
        self.__dict__.pop("_fast", None)
        out = super()._apply(*args, **kwargs)
        _mark(self)  # moved buffers are new tensors: mark them as the old ones were
        return out


def _mark(layer: BatchNorm) -> None:
    from .interop import mark  # interop imports this module

    mark(layer)


#: GPU refusal flags kept per layer before they are folded into one device count.
_FOLD = 256


def _count_refused(flags: list) -> torch.Tensor:
    """The number of False among 0-d bool device tensors, as a 0-d device tensor (no host read)."""
    dev = flags[-1].device
    return torch.logical_not(torch.stack([f.to(dev) for f in flags])).sum()


class _Plans(dict):
    """A layer's fast-path plans by ``(input shape, training)``; copies and pickles of the layer start without them."""

    def __reduce__(self):
        return (_Plans, ())


#: The layer settings a fast-path plan is keyed on (plain attributes users may reassign).
_CONFIG = ("training", "eps", "momentum", "axis", "track_running_stats", "activation", "negative_slope", "memory",
           "backend")
_config = operator.itemgetter(*_CONFIG)
_Tensor = torch.Tensor
_compiling = torch.compiler.is_compiling
_exporting = torch.compiler.is_exporting
_tracing_state = torch._C._get_tracing_state
_functorch_level = getattr(torch._C._functorch, "maybe_current_level", lambda: None)


def _fixed_rank(ranks: tuple[int, ...], label: str):
    def check(self: BatchNorm, x: torch.Tensor) -> None:
        if x.dim() not in ranks:
            got = f"{x.dim()}D input of shape {tuple(x.shape)}"
            raise ValueError(f"{self._get_name()} expected {label} input, got {got}. Use batchnorm.BatchNorm for any rank.")

    return check


def _torch_like(cls, fused: type, args: tuple, kwargs: dict):
    """``cls`` when the layer computes what torch's class computes; else the same rank-checked layer as ``fused``.

    Why: ``BatchNorm1d/2d/3d`` are instances of ``torch.nn.BatchNorm1d/2d/3d``, and code written for torch's
    classes (timm's ``freeze_batch_norm_2d``, ``convert_sync_batchnorm``, ``torch.ao`` fusions) rebuilds them from
    torch's attributes; a fused activation or a feature axis other than 1 would be dropped silently there. Those
    layers are built as a class that is *not* torch's (docs/ecosystem.md, "Recognized as torch's classes").
    """
    act, axis = kwargs.get("activation"), kwargs.get("axis", 1)
    if act in (None, "identity") and (axis == 1 or isinstance(axis, bool) or not isinstance(axis, int)):
        return object.__new__(cls)
    layer = object.__new__(fused)
    layer.__init__(*args, **kwargs)
    return layer


class BatchNorm1d(BatchNorm, nn.BatchNorm1d):
    """:class:`BatchNorm` restricted to ``(N, C)`` or ``(N, C, L)`` input, like ``torch.nn.BatchNorm1d``.

    An instance of ``torch.nn.BatchNorm1d`` too (``isinstance`` checks written for torch's layer find it). Built
    with a fused ``activation`` or ``axis != 1`` it is the same layer without that base class (torch's class
    cannot express those; see docs/ecosystem.md).

    Shape: ``(N, C)`` or ``(N, C, L)`` → same. Example: ``BatchNorm1d(16)(torch.randn(4, 16, 30))``.
    Reference: Ioffe & Szegedy (2015).
    """

    _check_input_dim = _fixed_rank((2, 3), "2D or 3D")

    def __new__(cls, *args, **kwargs):
        return _torch_like(cls, _BatchNorm1dFused, args, kwargs)


class BatchNorm2d(BatchNorm, nn.BatchNorm2d):
    """:class:`BatchNorm` restricted to ``(N, C, H, W)`` input, like ``torch.nn.BatchNorm2d``.

    An instance of ``torch.nn.BatchNorm2d`` too (``isinstance`` checks written for torch's layer find it). Built
    with a fused ``activation`` or ``axis != 1`` it is the same layer without that base class (torch's class
    cannot express those; see docs/ecosystem.md).

    Shape: ``(N, C, H, W)`` → same. Example: ``BatchNorm2d(16)(torch.randn(4, 16, 8, 8))``.
    Reference: Ioffe & Szegedy (2015).
    """

    _check_input_dim = _fixed_rank((4,), "4D")

    def __new__(cls, *args, **kwargs):
        return _torch_like(cls, _BatchNorm2dFused, args, kwargs)


class BatchNorm3d(BatchNorm, nn.BatchNorm3d):
    """:class:`BatchNorm` restricted to ``(N, C, D, H, W)`` input, like ``torch.nn.BatchNorm3d``.

    An instance of ``torch.nn.BatchNorm3d`` too (``isinstance`` checks written for torch's layer find it). Built
    with a fused ``activation`` or ``axis != 1`` it is the same layer without that base class (torch's class
    cannot express those; see docs/ecosystem.md).

    Shape: ``(N, C, D, H, W)`` → same. Example: ``BatchNorm3d(4)(torch.randn(2, 4, 3, 8, 8))``.
    Reference: Ioffe & Szegedy (2015).
    """

    _check_input_dim = _fixed_rank((5,), "5D")

    def __new__(cls, *args, **kwargs):
        return _torch_like(cls, _BatchNorm3dFused, args, kwargs)


class _RankFused(BatchNorm):
    """A rank-checked layer with a fused activation or a feature axis other than 1: not torch's class."""

    _rank_name = "BatchNorm"

    def _get_name(self) -> str:
        return self._rank_name


class _BatchNorm1dFused(_RankFused):
    _rank_name = "BatchNorm1d"
    _check_input_dim = _fixed_rank((2, 3), "2D or 3D")


class _BatchNorm2dFused(_RankFused):
    _rank_name = "BatchNorm2d"
    _check_input_dim = _fixed_rank((4,), "4D")


class _BatchNorm3dFused(_RankFused):
    _rank_name = "BatchNorm3d"
    _check_input_dim = _fixed_rank((5,), "5D")


#: the rank classes of ours that are torch's classes too, and their twins that are not (fused activation, axis)
RANK_FUSED = {BatchNorm1d: _BatchNorm1dFused, BatchNorm2d: _BatchNorm2dFused, BatchNorm3d: _BatchNorm3dFused}
for _twin in RANK_FUSED.values():  # errors and reprs say "BatchNorm2d"; pickle finds the class by __qualname__
    _twin.__name__ = _twin._rank_name
