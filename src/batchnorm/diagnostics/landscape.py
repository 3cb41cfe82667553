"""loss_landscape: how the loss and its gradient change along the gradient direction (Santurkar et al. 2018)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    preserved,
    rng_states,
    set_rng_states,
)

__all__ = ["loss_landscape"]


def _check_steps(steps: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(s) for s in steps)
    except TypeError:
        out = ()
    if not out or any(not (s > 0 and s != float("inf")) for s in out):
        raise ValueError(
            f"loss_landscape expected steps to be a non-empty sequence of finite numbers > 0 (multiples of lr), got "
            f"{steps!r}. Santurkar et al. move up to a few learning rates, e.g. steps=(0.5, 1, 2, 4)."
        )
    return out


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: tuple[Any, Any],
    *,
    lr: float,
    steps: Sequence[float] = (0.5, 1, 2, 4),
) -> dict[str, Any]:
    r"""Loss and gradient along the gradient direction: Santurkar et al.'s landscape measurements.

    With ``θ`` all trainable parameters, ``g = ∇L(θ)`` on ``batch`` and ``η_s = s · lr`` for each
    ``s`` in ``steps``, the points ``θ_s = θ − η_s · g`` give::

        loss_s        = L(θ_s)
        grad_change_s = ‖∇L(θ_s) − g‖₂
        distance_s    = ‖θ_s − θ‖₂ = η_s ‖g‖₂
        loss_range              = max − min of {L(θ)} ∪ {loss_s}     (the current point included)
        gradient_predictiveness = max_s grad_change_s                 (small = predictive gradient)
        beta_smoothness         = max_s grad_change_s / distance_s    ("effective" β-smoothness)

    and the same three divided by the scale the current point sets, so that a network probed at a
    higher loss (with a larger gradient) is not called rougher for that alone::

        relative_loss_range       = loss_range / |L(θ)|
        relative_gradient_change  = gradient_predictiveness / ‖g‖
        normalized_beta           = beta_smoothness · |L(θ)| / ‖g‖²

    ``normalized_beta`` is dimensionless and unchanged when the loss is multiplied by a constant or the
    parameters are rescaled; along a one-dimensional quadratic bowl ``L = ½ h x²`` (minimum 0) it is ½.

    For a quadratic ``L(θ) = ½ θᵀHθ − bᵀθ`` the ratio is ``‖Hg‖ / ‖g‖`` at every step: at most the
    largest eigenvalue of ``H``, and equal to it when ``g`` is a top eigenvector.

    The model runs in the mode it is in (``model.train()`` to measure training); before every
    forward its buffers are restored and the global RNG is replayed, so every point sees the same
    running statistics and dropout masks. Afterwards the model is exactly as found (parameters,
    buffers, ``.grad``, training flags, plain attributes) and the global RNG is unchanged.
    ``beta_smoothness``, ``relative_gradient_change`` and ``normalized_beta`` are NaN when ``g = 0`` (no
    direction to move in); ``relative_loss_range`` is NaN when ``L(θ) = 0``.

    Args:
        model, loss_fn, batch: ``loss_fn(model(x), y)`` is the scalar loss; ``batch = (x, y)``.
        lr: the learning rate (> 0); the steps are multiples of it.
        steps: positive multiples of ``lr``.

    Returns:
        ``{"loss": L(θ), "grad_norm": ‖g‖, "steps": [η_s], "losses": [...], "grad_changes": [...],
        "distances": [...], "loss_range", "gradient_predictiveness", "beta_smoothness",
        "relative_loss_range", "relative_gradient_change", "normalized_beta"}`` (floats).

    Shape: whatever ``model`` and ``loss_fn`` accept.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
        ...                           torch.nn.Linear(32, 1))
        >>> x, y = torch.randn(64, 10), torch.randn(64, 1)
        >>> land = loss_landscape(net, torch.nn.functional.mse_loss, (x, y), lr=0.1)
        >>> sorted(land)[:3]
        ['beta_smoothness', 'distances', 'grad_changes']

    Reference: S. Santurkar, D. Tsipras, A. Ilyas and A. Madry, "How Does Batch Normalization Help
    Optimization?", NeurIPS 2018 (Section 3.1, Figure 4: loss landscape, gradient predictiveness,
    effective β-smoothness).
    """
    check_model(model, "loss_landscape")
    x, y = check_batch(batch, "loss_landscape")
    lr = check_lr(lr, "loss_landscape")
    multiples = _check_steps(steps)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("loss_landscape expected a model with trainable parameters, got none (all requires_grad=False).")
    devices = cuda_devices(model)
    with preserved(model) as snap:
        rng = rng_states(devices)

        def evaluate() -> tuple[float, torch.Tensor]:
            snap.restore_buffers()
            set_rng_states(rng, devices)
            loss = as_scalar_loss(loss_fn(call(model, x), y), "loss_landscape")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64) for g, p in zip(grads, params)])
            return float(loss.detach()), flat

        start = [p.detach().clone() for p in params]
        loss0, g = evaluate()
        gnorm = float(torch.linalg.vector_norm(g))
        etas, losses, changes, distances = [], [], [], []
        for s in multiples:
            eta = s * lr
            offset = 0
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    n = p.numel()
                    p.copy_(p0 - eta * g[offset : offset + n].reshape(p.shape).to(p.dtype))
                    offset += n
            loss_s, g_s = evaluate()
            etas.append(eta)
            losses.append(loss_s)
            changes.append(float(torch.linalg.vector_norm(g_s - g)))
            distances.append(eta * gnorm)
    all_losses = [loss0, *losses]
    ratios = [c / d if d > 0 else float("nan") for c, d in zip(changes, distances)]
    loss_range = max(all_losses) - min(all_losses)
    beta = max(ratios) if gnorm > 0 else float("nan")
    nan = float("nan")
    return {
        "loss": loss0,
        "grad_norm": gnorm,
        "steps": etas,
        "losses": losses,
        "grad_changes": changes,
        "distances": distances,
        "loss_range": loss_range,
        "gradient_predictiveness": max(changes),
        "beta_smoothness": beta,
        "relative_loss_range": loss_range / abs(loss0) if loss0 != 0 else nan,
        "relative_gradient_change": max(changes) / gnorm if gnorm > 0 else nan,
        "normalized_beta": beta * abs(loss0) / gnorm**2 if gnorm > 0 else nan,
    }
