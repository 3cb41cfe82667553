"""Variants (issue #4): BatchRenorm, GhostBatchNorm, FrozenBatchNorm, AffineOnly, Standardizer.

Every reference here is independent of the package's math: closed forms written with plain torch
ops, torch.nn.functional.batch_norm / torch.nn.BatchNorm*d, batchnorm.reference (NumPy), and
scikit-learn's StandardScaler.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from harness import CASES, make_pair, run_parity
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

import batchnorm as bn
from batchnorm import reference

F64 = torch.float64
# "exactly equal" comparisons with plain BatchNorm force the backend BatchRenorm runs on (plain BN alone may go
# to ATen's native batch norm under "auto", whose float rounding differs from our kernels')
SAME = "numba" if "numba" in bn.kernels.dispatch.available() else "composite"


# ---------------------------------------------------------------------------------------------
# helpers: independent closed forms
# ---------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, axis: int, mask: torch.Tensor | None):
    """``x`` as ``(M, C)`` (features last) and the ``(M,)`` bool mask of counted positions."""
    xm = x.movedim(axis, -1)
    flat = xm.reshape(-1, x.shape[axis])
    if mask is None:
        keep = torch.ones(flat.shape[0], dtype=torch.bool)
    else:
        keep = mask.expand(xm.shape[:-1]).reshape(-1)
    return flat, keep, xm.shape


def _unrows(flat: torch.Tensor, moved_shape, axis: int) -> torch.Tensor:
    return flat.reshape(moved_shape).movedim(-1, axis)


def renorm_closed_form(x, w, b, rm, rv, *, axis, mask, eps, r_max, d_max, momentum):
    """Ioffe (2017), Algorithm 1, written out: returns ``(y, new_rm, new_rv, r, d)``."""
    flat, keep, moved = _rows(x, axis, mask)
    xs = flat[keep]
    mu_b = xs.mean(0)
    var_b = xs.var(0, unbiased=False)
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(rv + eps)
    r = (sigma_b / sigma).detach().clamp(1.0 / r_max, r_max)
    d = ((mu_b - rm) / sigma).detach().clamp(-d_max, d_max)
    y = ((flat - mu_b) / sigma_b * r + d) * w + b
    new_rm = (1 - momentum) * rm + momentum * mu_b.detach()
    new_rv = (1 - momentum) * rv + momentum * xs.detach().var(0, unbiased=True)
    return _unrows(y, moved, axis), new_rm, new_rv, r, d


def _grads(out: torch.Tensor, tensors, seed: int = 1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), tensors)


SHAPES = [  # (shape, axis, masked)
    ((16, 3), 1, False),
    ((6, 3, 5), 1, False),
    ((6, 3, 5), 1, True),
    ((4, 7, 3), -1, True),
    ((3, 3, 4, 4), 1, False),
    ((2, 3, 2, 3, 2), 1, False),
]


def _mask_for(shape, axis, masked, seed=3):
    if not masked:
        return None
    rest = tuple(s for d, s in enumerate(shape) if d != (axis % len(shape)))
    m = torch.rand(rest, generator=torch.Generator().manual_seed(seed)) < 0.7
    m.view(-1)[:2] = True  # at least two counted positions
    return m


# ---------------------------------------------------------------------------------------------
# BatchRenorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis,masked", SHAPES)
def test_renorm_matches_closed_form_over_steps_with_clamps_binding(shape, axis, masked):
    c = shape[axis]
    eps, r_max, d_max, momentum = 1e-3, 2.0, 1.5, 0.2
    layer = bn.BatchRenorm(c, eps=eps, momentum=momentum, axis=axis, r_max=r_max, d_max=d_max, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, c, dtype=F64))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, c, dtype=F64))
        # feature 0: running stats far above the batch (r hits 1/r_max, d hits -d_max); feature 1:
        # far below (r hits r_max, d hits +d_max); the rest near the batch (clamps idle)
        layer.running_mean.copy_(torch.tensor([20.0, -6.0] + [0.0] * (c - 2), dtype=F64))
        layer.running_var.copy_(torch.tensor([40.0, 0.02] + [1.0] * (c - 2), dtype=F64))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    mask = _mask_for(shape, axis, masked)
    saw_bind = saw_free = False
    for step in range(4):
        x = torch.randn(shape, dtype=F64).requires_grad_()
        y = layer(x, mask=mask)
        ref, rm, rv, r, d = renorm_closed_form(
            x, w, b, rm, rv, axis=axis, mask=mask, eps=eps, r_max=r_max, d_max=d_max, momentum=momentum
        )
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        got = _grads(y, (x, layer.weight, layer.bias), seed=step)
        want = _grads(ref, (x, w, b), seed=step)
        for g1, g2 in zip(got, want):
            torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, rv, rtol=1e-12, atol=1e-12)
        saw_bind |= bool((r == r_max).any() & (r == 1 / r_max).any() & (d == d_max).any() & (d == -d_max).any())
        saw_free |= bool(((r > 1 / r_max) & (r < r_max)).any())
        layer.weight.grad = layer.bias.grad = None
    assert saw_bind and saw_free, "the test data must exercise both clamps and the unclamped case"
    assert int(layer.num_batches_tracked) == 4


@pytest.mark.parametrize("shape,axis,masked", SHAPES)
def test_renorm_with_rmax1_dmax0_equals_batchnorm_exactly(shape, axis, masked):
    c = shape[axis]
    kw = dict(eps=1e-5, momentum=0.1, axis=axis, dtype=F64)
    renorm = bn.BatchRenorm(c, r_max=1.0, d_max=0.0, **kw)
    plain = bn.BatchNorm(c, backend=SAME, **kw)
    with torch.no_grad():
        for layer in (renorm, plain):
            layer.running_mean.fill_(3.0)  # far from the batch: only r=1, d=0 make these equal
            layer.running_var.fill_(9.0)
    mask = _mask_for(shape, axis, masked)
    for step in range(3):
        x = torch.randn(shape, dtype=F64).requires_grad_()
        y1, y2 = renorm(x, mask=mask), plain(x, mask=mask)
        assert torch.equal(y1, y2)
        for g1, g2 in zip(_grads(y1, (x, renorm.weight, renorm.bias), step), _grads(y2, (x, plain.weight, plain.bias), step)):
            assert torch.equal(g1, g2)
    assert torch.equal(renorm.running_mean, plain.running_mean)
    assert torch.equal(renorm.running_var, plain.running_var)


def test_renorm_unclamped_training_output_equals_inference_with_previous_running_stats():
    """The point of renorm: with r, d unclamped, training and inference compute the same function."""
    layer = bn.BatchRenorm(4, r_max=math.inf, d_max=math.inf, dtype=F64)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5, 30.0], dtype=F64))
        layer.running_var.copy_(torch.tensor([0.1, 4.0, 1.0, 100.0], dtype=F64))
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    x = torch.randn(5, 4, 3, dtype=F64)
    expected = torch.nn.functional.batch_norm(
        x, layer.running_mean.clone(), layer.running_var.clone(), layer.weight, layer.bias, training=False, eps=layer.eps
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_renorm_gradient_treats_r_and_d_as_constants():
    """dL/dx is BN's backward scaled by r: with r, d detached, σ_B/σ does not enter the gradient."""
    layer = bn.BatchRenorm(3, r_max=math.inf, d_max=math.inf, dtype=F64)
    with torch.no_grad():
        layer.running_var.fill_(0.25)  # σ ≈ 0.5 → r ≈ 2·σ_B
    x = torch.randn(10, 3, dtype=F64, requires_grad=True)
    y = layer(x)
    (gx,) = _grads(y, (x,))
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.nn.functional.batch_norm(x2, None, None, training=True, eps=layer.eps)
    (gbn,) = _grads(y2, (x2,))
    r = torch.sqrt(x.detach().var(0, unbiased=False) + layer.eps) / math.sqrt(0.25 + layer.eps)
    torch.testing.assert_close(gx, gbn * r, rtol=1e-10, atol=1e-12)


