"""Nothing silent: timm's and torchvision's own BN classes, torch's class checks, training-mode export,
compile backends, torch.func, model-level load_state_dict and half precision at large counts.

timm and torchvision do not import here: ``batchnorm.zoo`` holds faithful small stand-ins of their classes
(``BatchNormAct2d``, ``SyncBatchNormAct``, ``FrozenBatchNormAct2d``, ``FrozenBatchNorm2d``) and converters
(``freeze_batch_norm_2d``, ``freeze``, ``convert_sync_batchnorm``).
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
import warnings

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm import zoo
from batchnorm.diagnostics import describe, internal_covariate_shift, monitor
from batchnorm.layers import interop
from batchnorm.tools import bn_kind


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    lo, hi = {"weight": (0.5, 1.5), "running_var": (0.5, 2.0)}.get(name, (-0.5, 0.5))
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model


def _outputs(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    m = copy.deepcopy(model).train(train)
    torch.manual_seed(5)  # drop layers: the same random mask for every model compared
    with torch.no_grad():
        return m(x)


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


# -- 1. BN classes that do more than BN: one table, every tool ----------------------------------------------------

def _act_block(act, drop=None):
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), zoo.BatchNormAct2d(8, act_layer=act, drop_layer=drop),
                          nn.Conv2d(8, 8, 1), zoo.BatchNormAct2d(8, apply_act=False))
    return _randomize(block)


#: name → (model builder, kind of the converted layer 1, whether it trains)
CLASSES = {
    "timm BatchNormAct2d SiLU (fused)": (lambda: _act_block(nn.SiLU), "silu"),
    "timm BatchNormAct2d ReLU (fused)": (lambda: _act_block(nn.ReLU), "relu"),
    "timm BatchNormAct2d Hardswish (kept)": (lambda: _act_block(nn.Hardswish), "module"),
    "timm BatchNormAct2d ReLU + drop (kept)": (lambda: _act_block(nn.ReLU, nn.Dropout), "module"),
    "timm FrozenBatchNormAct2d": (lambda: zoo.freeze_batch_norm_2d(_act_block(nn.SiLU)), "silu"),
    "torchvision FrozenBatchNorm2d": (
        lambda: zoo.freeze_batch_norm_2d(_randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))), None),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_bn_like_classes_convert_with_everything_and_round_trip(name):
    build, fused = CLASSES[name]
    model = build()
    x = X
    ours = bn.convert(model)
    layer = ours[1]
    assert isinstance(layer, bn.BatchNorm)
    if fused == "module":
        assert layer.act.__class__ is model[1].act.__class__ and layer.drop.__class__ is model[1].drop.__class__
    else:
        assert getattr(layer, "activation", None) == fused
    frozen_source = "Frozen" in type(model[1]).__name__
    modes = (False,) if frozen_source else (False, True)  # a frozen source computes its eval map in both modes
    for train in modes:
        torch.testing.assert_close(_outputs(ours, x, train), _outputs(model, x, train), rtol=1e-5, atol=1e-5)
    # and back: timm's class for timm's layers (act/drop carried), torch's for the others
    back = bn.unfreeze(bn.freeze(ours.eval())) if frozen_source else bn.convert(ours, to=zoo.BatchNormAct2d)
    for train in modes:
        torch.testing.assert_close(_outputs(back, x, train) if not frozen_source else back.eval()(x),
                                   _outputs(model, x, train), rtol=1e-5, atol=1e-5)
    # freeze keeps what the layer does
    frozen = bn.freeze(model.eval())
    assert isinstance(frozen[1], bn.FrozenBatchNorm)
    torch.testing.assert_close(frozen(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    # the same checkpoint keys
    assert set(ours.state_dict()) >= {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}


def test_a_class_that_cannot_hold_the_activation_is_refused_by_name():
    model = _act_block(nn.SiLU)
    with pytest.raises(ValueError, match=r"convert: layer '1' \(BatchNormAct2d\) applies activation SiLU after "
                                         r"normalizing, but BatchNorm2d takes no activation argument"):
        bn.convert(model, to=nn.BatchNorm2d)
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm2d\) has a fused activation='silu', but BatchNorm2d"):
        bn.convert(bn.convert(model), to=nn.BatchNorm2d)
    # a torch BN converted to a class with its own act gets nn.Identity there (never timm's default ReLU)
    plain = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    as_timm = bn.convert(plain, to=zoo.BatchNormAct2d)
    assert isinstance(as_timm[1].act, nn.Identity)
    torch.testing.assert_close(_outputs(as_timm, X, True), _outputs(plain, X, True))


class _Scaled(nn.BatchNorm2d):  # a BN subclass that does more than BN with its own forward
    def forward(self, x):
        return 2 * super().forward(x)


class _WithChild(nn.BatchNorm2d):  # ... or with a child module the tools know nothing about
    def __init__(self, c):
        super().__init__(c)
        self.gate = nn.Sigmoid()


@pytest.mark.parametrize("cls, what", [(_Scaled, "its own forward"), (_WithChild, r"child modules \(gate\)")])
def test_unknown_bn_subclasses_are_refused_by_every_tool(cls, what):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)).eval()
    assert bn_kind(model[1]) == "unknown"
    msg = rf"layer '1' \(.*{cls.__name__}\) is a batch norm that does more than batch norm \({what}\)"
    for tool in (bn.convert, bn.freeze):
        with pytest.raises(ValueError, match=msg):
            tool(model)
    with pytest.warns(UserWarning, match=r"fold: 1 BN layer\(s\) were left unchanged: '1': "):
        folded, records = bn.fold(model, report=True)
    assert [(r.bn, r.action) for r in records] == [("1", "skipped")]
    torch.testing.assert_close(folded(X), model(X))
    with pytest.warns(UserWarning, match="recalibrate: left unchanged: '1'"):
        report = bn.recalibrate(model, [X], progress=False)
    assert "1" in report.skipped and "1" not in report.recalibrated


def test_recalibrate_measures_batchnormact2d_and_frozen_layers_are_left_alone():
    model = _act_block(nn.SiLU)
    report = bn.recalibrate(model, [X, X.flip(0)], progress=False)
    assert report.recalibrated == ["1", "3"]
    h = model[0](X)
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)).detach(), rtol=1e-5, atol=1e-6)
    frozen = zoo.freeze_batch_norm_2d(_act_block(nn.SiLU))
    report = bn.recalibrate(nn.Sequential(frozen, nn.BatchNorm2d(8)), [X], progress=False)
    assert "0.1" in report.skipped and "FrozenBatchNormAct2d" in report.skipped["0.1"]


def test_syncbatchnormact_converts_with_its_activation():
    src = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), zoo.SyncBatchNormAct(8, act_layer=nn.SiLU))).eval()
    ours = bn.convert(src, to=bn.SyncBatchNorm)
    assert isinstance(ours[1], bn.SyncBatchNorm) and ours[1].activation == "silu"
    torch.testing.assert_close(ours(X), src(X), rtol=1e-5, atol=1e-5)


# -- 2. torch's class checks ---------------------------------------------------------------------------------------

RANKS = [(bn.BatchNorm1d, nn.BatchNorm1d, (4, 3, 5)), (bn.BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 5)),
         (bn.BatchNorm3d, nn.BatchNorm3d, (4, 3, 2, 5, 5))]


@pytest.mark.parametrize("ours, theirs, shape", RANKS, ids=lambda v: getattr(v, "__name__", ""))
def test_rank_classes_are_torchs_classes_and_still_ours(ours, theirs, shape):
    layer = _randomize(ours(3))
    assert isinstance(layer, theirs) and isinstance(layer, bn.BatchNorm)
    assert type(layer).__mro__[1:3] == (bn.BatchNorm, theirs)
    assert list(layer.state_dict()) == list(theirs(3).state_dict())
    assert repr(layer).startswith(f"{ours.__name__}(3, eps=1e-05")
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(twin) is ours and torch.equal(twin.running_var, layer.running_var)
    with pytest.raises(ValueError, match=rf"{ours.__name__} expected .*D input, got 6D input"):
        layer(torch.randn(2, 3, 1, 1, 1, 1))
    # the converter builds them from torch's layers
    converted = bn.convert(nn.Sequential(theirs(3)))[0]
    assert type(converted) is ours
    # a fused activation or another feature axis: torch's class cannot express them, so not an instance of it
    for kwargs in ({"activation": "relu"}, {"axis": -1}):
        twin = ours(3, **kwargs)
        assert not isinstance(twin, theirs) and isinstance(twin, bn.BatchNorm), kwargs
        assert repr(twin).startswith(f"{ours.__name__}(3")
        assert type(pickle.loads(pickle.dumps(twin))) is type(twin)
    x = torch.randn(*shape)
    torch.testing.assert_close(ours(3, activation="relu")(x), torch.relu(theirs(3)(x)))


def test_timm_freeze_on_our_layers_computes_what_it_computes_on_torchs():
    def build(norm):
        torch.manual_seed(0)
        return _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), norm(8), nn.ReLU(), nn.Conv2d(8, 8, 1), norm(8)))

    theirs, ours = build(nn.BatchNorm2d), bn.convert(build(nn.BatchNorm2d))
    ours_direct = build(bn.BatchNorm2d)
    want = zoo.freeze_batch_norm_2d(copy.deepcopy(theirs))
    for model in (ours, ours_direct):
        got = zoo.freeze_batch_norm_2d(copy.deepcopy(model))
        assert [type(m).__name__ for m in got] == [type(m).__name__ for m in want]
        assert isinstance(got[1], zoo.FrozenBatchNorm2d)
        for train in (False, True):  # frozen: training mode changes nothing, as for torch's BN
            torch.testing.assert_close(got.train(train)(X), want.train(train)(X), rtol=1e-6, atol=1e-6)
    frozen = zoo.freeze(copy.deepcopy(ours))  # timm.utils.model.freeze: nothing learns, nothing updates
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not any(isinstance(m, bn.BatchNorm) for m in frozen.modules())


def test_torchs_converters_on_our_plain_rank_layers_give_torchs_numbers():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), bn.BatchNorm2d(8))).eval()
    synced = zoo.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced[1]) is nn.SyncBatchNorm
    torch.testing.assert_close(synced(X), model(X))


# -- 3. training-mode torch.export -----------------------------------------------------------------------------------

def _conv_bn():
    torch.manual_seed(0)
    return _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))


def _grads(module, x):
    x = x.clone().requires_grad_()
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad


def test_training_export_is_torchs_graph_whatever_the_backend_and_differentiates(monkeypatch):
    torch_model = _conv_bn().train()
    graphs = []
    for backend in ("numba", "composite", "native"):
        monkeypatch.setenv("BATCHNORM_BACKEND", backend)  # warm numba or not: the export route does not depend on it
        ours = bn.convert(_conv_bn()).train()
        ep = torch.export.export(ours, (X,))
        graphs.append(ep.graph_module.code)
    monkeypatch.delenv("BATCHNORM_BACKEND")
    assert graphs[0] == graphs[1] == graphs[2]
    assert "torch.ops.aten.batch_norm" in graphs[0] and "batchnorm." not in graphs[0]
    ref_ep = torch.export.export(copy.deepcopy(torch_model), (X,))
    assert ep.graph_module.code == ref_ep.graph_module.code  # node for node torch's BN graph
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    ref, got = copy.deepcopy(torch_model), loaded
    y_ref, dx_ref = _grads(ref, X)
    y_got, dx_got = _grads(got, X)
    torch.testing.assert_close(y_got, y_ref)
    torch.testing.assert_close(dx_got, dx_ref)
    ref_params = dict(ref.named_parameters())
    for name, p in got.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, msg=name)
    for name, b in got.named_buffers():  # the running update happened as in torch's layer
        torch.testing.assert_close(b, dict(ref.named_buffers())[name], msg=name)


@pytest.mark.parametrize("variant", ["renorm", "ghost"])
def test_training_export_of_variants_differentiates_and_saves(variant):
    base = _conv_bn().train()
    ours = (bn.convert(base, to=bn.BatchRenorm, r_max=1.5, d_max=0.5) if variant == "renorm"
            else bn.convert(base, to=bn.GhostBatchNorm, virtual_batch_size=2)).train()
    if variant == "renorm":
        with torch.no_grad():
            ours[1].running_mean.uniform_(-1, 1)
    ep = torch.export.export(copy.deepcopy(ours), (X,))
    assert "batchnorm." not in ep.graph_module.code  # plain torch ops: no numba custom op, one graph
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    got = torch.export.load(buf).module()
    y_ref, dx_ref = _grads(ours, X)
    y_got, dx_got = _grads(got, X)
    torch.testing.assert_close(y_got, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_got, dx_ref, rtol=1e-5, atol=1e-5)
    ref_params = dict(ours.named_parameters())
    for name, p in got.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-5, msg=name)


def _conv2d_patterns_only(monkeypatch) -> None:
    """torchao's QAT fuse (prepare) and fold (convert) passes export their conv-BN patterns for conv1d, conv2d and
    both transposed convs, up to 16 variants each: almost all of the test's time. The model has only a Conv2d, so
    the other patterns cannot match it: leave them out (the conv2d ones run unchanged)."""
    qat = pytest.importorskip("torchao.quantization.pt2e.qat_utils")
    for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper"):
        helper = getattr(qat, name, None)
        if helper is None:  # another torchao layout: run every pattern (slower, same checks)
            continue

        def only_conv2d(m, conv_fn, *args, _helper=helper, **kwargs):
            return _helper(m, conv_fn, *args, **kwargs) if conv_fn is torch.nn.functional.conv2d else m

        monkeypatch.setattr(qat, name, only_conv2d)


@pytest.mark.slow
def test_pt2e_qat_works_on_converted_models(monkeypatch):
    # torch's BN exports to the same graph node for node (the test above), so QAT applies to ours as to torch's;
    # here it runs end to end once (prepare with the XNNPACK quantizer, train steps, convert)
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e", reason="torchao is in the [dev] extra")
    xnn = pytest.importorskip("torchao.testing.pt2e._xnnpack_quantizer")
    _conv2d_patterns_only(monkeypatch)
    model = bn.convert(_conv_bn()).train()
    gm = torch.export.export(model, (X,)).module()
    with pytest.warns(UserWarning, match="deprecated"):
        quantizer = xnn.XNNPACKQuantizer().set_global(xnn.get_symmetric_quantization_config(is_qat=True))
    prepared = pt2e.prepare_qat_pt2e(gm, quantizer)
    prepared(X)  # a training step: observers see finite ranges (was "min nan should be less than max nan")
    prepared(X.flip(0))
    root = pytest.importorskip("torchao.quantization.pt2e")
    root.move_exported_model_to_eval(prepared)  # the running statistics from here on, as the converted model
    fake = prepared(X).detach()
    converted = pt2e.convert_pt2e(prepared)
    assert "batch_norm" not in converted.code  # QAT's conv-BN pattern matched: BN folded into the conv, as for torch's
    root.move_exported_model_to_eval(converted)
    quantized = converted(X)
    assert torch.isfinite(quantized).all()
    # int8 round-off of the fake-quantized model, not a different computation
    assert (quantized - fake).abs().max() < 0.05 * fake.abs().max()


# -- 4. every torch.compile backend, every variant -------------------------------------------------------------------

def _variant(name):
    torch.manual_seed(0)
    make = {
        "plain": lambda: bn.BatchNorm(4),
        "ghost": lambda: bn.GhostBatchNorm(4, virtual_batch_size=4),
        "renorm": lambda: bn.BatchRenorm(4, r_max=1.5, d_max=0.5, momentum=0.5),
        "activation": lambda: bn.BatchNorm(4, activation="silu"),
        "save": lambda: bn.BatchNorm(4, activation="leaky_relu", memory="save"),
        "masked": lambda: bn.BatchNorm(4, momentum=0.5),
    }[name]
    layer = make()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(1, 2)
    return layer


VARIANTS = ["plain", "ghost", "masked", "renorm", "activation", "save"]
XC = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(2)) * 2 + 1
MASK = torch.arange(8 * 9).reshape(8, 3, 3) % 5 != 0
DY = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(3))


def _step(layer, variant, compiled=None):
    fn = layer if compiled is None else compiled
    x = XC.clone().requires_grad_()
    y = fn(x, MASK) if variant == "masked" else fn(x)
    (y * DY).sum().backward()
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean.clone(),
            layer.running_var.clone()]


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_every_variant_has_eager_gradients_under_every_compile_backend(backend):
    torch._dynamo.reset()
    for variant in VARIANTS:
        want = _step(_variant(variant), variant)
        layer = _variant(variant)
        got = _step(layer, variant, torch.compile(layer, backend=backend))
        for label, a, b in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{variant} {backend} {label}")


# -- 5. torch.func.vmap over stacked ensembles -----------------------------------------------------------------------

SHAPES = [(6, 4), (6, 4, 5), (6, 4, 3, 3), (6, 4, 2, 3, 3)]


def _ensemble(make, n=3):
    models = [make() for _ in range(n)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def run(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    return models, params, buffers, run


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}D")
def test_vmap_over_an_ensemble_matches_a_loop(shape):
    x = torch.randn(3, *shape)
    for train in (False, True):
        models, params, buffers, run = _ensemble(
            lambda train=train: _randomize(bn.BatchNorm(4, track_running_stats=not train)).train(train))
        got = torch.func.vmap(run)(params, buffers, x)
        want = torch.stack([m(x[i]) for i, m in enumerate(models)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vmap_over_conv_ensembles_whose_outputs_vmap_cannot_query():
    # conv outputs under vmap: their layout cannot be asked (was "querying is_contiguous inside of vmap")
    for train in (False, True):
        def make(train=train):
            return _randomize(bn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(
                4, track_running_stats=not train)))).train(train)

        models, params, buffers, run = _ensemble(make)
        for x, dims in ((torch.randn(6, 3, 6, 6), None), (torch.randn(3, 6, 3, 6, 6), 0)):
            got = torch.func.vmap(run, in_dims=(0, 0, dims))(params, buffers, x)
            want = torch.stack([m(x if dims is None else x[i]) for i, m in enumerate(models)])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vmap_training_with_running_statistics():
    x = torch.randn(3, 8, 4, 3, 3)
    # every member with its own buffers (stack_module_state): updates as a loop would
    models, params, buffers, run = _ensemble(lambda: _randomize(bn.BatchNorm(4)).train())
    loop = [copy.deepcopy(m) for m in models]
    got = torch.func.vmap(run)(params, buffers, x)
    want = torch.stack([m(x[i]) for i, m in enumerate(loop)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffers["running_mean"], torch.stack([m.running_mean for m in loop]))
    # one layer's buffers under a batched input: torch's explanation
    layer = bn.BatchNorm(4).train()
    with pytest.raises(RuntimeError, match=r"BatchNorm got a batched tensor as input while the running_mean or "
                                           r"running_var, which will be updated in place, were not batched"):
        torch.func.vmap(layer)(x)
    assert torch.equal(layer.running_mean, torch.zeros(4)) and int(layer.num_batches_tracked) == 0


# -- 6. model-level load_state_dict, half precision --------------------------------------------------------------

@pytest.mark.parametrize("norm", [nn.BatchNorm1d, bn.BatchNorm, bn.BatchNorm1d, bn.FrozenBatchNorm],
                         ids=lambda c: f"{c.__module__.split('.')[0]}.{c.__name__}")
@pytest.mark.parametrize("strict", [True, False])
def test_model_load_state_dict_copies_every_match_and_lists_every_mismatch(norm, strict):
    def build(widths):
        return nn.Sequential(nn.Linear(4, widths[0]), norm(widths[0]), norm(widths[1]), norm(widths[2]),
                             norm(widths[3]))

    checkpoint = build([4, 5, 4, 6]).state_dict()
    for v in checkpoint.values():
        if v.is_floating_point():
            v.fill_(7.0)
    model = build([4, 3, 4, 2])
    torch_errors = None
    try:  # what torch's own layers report for the same checkpoint
        reference = nn.Sequential(nn.Linear(4, 4), *(nn.BatchNorm1d(c) for c in (4, 3, 4, 2)))
        reference.load_state_dict(build([4, 5, 4, 6]).state_dict(), strict=strict)
    except RuntimeError as err:
        torch_errors = str(err).count("size mismatch")
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict for Sequential:") as info:
        model.load_state_dict(checkpoint, strict=strict)
    text = str(info.value)
    for bad in ("2", "4"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert f"size mismatch for {bad}.{name}" in text, (bad, name)
    assert text.count("size mismatch") == torch_errors == 8
    for good in (0, 1, 3):  # before and after the mismatched layers: loaded
        assert float(model[good].weight.flatten()[0]) == 7.0, good
    for good in (1, 3):
        assert torch.equal(model[good].running_mean, torch.full((4,), 7.0)), good


def test_half_precision_statistics_are_float32_accurate_past_two_to_the_24():
    # ATen's CPU kernel counts float16 in float32: at 2**24 + a few values per feature its mean is ~0.65 off
    x = (torch.randn(1, 1, 4097, 4097, generator=torch.Generator().manual_seed(0)) + 50).half()
    want = x.double().mean()
    layer = bn.BatchNorm(1, momentum=1.0)
    y = layer(x)
    assert abs(float(layer.running_mean) - float(want)) < 1e-4
    assert y.dtype == torch.float16 and abs(float(y.float().mean())) < 1e-3


# -- 7. the same rule in the diagnostics, fold, and torch's SyncBatchNorm built from our tensors -------------------
#
# The diagnostics measure what the normalization computes, fold folds the normalization of timm's BatchNormAct2d
# and keeps its activation and drop modules, and torch's SyncBatchNorm built from our tensors by a converter that
# reads torch's attributes (timm's convert_sync_batchnorm) refuses to run what it cannot express.

XK = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def _pair(layer: nn.Module, reference: nn.Module) -> tuple[nn.Module, nn.Module]:
    """conv → layer, and conv → reference (batch norm alone, the same state)."""
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), layer))
    ref = nn.Sequential(copy.deepcopy(model[0]), reference)
    ref[1].load_state_dict(model[1].state_dict(), strict=False)  # act.*/drop.* have no counterpart
    return model, ref


#: name → (the layer, the same normalization without what it applies after)
LAYERS = {
    "timm BatchNormAct2d SiLU (in place)": lambda: (zoo.BatchNormAct2d(6, act_layer=nn.SiLU), nn.BatchNorm2d(6)),
    "timm BatchNormAct2d ReLU + Dropout": lambda: (zoo.BatchNormAct2d(6, drop_layer=nn.Dropout), nn.BatchNorm2d(6)),
    "timm SyncBatchNormAct": lambda: (zoo.SyncBatchNormAct(6, act_layer=nn.SiLU), nn.BatchNorm2d(6)),
    "ours fused silu": lambda: (bn.BatchNorm2d(6, activation="silu"), bn.BatchNorm2d(6)),
    "ours ghost, fused relu": lambda: (bn.GhostBatchNorm(6, virtual_batch_size=2, activation="relu"),
                                       bn.GhostBatchNorm(6, virtual_batch_size=2)),
    "ours renorm, fused tanh": lambda: (bn.BatchRenorm(6, r_max=1.5, d_max=0.5, activation="tanh"),
                                        bn.BatchRenorm(6, r_max=1.5, d_max=0.5)),
    "ours with act module (from convert)": lambda: (
        bn.convert(nn.Sequential(zoo.BatchNormAct2d(6, act_layer=nn.Hardswish)))[0], bn.BatchNorm2d(6)),
}

OUTPUT_STATS = ("output_skewness", "output_excess_kurtosis", "relu_zero_fraction", "batch_mean", "running_mean")


@pytest.mark.parametrize("name", list(LAYERS))
def test_monitor_records_what_the_normalization_computes(name):
    model, ref = _pair(*LAYERS[name]())
    untouched = copy.deepcopy(model)
    runs = {}
    for label, net in (("layer", model), ("reference", ref)):
        with monitor(net) as mon:
            for train in (True, False):
                torch.manual_seed(3)
                net.train(train)(XK)
        runs[label] = {(r["step"], r["statistic"]): r["values"] for r in mon.records if r["layer"] == "1"}
    assert set(runs["layer"]) == set(runs["reference"]) and len(runs["layer"]) > 8
    for key, want in runs["reference"].items():
        if key[1] in OUTPUT_STATS:
            torch.testing.assert_close(torch.tensor(runs["layer"][key]), torch.tensor(want), rtol=1e-4, atol=1e-5,
                                       msg=f"{name} {key}")
    # the layer really applies more (what a hook on it sees differs), and monitoring changed nothing in it
    assert not torch.allclose(model.eval()(XK), ref.eval()(XK), atol=1e-3)
    torch.manual_seed(3)
    untouched.train()(XK)
    for (k, a), b in zip(model.state_dict().items(), untouched.state_dict().values()):
        assert torch.equal(a, b), k


def test_monitor_refuses_a_batch_norm_it_cannot_read_and_describe_says_what_each_layer_is():
    with pytest.raises(ValueError, match=r"monitor: layer '1' \(.*_Scaled\) is a batch norm that does more than batch "
                                         r"norm \(its own forward\), so monitor cannot know what it normalizes"):
        monitor(nn.Sequential(nn.Conv2d(3, 4, 3), _Scaled(4)))
    tv = zoo.FrozenBatchNorm2d(4)
    del tv.num_features  # torchvision's keeps no num_features (timm's and detectron2's do)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), zoo.BatchNormAct2d(4, drop_layer=nn.Dropout), tv, _Scaled(4),
                          zoo.FrozenBatchNormAct2d(4))
    rows = {r["layer"]: r for r in describe(model, XK).rows}
    assert list(rows) == ["1", "2", "3", "4"]
    assert rows["1"]["note"] == "BatchNormAct2d applies its own Dropout/ReLU after normalizing"
    assert rows["1"]["samples_per_statistic"] == 4 * 3 * 3
    assert (rows["2"]["features"], rows["2"]["momentum"], rows["2"]["running"].split(",")[0]) == (4, None, "frozen")
    assert rows["3"]["note"].startswith("_Scaled does more than batch norm")
    assert rows["4"]["note"] == "FrozenBatchNormAct2d reduces nothing: it applies fixed statistics"
    # internal covariate shift reports the weight layers only, by the same rule
    net = nn.Sequential(nn.Conv2d(3, 4, 3), zoo.BatchNormAct2d(4), tv, nn.Flatten(), nn.Linear(36, 2))
    ics = internal_covariate_shift(net, nn.functional.mse_loss, (XK, torch.zeros(4, 2)), lr=0.1)
    assert list(ics) == ["0", "4"]


def test_monitor_refuses_to_recompute_a_fused_syncbatchnorm_training_across_processes(monkeypatch):
    monitor_module = sys.modules["batchnorm.diagnostics.monitor"]  # (the package binds the name to the function)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn.SyncBatchNorm(6, activation="relu")).train()
    monkeypatch.setattr(monitor_module, "_group_world", lambda group: 2)  # as in a group of two (the layer runs alone)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"monitor: layer '1' \(SyncBatchNorm\) has a fused activation='relu', so "
                                           r"its output is not batch norm's, and in training across processes"):
        with monitor(model):
            model(XK)
    with monitor(model.eval()) as mon:  # eval: no collective to repeat
        model(XK)
    assert any(r["statistic"] == "output_skewness" for r in mon.records)
    assert int(model[1].num_batches_tracked) == int(before["1.num_batches_tracked"]) + 1  # the one real step


# -- fold: the normalization of an "act" layer folds, its modules stay ------------------------------------------

FOLD_CASES = {
    "SiLU": lambda: zoo.BatchNormAct2d(6, act_layer=nn.SiLU),
    "Hardswish + Dropout": lambda: zoo.BatchNormAct2d(6, act_layer=nn.Hardswish, drop_layer=nn.Dropout),
    "apply_act=False": lambda: zoo.BatchNormAct2d(6, apply_act=False),
    "frozen act (timm)": lambda: zoo.freeze_batch_norm_2d(nn.Sequential(zoo.BatchNormAct2d(6)))[0],
    "ours with act module": lambda: bn.convert(nn.Sequential(zoo.BatchNormAct2d(6, act_layer=nn.Hardswish)))[0],
    "ours frozen with act module": lambda: bn.freeze(nn.Sequential(zoo.BatchNormAct2d(6, act_layer=nn.Hardswish)))[0],
}


@pytest.mark.parametrize("name", list(FOLD_CASES))
@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "sequential"])
def test_fold_folds_the_normalization_and_keeps_act_and_drop(name, traceable):
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), FOLD_CASES[name](), nn.Conv2d(6, 4, 1))).eval()
    if not traceable:
        model[2] = _Untraceable(model[2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, records = bn.fold(model, report=True, example_input=XK)
    assert not [w for w in caught if "fold" in str(w.message)]  # no layer left unchanged, outputs as the original
    assert [(r.bn, r.action, r.target) for r in records] == [("1", "folded_into_previous", "0")], records
    kept = [type(m).__name__ for m in folded.modules() if isinstance(m, (nn.SiLU, nn.ReLU, nn.Hardswish, nn.Dropout))]
    assert kept == [type(m).__name__ for m in model[1].children() if type(m) is not nn.Identity]
    assert not any(bn.tools.bn_kind(m) for m in folded.modules())
    torch.testing.assert_close(folded(XK), model(XK), rtol=1e-5, atol=1e-5)


class _Untraceable(nn.Module):
    """Branches on a value: fx cannot trace it, so fold takes its nn.Sequential path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) if x.sum() > -1e9 else x


