"""Batch normalization as the textbook writes it, in NumPy: the oracle for tests and for readers.

Ioffe & Szegedy (2015), Algorithm 1 (training: normalize with the mini-batch statistics) and
Algorithm 2 (inference: normalize with population estimates), plus the closed-form backward.
Nothing here is optimized; every line is one line of the paper.

Positions and features: the feature axis ``axis`` holds the C features; each feature's statistics
are taken over *every other* axis. For a dense layer ``(N, C)`` that is the N samples; for an
image ``(N, C, H, W)`` it is all N·H·W positions of channel c (a convolution shares its weights
over space, so its normalization is shared too); for a sequence ``(N, L, C)`` with ``axis=-1`` it is
all N·L time steps. ``mask`` (the input's shape without the feature axis) restricts which
positions *count* toward the statistics; every position is still normalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Cache", "forward_train", "forward_inference", "backward", "update_running"]


def _move(x: np.ndarray, axis: int) -> np.ndarray:
    """View ``x`` as ``(C, M)``: features first, all other positions flattened."""
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _unmove(z: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved = (shape[axis],) + tuple(s for d, s in enumerate(shape) if d != axis)
    return np.moveaxis(z.reshape(moved), 0, axis)


def _mask_flat(mask, shape: tuple[int, ...], axis: int) -> np.ndarray:
    rest = tuple(s for d, s in enumerate(shape) if d != axis)
    if mask is None:
        return np.ones(int(np.prod(rest)), dtype=bool)
    return np.broadcast_to(np.asarray(mask, dtype=bool), rest).reshape(-1)


@dataclass
class Cache:
    """What the training forward keeps for the backward."""

    xhat: np.ndarray  # (C, M) normalized values
    var: np.ndarray  # (C,) biased batch variance
    gamma: np.ndarray  # (C,)
    mask: np.ndarray  # (M,) bool
    eps: float
    shape: tuple[int, ...]
    axis: int


def forward_train(x, gamma=None, beta=None, eps=1e-5, axis=1, mask=None):
    """Algorithm 1. Returns ``(y, mean, var, count, cache)``; ``var`` is the biased batch variance.

    ``μ = (1/n) Σ x_i``, ``σ² = (1/n) Σ (x_i − μ)²`` over the n counted positions,
    ``x̂ = (x − μ) / sqrt(σ² + ε)``, ``y = γ x̂ + β``.

    Shape: x any rank ≥ 2 with C at ``axis``; gamma, beta ``(C,)``; y like x; mean, var ``(C,)``.

    Example::

        >>> x = np.random.randn(32, 3)
        >>> y, mean, var, n, _ = forward_train(x)
        >>> np.allclose(y.mean(0), 0) and n == 32
        True

    Reference: Ioffe & Szegedy (2015), Algorithm 1.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    c = x.shape[axis]
    gamma = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros(c) if beta is None else np.asarray(beta, dtype=np.float64)
    xf = _move(x, axis)  # (C, M)
    m = _mask_flat(mask, x.shape, axis)
    counted = xf[:, m]
    n = counted.shape[1]
    mean = counted.mean(axis=1)  # mini-batch mean
    var = ((counted - mean[:, None]) ** 2).mean(axis=1)  # mini-batch variance (biased)
    xhat = (xf - mean[:, None]) / np.sqrt(var[:, None] + eps)  # normalize every position
    y = gamma[:, None] * xhat + beta[:, None]  # scale and shift
    cache = Cache(xhat, var, gamma, m, eps, x.shape, axis)
    return _unmove(y, x.shape, axis), mean, var, n, cache


