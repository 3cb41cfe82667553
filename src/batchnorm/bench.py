"""``batchnorm bench``: time our layer against PyTorch's batch norm, side by side, on this machine.

Every row times both contenders *alternately* in one run (warm-up first, then ``repeats`` rounds;
each round times a few calls of each contender), and reports medians and the ratio ours / torch
(lower is better). Rows (issue #3):

* training step (forward + backward) on ``(64, 64, 56, 56)`` NCHW and channels-last,
  ``(32, 256, 28, 28)``, ``(128, 512, 7, 7)``, ``(256, 1024)`` and ``(32, 512, 768)`` with ``axis=-1``
  (torch gets the same tensor through ``x.transpose(1, 2)``, what a user would write);
* BN + ReLU fused against ``torch.nn.BatchNorm2d`` → ``torch.relu`` (training step);
* eval-mode forward;
* forward memory traffic: training-forward bytes that must move (two reads and one write of x)
  per second, against ``torch.Tensor.copy_`` bandwidth (one read, one write) measured in the same run;
* bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``) by BN + leaky ReLU with
  ``memory="save"`` against torch's ``BatchNorm2d`` → ``leaky_relu``, counting the storages beyond
  each module's own parameters and buffers (those live anyway); the count with them is printed too;
* cold and warm first-call time of the numba path in a fresh process (cold: empty ``NUMBA_CACHE_DIR``).

Usage: ``batchnorm bench [--quick] [--out results.json] [--threads N] [--rows 'name;...'] [--shape N,C,H,W[:cl]]``.
``--shape`` times a training step on any shape you choose (repeat it for several).
Timings on a shared or busy machine are noisy; the JSON keeps every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .layers import BatchNorm


def _step(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, pre=None, post=None) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        inp = pre(x) if pre else x
        y = layer(inp)
        if post:
            y = post(y)
        y.backward(g if not pre else pre(g))

    return run


def _time(fn: Callable[[], None], number: int) -> float:
    t = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t) / number


def side_by_side(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2, budget: float = 0.05):
    """Alternate the contenders; return {name: [seconds per call, ...]} (one sample per round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    once = min(_time(fn, 1) for fn in fns.values())
    number = max(1, min(50, int(budget / max(once, 1e-6))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(_time(fn, number))
    return samples


def _train_row(shape, axis=1, channels_last=False, activation=None):
    c = shape[axis]
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    g = torch.randn_like(x)
    ours = BatchNorm(c, axis=axis, activation=activation)
    ref_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    if len(shape) not in ref_cls:
        raise SystemExit(f"batchnorm bench: torch.nn.BatchNorm*d takes 2-D to 5-D input, got shape {tuple(shape)}.")
    ref = ref_cls[len(shape)](c)  # axis=-1 inputs reach torch transposed to (N, C, ...)
    pre = (lambda t: t.transpose(1, axis)) if axis not in (1, -len(shape) + 1) else None
    post = torch.relu if activation == "relu" else None
    return {"ours": _step(ours, x, g), "torch": _step(ref, x, g, pre=pre, post=post)}


def _eval_row(shape):
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

    return {"ours": run(ours), "torch": run(ref)}


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
    return {
        "row": "forward traffic vs copy bandwidth",
        "shape": list(shape),
        "ours_GBps": achieved / 1e9,
        "copy_GBps": copy_bw / 1e9,
        "fraction": achieved / copy_bw,
        "samples": s,
    }


def saved_bytes(module: torch.nn.Module, x: torch.Tensor, post=None, exclude_state: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward of ``module``.

    ``exclude_state=True`` leaves out storages of the module's own parameters and buffers (they are
    alive whether or not a backward is pending), so only what the pending backward adds is counted.
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


_FIRST_CALL = r"""
import time, json
t0 = time.perf_counter()
import torch, batchnorm
from batchnorm.kernels import cpu  # noqa: F401  (loads/compiles nothing yet: numba compiles lazily)
t1 = time.perf_counter()
bn = batchnorm.BatchNorm(8, backend="numba")
x = torch.randn(16, 8, 12, 12, requires_grad=True)
bn(x).sum().backward()
bn.eval(); bn(x)
t2 = time.perf_counter()
bn.train(); bn(x).sum().backward()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2}))
"""


def first_call_times() -> dict:
    """Cold (empty numba cache) and warm (cache filled by the cold run) first call, each in a fresh process."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True)
            if res.returncode != 0:
                out[label] = {"error": res.stderr[-2000:]}
            else:
                out[label] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


ROWS: dict[str, Callable[[], dict]] = {
    "train (64,64,56,56)": lambda: _train_row((64, 64, 56, 56)),
    "train (64,64,56,56) channels_last": lambda: _train_row((64, 64, 56, 56), channels_last=True),
    "train (32,256,28,28)": lambda: _train_row((32, 256, 28, 28)),
    "train (128,512,7,7)": lambda: _train_row((128, 512, 7, 7)),
    "train (256,1024)": lambda: _train_row((256, 1024)),
    "train (32,512,768) axis=-1": lambda: _train_row((32, 512, 768), axis=-1),
    "train BN+ReLU fused (64,64,56,56)": lambda: _train_row((64, 64, 56, 56), activation="relu"),
    "eval forward (64,64,56,56)": lambda: _eval_row((64, 64, 56, 56)),
}
def _custom_row(spec: str) -> dict[str, Callable[[], dict]]:
    """``"N,C,H,W[:cl][:last][:relu]"`` → one training-step row (see ``--shape``)."""
    dims, *flags = spec.split(":")
    try:
        shape = tuple(int(v) for v in dims.split(","))
    except ValueError:
        raise SystemExit(f"batchnorm bench: --shape expects integers like 16,32,64,64 (optionally :cl, :last, :relu), "
                         f"got {spec!r}.") from None
    unknown = set(flags) - {"cl", "last", "relu"}
    if len(shape) < 2 or unknown or ("cl" in flags and len(shape) != 4):
        raise SystemExit(f"batchnorm bench: --shape {spec!r}: need at least 2 dims, flags from :cl (4-D only), :last, "
                         f":relu; got {sorted(unknown) or shape}.")
    axis = -1 if "last" in flags else 1
    name = f"train {tuple(shape)}" + "".join(f" {f}" for f in flags)
    return {name: lambda: _train_row(shape, axis=axis, channels_last="cl" in flags,
                                     activation="relu" if "relu" in flags else None)}


TARGETS = {
    "train (64,64,56,56)": 0.5,
    "train (64,64,56,56) channels_last": 0.5,
    "train (32,256,28,28)": 0.5,
    "train BN+ReLU fused (64,64,56,56)": 0.35,
    "eval forward (64,64,56,56)": 0.7,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="batchnorm bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repeats (CI smoke run); numbers are rough")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default 15, quick 3)")
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: as configured)")
    p.add_argument("--rows", default=None,
                   help="';'-separated substrings: only rows whose name contains one (e.g. 'eval;traffic')")
    p.add_argument("--no-first-call", action="store_true", help="skip the cold/warm subprocess measurement")
    p.add_argument("--shape", action="append", default=[], metavar="N,C,...",
                   help="add a training-step row for this input shape (repeatable); with --shape only those rows run "
                        "unless --rows is given too. Suffix ':cl' for channels-last, ':last' for axis=-1, ':relu' "
                        "for the fused BN+ReLU row, e.g. --shape 16,32,64,64:cl")
    args = p.parse_args(argv)
    rows = dict(ROWS)
    custom = {}
    for spec in args.shape:
        custom.update(_custom_row(spec))
    if custom:
        rows = {**custom, **(rows if args.rows else {})}
    repeats = args.repeats or (3 if args.quick else 15)
    if args.threads:
        torch.set_num_threads(args.threads)
        import numba

        numba.set_num_threads(args.threads)
    from .kernels import dispatch

    wanted = [w.strip() for w in args.rows.split(";") if w.strip()] if args.rows else None
    pick = (lambda name: any(w in name for w in wanted)) if wanted else (lambda name: True)
    results: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "backends": dispatch.available()},
        "repeats": repeats,
        "rows": [],
    }
    print(f"batchnorm bench: torch {torch.__version__}, {torch.get_num_threads()} threads, paths {dispatch.available()}, "
          f"{repeats} rounds, medians (ratio = ours / torch, lower is better)")
    print(f"{'row':<40}{'ours ms':>10}{'torch ms':>10}{'ratio':>8}{'target':>8}")
    for name, make in rows.items():
        if not pick(name) and name not in custom:
            continue
        s = side_by_side(make(), repeats)
        o, t = statistics.median(s["ours"]) * 1e3, statistics.median(s["torch"]) * 1e3
        target = TARGETS.get(name, 1.0)
        results["rows"].append({"row": name, "ours_ms": o, "torch_ms": t, "ratio": o / t, "target": target,
                                "met": o / t <= target, "samples_s": s})
        print(f"{name:<40}{o:>10.2f}{t:>10.2f}{o / t:>8.2f}{'≤' + str(target):>8}", flush=True)
    if custom and not args.rows:
        args.no_first_call = True
        pick = lambda name: False  # noqa: E731  (only the requested shapes)
    if pick("traffic"):
        tr = _traffic((64, 64, 56, 56), repeats)
        results["rows"].append(tr | {"target": 0.6, "met": tr["fraction"] >= 0.6})
        print(f"{'forward traffic / copy bandwidth':<40}{tr['ours_GBps']:>8.1f}GB/s{tr['copy_GBps']:>6.1f}GB/s"
              f"{tr['fraction']:>8.2f}{'≥0.6':>8}")
    if pick("saved"):
        sv = _saved_row((64, 64, 56, 56))
        results["rows"].append(sv | {"target": 0.5, "met": sv["ratio"] <= 0.5})
        print(f"{'saved bytes BN+leaky_relu memory=save':<40}{sv['ours_bytes'] / 2**20:>8.1f}MB{sv['torch_bytes'] / 2**20:>8.1f}MB"
              f"{sv['ratio']:>8.3f}{'≤0.5':>8}   (beyond parameters and buffers; "
              f"{sv['ratio_with_module_state']:.6f} counting them too)")
    if not args.no_first_call and pick("first"):
        fc = first_call_times()
        results["first_call"] = fc
        for label in ("cold", "warm"):
            r = fc[label]
            if "error" in r:
                print(f"first call ({label}): failed: {r['error'].splitlines()[-1] if r['error'] else '?'}")
            else:
                print(f"{'first call ' + label + ' (s)':<40}{r['first_call_s']:>10.2f}{'':>10}{'':>8}"
                      f"{'≤1' if label == 'warm' else '':>8}   (import {r['import_s']:.2f} s)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
