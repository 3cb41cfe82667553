"""Fast tests of the building blocks of lab experiments 4, 6, 7 and 8 (ics, batch_size, test_time, overhead)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.lab import batch_size, ics, models, overhead, run, test_time
from batchnorm.tools.recalibrate import recalibrate


@pytest.mark.parametrize(
    "name, module",
    [("internal-covariate-shift", "batchnorm.lab.ics"), ("batch-size", "batchnorm.lab.batch_size"),
     ("test-time-statistics", "batchnorm.lab.test_time"), ("overhead", "batchnorm.lab.overhead")],
)
def test_registered_in_issue_order(name, module):
    names = [n for n, _ in run.EXPERIMENTS]
    assert dict(run.EXPERIMENTS)[name] == module
    assert names.index(name) == {"internal-covariate-shift": 3, "batch-size": 5, "test-time-statistics": 6,
                                 "overhead": 7}[name]


@pytest.mark.parametrize("mod", [ics, batch_size, test_time, overhead])
def test_protocol(mod):
    assert mod.NAME in dict(run.EXPERIMENTS)
    assert mod.TITLE and mod.QUESTION.endswith("?") and callable(mod.run)


# --- experiment 4 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c", [(64, 8), (7, 3)])
def test_percentiles_match_numpy_columnwise(n, c):
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(n))
    got = ics.percentiles(x)
    assert got.shape == (3, c)
    for j in range(c):
        np.testing.assert_allclose(got[:, j], np.percentile(x[:, j].numpy().astype(float), [15, 50, 85]), rtol=1e-12)


@pytest.mark.parametrize(
    "medians, band, expected",
    [([0.0, 0.0, 0.0], 1.0, 0.0),          # frozen distribution
     ([0.0, 1.0, 0.0], 2.0, 0.5),          # moves 1 per record, band 2
     ([0.0, 2.0, 4.0, 6.0], 4.0, 0.5)],    # steady drift of 2 per record, band 4
)
def test_median_jitter_closed_form(medians, band, expected):
    med = np.array(medians)[:, None]
    series = np.stack([med - band / 2, med, med + band / 2], axis=1)  # (T, 3, 1)
    assert ics.median_jitter(series) == pytest.approx(expected)


@pytest.mark.parametrize(
    "steps, accs, target, expected",
    [([50, 100, 150], [0.5, 0.9, 0.95], 0.85, 93.75),  # interpolated between 50 (0.5) and 100 (0.9)
     ([50, 100], [0.85, 0.2], 0.85, 50.0),             # reached at the first evaluation
     ([10, 20, 30], [0.8, 0.8, 0.85], 0.85, 30.0),     # exactly at an evaluation
     ([50, 100], [0.5, 0.6], 0.85, math.nan)],
)
def test_steps_to_target(steps, accs, target, expected):
    got = ics.steps_to(steps, accs, target)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_noisy_bn_noise_only_in_training_and_changes_every_step():
    layer = ics.NoisyBatchNorm(6, generator=torch.Generator().manual_seed(1))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)  # a fresh draw per forward
    # per feature, the noise is an affine map of BN's output: same correlation, shifted/scaled
    bn_out = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    scale = a.std(0, unbiased=False) / bn_out.std(0, unbiased=False)
    assert bool(((scale > 0.5 - 1e-3) & (scale < 2.0 + 1e-3)).all())
    assert bool((a.mean(0).abs() <= 1.0 + 1e-4).all())
    layer.eval()
    torch.testing.assert_close(layer(x), layer.bn(x))


@pytest.mark.parametrize("mean_noise, scale_noise, match", [(-1.0, 2.0, "mean_noise >= 0"), (0.0, 0.5, "scale_noise >= 1")])
def test_noisy_bn_rejects_bad_noise(mean_noise, scale_noise, match):
    with pytest.raises(ValueError, match=match):
        ics.NoisyBatchNorm(4, mean_noise=mean_noise, scale_noise=scale_noise)


@pytest.mark.parametrize("variant", ics.VARIANTS)
def test_ics_variants_build_the_figure_1_net(variant):
    net = ics._build(variant, seed=0)
    out = net(torch.randn(5, 784))
    assert out.shape == (5, 10)
    assert isinstance(net.blocks[-1][-1], nn.Sigmoid) and len(net.blocks) == 3
    has_bn = any(isinstance(m, ics.BatchNorm) for m in net.modules())
    assert has_bn == (variant != "no BN")


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_deep_linear_network_pairs_bn_and_plain_weights(depth):
    nets = {}
    for bn in (False, True):
        torch.manual_seed(7)
        nets[bn] = ics.dln(depth, bn)
    plain = [m.weight for m in nets[False] if isinstance(m, nn.Linear)]
    with_bn = [m.weight for m in nets[True] if isinstance(m, nn.Linear)]
    assert len(plain) == len(with_bn) == depth
    for a, b in zip(plain, with_bn):
        torch.testing.assert_close(a, b)  # same seed, same weights: the comparison is paired
    assert sum(isinstance(m, ics.BatchNorm) for m in nets[True]) == depth - 1
    assert nets[True](torch.randn(8, ics.DLN_WIDTH)).shape == (8, ics.DLN_OUT)
    assert all(m.bias is None for m in nets[False] if isinstance(m, nn.Linear))


def test_deep_linear_network_rejects_depth_zero():
    with pytest.raises(ValueError, match=r"dln expected depth >= 1, got 0"):
        ics.dln(0, True)


def _sweep(bn_vals, plain_vals):
    runs = {}
    for key, vals in (("4-bn", bn_vals), ("4-plain", plain_vals)):
        runs[key] = {k: list(vals) for k in ("ics_l2", "loss_range", "grad_pred", "beta")}
    return {"depths": [4], "runs": runs}


@pytest.mark.parametrize(
    "bn_vals, plain_vals, smoother, lower, higher",
    [([1.0, 1.1, 0.9], [2.0, 2.2, 1.9], True, 3, 0),       # consistently lower with BN: smoother
     ([2.0, 2.2, 1.9], [1.0, 1.1, 0.9], False, 0, 3),      # consistently higher: rougher
     ([1.0, 2.0, 0.5], [1.5, 0.8, 1.0], False, 0, 0),      # noise: nothing resolved
     ([1.0], [2.0], False, 0, 0)],                         # one seed: nothing resolved
)
def test_smooths_at_uses_the_paired_rule(bn_vals, plain_vals, smoother, lower, higher):
    got = ics.smooths_at(_sweep(bn_vals, plain_vals))[4]
    assert (got["smoother"], got["lower"], got["higher"]) == (smoother, lower, higher)


@pytest.mark.parametrize(
    "bn_by_depth, expected_from, expected_lower, expected_higher",
    [({2: 3.0, 8: 1.0, 25: 1.0}, 8, [8, 25], [2]),      # higher at 2, lower from 8 on
     ({2: 1.0, 8: 3.0, 25: 1.0}, 25, [2, 25], [8]),     # only the deepest stays lower
     ({2: 1.0, 8: 1.0, 25: 3.0}, None, [2, 8], [25])],  # the deepest is higher: never separates lower
)
def test_separation_depth(bn_by_depth, expected_from, expected_lower, expected_higher):
    runs = {}
    for d, level in bn_by_depth.items():
        runs[f"{d}-bn"] = {k: [level, level * 1.05, level * 0.95] for k in ("ics_l2", "loss_range", "grad_pred", "beta")}
        runs[f"{d}-plain"] = {k: [2.0, 2.1, 1.9] for k in ("ics_l2", "loss_range", "grad_pred", "beta")}
    sep = ics.separation({"depths": sorted(bn_by_depth), "runs": runs})
    for k, _ in ics.LAND_MEASURES:
        assert sep[k] == {"lower": expected_lower, "higher": expected_higher, "from": expected_from}


@pytest.mark.parametrize("window", [1, 3, 50])
def test_running_mean_against_a_loop(window):
    v = np.arange(12, dtype=float).reshape(6, 2) ** 2
    want = np.array([v[max(0, i + 1 - window): i + 1].mean(0) for i in range(len(v))])
    np.testing.assert_allclose(ics._smooth(v, window), want)


# --- experiment 6 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, lr", [(2, 0.025), (8, 0.05), (32, 0.1), (128, 0.2)])
def test_square_root_scaling_rule(b, lr):
    assert batch_size.scaled_lr(b) == pytest.approx(lr)


def test_batch_one_table_reports_bn_error_and_batch_free_norms():
    rows = {r[0]: r for r in batch_size.batch_one_behaviour()}
    assert rows["BatchNorm, training"][1] == "raises ValueError"
    assert "more than 1 value per feature" in rows["BatchNorm, training"][2]
    assert "GroupNorm" in rows["BatchNorm, training"][2]  # the message names the way out
    for label in ("BatchNorm, eval mode (running estimates)", "GroupNorm (8 groups), training", "LayerNorm, training",
                  "BatchNorm on (1, 16, 10): 10 positions per channel"):
        assert rows[label][1] == "runs" and "finite: yes" in rows[label][2]


@pytest.mark.parametrize("label, norm, opts", batch_size.NORMS)
def test_batch_size_norms_train_at_batch_two(label, norm, opts):
    net = models.MLP(784, [16, 16], 10, norm=norm, norm_options=opts).train()
    out = net(torch.randn(2, 784))
    out.sum().backward()
    assert torch.isfinite(out).all()


# --- experiment 7 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, b, sizes", [(70, 32, [32, 32, 6]), (33, 32, [33]), (16, 32, [16]), (64, 32, [32, 32])])
def test_recalibration_batches(n, b, sizes):
    x = torch.arange(100.0).reshape(100, 1)
    got = test_time.recalibration_batches(x, n, b, seed=3)
    assert [len(t) for t in got] == sizes
    rows = torch.cat(got).flatten()
    assert len(set(rows.tolist())) == n  # without replacement


@pytest.mark.parametrize("n", [0, 101])
def test_recalibration_batches_rejects_bad_n(n):
    with pytest.raises(ValueError, match="expected 1 <= n <= 100"):
        test_time.recalibration_batches(torch.zeros(100, 1), n, 32, 0)


@pytest.mark.parametrize(
    "errors, tol, expected",
    [({16: [0.3], 64: [0.11], 256: [0.1]}, 0.02, 64),
     ({16: [0.3, 0.2], 64: [0.1, 0.1], 256: [0.2, 0.1], 1024: [0.1, 0.1]}, 0.02, 1024),  # 256 falls out again
     ({16: [0.1], 32: [0.1]}, 0.0, 16),
     ({16: [0.05, 0.15], 32: [0.1, 0.1]}, 0.001, 16)],  # paired mean difference is 0
)
def test_saturation(errors, tol, expected):
    assert test_time.saturation(errors, tol) == expected


def test_stat_error_zero_for_itself_and_closed_form_for_a_shift():
    torch.manual_seed(0)
    net = models.MLP(6, [4], 2, norm="bn")
    recalibrate(net, [torch.randn(50, 6) for _ in range(2)], progress=False)
    assert test_time.stat_error(net, net) == 0.0
    shifted = models.MLP(6, [4], 2, norm="bn")
    shifted.load_state_dict(net.state_dict())
    bn = models.norm_layers(net)[0][1]
    with torch.no_grad():
        models.norm_layers(shifted)[0][1].running_mean.add_(torch.sqrt(bn.running_var + bn.eps) * 0.25)
    assert test_time.stat_error(shifted, net) == pytest.approx(0.25, rel=1e-5)


# --- experiment 8 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, bn_type", [("none", None), ("torch", nn.BatchNorm2d), ("ours", overhead.BatchNorm2d),
                                           ("ours-fused", overhead.BatchNorm2d)])
def test_conv_net_variants(kind, bn_type):
    torch.manual_seed(0)
    net = overhead.conv_net(kind, widths=(4, 8))
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    # a fused BatchNorm2d is its non-torch twin (docs/ecosystem.md), so count every BN by torch's base class
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert (len(bns) == 2) == (bn_type is not None)
    relus = sum(isinstance(m, nn.ReLU) for m in net.modules())
    assert relus == (0 if kind == "ours-fused" else 2)


def test_fused_net_equals_unfused():
    torch.manual_seed(0)
    a = overhead.conv_net("ours", widths=(4, 8))
    torch.manual_seed(0)
    b = overhead.conv_net("ours-fused", widths=(4, 8))
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(a(x), b(x))


def test_conv_net_rejects_unknown_norm():
    with pytest.raises(ValueError, match="expected norm in 'none', 'torch', 'ours', 'ours-fused', got 'gn'"):
        overhead.conv_net("gn")


def test_time_alternating_rotates_order_and_counts():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    out = overhead.time_alternating(fns, rounds=3, reps=2, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == list("aabbcc") + list("bbccaa") + list("ccaabb")
    assert all(len(v) == 3 and all(t >= 0 and math.isfinite(t) for t in v) for v in out.values())


@pytest.mark.parametrize("rounds, reps, warmup", [(0, 1, 0), (1, 0, 0), (1, 1, -1)])
def test_time_alternating_rejects_bad_counts(rounds, reps, warmup):
    with pytest.raises(ValueError, match="expected rounds >= 1, reps >= 1, warmup >= 0"):
        overhead.time_alternating({"a": lambda: None}, rounds=rounds, reps=reps, warmup=warmup)


# --- the shared noise rule (batchnorm.lab.stats) ------------------------------------------------------------

from batchnorm.lab import stats  # noqa: E402


@pytest.mark.parametrize(
    "a, b, paired, resolved, sign",
    [
        ([0.91, 0.92, 0.90], [0.80, 0.82, 0.81], True, True, 1),     # consistent gap
        ([0.80, 0.82, 0.81], [0.91, 0.92, 0.90], True, True, -1),
        ([1.0, 1.1, 0.9], [1.05, 1.0, 1.0], True, False, 0),         # inside the spread
        ([0.5], [0.1], True, False, 0),                              # one seed: never resolved
        ([1.0, 1.2, 0.8, 1.1], [0.0, 0.1, -0.1, 0.05], False, True, 1),
        ([1.0, 3.0, -1.0], [0.9, 1.1, 1.0], False, False, 0),
    ],
)
def test_compare_resolves_only_outside_the_interval(a, b, paired, resolved, sign):
    c = stats.compare(a, b, paired=paired, names=("A", "B"))
    assert (c.resolved, c.sign) == (resolved, sign)
    if not resolved:
        assert stats.UNRESOLVED in c.text()


def test_compare_paired_interval_is_the_t_interval_of_the_differences():
    from scipy import stats as st

    a, b = [3.0, 4.0, 6.0, 5.0], [1.0, 3.5, 4.0, 2.0]
    d = np.subtract(a, b)
    lo, hi = st.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=st.sem(d))
    c = stats.compare(a, b, paired=True)
    assert c.diff == pytest.approx(d.mean()) and c.half == pytest.approx((hi - lo) / 2)
    assert c.resolved == (lo > 0 or hi < 0)


def test_compare_unpaired_matches_welch():
    from scipy import stats as st

    a, b = [1.0, 1.4, 0.8, 1.2, 1.1], [0.2, 0.9, 0.1]
    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    c = stats.compare(a, b, paired=False)
    assert c.diff - c.half == pytest.approx(ci.low) and c.diff + c.half == pytest.approx(ci.high)


@pytest.mark.parametrize("floor, min_n, resolved", [(0.0, 2, True), (0.5, 2, False), (0.0, 10, False)])
def test_compare_floor_and_min_n(floor, min_n, resolved):
    c = stats.compare([1.3, 1.3, 1.31], [1.0, 1.0, 1.0], paired=True, floor=floor, min_n=min_n)
    assert c.resolved is resolved and c.informative is (min_n <= 3)


def test_compare_paired_drops_failed_seeds_on_both_sides_and_checks_lengths():
    c = stats.compare([1.0, math.nan, 1.2, 1.1], [0.0, 5.0, 0.1, 0.05], paired=True)
    assert c.n == 3 and c.mean_b == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"expected equal lengths \(one value per seed\), got 2 and 3"):
        stats.compare([1.0, 2.0], [1.0, 2.0, 3.0], paired=True)


@pytest.mark.parametrize(
    "values, spec, unit, text",
    [([1.0, 1.0, 1.0], ".3f", "", "1.000 ± 0.000"), ([88.34], ".1f", "%", "88.3% (1 run)"), ([], ".1f", "", "n/a")],
)
def test_pm(values, spec, unit, text):
    assert stats.pm(values, spec, unit) == text


@pytest.mark.parametrize(
    "steps, values, target, expected",
    [([0, 10, 20], [0.5, 0.7, 0.9], 0.8, 15.0), ([0, 10], [0.9, 0.95], 0.8, 0.0), ([0, 10], [0.1, 0.2], 0.8, math.nan)],
)
def test_crossing_interpolates(steps, values, target, expected):
    got = stats.crossing(steps, values, target)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


@pytest.mark.parametrize("p, n, expected", [(0.9, 1000, math.sqrt(0.09 / 1000)), (1.0, 10, 0.0), (math.nan, 10, 0.0)])
def test_binomial_noise(p, n, expected):
    assert stats.binomial_noise(p, n) == pytest.approx(expected)


# --- experiment 4 in Santurkar et al.'s regime: normalized landscape measures, VGG, matched loss -------------

class _Quadratic(nn.Module):
    """L(θ) = ½ θᵀHθ through ``loss_fn(model(x), y)``: the model returns θ, the loss applies H."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x):
        return self.theta


