"""batchnorm.adapt (covariate-shift adaptation of BN statistics) and batchnorm.prediction_time_bn."""

from __future__ import annotations

import copy
import doctest
import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm as bn


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _source_layer(c: int = 3, cls=nn.BatchNorm1d, **kw) -> nn.Module:
    """A BN layer with non-trivial source statistics and affine parameters, in eval mode."""
    g = torch.Generator().manual_seed(1)
    layer = cls(c, **kw)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(c, generator=g))
        layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        if getattr(layer, "weight", None) is not None:
            layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(c, generator=g))
    return layer.eval()


def _cnn(norm=nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), norm(4), nn.ReLU(), nn.Conv2d(4, 6, 3), norm(6), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    model.train()
    with torch.no_grad():  # source statistics from "clean" data
        for _ in range(5):
            model(torch.randn(16, 1, 8, 8))
    return model.eval()


def _shifted(n: int = 40, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g) * 2.5 + 1.0


# -- the formula -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prior", [0, 3, 8.5, 100])
def test_closed_form_on_tiny_data(prior):
    layer = _source_layer()
    mu_s, var_s = layer.running_mean.double().clone(), layer.running_var.double().clone()
    x = torch.tensor([[1.0, 2.0, -1.0], [3.0, 0.0, 0.5], [2.0, 5.0, 4.0], [0.0, 1.0, 1.5], [4.0, -2.0, 0.0]])
    report = bn.adapt(layer, [x[:2], (x[2:], torch.zeros(3))], prior=prior)   # a tensor batch and an (x, y) batch
    n = 5
    w = n / (prior + n)
    xd = x.double().numpy()
    mean_t, var_t = xd.mean(0), xd.var(0, ddof=1)   # exact over all batches, unbiased
    np.testing.assert_allclose(layer.running_mean.numpy(), (1 - w) * mu_s.numpy() + w * mean_t, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), (1 - w) * var_s.numpy() + w * var_t, rtol=1e-6, atol=1e-6)
    rec = report.records[0]
    assert (rec.samples, rec.values, report.batches, report.samples) == (5, 5, 2, 5)
    assert rec.target_weight == pytest.approx(w)
    sd_s = np.sqrt(var_s.numpy() + layer.eps)
    expected_shift = np.sqrt(np.mean(((mean_t - mu_s.numpy()) / sd_s) ** 2))
    assert rec.mean_shift == pytest.approx(expected_shift, rel=1e-6)


def test_prior_zero_is_the_statistics_of_the_whole_target_set():
    layer = _source_layer(4, bn.BatchNorm, axis=-1)
    x = torch.randn(37, 5, 4) * 3 - 2  # (N, L, C), uneven batches
    bn.adapt(layer, list(x.split(10)), prior=0)
    flat = x.reshape(-1, 4).double()
    torch.testing.assert_close(layer.running_mean.double(), flat.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), flat.var(0), rtol=1e-6, atol=1e-6)


def test_prior_zero_on_a_deep_model_equals_recalibrate_on_the_target_data():
    model = _cnn()
    x = _shifted()
    a, r = copy.deepcopy(model), copy.deepcopy(model)
    bn.adapt(a, list(x.split(16)), prior=0)
    bn.recalibrate(r, list(x.split(16)), progress=False)
    for (k, va), vr in zip(a.state_dict().items(), r.state_dict().values()):
        torch.testing.assert_close(va.double(), vr.double(), rtol=1e-5, atol=1e-6, msg=k)


def test_prior_none_is_a_no_op_that_measures_the_shift():
    model = _cnn()
    model[2].train()  # a non-BN module in train mode: modes are kept as they were
    state = _state(model)
    modes = [m.training for m in model.modules()]
    report = bn.adapt(model, [_shifted()], prior=None)
    assert _same_state(model, state)
    assert [m.training for m in model.modules()] == modes
    assert [r.name for r in report] == ["1", "4"]
    assert all(r.target_weight == 0.0 for r in report)
    assert report["1"].mean_shift > 0.1  # the shifted data are far from the source statistics
    inf = bn.adapt(model, [_shifted()], prior=math.inf)
    assert _same_state(model, state) and inf["1"].mean_shift == pytest.approx(report["1"].mean_shift)