def test_adapt_by_the_same_rule_adapts_other_libraries_layers_and_refuses_unknown_ones():
    tv = zoo.FrozenBatchNorm2d(6)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 6, 3), zoo.BatchNormAct2d(6), nn.Conv2d(6, 6, 1), tv)).eval()
    report = bn.adapt(model, [XK * 3 + 1], prior=0, progress=False)
    assert [r.name for r in report.records] == ["1", "3"]
    h = model[0](XK * 3 + 1)
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)).detach(), rtol=1e-5, atol=1e-5)
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), _Scaled(4)).eval()
    before = copy.deepcopy(odd.state_dict())
    with pytest.raises(ValueError, match=r"adapt: layer '1' \(.*_Scaled\) is a batch norm that does more than batch "
                                         r"norm \(its own forward\), so adapt cannot know"):
        bn.adapt(odd, [XK], prior=0, progress=False)
    assert all(torch.equal(v, odd.state_dict()[k]) for k, v in before.items())


def test_fuse_activations_records_an_activation_after_an_act_layer_as_skipped():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 6, 3), zoo.BatchNormAct2d(6, act_layer=nn.Hardswish), nn.ReLU()))
    fused, records = bn.convert(model, fuse_activations=True, report=True)
    assert [(r.bn, r.action) for r in records] == [("1", "skipped")]
    assert "applies its own drop/act modules after normalizing" in records[0].reason
    for train in (False, True):
        torch.testing.assert_close(_outputs(fused, XK, train), _outputs(model, XK, train), rtol=1e-5, atol=1e-5)


