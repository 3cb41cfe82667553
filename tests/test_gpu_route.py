"""The GPU route, driven with CPU tensors: no host sync on any step, and the kernels each step launches.

There is no GPU here. ``dispatch.device_type`` is the one device check of the package, so patching it to answer
``"cuda"`` sends CPU tensors through every branch a CUDA tensor takes (native's device-side guard, the composite
fallback of the variants, triton where its interpreter runs). Each step is then counted (:class:`StepCount`):

* **host syncs** — ATen ops that read device data back (``_local_scalar_dense``: ``.item()``, ``bool()``,
  ``int()``; ``nonzero``, ``masked_select``, ``equal``, ``is_nonzero``) and the host reads that bypass ATen on a
  CPU tensor but would copy device memory back on a GPU (``Tensor.tolist``, ``.numpy()``, ``__array__``, seen
  by a ``TorchFunctionMode``);
* **host data** — tensors built from Python data (``lift_fresh``: ``torch.tensor([...])``, ``torch.as_tensor(0.1,
  device=...)``), which on a GPU are pageable host-to-device copies. ``scalar_tensor`` (the wrapped number of
  ``torch.where(m, x, 0.0)``) is counted as a kernel, not as host data: on CUDA it is a device fill, no copy;
* **kernels** — every other ATen op except views and allocation/metadata-only ops, plus the triton backend's
  own launches (``batchnorm.kernels.triton.launch_count``).

Counted after one warm-up step, in training (forward + backward with a fixed gradient) and in eval (forward
under ``no_grad``). ``torch.nn.BatchNorm2d`` is counted by the same counter as the baseline, and the CPU route of
our own layers (which does read values, cheaply, on purpose) is the positive control that proves the counter
sees both kinds of host read.

Kernel budgets, measured here, as ceilings that fail when a change adds a kernel. With triton
(:data:`TRITON_TABLE`, its kernels run by Triton's CPU interpreter): plain BN on native costs exactly torch's
launches (ATen's call without running buffers, then one triton launch for the guard, the running update and
``num_batches_tracked``, in place of torch's ``num_batches_tracked += 1``), every variant's training step is
6 launches, and SyncBatchNorm's 8 around its two collectives (a two-rank stand-in: :func:`two_ranks`). Without
triton (:data:`TABLE`: the pure-ATen fallback, variants on composite): plain BN costs torch's kernels + 6 (a
multi-tensor snapshot of the two buffers, three kernels for the finite flag, two selects).
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from batchnorm import BatchNorm, BatchRenorm, GhostBatchNorm, Standardizer, SyncBatchNorm
from batchnorm.kernels import dispatch, native
from batchnorm.layers import base as base_module
from batchnorm.layers import sync as sync_module

# Triton's interpreter must be chosen before triton is first imported (its library functions are jitted then);
# tests/conftest.py's triton_interpreter restores the variable when this module's tests end
_PREVIOUS = os.environ.get("TRITON_INTERPRET")
_INTERPRETABLE = _PREVIOUS == "1" or "triton" not in sys.modules
os.environ["TRITON_INTERPRET"] = "1"

try:
    from batchnorm.kernels.triton import backend as _TB
except ImportError:  # pragma: no cover - the package is part of the project; triton itself may be absent
    _TB = None

SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero"})
HOST_DATA_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})
HOST_READS = frozenset({"tolist", "numpy", "__array__"})
NOT_KERNELS = frozenset({"detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                         "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
                         "_has_compatible_shallow_copy_type", "promote_types", "result_type"})


class _Ops(TorchDispatchMode):
    def __init__(self, out: StepCount):
        super().__init__()
        self.out = out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.out.paused:
            pass
        elif name in SYNC_OPS:
            self.out.syncs.append(name)
        elif name in HOST_DATA_OPS:
            self.out.host_data.append(name)
        elif not func.is_view and name not in NOT_KERNELS:
            self.out.kernels.append(name)
        return func(*args, **(kwargs or {}))


class _Reads(TorchFunctionMode):
    def __init__(self, out: StepCount):
        super().__init__()
        self.out = out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and not self.out.paused:
            self.out.syncs.append(name)
        return func(*args, **(kwargs or {}))


class StepCount:
    """Context manager: what one step did (``syncs``, ``host_data``, ``kernels`` lists; ``launches`` = kernels + triton)."""

    active: list = []  # the counters open now (the stand-in collectives pause them)

    def __init__(self):
        self.syncs: list[str] = []
        self.host_data: list[str] = []
        self.kernels: list[str] = []
        self.triton = 0
        self.paused = False

    def _interpreted(self, launch):
        """A triton launch: counted by the backend; the ATen ops of Triton's CPU interpreter inside it (storage
        copies in and out, ``set_``) are its way of running the kernel, not the step's, so they are not counted."""
        def run(*args, **meta):
            self.paused = True
            try:
                return launch(*args, **meta)
            finally:
                self.paused = False
        return run

    def __enter__(self):
        self._t0 = _TB.launch_count() if _TB is not None else 0
        if _TB is not None:
            self._launch = _TB._launch
            _TB._launch = self._interpreted(self._launch)
        self._modes = (_Reads(self), _Ops(self))
        for m in self._modes:
            m.__enter__()
        StepCount.active.append(self)
        return self

    def __exit__(self, *exc):
        StepCount.active.remove(self)
        for m in reversed(self._modes):
            m.__exit__(*exc)
        if _TB is not None:
            _TB._launch = self._launch
        self.triton = (_TB.launch_count() if _TB is not None else 0) - self._t0
        return False

    @property
    def launches(self) -> int:
        return len(self.kernels) + self.triton