WARMUP = [  # (T, r_max, d_max)
    (4, 3.0, 5.0),
    (2, 1.5, 0.5),
]


@pytest.mark.parametrize("T,r_max,d_max", WARMUP)
def test_renorm_warmup_ramps_limits_linearly_from_plain_bn(T, r_max, d_max):
    # momentum 0 keeps the running estimates far from every batch, so the clamps bind at every step
    layer = bn.BatchRenorm(2, momentum=0.0, r_max=r_max, d_max=d_max, warmup_steps=T, dtype=F64)
    with torch.no_grad():
        layer.running_mean.fill_(10.0)
        layer.running_var.fill_(1e-3)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    for t in range(T + 3):
        frac = min(t / T, 1.0)
        r_lim, d_lim = 1 + (r_max - 1) * frac, d_max * frac
        x = torch.randn(8, 2, dtype=F64)
        ref, rm, rv, r, d = renorm_closed_form(
            x, layer.weight, layer.bias, rm, rv, axis=1, mask=None, eps=layer.eps, r_max=r_lim, d_max=d_lim, momentum=0.0
        )
        assert torch.allclose(r, torch.full_like(r, r_lim)) and torch.allclose(d, torch.full_like(d, -d_lim))
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
    first = bn.BatchRenorm(2, warmup_steps=T, dtype=F64)
    with torch.no_grad():
        first.running_mean.fill_(10.0)
    x = torch.randn(8, 2, dtype=F64)
    assert torch.equal(first(x), bn.BatchNorm(2, dtype=F64, backend=SAME)(x))  # step 0 is plain BN


def test_renorm_limits_assigned_between_steps_take_effect():
    layer = bn.BatchRenorm(3, momentum=0.0, dtype=F64)
    with torch.no_grad():
        layer.running_mean.fill_(4.0)
    x = torch.randn(6, 3, dtype=F64)
    layer.r_max, layer.d_max = 1.0, 0.0  # "hold" phase of a hand-made schedule
    assert torch.equal(layer(x), bn.BatchNorm(3, dtype=F64, backend=SAME)(x))
    layer.r_max, layer.d_max = 2.0, 0.25
    ref = renorm_closed_form(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var, axis=1, mask=None, eps=layer.eps,
        r_max=2.0, d_max=0.25, momentum=0.0,
    )[0]
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_renorm_warmup_clock_is_num_batches_tracked_and_skips_nonfinite_batches():
    layer = bn.BatchRenorm(2, warmup_steps=10)
    layer(torch.randn(4, 2))
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(torch.tensor([[float("nan"), 1.0], [2.0, 3.0]]))
    assert int(layer.num_batches_tracked) == 1
    r_lim, d_lim = layer.current_limits()
    assert float(r_lim) == pytest.approx(1 + 2.0 * 0.1) and float(d_lim) == pytest.approx(5.0 * 0.1)
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm1d(2).state_dict())


