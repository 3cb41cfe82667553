"""Launch and traffic model of one training step (forward + backward) per variant on a GPU, against torch's BN.

Runs on the CPU, no GPU needed: CPU tensors take the GPU route (``dispatch.device_type`` patched to say
"cuda"; ``TRITON_INTERPRET=1`` makes the triton backend usable, and its launches are *recorded*, not run,
so the figures come from the real host code of every layer). Per training step it counts:

* launches: every ATen op that launches a kernel on a GPU (views, ``empty``, ``detach`` and the like
  launch none), captured with a ``TorchDispatchMode``, plus every triton kernel launch;
* bytes: per launch, the bytes of its distinct tensor operands (inputs and outputs, each storage once,
  a broadcast operand at its storage's size) — the model "each operand is read or written once"; ATen's
  batch-norm ops count as the two passes each that they are on a GPU (:data:`PASSES`);
* host syncs: ``aten._local_scalar_dense`` and ``aten.nonzero`` (must be 0);
* collectives (SyncBatchNorm with a group of 2, the all-gather replaced by a local copy that is not counted).

Time implied: ``launches × LAUNCH_US + bytes / bandwidth``, at an H100's 3.35 TB/s and an H200's 4.8 TB/s.
torch's ``nn.BatchNorm*d`` is counted the same way: its two ATen ops as 2 + 2 passes, plus the
``num_batches_tracked`` increment: 5 launches, 8× the input's bytes.

    python benchmarks/gpu_model.py                 # the Markdown tables of docs/gpu.md
    python benchmarks/gpu_model.py --quick         # two shapes, no ResNet-50
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the backend counts as usable

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

LAUNCH_US = 4.0  # per-launch cost assumed (host launch + GPU dispatch of a small kernel, µs)
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes/s
SHAPES = [(32, 64, 56, 56), (256, 1024)]

# ATen ops that launch no kernel on a GPU (metadata, allocation, aliasing)
FREE = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "as_strided", "t", "transpose", "permute",
    "unsqueeze", "squeeze", "select", "slice", "alias", "detach", "empty", "empty_strided", "new_empty",
    "new_empty_strided", "empty_like", "unbind", "split", "split_with_sizes", "chunk", "view_as", "lift_fresh",
    "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "_local_scalar_dense", "nonzero", "set_", "resize_", "is_nonzero", "promote_types", "result_type",
}
SYNCS = {"_local_scalar_dense", "nonzero"}
# ATen's batch-norm ops are two passes each on a GPU (ATen's CUDA kernels and cuDNN alike, for tensors larger than
# the cache): forward = statistics (reads x) + elementwise (reads x, writes y); backward = reduce (reads dy, x) +
# elementwise (reads dy, x, writes dx). Counted as such: (extra launches, extra reads of the op's first input).
PASSES = {
    "native_batch_norm": (1, 1), "_native_batch_norm_legit": (1, 1), "cudnn_batch_norm": (1, 1),
    "_batch_norm_with_update": (1, 1), "native_batch_norm_backward": (1, 2), "cudnn_batch_norm_backward": (1, 2),
    "batch_norm_backward": (1, 2),
}


def _storage_bytes(t: torch.Tensor) -> tuple[int, int]:
    """(storage key, bytes this operand moves): a view's own bytes, capped at its storage (broadcasts)."""
    st = t.untyped_storage()
    return st.data_ptr(), min(t.numel() * t.element_size(), st.nbytes())


def _operand_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            key, n = _storage_bytes(t)
            seen[key] = max(seen.get(key, 0), n)
    return sum(seen.values())


