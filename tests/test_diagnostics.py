"""batchnorm.diagnostics against hand computations (numpy/scipy) and closed forms (issue #6)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import batchnorm
from batchnorm.diagnostics import STATISTICS, describe, internal_covariate_shift, loss_landscape, monitor

# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: with 2 intra-op threads on a loaded 2-core machine each op waits ~10 ms for a thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TwoLayer(nn.Module):
    """(N, L, 3) → Linear → our BatchNorm(axis=-1) → ReLU → Linear → (N, 5, L) → BN (ours with a mask, else torch's)."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.masked = masked
        self.lin1 = nn.Linear(3, 4)
        self.bn1 = batchnorm.BatchNorm(4, axis=-1)
        self.lin2 = nn.Linear(4, 5)
        self.bn2 = batchnorm.BatchNorm(5) if masked else nn.BatchNorm1d(5)
        with torch.no_grad():
            self.lin1.weight[3].zero_()  # feature 3 of bn1's input is exactly 0: a collapsed variance
            self.lin1.bias[3] = 0.0
            self.bn1.weight.copy_(torch.tensor([1.5, -0.7, 1e-4, 1.0]))  # negative γ; |γ| collapsed at 2
            self.bn1.bias.copy_(torch.tensor([0.2, -0.1, 0.3, 0.0]))
            self.bn2.weight.copy_(torch.linspace(0.5, 2.0, 5))
            self.bn2.bias.copy_(torch.linspace(-0.3, 0.3, 5))

    def parts(self, x, mask=None):
        h1 = self.lin1(x)
        y1 = self.bn1(h1, mask=mask) if self.masked else self.bn1(h1)  # keyword mask
        h2 = self.lin2(torch.relu(y1)).transpose(1, 2)
        y2 = self.bn2(h2, mask) if self.masked else self.bn2(h2)  # positional mask
        return h1, y1, h2, y2

    def forward(self, x, mask=None):
        return self.parts(x, mask)[-1]


def rows_of(t: torch.Tensor, axis: int, mask: torch.Tensor | None) -> np.ndarray:
    """(positions that count, C) float64 array: the feature axis last, masked-out positions dropped."""
    a = np.moveaxis(t.detach().double().numpy(), axis, -1)
    c = a.shape[-1]
    a = a.reshape(-1, c)
    if mask is not None:
        a = a[mask.numpy().reshape(-1)]
    return a


def hand_stats(x, y, axis, mask, rm, rv, eps, weight, feature, percentiles):
    """Every statistic the monitor records, computed independently with numpy/scipy in float64."""
    xr, yr = rows_of(x, axis, mask), rows_of(y, axis, mask)
    mean, var = xr.mean(0), xr.var(0)
    with np.errstate(all="ignore"):
        skew = scipy.stats.skew(yr, axis=0, bias=True)
        kurt = scipy.stats.kurtosis(yr, axis=0, fisher=True, bias=True)
    constant = yr.std(0) == 0
    skew[constant], kurt[constant] = np.nan, np.nan
    collapsed = (var < eps) | (np.abs(weight) < 1e-3)
    rm, rv = rm.double().numpy(), rv.double().numpy()
    return {
        "count": float(xr.shape[0]),
        "batch_mean": mean,
        "batch_var": var,
        "running_mean": rm,
        "running_var": rv,
        "mean_gap": np.abs(mean - rm) / np.sqrt(rv + eps),
        "var_ratio": (var + eps) / (rv + eps),
        "input_percentiles": np.percentile(xr[:, feature], percentiles),
        "output_skewness": skew,
        "output_excess_kurtosis": kurt,
        "relu_zero_fraction": (yr <= 0).mean(0),
        "collapsed": np.flatnonzero(collapsed).tolist(),
    }


def make_mask(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(2, length + 1, (n,), generator=gen)
    return torch.arange(length) < lengths[:, None]


# -- monitor -----------------------------------------------------------------------------------------

MONITOR_CASES = [  # (mode, masked)
    ("train", False),
    ("eval", False),
    ("train", True),
    ("eval", True),
]


@pytest.mark.parametrize("mode,masked", MONITOR_CASES)
def test_monitor_matches_hand_computed_statistics(mode, masked):
    gen = torch.Generator().manual_seed(1)
    model = TwoLayer(masked)
    n, length = 6, 7
    batches = [(torch.randn(n, length, 3, generator=gen) * 2 + 1, make_mask(n, length, gen) if masked else None) for _ in range(6)]
    model.train()
    for x, m in batches[:3]:  # warm-up: running estimates away from (0, 1)
        model(x, m)
    model.train(mode == "train")
    percentiles = (10, 50, 90)
    with monitor(model, every=2, percentiles=percentiles, feature=1) as mon:
        for s, (x, m) in enumerate(batches[3:]):
            if s == 2:
                ref = copy.deepcopy(model)  # the state just before the step-2 forward
                ref_buffers = {k: v.clone() for k, v in ref.state_dict().items()}
            model(x, m)
    assert mon.recorded_steps == [0, 2]
    x, m = batches[5]
    with torch.no_grad():
        h1, y1, h2, y2 = ref.parts(x, m)
    expected = {
        "bn1": hand_stats(h1, y1, 2, m, ref_buffers["bn1.running_mean"], ref_buffers["bn1.running_var"], 1e-5,
                          ref.bn1.weight.detach().numpy(), 1, percentiles),
        "bn2": hand_stats(h2, y2, 1, m, ref_buffers["bn2.running_mean"], ref_buffers["bn2.running_var"], 1e-5,
                          ref.bn2.weight.detach().numpy(), 1, percentiles),
    }
    got = [r for r in mon.records if r["step"] == 2]
    assert {(r["layer"], r["statistic"]) for r in got} == {(layer, s) for layer in expected for s in STATISTICS}
    for r in got:
        assert r["training"] is (mode == "train")
        want = expected[r["layer"]][r["statistic"]]
        if r["statistic"] == "collapsed":
            assert r["values"] == want
        else:
            np.testing.assert_allclose(np.array(r["values"], dtype=float), want, rtol=2e-4, atol=2e-5, equal_nan=True,
                                       err_msg=f"{r['layer']} {r['statistic']}")
        if r["statistic"] == "input_percentiles":
            assert r["feature"] == 1 and r["percentiles"] == list(percentiles)
    # the collapsed features of bn1 are the zero-variance one (3) and the |γ| = 1e-4 one (2)
    assert next(r["values"] for r in got if r["layer"] == "bn1" and r["statistic"] == "collapsed") == [2, 3]


def test_monitor_leaves_the_model_unchanged_and_removes_its_hooks():
    gen = torch.Generator().manual_seed(2)
    model = TwoLayer(True)
    twin = copy.deepcopy(model)
    batches = [(torch.randn(5, 4, 3, generator=gen), make_mask(5, 4, gen)) for _ in range(4)]
    hooks_before = [(len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in model.modules()]
    with monitor(model) as mon:
        outs = [model(x, m) for x, m in batches]
    assert [(len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in model.modules()] == hooks_before
    twin_outs = [twin(x, m) for x, m in batches]
    for a, b in zip(outs, twin_outs):
        assert torch.equal(a, b)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k
    n_records = len(mon.records)
    model(*batches[0])  # outside the block: nothing recorded
    assert len(mon.records) == n_records > 0


@pytest.mark.parametrize("max_steps,every", [(64, 1), (10, 3)])
def test_monitor_memory_is_bounded_over_10000_steps(max_steps, every):
    model = nn.BatchNorm1d(3)  # the cheapest BN forward (the root itself is the monitored layer)
    x = torch.randn(4, 3)
    steps, c, n_layers = 10_000, 3, 1
    worst = 0
    with torch.no_grad(), monitor(model, every=every, max_steps=max_steps) as mon:
        for i in range(steps):
            model(x)
            if i % 500 == 0:
                worst = max(worst, len(mon.recorded_steps))
    kept = mon.recorded_steps
    records = mon.records
    assert max(worst, len(kept)) <= max_steps
    assert len(records) <= max_steps * n_layers * len(STATISTICS)
    assert all(len(r["values"]) <= c for r in records if isinstance(r["values"], list))
    # the kept steps stay evenly spaced over the whole run
    stride = mon.stride
    assert kept == list(range(0, steps, stride))
    assert kept[-1] >= steps - stride and stride % every == 0
    assert len(kept) > max_steps // 2


def test_monitor_unbounded_when_max_steps_is_none():
    model = nn.Sequential(nn.Linear(2, 3), batchnorm.BatchNorm(3))
    with torch.no_grad(), monitor(model, max_steps=None, every=2) as mon:
        for _ in range(300):
            model(torch.randn(4, 2))
    assert mon.recorded_steps == list(range(0, 300, 2))


def test_monitor_json_and_plot(tmp_path):
    model = TwoLayer(False)
    with monitor(model) as mon:
        for _ in range(3):
            model(torch.randn(4, 5, 3))
    text = mon.to_json()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: the constant feature's skewness is null
    loaded = json.loads(text)
    assert len(loaded) == len(mon.records)
    for a, b in zip(loaded, mon.records):
        assert a["layer"] == b["layer"] and a["step"] == b["step"] and a["statistic"] == b["statistic"]
        va = a["values"] if isinstance(a["values"], list) else [a["values"]]
        vb = b["values"] if isinstance(b["values"], list) else [b["values"]]
        assert [v is None for v in va] == [isinstance(v, float) and math.isnan(v) for v in vb]
    assert any(v is None for r in loaded if r["statistic"] == "output_skewness" for v in r["values"])
    path = mon.plot(tmp_path / "bn.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


MONITOR_ERRORS = [
    (dict(every=0), ValueError, "every to be an int >= 1"),
    (dict(percentiles=(85, 15)), ValueError, "non-empty increasing sequence"),
    (dict(percentiles=(15, 150)), ValueError, r"in \[0, 100\]"),
    (dict(feature=7), ValueError, "layer 'bn1' has 4 features"),
    (dict(max_steps=1), ValueError, "max_steps to be an int >= 2 or None"),
    (dict(feature=1.0), TypeError, "feature to be an int"),
]


@pytest.mark.parametrize("kwargs,err,match", MONITOR_ERRORS)
def test_monitor_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        monitor(TwoLayer(False), **kwargs)


def test_monitor_plot_without_records_says_what_to_do(tmp_path):
    with monitor(TwoLayer(False)) as mon:
        pass
    with pytest.raises(ValueError, match="Run forwards of the model inside"):
        mon.plot(tmp_path / "x.png")


# -- internal covariate shift -------------------------------------------------------------------------


def deep_linear(widths, seed):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        lin = nn.Linear(a, b, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=torch.float64) / math.sqrt(a))
        layers.append(lin)
    return nn.Sequential(*layers)


def half_mse(out, y):
    return 0.5 * ((out - y) ** 2).sum() / out.shape[0]


def dln_gradients(ws, x, y):
    """Closed form for f(x) = W_k ⋯ W_1 x and L = ‖XW_1ᵀ⋯W_kᵀ − Y‖² / 2N:
    G_i = P_iᵀ · Rᵀ · X · Q_iᵀ / N with P_i = W_k ⋯ W_{i+1}, Q_i = W_{i−1} ⋯ W_1, R = X Q_{k+1}ᵀ − Y."""
    n, d = x.shape

    def prod(mats, size):
        out = np.eye(size)
        for w in mats:
            out = w @ out
        return out

    full = prod(ws, d)
    r = x @ full.T - y
    grads = []
    for i, w in enumerate(ws):
        q = prod(ws[:i], d)
        p = prod(ws[i + 1 :], w.shape[0])
        grads.append(p.T @ r.T @ x @ q.T / n)
    return grads


@pytest.mark.parametrize("widths,lr", [((3, 4, 4, 2), 0.1), ((5, 3, 6, 4, 2), 0.5), ((2, 2), 0.3)])
def test_ics_of_a_deep_linear_network_matches_the_closed_form(widths, lr):
    model = deep_linear(widths, seed=len(widths))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randn(16, widths[-1], generator=gen, dtype=torch.float64)
    ws = [lin.weight.detach().numpy().copy() for lin in model]
    xn, yn = x.numpy(), y.numpy()
    g = dln_gradients(ws, xn, yn)
    got = internal_covariate_shift(model, half_mse, (x, y), lr=lr)
    assert list(got) == [str(i) for i in range(len(ws))]
    for i in range(len(ws)):
        stepped = [w - lr * gw for w, gw in zip(ws[:i], g[:i])] + ws[i:]
        g_prime = dln_gradients(stepped, xn, yn)[i]
        l2 = np.linalg.norm(g[i] - g_prime)
        cos = np.sum(g[i] * g_prime) / (np.linalg.norm(g[i]) * np.linalg.norm(g_prime))
        assert got[str(i)]["l2"] == pytest.approx(l2, rel=1e-9, abs=1e-12)
        assert got[str(i)]["cos"] == pytest.approx(cos, rel=1e-9)
    if len(ws) > 1:
        assert got["1"]["l2"] > 0  # the closed form really moves: the test can fail


SINGLE_LAYER_MODELS = [
    lambda: nn.Linear(4, 3),
    lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)),  # same dropout mask in every forward
    lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh()),
]


@pytest.mark.parametrize("build", SINGLE_LAYER_MODELS)
def test_ics_is_zero_for_a_single_layer(build):
    model = build().train()
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    got = internal_covariate_shift(model, nn.functional.mse_loss, (x, y), lr=0.5)
    assert len(got) == 1
    (res,) = got.values()
    assert res["l2"] == 0.0 and res["cos"] == pytest.approx(1.0, abs=1e-12)


def bn_net():
    return nn.Sequential(
        nn.Linear(4, 6), batchnorm.BatchRenorm(6), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2),
    )