def test_renorm_eval_and_state_dict_match_batchnorm():
    torch_bn = torch.nn.BatchNorm2d(5)
    torch_bn.train()
    for _ in range(3):
        torch_bn(torch.randn(4, 5, 3, 3) * 2 + 1)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5)
    layer = bn.BatchRenorm(5)
    layer.load_state_dict(torch_bn.state_dict())
    layer.eval()
    torch_bn.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(layer(x), torch_bn(x))
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(layer.state_dict())
    torch.testing.assert_close(back.eval()(x), torch_bn(x))


def test_renorm_without_running_stats_is_plain_batchnorm_in_both_modes():
    x = torch.randn(6, 3, 4)
    for training in (True, False):
        layer = bn.BatchRenorm(3, track_running_stats=False).train(training)
        ref = torch.nn.BatchNorm1d(3, track_running_stats=False).train(training)
        torch.testing.assert_close(layer(x), ref(x))
        assert layer.running_mean is None


# ---------------------------------------------------------------------------------------------
# GhostBatchNorm
# ---------------------------------------------------------------------------------------------
GHOST = [  # (shape, axis, vbs, masked)
    ((12, 3), 1, 4, False),
    ((10, 3), 1, 4, False),  # last virtual batch has 2 rows
    ((9, 3, 5), 1, 4, False),  # last virtual batch has 1 row of 5 positions
    ((7, 4, 3), -1, 3, True),
    ((6, 2, 3, 3), 1, 2, False),
]


def _ghost_reference(x, w, b, vbs, axis, mask, eps):
    """torch's own batch norm (or batchnorm.BatchNorm with a mask) applied to each chunk separately."""
    outs, means, vars_ = [], [], []
    chunks = x.split(vbs, 0)
    masks = mask.split(vbs, 0) if mask is not None else [None] * len(chunks)
    for xc, mc in zip(chunks, masks):
        if mc is None and axis % x.dim() == 1:
            outs.append(torch.nn.functional.batch_norm(xc, None, None, w, b, training=True, eps=eps))
        else:  # a BatchNorm without affine, then the shared w, b (so their gradients accumulate)
            plain = bn.BatchNorm(x.shape[axis], eps=eps, axis=axis, affine=False, track_running_stats=False, dtype=x.dtype)
            shape = [1] * x.dim()
            shape[axis] = -1
            outs.append(plain(xc, mask=mc) * w.reshape(shape) + b.reshape(shape))
        flat, keep, _ = _rows(xc.detach(), axis, mc)
        means.append(flat[keep].mean(0))
        vars_.append(flat[keep].var(0, unbiased=True))
    return torch.cat(outs, 0), torch.stack(means).mean(0), torch.stack(vars_).mean(0)


@pytest.mark.parametrize("shape,axis,vbs,masked", GHOST)
def test_ghost_equals_batchnorm_chunk_by_chunk(shape, axis, vbs, masked):
    c = shape[axis]
    layer = bn.GhostBatchNorm(c, vbs, momentum=0.3, axis=axis, dtype=F64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    x = (torch.randn(shape, dtype=F64) * 3 + 1).requires_grad_()
    mask = _mask_for(shape, axis, masked)
    if mask is not None:
        mask.select(0, shape[0] - 1).view(-1)[:2] = True  # every virtual batch keeps > 1 value
    y = layer(x, mask=mask)
    ref, mean_of_means, mean_of_vars = _ghost_reference(x, w, b, vbs, axis, mask, layer.eps)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for g1, g2 in zip(_grads(y, (x, layer.weight, layer.bias)), _grads(ref, (x, w, b))):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, 0.3 * mean_of_means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * mean_of_vars, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("vbs", [8, 9, 100])
@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 4, 4)])
def test_ghost_with_virtual_batch_at_least_n_equals_batchnorm(vbs, shape):
    ghost = bn.GhostBatchNorm(3, vbs, dtype=F64)
    ref = torch.nn.BatchNorm1d(3, dtype=F64) if len(shape) == 2 else torch.nn.BatchNorm2d(3, dtype=F64)
    for _ in range(2):
        x = torch.randn(shape, dtype=F64).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y1, y2 = ghost(x), ref(x2)
        torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
        for g1, g2 in zip(_grads(y1, (x, ghost.weight)), _grads(y2, (x2, ref.weight))):
            torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)


def test_ghost_eval_uses_running_stats_without_virtual_batches():
    ghost = bn.GhostBatchNorm(3, 2)
    for _ in range(3):
        ghost(torch.randn(8, 3, 5) * 2 + 1)
    ghost.eval()
    x = torch.randn(8, 3, 5)
    expected = torch.nn.functional.batch_norm(x, ghost.running_mean, ghost.running_var, ghost.weight, ghost.bias, False)
    torch.testing.assert_close(ghost(x), expected)
    # a sample's output does not depend on its neighbours at inference (TF #23050 is the opposite)
    torch.testing.assert_close(ghost(x[:1]), expected[:1])
    whole = bn.GhostBatchNorm(3, 2, track_running_stats=False).eval()
    torch.testing.assert_close(whole(x), torch.nn.functional.batch_norm(x, None, None, training=True))


