"""batchnorm bench --device cuda: our batch norm against PyTorch's on one CUDA GPU.

Sections (each row: ours and torch's, CUDA-event timed, medians, ratio = ours / torch):

  sweep      a training step (forward + backward) of BatchNorm against torch.nn.BatchNorm*d on
             shapes from 256 KB to ~400 MB (NCHW, channels-last, 3-D, (N, C)); target <= 1.02x;
  variants   momentum=None, a padding mask, ghost batches, masked ghost batches, batch renorm,
             memory="save" and a fused ReLU, each against torch's *plain* BN on the same shape
             (target <= 1.3x), and BN + ReLU fused against torch's BN followed by relu (<= 0.8x);
  models     one full training step (forward, cross-entropy, backward, SGD) of a CIFAR ResNet-18
             (batchnorm.zoo, batch 128) and of a ResNet-50 stand-in (53 BN layers, batch 32 of
             224x224), torch's BN against the model converted with batchnorm.convert (<= 1.0x);
  crossover  plain BN with backend="triton" against backend="native" (cuDNN) over sizes: where
             the triton kernels start or stop being faster.

``python -m batchnorm.bench_gpu check`` (what ``benchmarks/gpu_check.sh`` runs) adds a training
and an eval step of every layer and variant under ``torch.cuda.set_sync_debug_mode("error")``
and a CUDA-graph capture and replay of a converted ResNet-18 training step, then the bench
(quick sizes), and prints everything as one table.

Timing: a warm-up (which also compiles the triton kernels), then ``repeats`` samples; each sample
records a CUDA event before and after ``inner`` calls (``inner`` chosen so a sample lasts about a
millisecond) and waits for the second; contenders alternate sample by sample. Without a CUDA
device both commands stop with a message saying so (exit status 1). On the CPU the same code runs
with a wall-clock timer (``device="cpu"``), which is how the tests exercise it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Fn = Callable[[], object]

NO_CUDA = (
    "{what} needs a CUDA GPU, and torch.cuda.is_available() is False here (torch {version}, {build}). "
    "Run it on a machine with an NVIDIA GPU and a CUDA build of torch (with batchnorm[gpu] for triton); "
    "here, 'batchnorm bench' measures the CPU."
)


class NoCudaError(RuntimeError):
    """No CUDA device: the GPU bench and the GPU check cannot run here."""


def require_cuda(what: str = "--device cuda") -> torch.device:
    """The current CUDA device, or :class:`NoCudaError` with a message saying what is missing and what to do."""
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise NoCudaError(NO_CUDA.format(what=what, version=torch.__version__, build=build))
    return torch.device("cuda", torch.cuda.current_device())


# --------------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_ms(fn: Fn, inner: int, device: torch.device) -> float:
    """Milliseconds per call of ``fn`` over ``inner`` calls: CUDA events on a GPU, a wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) * 1e3 / inner


