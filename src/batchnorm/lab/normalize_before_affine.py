"""Experiment 2: why normalize before the affine map γx + β? (seed 001)

At inference a trained BN layer is the affine map ``a·x + b`` (``a = γ/sqrt(σ²_run + ε)``), the same
form as :class:`~batchnorm.AffineOnly`. The experiment shows that the *training* is not the same:

1. **Learning-rate sweep.** An 8×128 ReLU MLP and a 3-layer 1-D CNN on MNIST-1D, with BatchNorm,
   AffineOnly, BN without affine, nothing (PyTorch's default init) and nothing with He init, trained
   with plain SGD at rates 0.01…3: final training loss, test accuracy, divergence.
2. **Signal at initialization.** Standard deviation of each hidden layer's pre-activation.
3. **Scale invariance.** With BN after a linear layer, ``BN((kW)x) = BN(Wx)``: outputs don't change when
   W is scaled by k, the gradient scales as 1/k and is orthogonal to W (``⟨W, ∇W⟩ = 0``). Measured
   for BN and AffineOnly.
4. **Effective learning rate.** During training at a large rate, ``‖W‖`` and the relative step
   ``‖ΔW‖/‖W‖`` of a hidden layer: BN's weights grow, which shrinks the effective step (lr/‖W‖²).
5. **Same function, different training.** A trained BN net is converted into the AffineOnly net that
   computes exactly its eval-mode function; both continue training on the same batches.

Reference: Ioffe & Szegedy (2015), Section 3.3 (scale invariance, "BN(Wu) = BN((aW)u)");
van Laarhoven, "L2 Regularization versus Batch and Weight Normalization" (2017); Arora, Li & Lyu,
"Theoretical Analysis of Auto Rate-Tuning by Batch Normalization" (ICLR 2019); Bjorck et al.,
"Understanding Batch Normalization" (NeurIPS 2018).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from .. import functional as F
from ..layers import AffineOnly
from . import data, models, train
from .core import Context, Figure, Section, Table, fmt, mean_std, num, subplots
from .stats import compare, pm

NAME = "why-normalize-before-affine"
TITLE = "2. Why normalize before the affine map γx + β?"
QUESTION = (
    "If the learnable γ, β could learn any scale and shift, why does BatchNorm standardize first instead of "
    "learning γx + β directly, given that the folded inference map has exactly that form?"
)

#: key, label, norm name for the model factory, He init of the linear/conv weights
NORMS = [
    ("bn", "BatchNorm", "bn", False),
    ("affine", "AffineOnly γx+β", "affine", False),
    ("affine-he", "AffineOnly γx+β, He init", "affine", True),
    ("bn-noaffine", "BN without γ, β", "bn-noaffine", False),
    ("none", "nothing (default init)", "none", False),
    ("none-he", "nothing (He init)", "none", True),
]
#: what each row of the sweep controls for (shown as a table in the report)
CONTROLS = {
    "bn": "the method itself: standardize with batch statistics, then γx̂ + β",
    "affine": "γx + β with the same (default) initialization as BN's linear layers: is the learnable affine map enough?",
    "affine-he": "γx + β with He initialization, so the signal does not shrink with depth at the start: separates "
                 "'no normalization' from 'bad initialization'",
    "bn-noaffine": "standardization without γ, β: whether the learnable scale and shift matter",
    "none": "no normalization, default initialization (the baseline every row changes one thing from)",
    "none-he": "no normalization with He initialization: what a good initialization alone buys",
}
ARCHS = ("MLP 8×128", "CNN 3×32")
PROBE_LAYER = 3  # the hidden layer whose weights are scaled / tracked
CHANCE = 0.1  # ten balanced classes
GOOD_FRACTION = 0.75  # a rate "trains well" when accuracy closes this much of the chance-to-best gap


def _he_init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)) and m is not getattr(model, "head", None):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _build(arch: str, norm: str, he: bool) -> nn.Module:
    if arch == ARCHS[0]:
        model = models.MLP(40, [128] * 8, 10, norm=norm, act="relu")
    else:
        model = models.CNN1d(1, 10, width=32, depth=3, norm=norm, act="relu")
    return _he_init(model) if he else model


def _mlp_weight(model: nn.Module, layer: int = PROBE_LAYER) -> nn.Parameter:
    return model.blocks[layer][0].weight


@torch.no_grad()
def _layer_stds(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Std of each hidden block's pre-activation (input of the ReLU) on batch x, in train mode."""
    stds: list[float] = []
    hooks = [blk[2].register_forward_hook(lambda m, i, o: stds.append(float(i[0].std()))) for blk in model.blocks]
    model.train()
    state = copy.deepcopy(model.state_dict())
    model(x)
    model.load_state_dict(state)  # keep running statistics untouched
    for h in hooks:
        h.remove()
    return stds