def test_ics_layer_selection_and_bn_layers():
    model = bn_net().train()
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    default = internal_covariate_shift(model, nn.functional.mse_loss, (x, y), lr=0.1)
    assert list(default) == ["0", "4", "7"]  # weight layers, forward order
    chosen = internal_covariate_shift(model, nn.functional.mse_loss, (x, y), lr=0.1, layers=["5", "1"])
    assert list(chosen) == ["1", "5"]  # BN layers on request, still in forward order
    assert all(v["l2"] > 0 for v in chosen.values())
    with pytest.raises(ValueError, match=r"layers \['nope'\] are not modules with parameters"):
        internal_covariate_shift(model, nn.functional.mse_loss, (x, y), lr=0.1, layers=["nope"])


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        [m.training for m in model.modules()],
        [getattr(m, "last_input_shape", "absent") for m in model.modules()],
        torch.get_rng_state(),
    )


def assert_same(model, snap):
    state, grads, modes, shapes, rng = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, (g, gv) in zip(model.parameters(), grads):
        assert p.grad is g
        if g is not None:
            assert torch.equal(p.grad, gv)
    assert [m.training for m in model.modules()] == modes
    assert [getattr(m, "last_input_shape", "absent") for m in model.modules()] == shapes
    assert torch.equal(torch.get_rng_state(), rng)


