"""Model tools: fold, recalibrate, convert, freeze/unfreeze, against closed forms and the unfolded model."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    SyncBatchNorm,
    convert,
    fold,
    freeze,
    recalibrate,
    unfreeze,
    zoo,
)
from batchnorm.tools import is_bn_like


def randomize(model: nn.Module, scale: float = 2.0) -> nn.Module:
    """Running statistics and affine parameters far from their defaults (mean 0, var 1, γ 1, β 0)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if is_bn_like(m):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * scale + 1.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 4 * scale + 0.05)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g) * 2)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def bn_names(model: nn.Module, kind=None) -> set[str]:
    return {n for n, m in model.named_modules() if is_bn_like(m) and (kind is None or isinstance(m, kind))}


# -- models -------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetish(nn.Module):
    """Residual blocks, BN after conv, BN after a transposed conv, a BN after the residual sum
    (nothing to fold into: frozen), and a BN before the linear head (folded into the head)."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn0 = BatchNorm(c)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.post = BatchNorm(c)
        self.up = nn.ConvTranspose2d(c, 6, 2, stride=2, groups=2, bias=False)
        self.bn_up = nn.BatchNorm2d(6)
        self.head_bn = nn.BatchNorm1d(c + 6)
        self.fc = nn.Linear(c + 6, classes)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn0(self.stem(x))))
        x = self.post(x)
        u = torch.relu(self.bn_up(self.up(x))).mean((2, 3))
        return self.fc(self.head_bn(torch.cat([x.mean((2, 3)), u], 1)))


RESNET_EXPECTED = {
    "bn0": ("folded_into_previous", "stem"),
    "blocks.0.bn1": ("folded_into_previous", "blocks.0.conv1"),
    "blocks.0.bn2": ("folded_into_previous", "blocks.0.conv2"),
    "blocks.1.bn1": ("folded_into_previous", "blocks.1.conv1"),
    "blocks.1.bn2": ("folded_into_previous", "blocks.1.conv2"),
    "post": ("frozen", None),
    "bn_up": ("folded_into_previous", "up"),
    "head_bn": ("folded_into_next", "fc"),
}


class MLP(nn.Module):
    """Linear → BN (ours and torch's), BN → Linear, and a sequence model with axis=-1 on (N, L, C)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.bn2 = BatchNorm(16)
        self.bn3 = BatchNorm1d(16, affine=False)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.tanh(self.bn2(self.fc2(x)))
        return self.fc3(self.bn3(x))


MLP_EXPECTED = {
    "bn1": ("folded_into_previous", "fc1"),
    "bn2": ("folded_into_previous", "fc2"),
    "bn3": ("folded_into_next", "fc3"),
}


class SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.bn = BatchNorm(8, axis=-1)
        self.out = nn.Linear(8, 3)

    def forward(self, x):  # (N, L, 6)
        return self.out(torch.relu(self.bn(self.proj(x))))


def seq(*mods):
    return nn.Sequential(*mods)


class Twice(nn.Module):
    """The conv output is used by the BN and by a skip path: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        z = self.conv(x)
        return self.bn(z) + z


class SharedConv(nn.Module):
    """One conv called twice: folding a BN into it would change the other call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 1)
        self.bn = BatchNorm(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class TiedWeights(nn.Module):
    """Two convs share one weight Parameter: folding a BN into one would change the other."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 3, 1)
        self.b = nn.Conv1d(3, 3, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class ReadsWeight(nn.Module):
    """forward reads the conv's weight directly (a get_attr in the graph)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3, padding=1)
        self.bn = BatchNorm(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


class Untraceable(nn.Module):
    """Control flow on values: torch.fx cannot trace it; the Sequential pairs are still folded."""

    def __init__(self):
        super().__init__()
        self.features = seq(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), BatchNorm(4), nn.Conv1d(4, 5, 1))
        self.lonely = BatchNorm(5)

    def forward(self, x):
        h = self.features(x)
        if h.sum() > 0:
            h = h * 2
        return self.lonely(h)


class UntraceableMLP(nn.Module):
    """BatchNorm1d → Linear → BatchNorm1d inside a Sequential of a model fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.body = seq(nn.BatchNorm1d(8), nn.Linear(8, 6), nn.BatchNorm1d(6))

    def forward(self, x):
        h = self.body(x)
        return h * 2 if h.sum() > 0 else h


class TiedSequential(nn.Module):
    """Untraceable (control flow); inside a plain Sequential, the conv's weight is tied to another module's."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3))
        self.twin = nn.Conv1d(3, 3, 1)
        self.twin.weight = self.body[0].weight

    def forward(self, x):
        y = self.body(x)
        return y + self.twin(x) if x.sum() > -1e9 else y


def with_ours() -> nn.Module:
    """Non-BN layers of this package around a foldable pair: fx must keep them as leaves, not trace them."""
    scaler = batchnorm.Standardizer(3)
    scaler.partial_fit(torch.randn(16, 3, 8) * 3 + 1)
    return seq(scaler, nn.Conv1d(3, 4, 3), BatchNorm(4), batchnorm.AffineOnly(4))


FOLD_CASES = [
    # (id, builder, input shape, {bn: (action, target)})
    ("conv1d", lambda: seq(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (4, 3, 9), {"1": ("folded_into_previous", "0")}),
    ("conv3d-ours", lambda: seq(nn.Conv3d(2, 4, 3, padding=1, bias=False), BatchNorm(4)), (2, 2, 4, 4, 4),
     {"1": ("folded_into_previous", "0")}),
    ("convT1d-groups", lambda: seq(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), BatchNorm(6)), (2, 4, 7),
     {"1": ("folded_into_previous", "0")}),
    ("convT3d", lambda: seq(nn.ConvTranspose3d(3, 2, 2, stride=2), nn.BatchNorm3d(2)), (2, 3, 2, 3, 2),
     {"1": ("folded_into_previous", "0")}),
    ("grouped-conv2d", lambda: seq(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 6, 6),
     {"1": ("folded_into_previous", "0")}),
    ("bn-then-1x1-grouped", lambda: seq(nn.ReLU(), BatchNorm(4), nn.Conv2d(4, 6, 1, stride=2, groups=2)),
     (2, 4, 5, 5), {"1": ("folded_into_next", "2")}),
    ("bn-then-padded-1x1", lambda: seq(nn.ReLU(), BatchNorm(4), nn.Conv2d(4, 6, 1, padding=1)), (2, 4, 5, 5),
     {"1": ("frozen", None)}),
    ("bn-then-3x3", lambda: seq(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3)), (2, 4, 5, 5),
     {"1": ("frozen", None)}),
    ("affine-false", lambda: seq(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False)), (6, 5),
     {"1": ("folded_into_previous", "0")}),
    ("linear-axis-last", SeqModel, (3, 7, 6), {"bn": ("folded_into_previous", "proj")}),
    ("conv-output-reused", Twice, (2, 3, 8), {"bn": ("frozen", None)}),
    ("shared-conv", SharedConv, (2, 3, 8), {"bn": ("frozen", None)}),
    ("tied-weights", TiedWeights, (2, 3, 8), {"bn": ("frozen", None)}),
    ("reads-weight", ReadsWeight, (2, 3, 8), {"bn": ("frozen", None)}),
    ("tied-fallback", TiedSequential, (2, 3, 8), {"body.1": ("frozen", None)}),
    ("ghost-and-renorm", lambda: seq(nn.Conv1d(3, 4, 3), GhostBatchNorm(4, 2), nn.ReLU(), nn.Conv1d(4, 4, 1),
                                     BatchRenorm(4)), (4, 3, 8),
     {"1": ("folded_into_previous", "0"), "4": ("folded_into_previous", "3")}),
    ("frozen-input", lambda: seq(nn.Conv1d(3, 4, 3), FrozenBatchNorm(4)), (2, 3, 8),
     {"1": ("folded_into_previous", "0")}),
    ("fused-activation", lambda: seq(nn.Conv1d(3, 4, 3), BatchNorm(4, activation="relu"), nn.Conv1d(4, 4, 1),
                                     BatchNorm(4, activation="leaky_relu", negative_slope=0.2)), (3, 3, 8),
     {"1": ("folded_into_previous", "0"), "3": ("folded_into_previous", "2")}),
    ("with-other-layers-of-ours", lambda: with_ours(), (3, 3, 8),
     {"2": ("folded_into_previous", "1")}),
    ("untraceable", Untraceable, (3, 2, 8),
     {"features.1": ("folded_into_previous", "features.0"), "features.3": ("folded_into_next", "features.4"),
      "lonely": ("frozen", None)}),
    # a linear / 1x1 conv absorbs the BN before it (input side) and the one after it (output side)
    ("bn-linear-bn", lambda: seq(nn.BatchNorm1d(8), nn.Linear(8, 6), nn.BatchNorm1d(6)), (5, 8),
     {"0": ("folded_into_next", "1"), "2": ("folded_into_previous", "1")}),
    ("bn-1x1-bn", lambda: seq(nn.ReLU(), BatchNorm(4), nn.Conv2d(4, 6, 1, groups=2), nn.BatchNorm2d(6)), (2, 4, 5, 5),
     {"1": ("folded_into_next", "2"), "3": ("folded_into_previous", "2")}),
    ("bn-linear-bn-axis-last", lambda: seq(BatchNorm(6, axis=-1), nn.Linear(6, 4), BatchNorm(4, axis=-1)),
     (3, 7, 6), {"0": ("folded_into_next", "1"), "2": ("folded_into_previous", "1")}),
    ("bn-linear-bn-fallback", UntraceableMLP, (5, 8),
     {"body.0": ("folded_into_next", "body.1"), "body.2": ("folded_into_previous", "body.1")}),
    ("resnet", ResNetish, (3, 3, 8, 8), RESNET_EXPECTED),
    ("mlp", MLP, (9, 12), MLP_EXPECTED),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", FOLD_CASES, ids=[c[0] for c in FOLD_CASES])
