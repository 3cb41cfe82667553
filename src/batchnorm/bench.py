"""batchnorm bench: time our batch norm against PyTorch's, side by side, on this machine.

Every row times its contenders alternately in one process: a warm-up first, then a number of
rounds in which the contenders take turns (the order rotates every round) and each turn times a
few calls. A row reports the median seconds per call of each contender and the ratio
ours / torch (lower is better), and which backend the "auto" dispatch chose for our layer.

Sections of the default run:

  sweep      a training step (forward + backward) of BatchNorm against torch.nn.BatchNorm1d/2d/3d
             on 30+ input shapes from a few hundred bytes to 200 MB: ranks 2 to 5, contiguous and
             channels-last layouts, and feature-last inputs (axis=-1; torch gets x.transpose(1, -1),
             what a user would write); target: every row at most 1.05x torch, and at most 0.5x on
             the (64, 64, 56, 56) and (32, 256, 28, 28) steps;
  extras     BN + ReLU fused against BatchNorm2d then relu (target 0.35x), an eval-mode forward,
             forward memory traffic against copy bandwidth, bytes saved for backward with
             memory="save";
  fixed      the fixed cost per call: a training step of an (8, 16) batch for each backend
             (numba, composite, native, auto) against torch.nn.BatchNorm1d;
  models     three whole models, each one full training step (forward, cross-entropy loss,
             backward, SGD step) with torch's BN against the same model converted with
             batchnorm.convert: a CIFAR-style ResNet-18 (batch 64, 32x32), an MLP with BatchNorm1d
             on (N, C), the lab's 1-D CNN; targets: at most 1.0x, the ResNet-18 at most 0.9x;
  first call cold and warm first training step in a fresh process (cold: empty numba cache),
             and how long until the numba kernels take over from the native backend.

batchnorm bench --calibrate re-measures the crossover points of the dispatch table
(batchnorm.kernels.dispatch) on this machine and prints them in the table's own format.

Timings on a shared or busy machine are noisy: the JSON output keeps every sample.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kernels import calibrate as _cal
from .layers import BatchNorm

Fn = Callable[[], object]

# --------------------------------------------------------------------------------------------------
# timing


def _time(fn: Fn, number: int) -> float:
    t = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t) / number


def side_by_side(fns: dict[str, Fn], repeats: int, warmup: int = 2, budget: float = 0.005,
                 min_time: float = 1.0) -> dict[str, list[float]]:
    """Time the contenders alternately; return ``{name: [seconds per call, one per round]}``.

    Rule: ``warmup`` untimed calls of each contender, then rounds; in round ``r`` the contenders take
    turns starting with the ``r``-th (so none always runs first after another), and each turn times
    ``number`` calls, chosen once so a turn of the fastest contender lasts about ``budget`` seconds
    (1 to 50 calls). There are at least ``repeats`` rounds, more for cheap rows (up to 200, until the
    rounds take about ``min_time`` seconds). Report medians of the lists.

    Why short turns and many rounds: on a shared machine a process is descheduled now and then
    for tens or hundreds of milliseconds (worse with OpenMP teams waiting at a barrier for a
    descheduled thread). A long turn almost always contains such a stall, a short one mostly does
    not, so the median over many short turns measures the call, not the neighbours.

    Shape: any callables. Example::

        >>> s = side_by_side({"a": lambda: None, "b": lambda: None}, repeats=3, min_time=0)
        >>> sorted(s), len(s["a"])
        (['a', 'b'], 3)

    Method: the alternating, warmed-up, median-of-rounds protocol of ``timeit`` and pyperf.
    """
    names = list(fns)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    once = min(_time(fn, 1) for fn in fns.values())
    number = max(1, min(50, int(budget / max(once, 1e-6))))
    per_round = sum(_time(fn, 1) for fn in fns.values()) * number if min_time > 0 else 0.0
    rounds = max(repeats, min(200, int(min_time / per_round))) if per_round > 0 else repeats
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(_time(fns[name], number))
    return samples


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


# --------------------------------------------------------------------------------------------------
# which backend our layer uses


def chosen_backend(layer: torch.nn.Module, x: torch.Tensor) -> str:
    """Name of the backend ``layer(x)`` would use now (``dispatch.chosen``), or ``"?"`` if unknown."""
    from .kernels import dispatch

    fn = getattr(dispatch, "chosen", None)
    if fn is None:  # older dispatch without the query
        return "?"
    try:
        return str(fn(layer, x))
    except Exception as exc:  # a bench must not die on a reporting helper  # noqa: BLE001
        return f"? ({type(exc).__name__})"


def model_backends(model: torch.nn.Module, x: torch.Tensor) -> str:
    """Backends the BN layers of ``model`` use for input ``x``, e.g. ``"native x12, numba x8"``.

    One forward pass (no gradient) with hooks that ask :func:`chosen_backend` for every layer of ours.
    """
    counts: dict[str, int] = {}
    hooks = []

    def hook(mod, args):
        name = chosen_backend(mod, args[0])
        counts[name] = counts.get(name, 0) + 1

    for m in model.modules():
        if isinstance(m, BatchNorm):
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():  # on a copy: a training forward would update the running statistics
            copy.deepcopy(model)(x)
    finally:
        for h in hooks:
            h.remove()
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "-"


# --------------------------------------------------------------------------------------------------
# the shape sweep


@dataclass(frozen=True)
class Case:
    """One sweep row: a training step of ``BatchNorm`` on ``shape``.

    ``layout``: ``"contiguous"`` (features on axis 1), ``"cl"`` (channels-last memory format, rank 4
    or 5, features on axis 1) or ``"last"`` (features on the last axis, ``axis=-1``).
    """

    shape: tuple[int, ...]
    layout: str = "contiguous"
    activation: str | None = None

    @property
    def name(self) -> str:
        tag = {"contiguous": "", "cl": " cl", "last": " axis=-1"}[self.layout]
        act = f" +{self.activation}" if self.activation else ""
        return f"train {self.shape}{tag}{act}"

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return 4 * n

    @property
    def axis(self) -> int:
        return -1 if self.layout == "last" else 1


_CL, _LAST = "cl", "last"

#: The sweep: 36 shapes, 512 B to 201 MB (float32), ranks 2-5, both memory layouts, axis=-1 rows.
SWEEP: tuple[Case, ...] = (
    # rank 2, dense (N, C)
    Case((8, 16)), Case((32, 64)), Case((128, 256)), Case((256, 1024)), Case((200, 3000)),
    Case((512, 2048)), Case((4096, 1024)), Case((8192, 4096)),
    # rank 3, (N, C, L) and (N, L, C) with axis=-1
    Case((4, 8, 16)), Case((128, 64, 40)), Case((64, 128, 256)), Case((128, 256, 512)),
    Case((8, 16, 32), _LAST), Case((8, 300, 128), _LAST), Case((64, 196, 384), _LAST), Case((32, 512, 768), _LAST),
    # rank 4, NCHW
    Case((2, 4, 4, 4)), Case((8, 16, 8, 8)), Case((32, 64, 8, 8)), Case((32, 64, 16, 16)), Case((16, 128, 28, 28)),
    Case((128, 512, 7, 7)), Case((128, 64, 32, 32)), Case((32, 256, 28, 28)), Case((64, 64, 56, 56)),
    Case((48, 64, 128, 128)),
    # rank 4, channels-last, and (N, H, W, C) with axis=-1
    Case((8, 16, 8, 8), _CL), Case((32, 64, 16, 16), _CL), Case((16, 128, 28, 28), _CL), Case((128, 512, 7, 7), _CL),
    Case((64, 64, 56, 56), _CL), Case((16, 28, 28, 128), _LAST),
    # rank 5, NCDHW and channels-last-3d
    Case((2, 4, 4, 4, 4)), Case((8, 32, 8, 16, 16)), Case((4, 64, 16, 32, 32)), Case((8, 32, 8, 16, 16), _CL),
)

#: Targets (ratio ours / torch, lower is better). Rows not listed: 1.05.
TARGETS: dict[str, float] = {
    "train (64, 64, 56, 56)": 0.5,
    "train (64, 64, 56, 56) cl": 0.5,
    "train (32, 256, 28, 28)": 0.5,
    "train (64, 64, 56, 56) +relu": 0.35,
    "eval forward (64, 64, 56, 56)": 0.7,
    "model ResNet-18 (CIFAR)": 0.9,
    "model MLP": 1.0,
    "model CNN1d": 1.0,
}
SWEEP_TARGET = 1.05
QUICK_MAX_BYTES = 16 * 2**20

_TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def _step(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, pre=None, post=None) -> Fn:
    gg = pre(g) if pre else g

    def run() -> None:
        x.grad = None
        y = layer(pre(x) if pre else x)
        if post:
            y = post(y)
        y.backward(gg)

    return run


@dataclass
class Row:
    """Contenders of one row (``"ours"`` and ``"torch"``, or several) and our layer with its input."""

    fns: dict[str, Fn]
    layer: torch.nn.Module | None = None
    x: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def backend(self) -> str:
        if self.layer is None or self.x is None:
            return "-"
        if isinstance(self.layer, BatchNorm):
            return chosen_backend(self.layer, self.x)
        return model_backends(self.layer, self.x)


def train_row(case: Case, backend: str | None = None) -> Row:
    """A training step (forward + backward with a fixed upstream gradient) of ours and of torch's BN on ``case``."""
    shape = case.shape
    if len(shape) not in _TORCH_BN:
        raise SystemExit(f"batchnorm bench: torch.nn.BatchNorm*d takes 2-D to 5-D input, got shape {shape}.")
    if case.layout == _CL and len(shape) not in (4, 5):
        raise SystemExit(f"batchnorm bench: channels-last needs a 4-D or 5-D shape, got {shape}.")
    x = torch.randn(shape)
    if case.layout == _CL:
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    x.requires_grad_(True)
    g = torch.randn_like(x)
    ours = BatchNorm(shape[case.axis], axis=case.axis, activation=case.activation, backend=backend)
    ref = _TORCH_BN[len(shape)](shape[case.axis])
    pre = (lambda t: t.transpose(1, -1)) if case.layout == _LAST else None
    post = torch.relu if case.activation == "relu" else None
    return Row({"ours": _step(ours, x, g), "torch": _step(ref, x, g, pre=pre, post=post)}, ours, x)


