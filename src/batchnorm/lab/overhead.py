"""Experiment 8, overhead: what BN costs per training step and at inference, and what ``fold`` and a fused
activation take back.

Seed 003 lists "computational overhead during training" as a drawback of BN. This experiment times
one SGD step of a small 2-D conv net on 28×28 MNIST digits without BN, with ``torch.nn.BatchNorm2d``,
with ours, and with ours fused with its ReLU (``BatchNorm2d(C, activation="relu")``), then the
eval-mode forward before and after :func:`batchnorm.fold`.

Timing protocol: every contender runs a few warm-up steps first (JIT compilation, allocator), then
``rounds`` rounds in which the contenders take turns (the order rotates every round so none always
runs first); each turn times ``reps`` steps with ``time.perf_counter``. We report the median over
rounds of the per-step time and its ratio to the no-BN network, on one intra-op thread. No timing
is asserted anywhere: a busy machine shifts the numbers, the medians and alternation only make the
comparison fair.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..layers.base import BatchNorm2d
from ..tools.fold import fold
from . import data
from .core import Context, Figure, Section, Table, fmt, subplots

NAME = "overhead"
TITLE = "8. Overhead: training-step and inference time with and without BN"
QUESTION = "How much does BN slow a training step and inference, and do folding and fusing remove the cost?"

BATCH = 64
INFER_BATCH = 256
WIDTHS = (16, 32)


def conv_net(norm: str, widths: tuple[int, ...] = WIDTHS) -> nn.Module:
    """``[Conv2d 3×3 → norm → ReLU → MaxPool 2] × len(widths) → global mean → Linear(10)``.

    ``norm``: ``"none"`` (conv keeps its bias), ``"torch"`` (``nn.BatchNorm2d``), ``"ours"``
    (:class:`batchnorm.BatchNorm2d`) or ``"ours-fused"`` (``BatchNorm2d(C, activation="relu")``, no
    separate ReLU). Shape: ``(N, 1, 28, 28)`` → ``(N, 10)``.
    Example: ``conv_net("ours")(torch.randn(2, 1, 28, 28)).shape == (2, 10)``.
    """
    layers: list[nn.Module] = []
    c = 1
    for w in widths:
        layers.append(nn.Conv2d(c, w, 3, padding=1, bias=norm == "none"))
        if norm == "torch":
            layers += [nn.BatchNorm2d(w), nn.ReLU()]
        elif norm == "ours":
            layers += [BatchNorm2d(w), nn.ReLU()]
        elif norm == "ours-fused":
            layers.append(BatchNorm2d(w, activation="relu"))
        elif norm == "none":
            layers.append(nn.ReLU())
        else:
            raise ValueError(f"conv_net expected norm in 'none', 'torch', 'ours', 'ours-fused', got {norm!r}.")
        layers.append(nn.MaxPool2d(2))
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def time_alternating(fns: dict[str, Callable[[], object]], *, rounds: int, reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function: warm-up, then ``rounds`` rounds of ``reps`` calls per contender.

    Contenders take turns inside a round and the order rotates by one each round. Returns
    ``{name: [seconds per call in round r]}``. Example::

        >>> t = time_alternating({"a": lambda: None, "b": lambda: None}, rounds=3, reps=2, warmup=1)
        >>> sorted(t), len(t["a"])
        (['a', 'b'], 3)
    """
    if rounds < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"time_alternating expected rounds >= 1, reps >= 1, warmup >= 0, got {rounds}, {reps}, {warmup}.")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            out[name].append((time.perf_counter() - start) / reps)
    return out


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _infer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    return forward