def test_fold_matches_eval_outputs_and_reports(case, dtype):
    _, build, shape, expected = case
    model = randomize(build()).to(dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(shape, dtype=dtype) * 2
    with torch.no_grad():
        want = model(x)
        folded, records = fold(model, report=True)
        got = folded(x)
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-10)
    assert {r.bn: (r.action, r.target) for r in records} == expected
    # no BN layer remains where folding applied; every other BN is a FrozenBatchNorm
    folded_names = {k for k, (action, _) in expected.items() if action.startswith("folded")}
    assert not (bn_names(folded) & folded_names)
    assert bn_names(folded) == bn_names(folded, FrozenBatchNorm) == set(expected) - folded_names
    # the original model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not isinstance(m, FrozenBatchNorm) or isinstance(build().get_submodule(n), FrozenBatchNorm)
               for n, m in model.named_modules() if n)


def test_fold_traces_models_with_other_layers_of_ours():
    model = randomize(with_ours()).eval()
    folded, records = fold(model, report=True)
    assert isinstance(folded, torch.fx.GraphModule) and "fx could not trace" not in records[0].reason


def test_fold_untraceable_reports_why():
    model = randomize(Untraceable()).eval()
    _, records = fold(model, report=True)
    assert all("fx could not trace" in r.reason for r in records)
    assert "not next to a foldable conv/linear" in {r.bn: r.reason for r in records}["lonely"]


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: seq(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)).train(), "in training mode"),
        (lambda: seq(nn.Conv1d(3, 4, 3), BatchNorm(4, track_running_stats=False)).eval(),
         r"it has no running statistics \(built with track_running_stats=False\)"),
    ],
)
def test_fold_skips_batch_statistics_layers(build, reason):
    model = build()
    with pytest.warns(UserWarning, match=f"fold: 1 BN layer\\(s\\) were left unchanged: '1': {reason}"):
        folded, records = fold(model, report=True)
    assert [(r.bn, r.action) for r in records] == [("1", "skipped")]
    assert type(folded.get_submodule("1")) is type(model[1])