def _scale_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ks: list[float]) -> dict[str, list[float]]:
    """Scale the probe layer's weight by k: relative output change, gradient-norm ratio, and cos(W, ∇W)."""
    model.train()
    w = _mlp_weight(model)
    w0 = w.detach().clone()
    state = copy.deepcopy(model.state_dict())

    def out_and_grad(k: float) -> tuple[torch.Tensor, torch.Tensor]:
        model.load_state_dict(state)
        with torch.no_grad():
            w.copy_(w0 * k)
        model.zero_grad(set_to_none=True)
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        return out.detach(), w.grad.detach().clone()

    out1, g1 = out_and_grad(1.0)
    cos = float((w0 * g1).sum() / (w0.norm() * g1.norm()).clamp_min(1e-30))
    change, ratio = [], []
    for k in ks:
        out, g = out_and_grad(k)
        change.append(float((out - out1).norm() / out1.norm()))
        ratio.append(float(g.norm() / g1.norm().clamp_min(1e-30)))
    model.load_state_dict(state)
    return {"output_change": change, "grad_ratio": ratio, "cos_w_grad": [abs(cos)]}


def _dynamics(model: nn.Module, data_xy, ctx: Context, lr: float, steps: int, seed: int) -> dict[str, list[float]]:
    """Track ‖W‖ and the relative step ‖ΔW‖/‖W‖ of the probe layer while training at rate lr."""
    w = _mlp_weight(model)
    norms, rel = [float(w.detach().norm())], []
    prev = [w.detach().clone()]

    def on_step(step: int, m: nn.Module, loss: torch.Tensor) -> None:
        cur = w.detach()
        rel.append(float((cur - prev[0]).norm() / prev[0].norm().clamp_min(1e-30)))
        norms.append(float(cur.norm()))
        prev[0] = cur.clone()

    hist = train.fit(model, data_xy, ctx=ctx.quiet(), lr=lr, seed=seed, steps=steps, batch_size=64,
                     optimizer="sgd-plain", on_step=on_step, final_train_eval=False)
    return {"weight_norm": norms, "relative_step": rel, "loss": hist.losses,
            "diverged_at": [hist.diverged_at if hist.diverged else math.nan]}