def test_ghost_nonfinite_virtual_batch_leaves_running_estimates_unchanged():
    ghost = bn.GhostBatchNorm(2, 2)
    ghost(torch.randn(6, 2))
    before = {k: v.clone() for k, v in ghost.state_dict().items() if k != "weight" and k != "bias"}
    x = torch.randn(6, 2)
    x[5, 1] = float("inf")  # only the last virtual batch is bad
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = ghost(x)
    assert all(torch.equal(before[k], ghost.state_dict()[k]) for k in before)
    assert torch.isfinite(y[:4]).all()  # the other virtual batches are normalized as usual


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 9),
    vbs=st.integers(2, 6),
    c=st.integers(1, 3),
    length=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_ghost_property_each_virtual_batch_is_the_textbook_algorithm(n, vbs, c, length, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=g, dtype=F64) * 5
    last = n - (math.ceil(n / vbs) - 1) * vbs
    if last * length < 2:
        return  # refused by design (tested in the error table)
    y = bn.GhostBatchNorm(c, vbs, dtype=F64)(x).detach().numpy()
    for start in range(0, n, vbs):
        ref = reference.forward_train(x[start : start + vbs].numpy(), eps=1e-5, axis=1)[0]
        np.testing.assert_allclose(y[start : start + vbs], ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# FrozenBatchNorm
# ---------------------------------------------------------------------------------------------
def _spatial(cls) -> list[int]:
    return {torch.nn.BatchNorm1d: [], torch.nn.BatchNorm2d: [3, 3], torch.nn.BatchNorm3d: [2, 3, 3]}[cls]


def _trained_torch_bn(cls, c, affine=True):
    layer = cls(c, affine=affine)
    for _ in range(3):
        layer(torch.randn(4, c, *_spatial(cls)) * 3 + 2)
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    return layer.eval()


@pytest.mark.parametrize("cls", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_frozen_equals_eval_batchnorm(cls, requires_grad):
    ref = _trained_torch_bn(cls, 4)
    frozen = bn.FrozenBatchNorm(4)
    frozen.load_state_dict(ref.state_dict())
    frozen.train()  # training mode changes nothing
    x = torch.randn(2, 4, *_spatial(cls)).requires_grad_(requires_grad)
    x2 = x.detach().clone().requires_grad_(requires_grad)
    y, y2 = frozen(x), ref(x2)
    torch.testing.assert_close(y, y2)
    assert y.requires_grad == requires_grad
    if requires_grad:
        torch.testing.assert_close(_grads(y, (x,))[0], _grads(y2, (x2,))[0])
    assert list(frozen.parameters()) == []
    assert torch.equal(frozen.running_mean, ref.running_mean)


def test_frozen_from_batchnorm_and_affine_false_checkpoints():
    ref = _trained_torch_bn(torch.nn.BatchNorm2d, 3, affine=False)
    x = torch.randn(2, 3, 4, 4)
    a = bn.FrozenBatchNorm(3)
    a.load_state_dict(ref.state_dict())
    torch.testing.assert_close(a(x), ref(x))
    nobias = torch.nn.BatchNorm2d(3, bias=False)
    nobias(torch.randn(4, 3, 2, 2) * 2 + 1)
    with torch.no_grad():
        nobias.weight.uniform_(0.5, 1.5)
    b = bn.FrozenBatchNorm(3)
    b.load_state_dict(nobias.state_dict())
    torch.testing.assert_close(b(x), nobias.eval()(x))
    torch.testing.assert_close(bn.FrozenBatchNorm.from_batchnorm(ref)(x), ref(x))
    ours = bn.BatchNorm(3, axis=-1, eps=1e-3)
    ours(torch.randn(5, 7, 3))
    frozen = bn.FrozenBatchNorm.from_batchnorm(ours)
    assert frozen.axis == -1 and frozen.eps == 1e-3
    z = torch.randn(2, 7, 3)
    torch.testing.assert_close(frozen(z), ours.eval()(z))
    with pytest.raises(ValueError, match="expected a batch-norm layer with running estimates"):
        bn.FrozenBatchNorm.from_batchnorm(torch.nn.BatchNorm1d(3, track_running_stats=False))


# ---------------------------------------------------------------------------------------------
# AffineOnly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis,masked", SHAPES)
def test_affine_only_is_gamma_x_plus_beta(shape, axis, masked):
    c = shape[axis]
    layer = bn.AffineOnly(c, axis=axis, dtype=F64)
    with torch.no_grad():
        layer.weight.uniform_(-2, 2)
        layer.bias.uniform_(-1, 1)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    view = [1] * len(shape)
    view[axis] = c
    expected = x * layer.weight.reshape(view) + layer.bias.reshape(view)
    y = layer(x, mask=_mask_for(shape, axis, masked))
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)
    for g1, g2 in zip(_grads(y, (x, layer.weight, layer.bias)), _grads(expected, (x, layer.weight, layer.bias))):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    assert set(layer.state_dict()) == {"weight", "bias"}


# ---------------------------------------------------------------------------------------------
# Standardizer
# ---------------------------------------------------------------------------------------------
def _wine() -> np.ndarray:
    return load_wine().data  # (178, 13), features from 0.1 to 1680: very different scales


def _chunks(x: torch.Tensor, size: int):
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


@pytest.mark.parametrize("chunk", [1, 2, 50, 178, 178 + 42])
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_standardizer_matches_sklearn_whatever_the_chunking(chunk, offset):
    data = _wine() + offset
    sk = StandardScaler().fit(data)
    x = torch.as_tensor(data)
    s = bn.Standardizer(13).fit(_chunks(x, chunk))
    assert s.count.tolist() == [float(sk.n_samples_seen_)] * 13
    np.testing.assert_allclose(s.mean.numpy(), sk.mean_, rtol=1e-6)
    np.testing.assert_allclose(s.var.numpy(), sk.var_, rtol=1e-6)
    np.testing.assert_allclose(s.scale.numpy(), sk.scale_, rtol=1e-6)
    np.testing.assert_allclose(s(x).numpy(), sk.transform(data), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_mean,with_std", [(True, True), (False, True), (True, False), (False, False)])
def test_standardizer_options_match_sklearn(with_mean, with_std):
    data = _wine()
    sk = StandardScaler(with_mean=with_mean, with_std=with_std).fit(data)
    s = bn.Standardizer(13, with_mean=with_mean, with_std=with_std).fit(torch.as_tensor(data))
    out = s(torch.as_tensor(data)).numpy()
    np.testing.assert_allclose(out, sk.transform(data), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s.inverse_transform(torch.as_tensor(out)).numpy(), data, rtol=1e-9, atol=1e-9)


def test_standardizer_fits_a_dataloader_of_x_y_tuples_with_progress():
    data = _wine()
    sk = StandardScaler().fit(data)
    x = torch.as_tensor(data, dtype=torch.float32)
    y = torch.as_tensor(load_wine().target)
    s = bn.Standardizer(13).fit(DataLoader(TensorDataset(x, y), batch_size=17), progress=True)
    np.testing.assert_allclose(s.mean.numpy(), sk.mean_, rtol=1e-6)  # float32 data, float64 sums
    np.testing.assert_allclose(s.scale.numpy(), sk.scale_, rtol=1e-6)
    out = s(x)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), sk.transform(x.double().numpy()), rtol=1e-5, atol=1e-5)
    again = bn.Standardizer(13).fit(x)
    assert torch.equal(again.count, s.count)  # fit() resets: refitting does not double-count
    assert torch.equal(s.fit(x).count, again.count)