def _step(layer, x, mask, dy):
    """One training step (forward + backward with ``dy``) or, with ``dy`` None, one eval forward under no_grad."""
    if dy is None:
        with torch.no_grad():
            return layer(x) if mask is None else layer(x, mask)
    y = layer(x) if mask is None else layer(x, mask)
    y.backward(dy)
    return y


def count_step(layer, x, mask=None, train=True, fresh_grads=False) -> StepCount:
    """Warm-up step, then one counted step of ``layer`` in the given mode. ``fresh_grads``: the gradients of the
    warm-up are dropped first, so autograd stores the counted step's instead of accumulating them (no ``add``
    kernels: the count is the step's forward + backward alone)."""
    layer.train(train)
    dy = torch.randn(x.shape) if train else None
    _step(layer, x, mask, dy)
    if fresh_grads:
        for t in (x, *layer.parameters()):
            t.grad = None
    with StepCount() as c:
        _step(layer, x, mask, dy)
    return c


SHAPE = (8, 16, 4, 4)
C = SHAPE[1]


def _mask():
    g = torch.Generator().manual_seed(0)
    return torch.rand((SHAPE[0],) + SHAPE[2:], generator=g) > 0.25


# (label, factory, masked, train kernels ceiling, eval kernels ceiling) on the GPU route without triton:
# plain calls on native (cuDNN on a GPU) with the pure-ATen guard, the variants on the composite fallback.
# Ceilings = the counts measured when this table was written; the torch baseline is 6 in training (forward,
# nbt += 1, backward, 3 grad accumulations) and 1 in eval.
TABLE = [
    ("plain", lambda: BatchNorm(C), False, 12, 1),
    ("momentum=None", lambda: BatchNorm(C, momentum=None), False, 16, 1),
    ("fused relu", lambda: BatchNorm(C, activation="relu"), False, 14, 2),
    ("mask", lambda: BatchNorm(C), True, 72, 1),
    ("ghost", lambda: GhostBatchNorm(C, virtual_batch_size=2), False, 116, 1),
    ("masked ghost", lambda: GhostBatchNorm(C, virtual_batch_size=2), True, 122, 1),
    ("renorm", lambda: BatchRenorm(C), False, 84, 1),
    ("renorm, warm-up", lambda: BatchRenorm(C, warmup_steps=100), False, 97, 1),
    ("memory='save'", lambda: BatchNorm(C, activation="leaky_relu", memory="save"), False, 96, 2),
]
IDS = [r[0] for r in TABLE]


@pytest.fixture(autouse=True, scope="module")
def _interpreter(triton_interpreter):
    """Triton's interpreter for every test here (tests/conftest.py restores the variable afterwards)."""