@pytest.mark.parametrize("traceable", [True, False])
def test_fold_fused_activation_stays_a_module(traceable):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = seq(nn.Conv1d(3, 4, 3), BatchNorm(4, activation="gelu"), nn.ReLU(), BatchNorm(4, activation="silu"))

        def forward(self, x):
            if not traceable and x.sum() > 1e9:
                x = -x
            return self.body(x)

    model = randomize(Net()).eval()
    folded, records = fold(model, report=True)
    assert [(r.bn, r.action) for r in records] == [("body.1", "folded_into_previous"), ("body.3", "frozen")]
    assert all("fused activation is kept as" in r.reason for r in records) or not traceable
    acts = {type(m).__name__ for m in folded.modules()}
    assert {"GELU", "SiLU", "FrozenBatchNorm"} <= acts and "BatchNorm" not in acts
    x = torch.randn(4, 3, 9)
    assert rel_err(folded(x), model(x)) < 1e-5


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, BatchNorm])
def test_fold_example_input_fixes_the_rank(bn_cls):
    # BN(axis=1) on the (N, L, C) output of a Linear with L == C normalizes L: folding into the Linear would be
    # wrong. torch's layer records no rank, so only example_input can tell.
    model = randomize(seq(nn.Linear(4, 5), bn_cls(5))).eval()
    x = torch.randn(3, 5, 4)
    folded, records = fold(model, report=True, example_input=x)
    assert records[0].action == "frozen"
    assert rel_err(folded(x), model(x)) < 1e-5
    flat = torch.randn(6, 4)
    _, records = fold(model, report=True, example_input=(flat,))
    assert records[0].action == "folded_into_previous"


