"""convert(..., fuse_activations=True) on the zoo models and on hand-made pairs, and fold on the zoo models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as tnf
from torch import nn

import batchnorm
from batchnorm import BatchNorm, convert, fold, zoo
from batchnorm.tools import FuseRecord, is_bn_like


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters away from (0, 1, 1, 0), so a wrong fuse or fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_bn_like(m):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(1 + 0.5 * torch.randn(c, generator=g))
                m.bias.copy_(0.5 * torch.randn(c, generator=g))
    return model


def run(model: nn.Module, x: torch.Tensor, training: bool):
    """Output, input gradient and running statistics of one step on a copy (dropout seeded)."""
    model = copy.deepcopy(model).train(training)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    y = model(x)
    y.square().sum().backward()
    stats = [m.running_mean.clone() for m in model.modules() if is_bn_like(m)]
    return y.detach(), x.grad, stats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# -- the number of BN → activation pairs, counted from each architecture's structure ---------------
def pairs_resnet(m: nn.Module) -> int:
    return 1 + sum(isinstance(b, zoo.BasicBlock) for b in m.modules())  # stem; bn1 → relu of every block


def pairs_cna(m: nn.Module) -> int:  # ConvNormActivation with an activation (len 3)
    return sum(isinstance(b, zoo.ConvNormActivation) and len(b) == 3 for b in m.modules())


def pairs_densenet(m: nn.Module) -> int:  # every BN is followed by a ReLU (norm5 by F.relu)
    return sum(isinstance(b, nn.BatchNorm2d) for b in m.modules())


# name, builder, input channels, expected pairs, returned as GraphModule (an activation call had to go)
ZOO_CASES = [
    ("resnet18_cifar", zoo.MODELS["resnet18_cifar"], 3, pairs_resnet, True),  # BasicBlock.relu is shared
    ("mobilenet_v2_tiny", zoo.MODELS["mobilenet_v2_tiny"], 3, pairs_cna, False),
    ("efficientnet_tiny", zoo.MODELS["efficientnet_tiny"], 3, pairs_cna, False),
    ("densenet_tiny", zoo.MODELS["densenet_tiny"], 3, pairs_densenet, True),  # F.relu after norm5
    ("basic_block", zoo.BLOCKS["basic_block"][0], 8, lambda m: 1, True),
    ("basic_block_down", zoo.BLOCKS["basic_block_down"][0], 8, lambda m: 1, True),
    ("inverted_residual", zoo.BLOCKS["inverted_residual"][0], 8, pairs_cna, False),
    ("mbconv", zoo.BLOCKS["mbconv"][0], 8, pairs_cna, False),
    ("dense_block", zoo.BLOCKS["dense_block"][0], 8, pairs_densenet, False),
    ("transition", zoo.BLOCKS["transition"][0], 8, lambda m: 1, False),
]


@pytest.fixture(scope="module")
def fused_zoo():
    out = {}
    for name, build, *_ in ZOO_CASES:
        torch.manual_seed(0)
        model = randomize(build())
        before = copy.deepcopy(model.state_dict())
        fused, records = convert(model, fuse_activations=True, report=True)
        out[name] = (model, before, fused, records)
    return out


@pytest.mark.parametrize("case", ZOO_CASES, ids=[c[0] for c in ZOO_CASES])
def test_fuse_counts_and_form_on_zoo(case, fused_zoo):
    name, _, _, count, graph = case
    model, before, fused, records = fused_zoo[name]
    assert all(isinstance(r, FuseRecord) for r in records)
    fused_records = [r for r in records if r.action == "fused"]
    assert len(fused_records) == count(model) > 0
    assert [r for r in records if r.action == "skipped"] == []
    assert isinstance(fused, fx.GraphModule) == graph
    if not graph:
        assert type(fused) is type(model)  # the model keeps its class when only modules had to change
    layers = dict(fused.named_modules())
    assert {r.bn for r in fused_records} == {n for n, m in layers.items() if is_bn_like(m) and m.activation}
    # the original is untouched: torch's BN, same state, activations still in place
    assert not any(isinstance(m, BatchNorm) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(fused.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", ZOO_CASES, ids=[c[0] for c in ZOO_CASES])
def test_fused_zoo_computes_the_same(case, channels_last, training, fused_zoo):
    name, _, cin, _, _ = case
    model, _, fused, _ = fused_zoo[name]
    unfused = convert(model)
    x = zoo.example_input(cin, batch=4, size=16, channels_last=channels_last)
    y0, g0, s0 = run(model, x, training)  # torch's BN
    y1, g1, s1 = run(unfused, x, training)
    y2, g2, s2 = run(fused, x, training)
    assert rel(y2, y1) < 1e-5 and rel(y2, y0) < 1e-5
    assert rel(g2, g1) < 1e-4 and rel(g2, g0) < 1e-4
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(s2, s0, strict=True))


# -- hand-made pairs: every form of activation, and the unsafe ones --------------------------------
class Fn(nn.Module):
    """conv → BN(C=6) → ``act(y)``: the activation as a function of the BN output."""

    def __init__(self, act=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Mod(Fn):
    """The activation as a module called once."""

    def __init__(self, module):
        super().__init__(None)
        self.act = module


class Residual(Fn):
    """The BN output feeds the activation AND the sum: not safe to fuse."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y) + y


