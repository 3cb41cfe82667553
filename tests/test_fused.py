"""The numba path's one-call sequences, its in-kernel running update and its output-buffer cache.

``cpu.train_forward`` / ``cpu.train_backward`` (plain BN: reduce → statistics → apply in one kernel
call per direction) are compared with the general three steps on the torch path, for every loop
strategy, mask, ghost grouping, activation and memory mode; the in-kernel running update with
:func:`batchnorm.functional.update_running`; the buffer cache is checked never to hand out memory a
live tensor still uses.
"""

from __future__ import annotations

import gc

import pytest
import torch

from batchnorm import functional as Fn
from batchnorm.kernels import dispatch
from batchnorm.kernels import torch_ops as T
from batchnorm.kernels.backend import Settings

pytestmark = pytest.mark.skipif("numba" not in dispatch.available(), reason="numba is not installed")
if "numba" in dispatch.available():
    from batchnorm.kernels import buffers
    from batchnorm.kernels.numba import calls as cpu

from test_kernels import LAYOUTS, _close, _make, _mask, every_layout  # noqa: E402

ACTS = [None, "relu", "leaky_relu", "silu", "gelu", "tanh", "relu6"]


def _general(x, axis, m, group_size, w, b, eps, activation, slope, save):
    """Training forward through the torch path's three steps (the reference for the fused call)."""
    s = Settings(axis, eps, group_size, activation, slope)
    count, mean, m2 = T.reduce(x, s, m)
    var = m2 / count.clamp_min(1)
    invstd = torch.rsqrt(var + eps)
    kz, bz = Fn._affine(w, b, None, None, save, eps, mean)
    scale = kz * invstd
    y = T.apply(x, s, scale, bz - mean * scale)
    return y, count, mean, var, invstd


@every_layout
def test_train_forward_matches_three_torch_steps(shape, axis, layout, group_size, masked, dtype):
    x = _make(shape, layout, dtype)
    m = _mask(shape, axis, masked)
    c = shape[axis]
    w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    y, stats, invstd, finite = cpu.train_forward(x, Settings(axis, 1e-5, group_size, "leaky_relu", 0.2), m, w, b)
    want = _general(x, axis, m, group_size, w, b, 1e-5, "leaky_relu", 0.2, False)
    assert y.stride() == x.stride()  # output keeps the input's memory format
    for g, r in zip((y, stats[0], stats[1], stats[2], invstd), want):
        _close(g, r.expand_as(g), dtype)
    assert finite is None  # no running buffers given: nothing updated


@pytest.mark.parametrize("activation", ACTS, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape,axis,layout,group_size", LAYOUTS, ids=str)
def test_train_backward_matches_autograd_of_torch_path(shape, axis, layout, group_size, masked, activation):
    dtype = torch.float64
    x = _make(shape, layout, dtype).requires_grad_(True)
    m = _mask(shape, axis, masked)
    c = shape[axis]
    w = torch.randn(c, dtype=dtype, requires_grad=True)
    b = torch.randn(c, dtype=dtype, requires_grad=True)
    y = Fn._composite(x, w, b, m, axis, 1e-5, group_size, activation=activation, slope=0.2)
    dy = torch.randn_like(y)
    want = torch.autograd.grad(y, (x, w, b), dy)
    s = Settings(axis, 1e-5, group_size, activation, 0.2)
    _, stats, invstd, _ = cpu.train_forward(x.detach(), s, m, w, b)
    got = cpu.train_backward(dy, x.detach(), s, stats, invstd, w, b, None, m)
    for g, r in zip(got, want):
        _close(g, r, dtype)
    assert got[0].stride() == x.stride()


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (True, True, False)], ids=str)
def test_train_backward_returns_only_what_is_needed(needs):
    x = torch.randn(6, 4, 5)
    w, b = torch.ones(4), torch.zeros(4)
    _, stats, invstd, _ = cpu.train_forward(x, Settings(1), None, w, b)
    out = cpu.train_backward(torch.randn_like(x), x, Settings(1), stats, invstd, w, b, None, None, needs=needs)
    assert [o is not None for o in out] == list(needs)


