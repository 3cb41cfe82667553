"""The three backends behind one protocol: conformance, native semantics, dispatch, cold start, in-place, meta.

Tables of cases drive each test (PyTorch ``ModuleInput`` style). ``backend`` is the conftest fixture
(numba, composite, native, forced through ``BATCHNORM_BACKEND``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import batchnorm
from batchnorm import functional as Fn
from batchnorm.kernels import dispatch, warmup
from batchnorm.kernels.backend import Backend, Settings
from batchnorm.kernels.composite import COMPOSITE
from batchnorm.kernels.native import NATIVE

NAMES = dispatch.available()


def _backend_object(name: str) -> Backend:
    if name == "composite":
        return COMPOSITE
    if name == "native":
        return NATIVE
    if name == "triton":  # listed once TRITON_INTERPRET=1 is set (test_triton.py sets it for the process)
        from batchnorm.kernels.triton import TRITON

        return TRITON
    from batchnorm.kernels.numba import NUMBA

    return NUMBA


# ------------------------------------------------------------------ protocol conformance
PRIMITIVE_CASES = [
    # (shape, axis, layout, group_size, masked)
    ((12, 5), 1, "contig", None, False),
    ((6, 4, 3, 5), 1, "cl", None, False),
    ((5, 7, 3), 2, "contig", None, True),
    ((8, 3, 4), 1, "contig", 3, False),
]


def _make(shape, layout, dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


@pytest.mark.parametrize("name", NAMES)
def test_every_backend_implements_the_protocol(name):
    ops = _backend_object(name)
    assert isinstance(ops, Backend) and ops.name == name
    for method in ("reduce", "apply", "backward_reduce", "backward_apply", "train_forward", "train_backward",
                   "eval_forward", "update_running"):
        assert callable(getattr(ops, method))
    # the four primitives are each backend's own (not the base class's NotImplementedError stubs)
    for method in ("reduce", "apply", "backward_reduce", "backward_apply"):
        assert getattr(type(ops), method) is not getattr(Backend, method)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,axis,layout,group_size,masked", PRIMITIVE_CASES, ids=str)
def test_primitives_match_composite(name, shape, axis, layout, group_size, masked):
    ops = _backend_object(name)
    x = _make(shape, layout)
    s = Settings(axis=axis, group_size=group_size, activation="silu")
    m = None
    if masked:
        keep = torch.rand([d for i, d in enumerate(shape) if i != axis]) > 0.3
        m = keep.unsqueeze(axis)
    want = COMPOSITE.reduce(x, s, m)
    got = ops.reduce(x, s, m)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    G, C = want[1].shape
    scale, shift = torch.rand(G, C, dtype=x.dtype) + 0.5, torch.randn(G, C, dtype=x.dtype)
    torch.testing.assert_close(ops.apply(x, s, scale, shift), COMPOSITE.apply(x, s, scale, shift))
    dy = torch.randn_like(x)
    p, q = want[1], torch.rand(G, C, dtype=x.dtype) + 0.5
    for g, w in zip(ops.backward_reduce(dy, x, s, p, q, scale, shift), COMPOSITE.backward_reduce(dy, x, s, p, q, scale, shift)):
        torch.testing.assert_close(g, w)
    k, a, b = torch.rand(G, C, dtype=x.dtype), torch.randn(G, C, dtype=x.dtype), torch.randn(G, C, dtype=x.dtype)
    torch.testing.assert_close(ops.backward_apply(dy, x, s, p, q, k, a, b, m, scale, shift),
                               COMPOSITE.backward_apply(dy, x, s, p, q, k, a, b, m, scale, shift))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("activation", [None, "relu6", "leaky_relu"], ids=str)
def test_fused_sequences_match_the_composed_default(name, activation):
    """A backend's train/eval sequences compute what the protocol's default composition computes."""
    ops = _backend_object(name)
    x = _make((16, 4, 3), "contig")
    w, b = torch.rand(4, dtype=x.dtype) + 0.5, torch.randn(4, dtype=x.dtype)
    s = Settings(axis=1, activation=activation, negative_slope=0.2)
    y, *_ = ops.train_forward(x, s, None, w, b, None)
    want, *_ = Fn.compose_train_forward(COMPOSITE, x, s, None, w, b)
    torch.testing.assert_close(y, want)
    rm, rv = torch.randn(4, dtype=x.dtype), torch.rand(4, dtype=x.dtype) + 0.5
    torch.testing.assert_close(ops.eval_forward(x, s, w, b, rm, rv), Backend.eval_forward(COMPOSITE, x, s, w, b, rm, rv))


# ------------------------------------------------------------------ native backend semantics
def _bn(C, **kw):
    return batchnorm.BatchNorm(C, backend="native", **kw)


def test_native_matches_torch_with_momentum_none_and_running_statistics():
    ours, ref = _bn(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None)
    for i in range(4):
        x = torch.randn(10, 3) * (i + 1) + i
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    assert dispatch.chosen(ours, x) == "native"


NONFINITE_CASES = [
    # (input factory, warning text)
    (lambda: torch.full((8, 4), float("nan")), r"NaN or Inf in the input"),
    (lambda: torch.tensor([[float("inf")] * 4] + [[0.0] * 4] * 7), r"NaN or Inf in the input"),
    (lambda: torch.randn(8, 4) * 1e20, r"the input is finite, but values up to .* overflow the float32 statistics"
                                       r".*float64"),
]


@pytest.mark.parametrize("make,message", NONFINITE_CASES, ids=["nan", "inf", "overflow"])
def test_non_finite_batch_leaves_running_estimates_and_names_the_cause(make, message, backend):
    layer = batchnorm.BatchNorm(4)
    layer(torch.randn(8, 4))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"batch statistics are not finite \(" + message):
        layer(make())
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_native_half_precision_keeps_float32_state_and_own_output_dtype(dtype):
    layer, ref = _bn(5), torch.nn.BatchNorm2d(5)
    x = torch.randn(4, 5, 3, 3).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and layer.running_mean.dtype == torch.float32 and layer.weight.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref(x.float()).to(dtype).float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(layer.running_var, ref.running_var, atol=1e-3, rtol=1e-3)


def test_native_double_backward_matches_gradgradcheck():
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    layer = _bn(3).double()

    def f(x):
        return layer(x)

    assert torch.autograd.gradgradcheck(f, (x,))


def test_native_empty_batch_and_single_value_follow_the_readme():
    layer = _bn(3)
    assert layer(torch.randn(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="expected more than 1 value per feature"):
        layer(torch.randn(1, 3))


ROUTING_CASES = [
    # (layer factory, input factory, mask?, expected backend when numba is not warm yet)
    (lambda: batchnorm.BatchNorm(4), lambda: torch.randn(8, 4), False, "native"),
    (lambda: batchnorm.BatchNorm(4, axis=-1), lambda: torch.randn(2, 5, 4), False, "native"),
    (lambda: batchnorm.BatchNorm(4, axis=-1), lambda: torch.randn(2, 4, 5).transpose(1, 2), False, "composite"),
    (lambda: batchnorm.BatchNorm(4), lambda: torch.randn(8, 4, 3), True, "composite"),
    (lambda: batchnorm.BatchNorm(4, memory="save"), lambda: torch.randn(8, 4), False, "composite"),
    (lambda: batchnorm.GhostBatchNorm(4, virtual_batch_size=4), lambda: torch.randn(8, 4), False, "composite"),
    (lambda: batchnorm.BatchRenorm(4), lambda: torch.randn(8, 4), False, "composite"),
    (lambda: batchnorm.BatchNorm(4).eval(), lambda: torch.randn(8, 4), False, "native"),
    (lambda: batchnorm.BatchNorm(4).half(), lambda: torch.randn(8, 4).half(), False, "native"),
]


@pytest.mark.parametrize("make_layer,make_x,masked,cold", ROUTING_CASES, ids=range(len(ROUTING_CASES)))
def test_cold_start_serves_without_numba_and_numba_takes_over(make_layer, make_x, masked, cold, monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    layer, x = make_layer(), make_x()
    mask = torch.ones([d for i, d in enumerate(x.shape) if i != 1], dtype=torch.bool) if masked else None
    monkeypatch.setattr(warmup, "_status", "warming")  # "the numba kernels are still compiling"
    monkeypatch.setattr(warmup, "_start_warm_up", lambda: None)
    assert dispatch.chosen(layer, x, mask) == cold
    layer(x, mask)  # runs on that backend without waiting for numba
    if "numba" not in NAMES:
        return
    monkeypatch.setattr(warmup, "_status", "ready")
    big = torch.randn(64, 4, 64, 64).to(x.dtype).reshape(-1, 4) if x.dim() == 2 else None
    if cold == "composite" and x.dtype in (torch.float32, torch.float64) and x.stride(-1) != 2:
        assert dispatch.chosen(layer, x, mask) == "numba"  # what native cannot serve: numba once it is warm
    if big is not None and cold == "native" and x.dtype == torch.float32 and layer.training:
        assert dispatch.chosen(layer, big) == "numba"  # large plain calls: numba is cheaper (cost table)


def test_forced_backend_that_cannot_serve_falls_back_to_composite():
    layer = batchnorm.BatchNorm(4, backend="native")
    x = torch.randn(8, 4, 3)
    assert dispatch.chosen(layer, x, torch.ones(8, 3, dtype=torch.bool)) == "composite"
    assert dispatch.chosen(layer, x) == "native"


def test_unknown_backend_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of .*'native'"):
        dispatch.select(torch.randn(4, 3), Settings(axis=1), backend="cuda")


@pytest.mark.skipif("numba" not in NAMES, reason="numba is not installed")
def test_warm_up_in_a_fresh_process_serves_first_call_with_native_then_numba():
    code = textwrap.dedent("""
        import time, torch, batchnorm
        from batchnorm.kernels import dispatch
        layer, x = batchnorm.BatchNorm(16), torch.randn(8, 16)
        t = time.perf_counter(); layer(x).sum().backward(); first = time.perf_counter() - t
        print(dispatch.chosen(layer, x), dispatch.warm_up_status())
        print(dispatch.wait_ready(800), dispatch.chosen(layer, torch.randn(64, 64, 32, 32)))
    """)
    # the built-in table; normal priority: a SCHED_IDLE compile waits for idle CPU, which a busy CI may not have
    env = {**os.environ, "BATCHNORM_WARMUP": "process", "BATCHNORM_CALIBRATE": "0", "BATCHNORM_WARMUP_PRIORITY": "normal"}
    env.pop("BATCHNORM_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "native warming"
    assert lines[1] == "True numba"


# ------------------------------------------------------------------ outputs are never views (issue 12, item 1)
INPLACE_LAYOUTS = [
    ((6, 4, 5, 5), 1, "contig"),
    ((6, 4, 5, 5), 1, "cl"),
    ((32, 8, 40, 40), 1, "cl"),  # large enough for the numba buffer cache
    ((7, 6), 1, "contig"),
    ((5, 7, 4), -1, "contig"),
    ((5, 4, 7), 1, "perm"),
]


@pytest.mark.parametrize("shape,axis,layout", INPLACE_LAYOUTS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_in_place_consumers_work_after_every_layout(shape, axis, layout, training, backend):
    x = torch.randn(shape)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "perm":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    x.requires_grad_()
    layer = batchnorm.BatchNorm(shape[axis], axis=axis).train(training)
    identity = torch.randn(shape)
    out = layer(x)
    out += identity  # resnet: out += identity; then ReLU(inplace=True)
    torch.nn.ReLU(inplace=True)(out)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    ref = torch.nn.BatchNorm1d(shape[axis]) if len(shape) < 4 else torch.nn.BatchNorm2d(shape[axis])
    ref.train(training)
    xr = x.detach().clone().requires_grad_()
    yr = ref(xr if axis == 1 else xr.transpose(1, 2))
    yr = yr if axis == 1 else yr.transpose(1, 2)
    torch.relu(yr + identity).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_memory_save_keeps_its_error_for_in_place_consumers(backend):
    layer = batchnorm.BatchNorm(4, memory="save", activation="leaky_relu")
    out = layer(torch.randn(8, 4, 3, requires_grad=True))
    out += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# ------------------------------------------------------------------ meta tensors and messages (issue 13)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(8, 4), (2, 4, 3, 3)], ids=str)
def test_meta_tensors_behave_as_torch(shape, training):
    ours = batchnorm.BatchNorm(4, device="meta").train(training)
    ref = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(4, device="meta").train(training)
    x = torch.randn(shape, device="meta")
    y, yr = ours(x), ref(x)
    assert y.device.type == "meta" and y.shape == yr.shape and y.dtype == yr.dtype
    with pytest.raises(RuntimeError) as ours_err:
        ours(torch.randn(shape))
    with pytest.raises(RuntimeError) as ref_err:
        ref(torch.randn(shape))
    assert "meta" in str(ours_err.value) and "meta" in str(ref_err.value)


def test_zero_features_does_not_suggest_num_features_zero():
    with pytest.raises(ValueError, match=r"with 0 there: an input needs at least one feature") as err:
        batchnorm.BatchNorm(4)(torch.randn(8, 0))
    assert "num_features=0" not in str(err.value)


def test_warning_stack_points_at_the_caller():
    layer = batchnorm.BatchNorm(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.full((8, 4), float("nan")))
    assert caught and caught[0].category is RuntimeWarning


# ------------------------------------------------------------------ the layer's fast path (plans)
def _slow_copy(layer):
    """A twin of ``layer`` that never keeps a plan (its ``_prepare_fast`` is a no-op)."""
    import copy

    twin = copy.deepcopy(layer)
    twin._prepare_fast = lambda *a, **k: None
    return twin


FAST_CASES = [
    # (layer kwargs, input shape, training, dtype)
    (dict(), (8, 16), True, torch.float32),
    (dict(momentum=None), (8, 16), True, torch.float32),
    (dict(axis=-1, activation="relu"), (4, 5, 6), True, torch.float32),
    (dict(track_running_stats=False), (8, 6, 3, 3), True, torch.float32),
    (dict(), (8, 6, 3, 3), False, torch.float32),
    (dict(activation="leaky_relu", negative_slope=0.2), (16, 3), True, torch.float64),
    (dict(affine=False), (300, 100), True, torch.float32),  # C > 64: the dot-product check
]


#: the backends a layer keeps a plan for: auto (native at these sizes: kernels.native.Plan) and the ones
#: functional._TrainNorm drives (functional.RoutePlan)
PLAN_BACKENDS = [None, "composite"] + (["numba"] if "numba" in NAMES else [])


@pytest.mark.parametrize("backend", PLAN_BACKENDS, ids=lambda b: b or "auto")
@pytest.mark.parametrize("kw,shape,training,dtype", FAST_CASES, ids=range(len(FAST_CASES)))
def test_fast_path_matches_the_slow_path_call_for_call(kw, shape, training, dtype, backend, monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    kw = dict(kw, backend=backend)
    fast = batchnorm.BatchNorm(shape[-1] if kw.get("axis") == -1 else shape[1], **kw).to(dtype).train(training)
    slow = _slow_copy(fast)
    calls = []
    real = Fn.normalize
    monkeypatch.setattr(Fn, "normalize", lambda *a, **k: calls.append(1) or real(*a, **k))
    for step in range(3):
        x = (torch.randn(shape, dtype=dtype) * (step + 1) + step).requires_grad_()
        xs = x.detach().clone().requires_grad_()
        y, ys = fast(x), slow(xs)
        torch.testing.assert_close(y, ys, rtol=0, atol=0)
        g = torch.randn_like(y)
        y.backward(g)
        ys.backward(g)
        torch.testing.assert_close(x.grad, xs.grad, rtol=0, atol=0)
        for name, t in fast.state_dict().items():
            torch.testing.assert_close(t, slow.state_dict()[name], rtol=0, atol=0, msg=name)
        assert fast.last_input_shape == slow.last_input_shape == shape
    assert len(calls) == 1 + 3  # fast: only its first call took the slow path; slow: every call
    assert "_fast" in fast.__dict__ and dispatch.chosen(fast, x) == (backend or "native")
    plan = next(iter(fast.__dict__["_fast"].values()))
    assert type(plan).__name__ == ("Plan" if backend is None else "RoutePlan")


def _bad(shape=(8, 4)):
    return torch.full(shape, float("nan"))


CHANGE_CASES = [
    # (what changes after the plan was made, applied to (layer, x) -> new x)
    ("momentum", lambda m, x: setattr(m, "momentum", 0.5) or x),
    ("eps", lambda m, x: setattr(m, "eps", 0.25) or x),
    ("eval", lambda m, x: m.eval() and x),
    ("weight object", lambda m, x: setattr(m, "weight", torch.nn.Parameter(torch.rand(4) + 1)) or x),
    ("double", lambda m, x: m.double() and x.double()),
    ("activation", lambda m, x: setattr(m, "activation", "tanh") or x),
    ("buffers swapped in place", lambda m, x: torch.utils.swap_tensors(m.running_var, torch.rand(4) + 1) or x),
]


@pytest.mark.parametrize("backend", PLAN_BACKENDS, ids=lambda b: b or "auto")
@pytest.mark.parametrize("what,change", CHANGE_CASES, ids=[c[0] for c in CHANGE_CASES])
def test_fast_path_follows_every_change_of_the_layer(what, change, backend, monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    layer = batchnorm.BatchNorm(4, backend=backend)
    x = torch.randn(8, 4)
    layer(x)
    layer(x)  # runs the plan
    x = change(layer, x)
    twin = _slow_copy(layer)
    torch.testing.assert_close(layer(x), twin(x), rtol=0, atol=0)
    for name, t in layer.state_dict().items():
        torch.testing.assert_close(t, twin.state_dict()[name], rtol=0, atol=0, msg=name)
    # and a non-finite batch is still refused with the state left as it was
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="batch statistics are not finite"):
        layer.train()(_bad().to(x.dtype))
    for name, t in layer.state_dict().items():
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, msg=name)


def test_fast_path_follows_the_environment_and_patched_dispatch(monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    layer, x = batchnorm.BatchNorm(4), torch.randn(8, 4)
    layer(x)
    layer(x)
    seen = []
    real = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda *a, **k: seen.append(real(*a, **k).name) or real(*a, **k))
    layer(x)
    layer(x)
    assert seen and set(seen) == {"native"}  # a patched select is consulted on every call
    monkeypatch.setenv("BATCHNORM_BACKEND", "composite")
    seen.clear()
    layer(x)
    assert seen[-1] == "composite"
    monkeypatch.setenv("BATCHNORM_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        layer(x)


GUARD_CASES = [
    # (layer kwargs, old running_mean fill, batch factory, accepted?)
    (dict(), 0.0, lambda: _bad(), False),
    (dict(), 0.0, lambda: torch.randn(8, 4) * 1e20, False),  # the variance overflows float32
    (dict(momentum=0.0), 0.0, lambda: _bad(), False),  # f = 0: the exact check decides
    (dict(), float("nan"), lambda: torch.randn(8, 4), True),  # old non-finite buffers never refuse a good batch
    (dict(), float("inf"), lambda: torch.randn(8, 4), True),
]


@pytest.mark.parametrize("kw,old,make,accepted", GUARD_CASES, ids=range(len(GUARD_CASES)))
def test_fast_path_guard_agrees_with_the_composite_rule(kw, old, make, accepted, monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    layer = batchnorm.BatchNorm(4, **kw)
    layer(torch.randn(8, 4))
    layer.running_var.fill_(old)
    ref = batchnorm.BatchNorm(4, backend="composite", **kw)  # the decision: composite's update_running rule
    ref.load_state_dict(layer.state_dict())
    twin = _slow_copy(layer)  # the values: the same native call without a plan (ATen's update, not torch.lerp)
    x = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
        ref(x)
        twin(x)
    refused = [w for w in caught if "not finite" in str(w.message)]
    assert len(refused) == (0 if accepted else 3)
    assert refused[:1] == [] or refused[0].filename == __file__  # the fast path's warning points at the caller
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == (2 if accepted else 1)
    for name, t in layer.state_dict().items():
        torch.testing.assert_close(t, twin.state_dict()[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_copies_of_a_layer_start_without_plans_and_update_their_own_buffers():
    import copy
    import pickle

    layer, x = batchnorm.BatchNorm(4), torch.randn(8, 4)
    layer(x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not twin.__dict__.get("_fast")
        before = layer.running_mean.clone()
        twin(x * 3 + 1)
        twin(x * 3 + 1)
        torch.testing.assert_close(layer.running_mean, before)
        assert int(twin.num_batches_tracked) == 3
