"""The "triton" backend, run on CPU tensors by Triton's interpreter (``TRITON_INTERPRET=1``), and its kernels
compiled ahead of time for a GPU that is not here.

Every case is checked against a float64 run of the same layer on the composite backend (plain torch ops), and
fp32 cases also against the numba backend: outputs, input/γ/β gradients, running statistics and
``num_batches_tracked`` after two training steps, then an eval forward. Tables: variants × NCHW float32,
layouts × three variants, dtypes × four variants. Then the non-finite batch, the 1e6-offset stability case,
tiny tiles (many tiles and splits, so the Chan merges run), the launches per training step, the device-side
flag and the compile command (sm_90, a subset, registers and spills from ptxas).

The interpreter is slow: shapes are tiny (C = 3, a few hundred values).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels module is first imported (triton reads it at @jit time)
pytest.importorskip("triton")

import batchnorm as bn  # noqa: E402
from batchnorm.kernels import dispatch  # noqa: E402
from batchnorm.kernels.backend import Settings  # noqa: E402
from batchnorm.kernels.composite import COMPOSITE  # noqa: E402
from batchnorm.kernels.triton import backend as TB  # noqa: E402
from batchnorm.kernels.triton import kernels as TK  # noqa: E402

if not TB.interpreting():  # imported before this module without the interpreter: rebuild the kernels with it
    importlib.reload(TK)
TRITON = TB.TRITON
HAS_NUMBA = "numba" in dispatch.available()
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _interpreter(triton_interpreter):
    """Triton's interpreter for every test here (tests/conftest.py restores the variable afterwards)."""


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Small tiles (32 positions, or 16 × 2 features when features are innermost), several tiles per program and
    several splits per feature, feature blocks of 2 in the finalize: every merge path runs."""
    monkeypatch.setitem(TB.TUNING, "outer", (32, 1))
    monkeypatch.setitem(TB.TUNING, "inner_small", (16, 2))
    monkeypatch.setitem(TB.TUNING, "inner", (16, 2))
    monkeypatch.setitem(TB.TUNING, "programs", 6)
    monkeypatch.setitem(TB.TUNING, "finalize", 2)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def _layer(kind: str, c: int, axis: int, backend: str) -> torch.nn.Module:
    o = dict(axis=axis, backend=backend)
    if kind in ("plain", "mask"):
        return bn.BatchNorm(c, **o)
    if kind == "momentum_none":
        return bn.BatchNorm(c, momentum=None, **o)
    if kind == "noaffine":
        return bn.BatchNorm(c, affine=False, **o)
    if kind in ("ghost", "masked_ghost"):
        return bn.GhostBatchNorm(c, virtual_batch_size=2, **o)
    if kind == "ghost_uneven":
        return bn.GhostBatchNorm(c, virtual_batch_size=4, **o)
    if kind == "renorm_warmup":  # the limits are 0-d tensors during the warm-up ramp
        return bn.BatchRenorm(c, warmup_steps=2, momentum=0.3, **o)
    if kind == "renorm":  # tight float limits: the clamps bind
        return bn.BatchRenorm(c, r_max=1.2, d_max=0.3, momentum=0.3, **o)
    if kind == "save":
        return bn.BatchNorm(c, activation="leaky_relu", negative_slope=0.2, memory="save", **o)
    if kind == "save_identity":
        return bn.BatchNorm(c, memory="save", **o)
    if kind == "ghost_save":
        return bn.GhostBatchNorm(c, virtual_batch_size=2, activation="leaky_relu", memory="save", **o)
    if kind.startswith("act_"):
        return bn.BatchNorm(c, activation=kind[4:], **o)
    raise KeyError(kind)


MASKED = {"mask", "masked_ghost"}
ACTIVATIONS = [a for a in bn.activations.TABLE if a != "identity"]
VARIANTS = ["plain", "momentum_none", "noaffine", "mask", "ghost", "ghost_uneven", "masked_ghost", "renorm",
            "renorm_warmup", "save", "save_identity", "ghost_save", *[f"act_{a}" for a in ACTIVATIONS]]

# name → (shape, feature axis, memory format or None)
LAYOUTS = {
    "NCHW": ((6, 3, 4, 5), 1, None),
    "channels_last": ((6, 3, 4, 5), 1, torch.channels_last),
    "channels_last_3d": ((4, 3, 2, 3, 4), 1, torch.channels_last_3d),
    "axis=-1": ((6, 5, 3), -1, None),
    "rank2": ((12, 3), 1, None),
    "rank3": ((6, 3, 7), 1, None),
    "rank5": ((3, 3, 2, 2, 3), 1, None),
}

# dtype → (atol, rtol) of outputs and input gradients against float64; statistics are float32 for the first three.
# float64: Triton's interpreter passes float scalars (eps, momentum) as float32 (compiled kernels take them as
# float64), so a relative 3e-8 of momentum reaches the running estimates and the eval output
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1.5e-2, 1e-2), torch.bfloat16: (8e-2, 4e-2), F64: (1e-7, 1e-7)}


def _data(shape, axis, fmt, kind, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ax = axis % len(shape)
    xs, dys, masks = [], [], []
    for k in range(steps):
        x = torch.randn(shape, generator=g, dtype=F64) * (1 + 0.5 * k) + (0.7 * k - 0.3)
        dy = torch.randn(shape, generator=g, dtype=F64)
        if fmt is not None:
            x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        xs.append(x)
        dys.append(dy)
        if kind in MASKED:
            mshape = tuple(s for d, s in enumerate(shape) if d != ax)
            m = torch.rand(mshape, generator=g) > 0.35
            m.view(-1)[:4] = True  # at least a few counted values in every group
            if shape[0] >= 2:
                m[1].view(-1)[:2] = True
            masks.append(m)
        else:
            masks.append(None)
    return xs, dys, masks


def _run(layer, xs, dys, masks, dtype):
    """Training steps (forward + backward), then an eval forward without autograd."""
    out = {}
    with torch.no_grad():
        for p in layer.parameters():  # γ away from 1 and β away from 0, the same for every backend
            p.copy_(torch.linspace(0.6, 1.4, p.numel()) if p is getattr(layer, "weight", None)
                    else torch.linspace(-0.5, 0.5, p.numel()))
    for k, (x, dy, m) in enumerate(zip(xs, dys, masks)):
        xi = x.to(dtype).requires_grad_(True)
        y = layer(xi, m) if m is not None else layer(xi)
        y.backward(dy.to(dtype))
        out[f"y{k}"], out[f"dx{k}"] = y.detach(), xi.grad
    for name, p in layer.named_parameters():
        out["d" + name] = p.grad
    for name in ("running_mean", "running_var"):
        out[name] = getattr(layer, name).clone()
    out["nbt"] = layer.num_batches_tracked.clone()
    layer.eval()
    with torch.no_grad():
        out["eval"] = layer(xs[0].to(dtype))
    return out


def _compare(got, ref, dtype, label):
    atol, rtol = TOL[dtype]
    assert got.keys() == ref.keys()
    for key, r in ref.items():
        g = got[key]
        if key == "nbt":
            assert int(g) == int(r), (label, key)
            continue
        assert g.shape == r.shape, (label, key)
        if key.startswith(("y", "dx", "eval")):
            assert g.dtype == dtype, (label, key, g.dtype)
            a, t = atol * max(1.0, float(r.abs().max())), rtol
        else:  # float32 parameters, buffers and their gradients (reduced in float32)
            a, t = (1e-5 if dtype == torch.float32 else atol) * max(1.0, float(r.abs().max())), 1e-4
        torch.testing.assert_close(g.double(), r.double(), atol=a, rtol=t, msg=lambda m, key=key: f"{label} {key}: {m}")


def _check_case(kind, layout, dtype, numba=False):
    shape, axis, fmt = LAYOUTS[layout]
    c = shape[axis]
    xs, dys, masks = _data(shape, axis, fmt, kind)
    layer = _layer(kind, c, axis, "triton")
    got = _run(layer.double() if dtype == F64 else layer, xs, dys, masks, dtype)
    # the reference: the same layer on plain torch ops in float64, fed the same (rounded) values
    ref = _run(_layer(kind, c, axis, "composite").double(), [x.to(dtype).double() for x in xs],
               [d.to(dtype).double() for d in dys], masks, F64)
    _compare(got, ref, dtype, f"{kind}/{layout}/{dtype}")
    if numba and HAS_NUMBA and dtype in (torch.float32, F64):
        nb = _layer(kind, c, axis, "numba")
        nb = _run(nb.double() if dtype == F64 else nb, xs, dys, masks, dtype)
        _compare(got, nb, dtype, f"{kind}/{layout}/{dtype} vs numba")
    return got


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------
def test_the_interpreter_makes_triton_available_and_forced_routes_reach_it(monkeypatch):
    assert TB.interpreting() and TB.available()
    assert "triton" in dispatch.available() and "triton" in dispatch.BACKENDS
    x = torch.randn(4, 3)
    s = Settings(axis=1)
    assert dispatch.select(x, s, backend="triton") is TRITON
    monkeypatch.setenv("BATCHNORM_BACKEND", "triton")
    assert dispatch.select(x, s) is TRITON
    assert bn.kernels.dispatch.chosen(bn.GhostBatchNorm(3, 2, backend="triton"), x) == "triton"


@pytest.mark.parametrize("label, x, s, expected", [
    ("empty", torch.randn(0, 3), Settings(axis=1), False),
    ("meta", torch.empty(4, 3, device="meta"), Settings(axis=1), False),
    ("int", torch.ones(4, 3, dtype=torch.int64), Settings(axis=1), False),
    ("ghost on the feature axis 0", torch.randn(4, 3), Settings(axis=0, group_size=2), False),
    ("no (O, C, I) view", torch.randn(4, 5, 6).transpose(1, 2), Settings(axis=0), False),
    ("transposed rows", torch.randn(3, 8).t(), Settings(axis=1), True),
    ("float16 channels-last", torch.randn(2, 3, 4, 4).half().to(memory_format=torch.channels_last), Settings(axis=1),
     True),
])
def test_supports_says_which_calls_the_kernels_take(label, x, s, expected):
    assert TRITON.supports(x, s) is expected, label
    if not expected:  # forced, such a call falls back to composite (which serves everything)
        assert dispatch.select(x, s, backend="triton") is COMPOSITE


def test_import_batchnorm_does_not_import_triton():
    code = "import sys, batchnorm, batchnorm.kernels.dispatch; assert 'triton' not in sys.modules, 'imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# parity tables
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", VARIANTS)
def test_every_variant_matches_float64_and_numba(kind):
    _check_case(kind, "NCHW", torch.float32, numba=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["plain", "masked_ghost", "act_silu"])
def test_every_layout(kind, layout):
    if kind == "masked_ghost" and layout in ("axis=-1", "rank2"):
        kind = "mask"  # (ghost groups of 2 rows with one value per row leave nothing to mask there)
    _check_case(kind, layout, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("kind, layout", [("plain", "NCHW"), ("masked_ghost", "channels_last"),
                                          ("save", "NCHW"), ("act_gelu", "axis=-1"), ("renorm", "NCHW")])
def test_every_dtype(kind, layout, dtype):
    got = _check_case(kind, layout, dtype)
    assert got["running_mean"].dtype == (F64 if dtype == F64 else torch.float32)


@pytest.mark.parametrize("kind, layout", [("plain", "NCHW"), ("masked_ghost", "NCHW"), ("ghost_uneven", "NCHW"),
                                          ("mask", "channels_last"), ("save", "channels_last_3d")])
def test_many_tiles_and_splits_merge_exactly(tiny_tiles, kind, layout):
    """Chan's merge within a program (tile by tile) and across splits, and the finalize's feature blocks
    (2 features each), give the statistics of the whole batch."""
    shape, axis, fmt = LAYOUTS[layout]
    x = torch.empty(shape) if fmt is None else torch.empty(shape).contiguous(memory_format=fmt)
    geo = TB._Geometry(x, Settings(axis=axis % len(shape)))
    assert geo.S > 1 and geo.tiles > 1, (geo.S, geo.tiles)
    _check_case(kind, layout, torch.float32)


# ---------------------------------------------------------------------------------------------
# primitives against torch_ops (the composite backend), with (G, C) and broadcast (1, C) operands
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group, masked, activation, save", [
    (None, False, None, False), (2, True, "tanh", False), (4, False, "relu6", False), (2, True, "leaky_relu", True),
])
def test_primitives_match_torch_ops(group, masked, activation, save):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 4, 5, generator=g, dtype=F64).float().to(memory_format=torch.channels_last)
    m = (torch.rand(6, 4, 5, generator=g) > 0.3).unsqueeze(1) if masked else None
    s = Settings(axis=1, group_size=group, activation=activation, save=save)
    got, ref = TRITON.reduce(x, s, m), COMPOSITE.reduce(x.double(), s, m)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    count, mean, m2 = ref
    gg = count.shape[0]
    scale, shift = torch.rand(gg, 3, generator=g, dtype=F64) + 0.5, torch.randn(gg, 3, generator=g, dtype=F64)
    y = TRITON.apply(x, s, scale.float(), shift.float())
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), COMPOSITE.apply(x.double(), s, scale, shift), atol=1e-5, rtol=1e-5)
    dy = torch.randn(x.shape, generator=g, dtype=F64).float()
    t = y if save else x
    p, q = mean, torch.rsqrt(m2 / count + 1e-5)
    zs, zb = torch.rand(1, 3, generator=g, dtype=F64) + 0.5, torch.randn(1, 3, generator=g, dtype=F64)
    args = (p, q, zs, zb)
    got = TRITON.backward_reduce(dy, t, s, *(a.float() for a in args))
    ref = COMPOSITE.backward_reduce(dy.double(), t.double(), s, *args)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    k = torch.rand(gg, 3, generator=g, dtype=F64)
    mdz, mdzx = ref[0] / count, ref[1] / count
    dx = TRITON.backward_apply(dy, t, s, p.float(), q.float(), k.float(), mdz.float(), mdzx.float(), m, zs.float(),
                               zb.float())
    ref_dx = COMPOSITE.backward_apply(dy.double(), t.double(), s, p, q, k, mdz, mdzx, m, zs, zb)
    torch.testing.assert_close(dx.double(), ref_dx, atol=1e-4, rtol=1e-4)


def test_update_running_matches_the_torch_rule():
    g = torch.Generator().manual_seed(2)
    mean, var = torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) + 0.1
    count = torch.tensor([[5.0], [5.0], [3.0]]).expand(3, 4)
    for momentum in (0.1, None):
        a = [torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5, torch.tensor(3)]
        b = [t.clone() for t in a]
        fa = TRITON.update_running(a[0], a[1], mean, var, count, momentum, a[2])
        fb = bn.functional.update_running(b[0], b[1], mean, var, count, momentum, b[2])
        assert fa.dtype == torch.bool and fa.shape == () and bool(fa) == bool(fb) is True
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])
        assert int(a[2]) == int(b[2]) == 4


# ---------------------------------------------------------------------------------------------
# the non-finite batch and numerical stability
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label, make, value, masked_out", [
    ("NaN", lambda: bn.BatchNorm(3, backend="triton"), float("nan"), False),
    ("Inf in a ghost group", lambda: bn.GhostBatchNorm(3, 2, backend="triton"), float("inf"), False),
    ("overflow of finite values", lambda: bn.BatchNorm(3, momentum=None, backend="triton"), 3e38, False),
    ("NaN where the mask is false counts for nothing", lambda: bn.BatchNorm(3, backend="triton"), float("nan"), True),
])
def test_a_non_finite_batch_leaves_the_running_estimates_alone(label, make, value, masked_out):
    layer = make()
    x = torch.randn(6, 3, 4)
    x[1, :, 2] = value
    if label.startswith("overflow"):
        x[0, :, 0] = -value
    mask = None
    if masked_out:
        mask = torch.ones(6, 4, dtype=torch.bool)
        mask[1, 2] = False
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x, mask) if mask is not None else layer(x)
    refused = [w for w in caught if issubclass(w.category, RuntimeWarning) and "not finite" in str(w.message)]
    if masked_out:
        assert not refused and int(layer.num_batches_tracked) == 1
        assert not torch.equal(layer.running_mean, rm)
        ref = bn.BatchNorm(3, backend="composite")
        ref(x, mask)
        torch.testing.assert_close(layer.running_var, ref.running_var)
    else:
        assert len(refused) == 1, label
        assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv)
        assert int(layer.num_batches_tracked) == 0


def test_the_finite_flag_is_a_device_tensor_and_no_host_read_happens():
    x = torch.randn(6, 3, 5)
    x[0, 0, 0] = float("nan")
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(7)
    y, stats, invstd, finite = TRITON.train_forward(x, Settings(axis=1), None, None, None, (rm, rv, nbt, None))
    assert isinstance(finite, torch.Tensor) and finite.dtype == torch.bool and finite.shape == ()
    assert finite.device == x.device and not bool(finite)
    assert int(nbt) == 7 and torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    assert stats.shape == (3, 1, 3) and invstd.shape == (1, 3)
    x[0, 0, 0] = 0.0
    *_, finite = TRITON.train_forward(x, Settings(axis=1), None, None, None, (rm, rv, nbt, None))
    assert bool(finite) and int(nbt) == 8
    torch.testing.assert_close(rm, x.mean((0, 2)) / 8)  # momentum=None: the cumulative weight 1/8


@pytest.mark.parametrize("tiles", ["default", "tiny"])
def test_offset_1e6_statistics_stay_accurate(monkeypatch, tiles, request):
    """Flax's stress: float32 data at 1e6 ± 1. Tiles shifted by one of their own values, merged by Chan's formula
    with the shifts subtracted first, keep the variance to 1e-5 relative (measured: 6e-8; the numba kernels'
    bound in test_numerics is 1e-2; E[x²] − E[x]² in float32 is off by more than 100%)."""
    if tiles == "tiny":
        request.getfixturevalue("tiny_tiles")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(128 if tiles == "default" else 32, 2, 32, generator=g, dtype=F64) + 1e6).float()
    var_t, mean_t = torch.var_mean(x.double(), dim=(0, 2), correction=0)
    monkeypatch.setenv("BATCHNORM_BACKEND", "triton")
    assert dispatch.select(x) is TRITON
    mean, var, count = bn.batch_stats(x)
    assert ((var.double() - var_t).abs() / var_t).max() < 1e-5
    assert ((mean.double() - mean_t).abs() / mean_t).max() < 1e-7
    assert torch.equal(count, torch.full((2,), float(x.shape[0] * 32)))


def test_layer_output_under_an_offset_of_1e6():
    x = (torch.randn(64, 3, 32, dtype=F64) + 1e6).float()
    layer = bn.BatchNorm(3, backend="triton")
    y = layer(x)
    y64 = bn.reference.forward_train(x.double().numpy(), axis=1)[0]
    torch.testing.assert_close(y.double(), torch.from_numpy(y64), atol=20 * 1e6 * 1.2e-7, rtol=0)
    var_y = bn.batch_stats(y)[1]
    torch.testing.assert_close(var_y, torch.ones(3), rtol=0.05, atol=0)


# ---------------------------------------------------------------------------------------------
# launches per training step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "momentum_none", "mask", "ghost", "masked_ghost", "save", "act_relu",
                                  "ghost_save", "renorm", "renorm_warmup"])
def test_launches_per_training_step(kind):
    """Every variant: 3 launches forward (partials, finalize with the running update — and for batch renorm r, d,
    the warm-up ramp and the backward's constants — apply) and 3 backward (partials, finalize, dx)."""
    xs, dys, masks = _data((6, 3, 4, 5), 1, None, kind, steps=1)
    layer = _layer(kind, 3, 1, "triton")
    x = xs[0].float().requires_grad_(True)
    before = TB.launch_count()
    y = layer(x, masks[0]) if masks[0] is not None else layer(x)
    forward = TB.launch_count() - before
    y.backward(dys[0].float())
    total = TB.launch_count() - before
    assert (forward, total) == (3, 6)
    layer.eval()
    before = TB.launch_count()
    with torch.no_grad():
        layer(x)
    assert TB.launch_count() - before == 1  # eval: one launch, the constants formed in the kernel


@pytest.mark.parametrize("limits", ["float", "tensor"])
@pytest.mark.parametrize("group, masked, save", [(None, False, False), (2, True, False), (None, False, True)])
def test_renorm_sequences_take_six_launches_and_match_the_combine(limits, group, masked, save):
    """``renorm_forward`` / ``renorm_backward``: r, d formed in the finalize from the running estimates before the
    update, the running update in the same launch; the reference is ``RenormCombine`` with the torch steps."""
    from batchnorm import functional as F
    from batchnorm.layers.renorm import RenormCombine

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 4, generator=g) * 2 + 1
    m = (torch.rand(6, 4, generator=g) > 0.3).unsqueeze(1) if masked else None
    w, b = torch.tensor([0.8, -1.2, 1e-7]), torch.tensor([0.1, 0.0, -0.4])
    s = Settings(axis=1, group_size=group, activation="leaky_relu" if save else None, save=save)
    rm, rv = torch.tensor([0.5, 1.5, -0.2]), torch.tensor([0.5, 4.0, 1.0])
    r_max, d_max = (1.3, 0.4) if limits == "float" else (torch.tensor(1.3), torch.tensor(0.4))
    ra, rb = [rm.clone(), rv.clone(), torch.tensor(2)], [rm.clone(), rv.clone(), torch.tensor(2)]
    before = TB.launch_count()
    y, stats, invstd, rd, finite = TRITON.renorm_forward(x, s, m, w, b, ra[0], ra[1], r_max, d_max,
                                                         (ra[0], ra[1], ra[2], 0.2))
    comb = RenormCombine(rb[0], rb[1], s.eps, r_max, d_max)
    y2, stats2, invstd2, r2, d2 = F._forward_steps(COMPOSITE, x, s, m, w, b, comb)
    COMPOSITE.update_running(rb[0], rb[1], stats2[1], stats2[2], stats2[0], 0.2, rb[2])
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rd[0], r2)
    torch.testing.assert_close(rd[1], d2)
    for a, c in zip(ra, rb):
        torch.testing.assert_close(a, c)
    assert bool(finite)
    dy = torch.randn(x.shape, generator=g)
    t = y if save else x
    count = stats[0][:, :1] if save else None
    got = TRITON.renorm_backward(dy, t, s, None if save else stats, invstd, w, b, count, m, (True, True, True), rd)
    assert TB.launch_count() - before == 6
    ref = F._backward_steps(COMPOSITE, dy, y2 if save else x, s, None if save else stats2, invstd2, w, b,
                            stats2[0][:, :1] if save else None, m, (True, True, True), comb, r2, d2)
    for a, c in zip(got, ref):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def _empty_rank(message: torch.Tensor) -> torch.Tensor:
    """The message of a rank with an empty batch (the composed route sends it): zeros, the same header, 0 positions."""
    out = torch.zeros_like(message)
    out[-6:] = message[-6:]
    out[-1] = 0
    return out