def conv_chain(depth: int, var_lo: float, var_hi: float) -> nn.Module:
    """conv → BN → ReLU6, ``depth`` times (8 channels); running variances in [var_lo, var_hi]: the smaller
    they are, the more every layer amplifies (the network's own round-off grows with them)."""
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Conv2d(8 if i else 3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=g) * 0.1)
                m.running_var.copy_(var_lo + (var_hi - var_lo) * torch.rand(8, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(8, generator=g))
                m.bias.copy_(0.3 * torch.randn(8, generator=g))
    return model.eval()


# id, model, does its own float32 round-off exceed the old fixed bound (1e-5 relative)?
DEEP_CASES = [
    ("well-conditioned-30", lambda: conv_chain(30, 0.5, 1.5), False),
    ("amplifying-50", lambda: conv_chain(50, 0.05, 0.3), True),
    ("zoo-mobilenet", lambda: convert(zoo.mobilenet_v2_tiny()).eval(), False),
]


@pytest.mark.parametrize("case", DEEP_CASES, ids=[c[0] for c in DEEP_CASES])
def test_fold_deep_float32_round_off_does_not_warn(case):
    _, build, beyond_old_bound = case
    model = build()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fold(model, example_input=x)
    with torch.no_grad():
        err = rel_err(folded(x), model(x))
    assert (err > 1e-5) == beyond_old_bound  # the amplifying chain would have warned under a fixed 1e-5


@pytest.mark.parametrize("case", DEEP_CASES[:2], ids=[c[0] for c in DEEP_CASES[:2]])
@pytest.mark.parametrize("error", [1e-3, 1e-2])
def test_fold_wrong_fold_still_warns(case, error, monkeypatch):
    fold_mod = importlib.import_module("batchnorm.tools.fold")
    right = fold_mod._fold_into_previous
    monkeypatch.setattr(fold_mod, "_fold_into_previous", lambda layer, a, b: right(layer, a * (1 + error), b))
    with pytest.warns(UserWarning, match=r"differs from the original by .* more than round-off allows"):
        fold(case[1](), example_input=torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize(
    "dtype, depth, own, expected",
    [
        (torch.float32, 100, None, 16 * 2.0**-23 * 10),  # k · eps · sqrt(depth)
        (torch.float32, 100, 1e-3, 8e-3),  # an amplifying network: 8 × its own round-off
        (torch.float32, 100, 1e-9, 16 * 2.0**-23 * 10),  # own round-off below the floor: the floor
        (torch.float64, 4, None, 16 * 2.0**-52 * 2),
        (torch.bfloat16, 1, None, 16 * 2.0**-7),
    ],
)
def test_fold_tolerance_rule(dtype, depth, own, expected):
    fold_mod = importlib.import_module("batchnorm.tools.fold")
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(depth)])
    assert fold_mod._tolerance(model, torch.zeros(1, dtype=dtype), own) == pytest.approx(expected)