@pytest.fixture
def gpu_route(monkeypatch):
    """Every tensor is a CUDA tensor to the package; triton is not available (its route is tested below): the
    variants take composite, native's guard its pure-ATen form."""
    monkeypatch.setattr(dispatch, "device_type", lambda x: "cuda")
    monkeypatch.setattr(dispatch, "_triton_for", lambda x, s: None)
    monkeypatch.setattr(native, "_triton_guard", lambda rm, rv: None)


def _input():
    return torch.randn(SHAPE, requires_grad=True)


# --------------------------------------------------------------------------- the counter itself


def test_the_counter_sees_torch_bn_kernels_and_no_sync():
    c = count_step(torch.nn.BatchNorm2d(C), _input())
    assert c.syncs == [] and c.host_data == []
    assert "native_batch_norm" in c.kernels and "native_batch_norm_backward" in c.kernels
    assert count_step(torch.nn.BatchNorm2d(C), _input(), train=False).kernels == ["native_batch_norm"]


def test_the_counter_sees_the_host_reads_of_the_cpu_route():
    """Positive control: off the GPU route the layers read values on purpose (free on the CPU), and it is seen."""
    cumulative = count_step(BatchNorm(C, momentum=None), _input())  # ATen's CPU call takes 1/(n+1) as a float
    assert "_local_scalar_dense" in cumulative.syncs
    masked = count_step(GhostBatchNorm(C, virtual_batch_size=2), _input(), _mask())  # the per-group count check
    assert "tolist" in masked.syncs
    with StepCount() as made:
        torch.tensor([1.0, 2.0])
    assert made.host_data == ["lift_fresh"]


# --------------------------------------------------------------------------- no host sync on the GPU route


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("label,make,masked,train_ceiling,eval_ceiling", TABLE, ids=IDS)
def test_gpu_route_step_has_no_host_sync_and_a_bounded_kernel_count(gpu_route, label, make, masked, train_ceiling,
                                                                    eval_ceiling, train):
    layer = make()
    c = count_step(layer, _input(), _mask() if masked else None, train)
    assert c.syncs == [], f"{label}: host reads {c.syncs}"
    assert c.host_data == [], f"{label}: tensors from host data {c.host_data}"
    ceiling = train_ceiling if train else eval_ceiling
    assert c.launches <= ceiling, f"{label}: {c.launches} kernels > {ceiling}: {c.kernels}"
    if train:
        assert int(layer.num_batches_tracked) == 2


def test_without_triton_plain_bn_costs_torch_plus_the_aten_guard(gpu_route):
    """Native plain BN with the pure-ATen guard (the fallback without triton): torch's kernels plus six."""
    ours, theirs = count_step(BatchNorm(C), _input()), count_step(torch.nn.BatchNorm2d(C), _input())
    assert len(ours.kernels) <= len(theirs.kernels) + 6, (ours.kernels, theirs.kernels)
    guard = list(ours.kernels)
    for k in theirs.kernels:
        guard.remove(k)  # every kernel of torch's step is in ours
    assert sorted(guard) == sorted(["_foreach_mul", "mul", "eq", "all", "where", "where"])
    evals = count_step(BatchNorm(C), _input(), train=False), count_step(torch.nn.BatchNorm2d(C), _input(), train=False)
    assert evals[0].kernels == evals[1].kernels


def test_memory_save_eval_takes_the_one_launch_eval_path(gpu_route):
    layer = BatchNorm(C, memory="save").eval()  # identity activation: exactly plain eval
    x = _input()
    assert dispatch.chosen(layer, x) == "native"
    assert count_step(layer, x, train=False).kernels == ["native_batch_norm"]


def test_renorm_limits_are_not_computed_in_eval(gpu_route, monkeypatch):
    layer = BatchRenorm(C, warmup_steps=10)
    layer(_input())
    calls = []
    monkeypatch.setattr(BatchRenorm, "current_limits", lambda self: calls.append(1) or (3.0, 5.0))
    layer.eval()
    with torch.no_grad():
        layer(_input())
    assert calls == []
    layer.train()
    layer(_input())
    assert calls == [1]