def test_memory_save_backward_from_output_matches_default():
    x = torch.randn(10, 3, 6, dtype=torch.float64)
    w = torch.tensor([1.5, -0.7, 1e-9], dtype=torch.float64)  # the last |γ| < eps: used as +eps in both
    b = torch.randn(3, dtype=torch.float64)
    eps = 1e-3
    s = Settings(1, eps, activation="leaky_relu", negative_slope=0.1, save=True)
    y, stats, invstd, _ = cpu.train_forward(x, s, None, w, b)
    dy = torch.randn_like(y)
    from_y = cpu.train_backward(dy, y, s, None, invstd, w, b, stats[0][:, :1], None)
    w_used = torch.tensor([1.5, -0.7, eps], dtype=torch.float64)
    from_x = cpu.train_backward(dy, x, s.replace(save=False), stats, invstd, w_used, b, None, None)
    for a, r in zip(from_y, from_x):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_masked_positions_may_hold_nan_and_inf(layout):
    """Padding never reaches the statistics, even as the first position of a parallel segment."""
    x = _make((8, 3, 4, 5), layout, torch.float32)
    m = torch.rand(8, 1, 4, 5) > 0.4
    m[:, :, 0, 0] = False  # the first position of every row (and so of every segment) is padding
    m[0, 0, 1, 1] = True
    xp = x.clone()
    xp[~m.expand_as(x)] = float("nan")
    xp[:, 1][~m[:, 0]] = float("inf")
    y, stats, _, _ = cpu.train_forward(xp, Settings(1), m, None, None)
    want = _general(x, 1, m, None, None, None, 1e-5, None, 0.01, False)
    for g, r in zip(stats, want[1:4]):
        _close(g, r, torch.float32)
    assert torch.isfinite(y[m.expand_as(x)]).all()


RUNNING_CASES = [
    # (momentum, batch kind, buffer dtype)
    (0.1, "finite", torch.float32),
    (None, "finite", torch.float32),
    (0.3, "finite", torch.float64),
    (0.1, "nan", torch.float32),
    (None, "inf", torch.float32),
]


@pytest.mark.parametrize("momentum,kind,bdtype", RUNNING_CASES, ids=str)
@pytest.mark.parametrize("group_size", [None, 3])
def test_in_kernel_running_update_matches_functional_update_running(momentum, kind, bdtype, group_size):
    x = torch.randn(9, 4, 5) * 3 + 2
    if kind != "finite":
        x[2, 1, 3] = float(kind)
    rm, rv, nbt = torch.randn(4, dtype=bdtype), torch.rand(4, dtype=bdtype) + 0.5, torch.tensor(7)
    rm2, rv2, nbt2 = rm.clone(), rv.clone(), nbt.clone()
    _, (count, mean, var), _, finite = cpu.train_forward(x, Settings(1, group_size=group_size), None, None, None,
                                                         running=(rm, rv, nbt, momentum))
    ok = Fn.update_running(rm2, rv2, mean, var, count, momentum, nbt2)
    assert finite == bool(ok) == (kind == "finite")
    torch.testing.assert_close(rm, rm2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, rv2, rtol=1e-6, atol=1e-7)
    assert int(nbt) == int(nbt2) == (8 if kind == "finite" else 7)


@pytest.mark.parametrize("what", ["requires_grad", "half", "int_nbt", "no_nbt_cumulative"])
def test_buffers_the_kernel_cannot_take_are_left_to_the_caller(what):
    rm, rv, nbt, momentum = torch.zeros(4), torch.ones(4), torch.tensor(0), 0.1
    if what == "requires_grad":
        rm.requires_grad_(True)
    elif what == "half":
        rm, rv = rm.half(), rv.half()
    elif what == "int_nbt":
        nbt = torch.tensor(0, dtype=torch.int32)
    else:
        nbt, momentum = None, None
    before = (rm.detach().clone(), rv.clone())
    *_, finite = cpu.train_forward(torch.randn(8, 4), Settings(1), None, None, None, running=(rm, rv, nbt, momentum))
    assert finite is None  # not updated here: normalize() falls back to the torch update
    assert torch.equal(rm.detach(), before[0]) and torch.equal(rv, before[1])


def test_layer_updates_running_stats_once_per_step_on_numba_path():
    import batchnorm

    x = torch.randn(16, 3, 4) * 2 + 1
    ours, ref = batchnorm.BatchNorm(3, backend="numba"), torch.nn.BatchNorm1d(3)
    for _ in range(3):
        ours(x)
        ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 3