MEASUREMENTS = [
    lambda model, batch: internal_covariate_shift(model, nn.functional.mse_loss, batch, lr=0.3),
    lambda model, batch: loss_landscape(model, nn.functional.mse_loss, batch, lr=0.3),
]


@pytest.mark.parametrize("measure", MEASUREMENTS, ids=["ics", "landscape"])
def test_measurements_leave_the_model_exactly_as_found(measure):
    model = bn_net().train()
    model[5].eval()  # a mixed-mode model stays mixed
    model(torch.randn(16, 4))  # non-trivial running statistics and num_batches_tracked
    model[0].weight.grad = torch.randn(6, 4)
    model[4].bias.grad = torch.randn(5)
    batch = (torch.randn(16, 4), torch.randn(16, 2))
    snap = snapshot(model)
    measure(model, batch)
    assert_same(model, snap)


def test_measurement_errors():
    model = nn.Linear(2, 1)
    batch = (torch.randn(4, 2), torch.randn(4, 1))
    with pytest.raises(TypeError, match=r"expected batch=\(x, y\)"):
        internal_covariate_shift(model, nn.functional.mse_loss, torch.randn(4, 2), lr=0.1)
    with pytest.raises(ValueError, match="lr to be a finite number > 0"):
        loss_landscape(model, nn.functional.mse_loss, batch, lr=0)
    with pytest.raises(ValueError, match="steps to be a non-empty sequence"):
        loss_landscape(model, nn.functional.mse_loss, batch, lr=0.1, steps=(1, -2))
    with pytest.raises(ValueError, match="return a scalar tensor"):
        loss_landscape(model, lambda o, t: (o - t) ** 2, batch, lr=0.1)


