"""internal_covariate_shift: Santurkar et al.'s gradient-based measurement of internal covariate shift."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._common import (
    as_scalar_loss,
    call,
    check_batch,
    check_lr,
    check_model,
    cuda_devices,
    is_bn_like,
    preserved,
    rng_states,
    set_rng_states,
)

__all__ = ["internal_covariate_shift"]


def _layers_in_forward_order(model: nn.Module, x: Any) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly, in the order of their first call during ``model(x)``."""
    owners = {id(m): (name or "<root>", m) for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def pre(module: nn.Module, args: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append(owners[id(module)])

    handles = [m.register_forward_pre_hook(pre) for _, m in owners.values()]
    try:
        with torch.no_grad():
            call(model, x)
    finally:
        for h in handles:
            h.remove()
    return order


def _flat(grads: Iterable[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
    parts = [(torch.zeros_like(p) if g is None else g).detach().reshape(-1).to(torch.float64) for g, p in zip(grads, params)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def internal_covariate_shift(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: tuple[Any, Any],
    *,
    lr: float,
    layers: Iterable[str] | None = None,
) -> dict[str, dict[str, float]]:
    r"""Internal covariate shift of each layer, as Santurkar et al. (2018) define and measure it.

    Let ``W_1 … W_k`` be the parameters of the model's layers in forward order and ``L`` the loss on
    ``batch``. For layer ``i``::

        G_i  = ∇_{W_i} L(W_1, …, W_{i−1}, W_i, …, W_k)
        G'_i = ∇_{W_i} L(W_1 − lr·G_1, …, W_{i−1} − lr·G_{i−1}, W_i, …, W_k)     (same batch)
        ICS_i = ‖G_i − G'_i‖₂,     cos_i = ⟨G_i, G'_i⟩ / (‖G_i‖ ‖G'_i‖)

    i.e. ``G'_i`` is layer ``i``'s gradient after every layer before it has taken its SGD step of
    size ``lr`` on the same batch: how much the layer's optimization problem moved because its
    inputs moved. ``ICS = 0, cos = 1`` means no shift at all.

    Conventions (where the paper is silent):

    * a *layer* is a module that owns parameters directly (Linear, Conv, BN's ``γ, β``, ...), and
      ``W_i`` is all of its parameters, flattened together (weight and bias);
    * *forward order* is the order of each layer's first call in one forward of ``batch``; the
      layers "before ``i``" are every layer called earlier, BN layers included (their ``γ, β`` take
      their step too, as in training);
    * ``layers=None`` reports every layer except BN-like ones (the weight layers, as in the paper);
      pass module names (``dict(model.named_modules())`` keys) to choose, BN layers allowed;
    * the model runs in the mode it is in (call ``model.train()`` first to measure training);
      buffers (running statistics) are restored before every forward and the global RNG is
      replayed, so every forward sees the same state and the same dropout masks;
    * ``cos`` is NaN when ``G_i`` or ``G'_i`` is zero.

    Cost: one forward and backward per reported layer, plus two. Gradients are taken with
    ``torch.autograd.grad`` (no ``.backward()``, no optimizer); the model is left exactly as found:
    parameters, buffers (running statistics, ``num_batches_tracked``), ``.grad`` fields, training
    flags, plain attributes such as ``last_input_shape``, and the global RNG state.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model(x), y)`` → scalar tensor.
        batch: ``(x, y)``; a tuple/list ``x`` is unpacked into ``model(*x)``, a dict into ``model(**x)``.
        lr: the SGD step size (> 0).
        layers: names of the layers to report, or None (see above).

    Returns:
        ``{layer_name: {"l2": ICS_i, "cos": cos_i}}`` in forward order (Python floats, float64 math).

    Shape: whatever ``model`` and ``loss_fn`` accept.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
        ...                           torch.nn.Linear(32, 1))
        >>> x, y = torch.randn(64, 10), torch.randn(64, 1)
        >>> ics = internal_covariate_shift(net, torch.nn.functional.mse_loss, (x, y), lr=0.1)
        >>> list(ics)                       # {"0": {"l2": 0.0, "cos": 1.0}, "3": {...}}
        ['0', '3']

    Reference: S. Santurkar, D. Tsipras, A. Ilyas and A. Madry, "How Does Batch Normalization Help
    Optimization?", NeurIPS 2018 (Definition 2.1, Figure 3).
    """
    check_model(model, "internal_covariate_shift")
    x, y = check_batch(batch, "internal_covariate_shift")
    lr = check_lr(lr, "internal_covariate_shift")
    devices = cuda_devices(model)
    with preserved(model) as snap:
        rng = rng_states(devices)
        order = _layers_in_forward_order(model, x)
        snap.restore_buffers()
        names = [n for n, _ in order]
        if layers is None:
            wanted = [n for n, m in order if not is_bn_like(m)]
        else:
            wanted = list(layers)
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise ValueError(
                    f"internal_covariate_shift: layers {unknown} are not modules with parameters that the forward "
                    f"of this batch calls; expected names among {names}. Use the names of "
                    "model.named_modules() of layers that own parameters."
                )
        # each parameter belongs to the first layer (in forward order) that owns it (tied weights)
        seen: set[int] = set()
        groups: list[list[torch.Tensor]] = []
        for _, m in order:
            ps = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in ps)
            groups.append(ps)
        params = [p for g in groups for p in g]
        position = {id(p): k for k, p in enumerate(params)}

        def grads() -> list[torch.Tensor | None]:
            snap.restore_buffers()
            set_rng_states(rng, devices)
            loss = as_scalar_loss(loss_fn(call(model, x), y), "internal_covariate_shift")
            return list(torch.autograd.grad(loss, params, allow_unused=True))

        g0 = grads()
        by_param = {id(p): g for p, g in zip(params, g0)}
        result: dict[str, dict[str, float]] = {}
        for idx, (name, _) in enumerate(order):
            if name not in wanted:
                continue
            before = [p for g in groups[:idx] for p in g]
            with torch.no_grad():
                for p in before:
                    g = by_param[id(p)]
                    if g is not None:
                        p.sub_(lr * g)
            g1 = grads()
            with torch.no_grad():  # undo the step exactly (restore the saved values)
                for _owner, _pname, p, value, *_ in snap.params:
                    p.copy_(value)
            own = groups[idx]
            a = _flat((by_param[id(p)] for p in own), own)
            b = _flat((g1[position[id(p)]] for p in own), own)
            l2 = float(torch.linalg.vector_norm(a - b))
            na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
            cos = float(torch.dot(a, b)) / (na * nb) if na > 0 and nb > 0 else math.nan
            result[name] = {"l2": l2, "cos": cos}
    return result