@pytest.mark.parametrize("h, theta", [([1.0, 4.0], [1.0, 1.0]), ([2.0, 0.5, 3.0], [0.3, -1.0, 2.0])])
def test_loss_landscape_normalized_measures_closed_form(h, theta):
    from batchnorm.diagnostics import loss_landscape

    hd = torch.tensor(h, dtype=torch.float64)
    loss_fn = lambda out, _y: 0.5 * (hd * out * out).sum()  # noqa: E731
    t = np.array(theta)
    g = np.array(h) * t
    loss0 = 0.5 * np.sum(np.array(h) * t * t)
    beta = np.linalg.norm(np.array(h) * g) / np.linalg.norm(g)  # ‖Hg‖ / ‖g‖ at every step of a quadratic
    got = loss_landscape(_Quadratic(theta), loss_fn, (torch.zeros(1), torch.zeros(1)), lr=0.01)
    assert got["beta_smoothness"] == pytest.approx(beta, rel=1e-9)
    assert got["normalized_beta"] == pytest.approx(beta * loss0 / (g @ g), rel=1e-9)
    assert got["relative_loss_range"] == pytest.approx(got["loss_range"] / loss0, rel=1e-12)
    assert got["relative_gradient_change"] == pytest.approx(4 * 0.01 * np.linalg.norm(np.array(h) * g)
                                                            / np.linalg.norm(g), rel=1e-9)