# -- loss landscape ---------------------------------------------------------------------------------------

QUADRATIC_CASES = [  # (name, builder of (X, y, w0)); loss = ½‖Xw − y‖², Hessian H = XᵀX
    ("generic", lambda g: (torch.randn(12, 4, generator=g, dtype=torch.float64),
                           torch.randn(12, generator=g, dtype=torch.float64),
                           torch.randn(4, generator=g, dtype=torch.float64))),
    # X diagonal with its largest entry first and the residual along e₁: g is the top eigenvector
    ("eigenvector", lambda g: (torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)),
                               torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64),
                               torch.zeros(3, dtype=torch.float64))),
]


@pytest.mark.parametrize("name,build", QUADRATIC_CASES, ids=[c[0] for c in QUADRATIC_CASES])
@pytest.mark.parametrize("steps", [(0.5, 1, 2, 4), (0.25, 3)])
def test_loss_landscape_on_a_quadratic(name, build, steps):
    x, y, w0 = build(torch.Generator().manual_seed(3))
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0[None])
    loss_fn = lambda out, t: 0.5 * ((out[:, 0] - t) ** 2).sum()  # noqa: E731
    lr = 0.05
    xn, yn, w = x.numpy(), y.numpy(), w0.numpy()
    h = xn.T @ xn
    g = xn.T @ (xn @ w - yn)
    loss0 = 0.5 * np.sum((xn @ w - yn) ** 2)
    etas = [s * lr for s in steps]
    losses = [loss0 - e * g @ g + 0.5 * e * e * g @ h @ g for e in etas]  # exact along the ray
    changes = [e * np.linalg.norm(h @ g) for e in etas]
    beta = np.linalg.norm(h @ g) / np.linalg.norm(g)
    got = loss_landscape(model, loss_fn, (x, y), lr=lr, steps=steps)
    assert got["loss"] == pytest.approx(loss0, rel=1e-12)
    assert got["steps"] == pytest.approx(etas)
    assert got["losses"] == pytest.approx(losses, rel=1e-10)
    assert got["grad_changes"] == pytest.approx(changes, rel=1e-9)
    assert got["loss_range"] == pytest.approx(max([loss0, *losses]) - min([loss0, *losses]), rel=1e-9)
    assert got["gradient_predictiveness"] == pytest.approx(max(changes), rel=1e-9)
    assert got["beta_smoothness"] == pytest.approx(beta, rel=1e-9)
    lam_max = np.linalg.eigvalsh(h).max()
    assert got["beta_smoothness"] <= lam_max * (1 + 1e-9)
    if name == "eigenvector":
        assert got["beta_smoothness"] == pytest.approx(lam_max, rel=1e-12)  # 3² = 9