def eval_row(shape: tuple[int, ...]) -> Row:
    """Eval-mode forward without autograd, ours against ``BatchNorm2d``, random running statistics."""
    x = torch.randn(shape)
    ours, ref = BatchNorm(shape[1]).eval(), torch.nn.BatchNorm2d(shape[1]).eval()
    with torch.no_grad():
        for m in (ours, ref):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)

    def run(m):
        def f():
            with torch.no_grad():
                m(x)

        return f

    return Row({"ours": run(ours), "torch": run(ref)}, ours, x)


def fixed_cost_row(shape: tuple[int, ...] = (8, 16)) -> Row:
    """Training step of a tiny batch: each backend forced, and ``auto``, against ``torch.nn.BatchNorm1d``."""
    from .kernels import dispatch

    x = torch.randn(shape, requires_grad=True)
    g = torch.randn_like(x)
    fns: dict[str, Fn] = {"torch": _step(torch.nn.BatchNorm1d(shape[1]), x, g)}
    layers = {name: BatchNorm(shape[1], backend=name) for name in [*dispatch.available(), "auto"]}
    for name, layer in layers.items():
        fns[name] = _step(layer, x, g)
    return Row(fns, layers["auto"], x)


# --------------------------------------------------------------------------------------------------
# whole models


def _resnet18(small: bool):
    try:
        from .zoo import resnet18_cifar
    except ImportError as exc:
        raise _Skip(f"batchnorm.zoo.resnet18_cifar is not available ({exc})") from None
    model = resnet18_cifar(num_classes=10, width=8 if small else 64)
    n = 4 if small else 64
    return model, torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))