def run(ctx: Context) -> Section:
    x_all, y_all, _, _ = data.mnist_digits()
    x = x_all[:BATCH].reshape(-1, 1, 28, 28).contiguous()
    y = y_all[:BATCH]
    xi = x_all[:INFER_BATCH].reshape(-1, 1, 28, 28).contiguous()
    rounds = ctx.budget(9, 5)
    reps = ctx.budget(3, 2)
    kinds = {"no BN": "none", "torch.nn.BatchNorm2d": "torch", "ours (BatchNorm2d)": "ours",
             "ours fused with ReLU": "ours-fused"}
    train_s: dict[str, list[float]] = {k: [] for k in kinds}
    infer_names = ["no BN", "torch.nn.BatchNorm2d", "ours (BatchNorm2d)", "ours, folded", "torch BN, folded",
                   "no-BN net holding the folded weights"]
    infer_s: dict[str, list[float]] = {k: [] for k in infer_names}
    fold_err: list[float] = []
    for seed in ctx.bar(ctx.seed_values(), desc=NAME):
        nets = {}
        for label, kind in kinds.items():
            ctx.manual_seed(seed)
            nets[label] = conv_net(kind)
        steps = {label: _train_step(net, x, y) for label, net in nets.items()}
        t = time_alternating(steps, rounds=rounds, reps=reps, warmup=3)
        for k, v in t.items():
            train_s[k].append(float(np.median(v)))
        # inference: the trained-a-little nets (running statistics are not the initial ones)
        ours, theirs = nets["ours (BatchNorm2d)"].eval(), nets["torch.nn.BatchNorm2d"].eval()
        folded, folded_torch = fold(ours), fold(theirs)
        # the folded net is the no-BN architecture; a copy of it with the folded weights separates
        # structure from weight values (conv/ReLU/pool speed on CPU depends a little on the values)
        twin = conv_net("none")
        with torch.no_grad():
            for p, q in zip(twin.parameters(), folded.parameters(), strict=True):
                p.copy_(q)
        with torch.inference_mode():
            fold_err.append(float((folded(xi) - ours(xi)).abs().max()))
        fns = {"no BN": _infer(nets["no BN"], xi), "torch.nn.BatchNorm2d": _infer(theirs, xi),
               "ours (BatchNorm2d)": _infer(ours, xi), "ours, folded": _infer(folded, xi),
               "torch BN, folded": _infer(folded_torch, xi), "no-BN net holding the folded weights": _infer(twin, xi)}
        t = time_alternating(fns, rounds=rounds, reps=reps, warmup=2)
        for k, v in t.items():
            infer_s[k].append(float(np.median(v)))

    base_t, base_i = np.array(train_s["no BN"]), np.array(infer_s["no BN"])
    ratio_t = {k: list(np.array(v) / base_t) for k, v in train_s.items()}
    ratio_i = {k: list(np.array(v) / base_i) for k, v in infer_s.items()}
    ms = lambda v: [1e3 * a for a in v]  # noqa: E731
    t_table = Table(["network", "step time (ms)", "ratio to no BN"],
                    [[k, fmt(ms(train_s[k]), 2), fmt(ratio_t[k], 2)] for k in kinds],
                    caption=f"Training step (forward + backward + SGD), batch {BATCH}, median over {rounds} rounds "
                            f"of {reps} steps; mean ± std over seeds")
    i_table = Table(["network", "forward time (ms)", "ratio to no BN"],
                    [[k, fmt(ms(infer_s[k]), 2), fmt(ratio_i[k], 2)] for k in infer_names],
                    caption=f"Eval-mode forward, batch {INFER_BATCH}, median over {rounds} rounds of {reps} calls")

    fig, axes = subplots(1, 2, figsize=(10, 3.4))
    for ax, store, names, title in ((axes[0], ratio_t, list(kinds), "Training step"),
                                    (axes[1], ratio_i, infer_names, "Inference (eval mode)")):
        means = [np.mean(store[k]) for k in names]
        stds = [np.std(store[k]) for k in names]
        pos = np.arange(len(names))
        ax.barh(pos, means, xerr=stds, color=["gray"] + ["tab:blue"] * (len(names) - 1), label="time / no-BN time")
        ax.axvline(1.0, color="k", ls=":", label="no BN")
        ax.set_yticks(pos, names, fontsize=8)
        ax.set_xlabel("time relative to the network without BN")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower right")
    figure = Figure(fig, "Median step / forward time divided by the no-BN network's, mean ± std over seeds "
                         "(one thread, contenders alternated).")

    mean = lambda d, k: float(np.mean(d[k]))  # noqa: E731
    r_torch, r_ours, r_fused = (mean(ratio_t, k) for k in ("torch.nn.BatchNorm2d", "ours (BatchNorm2d)",
                                                           "ours fused with ReLU"))
    i_ours, i_fold = mean(ratio_i, "ours (BatchNorm2d)"), mean(ratio_i, "ours, folded")
    i_twin = mean(ratio_i, "no-BN net holding the folded weights")
    answer = (
        f"BN makes this training step {r_torch:.2f}× as long as without it with torch's BatchNorm2d and "
        f"{r_ours:.2f}× with ours ({r_fused:.2f}× fused with its ReLU). "
        + (f"So BN adds {100 * (min(r_torch, r_ours) - 1):.0f}–{100 * (max(r_torch, r_ours) - 1):.0f}% to the step: "
           + ("measurable, but the convolutions still dominate; " if max(r_torch, r_ours) < 1.5
              else "on this thin net (16 and 32 channels) normalization is a large share of the work; ")
           + ("fusing the ReLU saves a little. " if r_fused < r_ours else "fusing the ReLU does not help here. "))
        + f"At inference, eval-mode BN costs {i_ours:.2f}× the no-BN forward and after batchnorm.fold "
        f"{i_fold:.2f}× (largest output change from folding {max(fold_err):.1e}): "
        + (f"folding removes the inference cost (within {100 * abs(i_fold - 1):.0f}% of the no-BN net)."
           if i_fold < 1.05 else
           f"folding leaves {100 * (i_fold - 1):.0f}% above the no-BN forward on this run, and the no-BN architecture "
           f"holding the folded weights runs at {i_twin:.2f}×: "
           + ("the residue comes from the weight values, not from BN (the folded net has no BN layer left)."
              if abs(i_twin - i_fold) < 0.05 else "the residue is not explained by the weight values on this run."))
    )
    return Section(
        name=NAME, title=TITLE, question=QUESTION,
        setup=(
            f"Conv net 1→{WIDTHS[0]}→{WIDTHS[1]} channels (3×3 conv, norm, ReLU, 2×2 max-pool each) → mean → Linear(10) "
            f"on MNIST digits; training step = forward + cross-entropy + backward + SGD (momentum 0.9) at batch "
            f"{BATCH}; inference = eval-mode forward of {INFER_BATCH} digits under torch.inference_mode. One intra-op "
            "thread; 3 warm-up steps per contender, then rounds in which contenders take turns (rotating order); "
            f"median per contender. {len(ctx.seed_values())} seed(s). The machine is shared: absolute times are "
            "inflated, ratios are what to read."
        ),
        answer=answer, tables=[t_table, i_table], figures=[figure],
        results={"train_ms": {k: float(np.mean(ms(v))) for k, v in train_s.items()},
                 "train_ratio": {k: float(np.mean(v)) for k, v in ratio_t.items()},
                 "infer_ms": {k: float(np.mean(ms(v))) for k, v in infer_s.items()},
                 "infer_ratio": {k: float(np.mean(v)) for k, v in ratio_i.items()},
                 "fold_max_abs_error": max(fold_err)},
        notes=["Ours runs the numba CPU kernels where the dispatcher picks them (backend 'auto')."],
    )
