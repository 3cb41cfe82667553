"""Shared helpers of the diagnostics: which modules are BN-like, and leaving a model exactly as found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..layers.base import BatchNorm
from ..layers.frozen import FrozenBatchNorm
from ..tools.convert import after_modules, bn_features, bn_kind, is_frozen, unknown_error

__all__ = ["after_modules", "bn_features", "bn_kind", "bn_layers", "feature_axis", "is_bn_like", "is_frozen",
           "unknown_error"]


def is_bn_like(module: nn.Module) -> bool:
    """A batch norm of any kind the tools know (:func:`batchnorm.tools.bn_kind` is not None, the one rule every tool
    applies): ``torch.nn`` batch norms (incl. ``SyncBatchNorm``), ours (every variant), FrozenBatchNorm, timm's
    ``BatchNormAct2d``/``SyncBatchNormAct``/``FrozenBatchNormAct2d``, torchvision's ``FrozenBatchNorm2d``, and
    ``_BatchNorm`` subclasses that do more (kind ``"unknown"``)."""
    return bn_kind(module) is not None


def feature_axis(module: nn.Module) -> int:
    """The layer's feature axis as written on it (ours: ``.axis``; torch's: 1)."""
    return int(getattr(module, "axis", 1)) if isinstance(module, (BatchNorm, FrozenBatchNorm)) else 1


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every BN-like module, in registration order (the root is named ``"<root>"``)."""
    return [(name or "<root>", m) for name, m in model.named_modules() if is_bn_like(m)]


def check_model(model: Any, where: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} expected a torch.nn.Module model, got {type(model).__name__}. Pass the model itself.")
    return model


def check_batch(batch: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"{type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise TypeError(
            f"{where} expected batch=(x, y), a tuple of the model input and the target, got {got}. "
            "Pass batch=(x, y); the loss is loss_fn(model(x), y)."
        )
    return batch[0], batch[1]


def check_lr(lr: Any, where: str) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not float(lr) > 0 or float(lr) == float("inf"):
        raise ValueError(f"{where} expected lr to be a finite number > 0, got {lr!r}. Pass the learning rate of your SGD step.")
    return float(lr)


def call(model: nn.Module, x: Any) -> Any:
    """``model(x)``; a tuple/list is unpacked as positional arguments and a dict as keyword arguments."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def as_scalar_loss(loss: Any, where: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"{where} expected loss_fn(output, y) to return a scalar tensor, got {got}. Reduce it, e.g. with "
            "reduction='mean'."
        )
    return loss.reshape(())


class Snapshot:
    """Everything a forward/backward or a parameter edit can change, saved so it can be put back exactly.

    Parameters and buffers (values *and* the tensor objects, so references held elsewhere stay valid),
    ``.grad`` fields, every module's ``training`` flag and plain attributes (``last_input_shape`` and
    the like, via a shallow copy of ``__dict__``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = list(model.modules())
        self.dicts = [dict(m.__dict__) for m in self.modules]
        self.params: list[tuple[dict, str, nn.Parameter, torch.Tensor, Any, torch.Tensor | None]] = []
        self.buffers: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for m in self.modules:
                for name, p in m._parameters.items():
                    if p is not None:
                        g = p.grad
                        self.params.append((m._parameters, name, p, p.detach().clone(), g, None if g is None else g.detach().clone()))
                for name, b in m._buffers.items():
                    if b is not None:
                        self.buffers.append((m._buffers, name, b, b.detach().clone()))

    def restore_buffers(self) -> None:
        """Put every buffer back (values and objects); parameters are left as they are."""
        with torch.no_grad():
            for owner, name, b, saved in self.buffers:
                owner[name] = b
                b.copy_(saved)

    def restore(self) -> None:
        """Put the whole model back as it was when the snapshot was taken."""
        with torch.no_grad():
            for m, saved in zip(self.modules, self.dicts):
                for k in [k for k in m.__dict__ if k not in saved]:
                    del m.__dict__[k]
                m.__dict__.update(saved)
            for owner, name, p, value, grad, grad_value in self.params:
                owner[name] = p
                p.copy_(value)
                if grad is not None and grad_value is not None:
                    grad.copy_(grad_value)
                p.grad = grad
            self.restore_buffers()


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[Snapshot]:
    """Run a block, then put the model (and the global RNG, so dropout masks are not consumed) back."""
    snap = Snapshot(model)
    devices = cuda_devices(model)
    try:
        with torch.random.fork_rng(devices=devices):
            yield snap
    finally:
        snap.restore()


def rng_states(devices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = [torch.cuda.get_rng_state(d) for d in devices] if devices else []
    return torch.get_rng_state(), cuda


def set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor]], devices: list[int]) -> None:
    torch.set_rng_state(states[0])
    for d, s in zip(devices, states[1]):
        torch.cuda.set_rng_state(s, d)


def cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in list(model.parameters()) + list(model.buffers()) if t.device.type == "cuda"})