# -- describe -----------------------------------------------------------------------------------------------


class SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.norm = batchnorm.BatchNorm(8, axis=-1)  # (N, L, C)
        self.frozen = batchnorm.FrozenBatchNorm(8, axis=-1)

    def forward(self, x):
        return self.frozen(self.norm(self.emb(x)))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                         batchnorm.BatchNorm2d(6))


def mlp():
    return nn.Sequential(nn.Linear(5, 7), batchnorm.BatchNorm1d(7, momentum=None), nn.Linear(7, 3),
                         batchnorm.GhostBatchNorm(3, virtual_batch_size=4), nn.Linear(3, 2),
                         nn.BatchNorm1d(2, track_running_stats=False))


N, H, W, L = 10, 9, 9, 6
H2, W2 = (H - 2 - 3) // 2 + 1, (W - 2 - 3) // 2 + 1  # after two 3×3 convolutions, the second with stride 2
DESCRIBE_CASES = [  # (name, builder, input, [(layer, type, features, shape, axes, count)])
    ("cnn", cnn, (N, 3, H, W), [
        ("1", "BatchNorm2d", 4, (N, 4, H - 2, W - 2), (0, 2, 3), N * (H - 2) * (W - 2)),
        ("4", "BatchNorm2d", 6, (N, 6, H2, W2), (0, 2, 3), N * H2 * W2),
    ]),
    ("mlp", mlp, (N, 5), [
        ("1", "BatchNorm1d", 7, (N, 7), (0,), N),
        ("3", "GhostBatchNorm", 3, (N, 3), (0,), 4),  # one virtual batch of 4 rows
        ("5", "BatchNorm1d", 2, (N, 2), (0,), N),
    ]),
    ("sequence", SeqModel, (N, L, 3), [
        ("norm", "BatchNorm", 8, (N, L, 8), (0, 1), N * L),
        ("frozen", "FrozenBatchNorm", 8, (N, L, 8), (0, 1), N * L),
    ]),
]