# ------------------------------------------------------------------ output-buffer cache
@pytest.fixture
def cache():
    old = buffers.cache_info()["limit_bytes"]
    buffers.set_limit(64 << 20)
    buffers.empty_cache()
    yield buffers
    buffers.set_limit(old)
    buffers.empty_cache()


def _big(shape=(8, 16, 64, 64)):  # 2 MiB of float32: above MIN_BYTES
    return torch.randn(shape)


def test_freed_output_buffer_is_reused_live_one_never(cache):
    x = _big()
    y1 = cpu.apply(x, Settings(1), torch.ones(1, 16), torch.zeros(1, 16))
    y2 = cpu.apply(x, Settings(1), torch.ones(1, 16), torch.zeros(1, 16))
    assert y1.data_ptr() != y2.data_ptr()  # both alive: distinct memory
    p1 = y1.data_ptr()
    before = cache.cache_info()["hits"]
    del y1
    gc.collect()
    y3 = cpu.apply(x, Settings(1), torch.ones(1, 16) * 2, torch.zeros(1, 16))
    assert y3.data_ptr() == p1 and cache.cache_info()["hits"] == before + 1
    torch.testing.assert_close(y3, 2 * x)
    torch.testing.assert_close(y2, x)  # the reuse did not touch the live tensor


def test_a_view_keeps_the_buffer_alive(cache):
    x = _big()
    y = cpu.apply(x, Settings(1), torch.ones(1, 16), torch.zeros(1, 16))
    view = y[1:3]
    ptr = y.data_ptr()
    del y
    gc.collect()
    z = cpu.apply(x, Settings(1), torch.ones(1, 16), torch.zeros(1, 16))
    assert z.data_ptr() != ptr
    torch.testing.assert_close(view, x[1:3])


def test_cache_limit_zero_gives_plain_tensors(cache):
    cache.set_limit(0)
    x = _big()
    y = cpu.apply(x, Settings(1), torch.ones(1, 16), torch.zeros(1, 16))
    del y
    gc.collect()
    assert cache.cache_info()["held_bytes"] == 0


def test_empty_cache_releases_free_buffers(cache):
    y = cpu.apply(_big(), Settings(1), torch.ones(1, 16), torch.zeros(1, 16))
    del y
    gc.collect()
    held = cache.cache_info()["held_bytes"]
    assert held >= 2 << 20
    assert cache.empty_cache() == held and cache.cache_info()["held_bytes"] == 0


def test_channels_last_output_from_cache_keeps_layout(cache):
    x = _big().contiguous(memory_format=torch.channels_last)
    y = cpu.apply(x, Settings(1), torch.ones(1, 16), torch.zeros(1, 16))
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride() == x.stride()


def test_bad_cache_settings_are_refused(cache, monkeypatch):
    with pytest.raises(ValueError, match="set_limit expected a byte count >= 0, got -1"):
        cache.set_limit(-1)
    monkeypatch.setenv("BATCHNORM_BUFFER_CACHE", "lots")
    with pytest.raises(ValueError, match="BATCHNORM_BUFFER_CACHE must be a number of bytes"):
        buffers._limit_from_env()


def test_gradient_exact_for_ambiguous_channels_last_layout(backend):
    """(N, C, H, 1) stored as (N, H, C, 1) with a contiguous grad_output: dx matches the float64 formula.

    (torch.nn.BatchNorm2d 2.13 on the CPU returns a wrong input gradient for this pair of layouts,
    so the reference here is the formula, not torch.)
    """
    import batchnorm

    torch.manual_seed(0)
    x = (torch.randn(16, 3, 17, 1) * 3 + 5).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert x.stride() == (51, 1, 3, 1)
    g = torch.randn(16, 3, 17, 1)
    (dx,) = torch.autograd.grad(batchnorm.BatchNorm(3)(x), (x,), g)
    xx = x.detach().double().requires_grad_(True)
    mu, var = xx.mean((0, 2, 3), keepdim=True), xx.var((0, 2, 3), unbiased=False, keepdim=True)
    (want,) = torch.autograd.grad((xx - mu) / torch.sqrt(var + 1e-5), (xx,), g.double())
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"], ids=str)
@pytest.mark.parametrize("bdtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,axis,layout,group_size", [c for c in LAYOUTS if c[3] is None], ids=str)
def test_eval_forward_matches_eval_scale_shift_then_apply(shape, axis, layout, group_size, bdtype, activation):
    x = _make(shape, layout, torch.float32)
    c = shape[axis]
    w, b = torch.randn(c), torch.randn(c)
    rm, rv = torch.randn(c, dtype=bdtype), torch.rand(c, dtype=bdtype) + 0.1
    s = Settings(axis, 1e-3, activation=activation)
    y = cpu.eval_forward(x, s, w, b, rm, rv)
    a, sh = Fn.eval_scale_shift(w, b, rm, rv, 1e-3, x.dtype)
    want = T.apply(x, s, a, sh)
    assert y.stride() == x.stride()
    _close(y, want, torch.float32)