def _mlp(small: bool):
    from .lab.models import MLP

    width, n = (32, 16) if small else (1024, 256)
    model = MLP(784, [width] * 3, 10, norm="torch-bn")
    return model, torch.randn(n, 784), torch.randint(0, 10, (n,))


def _cnn1d(small: bool):
    from .lab.models import CNN1d

    width, n = (8, 8) if small else (64, 128)
    model = CNN1d(1, 10, width=width, depth=3, norm="torch-bn")
    return model, torch.randn(n, 1, 40), torch.randint(0, 10, (n,))


#: name -> (builder(small) -> (model with torch's BN, input, labels), description)
MODELS: dict[str, tuple[Callable[[bool], tuple], str]] = {
    "model ResNet-18 (CIFAR)": (_resnet18, "batchnorm.zoo.resnet18_cifar, batch 64 of 3x32x32"),
    "model MLP": (_mlp, "784-1024-1024-1024-10, BatchNorm1d on (256, 1024)"),
    "model CNN1d": (_cnn1d, "lab CNN1d width 64 depth 3, batch 128 of 1x40"),
}


class _Skip(Exception):
    """A row that cannot be built here (reason in the message)."""


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Fn:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def model_row(name: str, small: bool = False) -> Row:
    """One training step (forward, loss, backward, SGD step) of a model with torch's BN and of its converted copy."""
    from .tools import convert

    torch.manual_seed(0)
    model, x, y = MODELS[name][0](small)
    ours = convert(model)
    return Row({"ours": _train_step(ours, x, y), "torch": _train_step(model, x, y)}, ours, x)


# --------------------------------------------------------------------------------------------------
# memory traffic and saved bytes


def _traffic(shape, repeats):
    x = torch.randn(shape)
    y = torch.empty_like(x)
    bn = BatchNorm(shape[1])

    def fwd():
        with torch.no_grad():
            bn(x)

    s = side_by_side({"ours": fwd, "copy": lambda: y.copy_(x)}, repeats)
    nbytes = x.numel() * x.element_size()
    t_ours, t_copy = statistics.median(s["ours"]), statistics.median(s["copy"])
    achieved, copy_bw = 3 * nbytes / t_ours, 2 * nbytes / t_copy
    return {"row": "forward traffic vs copy bandwidth", "shape": list(shape), "ours_GBps": achieved / 1e9,
            "copy_GBps": copy_bw / 1e9, "fraction": achieved / copy_bw, "backend": chosen_backend(bn, x),
            "samples_s": s}