@pytest.mark.parametrize("constant", [0.0, 7.3, 0.1, -1e5])
@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_standardizer_constant_features_get_scale_one(constant, chunk):
    data = np.random.default_rng(0).normal(size=(40, 3)) * [1.0, 0.0, 5.0] + [0.0, constant, 2.0]
    sk = StandardScaler().fit(data)
    s = bn.Standardizer(3).fit(_chunks(torch.as_tensor(data), chunk))
    assert float(s.scale[1]) == 1.0 == sk.scale_[1]
    out = s(torch.as_tensor(data))
    assert torch.isfinite(out).all() and out[:, 1].abs().max() < 1e-9
    np.testing.assert_allclose(out.numpy(), sk.transform(data), rtol=1e-6, atol=1e-9)


def test_standardizer_state_dict_round_trip_and_resume():
    data = torch.as_tensor(_wine())
    s = bn.Standardizer(13).fit(data[:100])
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    loaded = bn.Standardizer(13)
    loaded.load_state_dict(torch.load(buf))
    assert set(loaded.state_dict()) == {"count", "mean", "m2"}
    assert all(t.dtype == F64 for t in loaded.state_dict().values())
    assert torch.equal(loaded(data), s(data))
    loaded.partial_fit(data[100:])  # the saved m2 lets fitting continue exactly
    full = bn.Standardizer(13).fit(data)
    torch.testing.assert_close(loaded.mean, full.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(loaded.m2, full.m2, rtol=1e-10, atol=0)


def test_standardizer_buffer_dtype_and_module_casts():
    data = torch.as_tensor(_wine())
    sk = StandardScaler().fit(data.numpy())
    s32 = bn.Standardizer(13, dtype=torch.float32).fit(_chunks(data, 7))
    assert s32.mean.dtype == torch.float32 and s32(data.float()).dtype == torch.float32
    np.testing.assert_allclose(s32.mean.double().numpy(), sk.mean_, rtol=1e-6)  # merged in float64, stored in float32
    np.testing.assert_allclose(s32.scale.numpy(), sk.scale_, rtol=1e-6)
    cast = bn.Standardizer(13).fit(data[:50]).float()  # a module cast casts the buffers, fitting still works
    cast.partial_fit(data[50:])
    np.testing.assert_allclose(cast.mean.double().numpy(), sk.mean_, rtol=1e-6)


def test_standardizer_inside_a_model_on_channels_last_sequences_with_mask():
    x = torch.randn(6, 9, 4, dtype=F64) * torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=F64) + 5
    lengths = torch.tensor([9, 3, 5, 9, 1, 7])
    mask = torch.arange(9) < lengths[:, None]
    s = bn.Standardizer(4, axis=-1).partial_fit(x[:3], mask=mask[:3]).partial_fit(x[3:], mask=mask[3:])
    rows = x[mask].numpy()  # only the valid steps
    sk = StandardScaler().fit(rows)
    np.testing.assert_allclose(s.mean.numpy(), sk.mean_, rtol=1e-9)
    np.testing.assert_allclose(s.scale.numpy(), sk.scale_, rtol=1e-9)
    model = torch.nn.Sequential(s, torch.nn.Linear(4, 2, dtype=F64))
    xin = x.clone().requires_grad_()
    model(xin).sum().backward()
    assert xin.grad is not None and torch.isfinite(xin.grad).all()
    torch.testing.assert_close(s(x)[mask], torch.as_tensor(sk.transform(rows)), rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    c=st.integers(1, 4),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    offset=st.sampled_from([0.0, -3.0, 1e4, 1e8]),
    seed=st.integers(0, 2**16),
)
def test_standardizer_property_any_chunk_boundaries_give_numpy_moments(n, c, cuts, offset, seed):
    data = np.random.default_rng(seed).normal(size=(n, c)) * np.linspace(0.1, 10, c) + offset
    bounds = sorted({0, n, *[k for k in cuts if k <= n]})
    s = bn.Standardizer(c).reset()
    for a, b in zip(bounds[:-1], bounds[1:]):
        s.partial_fit(torch.as_tensor(data[a:b]))
    assert s.count.tolist() == [float(n)] * c
    np.testing.assert_allclose(s.mean.numpy(), data.mean(0), rtol=1e-12, atol=1e-12 * (1 + abs(offset)))
    np.testing.assert_allclose(s.var.numpy(), data.var(0), rtol=1e-7, atol=1e-9)