def test_fold_in_training_mode_still_says_so():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 6, 3), zoo.BatchNormAct2d(6)))
    with pytest.warns(UserWarning, match=r"fold: 1 BN layer\(s\) were left unchanged: '1': in training mode"):
        bn.fold(model.train())


# -- torch.nn.SyncBatchNorm on our tensors (timm's convert_sync_batchnorm) ---------------------------------------

X4 = torch.randn(4, 6, 3, 3)

SYNC_REFUSED = {  # name -> (our layer, its input, what torch's layer would drop)
    "fused activation": (lambda: bn.BatchNorm2d(6, activation="silu"), X4,
                         r"BatchNorm2d\(6\), whose .* drop its fused activation='silu'"),
    "axis -1": (lambda: bn.BatchNorm(5, axis=-1), torch.randn(4, 3, 5), r"BatchNorm\(5\), .* drop its feature axis -1"),
    "ghost": (lambda: bn.GhostBatchNorm(6, virtual_batch_size=2), X4, "drop its ghost batches"),
    "renorm": (lambda: bn.BatchRenorm(6), X4, "drop its renormalization"),
    "act module": (lambda: bn.convert(nn.Sequential(zoo.BatchNormAct2d(6, act_layer=nn.Hardswish)))[0], X4,
                   "drop its act/drop modules"),
    "fused by convert": (lambda: bn.convert(nn.Sequential(nn.BatchNorm2d(6), nn.ReLU()), fuse_activations=True)[0],
                         X4, "drop its fused activation='relu'"),
    "no running stats, moved": (lambda: bn.BatchNorm(6, activation="relu", track_running_stats=False).double(),
                                X4.double(), "drop its fused activation='relu'"),
}


