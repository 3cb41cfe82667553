"""torch.compile and torch.export with our layer inside (numba path through the torch.library custom ops).

Kept small: compiling is slow on 2 cores (the module runs one compile for train + eval and one export).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.kernels import dispatch

pytestmark = pytest.mark.skipif("numba" not in dispatch.available(), reason="numba is not installed")


def _model(activation=None):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        batchnorm.BatchNorm(8, activation=activation, backend="numba"),
        nn.Conv2d(8, 4, 1),
    )


def test_compile_train_and_eval_match_eager():
    eager, compiled_src = _model("relu"), _model("relu")
    compiled = torch.compile(compiled_src)
    x = torch.randn(4, 3, 6, 6)
    g = torch.randn(4, 4, 6, 6)
    for _ in range(2):  # train steps: outputs, gradients and running statistics
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
        y_e.backward(g)
        y_c.backward(g)
    for pe, pc in zip(eager.parameters(), compiled_src.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_src[1].running_var, eager[1].running_var)
    assert int(compiled_src[1].num_batches_tracked) == 2
    eager.eval()
    compiled_src.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def test_export_eval_model_lowers_to_aten_batch_norm_and_matches():
    # eval-mode export records ATen's batch_norm + the activation (portable: ONNX, AOTInductor), not our ops
    model = _model("silu").eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 5, 5)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.batch_norm.default" in targets and "aten.silu.default" in targets, targets
    assert not any(t.startswith("batchnorm.") for t in targets), targets
    x2 = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(ep.module()(x2), model(x2))


def test_export_train_model_is_torchs_graph():
    # issue 18: training-mode export records torch's BN graph (ATen batch_norm), the same with numba warm or cold;
    # the custom ops (no autograd formula in an exported graph) stay out (more in tests/test_silent.py)
    model = _model("silu")
    x = torch.randn(2, 3, 5, 5)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.batch_norm.default" in targets and not any(t.startswith("batchnorm.") for t in targets), targets


def test_fake_impls_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(10, 4, 3)
        # every op: its tensors, then the settings tail (axis, group_size, activation, negative_slope, save)
        count, mean, m2 = torch.ops.batchnorm.reduce(x, None, 1, 3, "identity", 0.01, False)
        assert count.shape == mean.shape == m2.shape == (4, 4)
        y = torch.ops.batchnorm.apply(x, torch.empty(1, 4), torch.empty(1, 4), 1, None, "relu", 0.01, False)
        assert y.shape == x.shape
        s1, s2 = torch.ops.batchnorm.backward_reduce(x, x, mean, mean, None, None, 1, 3, "identity", 0.01, False)
        assert s1.shape == s2.shape == (4, 4)
        dx = torch.ops.batchnorm.backward_apply(x, x, mean, mean, mean, mean, mean, None, None, None,
                                                1, 3, "relu", 0.01, False)
        assert dx.shape == x.shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_has_no_graph_breaks(training):
    # issue 12: "torch.compile works with zero graph breaks" -- keep it that way (one graph for the model)
    from batchnorm import zoo

    model = batchnorm.convert(zoo.BLOCKS["basic_block"][0](), backend="numba").train(training)
    x = zoo.example_input(8, batch=4, size=6)
    model(x)  # eager first: kernels compiled outside the traced region
    explained = torch._dynamo.explain(model)(x)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1



def _compiled_targets(model, x, no_breaks=True):
    explained = torch._dynamo.explain(model)(x)
    if no_breaks:
        assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    return {str(getattr(n.target, "__name__", n.target)) for g in explained.graphs for n in g.graph.nodes
            if n.op == "call_function"}


def test_compile_lowers_plain_layers_to_aten_and_keeps_the_non_finite_guard():
    # issue 12 item 6: plain layers on the automatic backend compile like torch's BN (ATen batch_norm)
    from batchnorm import zoo

    ref = zoo.BLOCKS["basic_block"][0]()
    ours = batchnorm.convert(ref)
    x = zoo.example_input(8, batch=4, size=6)
    assert "batch_norm" in _compiled_targets(copy.deepcopy(ours), x)
    compiled = torch.compile(ours)
    y, y_ref = compiled(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bn1.running_var, ref.bn1.running_var)
    assert int(ours.bn1.num_batches_tracked) == 1
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    before = ours.bn1.running_mean.clone()
    compiled(bad)
    assert torch.equal(ours.bn1.running_mean, before) and int(ours.bn1.num_batches_tracked) == 1


def test_compile_kernels_env_keeps_our_ops(monkeypatch):
    monkeypatch.setenv("BATCHNORM_COMPILE", "kernels")
    model = batchnorm.convert(_model(), backend=None)  # automatic backend: would lower without the variable
    targets = _compiled_targets(model, torch.randn(4, 3, 6, 6), no_breaks=False)  # (breaks: see the test above)
    assert "batch_norm" not in targets


# issue 17 item 5: memory="save" compiled (it failed on every backend: the saved counts aliased an output of the
# traced autograd.Function) and masked layers without graph breaks (they broke on the mask's count check)
_MASK = torch.tensor([[True] * 5 + [False], [True] * 6, [True, False] * 3, [True] * 4 + [False] * 2])


@pytest.mark.parametrize("backend", [None, "composite"], ids=["auto", "composite"])
def test_memory_save_compiles_in_one_graph_and_matches_eager(backend):
    torch._dynamo.reset()
    make = lambda: batchnorm.BatchNorm(4, activation="leaky_relu", memory="save", backend=backend)  # noqa: E731
    eager, layer = make(), make()
    x = torch.randn(4, 4, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager(x), layer(x)  # eager first: kernels compiled outside the traced region
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y, y_ref = compiled(xa), eager(xb)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, eager.weight.grad)
    torch.testing.assert_close(layer.running_var, eager.running_var)


@pytest.mark.parametrize("make", [lambda: batchnorm.BatchNorm(4),
                                  lambda: batchnorm.GhostBatchNorm(4, virtual_batch_size=2)],
                         ids=["masked BatchNorm", "masked GhostBatchNorm"])
def test_masked_layers_compile_without_graph_breaks(make):
    torch._dynamo.reset()
    layer, eager = make(), make()
    x = torch.randn(4, 4, 6, requires_grad=True)
    layer(x, _MASK)
    explained = torch._dynamo.explain(lambda t: layer(t, _MASK))(x)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    eager(x, _MASK)
    eager(x, _MASK)  # the same two steps as the compiled layer's (eager warm-up + explain's run)
    torch.testing.assert_close(layer.running_mean, eager.running_mean)
    torch.testing.assert_close(layer.running_var, eager.running_var)
