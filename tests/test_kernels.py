"""Kernel paths: numba kernels against the torch path, fused activations, memory="save", dispatch.

Kernel-level cases compare :mod:`batchnorm.kernels.numba` with :mod:`batchnorm.kernels.torch_ops`
(the reference implementation) for every layout strategy, dtype, mask, ghost grouping and
activation; layer-level cases compare ``BatchNorm(activation=...)`` with ``torch.nn.BatchNorm*d``
followed by the activation, on every available backend.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm import functional as Fn
from batchnorm.kernels import dispatch
from batchnorm.kernels import torch_ops as T
from batchnorm.kernels.backend import Settings

numba_missing = "numba" not in dispatch.available()
needs_numba = pytest.mark.skipif(numba_missing, reason="numba is not installed")
if not numba_missing:
    from batchnorm.kernels.numba import calls as cpu

ACTS = [None, "relu", "leaky_relu", "silu", "gelu", "sigmoid", "tanh", "relu6"]
REF_ACT = {
    None: lambda z: z,
    "identity": lambda z: z,
    "relu": torch.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.2),
    "silu": F.silu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu6": F.relu6,
}

# (shape, axis, layout, group_size): layout "contig", "cl" (channels-last) or "perm" (a permuted view)
LAYOUTS = [
    ((6, 5, 4, 7), 1, "contig", None),  # NCHW: B > 1 loops
    ((6, 5, 4, 7), 1, "cl", None),  # channels-last: B == 1 loops
    ((40, 9), 1, "contig", None),  # dense (N, C)
    ((5, 7, 6), 2, "contig", None),  # (N, L, C), axis=-1
    ((5, 6, 7), 1, "perm", None),  # (N, C, L) stored as (N, L, C)
    ((8, 5, 4, 7), 1, "contig", 3),  # ghost groups of 3 samples (last group shorter)
    ((8, 5, 4, 7), 1, "cl", 2),
    ((9, 6, 5), 2, "contig", 4),
]


def _make(shape, layout, dtype, offset=3.0):
    x = torch.randn(shape, dtype=dtype) * 2 + offset
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "perm":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def _mask(shape, axis, masked):
    if not masked:
        return None
    m = torch.rand(*[s if d != axis else 1 for d, s in enumerate(shape)]) > 0.3
    m.view(-1)[:2] = True  # never empty
    return m


def every_layout(test):
    """Run ``test`` over every loop strategy / layout / grouping, with and without a mask, in f32 and f64."""
    test = pytest.mark.parametrize("shape,axis,layout,group_size", LAYOUTS, ids=str)(test)
    test = pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])(test)
    return pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)(test)


def _close(a, b, dtype, scale=1.0):
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-10, 1e-12)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)


@needs_numba
@every_layout
def test_reduce_and_apply_match_torch_path(shape, axis, layout, group_size, masked, dtype):
    x = _make(shape, layout, dtype)
    m = _mask(shape, axis, masked)
    s = Settings(axis, group_size=group_size)
    ours = cpu.reduce(x, s, m)
    ref = T.reduce(x, s, m)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        _close(a, b, dtype, scale=float(b.abs().max()) + 1)
    G, C = ref[1].shape
    scale, shift = torch.randn(G, C, dtype=ref[1].dtype), torch.randn(G, C, dtype=ref[1].dtype)
    for act in ACTS:
        sa = s.replace(activation=act, negative_slope=0.2)
        y = cpu.apply(x, sa, scale, shift)
        assert y.stride() == x.stride() and y.dtype == x.dtype
        _close(y, T.apply(x, sa, scale, shift), dtype, scale=10)


@needs_numba
@every_layout
def test_backward_kernels_match_torch_path(shape, axis, layout, group_size, masked, dtype):
    x = _make(shape, layout, dtype)
    m = _mask(shape, axis, masked)
    dy = torch.randn(shape, dtype=dtype)  # contiguous even when x is not: the kernels must realign it
    _, mean, m2 = T.reduce(x, Settings(axis, group_size=group_size), m)
    G, C = mean.shape
    invstd = torch.rsqrt(m2 / 10 + 1e-3)
    kz, bz = torch.randn(G, C, dtype=mean.dtype), torch.randn(G, C, dtype=mean.dtype)
    k, m1, m2b = (torch.randn(G, C, dtype=mean.dtype) for _ in range(3))
    cases = [(act, False) for act in ACTS] + [(None, True), ("leaky_relu", True)]
    for act, save in cases:
        s = Settings(axis, group_size=group_size, activation=act, negative_slope=0.2, save=save)
        t = T.apply(x, s, kz * invstd, bz - mean * kz * invstd) if save else x
        p, q = (bz, 1 / kz) if save else (mean, invstd)
        ours = cpu.backward_reduce(dy, t, s, p, q, kz, bz)
        ref = T.backward_reduce(dy, t, s, p, q, kz, bz)
        for a, b in zip(ours, ref):
            _close(a, b, dtype, scale=float(b.abs().max()) + 1)
        dx = cpu.backward_apply(dy, t, s, p, q, k, m1, m2b, m, kz, bz)
        assert dx.stride() == x.stride()
        _close(dx, T.backward_apply(dy, t, s, p, q, k, m1, m2b, m, kz, bz), dtype, scale=10)


LAYER_CASES = [
    # (shape, axis, channels_last)
    ((8, 4, 5, 5), 1, False),
    ((8, 4, 5, 5), 1, True),
    ((16, 6), 1, False),
    ((4, 7, 3), -1, False),
]


def _ref_layer(c, rank):
    return torch.nn.BatchNorm1d(c) if rank <= 3 else torch.nn.BatchNorm2d(c)


@pytest.mark.parametrize("activation", ACTS + ["identity"], ids=str)
@pytest.mark.parametrize("shape,axis,channels_last", LAYER_CASES, ids=str)
def test_fused_activation_matches_torch_bn_then_activation(shape, axis, channels_last, activation, backend):
    x = torch.randn(shape) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[axis]
    ours = batchnorm.BatchNorm(c, axis=axis, activation=activation, negative_slope=0.2)
    ref = _ref_layer(c, len(shape))
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(xo)
    yr = REF_ACT[activation](ref(xr.movedim(axis, 1))).movedim(1, axis)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), REF_ACT[activation](ref(x.movedim(axis, 1))).movedim(1, axis),
                               rtol=1e-4, atol=2e-5)


GRAD_CASES = [
    # (activation, memory, masked, group_size, layout)
    (None, "default", False, None, "contig"),
    (None, "default", True, 2, "cl"),
    ("relu", "default", True, None, "contig"),
    ("leaky_relu", "default", False, 2, "cl"),
    ("silu", "default", True, 2, "contig"),
    ("gelu", "default", False, None, "cl"),
    ("tanh", "default", False, None, "contig"),
    ("sigmoid", "default", False, None, "cl"),
    (None, "save", False, None, "cl"),
    ("leaky_relu", "save", True, None, "contig"),
    ("leaky_relu", "save", False, 2, "cl"),
]


@pytest.mark.parametrize("activation,memory,masked,group_size,layout", GRAD_CASES, ids=str)
def test_gradcheck_float64(activation, memory, masked, group_size, layout, backend):
    shape = (4, 2, 3, 3)
    x = _make(shape, layout, torch.float64, offset=0.5).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).requires_grad_()
    m = _mask(shape, 1, masked)
    m = m.squeeze(1) if m is not None else None  # the public mask has no feature axis

    def f(x, w, b):
        return Fn.normalize(x, w, b, axis=1, eps=1e-5, use_batch_stats=True, mask=m, group_size=group_size,
                            activation=activation, negative_slope=0.3, memory=memory)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("activation", [None, "leaky_relu"], ids=str)
def test_memory_save_equals_default_and_keeps_only_the_output(activation, backend):
    x = torch.randn(8, 6, 5, 5, requires_grad=True)
    layers = {mem: batchnorm.BatchNorm(6, activation=activation, memory=mem) for mem in ("default", "save")}
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(torch.linspace(-2, 2, 6))  # negative, small and positive γ
    saved, grads, outs = {}, {}, {}
    for mem, layer in layers.items():
        ptrs: list[int] = []

        def pack(t, ptrs=ptrs):
            ptrs.append(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        saved[mem] = ptrs
        outs[mem] = y
        x.grad = None
        y.backward(torch.ones_like(y) + torch.arange(y.numel()).reshape(y.shape) % 7)
        grads[mem] = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    torch.testing.assert_close(outs["save"], outs["default"])
    for a, b in zip(grads["save"], grads["default"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    x_ptr = x.untyped_storage().data_ptr()
    assert x_ptr in saved["default"]
    assert x_ptr not in saved["save"]
    assert outs["save"].untyped_storage().data_ptr() in saved["save"]


def test_memory_save_saved_bytes_about_half_of_torch_bn_leaky_relu(backend):
    from batchnorm.bench import saved_bytes

    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    big, vec = x.numel() * x.element_size(), 16 * 4
    ours_m = batchnorm.BatchNorm(16, activation="leaky_relu", memory="save", backend=backend)
    ref_m = torch.nn.BatchNorm2d(16)
    post = lambda t: F.leaky_relu(t, 0.01)  # noqa: E731
    # torch keeps two x-sized tensors (BN input, leaky_relu input), its batch mean and invstd, and
    # references to γ and both running buffers; we keep the output, invstd and references to γ, β
    assert saved_bytes(ours_m, x) == big + 3 * vec
    assert saved_bytes(ref_m, x, post=post) == 2 * big + 5 * vec
    ours, ref = saved_bytes(ours_m, x, exclude_state=True), saved_bytes(ref_m, x, post=post, exclude_state=True)
    assert (ours, ref) == (big + vec, 2 * big + 2 * vec)
    assert ours / ref <= 0.5


def test_memory_save_zero_gamma_uses_eps_and_stays_finite(backend):
    eps = 1e-3
    x = torch.randn(10, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.0, -1e-4, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    y = Fn.normalize(x, w, b, axis=1, eps=eps, use_batch_stats=True, activation="leaky_relu", memory="save")
    w_used = torch.tensor([eps, -eps, 2.0], dtype=torch.float64)  # |γ| < eps → ±eps, sign(0) = +1
    ref = F.leaky_relu(F.batch_norm(x, None, None, w_used, b, True, 0.1, eps), 0.01)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"activation": "relu", "memory": "save"}, ValueError, "must be invertible"),
        ({"activation": "silu", "memory": "save"}, ValueError, "must be invertible"),
        ({"activation": "leaky_relu", "negative_slope": 0.0, "memory": "save"}, ValueError, "negative_slope > 0"),
        ({"activation": "swish"}, ValueError, "activation to be one of"),
        ({"memory": "low"}, ValueError, "memory to be one of"),
        ({"activation": "relu", "negative_slope": "0.1"}, TypeError, "negative_slope to be a float"),
        ({"backend": "cuda"}, ValueError, "backend to be None or one of"),
    ],
    ids=str,
)
def test_bad_activation_or_memory_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        batchnorm.BatchNorm(4, **kwargs)


def test_double_backward_refused_in_memory_save_mode():
    x = torch.randn(6, 3, requires_grad=True)
    y = batchnorm.BatchNorm(3, activation="leaky_relu", memory="save")(x)
    with pytest.raises(NotImplementedError, match="memory='save'"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("activation", ["relu", "silu"], ids=str)
def test_double_backward_through_fused_activation(activation, backend):
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return Fn.normalize(x, w, None, axis=1, eps=1e-5, use_batch_stats=True, activation=activation)

    assert torch.autograd.gradgradcheck(f, (x, w))


# ------------------------------------------------------------------ numerics on the numba path
@needs_numba
@pytest.mark.parametrize("shape,axis,layout", [((64, 4, 8, 8), 1, "contig"), ((64, 4, 8, 8), 1, "cl"),
                                               ((4096, 3), 1, "contig")], ids=str)
def test_float32_large_offset_variance(shape, axis, layout):
    x = _make(shape, layout, torch.float64, offset=0.0) / 2 + 1e4
    count, mean, m2 = cpu.reduce(x.float(), Settings(axis), None)
    exact = x.var(dim=[d for d in range(x.dim()) if d != axis], unbiased=False)
    assert torch.allclose((m2[0] / count[0]).double(), exact, rtol=1e-3)


# ------------------------------------------------------------------ dispatch
S1 = Settings(axis=1)
DISPATCH_CASES = [
    # (tensor factory, forced backend, expected backend; numba is warm: BATCHNORM_WARMUP=off in conftest)
    (lambda: torch.randn(64, 64, 16, 16), "auto", "numba"),  # large: numba beats ATen (cost table)
    (lambda: torch.randn(4, 3), "auto", "native"),  # tiny plain call: ATen's fixed cost is lowest
    (lambda: torch.randn(4, 3), "numba", "numba"),
    (lambda: torch.randn(64, 64, 16, 16).half(), "numba", "composite"),  # unsupported dtype
    (lambda: torch.randn(64, 64, 16, 32)[..., ::2], "numba", "composite"),  # not dense
    (lambda: torch.randn(64, 64, 16, 16).to(memory_format=torch.channels_last), "auto", "native"),  # 4 MB cl
    (lambda: torch.randn(64, 64, 32, 64).to(memory_format=torch.channels_last), "auto", "numba"),  # 32 MB cl
    (lambda: torch.randn(64, 64, 16, 16), "torch", "composite"),  # the old name is an alias
    (lambda: torch.randn(64, 64, 16, 16), "native", "native"),
]


@needs_numba
@pytest.mark.parametrize("make,backend,expected", DISPATCH_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_dispatch_select(make, backend, expected):
    assert dispatch.select(make(), S1, backend=backend).name == expected


@needs_numba
def test_dispatch_env_variable_and_argument_precedence(monkeypatch):
    x = torch.randn(64, 64, 16, 16)
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    assert dispatch.select(x, S1).name == "composite"
    assert dispatch.select(x, S1, backend="numba").name == "numba"
    monkeypatch.setenv("BATCHNORM_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.select(x, S1)


def test_available_lists_every_backend_that_imports():
    try:
        import numba  # noqa: F401
    except ImportError:
        assert dispatch.available() == ["composite", "native"]
    else:
        assert dispatch.available() == ["numba", "composite", "native"]


@needs_numba
def test_strided_input_falls_back_and_matches(backend):
    base = torch.randn(12, 5, 6, 8)
    x = base[..., ::2]  # not dense in any order: the torch path handles it
    ours = batchnorm.BatchNorm(5, backend=backend)(x)
    ref = torch.nn.BatchNorm2d(5)(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)
    assert math.isclose(float(ours.detach().mean()), 0.0, abs_tol=1e-5)


@needs_numba
def test_eval_apply_keeps_gradients_to_parameters():
    bn = batchnorm.BatchNorm(8, activation="relu", backend="numba").eval()
    x = torch.randn(64, 8, 10, 10, requires_grad=True)
    bn(x).sum().backward()
    ref = torch.nn.BatchNorm2d(8).eval()
    xr = x.detach().clone().requires_grad_()
    torch.relu(ref(xr)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


@needs_numba
def test_process_where_numba_is_unsafe_takes_another_backend(monkeypatch):
    # a forked child where numba's parallel kernels could hang (kernels/safety.py decides) never selects numba
    from batchnorm.kernels import safety

    x = torch.randn(64, 64, 16, 16)
    monkeypatch.setattr(safety, "numba_usable", lambda: False)
    assert dispatch.select(x, S1, backend="numba").name == "composite"
    assert dispatch.select(x, S1).name == "native"


class _FixedCorrection(Fn.Combine):
    """A batch-renorm-like combine: constant r, d per feature (stop-gradient, as in batch renorm)."""

    def correction(self, mean, var):
        c = mean.shape[1]
        r = torch.linspace(0.5, 1.5, c, dtype=mean.dtype).reshape(1, c)
        d = torch.linspace(-0.3, 0.3, c, dtype=mean.dtype).reshape(1, c)
        return r, d


@pytest.mark.parametrize("activation", [None, "leaky_relu"], ids=str)
def test_memory_save_with_renorm_correction_matches_default(activation, backend):
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.5, -0.7, 0.9], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64, requires_grad=True)

    def f(mem):
        return Fn.normalize(x, w, b, axis=1, eps=1e-5, use_batch_stats=True, combine=_FixedCorrection(),
                            activation=activation, negative_slope=0.1, memory=mem)

    g = torch.randn(6, 3, 5, dtype=torch.float64)
    grads = {}
    for mem in ("default", "save"):
        y = f(mem)
        grads[mem] = (y.detach(), *torch.autograd.grad(y, (x, w, b), g))
    for a, c in zip(grads["save"], grads["default"]):
        torch.testing.assert_close(a, c)
    assert torch.autograd.gradcheck(lambda x, w, b: Fn.normalize(
        x, w, b, axis=1, eps=1e-5, use_batch_stats=True, combine=_FixedCorrection(), activation=activation,
        negative_slope=0.1, memory="save"), (x, w, b))