@pytest.mark.parametrize("name", list(SYNC_REFUSED))
def test_torch_syncbatchnorm_built_from_our_tensors_refuses_what_it_cannot_express(name):
    make, x, what = SYNC_REFUSED[name]
    model = _randomize(nn.Sequential(make())).eval()
    synced = zoo.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced[0]) is nn.SyncBatchNorm
    msg = (rf"torch.nn.SyncBatchNorm\(\d\) runs on the parameters and running statistics of batchnorm's .*{what}.*"
           r"batchnorm.convert\(model, to=batchnorm.SyncBatchNorm\)")
    copies = [synced, pickle.loads(pickle.dumps(synced))]
    if synced[0].running_mean is not None:  # torch's Parameter.__deepcopy__ drops attributes; buffers keep them
        copies.append(copy.deepcopy(synced))
    for net in copies:
        with pytest.raises(RuntimeError, match=msg):
            net(x)
    # batchnorm's route keeps everything
    ours = bn.convert(model, to=bn.SyncBatchNorm).eval()
    torch.testing.assert_close(ours(x), model(x))


def test_torch_syncbatchnorm_on_plain_layers_and_equivalent_axes_runs():
    for layer, x in ((bn.BatchNorm2d(6), torch.randn(4, 6, 3, 3)), (bn.BatchNorm(6, axis=-1), torch.randn(8, 6)),
                     (bn.BatchNorm(6, activation="relu"), torch.randn(8, 6))):
        if layer.activation is not None:
            layer.activation = None  # documented: set by hand, the mark stays until the layer is moved
            layer.float()
        model = _randomize(nn.Sequential(layer)).eval()
        synced = zoo.convert_sync_batchnorm(copy.deepcopy(model))
        torch.testing.assert_close(synced(x), model(x))
    # a state dict carries no mark: torch's layer loaded from it is torch's layer
    fresh = nn.SyncBatchNorm(6).eval()
    fresh.load_state_dict(bn.BatchNorm(6, activation="silu").state_dict())
    fresh(torch.randn(4, 6))
    # interop.uninstall restores torch's forward, and the rule still calls torch's SyncBatchNorm batch norm
    interop.uninstall()
    try:
        assert nn.SyncBatchNorm.forward is interop._TORCH_SYNC_FORWARD
        assert bn.tools.bn_kind(nn.SyncBatchNorm(4)) == "bn"
    finally:
        interop.install()
    assert nn.SyncBatchNorm.forward is interop._sync_forward and bn.tools.bn_kind(nn.SyncBatchNorm(4)) == "bn"


def test_torch_syncbatchnorm_with_the_check_still_compiles_in_one_graph():
    # the check is plain Python dynamo inlines (a functools.wraps wrapper claiming torch's module was skipped)
    for train in (True, False):
        model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))).train(train)
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(XK), model(XK))