def test_adapt_changes_only_running_statistics_and_keeps_modes():
    model = _cnn().train()
    state = _state(model)
    bn.adapt(model, [_shifted()], prior=8)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        changed = not torch.equal(v, state[k])
        assert changed == (k.endswith("running_mean") or k.endswith("running_var")), k


def test_one_batch_adapt_then_eval_matches_prediction_time_bn():
    model = _cnn()
    x = _shifted(64)
    with bn.prediction_time_bn(model, prior=16):
        y_pt = model(x)
    adapted = copy.deepcopy(model)
    bn.adapt(adapted, [x], prior=16)
    # adapt stores the unbiased variance; prediction-time BN normalizes with the biased one (as training)
    torch.testing.assert_close(adapted(x), y_pt, rtol=1e-3, atol=1e-3)


# -- layers: torch's and ours, frozen ones ------------------------------------------------------------
BN_KINDS = {
    "torch BatchNorm2d": nn.BatchNorm2d,
    "torch SyncBatchNorm": nn.SyncBatchNorm,
    "BatchNorm2d": bn.BatchNorm2d,
    "BatchNorm": bn.BatchNorm,
    "BatchRenorm": bn.BatchRenorm,
    "GhostBatchNorm": lambda c: bn.GhostBatchNorm(c, virtual_batch_size=4),
    "SyncBatchNorm": bn.SyncBatchNorm,
}


@pytest.mark.parametrize("kind", list(BN_KINDS))
@pytest.mark.parametrize("prior", [0, 16])
def test_parity_between_torch_and_our_layers(kind, prior):
    reference, model = _cnn(nn.BatchNorm2d), _cnn(BN_KINDS[kind])
    model.load_state_dict(reference.state_dict())
    x = _shifted()
    r_ref = bn.adapt(reference, list(x.split(16)), prior=prior)
    r = bn.adapt(model, list(x.split(16)), prior=prior)
    for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b.double(), a.double(), rtol=1e-5, atol=1e-6, msg=k)
    assert [(x.samples, x.values) for x in r] == [(x.samples, x.values) for x in r_ref]
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    with bn.prediction_time_bn(reference, prior=prior), bn.prediction_time_bn(model, prior=prior):
        torch.testing.assert_close(model(x[:8]), reference(x[:8]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm3d, bn.BatchNorm1d, bn.BatchNorm3d])
def test_1d_and_3d_layers(cls):
    rank = 5 if "3d" in cls.__name__ else 3
    layer = _source_layer(3, cls)
    x = torch.randn(6, 3, *([4] * (rank - 2))) + 2
    bn.adapt(layer, [x], prior=0)
    dims = [0] + list(range(2, rank))
    torch.testing.assert_close(layer.running_mean, x.mean(dims), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var, x.var(dims), rtol=1e-5, atol=1e-5)


def test_frozen_model_adapts_like_the_unfrozen_one():
    model = _cnn()
    frozen = bn.freeze(model)
    assert any(isinstance(m, bn.FrozenBatchNorm) for m in frozen.modules())
    params_before = {k: v.clone() for k, v in frozen.state_dict().items() if k.endswith(("weight", "bias"))}
    x = _shifted()
    bn.adapt(model, list(x.split(16)), prior=32)
    report = bn.adapt(frozen, list(x.split(16)), prior=32)
    assert [r.kind for r in report] == ["FrozenBatchNorm", "FrozenBatchNorm"]
    torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-5)
    for k, v in params_before.items():
        assert torch.equal(frozen.state_dict()[k], v), k
    with bn.prediction_time_bn(frozen, prior=0):
        y = frozen(x)
    assert not torch.allclose(y, frozen(x), atol=1e-3)  # batch statistics used inside the block only


def test_requires_grad_false_and_eval_backbone():
    model = _cnn()
    for p in model.parameters():
        p.requires_grad_(False)
    bn.adapt(model, [_shifted()], prior=0)
    torch.testing.assert_close(model[1].running_mean, model[0](_shifted()).mean((0, 2, 3)), rtol=1e-5, atol=1e-5)