def forward_inference(x, mean, var, gamma=None, beta=None, eps=1e-5, axis=1):
    """Algorithm 2, step 11: ``y = γ (x − E[x]) / sqrt(Var[x] + ε) + β`` with fixed statistics.

    Equivalently ``y = a·x + b`` with ``a = γ / sqrt(Var[x] + ε)`` and ``b = β − a·E[x]``: at test
    time batch normalization is an affine map per feature.

    Shape: x any rank ≥ 2 with C at ``axis``; mean, var, gamma, beta ``(C,)``; y like x.

    Example::

        >>> x = np.random.randn(4, 2, 5)
        >>> y = forward_inference(x, mean=[1.0, -1.0], var=[4.0, 1.0], eps=0.0)
        >>> np.allclose(y[:, 0], (x[:, 0] - 1.0) / 2.0)
        True

    Reference: Ioffe & Szegedy (2015), Algorithm 2.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    c = x.shape[axis]
    gamma = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros(c) if beta is None else np.asarray(beta, dtype=np.float64)
    xf = _move(x, axis)
    a = gamma / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    b = beta - a * np.asarray(mean, dtype=np.float64)
    return _unmove(a[:, None] * xf + b[:, None], x.shape, axis)


def backward(dy, cache: Cache):
    """The closed-form backward of :func:`forward_train`: returns ``(dx, dgamma, dbeta)``.

    With n counted positions and ``m_i`` = 1 where position i counted::

        dβ = Σ_i dy_i                       dγ = Σ_i dy_i · x̂_i          (over all positions)
        dx_i = γ / sqrt(σ² + ε) · (dy_i − m_i/n · (Σ_j dy_j + x̂_i · Σ_j dy_j x̂_j))

    (x̂ and dy are summed over *all* positions in dγ, dβ: masked positions are normalized too, so they
    feed γ and β; only the statistics, and hence the correction term, come from counted positions.)

    Shape: dy like x; dgamma, dbeta ``(C,)``.

    Example::

        >>> x, dy = np.random.randn(6, 3), np.random.randn(6, 3)
        >>> *_, cache = forward_train(x)
        >>> dx, dgamma, dbeta = backward(dy, cache)
        >>> np.allclose(dx.sum(0), 0) and np.allclose(dbeta, dy.sum(0))   # Σ dx = 0: the mean is removed
        True

    Reference: Ioffe & Szegedy (2015), Section 3 (the chain-rule expressions for ∂ℓ/∂x_i, ∂ℓ/∂γ, ∂ℓ/∂β).
    """
    dyf = _move(np.asarray(dy, dtype=np.float64), cache.axis)
    n = cache.mask.sum()
    dbeta = dyf.sum(axis=1)
    dgamma = (dyf * cache.xhat).sum(axis=1)
    k = cache.gamma / np.sqrt(cache.var + cache.eps)
    corr = (dbeta[:, None] + cache.xhat * dgamma[:, None]) / n
    dx = k[:, None] * (dyf - cache.mask[None, :] * corr)
    return _unmove(dx, cache.shape, cache.axis), dgamma, dbeta


def update_running(running_mean, running_var, mean, var, count, momentum=0.1):
    """Algorithm 2's population estimates as a moving average (PyTorch's convention).

    ``running_mean ← (1 − momentum)·running_mean + momentum·mean`` and
    ``running_var ← (1 − momentum)·running_var + momentum·var·n/(n − 1)`` (unbiased). Returns the new pair.
    ``momentum=None`` is not handled here: PyTorch's cumulative average is ``momentum = 1/k`` at the k-th batch.

    Shape: running_mean, running_var, mean, var ``(C,)``; count a scalar (n > 1).

    Example::

        >>> rm, rv = update_running(np.zeros(2), np.ones(2), mean=np.array([1.0, 2.0]),
        ...                         var=np.array([3.0, 3.0]), count=4, momentum=0.5)
        >>> rm.tolist(), rv.tolist()            # 0.5·0 + 0.5·mean, 0.5·1 + 0.5·3·4/3
        ([0.5, 1.0], [2.5, 2.5])

    Reference: Ioffe & Szegedy (2015), Algorithm 2, steps 9–10 (unbiased variance ``m/(m−1)·E[σ²_B]``);
    the moving average is PyTorch's ``torch.nn.BatchNorm*d``.
    """
    unbiased = np.asarray(var) * count / (count - 1)
    return (
        (1 - momentum) * np.asarray(running_mean) + momentum * np.asarray(mean),
        (1 - momentum) * np.asarray(running_var) + momentum * unbiased,
    )