@pytest.mark.parametrize("masked, save", [(False, False), (True, False), (False, True)],
                         ids=["plain", "mask", "save"])
def test_sync_sequences_take_six_launches_and_merge_like_one_process(masked, save):
    """``sync_forward`` / ``sync_backward`` with a stand-in all-gather over three ranks: two with data (5 and 3 rows,
    their messages made by the same kernels) and an empty one (the composed route's message); outputs, input and
    parameter gradients and running statistics against one process on the concatenated batch; then a header that
    disagrees: NaN statistics, the buffers untouched, the record, kept (sticky) by a later good step."""
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(5, 3, 4, generator=g, dtype=F64) * 2 + 1, torch.randn(3, 3, 4, generator=g, dtype=F64) - 2]
    dys = [torch.randn(x.shape, generator=g, dtype=F64) for x in xs]
    ms = [(torch.rand(x.shape[0], 4, generator=g) > 0.3).unsqueeze(1) if masked else None for x in xs]
    w, b = torch.tensor([0.8, -1.2, 1.5], dtype=F64), torch.tensor([0.1, 0.0, -0.4], dtype=F64)
    s = Settings(axis=1, activation="leaky_relu" if save else None, negative_slope=0.25, save=save)
    bufs = [[torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), torch.tensor(0)] for _ in xs]
    headers = [(7, 0, 4, 20), (7, 0, 4, 12)]  # layer number, step, dtype code (float64), positions (may differ)
    world = 3

    def scratch():
        return torch.empty(2 + 6 * world, dtype=F64)

    def capture(box):
        def run(msg):
            box.append(msg.clone())
            return torch.stack([msg] * world)
        return run

    def forward(r, table_of, rec, sticky=False, running=None):
        return TRITON.sync_forward(xs[r], s, ms[r], w, b, running or (*bufs[r], 0.25), headers[r], table_of, rec,
                                   sticky, masked)

    def backward(r, out, table_of, rec, needs=(True, True, True)):
        y, stats, invstd, _, back = out
        return TRITON.sync_backward(dys[r], y if save else xs[r], s, None if save else stats, invstd, w, b,
                                    stats[0][:, :1] if save else None, ms[r], needs, back, table_of, rec, False)

    # every rank's message depends on its own data only: capture them (on copies of the buffers), then gather
    sent: list = []
    for r in range(2):
        forward(r, capture(sent), scratch(), running=(torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64),
                                                      torch.tensor(0), 0.25))
    table = torch.stack([sent[0], sent[1], _empty_rank(sent[0])])
    rec = scratch()
    before = TB.launch_count()
    outs = [forward(r, lambda msg: table, rec if r == 0 else scratch()) for r in range(2)]
    assert TB.launch_count() - before == 6 and rec[0] == 0 and rec[2:].view(3, 6)[:, 5].tolist() == [20, 12, 0]
    assert all(bool(o[3]) for o in outs)
    sums: list = []
    for r in range(2):
        backward(r, outs[r], capture(sums), scratch())
    back_table = torch.stack([sums[0], sums[1], _empty_rank(sums[0])])
    before = TB.launch_count()
    dx, dw, db = backward(0, outs[0], lambda msg: back_table, rec)
    assert TB.launch_count() - before == 3 and rec[0] == 0
    _, dw1, db1 = backward(1, outs[1], None, None, needs=(False, True, True))  # no input gradient: no gather
    # one process on the concatenated batch
    ref = bn.BatchNorm(3, momentum=0.25, activation=s.activation, negative_slope=0.25,
                       memory="save" if save else "default", backend="composite").double()
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    x = torch.cat(xs).requires_grad_(True)
    yr = ref(x, torch.cat(ms).squeeze(1)) if masked else ref(x)
    yr.backward(torch.cat(dys))
    tol = {"atol": 1e-7, "rtol": 1e-7}
    torch.testing.assert_close(outs[0][0], yr[:5].detach(), **tol)
    torch.testing.assert_close(outs[1][0], yr[5:].detach(), **tol)
    torch.testing.assert_close(dx, x.grad[:5], **tol)
    torch.testing.assert_close(dw + dw1, ref.weight.grad, **tol)  # parameter gradients stay local: their sum
    torch.testing.assert_close(db + db1, ref.bias.grad, **tol)
    for r in range(2):
        torch.testing.assert_close(bufs[r][0], ref.running_mean, **tol)
        torch.testing.assert_close(bufs[r][1], ref.running_var, **tol)
        assert int(bufs[r][2]) == 1
    # ranks out of step: the other rank's header carries another step
    skew = table.clone()
    skew[1, -4] += 1
    kept = [t.clone() for t in bufs[0]]
    y, stats, invstd, finite, back = forward(0, lambda msg: skew, rec)
    assert torch.isnan(y).all() and not bool(finite) and rec[0] == 1
    assert rec[2:].view(3, 6)[:, 2].tolist() == [0, 1, 0]
    for a, k in zip(bufs[0], kept):
        assert torch.equal(a, k)
    # sticky: a later good step keeps the fault not yet reported
    forward(0, lambda msg: table, rec, sticky=True)
    assert rec[0] == 1 and rec[2:].view(3, 6)[1, 2] == 1


