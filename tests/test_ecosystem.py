"""Our layers inside the PyTorch ecosystem (issue 12): in-place consumers, torch's BN idioms, tracing, export, ONNX.

Every model here is one of the small torchvision-style models of :mod:`batchnorm.zoo`, built with
torch's BN and converted with :func:`batchnorm.convert`; the reference is the same model with torch's BN.
Each test names the item of the issue's "Why" list that it pins.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm as bn
from batchnorm import zoo

LAYOUTS = {"nchw": False, "channels_last": True}


def _randomize_state(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so eval-mode tests compare something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (_BatchNorm, bn.FrozenBatchNorm)) and m.running_mean is not None:
                c = m.running_mean.shape[0]
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def _pair(name: str, table=zoo.MODELS, **convert_kwargs):
    """(torch-BN model, converted copy) with identical weights and state."""
    torch.manual_seed(0)
    make = table[name][0] if table is zoo.BLOCKS else table[name]
    ref = _randomize_state(make())
    return ref, bn.convert(ref, **convert_kwargs)


def _n_ours(model: nn.Module) -> int:
    return sum(isinstance(m, bn.BatchNorm) for m in model.modules())


# -- Why 1: in-place consumers after every layer (ReLU(inplace=True), +=), every layout and backend --------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", zoo.BLOCKS)
def test_inplace_consumers_after_our_layers(block, layout, training, backend):
    ref, ours = _pair(block, zoo.BLOCKS)
    ref.train(training)
    ours.train(training)
    cin = zoo.BLOCKS[block][1]
    x = zoo.example_input(cin, batch=4, size=8, channels_last=LAYOUTS[layout])
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(xr), ours(xo)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_ours.backward(g)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-4)
    for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", zoo.MODELS)
def test_zoo_models_train_step_match_torch(name, layout):
    ref, ours = _pair(name)
    for m in (ref, ours):  # dropout off: compare deterministic training steps
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    x = zoo.example_input(batch=4, channels_last=LAYOUTS[layout])
    y_ref, y_ours = ref(x), ours(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-4)
    y_ref.square().sum().backward()
    y_ours.square().sum().backward()
    for (pname, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-3, atol=1e-4, msg=pname)
    for (bname, b_ref), b_ours in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(b_ours, b_ref, rtol=1e-4, atol=1e-5, msg=bname)


# -- Why 2: recognized by isinstance(m, _BatchNorm) ------------------------------------------------------------------
BN_CLASSES = {
    "BatchNorm": lambda: bn.BatchNorm(4),
    "BatchNorm2d": lambda: bn.BatchNorm2d(4),
    "BatchRenorm": lambda: bn.BatchRenorm(4),
    "GhostBatchNorm": lambda: bn.GhostBatchNorm(4, virtual_batch_size=2),
    "SyncBatchNorm": lambda: bn.SyncBatchNorm(4),
}


@pytest.mark.parametrize("make", BN_CLASSES.values(), ids=BN_CLASSES)
def test_state_keeping_layers_are_torch_batch_norms(make):
    layer = make()
    assert isinstance(layer, _BatchNorm)
    # torch's own attribute protocol holds (code written against _BatchNorm reads these)
    assert layer.running_mean.shape == (4,) and layer.num_batches_tracked.dtype == torch.long
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(4).state_dict())


def test_stateless_layers_are_not_batch_norms():
    # nothing to update, nothing to freeze: torchvision's FrozenBatchNorm2d is no _BatchNorm either
    assert not isinstance(bn.FrozenBatchNorm(4), _BatchNorm)
    assert not isinstance(bn.AffineOnly(4), _BatchNorm)


@pytest.mark.parametrize("name", ["resnet18_cifar", "densenet_tiny"])
def test_swa_update_bn_recomputes_our_running_statistics(name):
    ref, ours = _pair(name)
    before = [b.clone() for b in ours.buffers()]
    loader = [zoo.example_input(batch=4, seed=s) for s in range(3)]
    torch.optim.swa_utils.update_bn(loader, ref)
    torch.optim.swa_utils.update_bn(loader, ours)
    changed = [not torch.equal(a, b) for a, b in zip(before, ours.buffers())]
    assert any(changed)
    for (bname, b_ref), b_ours in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(b_ours, b_ref, rtol=1e-4, atol=1e-5, msg=bname)
    assert all(m.momentum == 0.1 for m in ours.modules() if isinstance(m, bn.BatchNorm))  # restored


def test_weight_decay_filter_exempts_our_parameters():
    _, ours = _pair("resnet18_cifar")
    exempt = {id(p) for m in ours.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)}
    assert len(exempt) == 2 * _n_ours(ours) == 40
    decayed = [p for p in ours.parameters() if id(p) not in exempt]
    assert len(decayed) == len(list(ours.parameters())) - 40  # convs and fc only


def test_bn_freeze_idiom_stops_our_updates():
    _, ours = _pair("mobilenet_v2_tiny")
    ours.train()
    for m in ours.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    before = [b.clone() for b in ours.buffers()]
    ours(zoo.example_input(batch=4)).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, ours.buffers()))


# -- Why 2: convert_sync_batchnorm must not build a wrong layer -------------------------------------------------------
SYNC_CASES = {  # layer options, input of the Linear(5, 6) before it
    "plain": (dict(), (8, 5)),
    "axis_last": (dict(axis=-1), (4, 3, 5)),
    "activation": (dict(activation="relu6"), (8, 5)),
    "no_bias": (dict(bias=False), (8, 5)),
}


@pytest.mark.parametrize("kwargs, shape", SYNC_CASES.values(), ids=SYNC_CASES)
def test_convert_sync_batchnorm_keeps_our_options_and_tensors(kwargs, shape):
    layer = bn.BatchNorm(6, **kwargs)
    model = nn.Sequential(nn.Linear(5, 6), layer)
    weight = layer.weight
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    new = synced[1]
    assert type(new) is bn.SyncBatchNorm
    assert (new.axis, new.activation, new.bias is None) == (layer.axis, layer.activation, layer.bias is None)
    assert new.weight is weight and new.running_mean is layer.running_mean  # shared, as torch's conversion
    x = torch.randn(*shape)
    twin = copy.deepcopy(model)  # before the step below updates the shared buffers
    torch.testing.assert_close(synced(x), twin(x))  # world of one: BatchNorm exactly


def test_convert_sync_batchnorm_still_converts_torch_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), bn.BatchNorm(4))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[1]) is nn.SyncBatchNorm and type(synced[2]) is bn.SyncBatchNorm


def test_convert_sync_batchnorm_converts_every_zoo_layer():
    _, ours = _pair("resnet18_cifar")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(ours)
    assert sum(type(m) is bn.SyncBatchNorm for m in synced.modules()) == 20


@pytest.mark.parametrize("layer", [bn.GhostBatchNorm(4, virtual_batch_size=2), bn.BatchRenorm(4)], ids=["ghost", "renorm"])
def test_convert_sync_batchnorm_refuses_variants_without_sync_form(layer):
    with pytest.raises(ValueError, match=r"has no synchronized form .* batchnorm.convert\(model, to=batchnorm.SyncBatchNorm\)"):
        nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))


# -- Why 3 / item 2: fusers ------------------------------------------------------------------------------------------
def test_fuse_conv_bn_eval_equals_torch_for_plain_layers():
    conv = nn.Conv2d(3, 4, 3).eval()
    ref = _randomize_state(nn.Sequential(nn.BatchNorm2d(4))).eval()[0]
    ours = bn.convert(ref)
    x = torch.randn(2, 3, 6, 6)
    a = torch.nn.utils.fuse_conv_bn_eval(conv, ref)
    b = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, ours)
    torch.testing.assert_close(b(x), a(x))


FUSE_REFUSALS = {
    "activation": (nn.Conv2d(3, 4, 1), lambda: bn.BatchNorm(4, activation="silu"), "fuse_conv_bn_eval", "would drop it"),
    "axis_last_after_conv": (nn.Conv2d(3, 4, 1), lambda: bn.BatchNorm(4, axis=-1), "fuse_conv_bn_eval", "wrong axis"),
    "axis1_after_linear_3d": (nn.Linear(3, 4), lambda: bn.BatchNorm(4), "fuse_linear_bn_eval", "wrong axis"),
    "no_running_stats": (nn.Conv2d(3, 4, 1), lambda: bn.BatchNorm(4, track_running_stats=False), "fuse_conv_bn_eval",
                         "no running estimates"),
}


@pytest.mark.parametrize("layer, make_bn, fn, message", FUSE_REFUSALS.values(), ids=FUSE_REFUSALS)
def test_torch_fusers_refuse_what_they_would_compute_wrong(layer, make_bn, fn, message):
    norm = make_bn()
    if fn == "fuse_linear_bn_eval":
        norm(torch.randn(2, 4, 5))  # seen as (N, C, L): its axis 1 is not the linear's output axis
    with pytest.raises(ValueError, match=message):
        getattr(torch.nn.utils, fn)(layer.eval(), norm.eval())


def test_fuse_linear_bn_eval_accepts_axis_last():
    lin = nn.Linear(3, 4).eval()
    norm = _randomize_state(nn.Sequential(bn.BatchNorm(4, axis=-1))).eval()[0]
    x = torch.randn(2, 5, 3)
    fused = torch.nn.utils.fuse_linear_bn_eval(lin, norm)
    torch.testing.assert_close(fused(x), norm(lin(x)), rtol=1e-5, atol=1e-6)


FUSE_MODULES = {
    "conv_bn": (["conv1", "bn1"], {}),
    "conv_bn_relu": (["conv1", "bn1", "relu"], {}),
    "conv_bn_fused_relu": (["conv1", "bn1"], {"activation": "relu"}),
}


@pytest.mark.parametrize("names, kwargs", FUSE_MODULES.values(), ids=FUSE_MODULES)
def test_ao_fuse_modules_folds_our_layers_in_eval(names, kwargs):
    from torch.ao.quantization import fuse_modules

    ref, ours = _pair("resnet18_cifar", **kwargs)
    ref.eval()
    ours.eval()
    x = zoo.example_input(batch=2)
    fused = fuse_modules(copy.deepcopy(ours), [names])
    assert not isinstance(fused.bn1, bn.BatchNorm)
    torch.testing.assert_close(fused(x), ours(x), rtol=1e-4, atol=1e-5)
    if not kwargs:
        torch.testing.assert_close(fused(x), fuse_modules(copy.deepcopy(ref), [names])(x), rtol=1e-4, atol=1e-5)


def test_ao_fuse_modules_qat_asks_for_torch_layers():
    from torch.ao.quantization import fuse_modules_qat

    _, ours = _pair("resnet18_cifar")
    with pytest.raises(ValueError, match=r"quantization-aware training .* batchnorm.convert\(model"):
        fuse_modules_qat(ours.train(), [["conv1", "bn1"]])


def test_fx_fuse_runs_and_matches():
    from torch.fx.experimental.optimization import fuse

    _, ours = _pair("mobilenet_v2_tiny")
    ours.eval()
    x = zoo.example_input(batch=2)
    torch.testing.assert_close(fuse(copy.deepcopy(ours))(x), ours(x))


# -- Why 3: fx, jit, export, onnx ------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", zoo.MODELS)
def test_fx_symbolic_trace_records_leaf_calls_and_matches(name, training):
    _, ours = _pair(name)
    ours.train(training)
    for d in ours.modules():
        if isinstance(d, nn.Dropout):
            d.p = 0.0
    twin = copy.deepcopy(ours)
    gm = torch.fx.symbolic_trace(twin)
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), bn.BatchNorm)]
    assert len(leaves) == _n_ours(ours)
    x = zoo.example_input(batch=4, channels_last=True)
    torch.testing.assert_close(gm(x), ours(x), rtol=1e-5, atol=1e-6)
    for b_gm, b_ours in zip(gm.buffers(), ours.buffers()):  # training updates happen in the graph too
        torch.testing.assert_close(b_gm, b_ours)


def test_fx_trace_passes_a_mask_through():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = bn.BatchNorm(3, axis=-1)

        def forward(self, x, mask):
            return self.norm(x, mask=mask)

    gm = torch.fx.symbolic_trace(Seq())
    x, mask = torch.randn(4, 6, 3), torch.rand(4, 6) > 0.3
    torch.testing.assert_close(gm(x, mask), Seq()(x, mask))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert "mask" in node.kwargs


def test_fx_trace_of_every_layer_kind():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), bn.FrozenBatchNorm(4), bn.AffineOnly(4), bn.GhostBatchNorm(4, virtual_batch_size=2),
        bn.BatchRenorm(4), bn.SyncBatchNorm(4),
    )
    twin = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(twin)
    assert [n.op for n in gm.graph.nodes].count("call_module") == 6
    x = torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin[3].running_var, model[3].running_var)


def _jit_trace(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(model, x, check_trace=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", zoo.MODELS)
def test_jit_trace_eval_records_aten_batch_norm_and_matches(name, layout):
    ref, ours = _pair(name, activation=None)
    ours.eval()
    x = zoo.example_input(batch=2, channels_last=LAYOUTS[layout])
    traced = _jit_trace(ours, x)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::batch_norm" in kinds
    x2 = zoo.example_input(batch=3, seed=5, channels_last=LAYOUTS[layout])
    torch.testing.assert_close(traced(x2), ours(x2), rtol=1e-5, atol=1e-6)


JIT_LAYERS = {
    "axis_last_relu6": (lambda: bn.BatchNorm(5, axis=-1, activation="relu6"), (4, 3, 5), torch.float32),
    "leaky_relu": (lambda: bn.BatchNorm(5, activation="leaky_relu", negative_slope=0.2), (4, 5, 3), torch.float32),
    "frozen": (lambda: bn.FrozenBatchNorm(5), (4, 5, 3), torch.float32),
    "renorm_eval": (lambda: bn.BatchRenorm(5), (4, 5, 3), torch.float32),
    "ghost_eval": (lambda: bn.GhostBatchNorm(5, virtual_batch_size=2), (4, 5, 3), torch.float32),
    "half": (lambda: bn.BatchNorm(5), (4, 5, 3), torch.float16),
    "bfloat16": (lambda: bn.BatchNorm(5), (4, 5, 3), torch.bfloat16),
}


@pytest.mark.parametrize("make, shape, dtype", JIT_LAYERS.values(), ids=JIT_LAYERS)
def test_jit_trace_layers_match_eager(make, shape, dtype):
    layer = _randomize_state(nn.Sequential(make())).eval()
    x = torch.randn(*shape).to(dtype)
    traced = _jit_trace(layer, x)
    x2 = torch.randn(*shape).to(dtype)
    y = traced(x2)
    assert y.dtype == dtype
    torch.testing.assert_close(y, layer(x2))


def test_jit_trace_train_mode_follows_torch_batch_norm():
    ours, ref = bn.BatchNorm(4, momentum=None), nn.BatchNorm1d(4, momentum=None)
    x = torch.randn(6, 4, 3)
    t_ours, t_ref = _jit_trace(ours, x), _jit_trace(ref, x)
    for _ in range(2):
        torch.testing.assert_close(t_ours(x + 1), t_ref(x + 1))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3


JIT_REFUSALS = {
    "ghost_train": (lambda: bn.GhostBatchNorm(4, virtual_batch_size=2), None, r"ghost batches"),
    "renorm_train": (lambda: bn.BatchRenorm(4), None, r"RenormCombine"),
    "mask_train": (lambda: bn.BatchNorm(4), torch.ones(6, 3, dtype=torch.bool), r"with a mask"),
}


@pytest.mark.parametrize("make, mask, what", JIT_REFUSALS.values(), ids=JIT_REFUSALS)
def test_jit_trace_refuses_training_semantics_aten_lacks(make, mask, what):
    layer = make()
    x = torch.randn(6, 4, 3)
    with pytest.raises(RuntimeError, match=rf"torch.jit.trace cannot record .*{what}.*model.eval\(\)"):
        torch.jit.trace(lambda t: layer(t, mask), x, check_trace=False)


def test_jit_script_raises_one_clear_error():
    _, ours = _pair("resnet18_cifar")
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile BatchNorm.*torch.jit.trace.*torch.export"):
        torch.jit.script(ours)


@pytest.mark.parametrize("name", zoo.MODELS)
def test_export_eval_lowers_to_aten_and_matches(name):
    _, ours = _pair(name)
    ours.eval()
    x = zoo.example_input(batch=2)
    ep = torch.export.export(ours, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("batchnorm.") for t in targets), targets
    x2 = zoo.example_input(batch=2, seed=3, channels_last=True)
    torch.testing.assert_close(ep.module()(x2), ours(x2), rtol=1e-5, atol=1e-6)


ONNX_CASES = {
    "resnet18_cifar": (lambda: _pair("resnet18_cifar")[1], (2, 3, 32, 32)),
    "mobilenet_v2_tiny": (lambda: _pair("mobilenet_v2_tiny")[1], (2, 3, 32, 32)),
    "input_bn_axis_last_silu": (lambda: _randomize_state(nn.Sequential(bn.BatchNorm(6, axis=-1, activation="silu"),
                                                                       nn.Linear(6, 2))), (3, 4, 6)),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("make, shape", ONNX_CASES.values(), ids=ONNX_CASES)
def test_onnx_export_runs_in_onnxruntime(make, shape, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = make().eval()
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, dynamo=False)
            proto = onnx.load_from_string(buf.getvalue())
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # standard operators only
    ops = {n.op_type for n in proto.graph.node}
    if shape[-1] == 6:  # a BN on the input cannot be folded into a conv: ONNX's own BatchNormalization
        assert "BatchNormalization" in ops, ops
    sess = ort.InferenceSession(proto.SerializeToString())
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_fx_quantization_prepare_convert_runs():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _, ours = _pair("resnet18_cifar")
    ours.eval()
    x = zoo.example_input(batch=2)
    prepared = prepare_fx(copy.deepcopy(ours), get_default_qconfig_mapping("x86"), (x,))
    prepared(x)  # calibration
    quantized = convert_fx(prepared)
    assert any(isinstance(m, bn.BatchNorm) for m in quantized.modules())  # ours stay float, as leaf calls
    y, y_float = quantized(x), ours(x)
    assert (y - y_float).abs().max() < 0.1 * y_float.abs().max() + 1e-3  # int8 round-off, not a different model


def test_interop_uninstall_restores_torch_and_install_is_idempotent():
    from batchnorm.layers import interop

    wrapped = nn.SyncBatchNorm.convert_sync_batchnorm
    interop.install()  # a second install changes nothing
    assert nn.SyncBatchNorm.convert_sync_batchnorm == wrapped
    original_fuse = interop._saved["fuse_conv_bn_eval"]
    assert torch.nn.utils.fuse_conv_bn_eval is not original_fuse
    interop.uninstall()
    try:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(bn.BatchNorm(4, axis=-1)))
        assert type(converted[0]) is nn.SyncBatchNorm  # torch's behaviour (the wrong layer this module prevents)
        assert torch.nn.utils.fuse_conv_bn_eval is original_fuse
    finally:
        interop.install()
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(bn.BatchNorm(4, axis=-1)))[0]) is bn.SyncBatchNorm