def test_normalized_beta_is_one_half_on_a_one_dimensional_bowl_and_scale_free():
    from batchnorm.diagnostics import loss_landscape

    for scale in (1.0, 10.0):
        loss_fn = lambda out, _y, c=scale: c * 0.5 * 3.0 * (out * out).sum()  # noqa: E731
        got = loss_landscape(_Quadratic([2.0]), loss_fn, (torch.zeros(1), torch.zeros(1)), lr=0.01)
        assert got["normalized_beta"] == pytest.approx(0.5, rel=1e-9)
        assert got["beta_smoothness"] == pytest.approx(3.0 * scale, rel=1e-9)  # the raw β scales with the loss


@pytest.mark.parametrize(
    "a, b, fractions, expected",
    [([1.0, 0.5, 0.1], [1.0, 0.2, 0.01], (0.0, 1.0), [1.0, 0.1]),       # floor: the worse net's best (0.1)
     ([4.0, 1.0], [2.0, 0.5, 0.25], (0.5,), [2.0 * (1.0 / 2.0) ** 0.5]),  # start: the lower first value
     ([1.0, 0.9], [0.5, 0.4], (0.5,), []),                              # a never gets below where b starts
     ([1.0, 0.5], [1.0, float("nan")], (0.5,), [])],                   # a non-finite curve matches nothing
)
def test_matched_levels(a, b, fractions, expected):
    assert ics.matched_levels(a, b, fractions) == pytest.approx(expected)