def saved_bytes(module: torch.nn.Module, x: torch.Tensor, post=None, exclude_state: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward of ``module``.

    ``exclude_state=True`` leaves out storages of the module's own parameters and buffers (they are
    alive whether or not a backward is pending), so only what the pending backward adds is counted.

    Shape: any input ``module`` accepts. Example: ``saved_bytes(torch.nn.BatchNorm1d(4), torch.randn(8, 4,
    requires_grad=True), exclude_state=True)`` counts x (128 B), the batch mean and invstd (16 B each).
    Method: ``torch.autograd.graph.saved_tensors_hooks`` (PyTorch's "Hooks for saved tensors" tutorial).
    """
    seen: dict[tuple[int, int], int] = {}
    state = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]} if exclude_state else set()

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            st = t.untyped_storage()
            if st.data_ptr() not in state:
                seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
        if post:
            y = post(y)
    del y
    return sum(seen.values())


def _saved_row(shape):
    x = torch.randn(shape, requires_grad=True)
    ours = BatchNorm(shape[1], activation="leaky_relu", memory="save")
    ref = torch.nn.BatchNorm2d(shape[1])
    post = lambda t: F.leaky_relu(t, 0.01)  # noqa: E731
    a, b = saved_bytes(ours, x), saved_bytes(ref, x, post=post)
    a_act, b_act = saved_bytes(ours, x, exclude_state=True), saved_bytes(ref, x, post=post, exclude_state=True)
    return {"row": "saved-for-backward bytes, BN+leaky_relu memory='save'", "shape": list(shape),
            "ours_bytes": a_act, "torch_bytes": b_act, "ratio": a_act / b_act,
            "ours_bytes_with_module_state": a, "torch_bytes_with_module_state": b, "ratio_with_module_state": a / b}


# --------------------------------------------------------------------------------------------------
# first call in a fresh process

_FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, batchnorm
from batchnorm.kernels import dispatch
t1 = time.perf_counter()
shape = tuple(int(v) for v in sys.argv[1].split(","))
# torch's own first training step pays torch's lazy imports (autograd's first backward with an explicit
# gradient imports sympy, ~1 s): time it first, so the next line measures what batchnorm adds
ref = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[len(shape)]
xr = torch.randn(*shape, requires_grad=True)
ref(shape[1])(xr).backward(torch.randn(*shape))
t_ref = time.perf_counter() - t1
t1 = time.perf_counter()
bn = batchnorm.BatchNorm(shape[1])
x = torch.randn(*shape, requires_grad=True)
g = torch.randn(*shape)  # a dense upstream gradient, as from the next layer of a network
first_backend = dispatch.chosen(bn, x) if hasattr(dispatch, "chosen") else "?"
bn(x).backward(g)
t2 = time.perf_counter()
bn(x).backward(g)
t3 = time.perf_counter()
takeover, status = None, getattr(dispatch, "warm_up_status", lambda: "?")()
deadline = t3 + float(sys.argv[2])
while hasattr(dispatch, "warm_up_status") and time.perf_counter() < deadline:
    status = dispatch.warm_up_status()
    if status not in ("cold", "warming"):
        break
    bn(x).backward(g)  # keep serving calls, as a training loop would
    time.sleep(0.02)
if status == "ready":
    takeover = time.perf_counter() - t1
t4 = time.perf_counter()
bn(x).backward(g)
t5 = time.perf_counter()
bn(x).sum().backward()  # a zero-stride upstream gradient (loss = y.sum()): its own kernel signature
t6 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0 - t_ref, "torch_first_call_s": t_ref, "first_call_s": t2 - t1, "second_call_s": t3 - t2,
                  "first_backend": first_backend, "numba_takeover_s": takeover, "status": status,
                  "backend_after": dispatch.chosen(bn, x) if hasattr(dispatch, "chosen") else "?",
                  "call_after_takeover_s": t5 - t4, "sum_backward_after_takeover_s": t6 - t5}))
"""

#: A shape on which ``auto`` prefers numba once it is compiled (so the takeover is observable).
FIRST_CALL_SHAPE = (64, 64, 28, 28)


def first_call_times(shape: tuple[int, ...] = FIRST_CALL_SHAPE, wait_s: float = 120.0) -> dict:
    """Cold (empty numba cache) and warm (cache filled by the cold run) first training step, each in a fresh process.

    Also reports the backend that served the first call, the seconds after import until the numba
    warm-up is ready (``dispatch.warm_up_status()``, ``None`` if not within ``wait_s``; calls keep
    running meanwhile, as in a training loop), and the backend and time of a call after that.
    """
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            args = [sys.executable, "-c", _FIRST_CALL, ",".join(map(str, shape)), str(wait_s)]
            try:
                res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=wait_s + 300)
            except subprocess.TimeoutExpired:
                out[label] = {"error": f"timed out after {wait_s + 300:.0f} s"}
                continue
            if res.returncode != 0:
                out[label] = {"error": res.stderr[-2000:]}
            else:
                out[label] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------------------------------
# calibration of the dispatch table


#: Size ladder of the calibration: bytes of x, powers of two from 4 KB to 64 MB.
CALIBRATION_BYTES = tuple(1 << k for k in range(12, 27))


# one copy of the crossover rule and the ladder inputs: batchnorm.kernels.calibrate (the warm-up measures with them)
calibration_shape = _cal.calibration_shape
_calibration_fns = _cal.calibration_fns
crossover = _cal.crossover


def _bytes_literal(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} << 20"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} << 10"
    return str(n)