def side_by_side(fns: dict[str, Fn], device: torch.device, repeats: int = 25, warmup: int = 3,
                 target_ms: float = 1.0) -> dict[str, list[float]]:
    """Samples (ms per call) of every contender, taking turns sample by sample after a warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    inner = {}
    for name, fn in fns.items():
        once = max(sample_ms(fn, 1, device), 1e-3)
        inner[name] = max(1, min(200, math.ceil(target_ms / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(sample_ms(fns[name], inner[name], device))
    return samples


@dataclass
class Result:
    section: str
    name: str
    ours_ms: float
    torch_ms: float
    target: float | None
    backend: str = ""
    samples: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.torch_ms

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


WARMUP = 3  # calls per contender before timing (the first ones compile the triton kernels)


def _result(section: str, name: str, fns: dict[str, Fn], device, repeats, target, backend="", warmup=None) -> Result:
    s = side_by_side(fns, device, repeats, WARMUP if warmup is None else warmup)
    return Result(section, name, statistics.median(s["ours"]), statistics.median(s["torch"]), target, backend, s)


# --------------------------------------------------------------------------------------------------
# rows


def _torch_bn(x: torch.Tensor, c: int) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]
    return cls(c)


def _input(shape: tuple[int, ...], layout: str, device, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_(True)


def layer_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, mask: torch.Tensor | None = None,
               post: Callable | None = None) -> Fn:
    """One training step of ``layer``: forward, then the gradients of x and the parameters (nothing accumulates)."""
    wrt = [x] + [p for p in layer.parameters() if p.requires_grad]

    def step():
        y = layer(x) if mask is None else layer(x, mask=mask)
        if post is not None:
            y = post(y)
        return torch.autograd.grad(y, wrt, dy)

    return step


def _backend_of(layer, x) -> str:
    from .bench import chosen_backend

    return chosen_backend(layer, x)


#: (shape, layout) of the sweep; quick: the first four
SWEEP = [
    ((32, 64, 56, 56), "nchw"), ((32, 64, 56, 56), "cl"), ((256, 1024), "nchw"), ((64, 256, 28, 28), "nchw"),
    ((8, 64, 16, 16), "nchw"), ((128, 512, 14, 14), "cl"), ((4096, 1024), "nchw"), ((8, 32, 16, 32, 32), "nchw"),
    ((256, 64, 112, 112), "cl"), ((64, 2048, 7, 7), "nchw"),
]


def sweep_rows(device, repeats: int, quick: bool, shapes=None) -> list[Result]:
    from .layers import BatchNorm

    out = []
    for shape, layout in shapes or (SWEEP[:4] if quick else SWEEP):
        x = _input(shape, layout, device)
        dy = torch.randn_like(x)
        ours, ref = BatchNorm(shape[1]).to(device), _torch_bn(x, shape[1]).to(device)
        name = f"plain {shape}{' channels-last' if layout == 'cl' else ''}"
        out.append(_result("sweep", name, {"ours": layer_step(ours, x, dy), "torch": layer_step(ref, x, dy)},
                           device, repeats, 1.02, _backend_of(ours, x)))
    return out


def _mask(x: torch.Tensor) -> torch.Tensor:
    """A padding-style mask without the feature axis: each sample keeps a leading 3/4 of its positions."""
    n, spatial = x.shape[0], x.shape[2:]
    flat = torch.arange(math.prod(spatial), device=x.device).expand(n, -1)
    return (flat < (3 * flat.shape[1]) // 4).reshape(n, *spatial)


def variants(c: int, n: int) -> dict[str, tuple[Callable[[], nn.Module], bool]]:
    """name -> (layer builder, takes a mask) for every variant the GPU must serve."""
    from .layers import BatchNorm, BatchRenorm, GhostBatchNorm, SyncBatchNorm

    vbs = max(2, n // 4)
    return {
        "plain": (lambda: BatchNorm(c), False),
        "momentum=None": (lambda: BatchNorm(c, momentum=None), False),
        "mask": (lambda: BatchNorm(c), True),
        "ghost": (lambda: GhostBatchNorm(c, virtual_batch_size=vbs), False),
        "masked ghost": (lambda: GhostBatchNorm(c, virtual_batch_size=vbs), True),
        "renorm": (lambda: BatchRenorm(c), False),
        "renorm warm-up": (lambda: BatchRenorm(c, warmup_steps=100), False),
        "fused relu": (lambda: BatchNorm(c, activation="relu"), False),
        'memory="save"': (lambda: BatchNorm(c, memory="save"), False),
        "sync (one process)": (lambda: SyncBatchNorm(c), False),
    }


VARIANT_SHAPES = [(32, 64, 56, 56), (256, 1024)]


def variant_rows(device, repeats: int, quick: bool, shapes=None) -> list[Result]:
    out = []
    for shape in shapes or VARIANT_SHAPES[:1 if quick else 2]:
        x = _input(shape, "nchw", device)
        dy = torch.randn_like(x)
        mask = _mask(x) if x.dim() > 2 else torch.arange(shape[0], device=device) % 4 != 3  # 3 rows in 4 count
        ref = _torch_bn(x, shape[1]).to(device)
        for name, (build, masked) in variants(shape[1], shape[0]).items():
            if name == "plain":
                continue
            layer = build().to(device)
            fns = {"ours": layer_step(layer, x, dy, mask if masked else None), "torch": layer_step(ref, x, dy)}
            out.append(_result("variants", f"{name} {shape} vs torch plain", fns, device, repeats, 1.3,
                               _backend_of(layer, x)))
        fused, plain = variants(shape[1], shape[0])["fused relu"][0]().to(device), ref
        fns = {"ours": layer_step(fused, x, dy), "torch": layer_step(plain, x, dy, post=F.relu)}
        out.append(_result("variants", f"BN+ReLU fused {shape} vs torch BN, relu", fns, device, repeats, 0.8,
                           _backend_of(fused, x)))
    return out


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3 (stride here, as torchvision's v1.5), 1x1 expand x4, residual."""

    def __init__(self, cin: int, planes: int, stride: int, norm) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), norm(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), norm(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != planes * 4:
            self.down = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False), norm(planes * 4))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    """A faithful small stand-in of torchvision's ``resnet50`` (same layers and shapes; 53 BN layers).

    7x7/2 stem, 3x3/2 max-pool, stages of (3, 4, 6, 3) bottlenecks at widths 64..512 (x4 out),
    average pool, fc. ``width`` scales every stage (64: the real network, 25.6 M parameters).

    Shape: ``(N, 3, H, W)`` → ``(N, num_classes)``. Example: ``ResNet50(width=8)(torch.randn(2, 3, 64, 64))``.
    Reference: He et al., CVPR 2016; torchvision.models.resnet50.
    """

    def __init__(self, num_classes: int = 1000, width: int = 64, norm=nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), norm(width)
        self.relu, self.pool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], width
        for i, n in enumerate((3, 4, 6, 3)):
            planes = width * 2**i
            for j in range(n):
                blocks.append(Bottleneck(cin, planes, 2 if (j == 0 and i > 0) else 1, norm))
                cin = planes * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1))