def test_standardizer_forward_has_no_host_sync(gpu_route):
    layer = Standardizer(C).fit(torch.randn(64, C, 4, 4))
    x = torch.randn(SHAPE)
    layer(x)
    with StepCount() as c:
        y = layer(x)
    assert c.syncs == [] and c.host_data == [] and c.launches <= 3, c.kernels
    torch.testing.assert_close(y, (x - layer.mean.float().view(1, -1, 1, 1)) / layer.scale.float().view(1, -1, 1, 1))
    layer.partial_fit(torch.randn(8, C, 4, 4) + 5)  # new statistics: the cached constants follow
    torch.testing.assert_close(layer(x), (x - layer.mean.float().view(1, -1, 1, 1))
                               / layer.scale.float().view(1, -1, 1, 1))
    layer.reset()
    with pytest.raises(ValueError, match="not fitted yet"):
        layer(x)


# --------------------------------------------------------------------------- the device-side guard


def _bad_input():
    x = torch.randn(SHAPE)
    x[0, 3, 0, 0] = float("nan")
    return x


@pytest.mark.parametrize("label,make,masked,train_ceiling,eval_ceiling", TABLE, ids=IDS)
def test_gpu_route_refused_batch_is_selected_on_the_device_and_reported_later(gpu_route, label, make, masked,
                                                                             train_ceiling, eval_ceiling):
    layer = make()
    mask = _mask() if masked else None
    if masked:
        mask[0] = True  # the NaN position counts
    _step(layer, torch.randn(SHAPE), mask, torch.randn(SHAPE))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning (it would need a host read) at the step
        with StepCount() as c:
            layer(_bad_input(), mask) if masked else layer(_bad_input())
    assert c.syncs == []
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(layer._buffers[k], before[k]), f"{label}: {k} changed by a refused batch"
    with pytest.warns(RuntimeWarning, match=r"1 training batch\(es\) since the last report had statistics that are "
                                             "not finite"):
        assert layer.refused_batches == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer.refused_batches == 1  # reported once


@pytest.mark.parametrize("point", ["eval", "train", "state_dict", "repr"])
def test_refused_batches_are_reported_at_the_next_point_that_reads_them(gpu_route, point):
    layer = BatchNorm(C)
    layer(_bad_input())
    layer(torch.randn(SHAPE))
    layer(_bad_input())
    report = {"eval": layer.eval, "train": layer.train, "state_dict": layer.state_dict, "repr": lambda: repr(layer)}
    with pytest.warns(RuntimeWarning, match=r"BatchNorm: 2 training batch\(es\)"):
        report[point]()
    assert layer.refused_batches == 2 and int(layer.num_batches_tracked) == 1


def test_refused_flags_fold_into_one_device_count(gpu_route, monkeypatch):
    monkeypatch.setattr(base_module, "_FOLD", 3)
    layer = BatchNorm(C)
    for i in range(7):
        layer(_bad_input() if i % 2 == 0 else torch.randn(SHAPE))  # refused: steps 0, 2, 4, 6
    assert len(layer.__dict__["_refused_flags"]) == 1  # 6 folded, 1 pending
    assert layer.__dict__["_refused_device"].dim() == 0
    with pytest.warns(RuntimeWarning, match=r"4 training batch\(es\)"):
        assert layer.refused_batches == 4


def test_cpu_refusals_still_warn_at_once_and_are_counted():
    layer = BatchNorm(C)
    with pytest.warns(RuntimeWarning, match="batch statistics are not finite"):
        layer(_bad_input())
    with pytest.warns(RuntimeWarning, match="batch statistics are not finite"):
        layer(_bad_input())  # the fast path (a plan exists now)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already warned: reading the count adds nothing
        assert layer.refused_batches == 2


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_native_device_guard_matches_torch_bn(gpu_route, momentum):
    ours, ref = BatchNorm(C, momentum=momentum), torch.nn.BatchNorm2d(C, momentum=momentum)
    for i in range(4):
        x = torch.randn(SHAPE) * (i + 1) + i
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        dy = torch.randn(SHAPE)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


# --------------------------------------------------------------------------- the automatic rule on a GPU