# -- masks ------------------------------------------------------------------------------------------------
def test_masks_reach_the_layers_through_key():
    torch.manual_seed(0)
    layer = _source_layer(4, bn.BatchNorm, axis=-1)
    x = torch.randn(6, 7, 4) + 3
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])
    mask = torch.arange(7) < lengths[:, None]
    x[~mask] = 1e6  # padding that must not count
    report = bn.adapt(layer, [(x, mask)], prior=0, key=lambda b: (b[0], b[1]))
    real = x[mask].double()
    torch.testing.assert_close(layer.running_mean.double(), real.mean(0), rtol=1e-6, atol=1e-6)
    assert report.records[0].values == int(mask.sum()) and report.records[0].samples == 6


# -- prediction-time BN ----------------------------------------------------------------------------------
def test_prediction_time_bn_prior_zero_is_the_train_mode_output_and_restores_everything():
    model = _cnn(bn.BatchNorm2d)
    state = _state(model)
    x = _shifted(32)
    with bn.prediction_time_bn(model, prior=0) as m:
        assert m is model and not model[1].training
        y = model(x)
        y2 = model(x[:16])
    assert _same_state(model, state) and not model.training
    train_copy = copy.deepcopy(model).train()
    torch.testing.assert_close(y, train_copy(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, train_copy(x[:16]), rtol=1e-5, atol=1e-5)


def test_prediction_time_bn_mixes_with_the_prior():
    layer = _source_layer(3, bn.BatchNorm)
    x = torch.randn(10, 3) * 2 + 1
    prior = 6.0
    w = 10 / (prior + 10)
    mean = (1 - w) * layer.running_mean + w * x.mean(0)
    var = (1 - w) * layer.running_var + w * x.var(0, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias
    with bn.prediction_time_bn(layer, prior=prior):
        y = layer(x)
    torch.testing.assert_close(y, expected.detach(), rtol=1e-5, atol=1e-5)


def test_prediction_time_bn_restores_on_error_and_keeps_a_train_mode_model():
    model = _cnn().train()
    state = _state(model)
    with pytest.raises(RuntimeError, match="boom"), bn.prediction_time_bn(model, prior=4):
        model(_shifted(8))
        raise RuntimeError("boom")
    assert _same_state(model, state) and all(m.training for m in model.modules())


def test_prediction_time_bn_gradients_reach_the_input():
    model = _cnn()
    x = _shifted(8).requires_grad_(True)
    with bn.prediction_time_bn(model, prior=8):
        model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -- shared layers ------------------------------------------------------------------------------------
class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3).eval()
        self.other = nn.BatchNorm1d(3).eval()

    def forward(self, x):
        return self.other(self.bn(self.bn(x) * 2))


def test_a_layer_shared_between_calls_is_skipped_with_a_warning():
    model = _Shared()
    with pytest.warns(UserWarning, match="ran 2 times in one forward"):
        report = bn.adapt(model, [torch.randn(8, 3) + 5], prior=0)
    assert "bn" in report.skipped and [r.name for r in report] == ["other"]
    assert torch.equal(model.bn.running_mean, torch.zeros(3))
    assert not torch.equal(model.other.running_mean, torch.zeros(3))


# -- errors ---------------------------------------------------------------------------------------------
def test_error_for_layers_without_running_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) were built with track_running_stats=False"):
        bn.adapt(model, [torch.randn(4, 3)], prior=0)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        with bn.prediction_time_bn(model):
            pass


def test_error_for_a_model_without_bn():
    with pytest.raises(ValueError, match="found no batch-norm layer in Linear"):
        bn.adapt(nn.Linear(3, 3), [torch.randn(4, 3)], prior=0)


def test_error_for_an_empty_loader_leaves_the_model_unchanged():
    model = _cnn()
    state = _state(model)
    with pytest.raises(ValueError, match="adapt received no batches"):
        bn.adapt(model, [], prior=0)
    with pytest.raises(ValueError, match="adapt received no batches"):
        bn.adapt(model, iter([]), prior=0)
    assert _same_state(model, state)


def test_error_for_a_padding_mask_the_model_would_not_get():
    layer = _source_layer(4, bn.BatchNorm, axis=-1)
    x, mask = torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"element 1 is a boolean tensor of shape \(3, 5\), like a padding mask"):
        bn.adapt(layer, [(x, mask)], prior=0)
    bn.adapt(layer, [(x, torch.zeros(3, dtype=torch.bool))], prior=0)  # bool labels (N,) are labels