@pytest.mark.parametrize("curve, level, expected", [([3, 2, 1], 2.5, 1), ([3, 2, 1], 2, 1), ([3, 2], 1, None)])
def test_first_below(curve, level, expected):
    assert ics.first_below(curve, level) == expected


def test_deep_linear_nets_are_probed_at_the_same_training_loss():
    from batchnorm.lab.core import Context

    ctx = Context(seeds=1, quick=True, progress=False)
    plain = ics._dln_run(ctx, 2, False, 0.03, 0, 30, measure=True)
    bn = ics._dln_run(ctx, 2, True, 0.03, 0, 30, measure=True)
    assert plain["checkpoints"] and all(step % ics.CKPT_EVERY == 0 for step, _, _ in plain["checkpoints"])
    pair = ics._matched_pair(2, 0, plain, bn)
    assert len(pair["levels"]) == len(ics.MATCH_FRACTIONS)
    assert pair["levels"] == sorted(pair["levels"], reverse=True)
    for side, run_ in (("plain", plain), ("bn", bn)):
        curve = [c[1] for c in run_["checkpoints"]]
        # each net is probed where its smoothed loss first reaches each level: never before, never later
        for level in pair["levels"]:
            j = ics.first_below(curve, level)
            assert curve[j] <= level and all(v > level for v in curve[:j])
        for key in ("ics_l2", "loss_range", "grad_pred", "beta", "rel_loss_range", "rel_grad_pred", "norm_beta"):
            assert math.isfinite(pair[side][key]), (side, key)


