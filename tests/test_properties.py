"""Property tests (hypothesis): the torch implementation against the NumPy oracle ``batchnorm.reference``
over random shapes (rank 2–4), feature axes, masks (≥ 2 counted values), affine parameters and eps."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchnorm import BatchNorm, batch_norm, batch_stats, reference
from batchnorm.functional import update_running

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
# the `backend` fixture only sets an environment variable, identical for every example
PER_BACKEND = settings(SETTINGS, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw, masked: bool | None = None):
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    rest = tuple(s for d, s in enumerate(shape) if d != axis % rank)
    use_mask = draw(st.booleans()) if masked is None else masked
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if use_mask:
        mask = rng.random(rest) < draw(st.floats(0.2, 1.0))
    else:
        mask = np.ones(rest, dtype=bool)
    flat = mask.reshape(-1)
    if flat.sum() < 2:  # at least two counted values per feature
        if flat.size < 2:
            shape = tuple(s if d != (axis + 1) % rank else s + 1 for d, s in enumerate(shape))
            rest = tuple(s for d, s in enumerate(shape) if d != axis % rank)
            mask = np.ones(rest, dtype=bool)
        else:
            flat[:2] = True
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 5.0, -100.0]))
    x = rng.normal(size=shape) * scale + offset
    c = shape[axis]
    gamma = rng.uniform(0.5, 2.0, c) if draw(st.booleans()) else None
    beta = rng.normal(size=c) if gamma is not None else None
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    return x, axis, (mask if use_mask else None), gamma, beta, eps


def _t(a):
    return None if a is None else torch.as_tensor(a, dtype=torch.float64)


@PER_BACKEND
@given(problems())
def test_forward_train_matches_reference(backend, p) -> None:
    x, axis, mask, gamma, beta, eps = p
    y_ref, mean_ref, var_ref, n_ref, _ = reference.forward_train(x, gamma, beta, eps=eps, axis=axis, mask=mask)
    mask_t = None if mask is None else torch.as_tensor(mask)
    y = batch_norm(_t(x), None, None, _t(gamma), _t(beta), training=True, eps=eps, axis=axis, mask=mask_t)
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-9, atol=1e-9)
    mean, var, count = batch_stats(_t(x), axis=axis, mask=mask_t)
    np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(var.numpy(), var_ref, rtol=1e-9, atol=1e-12)
    assert (count.numpy() == n_ref).all()


@SETTINGS
@given(problems(), st.booleans())
def test_forward_inference_matches_reference(p, low_precision) -> None:
    x, axis, _, gamma, beta, eps = p
    rng = np.random.default_rng(int(abs(x.flat[0]) * 1e6) % 2**31)
    c = x.shape[axis]
    rm, rv = rng.normal(size=c), rng.uniform(0.1, 3.0, c)
    y_ref = reference.forward_inference(x, rm, rv, gamma, beta, eps=eps, axis=axis)
    dt = torch.float32 if low_precision else torch.float64
    y = batch_norm(_t(x).to(dt), _t(rm).to(dt), _t(rv).to(dt), None if gamma is None else _t(gamma).to(dt),
                   None if beta is None else _t(beta).to(dt), training=False, eps=eps, axis=axis)
    assert y.dtype == dt
    tol = 1e-5 if low_precision else 1e-10
    np.testing.assert_allclose(y.double().numpy(), y_ref, rtol=tol, atol=tol * (1 + np.abs(x).max() / rv.min() ** 0.5))


@PER_BACKEND
@given(problems())
def test_backward_matches_reference(backend, p) -> None:
    x, axis, mask, gamma, beta, eps = p
    _, _, _, _, cache = reference.forward_train(x, gamma, beta, eps=eps, axis=axis, mask=mask)
    rng = np.random.default_rng(7)
    dy = rng.normal(size=x.shape)
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dy, cache)
    xt = _t(x).requires_grad_(True)
    c = x.shape[axis]
    w = _t(gamma if gamma is not None else np.ones(c)).requires_grad_(True)
    b = _t(beta if beta is not None else np.zeros(c)).requires_grad_(True)
    mask_t = None if mask is None else torch.as_tensor(mask)
    y = batch_norm(xt, None, None, w, b, training=True, eps=eps, axis=axis, mask=mask_t)
    y.backward(_t(dy))
    scale = 1 + np.abs(dy).sum() / max(1.0, np.sqrt(eps))
    np.testing.assert_allclose(xt.grad.numpy(), dx_ref, rtol=1e-7, atol=1e-9 * scale)
    np.testing.assert_allclose(w.grad.numpy(), dgamma_ref, rtol=1e-8, atol=1e-9 * scale)
    np.testing.assert_allclose(b.grad.numpy(), dbeta_ref, rtol=1e-10, atol=1e-10 * scale)


@PER_BACKEND
@given(problems(masked=True), st.sampled_from([0.1, 0.5, 1.0, 0.0]), st.integers(1, 3))
def test_update_running_matches_reference_over_steps(backend, p, momentum, steps) -> None:
    x, axis, mask, _, _, eps = p
    layer = BatchNorm(x.shape[axis], eps=eps, momentum=momentum, axis=axis).double()
    rm, rv = np.zeros(x.shape[axis]), np.ones(x.shape[axis])
    for k in range(steps):
        xk = x * (k + 1) - k
        _, mean, var, n, _ = reference.forward_train(xk, eps=eps, axis=axis, mask=mask)
        rm, rv = reference.update_running(rm, rv, mean, var, n, momentum)
        layer(_t(xk), mask=torch.as_tensor(mask))
    np.testing.assert_allclose(layer.running_mean.numpy(), rm, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(layer.running_var.numpy(), rv, rtol=1e-9, atol=1e-9)
    assert int(layer.num_batches_tracked) == steps


@SETTINGS
@given(problems(masked=False), st.integers(1, 4))
def test_functional_update_running_matches_reference(p, groups) -> None:
    """update_running over G groups = mean of group means and of group unbiased variances, then EMA."""
    x, axis, _, _, _, _ = p
    rng = np.random.default_rng(3)
    c = x.shape[axis]
    counts = rng.integers(2, 9, size=(groups, 1)).repeat(c, 1).astype(float)
    means, vars_ = rng.normal(size=(groups, c)), rng.uniform(0.1, 2, (groups, c))
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    update_running(rm, rv, _t(means), _t(vars_), _t(counts), 0.3)
    # the reference for one group, averaged over groups (what ghost batch norm stores)
    pairs = [reference.update_running(np.zeros(c), np.ones(c), means[g], vars_[g], counts[g], 0.3) for g in range(groups)]
    np.testing.assert_allclose(rm.numpy(), np.mean([q[0] for q in pairs], 0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv.numpy(), np.mean([q[1] for q in pairs], 0), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(problems())
def test_output_statistics_are_normalized_on_counted_positions(p) -> None:
    """A closed-form property: over counted positions, x̂ has mean 0 and variance σ²/(σ² + eps)."""
    x, axis, mask, _, _, eps = p
    mask_t = None if mask is None else torch.as_tensor(mask)
    y = batch_norm(_t(x), None, None, training=True, eps=eps, axis=axis, mask=mask_t)
    mean_y, var_y, _ = batch_stats(y, axis=axis, mask=mask_t)
    _, var_x, _ = batch_stats(_t(x), axis=axis, mask=mask_t)
    np.testing.assert_allclose(mean_y.numpy(), 0.0, atol=1e-7)
    np.testing.assert_allclose(var_y.numpy(), (var_x / (var_x + eps)).numpy(), rtol=1e-7, atol=1e-9)