class _StubTriton:
    """Stands in for the triton backend in routing tests only (the real one is tested in tests/test_triton.py)."""

    name = "triton"

    def supports(self, x, s=None):
        return True


@pytest.mark.parametrize("label,make,masked,expected", [
    ("plain", lambda: BatchNorm(C), False, "native"),
    ("fused relu", lambda: BatchNorm(C, activation="relu"), False, "triton"),
    ("mask", lambda: BatchNorm(C), True, "triton"),
    ("ghost", lambda: GhostBatchNorm(C, virtual_batch_size=2), False, "triton"),
    ("renorm", lambda: BatchRenorm(C), False, "triton"),
    ("memory='save'", lambda: BatchNorm(C, activation="leaky_relu", memory="save"), False, "triton"),
    ("eval, memory='save'", lambda: BatchNorm(C, memory="save").eval(), False, "native"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_on_a_gpu_plain_is_native_and_every_variant_triton(monkeypatch, label, make, masked, expected):
    monkeypatch.setattr(dispatch, "device_type", lambda x: "cuda")
    monkeypatch.setattr(dispatch, "TRITON", _StubTriton())
    assert dispatch.chosen(make(), _input(), _mask() if masked else None) == expected


def test_a_measured_gpu_choice_sends_plain_bn_to_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "device_type", lambda x: "cuda")
    monkeypatch.setattr(dispatch, "TRITON", _StubTriton())
    monkeypatch.setattr(dispatch, "GPU_PLAIN", {})
    x = _input()
    dispatch.set_gpu_plain(dispatch.device_name(x), "triton")
    assert dispatch.chosen(BatchNorm(C), x) == "triton"
    with pytest.raises(ValueError, match="expected backend 'native' or 'triton', got 'cudnn'"):
        dispatch.set_gpu_plain("NVIDIA H100", "cudnn")


def test_without_triton_the_variants_fall_back_to_composite(monkeypatch):
    monkeypatch.setattr(dispatch, "device_type", lambda x: "cuda")
    monkeypatch.setattr(dispatch, "_triton_for", lambda x, s: None)
    assert dispatch.chosen(BatchNorm(C, activation="relu"), _input()) == "native"  # relu as a second op
    assert dispatch.chosen(GhostBatchNorm(C, virtual_batch_size=2), _input()) == "composite"


# --------------------------------------------------------------------------- the triton route (interpreter)


@pytest.fixture
def triton_route(monkeypatch):
    """The GPU route with triton serving: its kernels run in Triton's CPU interpreter (tiny shapes only)."""
    import importlib

    if not _INTERPRETABLE:
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1: run with the variable set")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from batchnorm.kernels.triton import kernels as tk

    if not _TB.interpreting():  # imported before without the interpreter: rebuild the kernels with it
        importlib.reload(tk)
    monkeypatch.setattr(dispatch, "device_type", lambda x: "cuda")


def _uncounted(fn):
    """``fn`` with every open counter paused: work that is no part of a step's kernels on a GPU."""
    def run(*args, **kwargs):
        paused = [c for c in StepCount.active if not c.paused]
        for c in paused:
            c.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            for c in paused:
                c.paused = False
    return run


@pytest.fixture
def two_ranks(monkeypatch):
    """SyncBatchNorm in a group of two processes, in this one: every all-gather returns this rank's message twice
    (a stand-in, not counted: collectives are no kernel launches of the step). The fault record's poll reads host
    memory (on a GPU: the pinned copy, after a CUDA event query), so it is not counted as a host read either."""
    import torch.distributed as dist

    def gather(out, inp, group=None, async_op=False):
        out.view(-1, inp.numel()).copy_(inp.reshape(1, -1))

    monkeypatch.setattr(sync_module, "_group_world", lambda group: 2)
    monkeypatch.setattr(dist, "all_gather_into_tensor", _uncounted(gather))
    monkeypatch.setattr(dist, "all_gather_single", _uncounted(gather), raising=False)
    monkeypatch.setattr(sync_module._SyncState, "poll", _uncounted(sync_module._SyncState.poll))


TINY = (4, 3, 2, 2)
# (label, factory, masked, training-step launches ceiling) with triton: plain BN on native (ATen's kernels, one
# triton launch for the guard), every variant on triton. A training step is counted as forward + backward without
# autograd's gradient accumulations (count_step(..., fresh_grads=True)), so torch.nn.BatchNorm2d's step is 3
# (forward, num_batches_tracked += 1, backward); eval is 1 launch in every row. SyncBatchNorm (two ranks, the
# two_ranks stand-in) is 3 + 3 launches around its two collectives (not counted).
TRITON_TABLE = [
    ("plain", lambda: BatchNorm(3), False, 3),
    ("momentum=None", lambda: BatchNorm(3, momentum=None), False, 3),
    ("fused relu", lambda: BatchNorm(3, activation="relu"), False, 6),
    ("mask", lambda: BatchNorm(3), True, 6),
    ("ghost", lambda: GhostBatchNorm(3, virtual_batch_size=2), False, 6),
    ("masked ghost", lambda: GhostBatchNorm(3, virtual_batch_size=2), True, 6),
    ("renorm", lambda: BatchRenorm(3), False, 6),
    ("renorm, warm-up", lambda: BatchRenorm(3, warmup_steps=10), False, 6),
    ("memory='save'", lambda: BatchNorm(3, activation="leaky_relu", memory="save"), False, 6),
    ("sync (2 ranks)", lambda: SyncBatchNorm(3), False, 8),
    ("masked sync (2 ranks)", lambda: SyncBatchNorm(3), True, 8),
    ("sync, memory='save'", lambda: SyncBatchNorm(3, activation="leaky_relu", memory="save"), False, 8),
]
TRITON_IDS = [r[0] for r in TRITON_TABLE]


def _tiny_mask():
    return torch.tensor([[[True, False], [True, True]]] * TINY[0])


@pytest.mark.parametrize("label,make,masked,ceiling", TRITON_TABLE, ids=TRITON_IDS)
def test_triton_route_step_has_no_host_sync_and_at_most_six_launches(triton_route, request, label, make, masked,
                                                                     ceiling):
    layer = make()
    if isinstance(layer, SyncBatchNorm):
        request.getfixturevalue("two_ranks")
    x = torch.randn(TINY, requires_grad=True)
    mask = _tiny_mask() if masked else None
    assert dispatch.chosen(layer, x, mask) == ("native" if label in ("plain", "momentum=None") else "triton")
    c = count_step(layer, x, mask, fresh_grads=True)
    assert c.syncs == [] and c.host_data == [], f"{label}: {c.syncs} {c.host_data}"
    assert c.triton >= 1 and int(layer.num_batches_tracked) == 2
    assert c.launches <= ceiling, f"{label}: {c.launches} launches > {ceiling}: {c.kernels} + {c.triton} triton"
    e = count_step(layer, x, mask, train=False)
    assert e.syncs == [] and e.host_data == [] and e.launches == 1, (label, e.kernels, e.triton)


def test_with_triton_plain_bn_launches_exactly_what_torch_bn_launches(triton_route):
    """ATen's own kernels (cuDNN on a GPU) without running buffers, and one triton launch (guard, running update,
    num_batches_tracked) where torch launches ``num_batches_tracked += 1``: the same count as torch's step."""
    x = torch.randn(TINY, requires_grad=True)
    ours = count_step(BatchNorm(3), x, fresh_grads=True)
    theirs = count_step(torch.nn.BatchNorm2d(3), x, fresh_grads=True)
    assert ours.triton == 1 and ours.launches == theirs.launches, (ours.kernels, theirs.kernels)
    rest = list(theirs.kernels)
    for k in ours.kernels:
        rest.remove(k)  # every ATen kernel of ours is one of torch's step
    assert rest == ["add_"]  # torch's num_batches_tracked += 1, done by the triton launch here


@pytest.mark.parametrize("label,make,masked,ceiling",
                         [r for r in TRITON_TABLE if r[0] in ("plain", "momentum=None", "renorm, warm-up")],
                         ids=["plain", "momentum=None", "renorm, warm-up"])
def test_triton_route_refused_batch_is_selected_on_the_device(triton_route, label, make, masked, ceiling):
    layer = make()
    _step(layer, torch.randn(TINY), None, torch.randn(TINY))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(TINY)
    bad[1, 2, 0, 1] = float("inf")
    with warnings.catch_warnings():
        # no refusal warning (it would need a host read) at the step (NumPy's own warnings inside the interpreter's
        # emulation of the kernel, inf − inf, are not the layer's)
        warnings.filterwarnings("ignore", message="invalid value encountered")  # NumPy, in the interpreter
        warnings.filterwarnings("error", message=".*(not finite|training batch)")
        with StepCount() as c:
            layer(bad)
    assert c.syncs == [] and c.host_data == []
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(layer._buffers[k], before[k]), f"{label}: {k} changed by a refused batch"
    with pytest.warns(RuntimeWarning, match=r"1 training batch\(es\) since the last report"):
        assert layer.refused_batches == 1


def test_triton_route_sync_with_equal_ranks_is_batchnorm_on_the_doubled_batch(triton_route, two_ranks):
    """Two ranks sending the same message: the merged batch is this one twice, so output, gradients and the running
    mean are BatchNorm's, and the running variance is unbiased over 2n values (the merge happened on the device)."""
    g = torch.Generator().manual_seed(5)
    sync, plain = SyncBatchNorm(3, momentum=0.5), BatchNorm(3, momentum=0.5, backend="composite")
    with torch.no_grad():
        for layer in (sync, plain):
            layer.weight.copy_(torch.tensor([0.5, -1.5, 2.0]))
            layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    for _ in range(2):
        x = torch.randn(TINY, generator=g) * 2 + 1
        dy = torch.randn(TINY, generator=g)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        before = _TB.launch_count()
        ya = sync(xa)
        ya.backward(dy)
        assert _TB.launch_count() - before == 6
        yb = plain(xb)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(sync.weight.grad, plain.weight.grad)
    torch.testing.assert_close(sync.bias.grad, plain.bias.grad)
    torch.testing.assert_close(sync.running_mean, plain.running_mean)
    n = TINY[0] * TINY[2] * TINY[3]
    ref = torch.ones(3)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        x = torch.randn(TINY, generator=g) * 2 + 1
        torch.randn(TINY, generator=g)
        var = x.transpose(0, 1).reshape(3, -1).var(1, unbiased=False)
        ref = 0.5 * ref + 0.5 * var * (2 * n) / (2 * n - 1)
    torch.testing.assert_close(sync.running_var, ref)
    assert int(sync.num_batches_tracked) == 2


def test_triton_route_sync_out_of_step_is_found_on_the_device_and_raised_at_the_next_call(triton_route, two_ranks,
                                                                                        monkeypatch):
    """The other rank's forward message carries another step: NaN statistics (refused by the guard, no host read at
    the step), the fault record kept, and ProcessGroupMismatchError at the layer's next call."""
    import torch.distributed as dist

    from batchnorm.layers.sync import ProcessGroupMismatchError

    layer = SyncBatchNorm(3)
    x = torch.randn(TINY, requires_grad=True)
    layer(x).sum().backward()  # a good step (and the first-call agreement check)
    real = dist.all_gather_into_tensor

    def skewed(out, inp, group=None, async_op=False):
        real(out, inp, group)
        rows = out.view(2, -1)
        if rows[0, -6] == 1:  # a forward message: the other rank is one step ahead
            rows[1, -4] += 1

    monkeypatch.setattr(dist, "all_gather_into_tensor", _uncounted(skewed))
    monkeypatch.setattr(dist, "all_gather_single", _uncounted(skewed), raising=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with StepCount() as c:
        y = layer(torch.randn(TINY))
    assert c.syncs == [] and c.host_data == [] and c.triton == 3
    assert torch.isnan(y).all()
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(layer._buffers[k], before[k]), k
    with pytest.raises(ProcessGroupMismatchError, match=r"out of step.*rank 0: layer #\d+, step 2 \(forward "
                                                        r"statistics\); rank 1: layer #\d+, step 3 .*set to NaN on "
                                                        r"the device"):
        layer(torch.randn(TINY))
    with pytest.warns(RuntimeWarning, match=r"1 training batch\(es\)"):
        assert layer.refused_batches == 1
