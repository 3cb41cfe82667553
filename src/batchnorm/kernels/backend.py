"""The backend protocol, declared once, and the settings record every call carries.

A *backend* computes batch norm's two elementwise-heavy steps, *reduce* and *apply*, forward and
backward; *combine* (plain, sync, renorm) is :class:`batchnorm.kernels.compose.Combine`'s. Three backends exist,
each in its own place:

* ``"numba"`` — :mod:`batchnorm.kernels.numba`: our CPU kernels (float32/float64, dense layouts).
* ``"composite"`` — :mod:`batchnorm.kernels.composite`: plain differentiable torch ops, any device,
  dtype and layout (``"torch"`` is an accepted alias).
* ``"native"`` — :mod:`batchnorm.kernels.native`: ATen's own batch norm (``torch.native_batch_norm``;
  ``torch.batch_norm`` off the CPU, i.e. cuDNN / MIOpen), plain batch norm only.

:func:`batchnorm.kernels.dispatch.select` picks one per call.

Protocol (:class:`Backend`): four primitives every backend implements —

* ``reduce(x, s, m) -> (count, mean, m2)``, each ``(G, C)`` in the statistics dtype;
* ``apply(x, s, scale, shift) -> y = act(x · scale + shift)``;
* ``backward_reduce(dy, t, s, p, q, zscale, zshift) -> (Σ dz, Σ dz · x̂)``;
* ``backward_apply(dy, t, s, p, q, k, mean_dz, mean_dzx, m, zscale, zshift) -> dx``;

and three *fused sequences* for plain batch norm, whose shared defaults here compose the primitives
(reduce → plain combine → apply, :mod:`batchnorm.kernels.compose`): ``train_forward``, ``train_backward``,
``eval_forward``, plus the running update ``update_running`` (default: the torch rule
:func:`batchnorm.kernels.compose.update_running`), and ``plan`` (a prepared per-signature call for a layer's
fast path; default none).
A backend overrides a sequence only to make it faster; the semantics stay those of the default.
Where a numba twin of a torch rule exists (the running update, the ``|γ| < eps`` clamp of
``memory="save"``, the eval constants), the tests compare the two (``tests/test_fused.py``).

A backend whose ``differentiable`` flag is set (native) returns outputs that carry their own autograd
graph from ``train_forward``/``eval_forward`` (ATen's derivative formulas, double backward included);
the others are driven by :class:`batchnorm.functional._TrainNorm`.

Shape: ``x`` has C features at ``s.axis``; per-feature quantities are ``(G, C)`` (G ghost groups).

Example::

    >>> from batchnorm.kernels.backend import Settings
    >>> s = Settings(axis=1, eps=1e-5, activation="relu")
    >>> s.replace(axis=2).axis
    2

Reference: the reduce → combine → apply split of this project (docs/kernels.md); the analytic
backward of Ioffe & Szegedy (2015).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import activations as _activations


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything about a call that is not a tensor: travels through Python as one hashable record.

    ``axis`` (≥ 0, already checked), ``eps``, ``group_size`` (rows per ghost batch or None),
    ``activation`` (a name of :data:`batchnorm.activations.TABLE` or None), ``negative_slope``, ``save``
    (``memory="save"``: backward keeps the output, not the input). Unpacked into primitives only at the
    ``torch.library`` custom-op boundary (:mod:`batchnorm.kernels.numba.ops`).
    """

    axis: int
    eps: float = 1e-5
    group_size: int | None = None
    activation: str | None = None
    negative_slope: float = 0.01
    save: bool = False

    @property
    def code(self) -> int:
        """The numba kernels' activation code."""
        return _activations.code_of(self.activation)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


@dataclass(slots=True)
class SavedState:
    """What :class:`batchnorm.functional._TrainNorm` keeps on ``ctx`` besides the saved tensors (a named record)."""

    settings: Settings
    backend: Backend
    combine: object
    plain: bool
    from_stats: bool  # the fused forward ran: saved tensors hold its (3, G, C) statistics
    counts: list | None = None  # memory="save" on CPU: counts per group as Python numbers


class Backend:
    """Base of the three backends: the primitives are abstract, the fused sequences compose them.

    Subclasses set :attr:`name` and implement :meth:`reduce`, :meth:`apply`, :meth:`backward_reduce`,
    :meth:`backward_apply`; they may override the sequences with faster versions of the same rule.
    """

    name: str = "?"
    #: True when train_forward/eval_forward outputs carry their own autograd graph (no _TrainNorm).
    differentiable: bool = False

    # -- primitives ------------------------------------------------------------------------
    def reduce(self, x: torch.Tensor, s: Settings, m: torch.Tensor | None):
        raise NotImplementedError

    def apply(self, x: torch.Tensor, s: Settings, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward_reduce(self, dy, t, s: Settings, p, q, zscale=None, zshift=None):
        raise NotImplementedError

    def backward_apply(self, dy, t, s: Settings, p, q, k, mean_dz, mean_dzx, m, zscale=None, zshift=None):
        raise NotImplementedError

    # -- fused sequences of plain batch norm (defaults compose the primitives) --------------
    def train_forward(self, x, s: Settings, m, weight, bias, running=None):
        """Plain BN's training forward: ``(y, stats, invstd, finite)``; ``stats`` is ``(3, G, C)`` (count, mean, biased var).

        ``running = (running_mean, running_var, num_batches_tracked, momentum)``: a backend may update
        the running estimates in the same pass and then returns ``finite`` (a bool); the default leaves
        them to the caller and returns ``finite=None``.
        """
        from .compose import compose_train_forward

        return compose_train_forward(self, x, s, m, weight, bias)

    def train_backward(self, dy, t, s: Settings, stats, invstd, weight, bias, count, m, needs):
        """Plain BN's backward ``(dx, dγ, dβ)`` (entries not in ``needs`` are None)."""
        from .compose import compose_train_backward

        return compose_train_backward(self, dy, t, s, stats, invstd, weight, bias, count, m, needs)

    def eval_forward(self, x, s: Settings, weight, bias, running_mean, running_var):
        """Eval-mode BN ``act(a·x + b)`` with the constants of :func:`batchnorm.kernels.compose.eval_scale_shift`."""
        from .compose import eval_scale_shift

        a, b = eval_scale_shift(weight, bias, running_mean.to(x.device), running_var.to(x.device), s.eps, x.dtype)
        return self.apply(x, s, a, b)

    def update_running(self, running_mean, running_var, mean, var, count, momentum, num_batches_tracked=None):
        """The running update rule (:func:`batchnorm.kernels.compose.update_running`); returns "finite"."""
        from .compose import update_running

        return update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)

    def plan(self, key, x, s: Settings, mode: str, momentum, rm, rv):
        """A prepared call for one input signature (the layer's per-signature fast path), or None (no fast path).

        ``mode`` is ``"update"`` (batch statistics and the running update), ``"batch"`` (batch statistics only) or
        ``"eval"`` (the running statistics); ``key`` is what the layer compares before each reuse. A plan has
        ``run(x, weight, bias, rm, rv, nbt) -> (y, finite)`` doing exactly what the slow path does for that call
        minus the checks and decisions already taken, plus ``key``, ``shape`` and ``tensors``. The layer asks
        the backend :func:`batchnorm.kernels.dispatch.select` chose, once per signature, so a plan is one route
        whatever the backend; this default builds none (the slow path serves every call).
        """
        return None

    def __repr__(self) -> str:
        return f"<batchnorm backend {self.name!r}>"
