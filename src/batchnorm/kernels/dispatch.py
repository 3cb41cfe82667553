"""Choose the kernel path for a tensor: the one small function every caller goes through.

Paths:

* ``"torch"`` — :mod:`batchnorm.kernels.torch_ops`: any device, dtype and memory format.
* ``"numba"`` — :mod:`batchnorm.kernels.ops` (numba kernels of :mod:`batchnorm.kernels.cpu` registered
  as ``torch.ops.batchnorm.*``): CPU, float32/float64, memory dense in some dimension order
  (contiguous, channels-last, any permutation of a contiguous tensor). Anything else still takes the
  torch path, even when ``"numba"`` is forced; so does a process forked after its parent ran
  numba's GNU-OpenMP kernels (not fork-safe: numba would abort the child).
* ``"auto"`` (default) — numba for every supported tensor of at least :data:`MIN_NUMEL` elements
  (0: all of them; the fused numba sequence costs less per call than the torch path's dozen small
  ops even for a ``(4, 8)`` batch), torch otherwise.

Force a path with the ``backend=`` argument of the layer/functions or the ``BATCHNORM_BACKEND``
environment variable (the argument wins).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import torch_ops

BACKENDS = ("auto", "torch", "numba")
#: Below this many elements "auto" uses the torch path (0: never; kept as a knob for other machines).
MIN_NUMEL = 0

try:  # numba is optional: without it every call takes the torch path
    from . import cpu as _cpu
    from . import ops as _ops
except ImportError:  # pragma: no cover - exercised only without numba
    _cpu = _ops = None  # type: ignore[assignment]

# GNU OpenMP (numba's "omp" threading layer) cannot be used in a child forked after the parent ran a
# parallel kernel: numba aborts the child. Such children (fork-based DataLoader workers,
# multiprocessing with the "fork" start method) silently take the torch path instead.
_numba_usable_here = True


def _after_fork_in_child() -> None:
    global _numba_usable_here
    if _cpu is not None and _cpu.fork_unsafe():
        _numba_usable_here = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def available() -> list[str]:
    """The kernel paths that can run here (tests run every one of them)."""
    return ["torch"] + (["numba"] if _ops is not None else [])


def select(x: torch.Tensor, backend: str | None = None) -> ModuleType:
    """Return the module implementing reduce/apply for ``x``.

    ``backend`` (or the ``BATCHNORM_BACKEND`` environment variable) forces a path; ``"auto"``
    picks the fastest path that supports ``x``.
    """
    choice = backend or os.environ.get("BATCHNORM_BACKEND") or "auto"
    if choice not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS}, got {choice!r}. Pass backend='auto' (default), 'torch' or 'numba' "
            "(argument or BATCHNORM_BACKEND environment variable)."
        )
    if choice == "torch":
        return torch_ops
    if _ops is None:
        if choice == "numba":
            raise ValueError(
                "backend='numba' was requested but numba is not installed. Install it with `pip install numba` "
                "(or `pip install batchnorm[fast]`), or use backend='auto' or 'torch'."
            )
        return torch_ops
    if not _numba_usable_here or not _cpu.supports(x) or (choice == "auto" and x.numel() < MIN_NUMEL):
        return torch_ops
    return _ops