def _flat(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flat(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flat(o)


class Count(TorchDispatchMode):
    """Kernel-launching ATen ops, their operand bytes, and host syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.bytes = 0
        self.syncs = 0
        self.ops: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.syncs += 1
        if name in FREE or name.startswith("_c10d") or func.namespace in ("c10d", "_c10d_functional"):
            return out
        if name == "_to_copy" and isinstance(out, torch.Tensor) and args and args[0].dtype == out.dtype:
            pass  # a copy: counted
        self.launches += 1
        self.ops[name] += 1
        self.bytes += _operand_bytes(list(_flat(args)) + list(_flat(kwargs or {})) + list(_flat(out)))
        if name in PASSES:
            launches, reads = PASSES[name]
            self.launches += launches
            self.bytes += reads * args[0].numel() * args[0].element_size()
        return out


@contextlib.contextmanager
def gpu_route(world: int = 1):
    """CPU tensors take the GPU branches; triton launches are recorded (not run); SyncBatchNorm sees ``world``."""
    from batchnorm.kernels import dispatch
    from batchnorm.kernels.triton import backend as tb
    from batchnorm.layers import sync

    saved = (dispatch.device_type, tb._record, sync._group_world, sync._SyncState.poll)
    dispatch.device_type = lambda x: "cuda"
    tb._record = []
    if world > 1:
        sync._group_world = lambda group: world
        # SyncBatchNorm's fault record is written by a triton kernel, recorded here, not run: nothing to report
        sync._SyncState.poll = lambda self, wait=False: None
    try:
        yield tb._record
    finally:
        dispatch.device_type, tb._record, sync._group_world, sync._SyncState.poll = saved


class FakeGather:
    """Stands in for ``all_gather_single`` in one process: every rank sent what this one sent (not counted)."""

    def __init__(self, mode_ref: list) -> None:
        self.calls = 0
        self.mode_ref = mode_ref

    def __call__(self, out, inp, group=None, async_op=False):
        self.calls += 1
        mode = self.mode_ref[0]
        if mode is not None:
            mode.paused = True
        try:
            out.view(-1, inp.numel()).copy_(inp.reshape(1, -1))
        finally:
            if mode is not None:
                mode.paused = False


def _triton_bytes(record) -> int:
    total = 0
    for _, args, _ in record:
        total += _operand_bytes([a for a in args if isinstance(a, torch.Tensor)])
    return total


def variants(c: int, n: int):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from batchnorm import BatchNorm, BatchRenorm, GhostBatchNorm, SyncBatchNorm

    vbs = max(2, n // 4)
    return {
        "plain": (lambda: BatchNorm(c), False, 1),
        "momentum=None": (lambda: BatchNorm(c, momentum=None), False, 1),
        "mask": (lambda: BatchNorm(c), True, 1),
        "ghost (4 groups)": (lambda: GhostBatchNorm(c, virtual_batch_size=vbs), False, 1),
        "masked ghost": (lambda: GhostBatchNorm(c, virtual_batch_size=vbs), True, 1),
        "renorm": (lambda: BatchRenorm(c), False, 1),
        "renorm, warm-up": (lambda: BatchRenorm(c, warmup_steps=100), False, 1),
        "fused ReLU": (lambda: BatchNorm(c, activation="relu"), False, 1),
        'memory="save"': (lambda: BatchNorm(c, memory="save"), False, 1),
        "sync (2 ranks)": (lambda: SyncBatchNorm(c), False, 2),
    }


def _mask(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return torch.arange(x.shape[0]) % 4 != 3
    n, spatial = x.shape[0], x.shape[2:]
    flat = torch.arange(int(torch.tensor(spatial).prod())).expand(n, -1)
    return (flat < (3 * flat.shape[1]) // 4).reshape(n, *spatial)


def measure(build, shape, masked: bool, world: int, torch_bn: bool = False) -> dict:
    """One warm-up step, then one counted training step of a fresh layer on ``shape``."""
    import torch.distributed as dist

    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    mask = _mask(x) if masked else None
    mode_ref: list = [None]
    fake = FakeGather(mode_ref)
    saved = getattr(dist, "all_gather_single", None), dist.all_gather_into_tensor
    layer = build()

    def step():
        y = layer(x) if mask is None else layer(x, mask=mask)
        return torch.autograd.grad(y, [x] + list(layer.parameters()), dy)

    with gpu_route(1 if torch_bn else world) as record, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if world > 1:
            dist.all_gather_single = dist.all_gather_into_tensor = fake
        try:
            step()
            record.clear()
            fake.calls = 0
            mode = Count()
            mode_ref[0] = mode
            with mode:
                step()
            tri, tri_bytes = len(record), _triton_bytes(record)
        finally:
            if world > 1:
                if saved[0] is not None:
                    dist.all_gather_single = saved[0]
                dist.all_gather_into_tensor = saved[1]
    return {"aten": mode.launches, "triton": tri, "launches": mode.launches + tri,
            "bytes": mode.bytes + tri_bytes, "syncs": mode.syncs, "collectives": fake.calls,
            "x_bytes": x.numel() * x.element_size(), "ops": dict(mode.ops)}


def torch_reference(shape, relu: bool = False) -> dict:
    """torch's BN (``relu``: followed by ``nn.ReLU``, what the fused activation replaces)."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    return measure(lambda: nn.Sequential(cls(shape[1]), nn.ReLU()) if relu else cls(shape[1]), shape, False, 1,
                   torch_bn=True)


def implied_us(row: dict, gpu: str) -> float:
    return row["launches"] * LAUNCH_US + row["bytes"] / BANDWIDTH[gpu] * 1e6


def shape_table(shape) -> str:
    ref, relu = torch_reference(shape), torch_reference(shape, relu=True)
    lines = [
        f"**{shape}** float32, x = {ref['x_bytes'] / 2**20:.1f} MiB; torch's BN: {ref['launches']} launches, "
        f"{ref['bytes'] / ref['x_bytes']:.1f}× x's bytes, {implied_us(ref, 'H100'):.1f} µs (H100), "
        f"{implied_us(ref, 'H200'):.1f} µs (H200); torch's BN then ReLU: {relu['launches']} launches, "
        f"{relu['bytes'] / relu['x_bytes']:.1f}× x, {implied_us(relu, 'H100'):.1f} µs (H100), "
        f"{implied_us(relu, 'H200'):.1f} µs (H200)",
        "",
        "| variant | launches (ATen + triton) | bytes, × x | host syncs | collectives | H100 µs | H200 µs | "
        "× torch (H100) | × torch (H200) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (build, masked, world) in variants(shape[1], shape[0]).items():
        r = measure(build, shape, masked, world)
        h1, h2 = implied_us(r, "H100"), implied_us(r, "H200")
        lines.append(
            f"| {name} | {r['launches']} ({r['aten']} + {r['triton']}) | {r['bytes'] / r['x_bytes']:.1f} | "
            f"{r['syncs']} | {r['collectives']} | {h1:.1f} | {h2:.1f} | {h1 / implied_us(ref, 'H100'):.2f} | "
            f"{h2 / implied_us(ref, 'H200'):.2f} |"
        )
    return "\n".join(lines)


def resnet50_shapes(batch: int = 32) -> list[tuple[int, ...]]:
    """The input shapes of the 53 BN layers of a ResNet-50 at ``batch`` × 3 × 224 × 224."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from batchnorm.bench_gpu import ResNet50

    shapes: list[tuple[int, ...]] = []
    model = ResNet50(10).eval()
    hooks = [m.register_forward_pre_hook(lambda m, a: shapes.append((batch, *a[0].shape[1:])))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    return shapes


def resnet50_table(batch: int = 32, scale: int = 4) -> str:
    """Totals over the 53 layers; each distinct shape measured once at batch/scale, bytes scaled by ``scale``.

    Launch counts do not depend on the batch; the bytes of x-sized operands grow with it (per-feature
    operands do not: scaling them too overstates them slightly, at most ~1% here).
    """
    shapes = resnet50_shapes(batch)
    counts = Counter(shapes)
    small = {s: (s[0] // scale, *s[1:]) for s in counts}
    ref = {"launches": 0, "bytes": 0}
    for s, k in counts.items():
        r = torch_reference(small[s])
        ref["launches"] += k * r["launches"]
        ref["bytes"] += k * r["bytes"] * scale
    lines = [
        f"**ResNet-50, {len(shapes)} BN layers, batch {batch}** ({len(counts)} distinct shapes, measured at batch "
        f"{batch // scale}, bytes × {scale}); torch's BN: {ref['launches']} launches, {ref['bytes'] / 2**30:.2f} GiB, "
        f"{implied_us(ref, 'H100') / 1e3:.2f} ms (H100), {implied_us(ref, 'H200') / 1e3:.2f} ms (H200)",
        "",
        "| variant | launches | GiB moved | host syncs | H100 ms | H200 ms | × torch (H100) | × torch (H200) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in variants(64, batch):
        tot = {"launches": 0, "bytes": 0, "syncs": 0}
        for s, k in counts.items():
            build, masked, world = variants(s[1], small[s][0])[name]
            r = measure(build, small[s], masked, world)
            tot["launches"] += k * r["launches"]
            tot["bytes"] += k * r["bytes"] * scale
            tot["syncs"] += k * r["syncs"]
        h1, h2 = implied_us(tot, "H100"), implied_us(tot, "H200")
        lines.append(f"| {name} | {tot['launches']} | {tot['bytes'] / 2**30:.2f} | {tot['syncs']} | {h1 / 1e3:.2f} | "
                     f"{h2 / 1e3:.2f} | {h1 / implied_us(ref, 'H100'):.2f} | {h2 / implied_us(ref, 'H200'):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the two shapes only (no ResNet-50)")
    p.add_argument("--ops", default=None, metavar="VARIANT", help="print the ATen ops counted for one variant "
                                                                   "on (32, 64, 56, 56) and exit")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args.ops:
        build, masked, world = variants(64, 32)[args.ops]
        r = measure(build, (32, 64, 56, 56), masked, world)
        print(r)
        return 0
    print(f"Launch and traffic model, {LAUNCH_US:g} µs per launch, H100 {BANDWIDTH['H100'] / 1e12:g} TB/s, "
          f"H200 {BANDWIDTH['H200'] / 1e12:g} TB/s (python benchmarks/gpu_model.py; torch {torch.__version__})\n")
    for shape in SHAPES:
        print(shape_table(shape) + "\n")
    if not args.quick:
        print(resnet50_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