def test_eval_forward_declines_buffers_it_cannot_take():
    x = torch.randn(8, 4)
    assert cpu.eval_forward(x, Settings(1), None, None, torch.zeros(4).half(), torch.ones(4).half()) is None


def test_eval_layer_without_grad_uses_one_call_and_matches_torch(backend):
    import batchnorm

    x = torch.randn(16, 5, 3, 3)
    ours, ref = batchnorm.BatchNorm(5).eval(), torch.nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
        ref.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(x), ref(x))
    y = ours(x.requires_grad_(True))  # grad enabled: the differentiable path still gives gradients
    y.sum().backward()
    assert x.grad is not None and ours.weight.grad is not None


def _numba_signatures() -> int:
    from numba.core.registry import CPUDispatcher

    from batchnorm.kernels.numba import fused, loops

    ds = [v for mod in (fused, loops) for v in vars(mod).values() if isinstance(v, CPUDispatcher)]
    return sum(len(d.signatures) for d in ds)


# (x shape, layout, dtype, how dy is made): dy kinds a training loop produces besides a dense tensor
ODD_DY_CASES = [
    ((8, 3), "contig", torch.float32, "sum"),  # y.sum().backward(): a scalar expanded, all strides zero
    ((4, 3, 5), "contig", torch.float64, "sum"),
    ((4, 3, 5), "contig", torch.float32, "mean"),
    ((4, 3, 5), "contig", torch.float32, "broadcast_row"),  # (1, C, L) expanded along the batch
    ((4, 3, 5, 2), "cl", torch.float32, "sum"),
    ((4, 3, 5), "contig", torch.float64, "transposed"),  # dense, other order than x
]


@pytest.mark.parametrize("shape,layout,dtype,kind", ODD_DY_CASES, ids=str)
def test_odd_dy_needs_no_new_kernel_signature_after_warm_up(shape, layout, dtype, kind):
    """After warm_up(), a zero-stride or otherwise non-dense dy reaches the kernels as the warmed array type.

    (Before, ``y.sum().backward()`` compiled a new numba signature in the caller's thread: seconds.)
    """
    from batchnorm.kernels.backend import Settings
    from batchnorm.kernels.numba import NUMBA, warm_up

    warm_up()
    x = _make(shape, layout, dtype)
    dense = torch.randn(shape, dtype=dtype)
    if kind == "sum":
        dy = torch.ones((), dtype=dtype).expand(shape)
    elif kind == "mean":
        dy = torch.full((), 1 / x.numel(), dtype=dtype).expand(shape)
    elif kind == "broadcast_row":
        dy = dense[:1].expand(shape)
    else:
        dy = dense.transpose(0, -1).contiguous().transpose(0, -1)
    s = Settings(1, activation="relu")
    w, b = torch.randn(shape[1], dtype=dtype), torch.randn(shape[1], dtype=dtype)
    _, stats, invstd, _ = NUMBA.train_forward(x, s, None, w, b)
    before = _numba_signatures()
    got = NUMBA.train_backward(dy, x, s, stats, invstd, w, b, None, None, (True, True, True))
    p, q = stats[1], invstd
    k = w.reshape(1, -1) * invstd
    sums = NUMBA.backward_reduce(dy, x, s, p, q, w.reshape(1, -1), b.reshape(1, -1))
    NUMBA.backward_apply(dy, x, s, p, q, k, sums[0] / stats[0], sums[1] / stats[0], None, w.reshape(1, -1),
                         b.reshape(1, -1))
    assert _numba_signatures() == before, "a dy layout compiled a new numba signature after warm_up()"
    want = NUMBA.train_backward(dy.contiguous(), x, s, stats, invstd, w, b, None, None, (True, True, True))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