def test_fold_example_input_checks_the_result(monkeypatch):
    import importlib

    fold_mod = importlib.import_module("batchnorm.tools.fold")
    monkeypatch.setattr(fold_mod, "_fold_into_previous", lambda layer, a, b: None)  # a broken fold
    model = randomize(seq(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4))).eval()
    with pytest.warns(UserWarning, match=r"fold: on example_input the folded model differs from the original by"):
        fold(model, example_input=torch.randn(2, 3, 8))


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, BatchNorm])
def test_fold_and_recalibrate_follow_buffers_not_the_flag(bn_cls):
    # as in torch, eval normalizes with the running buffers whenever they exist, even after
    # track_running_stats is switched off on a built layer (it only stops the updates)
    model = randomize(seq(nn.Conv1d(3, 4, 3), bn_cls(4))).eval()
    model[1].track_running_stats = False
    x = torch.randn(2, 3, 8)
    folded, records = fold(model, report=True)
    assert records[0].action == "folded_into_previous"
    assert rel_err(folded(x), model(x)) < 1e-5
    converted = convert(model, to=BatchNorm if bn_cls is nn.BatchNorm1d else nn.BatchNorm1d)
    assert converted[1].track_running_stats is False and converted[1].running_mean is not None
    torch.testing.assert_close(converted(x), model(x))
    report = recalibrate(model, [x * 2 + 1], progress=False)
    assert report.recalibrated == ["1"]
    torch.testing.assert_close(model[1].running_mean, model[0](x * 2 + 1).mean((0, 2)).detach())


def test_fold_uses_recorded_rank_for_axis_one_after_linear():
    # BatchNorm(axis=1) after a Linear on (N, L, C) normalizes L, not the Linear's features: never fold it
    model = seq(nn.Linear(4, 5), BatchNorm(5)).eval()
    randomize(model)
    x = torch.randn(3, 5, 4)
    model(x)  # records last_input_shape (rank 3)
    folded, records = fold(model, report=True)
    assert records[0].action == "frozen"
    assert rel_err(folded(x), model(x)) < 1e-5


# -- recalibrate ----------------------------------------------------------------------------------
class TwoBN(nn.Module):
    def __init__(self, bn1=None, bn2=None):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.bn1 = bn1 if bn1 is not None else nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 4)
        self.bn2 = bn2 if bn2 is not None else BatchNorm(4)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.bn2(self.fc2(torch.relu(self.bn1(self.drop(self.fc1(x))))))


def population_by_hand(model: TwoBN, batches: list[torch.Tensor]):
    """Concatenate every batch's BN inputs (train-mode forward written out) and take mean / unbiased var."""
    h1s, h2s = [], []
    with torch.no_grad():
        for x in batches:
            h1 = model.fc1(x)
            z = (h1 - h1.mean(0)) / torch.sqrt(h1.var(0, unbiased=False) + model.bn1.eps)
            z = z * model.bn1.weight + model.bn1.bias
            h2 = model.fc2(torch.relu(z))
            h1s.append(h1)
            h2s.append(h2)
    h1, h2 = torch.cat(h1s), torch.cat(h2s)
    return (h1.mean(0), h1.var(0)), (h2.mean(0), h2.var(0))


BATCH_FORMATS = [
    ("tensor", lambda x: x, None),
    ("tuple", lambda x: (x, torch.zeros(len(x))), None),
    ("list", lambda x: [x, torch.zeros(len(x))], None),
    ("dict", lambda x: {"image": x, "label": torch.zeros(len(x))}, "image"),
    ("callable", lambda x: {"nested": (x,)}, lambda b: b["nested"][0]),
]