@pytest.mark.parametrize("shape, fmt, axis", [((6, 5, 7, 9), None, 1), ((6, 5, 7, 9), torch.channels_last, 1),
                                              ((90, 7), None, 1), ((4, 6, 5), None, -1)],
                         ids=["NCHW", "channels_last", "NC", "axis=-1"])
def test_sync_last_program_merges_every_split_and_feature_block(tiny_tiles, shape, fmt, axis):
    """The message and the backward finalize are written by the last program of each feature block to finish
    (one atomic counter per block): with tiny tiles (several splits, several feature blocks) one rank's sync step,
    its own message as the gathered table, equals BatchNorm on the same batch; 3 + 3 launches; the lock words are
    0 again after each launch; the message's header and count are the rank's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=F64) * 3 + 1e3
    x = x if fmt is None else x.contiguous(memory_format=fmt)
    dy = torch.randn(x.shape, generator=g, dtype=F64)
    c = x.shape[axis]
    s = Settings(axis=axis % x.dim())
    geo = TB._Geometry(x, s)
    assert geo.S > 1 and geo.ncb > 1, (geo.S, geo.ncb)  # the cases reach both merges
    w = torch.linspace(0.5, 1.5, c, dtype=F64)
    b = torch.linspace(-0.2, 0.3, c, dtype=F64)
    bufs = (torch.zeros(c, dtype=F64), torch.ones(c, dtype=F64), torch.tensor(0))
    sent: list = []

    def gather(msg):
        sent.append(msg.clone())
        return msg.unsqueeze(0)

    rec = torch.empty(2 + 6, dtype=F64)
    before = TB.launch_count()
    y, stats, invstd, finite, back = TRITON.sync_forward(x, s, None, w, b, (*bufs, 0.1), (3, 5, 4, 99), gather, rec,
                                                         False, False)
    assert TB.launch_count() - before == 3 and bool(finite) and rec[0] == 0
    locks = TB._lock_words(x.device, geo.ncb)
    assert int(locks.abs().sum()) == 0
    n = x.numel() // c
    assert sent[0][2 * c] == n and sent[0][-6:].tolist() == [1, 3, 5, c, 4, 99]
    before = TB.launch_count()
    dx, dw, db = TRITON.sync_backward(dy, x, s, stats, invstd, w, b, None, None, (True, True, True), back, gather,
                                      rec, False)
    assert TB.launch_count() - before == 3 and rec[0] == 0 and int(locks.abs().sum()) == 0
    assert sent[1][-6:].tolist() == [2, 3, 5, c, 4, 0]
    ref = bn.BatchNorm(c, momentum=0.1, axis=axis, backend="composite").double()
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    yr.backward(dy)
    tol = {"atol": 1e-8, "rtol": 1e-8}
    torch.testing.assert_close(y, yr.detach(), **tol)
    torch.testing.assert_close(dx, xr.grad, **tol)
    torch.testing.assert_close(dw, ref.weight.grad, **tol)
    torch.testing.assert_close(db, ref.bias.grad, **tol)
    torch.testing.assert_close(bufs[0], ref.running_mean, **tol)
    torch.testing.assert_close(bufs[1], ref.running_var, **tol)


# ---------------------------------------------------------------------------------------------
# native's GPU route: ATen without running buffers + the one-launch guard kernel (update_from_invstd)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def gpu_native(monkeypatch):
    """CPU tensors down the GPU branches (``dispatch.device_type`` says cuda): plain BN on native, whose guard is
    triton's ``update_from_invstd`` (run by the interpreter)."""
    monkeypatch.setattr(dispatch, "device_type", lambda x: "cuda")
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    from batchnorm.kernels import native

    assert native._triton_guard(torch.zeros(3), torch.ones(3)) is TRITON


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
@pytest.mark.parametrize("fmt, dtype", [(None, torch.float32), (torch.channels_last, torch.float32), (None, F64)],
                         ids=["NCHW", "channels_last", "float64"])
