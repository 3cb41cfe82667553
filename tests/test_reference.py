"""The NumPy oracle checked against closed forms, finite differences and torch; and every docstring
example of the core modules executed (they are documentation that must not rot)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import batchnorm.functional
import batchnorm.kernels.compose
import batchnorm.layers.base
import batchnorm.reference
from batchnorm import reference

SHAPES = [((7, 3), 1, None), ((4, 3, 5), 1, None), ((4, 5, 3), -1, None), ((2, 3, 2, 4), 1, None),
          ((4, 3, 5), 1, "mask"), ((3, 4, 2), -1, "mask"), ((2, 2, 3, 3), 1, "mask")]


def _data(shape, axis, masked, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.normal()
    rest = tuple(s for d, s in enumerate(shape) if d != axis % len(shape))
    mask = None
    if masked:
        mask = rng.random(rest) < 0.6
        mask.reshape(-1)[:2] = True
    c = shape[axis]
    return x, mask, rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=shape)


@pytest.mark.parametrize("shape, axis, masked", SHAPES)
def test_forward_train_closed_form(shape, axis, masked) -> None:
    x, mask, gamma, beta, _ = _data(shape, axis, masked)
    y, mean, var, n, _ = reference.forward_train(x, gamma, beta, eps=1e-3, axis=axis, mask=mask)
    xm = np.moveaxis(x, axis, -1)  # (..., C)
    sel = xm[mask] if mask is not None else xm.reshape(-1, shape[axis])
    assert n == sel.shape[0]
    np.testing.assert_allclose(mean, sel.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, sel.var(0), rtol=1e-12)
    expected = gamma * (xm - sel.mean(0)) / np.sqrt(sel.var(0) + 1e-3) + beta
    np.testing.assert_allclose(y, np.moveaxis(expected, -1, axis), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, axis, masked", SHAPES)
def test_backward_against_central_differences(shape, axis, masked) -> None:
    x, mask, gamma, beta, dy = _data(shape, axis, masked)

    def loss(x_, g_, b_):
        return float((reference.forward_train(x_, g_, b_, eps=1e-3, axis=axis, mask=mask)[0] * dy).sum())

    *_, cache = reference.forward_train(x, gamma, beta, eps=1e-3, axis=axis, mask=mask)
    dx, dgamma, dbeta = reference.backward(dy, cache)
    h = 1e-6
    for arr, grad in ((x, dx), (gamma, dgamma), (beta, dbeta)):
        num = np.zeros_like(arr)
        for i in range(arr.size):
            e = np.zeros(arr.size)
            e[i] = h
            e = e.reshape(arr.shape)
            args = [x, gamma, beta]
            k = [a is arr for a in args].index(True)
            plus, minus = list(args), list(args)
            plus[k], minus[k] = arr + e, arr - e
            num.reshape(-1)[i] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, axis, masked", [s for s in SHAPES if s[2] is None])
def test_reference_matches_torch_layer(shape, axis, masked) -> None:
    """An independent oracle for the oracle: torch.nn.BatchNorm*d in float64, train and eval."""
    x, _, gamma, beta, dy = _data(shape, axis, masked)
    mod = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)](
        shape[axis], eps=1e-3, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        mod.weight.copy_(torch.as_tensor(gamma))
        mod.bias.copy_(torch.as_tensor(beta))
    xt = torch.as_tensor(np.moveaxis(x, axis, 1).copy()).requires_grad_(True)
    yt = mod(xt)
    yt.backward(torch.as_tensor(np.moveaxis(dy, axis, 1).copy()))
    y, mean, var, n, cache = reference.forward_train(x, gamma, beta, eps=1e-3, axis=axis)
    np.testing.assert_allclose(np.moveaxis(yt.detach().numpy(), 1, axis), y, rtol=1e-10, atol=1e-10)
    dx, dgamma, dbeta = reference.backward(dy, cache)
    np.testing.assert_allclose(np.moveaxis(xt.grad.numpy(), 1, axis), dx, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(mod.weight.grad.numpy(), dgamma, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mod.bias.grad.numpy(), dbeta, rtol=1e-10, atol=1e-10)
    rm, rv = reference.update_running(np.zeros(shape[axis]), np.ones(shape[axis]), mean, var, n, 0.3)
    np.testing.assert_allclose(mod.running_mean.numpy(), rm, rtol=1e-12)
    np.testing.assert_allclose(mod.running_var.numpy(), rv, rtol=1e-12)
    mod.eval()
    y_eval = reference.forward_inference(x, rm, rv, gamma, beta, eps=1e-3, axis=axis)
    np.testing.assert_allclose(np.moveaxis(mod(xt).detach().numpy(), 1, axis), y_eval, rtol=1e-10, atol=1e-10)


def test_inference_with_batch_statistics_equals_training_forward() -> None:
    x, _, gamma, beta, _ = _data((6, 3, 4), 1, None)
    y, mean, var, _, _ = reference.forward_train(x, gamma, beta)
    np.testing.assert_allclose(reference.forward_inference(x, mean, var, gamma, beta), y, rtol=1e-12, atol=1e-12)


def test_backward_removes_mean_and_projection() -> None:
    """Closed-form identities of the BN backward: Σ_i dx_i = 0 and (with eps = 0, where Σ x̂² = n exactly)
    Σ_i dx_i · x̂_i = 0, per feature."""
    x, mask, gamma, beta, dy = _data((5, 3, 4), 1, None)
    *_, cache = reference.forward_train(x, gamma, beta, eps=0.0)
    dx = reference.backward(dy, cache)[0]
    dxf = np.moveaxis(dx, 1, 0).reshape(3, -1)
    np.testing.assert_allclose(dxf.sum(1), 0, atol=1e-10)
    np.testing.assert_allclose((dxf * cache.xhat).sum(1), 0, atol=1e-10)


DOC_MODULES = [batchnorm.functional, batchnorm.layers.base, batchnorm.reference, batchnorm.activations,
               batchnorm.kernels.dispatch, batchnorm.kernels.compose]
_FINDER = doctest.DocTestFinder(exclude_empty=True)
DOCTESTS = [(m, t) for m in DOC_MODULES for t in _FINDER.find(m, globs={}) if t.examples]


@pytest.mark.parametrize("module, test", DOCTESTS, ids=[t.name for _, t in DOCTESTS])
def test_docstring_examples_run(module, test) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    test.globs = {"torch": torch, "np": np, **vars(module)}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda s: None)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {test.name}"


def test_doctests_were_found() -> None:
    names = {t.name.rsplit(".", 1)[-1] for _, t in DOCTESTS}
    assert {"batch_stats", "batch_norm", "merge_stats", "BatchNorm", "forward_train", "backward"} <= names