def test_standardizer_large_offset_float32_stays_accurate():
    base = torch.randn(1000, 2, dtype=F64)
    x = (base + 1e6).float()
    s = bn.Standardizer(2).fit(x)
    sk = StandardScaler().fit(x.double().numpy())
    # one float32 rounding of the mean alone would be off by up to 0.03 std here
    np.testing.assert_allclose(s(x).double().numpy(), sk.transform(x.double().numpy()), rtol=1e-6, atol=1e-6)
    back = s.inverse_transform(s(x))
    torch.testing.assert_close(back, x, rtol=0, atol=0.0625)  # float32 spacing at 1e6 is 0.0625


# ---------------------------------------------------------------------------------------------
# every variant: ranks, axes, masks, dtypes, memory formats, gradcheck
# ---------------------------------------------------------------------------------------------
def _fitted_standardizer(c, axis, dtype):
    """Statistics of a fixed (10, C) sample (the same for every axis), loaded into a layer with ``axis``."""
    data = torch.randn(10, c, generator=torch.Generator().manual_seed(5), dtype=F64) * 2 + 1
    layer = bn.Standardizer(c, axis=axis)
    layer.load_state_dict(bn.Standardizer(c).fit(data).state_dict())
    return layer


VARIANTS = {
    "renorm": lambda c, axis, dtype: bn.BatchRenorm(c, axis=axis, momentum=0.0, r_max=1.5, d_max=0.5, dtype=dtype),
    "renorm_warmup": lambda c, axis, dtype: bn.BatchRenorm(c, axis=axis, momentum=0.0, warmup_steps=3, dtype=dtype),
    "ghost": lambda c, axis, dtype: bn.GhostBatchNorm(c, 2, axis=axis, momentum=0.0, dtype=dtype),
    "frozen": lambda c, axis, dtype: bn.FrozenBatchNorm(c, axis=axis, dtype=dtype),
    "affine": lambda c, axis, dtype: bn.AffineOnly(c, axis=axis, dtype=dtype),
    "standardizer": _fitted_standardizer,
}


