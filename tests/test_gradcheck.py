"""Gradients: gradcheck/gradgradcheck in float64 (with and without masks, both axes, ghost groups),
and masked gradients against autograd through an independent plain-torch composition of the formula."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from batchnorm import BatchNorm, batch_norm
from batchnorm.functional import normalize

# (id, shape, axis, mask shape or None, mask fraction)
GRAD_CASES = [
    ("dense", (5, 3), 1, None),
    ("seq", (3, 2, 4), 1, None),
    ("seq-last", (3, 4, 2), -1, None),
    ("img", (2, 2, 3, 2), 1, None),
    ("vol-last", (2, 2, 2, 2, 2), -1, None),
    ("dense-mask", (6, 3), 1, (6,)),
    ("seq-mask", (3, 2, 4), 1, (3, 4)),
    ("seq-last-mask", (3, 4, 2), -1, (3, 4)),
    ("img-mask-bcast", (2, 2, 3, 2), 1, (2, 1, 1)),  # per-sample mask broadcast over H, W
]


def _mask(shape, seed=0):
    if shape is None:
        return None
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < 0.6
    m.view(-1)[:2] = True  # at least two counted values
    return m


def _inputs(shape, axis, affine=True):
    c = shape[axis]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(affine)
    b = torch.randn(c, dtype=torch.float64).requires_grad_(affine)
    return x, w, b


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name, shape, axis, mshape", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck_training(name, shape, axis, mshape, affine) -> None:
    x, w, b = _inputs(shape, axis)
    m = _mask(mshape)

    def f(x, w, b):
        return batch_norm(x, None, None, w if affine else None, b if affine else None, training=True, eps=1e-3,
                          axis=axis, mask=m)

    args = (x, w, b) if affine else (x,)
    fn = f if affine else (lambda x: f(x, None, None))
    assert gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, shape, axis, mshape", [GRAD_CASES[2], GRAD_CASES[7]], ids=["seq-last", "seq-last-mask"])
def test_gradcheck_every_backend(name, shape, axis, mshape, backend) -> None:
    """First-order gradcheck through each kernel path (the table above runs the default path only:
    gradcheck calls the kernels hundreds of times)."""
    x, w, b = _inputs(shape, axis)
    m = _mask(mshape)

    def f(x, w, b):
        return batch_norm(x, None, None, w, b, training=True, eps=1e-3, axis=axis, mask=m)

    assert gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("axis", [1, -1])
def test_gradcheck_layer_updates_and_eval(axis) -> None:
    """Through the module (running stats updated on every call) and in eval mode (a plain affine map)."""
    layer = BatchNorm(3, axis=axis, momentum=None).double()
    x = torch.randn((4, 3, 2) if axis == 1 else (4, 2, 3), dtype=torch.float64, requires_grad=True)
    assert gradcheck(layer, (x,), eps=1e-6, atol=1e-5)
    assert gradgradcheck(layer, (x,), eps=1e-6, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2)
    assert gradcheck(layer, (x,), eps=1e-6, atol=1e-5)
    assert gradgradcheck(layer, (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_ghost_groups() -> None:
    """group_size splits axis 0 into virtual batches (last one shorter): still exact gradients."""
    x, w, b = _inputs((7, 2, 3), 1)

    def f(x, w, b):
        return normalize(x, w, b, axis=1, eps=1e-3, use_batch_stats=True, group_size=3)

    assert gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)
    assert gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


def plain_masked_bn(x, w, b, mask, axis, eps):
    """The masked formula written independently with plain torch ops (autograd differentiates it).

    μ = Σ m·x / Σ m,  σ² = Σ m·(x − μ)² / Σ m  (over every axis but ``axis``),  y = w·(x − μ)/sqrt(σ² + eps) + b
    for every position (masked ones included).
    """
    xm = x.movedim(axis, -1)  # (..., C)
    mm = mask.to(x.dtype).unsqueeze(-1).expand_as(xm) if mask is not None else torch.ones_like(xm)
    flat_x, flat_m = xm.reshape(-1, xm.shape[-1]), mm.reshape(-1, xm.shape[-1])
    n = flat_m.sum(0)
    mu = (flat_x * flat_m).sum(0) / n
    var = (((flat_x - mu) ** 2) * flat_m).sum(0) / n
    y = (xm - mu) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w + b
    return y.movedim(-1, axis)


@pytest.mark.parametrize("name, shape, axis, mshape", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_masked_gradients_equal_plain_composition(name, shape, axis, mshape, backend) -> None:
    x, w, b = _inputs(shape, axis)
    m = _mask(mshape)
    full = None if m is None else m.expand(tuple(s for d, s in enumerate(shape) if d != axis % len(shape)))
    y = batch_norm(x, None, None, w, b, training=True, eps=1e-3, axis=axis, mask=m)
    x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y2 = plain_masked_bn(x2, w2, b2, full, axis % len(shape), 1e-3)
    torch.testing.assert_close(y, y2)
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    gx2, gw2, gb2 = torch.autograd.grad(y2, (x2, w2, b2), dy, create_graph=True)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gw, gw2)
    torch.testing.assert_close(gb, gb2)
    # second order: the gradient of a gradient penalty ‖∂L/∂x‖² w.r.t. x and γ
    hx, hw = torch.autograd.grad((gx**2).sum(), (x, w))
    hx2, hw2 = torch.autograd.grad((gx2**2).sum(), (x2, w2))
    torch.testing.assert_close(hx, hx2)
    torch.testing.assert_close(hw, hw2)


def test_masked_positions_do_not_move_the_statistics() -> None:
    """Changing x where the mask is False changes only those outputs, not any other output."""
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    mask = torch.arange(5) < torch.tensor([5, 3, 2])[:, None]
    y1 = batch_norm(x, None, None, training=True, mask=mask)
    x2 = x.clone()
    x2[~mask.unsqueeze(1).expand_as(x)] = 100.0
    y2 = batch_norm(x2, None, None, training=True, mask=mask)
    keep = mask.unsqueeze(1).expand_as(x)
    torch.testing.assert_close(y1[keep], y2[keep])
    assert not torch.allclose(y1[~keep], y2[~keep])


# the backward is analytic on every backend: our autograd Function, or ATen's own batch-norm backward
GRAD_FN = {"numba": "TrainNorm", "composite": "TrainNorm", "native": "NativeBatchNormBackward"}


def test_backward_is_analytic_not_a_traced_graph(backend) -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = BatchNorm(3)(x)
    assert GRAD_FN[backend] in type(y.grad_fn).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_grads_close_to_float64(dtype, backend) -> None:
    """Gradients in float32/bf16 agree with the float64 ones to the dtype's precision."""
    x64 = torch.randn(8, 3, 6, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x64)
    grads = {}
    for dt in (torch.float64, dtype):
        x = x64.to(dt).clone().requires_grad_(True)
        layer = BatchNorm(3).to(torch.float64 if dt == torch.float64 else torch.float32)
        layer(x).backward(dy.to(dt))
        grads[dt] = (x.grad.double(), layer.weight.grad.double())
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for a, b in zip(grads[dtype], grads[torch.float64]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


FUNC_CASES = [((6, 3), 1), ((3, 3, 4), 1), ((3, 4, 3), -1), ((2, 3, 2, 3), 1)]


@pytest.mark.parametrize("shape, axis", FUNC_CASES)
def test_torch_func_transforms_match_torch(shape, axis) -> None:
    """torch.func.grad / jacrev / vmap work in training mode (batch statistics), as with torch's layer."""
    from torch.func import functional_call, grad, jacrev, vmap

    c = shape[axis]
    ours = BatchNorm(c, axis=axis, track_running_stats=False).double()
    ref = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)](
        c, track_running_stats=False, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    to_ref = (lambda t: t.movedim(axis, 1)) if axis != 1 else (lambda t: t)
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def loss(p, module, inp):
        return functional_call(module, p, (inp,)).pow(3).sum()

    g, gr = grad(loss)(params, ours, x), grad(loss)(params, ref, to_ref(x))
    for k in params:
        torch.testing.assert_close(g[k], gr[k])
    def ref_ours_layout(t):  # torch's layer seen in our layout
        y = ref(to_ref(t))
        return y.movedim(1, axis) if axis != 1 else y

    gx = grad(lambda t: functional_call(ours, params, (t,)).pow(3).sum())(x)
    gxr = grad(lambda t: ref_ours_layout(t).pow(3).sum())(x)
    torch.testing.assert_close(gx, gxr)
    torch.testing.assert_close(jacrev(ours)(x[:2]), jacrev(ref_ours_layout)(x[:2]))
    xs = torch.stack([x, x * 3 - 1])
    torch.testing.assert_close(vmap(ours)(xs), vmap(ref_ours_layout)(xs))


@pytest.mark.parametrize("shape, axis", [((6, 3), 1), ((3, 3, 4), 1), ((3, 4, 3), -1), ((2, 3, 2, 3), 1)])
def test_gradient_penalty_matches_torch(shape, axis, backend) -> None:
    """A WGAN-GP style penalty ‖∂L/∂x‖² differentiated w.r.t. x, γ and β: same numbers as torch's layer."""
    c = shape[axis]
    ours = BatchNorm(c, axis=axis).double()
    ref = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)](c).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
        ours.weight.copy_(ref.weight)
        ours.bias.copy_(ref.bias)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    results = []
    for module, inp in ((ours, x), (ref, x.movedim(axis, 1))):
        xi = inp.clone().requires_grad_(True)
        out = module(xi)
        (gx,) = torch.autograd.grad(out.pow(3).sum(), xi, create_graph=True)
        grads = torch.autograd.grad(gx.pow(2).sum(), (xi, module.weight, module.bias))
        results.append((grads[0].movedim(1, axis) if module is ref else grads[0], grads[1], grads[2]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