def test_native_gpu_route_guard_kernel_matches_torch_bn(gpu_native, fmt, dtype, momentum):
    """Outputs, input/γ/β gradients, running statistics and num_batches_tracked against torch.nn.BatchNorm2d
    (torch's own tolerances), one triton launch per training step; then a NaN batch is refused on the device."""
    ours, ref = bn.BatchNorm(3, momentum=momentum).to(dtype), torch.nn.BatchNorm2d(3, momentum=momentum).to(dtype)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.tensor([0.6, 1.0, 1.4]))
            m.bias.copy_(torch.tensor([-0.5, 0.0, 0.5]))
    g = torch.Generator().manual_seed(4)
    for i in range(3):
        x = torch.randn(6, 3, 4, 5, generator=g, dtype=dtype) * (1 + i) + (i - 1)
        x = x if fmt is None else x.contiguous(memory_format=fmt)
        dy = torch.randn(x.shape, generator=g, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        before = TB.launch_count()
        ya, yb = ours(xa), ref(xb)
        assert TB.launch_count() - before == 1  # the guard; the normalization is ATen's
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
    for name in ("running_mean", "running_var", "weight", "bias"):
        a, b = getattr(ours, name), getattr(ref, name)
        torch.testing.assert_close(a.grad if name in ("weight", "bias") else a, b.grad if name in ("weight", "bias")
                                   else b, msg=lambda m, name=name: f"{name}: {m}")
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    bad = x.detach().clone()
    bad[2, 1, 0, 3] = float("nan")
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="invalid value encountered")  # NumPy, in the interpreter
        warnings.filterwarnings("error", message=".*(not finite|training batch)")  # the GPU route warns later
        ours(bad)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, k), state[k]), k
    with pytest.warns(RuntimeWarning, match=r"1 training batch\(es\)"):
        assert ours.refused_batches == 1