def _perturb(layer):
    """Non-trivial state so parity checks mean something."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            t = getattr(layer, name, None)
            if t is not None:
                t.copy_(torch.linspace(0.5, 1.5, t.numel()) if name == "weight" else torch.linspace(-0.5, 0.5, t.numel()))
        if getattr(layer, "running_var", None) is not None:
            layer.running_mean.fill_(0.3)
            layer.running_var.fill_(2.0)
    return layer


RANK_AXIS = [((6, 3), 1), ((6, 3), -1), ((4, 3, 5), 1), ((4, 5, 3), -1), ((4, 3, 2, 3), 1), ((2, 4, 3, 2, 3), 2)]


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("shape,axis", RANK_AXIS)
def test_every_variant_any_rank_and_axis_matches_its_channels_first_form(name, shape, axis):
    """Moving the feature axis and flattening extra axes must not change what a variant computes."""
    c = shape[axis]
    layer = _perturb(VARIANTS[name](c, axis, torch.float64))
    flat = _perturb(VARIANTS[name](c, 1, torch.float64))
    x = torch.randn(shape, dtype=F64)
    moved = x.movedim(axis, 1)  # (N, C, *rest): same positions per feature, same rows
    ref = flat(moved).movedim(1, axis)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_variant_low_precision_returns_its_dtype_close_to_float64(name, dtype):
    x = torch.randn(8, 3, 4)
    layer = _perturb(VARIANTS[name](3, 1, torch.float32))
    ref = _perturb(VARIANTS[name](3, 1, torch.float64))
    y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(y.double(), ref(x.to(dtype).double()), rtol=tol, atol=tol)
    if hasattr(layer, "weight") and isinstance(layer.weight, torch.nn.Parameter):
        assert layer.weight.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_keeps_channels_last_memory_format(name):
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    y = _perturb(VARIANTS[name](3, 1, torch.float32))(x)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("masked", [False, True])
def test_every_variant_gradcheck_float64(name, masked):
    shape = (6, 3, 4)
    layer = _perturb(VARIANTS[name](3, 1, F64))
    if name.startswith("renorm"):
        # r and d are stop-gradient constants; finite differences see them move with x unless both
        # clamps bind, so put the running estimates far from the batch (the unclamped analytic
        # gradient is checked against the closed form above) and the warm-up clock past its end
        with torch.no_grad():
            layer.running_mean.copy_(torch.tensor([20.0, -500.0, 20.0], dtype=F64))
            layer.running_var.copy_(torch.tensor([1e-3, 1e3, 1e-3], dtype=F64))
            layer.num_batches_tracked.fill_(10**6)
    mask = _mask_for(shape, 1, masked)
    if mask is not None:
        mask[:, :2] = True  # every virtual batch keeps counted values
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    params = tuple(p for p in layer.parameters())
    torch.autograd.gradcheck(lambda inp, *ps: layer(inp, mask=mask), (x, *params))
    if name in ("renorm", "ghost"):
        torch.autograd.gradgradcheck(lambda inp, *ps: layer(inp, mask=mask), (x, *params))


# ---------------------------------------------------------------------------------------------
# errors: expected / got / what to do (issue item 6)
# ---------------------------------------------------------------------------------------------
ERRORS = [
    (lambda: bn.GhostBatchNorm(3, 1), ValueError, r"virtual_batch_size to be an int >= 2, got 1\. A virtual batch of one row"),
    (lambda: bn.GhostBatchNorm(3, 0), ValueError, r"virtual_batch_size to be an int >= 2, got 0"),
    (lambda: bn.GhostBatchNorm(3, True), ValueError, r"virtual_batch_size to be an int >= 2, got True"),
    (lambda: bn.GhostBatchNorm(3, 2.5), ValueError, r"virtual_batch_size to be an int >= 2, got 2\.5"),
    (lambda: bn.GhostBatchNorm(3, 4, axis=0), ValueError, r"feature axis cannot be axis 0, got axis=0\. Put the batch first"),
    (lambda: bn.GhostBatchNorm(3, 4, axis=-2)(torch.randn(3, 5)), ValueError, r"cannot be axis 0, got axis=-2 for input of shape \(3, 5\)"),
    (lambda: bn.GhostBatchNorm(3, 4)(torch.randn(9, 3)), ValueError,
     r"more than 1 value per feature in every virtual batch when training, got 1 in virtual batch 2 \(rows 8\.\.8 of 9, "
     r"virtual_batch_size=4\).*multiple of virtual_batch_size"),
    (lambda: bn.GhostBatchNorm(3, 2, axis=-1)(torch.randn(4, 2, 3), mask=torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]]).bool()),
     ValueError, r"got 1 \(counting only positions where mask is True\) in virtual batch 1 \(rows 2\.\.3 of 4"),
    (lambda: bn.BatchRenorm(3, r_max=0.5), ValueError, r"BatchRenorm expected r_max >= 1, got 0\.5\. r bounds"),
    (lambda: bn.BatchRenorm(3, r_max=float("nan")), ValueError, r"expected r_max >= 1, got nan"),
    (lambda: bn.BatchRenorm(3, d_max=-1.0), ValueError, r"BatchRenorm expected d_max >= 0, got -1\.0\. d bounds"),
    (lambda: bn.BatchRenorm(3, warmup_steps=-1), ValueError, r"warmup_steps to be an int >= 0, got -1"),
    (lambda: bn.BatchRenorm(3, r_max=math.inf, warmup_steps=5), ValueError, r"expected finite r_max and d_max with warmup_steps=5"),
    (lambda: bn.BatchRenorm(3)(torch.randn(1, 3)), ValueError,
     r"^BatchRenorm expected more than 1 value per feature when training, got 1 for input of shape \(1, 3\)\. "
     r"Statistics of one value are undefined\. Instead: call model\.eval\(\) to normalize with the running estimates, "
     r"use a larger batch, or use a batch-independent norm"),
    (lambda: bn.Standardizer(3)(torch.randn(4, 3)), ValueError, r"Standardizer: this Standardizer is not fitted yet.*Call \.fit\(data\)"),
    (lambda: bn.Standardizer(3).inverse_transform(torch.randn(4, 3)), ValueError, r"inverse_transform: this Standardizer is not fitted"),
    (lambda: bn.Standardizer(3).partial_fit(torch.tensor([[1.0, float("nan"), 2.0]] * 2)), ValueError,
     r"expected finite values, got NaN or Inf in feature\(s\) \[1\].*left unchanged"),
    (lambda: bn.Standardizer(3).fit([("a", 1)]), TypeError, r"expected item 0 of the data to be a tensor"),
    (lambda: bn.Standardizer(3).fit(3), TypeError, r"expected a tensor or an iterable"),
    (lambda: bn.Standardizer(3).fit(np.ones((4, 3))), TypeError, r"got ndarray\. Convert it with torch\.as_tensor\(data\)"),
    (lambda: bn.Standardizer(3, eps=-1), ValueError, r"eps to be a finite number >= 0, got -1"),
    (lambda: bn.Standardizer(3, dtype=torch.int64), TypeError, r"dtype to be a floating torch\.dtype.*got torch\.int64"),
    (lambda: bn.Standardizer(3).partial_fit(torch.randn(4, 5)), ValueError, r"Standardizer\.partial_fit expected 3 features along axis 1"),
    (lambda: bn.AffineOnly(3)(torch.randn(4, 5)), ValueError, r"AffineOnly expected 3 features along axis 1"),
    (lambda: bn.AffineOnly(3, axis=1.0), TypeError, r"axis must be an int, got float"),
    (lambda: bn.FrozenBatchNorm(3, axis="1"), TypeError, r"axis must be an int, got str"),
    (lambda: bn.FrozenBatchNorm(3).load_state_dict(torch.nn.BatchNorm1d(4).state_dict()), ValueError,
     r"FrozenBatchNorm\.load_state_dict: 'weight' has shape \(4,\).*expects \(3,\)"),
]


@pytest.mark.parametrize("call,exc,pattern", ERRORS)
def test_variant_errors_say_expected_got_and_fix(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_failed_partial_fit_and_refused_ghost_batch_change_nothing():
    s = bn.Standardizer(2).partial_fit(torch.randn(5, 2))
    before = {k: v.clone() for k, v in s.state_dict().items()}
    with pytest.raises(ValueError):
        s.partial_fit(torch.tensor([[float("inf"), 0.0], [1.0, 2.0]]))
    assert all(torch.equal(before[k], v) for k, v in s.state_dict().items())
    g = bn.GhostBatchNorm(2, 4)
    with pytest.raises(ValueError):
        g(torch.randn(5, 2))
    assert int(g.num_batches_tracked) == 0 and torch.equal(g.running_mean, torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# the core's parity harness (tests/harness.py): ranks 2-5, both axes, dtypes, channels-last, options
# ---------------------------------------------------------------------------------------------
# the full table is the core's (test_parity.py); here every third case keeps this file fast while
# still covering ranks 2-5, both axes, float32/float64/bfloat16, channels-last and the options
SOME_CASES = CASES[::3]


@pytest.mark.parametrize("case", SOME_CASES, ids=str)
def test_harness_renorm_with_rmax1_dmax0_is_torch_batchnorm(case):
    ours, ref = make_pair(case, bn.BatchRenorm, r_max=1.0, d_max=0.0)
    run_parity(ours, ref, case)


@pytest.mark.parametrize("case", CASES[1::3], ids=str)
def test_harness_ghost_with_one_virtual_batch_is_torch_batchnorm(case):
    ours, ref = make_pair(case, bn.GhostBatchNorm, virtual_batch_size=case.shape[0])
    run_parity(ours, ref, case)


class ChunkedTorchBN(torch.nn.Module):
    """Ghost BN by its definition: torch's batch_norm on each virtual batch, running estimates by hand."""

    def __init__(self, num_features, *, virtual_batch_size, eps, momentum, affine, track_running_stats, bias, dtype):
        super().__init__()
        self.vbs, self.eps, self.momentum, self.track = virtual_batch_size, eps, momentum, track_running_stats
        self.weight = torch.nn.Parameter(torch.ones(num_features, dtype=dtype)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(num_features, dtype=dtype)) if affine and bias else None
        self.running_mean = torch.zeros(num_features, dtype=dtype) if track_running_stats else None
        self.running_var = torch.ones(num_features, dtype=dtype) if track_running_stats else None
        self.num_batches_tracked = torch.tensor(0) if track_running_stats else None

    def forward(self, x):
        fbn = torch.nn.functional.batch_norm
        if not self.training:  # inference: running estimates, or the whole batch's statistics
            return fbn(x, self.running_mean, self.running_var, self.weight, self.bias, not self.track, 0.0, self.eps)
        chunks = x.split(self.vbs, 0)
        y = torch.cat([fbn(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks])
        if self.track:
            dims = [d for d in range(x.dim()) if d != 1]
            wide = [c.detach().to(torch.promote_types(x.dtype, torch.float32)) for c in chunks]
            mean = torch.stack([c.mean(dims) for c in wide]).mean(0)
            var = torch.stack([c.var(dims, unbiased=True) for c in wide]).mean(0)
            self.num_batches_tracked += 1
            f = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), f)
            self.running_var.lerp_(var.to(self.running_var.dtype), f)
        return y


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype != torch.bfloat16][::2], ids=str)
def test_harness_ghost_equals_chunked_torch_batchnorm(case):
    def ref_cls(c, **kw):
        return ChunkedTorchBN(c, virtual_batch_size=2, **kw)

    ours, ref = make_pair(case, bn.GhostBatchNorm, ref_cls=ref_cls, virtual_batch_size=2)
    mask = torch.ones([s for d, s in enumerate(case.shape) if d != case.axis % len(case.shape)], dtype=torch.bool)
    run_parity(ours, ref, case, forward_kwargs={"mask": mask})