def _as_affine(model: nn.Module) -> nn.Module:
    """The AffineOnly network computing exactly ``model.eval()``'s function (BN → a·x + b)."""
    twin = copy.deepcopy(model).eval()
    for blk in twin.blocks:
        bn = blk[1]
        a, b = F.eval_scale_shift(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        aff = AffineOnly(bn.num_features)
        with torch.no_grad():
            aff.weight.copy_(a.flatten())
            aff.bias.copy_(b.flatten())
        blk[1] = aff
    return twin


def run(ctx: Context) -> Section:
    steps = ctx.budget(200, 20)  # the learning-rate sweep
    probe_steps = ctx.budget(150, 20)  # the mechanism probes (weight norms, continuation)
    lrs = [0.01, 0.1, 0.3, 1.0, 3.0] if not ctx.quick else [0.1, 1.0]
    dyn_lr = 1.0
    cont_lrs = [0.1, 1.0]
    seeds = ctx.seed_values()
    x, y, xt, yt = data.mnist1d()
    probe_x, probe_y = x[:256], y[:256]
    ks = [0.5, 2.0, 10.0]

    acc = {a: {k: {lr: [] for lr in lrs} for k, *_ in NORMS} for a in ARCHS}
    tloss = {a: {k: {lr: [] for lr in lrs} for k, *_ in NORMS} for a in ARCHS}
    stds = {k: [] for k, *_ in NORMS}
    probes = {k: [] for k in ("bn", "affine")}
    dyn: dict = {k: [] for k in ("bn", "affine", "none-he")}
    cont: dict = {lr: {"bn": [], "affine-twin": []} for lr in cont_lrs}
    twin_err: list[float] = []

    total = len(ARCHS) * len(NORMS) * len(lrs) * len(seeds)
    with ctx.bar(total=total, desc=NAME) as bar:
        for seed in seeds:
            for arch in ARCHS:
                for key, _label, norm, he in NORMS:
                    for lr in lrs:
                        bar.set_postfix_str(f"{arch} {key} lr={lr}")
                        model = train.seeded(ctx, seed, lambda a=arch, n=norm, h=he: _build(a, n, h))
                        hist = train.fit(model, (x, y), ctx=ctx.quiet(), lr=lr, seed=seed, steps=steps,
                                         batch_size=64, optimizer="sgd-plain", eval_data=(xt, yt))
                        acc[arch][key][lr].append(math.nan if hist.diverged else hist.final_test_acc)
                        tloss[arch][key][lr].append(math.nan if hist.diverged else hist.final_train_loss)
                        bar.update()
            # mechanisms, on the MLP
            for key, _label, norm, he in NORMS:
                model = train.seeded(ctx, seed, lambda n=norm, h=he: _build(ARCHS[0], n, h))
                stds[key].append(_layer_stds(model, probe_x))
                if key in probes:
                    probes[key].append(_scale_probe(model, probe_x, probe_y, ks))
                if key in dyn:
                    dyn[key].append(_dynamics(model, (x, y), ctx, dyn_lr, probe_steps, seed))
            base = train.seeded(ctx, seed, lambda: _build(ARCHS[0], "bn", False))
            train.fit(base, (x, y), ctx=ctx.quiet(), lr=0.1, seed=seed, steps=probe_steps, optimizer="sgd-plain",
                      final_train_eval=False)
            base.eval()
            twin = _as_affine(base)
            with torch.no_grad():
                twin_err.append(float((twin(xt) - base(xt)).abs().max() / base(xt).abs().max()))
            for lr in cont_lrs:
                for name, m in (("bn", copy.deepcopy(base)), ("affine-twin", copy.deepcopy(twin))):
                    h = train.fit(m, (x, y), ctx=ctx.quiet(), lr=lr, seed=seed + 1000, steps=probe_steps,
                                  optimizer="sgd-plain", eval_data=(xt, yt))
                    cont[lr][name].append({"losses": h.losses, "train_loss": math.nan if h.diverged else h.final_train_loss,
                                           "test_acc": math.nan if h.diverged else h.final_test_acc,
                                           "diverged": h.diverged})

    labels = {k: lbl for k, lbl, *_ in NORMS}

    def cell(vals: list[float], digits: int = 3) -> str:
        ok = [v for v in vals if not math.isnan(v)]
        if not ok:
            return "diverged"
        return fmt(ok, digits) + (f" ({len(vals) - len(ok)} div.)" if len(ok) < len(vals) else "")

    def good_rates(arch: str, key: str) -> list[float]:
        # "trains well": no seed diverged and the mean test accuracy closes at least 75% of the gap between
        # chance (0.1) and the best mean accuracy any configuration reached on this architecture
        best = max((np.nanmean(acc[arch][k][lr]) for k, *_ in NORMS for lr in lrs
                    if not all(map(math.isnan, acc[arch][k][lr]))), default=math.nan)
        bar_ = CHANCE + GOOD_FRACTION * (best - CHANCE)
        return [lr for lr in lrs if not any(map(math.isnan, acc[arch][key][lr])) and np.mean(acc[arch][key][lr]) >= bar_]

    def best_rate(arch: str, key: str) -> float | None:
        # the rate with the lowest mean final TRAINING loss (the test set never chooses)
        scored = [(float(np.nanmean(tloss[arch][key][lr])), lr) for lr in lrs
                  if not all(map(math.isnan, tloss[arch][key][lr]))]
        return min(scored)[1] if scored else None

    tables, results = [], {"lrs": lrs, "steps": steps, "sweep": {}, "best": {}, "n_seeds": len(seeds)}
    tables.append(Table(["row", "what it controls for"], [[lbl, CONTROLS[k]] for k, lbl, *_ in NORMS],
                        "The configurations of the learning-rate sweep"))
    for arch in ARCHS:
        rows = []
        for key, label, *_ in NORMS:
            g = good_rates(arch, key)
            rows.append([label] + [cell(acc[arch][key][lr]) for lr in lrs]
                        + [", ".join(f"{r:g}" for r in g) if g else "none"])
            results["sweep"].setdefault(arch, {})[key] = {
                "test_acc": {str(lr): acc[arch][key][lr] for lr in lrs},
                "train_loss": {str(lr): tloss[arch][key][lr] for lr in lrs},
                "good_rates": g,
            }
        tables.append(Table(["normalization"] + [f"lr={lr:g}" for lr in lrs] + ["rates that train well*"],
                            rows, f"{arch} on MNIST-1D: test accuracy after {steps} plain-SGD steps (batch 64). *No seed "
                            f"diverged and the accuracy closes ≥ {GOOD_FRACTION:.0%} of the gap from chance to the best "
                            "configuration's accuracy."))
        best_rows = []
        for key, *_ in NORMS:
            blr = best_rate(arch, key)
            vals = acc[arch][key][blr] if blr is not None else [math.nan] * len(seeds)
            results["best"].setdefault(arch, {})[key] = {"lr": blr, "test_acc": vals}
        for key, label, *_ in NORMS:
            b = results["best"][arch][key]
            c = compare(results["best"][arch]["bn"]["test_acc"], b["test_acc"], paired=True,
                        names=("BatchNorm", label))
            results["best"][arch][key]["bn_minus_this"] = [c.diff, c.half, c.resolved]
            best_rows.append([label, "-" if b["lr"] is None else f"{b['lr']:g}", pm(b["test_acc"], ".3f"),
                              "" if key == "bn" else (f"{c.diff:+.3f} ± {c.half:.3f}" if c.informative else f"{c.diff:+.3f}")
                              + ("" if key == "bn" or c.resolved else " (n.s.)")])
        tables.append(Table(["normalization", "best lr (lowest train loss)", "test acc at it (± 95 % interval)",
                             "BatchNorm − this (paired by seed)"], best_rows,
                            f"{arch}: each configuration at its own best learning rate; n.s. = indistinguishable at "
                            "this budget"))
        rows = [[label] + [cell(tloss[arch][key][lr]) for lr in lrs] for key, label, *_ in NORMS]
        tables.append(Table(["normalization"] + [f"lr={lr:g}" for lr in lrs], rows,
                            f"{arch}: final training loss (eval mode, whole training set; chance = ln 10 = 2.303)."))

    rows = []
    for key in probes:
        p = probes[key]
        rows.append([labels[key]]
                    + [fmt([q["output_change"][i] for q in p], 4) for i in range(len(ks))]
                    + [fmt([q["grad_ratio"][i] for q in p], 3) for i in range(len(ks))]
                    + [f"{max(q['cos_w_grad'][0] for q in p):.1e}"])
    results["scale_probe"] = {k: {"ks": ks, "output_change": [mean_std([q["output_change"][i] for q in v]) for i in range(len(ks))],
                                  "grad_ratio": [mean_std([q["grad_ratio"][i] for q in v]) for i in range(len(ks))],
                                  "cos_w_grad_max": max(q["cos_w_grad"][0] for q in v)} for k, v in probes.items()}
    tables.append(Table(
        ["layer type"] + [f"output change, W×{k:g}" for k in ks] + [f"‖∇W‖ ratio, W×{k:g}" for k in ks]
        + ["|cos(W, ∇W)| (max)"], rows,
        f"Scaling hidden layer {PROBE_LAYER + 1}'s weight W of the initialized MLP by k (train mode, batch of 256): "
        "relative change of the logits, gradient norm relative to k=1, and alignment of W with its gradient."))

    rows = []
    for key, runs in dyn.items():
        div = [r["diverged_at"][0] for r in runs]
        growth = [r["weight_norm"][-1] / r["weight_norm"][0] for r in runs]
        late = [float(np.mean(r["relative_step"][-max(1, len(r["relative_step"]) // 5):])) if r["relative_step"] else math.nan
                for r in runs]
        early = [float(np.mean(r["relative_step"][:5])) if r["relative_step"] else math.nan for r in runs]
        rows.append([labels[key], cell(early, 4), cell(late, 4), cell(growth), sum(not math.isnan(d) for d in div)])
        results.setdefault("dynamics", {})[key] = {"early_rel_step": early, "late_rel_step": late, "weight_growth": growth,
                                                   "diverged": sum(not math.isnan(d) for d in div)}
    tables.append(Table(["MLP", "‖ΔW‖/‖W‖, first 5 steps", "‖ΔW‖/‖W‖, last 20% of steps", "‖W_end‖/‖W_0‖", "runs diverged"],
                        rows, f"Hidden layer {PROBE_LAYER + 1} while training at lr={dyn_lr:g} for {steps} steps."))

    rows = []
    for lr in cont_lrs:
        for name, label in (("bn", "BN net, continues in train mode"), ("affine-twin", "its AffineOnly twin")):
            r = cont[lr][name]
            rows.append([f"{lr:g}", label, cell([q["train_loss"] for q in r]), cell([q["test_acc"] for q in r]),
                         sum(q["diverged"] for q in r)])
            results.setdefault("continuation", {}).setdefault(str(lr), {})[name] = {
                "train_loss": [q["train_loss"] for q in r], "test_acc": [q["test_acc"] for q in r],
                "diverged": sum(q["diverged"] for q in r)}
    results["twin_max_rel_err"] = max(twin_err)
    results["init_std"] = {k: np.mean(v, axis=0).tolist() for k, v in stds.items()}
    tables.append(Table(["lr", "network", "final train loss", "test acc", "runs diverged"], rows,
                        f"A BN MLP trained {steps} steps at lr 0.1, then converted to the AffineOnly network with the "
                        f"same eval-mode function (max relative output difference {max(twin_err):.1e}); both train "
                        f"{steps} more steps on the same batches."))

    figs = _figures(acc, lrs, stds, dyn, cont, cont_lrs, labels, dyn_lr, steps)
    finding = _finding(results, labels, len(lrs))
    setup = (
        f"MNIST-1D (4000 train / 1000 test). {ARCHS[0]}: 8 hidden ReLU layers of 128; {ARCHS[1]}: three Conv1d "
        f"(kernel 5, 32 channels) + mean pool. Normalization after every linear/conv layer: {', '.join(labels.values())}. "
        f"Plain SGD (no momentum), batch 64, {steps} steps, learning rates {lrs}; seeds {seeds}. A run whose loss "
        "became non-finite or exceeded 1e3 is 'diverged'. He init: kaiming-normal hidden weights (fan-in, ReLU gain), "
        f"zero biases. Mechanism probes use the MLP ({probe_steps} steps)."
    )
    return Section(NAME, TITLE, QUESTION, setup, _answer(results, lrs, ks, labels), tables=tables, figures=figs,
                   results=results, finding=finding)


def _finding(results: dict, labels: dict[str, str], n_lrs: int) -> str:
    """First-page answer to "could γx + β alone do BN's job?" (:func:`batchnorm.lab.report.glance_answer`).

    Verdict: ``Partly`` if γx + β with He init is resolved more accurate than BN on some architecture; else ``No`` if
    BN trains well at more learning rates on every architecture or is resolved more accurate on one; else
    ``Not at this budget``.
    """
    from .report import glance_answer

    bits, signs, more_rates = [], [], []
    for arch, best in results["best"].items():
        sweep = results["sweep"][arch]
        c = compare(best["bn"]["test_acc"], best["affine-he"]["test_acc"], paired=True,
                    names=("BN", "γx + β (He init)"))
        signs.append(c.sign)
        n_bn, n_he = len(sweep["bn"]["good_rates"]), len(sweep["affine-he"]["good_rates"])
        more_rates.append(n_bn > n_he)
        bits.append(f"{arch}: BN trains well at {n_bn} of {n_lrs} rates, γx + β alone at "
                    f"{len(sweep['affine']['good_rates'])} ({n_he} with He init), and at each one's best rate reaches "
                    f"test accuracy {pm(best['bn']['test_acc'], '.2f')} vs {pm(best['affine-he']['test_acc'], '.2f')} "
                    f"({c.verdict()})")
    if any(sg < 0 for sg in signs):
        verdict = "Partly"
    elif (more_rates and all(more_rates)) or any(sg > 0 for sg in signs):
        verdict = "No"
    else:
        verdict = "Not at this budget"
    return glance_answer(verdict, "; ".join(bits))


def _figures(acc, lrs, stds, dyn, cont, cont_lrs, labels, dyn_lr, steps) -> list[Figure]:
    figs = []
    fig, axes = subplots(1, 2, figsize=(11, 3.8))
    for ax, arch in zip(axes, ARCHS):
        for (key, label, *_), mk in zip(NORMS, "os^dvP"):
            m = [np.nanmean(v) if not all(map(math.isnan, v)) else math.nan for v in (acc[arch][key][lr] for lr in lrs)]
            s = [np.nanstd(v) if not all(map(math.isnan, v)) else 0.0 for v in (acc[arch][key][lr] for lr in lrs)]
            line = ax.errorbar(lrs, m, yerr=s, marker=mk, capsize=3, label=label)
            div = [lr for lr in lrs if any(map(math.isnan, acc[arch][key][lr]))]
            if div:
                ax.scatter(div, [0.02] * len(div), marker="x", s=60, color=line[0].get_color())
        ax.axhline(0.1, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("learning rate (plain SGD)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{arch}, {steps} steps")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    figs.append(Figure(fig, "Test accuracy against learning rate (mean ± std over seeds); × at the bottom marks a rate "
                            "where a run diverged; dotted line: chance."))

    fig, ax = subplots(figsize=(7.5, 3.6))
    for (key, values), mk, ls in zip(stds.items(), "os^dvP", ("-", "--", ":", "-.", "-", "--")):
        arr = np.asarray(values)
        ax.errorbar(range(1, arr.shape[1] + 1), arr.mean(0), yerr=arr.std(0), marker=mk, ls=ls, capsize=2,
                    label=labels[key])
    ax.set_yscale("log")
    ax.set_xlabel("hidden layer")
    ax.set_ylabel("std of pre-activation (ReLU input)")
    ax.set_title("Signal through the 8×128 MLP at initialization")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figs.append(Figure(fig, "How the scale of the signal changes with depth at initialization (batch of 256; the two "
                            "BN curves lie on top of each other at 1)."))

    fig, axes = subplots(1, 2, figsize=(11, 3.6))
    for key, runs in dyn.items():
        n = min(len(r["weight_norm"]) for r in runs)
        wn = np.mean([np.asarray(r["weight_norm"][:n]) / r["weight_norm"][0] for r in runs], axis=0)
        axes[0].plot(range(n), wn, label=labels[key])
        n = min(len(r["relative_step"]) for r in runs)
        if n:
            rs = np.mean([r["relative_step"][:n] for r in runs], axis=0)
            axes[1].plot(range(1, n + 1), rs, label=labels[key])
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("‖W‖ / ‖W₀‖")
    axes[0].set_title(f"Weight norm of hidden layer {PROBE_LAYER + 1}, lr={dyn_lr:g}")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("‖ΔW‖ / ‖W‖ (effective step)")
    axes[1].set_yscale("log")
    axes[1].set_title("Relative update size")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    figs.append(Figure(fig, "With BN the hidden weights grow and their relative update shrinks: the effective "
                            "learning rate lr/‖W‖² tunes itself (mean over seeds; a curve that stops diverged)."))

    fig, axes = subplots(1, len(cont_lrs), figsize=(11, 3.6))
    for ax, lr in zip(np.atleast_1d(axes), cont_lrs):
        for name, label in (("bn", "BN net (train mode)"), ("affine-twin", "AffineOnly twin (same function)")):
            runs = cont[lr][name]
            n = min(len(r["losses"]) for r in runs)
            if n:
                ax.plot(range(1, n + 1), np.mean([r["losses"][:n] for r in runs], axis=0), label=label)
        ax.set_yscale("log")
        ax.set_xlabel("step after conversion")
        ax.set_ylabel("training batch loss")
        ax.set_title(f"Continue training at lr={lr:g}")
    fig.legend(*np.atleast_1d(axes)[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    figs.append(Figure(fig, "Two networks with the same eval-mode function train differently: the BN net renormalizes "
                            "every step, its affine twin does not (mean over seeds; a curve that stops diverged)."))
    return figs


def _answer(results: dict, lrs: list[float], ks: list[float], labels: dict[str, str]) -> str:
    parts = []
    for arch, res in results["sweep"].items():
        desc = []
        for key in ("bn", "bn-noaffine", "affine", "affine-he", "none", "none-he"):
            g = res[key]["good_rates"]
            desc.append(f"{labels[key]}: {'rates ' + ', '.join(f'{r:g}' for r in g) if g else 'no rate'}")
        parts.append(f"{arch} — learning rates at which each configuration trains well (no divergence, accuracy "
                     f"closing ≥ {GOOD_FRACTION:.0%} of the chance-to-best gap): " + "; ".join(desc) + ".")
        div = [f"{labels[k]} first at lr={min(lr for lr in lrs if any(v is None or math.isnan(v) for v in res[k]['test_acc'][str(lr)])):g}"
               for k in res if any(any(v is None or math.isnan(v) for v in res[k]["test_acc"][str(lr)]) for lr in lrs)]
        parts[-1] += (" Divergence: " + "; ".join(div) + "." if div else " No configuration diverged.")
    sweep = results["sweep"]
    n_bn = np.mean([len(sweep[a]["bn"]["good_rates"]) for a in sweep])
    n_aff = np.mean([len(sweep[a]["affine"]["good_rates"]) for a in sweep])
    n_aff_he = np.mean([len(sweep[a]["affine-he"]["good_rates"]) for a in sweep])
    n_he = np.mean([len(sweep[a]["none-he"]["good_rates"]) for a in sweep])
    if results.get("n_seeds", 2) < 2:
        parts.append(f"Usable rates (one seed, so no conclusion is drawn): BN {n_bn:.1f}, γx + β {n_aff:.1f}, γx + β with "
                     f"He init {n_aff_he:.1f}, unnormalized with He init {n_he:.1f} of {len(lrs)}.")
    elif n_bn > max(n_aff, n_aff_he):
        parts.append(f"Normalizing first widens the range of usable learning rates (on average {n_bn:.1f} of "
                     f"{len(lrs)} rates for BN vs {n_aff:.1f} for γx + β alone, {n_aff_he:.1f} for γx + β with He "
                     f"initialization and {n_he:.1f} for an unnormalized network with He initialization).")
    else:
        parts.append(f"In this run BN did not widen the usable range of learning rates over γx + β "
                     f"({n_bn:.1f} vs {n_aff:.1f} of {len(lrs)} rates with default init, {n_aff_he:.1f} with He init).")
    for arch, best in results["best"].items():
        cmps = [compare(best["bn"]["test_acc"], best[k]["test_acc"], paired=True, names=("BatchNorm", labels[k]))
                for k in ("affine", "affine-he", "none-he")]
        parts.append(f"{arch}, each configuration at its own best learning rate (chosen by training loss), test "
                     "accuracy: " + "; ".join(c.text(".3f") for c in cmps) + ".")
    init = results["init_std"]
    parts.append(
        "At initialization the pre-activation standard deviation at hidden layers 1 → 8 goes "
        + "; ".join(f"{labels[k]}: {v[0]:.2g} → {v[-1]:.2g}" for k, v in init.items())
        + ". Normalizing resets the scale at every layer; γ = 1, β = 0 leaves whatever the initialization produces, "
        "and γx + β can only repair it as fast as gradient descent moves γ."
    )
    sp = results["scale_probe"]
    invariant = max(m for m, _ in sp["bn"]["output_change"]) < 1e-3
    parts.append(
        f"Why the same inference form does not give the same training: with BN, scaling a hidden weight by "
        f"{', '.join(f'{k:g}' for k in ks)} changes the logits by {', '.join(f'{m:.1e}' for m, _ in sp['bn']['output_change'])} "
        f"(relative) and the gradient norm by factors {', '.join(f'{m:.3f}' for m, _ in sp['bn']['grad_ratio'])} "
        f"(1/k), and the gradient is orthogonal to the weight (|cos| ≤ {sp['bn']['cos_w_grad_max']:.0e}); with γx + β "
        f"the logits change by {', '.join(num(m, '.2g') for m, _ in sp['affine']['output_change'])} and the gradient by "
        f"{', '.join(num(m) for m, _ in sp['affine']['grad_ratio'])}. "
        + ("The loss of a BN network does not depend on the scale of the weights before it, so a gradient step only "
           "rotates them and (being orthogonal) grows their norm." if invariant else
           "Here the BN logits did change measurably with the weight scale (ε is not negligible against these "
           "variances), so the invariance holds only approximately.")
    )
    d = results.get("dynamics", {})
    if "bn" in d:
        bn_g = np.mean(d["bn"]["weight_growth"])
        bn_e, bn_l = _nanmean(d["bn"]["early_rel_step"]), _nanmean(d["bn"]["late_rel_step"])
        parts.append(
            f"At lr=1 the BN layer's weight norm grew {num(bn_g, '.2f')}× and its relative step went from "
            f"{num(bn_e)} to {num(bn_l)}: the effective learning rate lr/‖W‖² adjusts itself. AffineOnly: weight growth "
            f"{num(_nanmean(d['affine']['weight_growth']), '.2f')}×, relative step "
            f"{num(_nanmean(d['affine']['late_rel_step']), '.1e')} late in training, {d['affine']['diverged']} diverged "
            f"run(s); no normalization with He init: relative step {num(_nanmean(d['none-he']['late_rel_step']), '.1e')}, "
            f"{d['none-he']['diverged']} diverged run(s)."
        )
    c = results.get("continuation", {})
    if c:
        bits = []
        for lr, r in c.items():
            a, b = r["bn"], r["affine-twin"]
            fa = num(_nanmean(a["train_loss"]), missing="nothing (diverged)")
            fb = num(_nanmean(b["train_loss"]), missing="nothing (diverged)")
            n_runs = len(b["train_loss"])
            twin = (f"its twin diverged in all {n_runs} runs" if b["diverged"] == n_runs else
                    f"its twin {fb}" + (f" ({b['diverged']} of {n_runs} runs diverged)" if b["diverged"] else ""))
            bits.append(f"at lr={lr} the BN net reached training loss {fa} and {twin}")
        parts.append(
            f"Finally, a trained BN net and its AffineOnly twin compute the same function (max relative difference "
            f"{results['twin_max_rel_err']:.1e}) yet continue differently: " + "; ".join(bits) + ". The "
            "normalization is part of the model during training: its gradient removes the components along the "
            "batch mean and along x̂, which γx + β cannot do."
        )
    return "\n\n".join(parts)


def _nanmean(values) -> float:
    """Mean of the finite values (NaN when there are none, without numpy's warning)."""
    ok = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(ok)) if ok else math.nan