@pytest.mark.parametrize("norm, has_bias", [("bn", False), ("none", True)])
def test_vgg_shapes_and_paired_initialization(norm, has_bias):
    net = models.VGG(1, 10, norm=norm, init_seed=3)
    twin = models.VGG(1, 10, norm="none" if norm == "bn" else "bn", init_seed=3)
    assert net(torch.randn(4, 1, 16, 16)).shape == (4, 10)
    assert len(net.convs) == 6 and all((c.bias is not None) == has_bias for c in net.convs)
    for a, b in zip(net.convs + [net.head], twin.convs + [twin.head]):
        torch.testing.assert_close(a.weight, b.weight)  # same seed, same weights, whatever the norm
    fan_in = net.convs[1].weight[0].numel()
    assert net.convs[1].weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15)  # He-normal
    assert sum(isinstance(m, ics.BatchNorm) for m in net.modules()) == (6 if norm == "bn" else 0)


def test_vgg_rejects_empty_stages_and_unknown_variants():
    with pytest.raises(ValueError, match=r"VGG expected a non-empty list of non-empty stages"):
        models.VGG(1, 10, stages=((8,), ()))
    with pytest.raises(ValueError, match=r"vgg expected variant 'BN' or 'no BN', got 'GN'"):
        ics.vgg("GN", 0)


