"""Choose the kernel path for a tensor: the one small function every caller goes through."""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import torch_ops

BACKENDS = ("auto", "torch")


def available() -> list[str]:
    """The kernel paths that can run here (tests run every one of them)."""
    return ["torch"]


def select(x: torch.Tensor, backend: str | None = None) -> ModuleType:
    """Return the module implementing reduce/apply for ``x``.

    ``backend`` (or the ``BATCHNORM_BACKEND`` environment variable) forces a path; ``"auto"``
    picks the fastest path that supports ``x``.
    """
    choice = backend or os.environ.get("BATCHNORM_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}.")
    return torch_ops