class InplaceFirst(Fn):
    """An in-place activation runs before the other use, which therefore sees activated values: safe."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        y.relu_()
        return y * 2 + 1


class InplaceModuleFirst(Fn):
    """The same with an nn.ReLU(inplace=True) module called once: it can simply become nn.Identity."""

    def __init__(self):
        super().__init__(nn.ReLU(inplace=True))

    def forward(self, x):
        y = self.bn(self.conv(x))
        self.act(y)
        return y * 2 + 1


class ReadBefore(Fn):
    """The other use reads the BN output before the in-place activation: not safe."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        s = y.mean()
        y.relu_()
        return y + s


class CalledTwice(Fn):
    def forward(self, x):
        return tnf.relu(self.bn(self.conv(x))) + self.bn(self.conv(x))


class ByMode(Fn):
    """Branches on self.training: only module replacements can serve both paths."""

    def __init__(self):
        super().__init__(nn.ReLU())
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        z = self.bn2(y)
        return tnf.silu(z) if self.training else tnf.silu(z) * 2


class Untraceable(nn.Module):
    """Control flow on a tensor value: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU(inplace=True))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:
            y = y * 2
        return torch.relu(self.bn(y))


# case id, model builder, expected (bn, action, activation name or None) records, reason pattern for skips
PAIR_CASES = [
    ("nn.ReLU(inplace)", lambda: Mod(nn.ReLU(inplace=True)), [("bn", "fused", "relu")], None),
    ("nn.ReLU6", lambda: Mod(nn.ReLU6(inplace=True)), [("bn", "fused", "relu6")], None),
    ("nn.Hardtanh(0,6)", lambda: Mod(nn.Hardtanh(0.0, 6.0)), [("bn", "fused", "relu6")], None),
    ("nn.LeakyReLU(0.2)", lambda: Mod(nn.LeakyReLU(0.2)), [("bn", "fused", "leaky_relu")], None),
    ("nn.SiLU", lambda: Mod(nn.SiLU()), [("bn", "fused", "silu")], None),
    ("nn.GELU", lambda: Mod(nn.GELU()), [("bn", "fused", "gelu")], None),
    ("nn.Sigmoid", lambda: Mod(nn.Sigmoid()), [("bn", "fused", "sigmoid")], None),
    ("nn.Tanh", lambda: Mod(nn.Tanh()), [("bn", "fused", "tanh")], None),
    ("F.relu(inplace)", lambda: Fn(lambda y: tnf.relu(y, inplace=True)), [("bn", "fused", "relu")], None),
    ("torch.relu", lambda: Fn(torch.relu), [("bn", "fused", "relu")], None),
    ("Tensor.relu", lambda: Fn(lambda y: y.relu()), [("bn", "fused", "relu")], None),
    ("F.leaky_relu", lambda: Fn(lambda y: tnf.leaky_relu(y, 0.3)), [("bn", "fused", "leaky_relu")], None),
    ("F.gelu", lambda: Fn(tnf.gelu), [("bn", "fused", "gelu")], None),
    ("F.relu6", lambda: Fn(tnf.relu6), [("bn", "fused", "relu6")], None),
    ("torch.tanh", lambda: Fn(torch.tanh), [("bn", "fused", "tanh")], None),
    ("in-place first", InplaceFirst, [("bn", "fused", "relu")], None),
    ("in-place module first", InplaceModuleFirst, [("bn", "fused", "relu")], None),
    ("nn.GELU(tanh)", lambda: Mod(nn.GELU(approximate="tanh")), [("bn", "skipped", None)], r"not one of the forms"),
    ("F.gelu(tanh)", lambda: Fn(lambda y: tnf.gelu(y, approximate="tanh")), [("bn", "skipped", None)],
     r"approximate='tanh' is not the form the kernels fuse"),
    ("residual", lambda: Residual(nn.ReLU()), [("bn", "skipped", None)], r"its output is also used by add"),
    ("read before", ReadBefore, [("bn", "skipped", None)], r"its output is also used by add, mean"),
    ("called twice", CalledTwice, [("bn", "skipped", None)], r"called at 2 places in the forward"),
    ("by mode", ByMode, [("bn", "fused", "relu"), ("bn2", "skipped", None)], r"other paths in training and in "),
    ("untraceable", Untraceable, [("body.1", "fused", "silu"), ("bn", "skipped", None)], r"fx could not trace"),
    ("nn.Hardtanh(-1,1)", lambda: Mod(nn.Hardtanh(-1.0, 1.0)), [("bn", "skipped", None)], r"not one of the forms"),
    ("no activation", lambda: Mod(nn.Softplus()), [], None),
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_fuse_pairs(case):
    _, build, expected, reason = case
    torch.manual_seed(0)
    model = randomize(build())
    fused, records = convert(model, fuse_activations=True, report=True)
    got = sorted((r.bn, r.action) for r in records)
    assert got == sorted((bn, action) for bn, action, _ in expected)
    layers = dict(fused.named_modules())
    for bn, action, act in expected:
        assert layers[bn].activation == (act if action == "fused" else None)
    for r in records:
        if r.action == "skipped":
            assert reason is not None and __import__("re").search(reason, r.reason), r.reason
    if any(act == "leaky_relu" for *_, act in expected):
        slope = model.act.negative_slope if isinstance(model.act, nn.Module) else 0.3
        assert layers["bn"].negative_slope == pytest.approx(slope)
    x = torch.randn(4, 3, 8, 8)
    for training in (True, False):
        y0, g0, _ = run(convert(model), x, training)
        y1, g1, _ = run(fused, x, training)
        assert rel(y1, y0) < 1e-5 and rel(g1, g0) < 1e-4


def test_fuse_keeps_the_original_and_report_flag():
    model = Mod(nn.ReLU())
    fused = convert(model, fuse_activations=True)
    assert isinstance(fused, nn.Module) and isinstance(model.act, nn.ReLU) and isinstance(model.bn, nn.BatchNorm2d)
    assert isinstance(fused.act, nn.Identity) and fused.bn.activation == "relu"
    same, records = convert(model, report=True)  # no fusing asked: nothing recorded, activation stays
    assert records == [] and isinstance(same.act, nn.ReLU) and same.bn.activation is None


class WithUnused(Fn):
    """A functional activation (the forward is rewritten) and state the forward never touches."""

    def __init__(self):
        super().__init__(torch.relu)
        self.unused_head = nn.Linear(6, 2)
        self.register_buffer("scale", torch.tensor(3.0))

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_fuse_graph_module_keeps_state_and_modes():
    torch.manual_seed(0)
    model = randomize(WithUnused())
    model.bn.eval()  # a BN frozen in eval inside a training model keeps that mode
    fused = convert(model, fuse_activations=True)
    assert isinstance(fused, fx.GraphModule)
    assert list(fused.state_dict()) and set(fused.state_dict()) == set(model.state_dict())
    assert torch.equal(fused.unused_head.weight, model.unused_head.weight)
    assert fused.training and not fused.bn.training and fused.bn.activation == "relu"


def test_fuse_a_model_of_ours_that_has_already_run():
    # our layer caches its checked settings after a forward: the fused activation must still take effect
    torch.manual_seed(0)
    ours = convert(randomize(Mod(nn.SiLU())))
    x = torch.randn(4, 3, 8, 8)
    for training in (True, False):
        ours.train(training)(x)
        fused = convert(ours, fuse_activations=True)
        assert fused.bn.activation == "silu" and isinstance(fused.act, nn.Identity)
        assert rel(run(fused, x, training)[0], run(ours, x, training)[0]) < 1e-5


def test_fuse_skips_layers_that_already_have_an_activation():
    model = Mod(nn.ReLU())
    model.bn = BatchNorm(6, activation="tanh")
    fused, records = convert(model, fuse_activations=True, report=True)
    assert [(r.bn, r.action) for r in records] == [("bn", "skipped")]
    assert "already applies activation='tanh'" in records[0].reason and fused.bn.activation == "tanh"


def test_fuse_respects_memory_save():
    # memory="save" needs an invertible activation: ReLU is refused with the layer's own message, leaky_relu fused
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 1),
                                    nn.BatchNorm2d(6), nn.LeakyReLU(0.1)))
    fused, records = convert(model, memory="save", fuse_activations=True, report=True)
    assert [(r.bn, r.action) for r in records] == [("1", "skipped"), ("4", "fused")]
    assert "memory='save'" in records[0].reason and fused[4].activation == "leaky_relu"


@pytest.mark.parametrize("to", [nn.BatchNorm2d, batchnorm.FrozenBatchNorm])
def test_fuse_needs_a_target_with_activation(to):
    with pytest.raises(ValueError, match=r"fuse_activations=True needs a target layer with a fused activation"):
        convert(Mod(nn.ReLU()).eval(), to=to, fuse_activations=True)


@pytest.mark.parametrize("to", [batchnorm.BatchRenorm, batchnorm.SyncBatchNorm])
def test_fuse_into_variants(to):
    torch.manual_seed(0)
    model = randomize(Mod(nn.SiLU()))
    fused = convert(model, to=to, fuse_activations=True)
    assert type(fused.bn) is to and fused.bn.activation == "silu"
    x = torch.randn(4, 3, 8, 8)
    for training in (True, False):
        assert rel(run(fused, x, training)[0], run(convert(model, to=to), x, training)[0]) < 1e-5


# -- fold on the zoo models, after converting and after fusing --------------------------------------
FOLD_ZOO = [name for name, *_ in ZOO_CASES if name in zoo.MODELS]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("fuse", [False, True], ids=["converted", "fused"])
@pytest.mark.parametrize("name", FOLD_ZOO)
def test_fold_zoo_models_without_false_alarm(name, fuse, channels_last):
    torch.manual_seed(0)
    model = randomize(zoo.MODELS[name]()).eval()
    ours = convert(model, fuse_activations=fuse).eval()
    x = zoo.example_input(3, batch=2, size=32, channels_last=channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a skipped layer nor a round-off false alarm
        folded, records = fold(ours, report=True, example_input=x)
    # every BN that follows a conv is folded into it; DenseNet's BNs after a concatenation are frozen
    after_cat = sum(isinstance(m, (zoo.DenseLayer, zoo.Transition, zoo.DenseNet)) for m in model.modules())
    assert sorted(r.action for r in records) == sorted(
        ["folded_into_previous"] * (len(records) - after_cat) + ["frozen"] * after_cat)
    assert len(records) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert rel(folded(x), model(x)) < 1e-4