def test_vgg_run_probes_at_multiples_of_its_own_rate(monkeypatch):
    from batchnorm.lab.core import Context

    calls = []
    real = ics.loss_landscape

    def spy(net, loss_fn, batch, *, lr, steps):
        calls.append((lr, tuple(steps), len(batch[0])))
        return real(net, loss_fn, batch, lr=lr, steps=steps)

    monkeypatch.setattr(ics, "loss_landscape", spy)
    x, y, xt, yt = ics.vgg_digits()
    assert x.shape[1:] == (1, ics.VGG_SIDE, ics.VGG_SIDE) and abs(float(x.mean())) < 1e-4
    small = (x[:256], y[:256], xt[:64], yt[:64])
    out = ics._vgg_run(Context(seeds=1, quick=True, progress=False), "BN", 0.3, 0, 6, 3, small)
    assert calls == [(0.3, ics.PROBE_STEPS, ics.VGG_BATCH)] * 2
    assert out["record"]["probe_steps"] == [3, 6]
    for key in ("loss", "grad_norm", "loss_range", "grad_pred", "beta", "rel_loss_range", "rel_grad_pred", "norm_beta"):
        assert math.isfinite(out[key]), key
    # the landscape measures are summarized over probes by their geometric mean
    assert out["rel_loss_range"] == pytest.approx(ics.geomean([a / b for a, b in zip(out["record"]["loss_range"],
                                                                                     out["record"]["loss"])]))


@pytest.mark.parametrize(
    "signs, rule",
    [((-1, -1, 0), "smoother"), ((-1, -1, 1), "neither"), ((1, 1, 0), "rougher"), ((-1, 0, 0), "neither"),
     ((0, 0, 0), "neither")],
)
def test_landscape_rule(signs, rule):
    class C:
        def __init__(self, sign):
            self.sign = sign

    assert ics.landscape_rule({i: C(s) for i, s in enumerate(signs)}) == rule


def _vsweep(bn_factor, noise=0.0):
    """A synthetic part-2 sweep: every BN measure = bn_factor × the no-BN one (per seed, BN with optional noise)."""
    base = [1.0, 1.2, 0.8]
    runs = {}
    for variant, lr in (("no BN", ics.VGG_LR["no BN"]), ("BN", ics.VGG_LR["BN"]), ("BN", ics.VGG_COMMON_LR)):
        f = 1.0 if variant == "no BN" else bn_factor
        runs[f"{variant}@{lr:g}"] = [
            {"variant": variant, "lr": lr, "trains": True,
             **{k: b * f * (1 + (noise if variant == "BN" else 0.0) * (-1) ** i) for k in ("loss", "grad_norm", "loss_range", "grad_pred", "beta",
                                                               "rel_loss_range", "rel_grad_pred", "norm_beta")}}
            for i, b in enumerate(base)]
    return {"runs": runs}