def calibrate(repeats: int = 7, out: str | None = None, sizes: tuple[int, ...] = CALIBRATION_BYTES,
              store: bool = False) -> dict:
    """Re-measure the crossover points of ``dispatch.CROSSOVER_BYTES`` and print a replacement for that dict.

    Rule: for each ``(mode, layout)`` key of the table, time forced ``backend="native"`` against
    ``backend="numba"`` side by side on the ladder :data:`CALIBRATION_BYTES` (inputs from
    :func:`calibration_shape`; mode ``"train"`` = forward + backward, ``"eval"`` = forward without
    autograd), and take :func:`crossover` of the medians. Returns ``{"table": {key: bytes}, "ladder": [...]}``.
    ``store=True`` (the command line) also keeps the table beside numba's cache for this machine and thread
    counts, so later processes adopt it (:mod:`batchnorm.kernels.calibrate`).

    Shape: not applicable. Example: ``batchnorm bench --calibrate --out calibration.json``.
    Method: the alternating side-by-side medians of :func:`side_by_side`.
    """
    from .kernels import dispatch

    table = getattr(dispatch, "CROSSOVER_BYTES", None)
    if table is None or "numba" not in dispatch.available():
        raise SystemExit("batchnorm bench --calibrate: needs numba and a dispatch table "
                         "(batchnorm.kernels.dispatch.CROSSOVER_BYTES); neither is here to calibrate.")
    waited = time.perf_counter()
    if hasattr(dispatch, "wait_ready") and not dispatch.wait_ready(600):
        raise SystemExit("batchnorm bench --calibrate: the numba kernels did not become ready within 600 s "
                         f"(status {dispatch.warm_up_status()!r}).")
    waited = time.perf_counter() - waited
    time.sleep(2.0)  # as in main(): let the warm-up wind down before timing
    print(f"batchnorm bench --calibrate: native vs numba, {repeats} rounds per size, medians "
          f"(numba ready after {waited:.1f} s); ratio = numba / native")
    result: dict = {"machine": _machine(), "repeats": repeats, "ladder": [], "table": {}}
    for mode, lay in table:
        print(f"\n{mode} {lay}: {'bytes':>9}{'shape':>22}{'native ms':>11}{'numba ms':>10}{'ratio':>7}")
        nat, nb = [], []
        for nbytes in sizes:
            shape = calibration_shape(lay, nbytes)[0]
            s = side_by_side(_calibration_fns(mode, lay, nbytes), repeats)
            a, b = _median_ms(s["native"]), _median_ms(s["numba"])
            nat.append(a)
            nb.append(b)
            result["ladder"].append({"mode": mode, "layout": lay, "bytes": nbytes, "shape": list(shape),
                                     "native_ms": a, "numba_ms": b, "samples_s": s})
            print(f"{'':>{len(mode) + len(lay) + 2}}  {_fmt_bytes(nbytes):>9}{str(shape):>22}{a:>11.3f}{b:>10.3f}"
                  f"{b / a:>7.2f}", flush=True)
        result["table"][f"{mode},{lay}"] = crossover(list(sizes), nat, nb)
    print("\n# batchnorm.kernels.dispatch: paste over the old table")
    print(f"#: Measured with `batchnorm bench --calibrate` on {platform.node() or 'this machine'}, "
          f"{time.strftime('%Y-%m-%d')} (torch {torch.__version__}, {torch.get_num_threads()} threads).")
    print("CROSSOVER_BYTES: dict[tuple[str, str], int] = {")
    for key in table:
        v = result["table"][f"{key[0]},{key[1]}"]
        note = "" if v is not None else f"  # numba never won up to {_fmt_bytes(sizes[-1])}"
        value = _bytes_literal(v) if v is not None else "1 << 62"
        print(f'    ("{key[0]}", "{key[1]}"): {value},{note}')
    print("}")
    if store:
        _store_calibration(result)
    if out:
        _finish(result, out)
    return result


def _store_calibration(result: dict) -> None:
    """Keep the measured table beside numba's cache, where every later process at these thread counts adopts it."""
    from .kernels import warmup

    try:
        import numba

        directory = warmup.cache_location()[0]
        if directory is None:
            return
        threads = (torch.get_num_threads(), numba.get_num_threads())
        table = {tuple(k.split(",")): (_cal.NEVER if v is None else v) for k, v in result["table"].items()}
        _cal.store(directory, threads, {"table": table, "ladder": []})
        print(f"stored for {threads[0]} torch / {threads[1]} numba threads in {_cal.path(directory)}: later processes "
              "use it")
    except (ImportError, OSError) as e:
        print(f"(not stored: {e})")


def _machine() -> dict:
    from .kernels import dispatch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "backends": dispatch.available(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}}


#: Environment variables that change the timings; recorded with every run.
_ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER",
             "BATCHNORM_BACKEND", "BATCHNORM_WARMUP", "BATCHNORM_BUFFER_CACHE")


# --------------------------------------------------------------------------------------------------
# the command