@pytest.mark.filterwarnings("ignore:divide by zero encountered", "ignore:invalid value encountered")  # NumPy
@pytest.mark.parametrize("label, value", [("Inf", float("inf")), ("overflow of finite values", 3e38)])
def test_native_gpu_route_guard_kernel_refuses_infinite_statistics(gpu_native, label, value):
    """An infinite batch variance (``1/σ`` = 0 or NaN) is refused like a NaN, with ``momentum=None`` too."""
    layer = bn.BatchNorm(3, momentum=None)
    layer(torch.randn(6, 3, 4))
    x = torch.randn(6, 3, 4)
    x[1, 0, 2], x[0, 0, 0] = value, -value
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    layer(x)
    assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv), label
    assert int(layer.num_batches_tracked) == 1
    with pytest.warns(RuntimeWarning, match=r"1 training batch\(es\)"):
        assert layer.refused_batches == 1


def test_the_variance_recovered_from_invstd_stays_within_torch_parity(gpu_native):
    """``σ²_B = 1/invstd² − eps`` from ATen's float32 ``1/σ``: the error is relative to ``σ²_B + eps`` (the quantity
    eval normalizes with), not to ``σ²_B``. Channels of standard deviation 1e3 … 1e-4 and a constant one, with
    momentum 1 (the running variance *is* the batch's) and 0.1: torch's float32 tolerances hold, and the error stays
    under 4 units of 2⁻²⁴ of ``σ²_B + eps`` plus the two float32 roundings of the stored values."""
    g = torch.Generator().manual_seed(5)
    scales = torch.tensor([1e3, 1.0, 1e-2, 1e-3, 1e-4, 0.0]).view(1, -1, 1, 1)
    x = torch.randn(16, 6, 8, 8, generator=g) * scales + torch.tensor([3.0, -1.0, 0.5, 7.0, 2.0, 4.0]).view(1, -1, 1, 1)
    n = x.numel() // 6
    var = x.double().var((0, 2, 3), correction=0)
    for momentum in (1.0, 0.1):
        ours, ref = bn.BatchNorm(6, momentum=momentum), torch.nn.BatchNorm2d(6, momentum=momentum)
        ours(x)
        ref(x)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        err = (ours.running_var.double() - ref.running_var.double()).abs()
        bound = momentum * 4 * 2.0 ** -24 * (var + 1e-5) * n / (n - 1) + 2.0 ** -23 * ref.running_var.double().abs()
        assert (err <= bound).all(), (err, bound)
    assert ours.running_var[-1] >= 0


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU: triton.compile + ptxas)
# ---------------------------------------------------------------------------------------------
def test_the_compile_command_builds_a_subset_for_sm_90_without_spills():
    """The command itself, on the kernels of a float16 channels-last training forward (reduce, finalize, apply):
    every variant compiles for sm_90, ptxas reports registers, and nothing spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "batchnorm.kernels.triton", "compile", "--arch", "sm_90", "--dtypes", "float16",
           "--layouts", "NHWC", "--kernels", "reduce_partial", "apply", "update_running"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [line.split("  ") for line in r.stdout.splitlines() if line.startswith(("reduce_partial", "apply",
                                                                                     "update_running"))]
    assert {row[0] for row in rows} == {"reduce_partial", "apply", "update_running"}
    # partials (plain, and with SyncBatchNorm's pack); apply × (identity/fused activation) × (plain, ghost, eval);
    # 2 updates
    assert len(rows) == 2 + 6 + 2
    assert sum("PACK=1" in row[1] for row in rows) == 1
    for row in rows:
        kernel, spec, arch, regs, spill, shared = row
        assert arch == "sm_90" and 0 < int(regs) <= 255 and int(spill) == 0 and int(shared) >= 0, row
    assert "0 failed, 0 spilled" in r.stdout


# ---------------------------------------------------------------------------------------------
# double backward with memory="save": one refusal, the same words on every route
# ---------------------------------------------------------------------------------------------
SAVE_DOUBLE_BACKWARD = [
    ("plain, composite (_TrainNorm)", lambda: bn.BatchNorm(3, activation="leaky_relu", memory="save",
                                                             backend="composite")),
    ("plain, triton (_TrainNorm)", lambda: bn.BatchNorm(3, activation="leaky_relu", memory="save", backend="triton")),
    ("renorm, triton (_FusedRenorm)", lambda: bn.BatchRenorm(3, activation="leaky_relu", memory="save",
                                                             backend="triton")),
]


@pytest.mark.parametrize("label, make", SAVE_DOUBLE_BACKWARD, ids=[c[0] for c in SAVE_DOUBLE_BACKWARD])
def test_double_backward_with_memory_save_is_refused_in_the_same_words(label, make):
    layer = make()
    x = torch.randn(8, 3, requires_grad=True)
    y = layer(x)
    with pytest.raises(NotImplementedError, match=r"^double backward \(create_graph=True\) is not available with "
                                                  r"memory='save': the input was not kept\. Use memory='default' "
                                                  r"for gradient penalties\.$"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