@pytest.mark.parametrize("fmt", BATCH_FORMATS, ids=[f[0] for f in BATCH_FORMATS])
def test_recalibrate_equals_population_statistics(fmt):
    _, wrap, key = fmt
    model = TwoBN().double()
    randomize(model)
    model.bn1.momentum = 0.3
    model.eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 3 + 2 for n in (7, 5, 3, 11)]
    params = {k: v.clone() for k, v in model.named_parameters()}
    (m1, v1), (m2, v2) = population_by_hand(model, batches)
    report = recalibrate(model, [wrap(b) for b in batches], progress=False, input_key=key)
    assert report.recalibrated == ["bn1", "bn2"] and report.skipped == {} and report.batches == 4
    assert report.counts == {"bn1": 26, "bn2": 26}
    for bn, mean, var in ((model.bn1, m1, v1), (model.bn2, m2, v2)):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-10)
        assert int(bn.num_batches_tracked) == 0  # counts training steps; recalibration is not one
    # not the mean of per-batch variances (that misses the spread of the batch means)
    naive = torch.stack([model.fc1(b).var(0) for b in batches]).mean(0)
    assert not torch.allclose(naive, model.bn1.running_var, rtol=1e-3)
    # parameters, modes and momentum untouched
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]) and v.grad is None
    assert not any(m.training for m in model.modules())
    assert model.bn1.momentum == 0.3 and model.bn2.momentum == 0.1


def test_recalibrate_keeps_renorm_warmup_clock():
    model = TwoBN(bn1=BatchRenorm(6, warmup_steps=100)).double()
    model(torch.randn(8, 5, dtype=torch.float64))  # one training step: the clock reads 1
    recalibrate(model, [torch.randn(8, 5, dtype=torch.float64) for _ in range(3)], progress=False)
    assert int(model.bn1.num_batches_tracked) == 1 and int(model.bn2.num_batches_tracked) == 1


def test_recalibrate_num_batches_and_restores_train_mode():
    model = TwoBN().double().train()
    model.fc2.eval()  # a mixed-mode model comes back mixed
    batches = [torch.randn(6, 5, dtype=torch.float64) for _ in range(5)]
    report = recalibrate(model, iter(batches), num_batches=2, progress=False)
    (m1, v1), _ = population_by_hand(model, batches[:2])
    torch.testing.assert_close(model.bn1.running_mean, m1)
    torch.testing.assert_close(model.bn1.running_var, v1)
    assert report.batches == 2
    assert model.training and model.bn1.training and not model.fc2.training


def test_recalibrate_masked_and_ghost_layers():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = GhostBatchNorm(3, 2, axis=-1)
            self.renorm = BatchRenorm(3, axis=-1)

        def forward(self, x, mask):
            return self.renorm(self.bn(x, mask=mask))

    model = Masked().double()
    g = torch.Generator().manual_seed(5)
    batches = []
    for n in (4, 3):
        x = torch.randn(n, 6, 3, generator=g, dtype=torch.float64) * 2 + 1
        mask = torch.arange(6) < torch.randint(1, 7, (n, 1), generator=g)
        batches.append((x, mask))
    report = recalibrate(model, batches, progress=False, input_key=lambda b: b)
    assert report.recalibrated == ["bn", "renorm"]
    valid = torch.cat([x[m] for x, m in batches])  # (positions that count, 3)
    torch.testing.assert_close(model.bn.running_mean, valid.mean(0))
    torch.testing.assert_close(model.bn.running_var, valid.var(0))