def _custom_row(spec: str) -> dict[str, Callable[[], Row]]:
    """``"N,C,H,W[:cl][:last][:relu]"`` -> one training-step row (see ``--shape``)."""
    dims, *flags = spec.split(":")
    try:
        shape = tuple(int(v) for v in dims.split(","))
    except ValueError:
        raise SystemExit(f"batchnorm bench: --shape expects integers like 16,32,64,64 (optionally :cl, :last, :relu), "
                         f"got {spec!r}.") from None
    if any(v < 1 for v in shape):
        raise SystemExit(f"batchnorm bench: --shape {spec!r}: every size must be at least 1, got {shape}; e.g. "
                         "--shape 8,16 for 8 samples of 16 features.")
    if len(shape) >= 2 and torch.Size(shape).numel() // shape[1] < 2:
        raise SystemExit(f"batchnorm bench: --shape {spec!r}: a training step needs more than 1 value per feature "
                         f"(batch x spatial sizes multiply to 1 in {shape}); use a batch of at least 2.")
    unknown = set(flags) - {"cl", "last", "relu"}
    if len(shape) < 2 or unknown or ("cl" in flags and len(shape) not in (4, 5)) or ("cl" in flags and "last" in flags):
        raise SystemExit(f"batchnorm bench: --shape {spec!r}: need at least 2 dims, flags from :cl (4-D or 5-D only), "
                         f":last (not with :cl), :relu; got {sorted(unknown) or shape}.")
    layout = _CL if "cl" in flags else _LAST if "last" in flags else "contiguous"
    case = Case(shape, layout, "relu" if "relu" in flags else None)
    return {case.name: lambda: train_row(case)}


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 10 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog="batchnorm bench",
        description="\n\n".join(doc[:4]),
        epilog="\n\n".join(doc[4:]) + "\n\nExamples:\n  batchnorm bench --quick\n  batchnorm bench --sweep "
        "--out sweep.json\n  batchnorm bench --shape 16,32,64,64:cl --shape 256,1024\n  batchnorm bench --calibrate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 rounds per row, sweep shapes up to 16 MB only, the models at toy sizes, no "
                        "fresh-process first-call measurement; the numbers are rough")
    p.add_argument("--sweep", action="store_true", help="run only the shape sweep (and the other sections named by "
                                                        "--models / --fixed, if given)")
    p.add_argument("--models", action="store_true", help="run only the three whole-model training steps (and the "
                                                         "other sections named by --sweep / --fixed, if given)")
    p.add_argument("--fixed", action="store_true", help="run only the per-call fixed-cost row of an (8, 16) batch "
                                                        "(and the other sections named, if given)")
    p.add_argument("--calibrate", action="store_true",
                   help="re-measure the crossover points of the dispatch table on this machine, print them in the "
                        "table's format, keep them beside the numba cache (later processes at these thread counts "
                        "use them) and exit (with --out, also write them as JSON)")
    p.add_argument("--markdown", default=None, metavar="RUN.json",
                   help="print the results saved by an earlier --out run as Markdown tables and exit")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per row (default 15 for shape rows, 7 for whole models; 3 with --quick)")
    p.add_argument("--out", default=None, help="write every result, with all timing samples, as JSON to this path")
    p.add_argument("--threads", type=int, default=None,
                   help="number of threads for torch and numba (default: as already configured, usually the core count)")
    p.add_argument("--backend", default=None,
                   help="force our layer's backend in the shape rows (numba, composite, torch, native; default: auto)")
    p.add_argument("--rows", default=None,
                   help="';'-separated substrings: run only rows whose name contains one of them, e.g. 'eval;traffic' "
                        "or '(64, 64, 56, 56)'")
    p.add_argument("--no-first-call", action="store_true",
                   help="skip the cold/warm first-call measurement in fresh processes (it waits until the numba "
                        "kernels have compiled in the background: minutes on a busy machine)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the GPU bench instead (sweep, variants against torch's plain BN, fused ReLU, ResNet-18/50 "
                        "training steps, the triton-vs-cuDNN crossover; CUDA events; see batchnorm.bench_gpu); takes "
                        "--quick, --repeats and --out")
    p.add_argument("--shape", action="append", default=[], metavar="N,C,...",
                   help="add a training-step row for this input shape (repeatable); with --shape only those rows run "
                        "unless --rows is given too. Suffix :cl for channels-last (4-D or 5-D), :last for features "
                        "on the last axis (axis=-1), :relu for BN with a fused ReLU, e.g. --shape 16,32,64,64:cl")
    return p


