"""Experiment 8, overhead: what BN costs per training step and at inference, and what ``fold`` and a fused
activation take back.

Seed 003 lists "computational overhead during training" as a drawback of BN. This experiment times
one SGD step of a small 2-D conv net on 28×28 MNIST digits without BN, with ``torch.nn.BatchNorm2d``,
with ours, and with ours fused with its ReLU (``BatchNorm2d(C, activation="relu")``), then the
eval-mode forward before and after :func:`batchnorm.fold`.

Timing protocol: every contender runs a few warm-up steps first (JIT compilation, allocator), then
``rounds`` rounds in which the contenders take turns (the order rotates every round so none always
runs first); each turn times ``reps`` steps with ``time.perf_counter``. We report the median over
rounds of the per-step time and its ratio to the no-BN network, on one intra-op thread. Ratios are
taken within a round (the same moment's load on both), and two contenders are compared through
:func:`batchnorm.lab.stats.compare` on the per-round ratios (paired by round): a difference is stated
only when its 95 % interval excludes zero. No timing is asserted anywhere. Ours is the public layer
with ``backend="auto"``: the same dispatch users get.
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
from .core import Context, Figure, Section, Table, subplots
from .stats import compare, pm

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
    rounds = ctx.budget(12, 3)
    reps = ctx.budget(3, 1)
    kinds = {"no BN": "none", "torch.nn.BatchNorm2d": "torch", "ours (BatchNorm2d)": "ours",
             "ours fused with ReLU": "ours-fused"}
    train_r: dict[str, list[float]] = {k: [] for k in kinds}  # seconds per step, one entry per round
    infer_names = ["no BN", "torch.nn.BatchNorm2d", "ours (BatchNorm2d)", "ours, folded", "torch BN, folded",
                   "no-BN net holding the folded weights"]
    infer_r: dict[str, list[float]] = {k: [] for k in infer_names}
    fold_err: list[float] = []
    for seed in ctx.bar(ctx.seed_values(), desc=NAME):
        nets = {}
        for label, kind in kinds.items():
            ctx.manual_seed(seed)
            nets[label] = conv_net(kind)
        steps = {label: _train_step(net, x, y) for label, net in nets.items()}
        t = time_alternating(steps, rounds=rounds, reps=reps, warmup=3)
        for k, v in t.items():
            train_r[k] += v
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
            infer_r[k] += v

    ratio_t = {k: list(np.array(v) / np.array(train_r["no BN"])) for k, v in train_r.items()}
    ratio_i = {k: list(np.array(v) / np.array(infer_r["no BN"])) for k, v in infer_r.items()}
    ms = lambda v: [1e3 * a for a in v]  # noqa: E731
    t_table = Table(["network", "step time (ms), median of rounds", "ratio to no BN (per round), mean ± 95 % interval"],
                    [[k, f"{1e3 * np.median(train_r[k]):.2f}", pm(ratio_t[k], ".2f")] for k in kinds],
                    caption=f"Training step (forward + backward + SGD), batch {BATCH}: {len(ratio_t['no BN'])} rounds "
                            f"of {reps} steps ({rounds} per seed)")
    i_table = Table(["network", "forward time (ms), median of rounds", "ratio to no BN (per round), mean ± 95 % interval"],
                    [[k, f"{1e3 * np.median(infer_r[k]):.2f}", pm(ratio_i[k], ".2f")] for k in infer_names],
                    caption=f"Eval-mode forward, batch {INFER_BATCH}: {len(ratio_i['no BN'])} rounds of {reps} calls")

    fig, axes = subplots(1, 2, figsize=(11, 3.6))
    for ax, store, names, title in ((axes[0], ratio_t, list(kinds), "Training step"),
                                    (axes[1], ratio_i, infer_names, "Inference (eval mode)")):
        pos = np.arange(len(names))
        parts = ax.boxplot([store[k] for k in names], positions=pos, vert=False, widths=0.6, patch_artist=True,
                           showfliers=True)
        for patch, k in zip(parts["boxes"], names):
            patch.set_facecolor("lightgray" if k == "no BN" else "lightsteelblue")
        ax.axvline(1.0, color="k", ls=":", lw=0.8)
        ax.set_yticks(pos, names, fontsize=8)
        ax.set_xlabel("time / no-BN time in the same round")
        ax.set_title(title)
    figure = Figure(fig, "Per-round ratio of each contender's time to the no-BN network's (boxes: quartiles, whiskers "
                         "1.5 IQR, dots: outlier rounds; dotted line: no BN). One thread, contenders alternated.")

    def cmp(store, a, b):
        # pairs are rounds; a --quick run has too few rounds to be evidence, so it resolves nothing
        return compare(store[a], store[b], paired=True, names=(a, b), by="round", min_n=10**9 if ctx.quick else 2)

    c_torch = cmp(ratio_t, "torch.nn.BatchNorm2d", "no BN")
    c_ours = cmp(ratio_t, "ours (BatchNorm2d)", "no BN")
    c_vs = cmp(ratio_t, "ours (BatchNorm2d)", "torch.nn.BatchNorm2d")
    c_fused = cmp(ratio_t, "ours fused with ReLU", "ours (BatchNorm2d)")
    c_inf = cmp(ratio_i, "ours (BatchNorm2d)", "no BN")
    c_fold = cmp(ratio_i, "ours, folded", "no BN")
    c_twin = cmp(ratio_i, "ours, folded", "no-BN net holding the folded weights")
    slow = lambda c: ("resolved slower" if c.diff > 0 else "resolved faster") if c.resolved else "indistinguishable"  # noqa: E731
    answer = (
        f"Training step time relative to the no-BN net (same round): torch's BatchNorm2d {pm(ratio_t['torch.nn.BatchNorm2d'], '.2f')}×, "
        f"ours {pm(ratio_t['ours (BatchNorm2d)'], '.2f')}×, ours fused with its ReLU {pm(ratio_t['ours fused with ReLU'], '.2f')}× "
        f"(mean ± 95 % interval over {len(ratio_t['no BN'])} rounds). Against no BN: torch {slow(c_torch)}, "
        f"ours {slow(c_ours)}. Ours against torch's: {c_vs.text('.3f', higher='slower', lower='faster')}. Fusing the "
        f"ReLU: {c_fused.text('.3f', higher='slower', lower='faster')}. "
        f"At inference, eval-mode BN costs {pm(ratio_i['ours (BatchNorm2d)'], '.2f')}× the no-BN forward "
        f"({slow(c_inf)}) and after batchnorm.fold {pm(ratio_i['ours, folded'], '.2f')}× ({slow(c_fold)}; largest output "
        f"change from folding {max(fold_err):.1e}); the folded net against the no-BN architecture holding the same "
        f"weights: {slow(c_twin)}. Differences called indistinguishable are inside the "
        "round-to-round spread of this (shared) machine."
    )
    from .report import glance_answer

    # training (ours vs no BN) and deployment (folded vs no BN) decide: slower in both Yes, in one Partly
    slower = [c_ours.sign > 0, c_fold.sign > 0]
    verdict = ("Yes" if all(slower) else "Partly" if any(slower)
               else "No" if c_ours.sign < 0 and c_fold.sign <= 0 else "Not at this budget")
    finding = glance_answer(verdict, (
        f"a training step with BN takes {pm(ratio_t['torch.nn.BatchNorm2d'], '.2f')}× (torch) and "
        f"{pm(ratio_t['ours (BatchNorm2d)'], '.2f')}× (ours, {slow(c_ours)}) the no-BN step (ours vs torch: "
        f"{slow(c_vs)}); at inference BN costs {pm(ratio_i['ours (BatchNorm2d)'], '.2f')}× and the "
        f"folded net {pm(ratio_i['ours, folded'], '.2f')}× (against no BN: {slow(c_fold)})"
    ))
    return Section(
        name=NAME, title=TITLE, question=QUESTION,
        setup=(
            f"Conv net 1→{WIDTHS[0]}→{WIDTHS[1]} channels (3×3 conv, norm, ReLU, 2×2 max-pool each) → mean → Linear(10) "
            f"on MNIST digits; training step = forward + cross-entropy + backward + SGD (momentum 0.9) at batch "
            f"{BATCH}; inference = eval-mode forward of {INFER_BATCH} digits under torch.inference_mode. One intra-op "
            f"thread; 3 warm-up steps per contender, then {rounds} rounds per seed in which contenders take turns "
            f"(rotating order); ratios are taken within a round. {len(ctx.seed_values())} seed(s). The machine is shared: absolute times are "
            "inflated, ratios are what to read."
        ),
        answer=answer, finding=finding, tables=[t_table, i_table], figures=[figure],
        results={"train_ms": {k: float(np.median(ms(v))) for k, v in train_r.items()},
                 "train_ratio_per_round": ratio_t,
                 "train_ratio": {k: float(np.mean(v)) for k, v in ratio_t.items()},
                 "infer_ms": {k: float(np.median(ms(v))) for k, v in infer_r.items()},
                 "infer_ratio_per_round": ratio_i,
                 "infer_ratio": {k: float(np.mean(v)) for k, v in ratio_i.items()},
                 "ours_vs_torch_train": [c_vs.diff, c_vs.half, c_vs.resolved],
                 "fold_max_abs_error": max(fold_err)},
        notes=["Ours is the public layer with backend 'auto': the dispatcher picks the kernel, as it does for users."],
    )