@pytest.mark.parametrize("name,build,shape,expected", DESCRIBE_CASES, ids=[c[0] for c in DESCRIBE_CASES])
def test_describe_with_example_input(name, build, shape, expected):
    model = build()
    example = torch.randn(shape)
    snap = snapshot(model)
    table = describe(model, example)
    assert_same(model, snap)  # one forward, no state changed (not even last_input_shape)
    got = [(r["layer"], r["type"], r["features"], r["input_shape"], r["reduction_axes"], r["samples_per_statistic"])
           for r in table.rows]
    assert got == expected
    text = str(table)
    for layer, typ, *_ in expected:
        assert typ in text and layer in text
    assert "reduction axes" in text and "samples per statistic" in text


def test_describe_without_example_input_uses_last_seen_shapes():
    model = mlp().train()
    rows = describe(model).rows
    assert all(r["input_shape"] is None for r in rows)  # nothing seen yet
    model(torch.randn(N, 5))
    rows = {r["layer"]: r for r in describe(model).rows}
    assert rows["1"]["reduction_axes"] == (0,) and rows["1"]["samples_per_statistic"] == N
    assert rows["3"]["samples_per_statistic"] == 4
    assert rows["5"]["input_shape"] is None  # torch's layers do not record shapes
    assert "unknown" in str(describe(model))
    assert rows["1"]["momentum"] == "cumulative (None)" and rows["3"]["momentum"] == 0.1
    assert rows["1"]["running"].startswith("1 batches")
    assert rows["5"]["running"].startswith("none")
    frozen = {r["layer"]: r for r in describe(SeqModel()).rows}["frozen"]
    assert frozen["running"].startswith("frozen") and frozen["momentum"] is None


def test_describe_errors():
    with pytest.raises(TypeError, match="describe expected a torch.nn.Module model"):
        describe(torch.randn(3))


LAYER_TYPES = [  # (builder, input shape, feature axis): every kind of BN-like layer the monitor hooks
    (lambda: nn.BatchNorm2d(3), (4, 3, 2, 2), 1),
    (lambda: nn.SyncBatchNorm(3), (4, 3, 5), 1),  # one process: behaves like BatchNorm in eval
    (lambda: batchnorm.BatchNorm2d(3), (4, 3, 2, 2), 1),
    (lambda: batchnorm.BatchNorm(3, axis=-1), (4, 5, 3), 2),
    (lambda: batchnorm.BatchRenorm(3), (6, 3), 1),
    (lambda: batchnorm.GhostBatchNorm(3, virtual_batch_size=2), (6, 3, 2), 1),
    (lambda: batchnorm.FrozenBatchNorm(3, axis=-1), (4, 2, 3), 2),
]


# torch's SyncBatchNorm needs an initialized process group to train: eval only
LAYER_CASES = [(b, s, a, t) for i, (b, s, a) in enumerate(LAYER_TYPES) for t in (True, False) if not (i == 1 and t)]


@pytest.mark.parametrize("build,shape,axis,training", LAYER_CASES)
def test_monitor_hooks_every_bn_like_layer(build, shape, axis, training):
    layer = build()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    model = nn.Sequential(layer).train(training)
    x = torch.randn(shape) * 3
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    with monitor(model) as mon:
        y = model(x)
    exp = hand_stats(x, y, axis, None, before_mean, before_var, layer.eps, layer.weight.detach().numpy(), 0, (15, 50, 85))
    got = {r["statistic"]: r["values"] for r in mon.records}
    assert set(got) == set(STATISTICS)
    assert all(r["layer"] == "0" and r["training"] is training for r in mon.records)
    for stat in ("count", "batch_mean", "batch_var", "mean_gap", "var_ratio", "input_percentiles", "output_skewness",
                 "output_excess_kurtosis", "relu_zero_fraction"):
        np.testing.assert_allclose(np.array(got[stat], float), exp[stat], rtol=1e-4, atol=1e-5, err_msg=stat)


def test_monitor_without_running_estimates_and_after_an_exception():
    model = nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm(4, track_running_stats=False), nn.BatchNorm1d(4))
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"), monitor(model) as mon:
        model(torch.randn(8, 3))
        raise RuntimeError("boom")
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    stats = {layer: {r["statistic"] for r in mon.records if r["layer"] == layer} for layer in ("1", "2")}
    assert stats["2"] == set(STATISTICS)
    assert stats["1"] == set(STATISTICS) - {"running_mean", "running_var", "mean_gap", "var_ratio"}