def test_recalibrate_reports_shared_and_unused_layers():
    shared = BatchNorm(4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.shared = shared
            self.unused = BatchNorm(4)
            self.frozen = FrozenBatchNorm(4)
            self.stateless = nn.BatchNorm1d(4, track_running_stats=False)

        def forward(self, x):
            return self.frozen(self.stateless(self.shared(self.a(self.shared(x)))))

    model = Net()
    before = (shared.running_mean.clone(), shared.running_var.clone(), shared.num_batches_tracked.clone())
    with pytest.warns(UserWarning, match=r"recalibrate: 2 BN layer\(s\) were not recalibrated: 'shared': ran 2 times"):
        report = recalibrate(model, [torch.randn(8, 4) * 3 for _ in range(2)], progress=False)
    assert report.recalibrated == []
    assert set(report.skipped) == {"shared", "unused", "frozen", "stateless"}
    assert "never ran" in report.skipped["unused"]
    assert torch.equal(shared.running_mean, before[0]) and torch.equal(shared.running_var, before[1])
    assert torch.equal(shared.num_batches_tracked, before[2])


@pytest.mark.parametrize(
    "data, kwargs, error, match",
    [
        ([{"x": torch.randn(3, 5)}], {}, ValueError, "dict batch with keys \\['x'\\] and no input_key"),
        ([object()], {}, TypeError, "expected batches that are tensors, tuples/lists"),
        ([torch.randn(3, 5)], {"num_batches": 0}, ValueError, "num_batches to be None or a positive int, got 0"),
    ],
)
def test_recalibrate_errors(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        recalibrate(TwoBN(), data, progress=False, **kwargs)


def test_recalibrate_recovers_ema_broken_model():
    """Trained with a far-too-slow EMA (momentum 1e-3): eval is bad; precise BN restores train-mode accuracy."""
    from batchnorm.lab.data import mnist1d

    x, y, xt, yt = mnist1d()
    x, xt = x * 4 + 3, xt * 4 + 3  # inputs far from mean 0 / var 1, so the stale estimates are far off
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2), BatchNorm(16, momentum=1e-3), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16, momentum=1e-3), nn.ReLU(), nn.MaxPool1d(2),
        nn.Flatten(), nn.Linear(16 * 10, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(2):
        for i in torch.randperm(len(x)).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()

    def accuracy(train_mode: bool) -> float:
        model.train(train_mode)
        with torch.no_grad():
            return float((model(xt).argmax(1) == yt).float().mean())

    train_acc = accuracy(True)
    broken = accuracy(False)
    recalibrate(model, [(x[i:i + 300], y[i:i + 300]) for i in range(0, len(x), 300)], progress=False)  # last: 100
    fixed = accuracy(False)
    assert train_acc > 0.5
    assert broken < train_acc - 0.2
    assert abs(fixed - train_acc) < 0.03


# -- convert / freeze / unfreeze ------------------------------------------------------------------
def mixed_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4), nn.Flatten(1), nn.Linear(4 * 36, 6), BatchNorm(6, bias=False),
    )


TARGETS = [BatchNorm, nn.BatchNorm2d, BatchRenorm, SyncBatchNorm]


def _stateful_names(m):
    return {n: t for n, t in m.state_dict().items()}


_RANK_OF = {nn.BatchNorm1d: batchnorm.BatchNorm1d, nn.BatchNorm2d: batchnorm.BatchNorm2d, nn.BatchNorm3d: batchnorm.BatchNorm3d}


@pytest.mark.parametrize("to", [BatchNorm, SyncBatchNorm, BatchRenorm])
def test_convert_carries_everything(to):
    model = randomize(mixed_model()).double()
    model[1].weight.requires_grad_(False)
    model[4].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = convert(model, to=to)
    for i in (1, 4, 7, 10):
        new, old = out[i], model[i]
        # to=BatchNorm builds our class of the torch source's rank (an instance of torch's class too)
        want = next((o for t, o in _RANK_OF.items() if isinstance(old, t)), to) if to is BatchNorm else to
        assert type(new) is want
        assert new.training == old.training and new.affine == old.affine
        assert new.eps == old.eps and new.momentum == old.momentum
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(new, name), getattr(old, name)
            assert (a is None) == (b is None), (i, name)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b)
        if new.weight is not None:
            assert new.weight.requires_grad == old.weight.requires_grad
    assert out[10].bias is None  # affine with bias=False stays so
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert type(model[1]) is nn.BatchNorm2d


def test_convert_round_trip_keeps_outputs_in_train_and_eval():
    model = randomize(mixed_model()[:6])  # the 4-D part: torch BatchNorm2d can take every layer
    ours = convert(model, to=BatchNorm)
    back = convert(ours, to=nn.BatchNorm2d)
    assert not bn_names(ours) - bn_names(ours, BatchNorm)
    assert all(type(m) is nn.BatchNorm2d for n, m in back.named_modules() if is_bn_like(m))
    x = torch.randn(5, 3, 8, 8)
    for mode in (False, True):
        outs = [m.train(mode)(x) for m in (model, ours, back)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1].running_var, model[1].running_var)  # updated alike in train mode