def test_error_for_dict_batches_without_key_and_bad_keys():
    layer = _source_layer()
    with pytest.raises(TypeError, match=r"dict batch \(keys \['x', 'y'\]\).*Pass key='x'"):
        bn.adapt(layer, [{"x": torch.randn(4, 3), "y": torch.zeros(4)}], prior=0)
    with pytest.raises(TypeError, match="could not take key='image'"):
        bn.adapt(layer, [{"x": torch.randn(4, 3)}], prior=0, key="image")
    with pytest.raises(TypeError, match="expected key to be None, a str/int index"):
        bn.adapt(layer, [torch.randn(4, 3)], prior=0, key=1.5)
    report = bn.adapt(layer, [{"x": torch.randn(4, 3), "y": torch.zeros(4)}], prior=0, key="x")
    assert report.samples == 4


@pytest.mark.parametrize("prior", [-1, float("nan"), "16", True])
def test_error_for_a_bad_prior(prior):
    with pytest.raises(ValueError, match="expected prior to be a number >= 0"):
        bn.adapt(_source_layer(), [torch.randn(4, 3)], prior=prior)
    with pytest.raises(ValueError, match="expected prior to be a number >= 0"):
        with bn.prediction_time_bn(_source_layer(), prior=prior):
            pass
    with pytest.raises(ValueError, match="expected prior to be a number >= 0"), bn.prediction_time_bn(_source_layer(), prior=None):
        pass


def test_error_for_one_value_per_feature_with_prior_zero_and_nothing_changed():
    layer = _source_layer()
    state = _state(layer)
    with pytest.raises(ValueError, match=r"prior=0 normalizes with batch statistics only.*1 value\(s\) per feature"):
        with bn.prediction_time_bn(layer, prior=0):
            layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="Use batches of at least 2 samples, or prior > 0"):
        bn.adapt(layer, [torch.randn(5, 3), torch.randn(1, 3)], prior=0)
    assert _same_state(layer, state)
    with bn.prediction_time_bn(layer, prior=4):  # with a prior, one sample is mixed in
        y = layer(torch.randn(1, 3))
    assert torch.isfinite(y).all()


def test_error_for_bad_num_batches():
    with pytest.raises(ValueError, match="num_batches to be None or a positive int, got 0"):
        bn.adapt(_source_layer(), [torch.randn(4, 3)], prior=0, num_batches=0)


# -- properties -----------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(prior=st.floats(min_value=0, max_value=1e12, allow_nan=False),
       n=st.integers(min_value=2, max_value=20), seed=st.integers(0, 2**16))
def test_property_mixture_between_source_and_target(prior, n, seed):
    layer = _source_layer(2)
    mu_s, var_s = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) * 3 + 4
    bn.adapt(layer, [x], prior=prior)
    w = n / (prior + n)
    torch.testing.assert_close(layer.running_mean, (1 - w) * mu_s + w * x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var, (1 - w) * var_s + w * x.var(0), rtol=1e-5, atol=1e-5)
    if prior >= 1e9:  # prior -> infinity keeps the source statistics
        torch.testing.assert_close(layer.running_mean, mu_s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var_s, rtol=1e-6, atol=1e-6)


# -- docs -------------------------------------------------------------------------------------------------
def _doc_cases():
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(importlib.import_module("batchnorm.tools.adapt")) if t.examples]


@pytest.mark.parametrize("test", _doc_cases(), ids=lambda t: t.name)
def test_docstring_examples_run(test):
    torch.manual_seed(0)
    test.globs = {"torch": torch, **vars(importlib.import_module("batchnorm.tools.adapt"))}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda s: None)
    assert runner.summarize(verbose=False).failed == 0


def test_docstrings_were_found_and_exported():
    assert {t.name.rsplit(".", 1)[-1] for t in _doc_cases()} >= {"adapt", "prediction_time_bn"}
    assert bn.adapt is bn.tools.adapt and "adapt" in bn.__all__ and "prediction_time_bn" in bn.__all__