@pytest.mark.parametrize(
    "bn_factor, noise, rule",
    [(0.5, 0.0, "smoother"),    # BN consistently half: resolved lower on every measure
     (2.0, 0.0, "rougher"),
     (0.9, 0.5, "neither"),     # a 10 % effect inside ±50 % seed noise of BN: the noise rule resolves nothing
     (1.0, 0.0, "neither")],
)
def test_regime_comparisons_follow_the_paired_noise_rule(bn_factor, noise, rule):
    got = ics.regime_comparisons(_vsweep(bn_factor, noise))
    assert set(got) == {"own", "common"}
    assert (got["own"]["lr_bn"], got["own"]["lr_plain"]) == (ics.VGG_LR["BN"], ics.VGG_LR["no BN"])
    assert got["common"]["lr_bn"] == got["common"]["lr_plain"] == ics.VGG_COMMON_LR
    for regime in got.values():
        assert regime["raw_rule"] == regime["norm_rule"] == rule
        c = regime["raw"]["beta"]  # compared on a log scale: exp(diff) is the BN / no-BN ratio
        assert c.paired and c.n == 3
        if noise == 0:
            assert math.exp(c.diff) == pytest.approx(bn_factor) and c.half == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "a, b, ratio, sign",
    [([1.0, 2.0, 4.0], [2.0, 4.0, 8.0], 0.5, -1),                  # exactly half in every seed: resolved lower
     ([1.0, 110.0, 0.9], [2.0, 200.0, 2.0], (0.5 * 0.55 * 0.45) ** (1 / 3), -1),  # a large seed weighs no more
     ([1.0, 3.0, 0.5], [2.0, 1.0, 1.0], (0.5 * 3 * 0.5) ** (1 / 3), 0),
     ([1.0, 0.0, 2.0], [2.0, 1.0, 4.0], 0.5, 0)],                 # a zero drops its seed; two left, equal ratios
)
def test_log_compare_is_the_paired_rule_on_ratios(a, b, ratio, sign):
    c = ics.log_compare(a, b)
    assert math.exp(c.diff) == pytest.approx(ratio)
    assert c.sign == sign or (sign == 0 and not c.resolved) or (a[1] == 0.0 and c.n == 2)
    assert c.paired and c.names == ("BN", "no BN")
    text = ics.ratio_text(c)
    assert f"ratio {ratio:.2g}×" in text and ("n = " in text)


def test_geomean():
    assert ics.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert ics.geomean([2.0, float("nan"), 0.0, 8.0]) == pytest.approx(4.0)
    assert math.isnan(ics.geomean([]))


def test_smooths_at_adds_the_normalized_rule_when_measured():
    runs = {}
    for key, level in (("4-bn", 1.0), ("4-plain", 2.0)):
        runs[key] = {k: [level, level * 1.05, level * 0.95]
                     for k in ("ics_l2", "loss_range", "grad_pred", "beta", "rel_loss_range", "rel_grad_pred", "norm_beta")}
    got = ics.smooths_at({"depths": [4], "runs": runs})[4]
    assert got["smoother"] and got["norm_rule"] == "smoother"
    assert set(got["norm_cmp"]) == {k for k, _ in ics.NORM_MEASURES}


@pytest.mark.parametrize(
    "noisy_bn, bn, own, common, verdict",
    [([88.0, 89.0, 90.0], [88.2, 88.8, 90.1], "smoother", "smoother", "Yes"),
     ([88.0, 89.0, 90.0], [88.2, 88.8, 90.1], "smoother", "neither", "Partly"),
     ([88.0, 89.0, 90.0], [88.2, 88.8, 90.1], "neither", "neither", "Partly"),
     ([80.0, 81.0, 80.5], [88.0, 89.0, 88.5], "smoother", "smoother", "No"),     # noisy BN resolved worse
     ([88.0], [89.0], "smoother", "smoother", "Not at this budget")],             # one seed resolves nothing
)
def test_section_4_glance_verdict(noisy_bn, bn, own, common, verdict):
    from batchnorm.lab.stats import compare

    noisy = compare(noisy_bn, bn, paired=True, names=("noisy BN", "BN"))
    assert ics.glance_verdict(noisy, own, common) == verdict