def test_freeze_unfreeze_round_trip():
    model = randomize(mixed_model()).eval()
    x = torch.randn(4, 3, 8, 8)
    frozen = freeze(model)
    assert bn_names(frozen) == bn_names(frozen, FrozenBatchNorm) == bn_names(model)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "." in n and is_bn_like(
        frozen.get_submodule(n.rsplit(".", 1)[0])))
    torch.testing.assert_close(frozen(x), model(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(frozen.train()(x), model(x), rtol=1e-6, atol=1e-6)  # frozen: same in train mode
    thawed = unfreeze(frozen.eval())
    assert bn_names(thawed) == bn_names(thawed, BatchNorm)
    assert all(p.requires_grad for p in thawed.parameters())
    torch.testing.assert_close(thawed(x), model(x), rtol=1e-6, atol=1e-6)
    assert int(thawed[1].num_batches_tracked) == 0


def test_convert_keeps_shared_layers_shared_and_top_level():
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), shared, nn.Linear(3, 3), shared)
    out = convert(model, to=BatchNorm)
    assert out[1] is out[3] and isinstance(out[1], BatchNorm)
    assert isinstance(convert(nn.BatchNorm1d(3), to=BatchNorm), BatchNorm)


def test_convert_passes_variant_settings():
    out = convert(seq(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)), to=GhostBatchNorm, virtual_batch_size=4)
    assert isinstance(out[1], GhostBatchNorm) and out[1].virtual_batch_size == 4
    # options the source has and the target takes are carried (kwargs still win)
    again = convert(out, to=GhostBatchNorm)
    assert again[1].virtual_batch_size == 4
    assert convert(out, to=GhostBatchNorm, virtual_batch_size=8)[1].virtual_batch_size == 8
    fused = seq(BatchNorm(4, activation="leaky_relu", negative_slope=0.3))
    sync = convert(fused, to=SyncBatchNorm)
    assert sync[0].activation == "leaky_relu" and sync[0].negative_slope == 0.3
    x = torch.randn(6, 4)
    torch.testing.assert_close(sync(x), fused(x))


@pytest.mark.parametrize(
    "model, kwargs, error, match",
    [
        (seq(BatchNorm(3, axis=-1)), {"to": nn.BatchNorm1d}, ValueError,
         r"layer '0' \(BatchNorm\) normalizes feature axis -1, but BatchNorm1d has no axis argument"),
        (seq(nn.BatchNorm1d(3, track_running_stats=False)), {"to": FrozenBatchNorm}, ValueError,
         r"has no running statistics \(track_running_stats=False\), so it cannot become a FrozenBatchNorm"),
        (seq(nn.BatchNorm1d(3)), {"to": BatchNorm(3)}, TypeError, "expected `to` to be an nn.Module class"),
        (seq(BatchNorm(3, activation="relu")), {"to": nn.BatchNorm1d}, ValueError,
         r"layer '0' \(BatchNorm\) has a fused activation='relu', but BatchNorm1d takes no activation argument"),
    ],
)
def test_convert_errors(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        convert(model, **kwargs)


def test_public_exports():
    for name in ("fold", "recalibrate", "convert", "freeze", "unfreeze", "SyncBatchNorm"):
        assert name in batchnorm.__all__ and getattr(batchnorm, name) is not None


# -- documentation examples run ----------------------------------------------------------------------
def _doc_cases():
    import doctest
    import importlib

    # import_module: batchnorm.tools.fold etc. are shadowed by the functions of the same name
    names = ("batchnorm.tools.fold", "batchnorm.tools.recalibrate", "batchnorm.tools.convert", "batchnorm.layers.sync")
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for n in names for t in finder.find(importlib.import_module(n)) if t.examples]


DOC_CASES = _doc_cases()


@pytest.mark.parametrize("test", DOC_CASES, ids=[t.name for t in DOC_CASES])
def test_docstring_examples_run(test):
    import doctest

    test.globs = {"torch": torch, **{k: getattr(batchnorm, k) for k in batchnorm.__all__}}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    runner.run(test, out=failures.append)
    assert runner.summarize(verbose=False).failed == 0, "".join(failures)


def test_docstring_examples_found():
    names = {t.name.rsplit(".", 1)[-1] for t in DOC_CASES}
    assert {"fold", "recalibrate", "convert", "freeze", "unfreeze", "SyncBatchNorm"} <= names