def _print_row(name: str, nbytes: str, o: float, t: float, backend: str, target: float | None) -> None:
    ratio = o / t
    mark = "" if target is None else ("ok" if ratio <= target else "MISSED")
    tgt = "" if target is None else f"<={target:g}"
    print(f"{name:<42}{nbytes:>9}{o:>10.3f}{t:>10.3f}{ratio:>7.2f}  {backend:<18}{tgt:>7} {mark}", flush=True)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict | None:
    """Every argument checked before anything waits or runs (usage error, exit status 2, no traceback);
    returns the ``--markdown`` results when given."""
    for name in ("threads", "repeats"):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name} must be at least 1, got {v}.")
    if args.backend is not None and args.backend not in ("auto", "numba", "composite", "torch", "native"):
        parser.error(f"--backend must be one of auto, numba, composite, torch, native; got {args.backend!r}.")
    for spec in args.shape:
        try:
            _custom_row(spec)
        except SystemExit as e:
            parser.error(str(e.code).removeprefix("batchnorm bench: "))
    if args.markdown is None:
        return None
    try:
        with open(args.markdown) as fh:
            results = json.load(fh)
        if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
            raise ValueError("no 'rows' list: not the output of batchnorm bench --out")
    except OSError as e:
        parser.error(f"--markdown: cannot read {args.markdown!r} ({e.strerror or e}); give the JSON file an earlier "
                     "'batchnorm bench --out RUN.json' wrote.")
    except ValueError as e:
        parser.error(f"--markdown: {args.markdown!r} is not a batchnorm bench result ({e}); give the JSON file an "
                     "earlier 'batchnorm bench --out RUN.json' wrote.")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    md = _check(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import numba

            numba.set_num_threads(args.threads)
        except ImportError:  # pragma: no cover - numba is optional
            pass
    if md is not None:
        try:
            print(markdown(md))
        except (KeyError, TypeError, ValueError) as e:
            parser.error(f"--markdown: {args.markdown!r} is not a complete batchnorm bench result (missing {e}).")
        return 0
    if args.calibrate:
        calibrate(repeats=args.repeats or 7, out=args.out, store=True)
        return 0
    if args.device == "cuda":
        from . import bench_gpu

        return bench_gpu.bench_main(args.repeats, args.quick, args.out)
    from .kernels import dispatch

    if hasattr(dispatch, "wait_ready"):  # time the steady state: numba compiled (or loaded from its cache)
        t = time.perf_counter()
        ready = dispatch.wait_ready(600)
        from .kernels import warmup

        if ready:  # "auto" is timed with the crossovers it keeps: measured here (once per machine and threads)
            warmup.wait_calibrated(600)
        time.sleep(2.0)  # the warm-up's helper process and thread wind down (calls right after are disturbed)
        print(f"numba kernels {'ready' if ready else 'NOT ready: ' + dispatch.warm_up_status()} after "
              f"{time.perf_counter() - t:.1f} s of waiting")
        detail = warmup.warm_up_status(detail=True)
        print(f"crossovers (auto picks numba from these sizes of x): {detail['crossovers']}: "
              + ", ".join(f"{k} {_fmt_bytes(v) if v < 1 << 60 else 'never'}" for k, v in detail["table"].items()))
    repeats = args.repeats or (3 if args.quick else 15)
    model_repeats = args.repeats or (3 if args.quick else 7)
    sections = {s for s in ("sweep", "models", "fixed") if getattr(args, s)}
    everything = not sections and not args.shape
    wanted = [w.strip() for w in args.rows.split(";") if w.strip()] if args.rows else None

    def pick(name: str) -> bool:
        return not wanted or any(w in name for w in wanted)

    results: dict = {
        "machine": _machine(), "crossovers": {k: v for k, v in dispatch.warm_up_status(detail=True).items()
                                              if k in ("crossovers", "table", "reason")},
        "repeats": repeats, "model_repeats": model_repeats, "quick": args.quick, "rows": [],
    }
    print(f"batchnorm bench: torch {torch.__version__}, {torch.get_num_threads()} threads, backends "
          f"{dispatch.available()}, {repeats} rounds, medians; ratio = ours / torch (lower is better)")
    if hasattr(os, "getloadavg"):
        print(f"load average before the run: {os.getloadavg()[0]:.1f} (a busy machine makes every figure noisy; "
              "there, run with OMP_WAIT_POLICY=PASSIVE)")
    if results["machine"]["env"]:
        print("environment: " + ", ".join(f"{k}={v}" for k, v in results["machine"]["env"].items()))
    header = f"{'row':<42}{'bytes':>9}{'ours ms':>10}{'torch ms':>10}{'ratio':>7}  {'backend (auto)':<18}{'target':>7}"

    def run_rows(title: str, rows: dict[str, Callable[[], Row]], reps: int, nbytes: dict[str, int]) -> None:
        todo = [n for n in rows if pick(n)]
        if not todo:
            return
        print(f"\n{title}\n{header}")
        for name in todo:
            try:
                row = rows[name]()
            except _Skip as why:
                print(f"{name:<42}skipped: {why}")
                results["rows"].append({"row": name, "section": title, "skipped": str(why)})
                continue
            s = side_by_side(row.fns, reps)
            backend = row.backend()
            o, t = _median_ms(s["ours"]), _median_ms(s["torch"])
            target = TARGETS.get(name, SWEEP_TARGET)
            results["rows"].append({"row": name, "section": title, "bytes": nbytes.get(name), "ours_ms": o,
                                    "torch_ms": t, "ratio": o / t, "backend": backend, "target": target,
                                    "met": o / t <= target, "samples_s": s})
            _print_row(name, _fmt_bytes(nbytes[name]) if name in nbytes else "", o, t, backend, target)
            del row, s

    if args.shape:
        custom: dict[str, Callable[[], Row]] = {}
        sizes: dict[str, int] = {}
        for spec in args.shape:
            row = _custom_row(spec)
            custom.update(row)
            sizes[next(iter(row))] = 4 * torch.Size(int(v) for v in spec.split(":")[0].split(",")).numel()
        kept, wanted = wanted, None  # the rows asked for by shape always run
        run_rows("your shapes: training step (forward + backward)", custom, repeats, sizes)
        wanted = kept
        if not args.rows and not sections:
            return _finish(results, args.out)
        everything = not sections

    if everything or "sweep" in sections:
        cases = [c for c in SWEEP if not args.quick or c.nbytes <= QUICK_MAX_BYTES]
        rows = {c.name: (lambda c=c: train_row(c, args.backend)) for c in cases}
        run_rows(f"sweep: training step (forward + backward), {len(cases)} shapes, target <= {SWEEP_TARGET}x unless "
                 "noted", rows, repeats, {c.name: c.nbytes for c in cases})
    if everything:
        big = (64, 64, 56, 56) if not args.quick else (16, 64, 28, 28)
        relu = Case(big, activation="relu")
        extras = {relu.name: lambda: train_row(relu, args.backend), f"eval forward {big}": lambda: eval_row(big)}
        run_rows("extras", extras, repeats, {relu.name: relu.nbytes, f"eval forward {big}": relu.nbytes})
        if pick("traffic"):
            tr = _traffic(big, repeats)
            results["rows"].append(tr | {"target": 0.6, "met": tr["fraction"] >= 0.6})
            print(f"{'forward traffic / copy bandwidth':<42}{_fmt_bytes(relu.nbytes):>9}{tr['ours_GBps']:>8.1f}GB/s"
                  f"{tr['copy_GBps']:>6.1f}GB/s{tr['fraction']:>5.2f}  {tr['backend']:<18}{'>=0.6':>7}")
        if pick("saved"):
            sv = _saved_row(big)
            results["rows"].append(sv | {"target": 0.5, "met": sv["ratio"] <= 0.5})
            print(f"{'saved bytes BN+leaky_relu memory=save':<42}{_fmt_bytes(relu.nbytes):>9}"
                  f"{sv['ours_bytes'] / 2**20:>8.1f}MB{sv['torch_bytes'] / 2**20:>8.1f}MB{sv['ratio']:>7.3f}"
                  f"  {'':<18}{'<=0.5':>7}   (beyond parameters and buffers; "
                  f"{sv['ratio_with_module_state']:.6f} counting them too)")
    if everything or "fixed" in sections:
        if pick("fixed cost (8, 16)"):
            row = fixed_cost_row((8, 16))
            s = side_by_side(row.fns, repeats)
            t = _median_ms(s["torch"])
            print(f"\nfixed cost per call: training step of an (8, 16) batch, each backend forced, against "
                  f"torch.nn.BatchNorm1d ({t * 1e3:.0f} us)")
            for name in row.fns:
                if name == "torch":
                    continue
                o = _median_ms(s[name])
                row_name = f"fixed cost (8, 16) {name}"
                results["rows"].append({"row": row_name, "section": "fixed", "bytes": 512, "ours_ms": o,
                                        "torch_ms": t, "ratio": o / t, "backend": name, "target": SWEEP_TARGET,
                                        "met": o / t <= SWEEP_TARGET, "samples_s": {"ours": s[name],
                                                                                    "torch": s["torch"]}})
                shown = name if name != "auto" else f"auto: {row.backend()}"
                results["rows"][-1]["backend"] = shown
                _print_row(row_name, "512 B", o, t, shown, SWEEP_TARGET if name == "auto" else None)
    if everything or "models" in sections:
        rows = {name: (lambda name=name: model_row(name, small=args.quick)) for name in MODELS}
        run_rows("whole models: training step (forward, loss, backward, SGD step), torch's BN vs batchnorm.convert",
                 rows, model_repeats, {})
    if everything and not args.no_first_call and not args.quick and pick("first call"):
        print(f"\nfirst call in a fresh process, training step of {FIRST_CALL_SHAPE} (cold = empty numba cache)")
        fc = first_call_times(wait_s=420.0)
        results["first_call"] = fc
        for label in ("cold", "warm"):
            r = fc[label]
            if "error" in r:
                print(f"first call ({label}): failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
                continue
            take = r.get("numba_takeover_s")
            take_s = (f"numba ready {take:.1f} s after import; next step on {r['backend_after']} "
                      f"{r['call_after_takeover_s'] * 1e3:.0f} ms, a y.sum().backward() step "
                      f"{r['sum_backward_after_takeover_s'] * 1e3:.0f} ms" if take is not None
                      else f"numba warm-up status {r.get('status', '?')}")
            print(f"{'first call ' + label:<42}{'':>9}{r['first_call_s'] * 1e3:>10.0f}{'':>10}{'':>7}  "
                  f"{r.get('first_backend', '?'):<18}{'<=1 s' if label == 'cold' else '<=0.3 s':>7}   "
                  f"(torch's own first step {r['torch_first_call_s'] * 1e3:.0f} ms, just before; import "
                  f"{r['import_s']:.2f} s; {take_s})")
    return _finish(results, args.out)


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def markdown(results: dict) -> str:
    """A saved run (the ``--out`` JSON) as Markdown tables: one row per timed row, with the backend and the target.

    Shape: not applicable. Example: ``batchnorm bench --markdown benchmarks/run.json``.
    """
    lines = ["| row | size | ours / torch ms | ratio | backend (auto) | target |", "|---|---:|---:|---:|---|---|"]
    for r in results.get("rows", []):
        if "skipped" in r:
            lines.append(f"| {r['row']} | | skipped: {r['skipped']} | | | |")
        elif "ours_ms" in r:
            size = _fmt_bytes(r["bytes"]) if r.get("bytes") else ""
            tgt = r.get("target")
            met = "" if tgt is None or (r["row"].startswith("fixed") and "auto" not in r["backend"]) else (
                f"≤ {tgt:g} {'met' if r['met'] else '**missed**'}")
            ratio = f"**{r['ratio']:.2f}**" if r.get("met") else f"{r['ratio']:.2f}"
            lines.append(f"| {r['row'].removeprefix('train ')} | {size} | {_ms(r['ours_ms'])} / {_ms(r['torch_ms'])} | "
                         f"{ratio} | {r['backend']} | {met} |")
        elif "fraction" in r:
            lines.append(f"| {r['row']} | | {r['ours_GBps']:.1f} / {r['copy_GBps']:.1f} GB/s | {r['fraction']:.2f} | "
                         f"{r['backend']} | ≥ 0.6 {'met' if r['met'] else '**missed**'} |")
        elif "ours_bytes" in r:
            lines.append(f"| {r['row']} | | {r['ours_bytes'] / 2**20:.1f} / {r['torch_bytes'] / 2**20:.1f} MB | "
                         f"{r['ratio']:.3f} | | ≤ 0.5 {'met' if r['met'] else '**missed**'} |")
    for label, fc in (results.get("first_call") or {}).items():
        if "error" in fc:
            lines.append(f"| first call, {label} | | failed | | | |")
            continue
        take = fc.get("numba_takeover_s")
        note = f"numba ready after {take:.0f} s" if take is not None else f"warm-up {fc.get('status', '?')}"
        tgt = "≤ 1 s" if label == "cold" else "≤ 0.3 s"
        ok = fc["first_call_s"] <= (1.0 if label == "cold" else 0.3)
        lines.append(f"| first call in a fresh process, {label} numba cache | | {fc['first_call_s']:.2f} s | | "
                     f"{fc.get('first_backend', '?')} ({note}) | {tgt} {'met' if ok else '**missed**'} |")
    return "\n".join(lines)


def _finish(results: dict, out: str | None) -> int:
    if out:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