# ------------------------------------------------------------------ kernel options on the variants
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
def test_ghost_batch_norm_fuses_the_activation(activation, backend):
    from batchnorm import GhostBatchNorm

    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, requires_grad=True)
    fused = GhostBatchNorm(3, 4, activation=activation, negative_slope=0.2)
    plain = GhostBatchNorm(3, 4)
    act = {None: lambda t: t, "relu": torch.relu, "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.2)}
    y1, y2 = fused(x), act[activation](plain(x))
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1.sum(), (x, fused.weight))
    g2 = torch.autograd.grad(y2.sum(), (x, plain.weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.running_var, plain.running_var)


def test_batch_renorm_memory_save_matches_default(backend):
    from batchnorm import BatchRenorm

    torch.manual_seed(1)
    x = torch.randn(12, 3, 5, dtype=torch.float64, requires_grad=True)
    layers = [BatchRenorm(3, activation="leaky_relu", memory=m, dtype=torch.float64) for m in ("save", "default")]
    for layer in layers:  # move the running estimates so that r, d differ from (1, 0)
        with torch.no_grad():
            layer.running_mean.fill_(0.3)
            layer.running_var.fill_(1.7)
    outs = [layer(x) for layer in layers]
    torch.testing.assert_close(outs[0], outs[1])
    grads = [torch.autograd.grad(o.pow(2).sum(), (x, layer.weight, layer.bias)) for o, layer in zip(outs, layers)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert "memory='save'" in repr(layers[0])


def test_variant_rejects_bad_kernel_option():
    from batchnorm import GhostBatchNorm

    with pytest.raises(ValueError, match="GhostBatchNorm: memory='save' recovers the normalized input"):
        GhostBatchNorm(3, 4, activation="relu", memory="save")