def models(quick: bool, small: bool = False) -> dict[str, Callable[[], tuple[nn.Module, tuple, int]]]:
    """name -> builder of (model with torch's BN, input shape, classes)."""
    from .zoo import resnet18_cifar

    if small:  # the CPU tests: same code, toy sizes
        return {"ResNet-18 (CIFAR)": lambda: (resnet18_cifar(width=2), (2, 3, 8, 8), 10),
                "ResNet-50": lambda: (ResNet50(10, width=2), (2, 3, 16, 16), 10)}
    return {"ResNet-18 (CIFAR, batch 128)": lambda: (resnet18_cifar(width=64), (128, 3, 32, 32), 10),
            "ResNet-50 (batch 32, 224x224)": lambda: (ResNet50(1000), (32, 3, 224, 224), 1000)}


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Fn:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def model_rows(device, repeats: int, quick: bool, small: bool = False) -> list[Result]:
    from .tools import convert

    out = []
    for name, build in models(quick, small).items():
        torch.manual_seed(0)
        model, shape, classes = build()
        model = model.to(device).to(memory_format=torch.channels_last) if device.type == "cuda" else model.to(device)
        ours = convert(model)
        x = torch.randn(shape, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, classes, (shape[0],), device=device)
        fns = {"ours": train_step(ours, x, y), "torch": train_step(model, x, y)}
        reps = max(5, repeats // 3) if not small else repeats
        out.append(_result("models", f"model {name}", fns, device, reps, 1.0, warmup=1 if small else None))
    return out


CROSSOVER_SIZES = [(32, 64, 8, 8), (32, 64, 16, 16), (32, 64, 32, 32), (32, 64, 56, 56), (64, 64, 112, 112),
                   (128, 64, 112, 112)]


def crossover_rows(device, repeats: int, quick: bool, sizes=None) -> list[Result]:
    """Plain BN: backend="triton" (ours) against backend="native" (cuDNN; here in the torch column)."""
    from .kernels import dispatch
    from .layers import BatchNorm

    if "triton" not in getattr(dispatch, "BACKENDS", ()):
        return []
    out = []
    for shape in sizes or CROSSOVER_SIZES[:4 if quick else None]:
        x = _input(shape, "nchw", device)
        dy = torch.randn_like(x)
        tri, nat = BatchNorm(shape[1], backend="triton").to(device), BatchNorm(shape[1], backend="native").to(device)
        mb = x.numel() * x.element_size() / 2**20
        out.append(_result("crossover", f"triton vs cuDNN {shape} ({mb:.1f} MB)",
                           {"ours": layer_step(tri, x, dy), "torch": layer_step(nat, x, dy)}, device, repeats, None,
                           "triton/native"))
    return out


def crossover_point(rows: list[Result]) -> str:
    """Where the triton kernels turn from faster to slower than cuDNN (or "faster everywhere" etc.)."""
    if not rows:
        return "triton backend not available"
    faster = [r.ratio < 1.0 for r in rows]
    if all(faster):
        return "triton faster at every size measured"
    if not any(faster):
        return "cuDNN faster at every size measured"
    def shape(r: Result) -> str:
        return r.name.removeprefix("triton vs cuDNN ").rsplit(" (", 1)[0]

    flips = [f"between {shape(a)} and {shape(b)}" for a, b, fa, fb in zip(rows, rows[1:], faster, faster[1:])
             if fa != fb]
    return "faster one changes " + "; ".join(flips)


SECTIONS = {"sweep": sweep_rows, "variants": variant_rows, "models": model_rows, "crossover": crossover_rows}


def run_bench(device: torch.device, repeats: int = 25, quick: bool = False, sections=None,
              show: Callable[[Result], None] | None = None) -> list[Result]:
    """Every section's rows (or those named in ``sections``), printed one by one through ``show``."""
    results = []
    for name, fn in SECTIONS.items():
        if sections and name not in sections:
            continue
        try:
            rows = fn(device, repeats, quick)
        except Exception as exc:  # one section that cannot run must not hide the others  # noqa: BLE001
            rows = [Result(name, f"{name}: FAILED ({type(exc).__name__}: {str(exc)[:160]})", math.nan, math.nan,
                           None)]
        for r in rows:
            results.append(r)
            if show is not None:
                show(r)
    return results


def format_result(r: Result) -> str:
    if math.isnan(r.ours_ms):
        return f"{r.name}"
    mark = "" if r.met is None else ("ok" if r.met else "MISSED")
    tgt = f"<={r.target:g}" if r.target is not None else ""
    return f"{r.name:<58}{r.ours_ms:>10.3f}{r.torch_ms:>10.3f}{r.ratio:>7.2f}  {r.backend:<14}{tgt:>7} {mark}"


HEADER = f"{'row':<58}{'ours ms':>10}{'torch ms':>10}{'ratio':>7}  {'backend':<14}{'target':>7}"


# --------------------------------------------------------------------------------------------------
# the GPU check: no host sync on a step, CUDA-graph capture


def sync_free_steps(device: torch.device, shape=(8, 16, 8, 8)) -> list[tuple[str, str]]:
    """(variant, "ok" or the error) for a training and an eval step under set_sync_debug_mode("error")."""
    out = []
    for name, (build, masked) in variants(shape[1], shape[0]).items():
        layer = build().to(device)
        x = _input(shape, "nchw", device)
        mask = _mask(x) if masked else None
        step = layer_step(layer, x, torch.randn_like(x), mask)
        try:
            for _ in range(3):  # first calls: kernel compiles, one-time checks and caches
                step()
            layer.eval()
            with torch.no_grad():
                layer(x) if mask is None else layer(x, mask=mask)
            layer.train()
            _sync(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
                layer.eval()
                with torch.no_grad():
                    layer(x) if mask is None else layer(x, mask=mask)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                layer.train()
            _sync(device)
            out.append((name, "ok"))
        except Exception as exc:  # noqa: BLE001 - the table reports it
            out.append((name, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}"))
    return out


def graph_capture(device: torch.device, replays: int = 5, width: int = 64, batch: int = 64) -> tuple[str, str]:
    """Capture a converted ResNet-18 training step in a CUDA graph, replay it; ("ok"/error, figures).

    As torch's whole-network recipe: warm-up iterations on a side stream, capture forward, loss,
    backward and the optimizer step with static input and target tensors, then copy new data into
    them and replay. Checks that the replays train (loss finite, parameters and running statistics
    move, ``num_batches_tracked`` advanced once per replay) and times replay against eager.
    """
    from .tools import convert
    from .zoo import resnet18_cifar

    torch.manual_seed(0)
    model = convert(resnet18_cifar(width=width)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    static_x = torch.randn(batch, 3, 32, 32, device=device)
    static_y = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(static_x), static_y)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = statistics.median(sample_ms(step, 3, device) for _ in range(5))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_loss = step()
    except Exception as exc:  # noqa: BLE001 - the table reports it
        return f"FAILED at capture: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}", ""
    bn = next(m for m in model.modules() if hasattr(m, "num_batches_tracked"))
    before = (bn.num_batches_tracked.item(), bn.running_mean.clone(), model.fc.weight.detach().clone())
    for _ in range(replays):
        static_x.copy_(torch.randn_like(static_x))
        static_y.copy_(torch.randint(0, 10, (batch,), device=device))
        graph.replay()
    torch.cuda.synchronize(device)
    tracked = bn.num_batches_tracked.item() - before[0]
    problems = []
    if not math.isfinite(static_loss.item()):
        problems.append("loss not finite")
    if tracked != replays:
        problems.append(f"num_batches_tracked advanced by {tracked}, expected {replays}")
    if torch.equal(bn.running_mean, before[1]):
        problems.append("running_mean did not move")
    if torch.equal(model.fc.weight, before[2]):
        problems.append("weights did not move")
    replay = statistics.median(sample_ms(graph.replay, 3, device) for _ in range(5))
    figures = f"replay {replay:.2f} ms vs eager {eager:.2f} ms per step"
    return ("ok" if not problems else "FAILED: " + "; ".join(problems)), figures


def check(quick: bool = True, repeats: int = 15) -> int:
    """The one-GPU check (benchmarks/gpu_check.sh): sync-free steps, CUDA-graph capture, the bench; one table."""
    device = require_cuda("benchmarks/gpu_check.sh (python -m batchnorm.bench_gpu check)")
    t0 = time.perf_counter()
    print(f"batchnorm GPU check on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}", flush=True)
    table: list[tuple[str, str, str]] = []
    for name, status in sync_free_steps(device):
        table.append((f"no host sync: {name} (train + eval step)", status, ""))
        print(f"  {table[-1][0]}: {status}", flush=True)
    status, figures = graph_capture(device)
    table.append(("CUDA graph: converted ResNet-18 training step", status, figures))
    print(f"  {table[-1][0]}: {status} {figures}", flush=True)
    print(HEADER, flush=True)
    results = run_bench(device, repeats, quick, show=lambda r: print(format_result(r), flush=True))
    for r in results:
        if math.isnan(r.ours_ms):
            table.append((r.name, "FAILED", ""))
            continue
        mark = "" if r.met is None else ("ok" if r.met else "MISSED")
        tgt = f" (target <= {r.target:g})" if r.target is not None else ""
        table.append((r.name, mark or "-", f"{r.ratio:.2f}x torch{tgt}, {r.ours_ms:.3f} vs {r.torch_ms:.3f} ms"))
    table.append(("triton/cuDNN crossover (plain BN)", "-", crossover_point([r for r in results
                                                                           if r.section == "crossover"])))
    print()
    print(markdown_table(table))
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    failed = [row for row in table if row[1].startswith("FAILED")]
    return 1 if failed else 0


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| check | result | figure |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# entry points


def bench_main(repeats: int | None = None, quick: bool = False, out: str | None = None,
               sections=None) -> int:
    """``batchnorm bench --device cuda``: returns the exit status (1 without a CUDA device)."""
    try:
        device = require_cuda()
    except NoCudaError as exc:
        print(f"batchnorm bench: {exc}", file=sys.stderr)
        return 1
    reps = repeats or (7 if quick else 25)
    print(f"batchnorm bench --device cuda: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"{reps} samples per row, CUDA events, medians; ratio = ours / torch (lower is better)", flush=True)
    print(HEADER, flush=True)
    results = run_bench(device, reps, quick, sections, show=lambda r: print(format_result(r), flush=True))
    print("triton/cuDNN crossover (plain BN): " + crossover_point([r for r in results if r.section == "crossover"]))
    if out:
        with open(out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "rows": [{**r.__dict__, "ratio": r.ratio} for r in results]}, fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batchnorm.bench_gpu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("bench", "check"), help="bench: the GPU bench; check: the one-GPU check")
    p.add_argument("--quick", action="store_true", help="fewer shapes and samples")
    p.add_argument("--repeats", type=int, default=None, help="samples per row")
    p.add_argument("--out", default=None, help="bench: write the rows as JSON to this path")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}.")
    if args.command == "bench":
        return bench_main(args.repeats, args.quick, args.out)
    try:
        return check(quick=True, repeats=args.repeats or 15)
    except NoCudaError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
