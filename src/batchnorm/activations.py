"""The one table of activations that a batch-norm layer can fuse (``BatchNorm(C, activation=...)``).

Everything that needs to know about fused activations reads :data:`TABLE` (never a list of its own):
the argument checks (:mod:`batchnorm._checks`), the composite kernels (forward ``act`` and derivative),
the numba kernels (the integer ``code`` is the branch their elementwise helpers take), ``fold`` (which
turns a fused activation back into a torch module) and ``convert(fuse_activations=True)`` (which finds
torch modules that can be fused).

Each entry says:

* ``code`` — the integer the numba kernels switch on (fixed: changing one means changing the kernels);
* ``forward(z, slope)`` / ``derivative(z, slope)`` — torch functions (``d act / dz``; at a kink the
  left-hand value, as torch's own backward: ``relu'(0) = 0``, ``leaky_relu'(0) = slope``,
  ``relu6'(0) = relu6'(6) = 0``);
* ``invertible`` — ``z`` can be recovered from ``act(z)``, so ``memory="save"`` (In-Place ABN) may keep
  only the output (``leaky_relu`` only with ``negative_slope > 0``);
* ``modules`` — the ``torch.nn`` classes it equals, and :func:`to_module` / :func:`from_module` to go both
  ways (``nn.GELU`` only with ``approximate='none'``; ``nn.Hardtanh`` only as ``(0, 6)``).

Shape: elementwise; any shape.

Example::

    >>> import torch
    >>> from batchnorm.activations import TABLE, from_module, to_module
    >>> TABLE["relu6"].forward(torch.tensor([-1.0, 3.0, 9.0]), 0.0).tolist()
    [0.0, 3.0, 6.0]
    >>> from_module(torch.nn.LeakyReLU(0.2))
    ('leaky_relu', 0.2)
    >>> to_module("silu", 0.01)
    SiLU()

Sources: ``torch.nn`` activation definitions (ReLU, LeakyReLU, SiLU, GELU erf form, Sigmoid, Tanh,
ReLU6 = hardtanh(0, 6) as used by MobileNetV2, Sandler et al. 2018); In-Place ABN's invertibility
condition from Rota Bulò, Porzi & Kontschieder (2018).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as tnf
from torch import nn

__all__ = ["Activation", "TABLE", "NAMES", "code_of", "get", "to_module", "from_module"]

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@dataclass(frozen=True, slots=True)
class Activation:
    """One fused activation: its numba code, torch forward and derivative, invertibility and torch modules."""

    name: str
    code: int
    forward: Callable[[torch.Tensor, float], torch.Tensor]
    derivative: Callable[[torch.Tensor, float], torch.Tensor]
    invertible: bool
    modules: tuple[type[nn.Module], ...]
    make_module: Callable[[float], nn.Module | None]
    #: torch functions an fx graph may call for it (``call_function`` targets); slope/inplace args are the caller's
    functions: tuple[Callable, ...] = ()


def _sig_grad(z, s):
    g = torch.sigmoid(z)
    return g * (1 - g)


def _silu_grad(z, s):
    g = torch.sigmoid(z)
    return g * (1 + z * (1 - g))


def _gelu_grad(z, s):
    return 0.5 * (1 + torch.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def _tanh_grad(z, s):
    t = torch.tanh(z)
    return 1 - t * t


_ENTRIES = (
    Activation("identity", 0, lambda z, s: z, lambda z, s: torch.ones_like(z), True, (nn.Identity,),
               lambda s: None),
    Activation("relu", 1, lambda z, s: torch.relu(z), lambda z, s: (z > 0).to(z.dtype), False, (nn.ReLU,),
               lambda s: nn.ReLU(), (torch.relu, torch.relu_, tnf.relu)),
    Activation("leaky_relu", 2, lambda z, s: tnf.leaky_relu(z, s),
               lambda z, s: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, s)), True, (nn.LeakyReLU,),
               lambda s: nn.LeakyReLU(s), (tnf.leaky_relu,)),
    Activation("silu", 3, lambda z, s: tnf.silu(z), _silu_grad, False, (nn.SiLU,), lambda s: nn.SiLU(),
               (tnf.silu,)),
    Activation("gelu", 4, lambda z, s: tnf.gelu(z), _gelu_grad, False, (nn.GELU,), lambda s: nn.GELU(),
               (tnf.gelu,)),
    Activation("sigmoid", 5, lambda z, s: torch.sigmoid(z), _sig_grad, False, (nn.Sigmoid,), lambda s: nn.Sigmoid(),
               (torch.sigmoid, tnf.sigmoid)),
    Activation("tanh", 6, lambda z, s: torch.tanh(z), _tanh_grad, False, (nn.Tanh,), lambda s: nn.Tanh(),
               (torch.tanh, tnf.tanh)),
    Activation("relu6", 7, lambda z, s: tnf.relu6(z), lambda z, s: ((z > 0) & (z < 6)).to(z.dtype), False,
               (nn.ReLU6, nn.Hardtanh), lambda s: nn.ReLU6(), (tnf.relu6,)),
)

#: name → :class:`Activation`; the one list of fused activations.
TABLE: dict[str, Activation] = {a.name: a for a in _ENTRIES}
#: the names a layer accepts (None means "identity").
NAMES: tuple[str | None, ...] = (None, *TABLE)
_CODES: dict[str | None, int] = {None: 0, **{a.name: a.code for a in _ENTRIES}}


def get(name: str | None) -> Activation:
    """The table entry of ``name`` (None → identity). Raises ``KeyError`` for unknown names (callers check first)."""
    return TABLE["identity" if name is None else name]


def code_of(name: str | None) -> int:
    """The numba kernels' integer code of ``name`` (None → 0, identity)."""
    return _CODES[name]


def is_invertible(name: str | None, negative_slope: float) -> bool:
    """True when ``memory="save"`` can recover ``z`` from ``act(z)`` (leaky_relu needs ``negative_slope > 0``)."""
    a = get(name)
    return a.invertible and (a.name != "leaky_relu" or negative_slope > 0)


def to_module(name: str | None, negative_slope: float = 0.01) -> nn.Module | None:
    """A fresh ``torch.nn`` module computing the activation (None for identity); :func:`from_module` inverts it.

    Shape: not applicable. Example::

        >>> to_module("leaky_relu", 0.2)
        LeakyReLU(negative_slope=0.2)
        >>> from_module(to_module("relu6"))
        ('relu6', 0.01)
    """
    return get(name).make_module(float(negative_slope))


def from_module(module: nn.Module) -> tuple[str, float] | None:
    """``(name, negative_slope)`` if ``module`` computes a fusable activation exactly, else None.

    ``nn.GELU`` counts only with ``approximate='none'`` and ``nn.Hardtanh`` only as ``(0, 6)`` (ReLU6);
    ``inplace=True`` does not matter (fusing replaces the module).
    """
    for a in _ENTRIES:
        if a.name == "identity" or not isinstance(module, a.modules):
            continue
        if a.name == "gelu" and getattr(module, "approximate", "none") != "none":
            return None
        if a.name == "relu6" and (float(module.min_val), float(module.max_val)) != (0.0, 6.0):
            return None
        return a.name, float(getattr(module, "negative_slope", 0.01))
    return None
