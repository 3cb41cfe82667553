"""Experiment 4, internal-covariate-shift: does BN reduce internal covariate shift, and is that why it helps?

Seed 003 repeats the popular story (BN works by removing internal covariate shift, ICS) and its
rebuttal (Santurkar et al. 2018). This experiment measures both sides at CPU scale on one network,
Ioffe & Szegedy's Figure 1 MLP (784-100-100-100-10, sigmoid, batch 60, MNIST digits), trained

* without normalization,
* with BN before every sigmoid, and
* with "noisy BN": BN followed by per-unit scale and shift noise redrawn at every training step
  (Santurkar et al., Section 2: deliberately non-stationary layer inputs),

and records, over training: test accuracy, the 15/50/85th percentiles of one input of the last sigmoid
layer (Ioffe & Szegedy, Figure 1), the gradient-based ICS of every weight layer
(:func:`batchnorm.diagnostics.internal_covariate_shift`: ``‖G − G'‖`` and ``cos(G, G')``) and the
smoothness of the loss along the gradient (:func:`batchnorm.diagnostics.loss_landscape`: loss range,
gradient predictiveness, effective β-smoothness).

Second part, where Santurkar et al. claim the landscape effect: a deep linear network (their
Appendix uses a 25-layer one on synthetic Gaussian data) at depths :data:`DEPTHS`, with and without
BN, each trained at the learning rate (from a small grid) with the lowest final training loss, and the
same four measurements against depth, taken at a common probe step size so BN and no-BN are measured
over the same distances.

References: S. Ioffe and C. Szegedy, "Batch Normalization", ICML 2015 (Figure 1); S. Santurkar,
D. Tsipras, A. Ilyas and A. Madry, "How Does Batch Normalization Help Optimization?", NeurIPS 2018
(Figures 2-4).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..diagnostics import internal_covariate_shift, loss_landscape
from ..layers.base import BatchNorm
from . import data, models, train
from .core import Context, Figure, Section, Table, fmt, mean_std, subplots
from .stats import compare, crossing, pm

NAME = "internal-covariate-shift"
TITLE = "4. Internal covariate shift: Ioffe & Szegedy's Figure 1 and Santurkar et al.'s tests"
QUESTION = "Does BN work by reducing internal covariate shift, or by making the loss landscape smoother?"

BATCH = 60
LR = 0.1  # SGD with momentum 0.9, the same for every variant
HIDDEN = (100, 100, 100)
PERCENTILES = (15.0, 50.0, 85.0)
TARGET = 0.85  # test accuracy whose first crossing measures training speed
VARIANTS = ("no BN", "BN", "noisy BN")
EVAL_EVERY = 10  # test accuracy every 10 steps; the 85 % crossing is interpolated between evaluations
SMOOTH = 25  # window (steps) of the running mean drawn over the per-step percentiles in Figure 1

#: deep linear network sweep (Santurkar et al. 2018, Appendix: 25-layer DLN on synthetic Gaussian data)
DEPTHS = (2, 4, 8, 16, 25)
DLN_WIDTH = 20
DLN_OUT = 5
DLN_BATCH = 128
DLN_SAMPLES = 4096
DLN_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
PROBE_LR = 0.01  # step size of the ICS and landscape probes, the same for every network
LAND_MEASURES = (("loss_range", "loss range"), ("grad_pred", "gradient change ‖∇L(θ′) − ∇L(θ)‖"),
                 ("beta", "effective β-smoothness"))


class NoisyBatchNorm(nn.Module):
    r"""BN followed by non-stationary noise: ``y = s_t ⊙ BN(x) + m_t`` in training, plain ``BN(x)`` in eval.

    At every training forward a fresh per-feature shift ``m_t ~ U(−mean_noise, mean_noise)`` and scale
    ``s_t = exp(U(−log scale_noise, log scale_noise))`` are drawn (one draw per step, shared by the
    batch), so the distribution the next layer sees moves at every step although BN ran — the
    experiment of Santurkar et al. (2018, Section 2.1). Evaluation uses no noise (``s = 1, m = 0``,
    the median of the noise), like dropout.

    Shape: ``(N, C)`` → ``(N, C)``.
    Example: ``NoisyBatchNorm(8, generator=torch.Generator().manual_seed(0))(torch.randn(4, 8)).shape == (4, 8)``.
    """

    def __init__(self, num_features: int, *, mean_noise: float = 1.0, scale_noise: float = 2.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not mean_noise >= 0 or not scale_noise >= 1:
            raise ValueError(f"NoisyBatchNorm expected mean_noise >= 0 and scale_noise >= 1, got {mean_noise}, "
                             f"{scale_noise}. Use scale_noise=1 and mean_noise=0 for no noise.")
        self.bn = BatchNorm(num_features)
        self.mean_noise = float(mean_noise)
        self.scale_noise = float(scale_noise)
        self.generator = generator or torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if not self.training:
            return y
        c = y.shape[1]
        u = torch.rand(2, c, generator=self.generator, dtype=torch.float64)
        shift = (2 * u[0] - 1) * self.mean_noise
        scale = torch.exp((2 * u[1] - 1) * math.log(self.scale_noise))
        return y * scale.to(y.dtype) + shift.to(y.dtype)


def percentiles(values: torch.Tensor, qs: tuple[float, ...] = PERCENTILES) -> np.ndarray:
    """Per-column percentiles of a ``(N, C)`` tensor as a ``(len(qs), C)`` array (linear interpolation).

    Example: ``percentiles(torch.arange(101.).reshape(-1, 1))[:, 0].tolist() == [15.0, 50.0, 85.0]``.
    """
    return np.percentile(values.detach().double().numpy(), qs, axis=0)


def steps_to(eval_steps: list[int], accuracies: list[float], target: float) -> float:
    """Step at which the test accuracy first reaches ``target``, interpolated linearly between evaluations.

    (:func:`batchnorm.lab.stats.crossing`; NaN if it never does.) Example:
    ``steps_to([50, 100, 150], [0.5, 0.9, 0.95], 0.85) == 93.75``.
    """
    return crossing(eval_steps, accuracies, target)


def median_jitter(series: np.ndarray) -> float:
    """How much the median of each unit moves between records, relative to its 15–85 band.

    ``series`` is ``(T, 3, C)`` (records × (p15, p50, p85) × units). Returns the mean over units of
    ``mean_t |p50[t+1] − p50[t]| / mean_t (p85[t] − p15[t])``: 0 for a frozen distribution.
    Example: ``median_jitter(np.tile([[[0.], [0.], [1.]]], (5, 1, 1))) == 0.0``.
    """
    steps = np.abs(np.diff(series[:, 1, :], axis=0)).mean(0)
    band = (series[:, 2, :] - series[:, 0, :]).mean(0)
    return float(np.mean(steps / np.maximum(band, 1e-12)))


def _build(variant: str, seed: int) -> nn.Module:
    if variant == "no BN":
        net = models.MLP(784, list(HIDDEN), 10, norm="none", act="sigmoid")
    elif variant == "BN":
        net = models.MLP(784, list(HIDDEN), 10, norm="bn", act="sigmoid")
    else:
        gen = torch.Generator().manual_seed(10_000 + seed)
        net = models.MLP(784, list(HIDDEN), 10, norm=lambda c, axis: NoisyBatchNorm(c, generator=gen), act="sigmoid")
    # Glorot init, the standard one for sigmoid nets: with torch's default (uniform ±1/√fan_in) the
    # un-normalized net sits on a plateau for hundreds of steps and the comparison says little
    for mod in net.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_normal_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    return net


def _probe(net: nn.Module, loss_fn, batch, lr: float, record: dict) -> dict:
    """Append Santurkar et al.'s measures at the current weights to ``record``: ICS (mean over layers of the
    ℓ2 and cosine gradient change) and the three landscape measures. Returns the landscape dict."""
    ics = internal_covariate_shift(net, loss_fn, batch, lr=lr)
    record["ics_l2"].append(float(np.mean([v["l2"] for v in ics.values()])))
    record["ics_cos"].append(float(np.nanmean([v["cos"] for v in ics.values()])))
    land = loss_landscape(net, loss_fn, batch, lr=lr, steps=(0.5, 1, 2, 4))
    record["loss_range"].append(land["loss_range"])
    record["grad_pred"].append(land["gradient_predictiveness"])
    record["beta"].append(land["beta_smoothness"])
    return land


def _train_one(ctx: Context, variant: str, seed: int, steps: int, every: int, digits) -> dict:
    x, y, xt, yt = digits
    model = train.seeded(ctx, seed, lambda: _build(variant, seed))
    last_sigmoid = model.blocks[-1][-1]
    captured: dict[str, torch.Tensor] = {}
    hook = last_sigmoid.register_forward_pre_hook(lambda mod, args: captured.__setitem__("z", args[0].detach()))
    record: dict[str, list] = {"steps": [], "pct": [], "ics_l2": [], "ics_cos": [], "land_steps": [],
                               "loss_range": [], "grad_pred": [], "beta": [], "grad_norm": []}
    probe_gen = torch.Generator().manual_seed(20_000 + seed)
    ce = nn.functional.cross_entropy

    def on_step(step: int, net: nn.Module, loss: torch.Tensor) -> None:
        # the distribution of the sigmoid input in the batch this step trained on
        record["steps"].append(step)
        record["pct"].append(percentiles(captured["z"]))
        if step % every == 0 or step == 1:
            idx = torch.randperm(len(x), generator=probe_gen)[:BATCH]
            batch = (x[idx], y[idx])
            net.train()
            record["land_steps"].append(step)
            land = _probe(net, ce, batch, LR, record)
            record["grad_norm"].append(land["grad_norm"])

    hist = train.fit(model, (x, y), ctx=ctx, lr=LR, seed=seed, steps=steps, batch_size=BATCH, optimizer="sgd",
                     eval_data=(xt, yt), eval_every=EVAL_EVERY, on_step=on_step, final_train_eval=False,
                     desc=f"{variant} s={seed}")
    hook.remove()
    record["eval_steps"] = hist.eval_steps
    record["test_acc"] = hist.test_acc
    record["final_acc"] = hist.final_test_acc if not hist.diverged else math.nan
    record["pct"] = np.stack(record["pct"])  # (T, 3, C)
    return record


def dln(depth: int, bn: bool, width: int = DLN_WIDTH, out: int = DLN_OUT) -> nn.Module:
    """Deep linear network: ``depth`` bias-free Linear layers, BatchNorm after every one but the last if ``bn``.

    Weights are LeCun-normal (std 1/√fan_in) so the signal keeps its scale through depth without BN.
    The same seed gives the same weights with and without BN (BN adds no random draw), so the two are
    paired. Shape: ``(N, width)`` → ``(N, out)``. Example: ``dln(25, True)(torch.randn(8, 20)).shape == (8, 5)``.
    """
    if depth < 1:
        raise ValueError(f"dln expected depth >= 1, got {depth}.")
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, out if i == depth - 1 else width, bias=False)
        nn.init.normal_(lin.weight, std=1 / math.sqrt(width))
        layers.append(lin)
        if bn and i < depth - 1:
            layers.append(BatchNorm(width))
    return nn.Sequential(*layers)


def dln_data(seed: int, n: int = DLN_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic regression: x ~ N(0, I_20), y = A x + 0.1·noise with a fixed random A (5 × 20, std 1/√20)."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    a = torch.randn(DLN_OUT, DLN_WIDTH, generator=gen) / math.sqrt(DLN_WIDTH)
    x = torch.randn(n, DLN_WIDTH, generator=gen)
    return x, x @ a.T + 0.1 * torch.randn(n, DLN_OUT, generator=gen)


def _dln_run(ctx: Context, depth: int, bn: bool, lr: float, seed: int, steps: int, measure: bool) -> dict:
    x, y = dln_data(seed)
    model = train.seeded(ctx, seed, lambda: dln(depth, bn))
    mse = nn.functional.mse_loss
    probe_gen = torch.Generator().manual_seed(40_000 + seed)
    points = {int(round(steps * f)) for f in (0.25, 0.5, 0.75, 1.0)} if measure else set()
    rec: dict[str, list[float]] = {"ics_l2": [], "ics_cos": [], "loss_range": [], "grad_pred": [], "beta": []}

    def on_step(step: int, net: nn.Module, loss: torch.Tensor) -> None:
        if step not in points:
            return
        idx = torch.randperm(len(x), generator=probe_gen)[:DLN_BATCH]
        batch = (x[idx], y[idx])
        net.train()
        _probe(net, mse, batch, PROBE_LR, rec)

    hist = train.fit(model, (x, y), ctx=ctx.quiet(), lr=lr, seed=seed, steps=steps, batch_size=DLN_BATCH,
                     optimizer="sgd-plain", loss_fn=mse, on_step=on_step, final_train_eval=False)
    final = float(np.mean(hist.losses[-max(1, steps // 10):])) if hist.losses and not hist.diverged else math.nan
    out = {"final_loss": final, "diverged": hist.diverged, "initial_loss": hist.losses[0] if hist.losses else math.nan}
    for k, v in rec.items():
        out[k] = float(np.nanmean(v)) if v and not hist.diverged else math.nan
    return out


def depth_sweep(ctx: Context) -> dict:
    """Santurkar et al.'s measurements against depth on deep linear networks, with and without BN.

    Per (depth, BN or not): the learning rate is the one of :data:`DLN_LRS` with the lowest final training loss
    on the first seed (a rate where that network trains); every seed then trains at it and is measured four
    times (at 25/50/75/100 % of training) with probe step :data:`PROBE_LR`. Returns nested dicts of per-seed values.
    """
    steps = ctx.budget(300, 40)
    depths = DEPTHS if not ctx.quick else (2, 8)
    lrs = DLN_LRS if not ctx.quick else (0.01, 0.03)
    seeds = ctx.seed_values()
    res: dict = {"steps": steps, "depths": list(depths), "lrs": list(lrs), "runs": {}}
    for depth in depths:
        for bn in (False, True):
            key = f"{depth}-{'bn' if bn else 'plain'}"
            grid = {lr: _dln_run(ctx, depth, bn, lr, seeds[0], steps, measure=False)["final_loss"] for lr in lrs}
            ok = {lr: v for lr, v in grid.items() if math.isfinite(v)}
            lr = min(ok, key=ok.get) if ok else min(lrs)
            runs = [_dln_run(ctx, depth, bn, lr, s, steps, measure=True) for s in seeds]
            res["runs"][key] = {"lr": lr, "grid_final_loss": {str(k): v for k, v in grid.items()},
                                **{m: [r[m] for r in runs] for m in runs[0] if m != "diverged"},
                                "diverged": sum(r["diverged"] for r in runs)}
    return res


def _reached_pm(values: list[float], steps: int) -> str:
    """``pm`` of the seeds that reached the target, or how many never did within ``steps``."""
    hit = [v for v in values if math.isfinite(v)]
    if len(hit) == len(values):
        return pm(hit, ".0f")
    if not hit:
        return f"never within {steps} steps"
    return f"{pm(hit, '.0f')} in {len(hit)} of {len(values)} seeds (never within {steps} in the others)"


def speed_text(metrics: dict, speed, steps: int) -> str:
    """Steps to the target, BN vs no BN, handling seeds that never reached it (censored at ``steps``)."""
    b, n = metrics["BN"]["steps_to_target"], metrics["no BN"]["steps_to_target"]
    label = f"steps to {100 * TARGET:.0f}% test accuracy"
    if all(math.isfinite(v) for v in b + n):
        return f"{label}, {speed.text('.0f')}."
    missed_b = sum(not math.isfinite(v) for v in b)
    missed_n = sum(not math.isfinite(v) for v in n)
    if missed_n and not missed_b:
        return (f"{label}: BN {pm(b, '.0f')}; without BN {missed_n} of {len(n)} seed(s) never reached it within {steps} "
                f"steps (those that did: {_reached_pm(n, steps)}).")
    return f"{label}: BN {_reached_pm(b, steps)}, no BN {_reached_pm(n, steps)}."


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Running mean over ``window`` records (shorter at the start), per column."""
    c = np.cumsum(np.vstack([np.zeros((1,) + values.shape[1:]), values]), axis=0)
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo).reshape(-1, *([1] * (values.ndim - 1)))


def smooths_at(sweep: dict) -> dict[int, dict[str, object]]:
    """Per depth: the three landscape comparisons (BN vs no BN, paired by seed) and whether BN smooths there.

    Rule: BN smooths the landscape at a depth when at least two of the three measures are resolved lower with
    BN and none is resolved higher (:func:`batchnorm.lab.stats.compare`).
    """
    out = {}
    for depth in sweep["depths"]:
        b, p = sweep["runs"][f"{depth}-bn"], sweep["runs"][f"{depth}-plain"]
        cmps = {k: compare(b[k], p[k], paired=True, names=("BN", "no BN")) for k, _ in LAND_MEASURES}
        ics_cmp = compare(b["ics_l2"], p["ics_l2"], paired=True, names=("BN", "no BN"))
        lower = sum(c.sign < 0 for c in cmps.values())
        higher = sum(c.sign > 0 for c in cmps.values())
        out[depth] = {"cmp": cmps, "ics": ics_cmp, "smoother": lower >= 2 and higher == 0, "lower": lower,
                      "higher": higher}
    return out


def separation(sweep: dict, smooth: dict | None = None) -> dict[str, dict[str, object]]:
    """Per landscape measure: depths where BN is resolved lower / higher, and the depth from which it stays lower.

    ``from`` is the smallest swept depth d such that BN is resolved lower at d and at every deeper swept depth
    (None if the deepest is not resolved lower). Example: lower at 8, 16, 25 of (2, 4, 8, 16, 25) gives ``from = 8``.
    """
    smooth = smooth or smooths_at(sweep)
    depths = list(sweep["depths"])
    out: dict[str, dict[str, object]] = {}
    for k, _ in LAND_MEASURES:
        signs = [smooth[d]["cmp"][k].sign for d in depths]
        start = None
        for d, sgn in zip(reversed(depths), reversed(signs)):
            if sgn < 0:
                start = d
            else:
                break
        out[k] = {"lower": [d for d, sg in zip(depths, signs) if sg < 0],
                  "higher": [d for d, sg in zip(depths, signs) if sg > 0], "from": start}
    return out


def run(ctx: Context) -> Section:
    digits = data.mnist_digits()
    steps = ctx.budget(1000, 100)
    every = ctx.budget(100, 50)
    seeds = ctx.seed_values()
    runs = {v: [_train_one(ctx, v, s, steps, every, digits) for s in seeds] for v in VARIANTS}
    sweep = depth_sweep(ctx)

    half = lambda r, k: r[k][len(r[k]) // 2:]  # noqa: E731 - second half of training, after the first transient
    metrics = {
        v: {
            "final_acc": [100 * r["final_acc"] for r in runs[v]],
            "steps_to_target": [steps_to(r["eval_steps"], r["test_acc"], TARGET) for r in runs[v]],
            "jitter": [median_jitter(r["pct"][len(r["pct"]) // 2:]) for r in runs[v]],
            "ics_l2": [float(np.mean(half(r, "ics_l2"))) for r in runs[v]],
            "ics_cos": [float(np.nanmean(half(r, "ics_cos"))) for r in runs[v]],
            "loss_range": [float(np.mean(half(r, "loss_range"))) for r in runs[v]],
            "grad_pred": [float(np.mean(half(r, "grad_pred"))) for r in runs[v]],
            "beta": [float(np.nanmean(half(r, "beta"))) for r in runs[v]],
            "grad_norm": [float(np.mean(half(r, "grad_norm"))) for r in runs[v]],
        }
        for v in VARIANTS
    }
    cols = [("final_acc", "test accuracy (%)", 2), ("steps_to_target", f"steps to {100 * TARGET:.0f}% test accuracy", 0),
            ("jitter", "median jitter of a sigmoid input", 3),
            ("ics_l2", "ICS ‖G − G′‖", 4), ("ics_cos", "ICS cos(G, G′)", 3), ("loss_range", "loss range", 3),
            ("grad_pred", "gradient change ‖∇L(θ′) − ∇L(θ)‖", 3), ("beta", "effective β-smoothness", 3),
            ("grad_norm", "gradient norm ‖∇L‖", 3)]

    def reached(vals: list[float]) -> str:
        """Steps to the target over seeds, saying how many seeds never got there (instead of printing nan)."""
        hit = [x for x in vals if math.isfinite(x)]
        if len(hit) == len(vals):
            return fmt(hit, 0)
        if not hit:
            return f"never within {steps} steps"
        return f"{np.mean(hit):.0f} in {len(hit)} of {len(vals)} seeds (never within {steps} in the others)"

    cell = lambda v, k, d: reached(metrics[v][k]) if k == "steps_to_target" else fmt(metrics[v][k], d)  # noqa: E731
    table = Table(["network"] + [c[1] for c in cols],
                  [[v] + [cell(v, k, d) for k, _, d in cols] for v in VARIANTS],
                  caption="Figure-1 net: mean ± std over seeds. Steps to 85 % are interpolated between evaluations "
                          f"every {EVAL_EVERY} steps. ICS and landscape numbers average the measurements of the second "
                          "half of training (every weight layer for ICS); jitter is per step, over the second half, "
                          "relative to the 15–85 band (see setup)")

    smooth = smooths_at(sweep)
    d_rows = []
    for depth in sweep["depths"]:
        for variant, key in (("no BN", f"{depth}-plain"), ("BN", f"{depth}-bn")):
            r = sweep["runs"][key]
            d_rows.append([depth, variant, f"{r['lr']:g}", fmt(r["final_loss"], 4), fmt(r["ics_l2"], 4),
                           fmt(r["ics_cos"], 3)] + [fmt(r[k], 4) for k, _ in LAND_MEASURES])
        sm = smooth[depth]
        d_rows.append([depth, "BN − no BN (paired)", "", "", sm["ics"].verdict("higher", "lower")]
                      + [""] + [sm["cmp"][k].verdict("higher", "lower") for k, _ in LAND_MEASURES])
    d_table = Table(["depth", "network", "lr (chosen)", "final train loss", "ICS ‖G − G′‖", "ICS cos(G, G′)"]
                    + [label for _, label in LAND_MEASURES], d_rows,
                    caption=f"Deep linear networks (width {DLN_WIDTH}, MSE on synthetic Gaussian data, plain SGD, batch "
                            f"{DLN_BATCH}, {sweep['steps']} steps): mean ± std over seeds of the average of four "
                            f"measurements during training, probe step {PROBE_LR}. 'BN − no BN' rows: the verdict of a "
                            "paired 95 % interval per seed (BN and no-BN nets start from the same weights)")

    figure1 = _figure1(runs, steps)
    figure2 = _figure2(runs)
    figure3 = _figure3(sweep)

    m = lambda v, k: mean_std(metrics[v][k])[0]  # noqa: E731
    speed = compare(metrics["BN"]["steps_to_target"], metrics["no BN"]["steps_to_target"], paired=True,
                    names=("BN", "no BN"))
    noisy = compare(metrics["noisy BN"]["final_acc"], metrics["BN"]["final_acc"], paired=True,
                    names=("noisy BN", "BN"))
    ics_c = compare(metrics["BN"]["ics_l2"], metrics["no BN"]["ics_l2"], paired=True, names=("BN", "no BN"))
    land = {k: compare(metrics["BN"][k], metrics["no BN"][k], paired=True, names=("BN", "no BN"))
            for k, _ in LAND_MEASURES}
    smoother_depths = [d for d in sweep["depths"] if smooth[d]["smoother"]]
    rougher_depths = [d for d in sweep["depths"] if smooth[d]["higher"] >= 2 and smooth[d]["lower"] == 0]

    sep = separation(sweep, smooth)
    depths_all = ", ".join(map(str, sweep["depths"]))
    per_measure = []
    for k, label in LAND_MEASURES:
        r = sep[k]
        bit = f"{label}: lower with BN at depth(s) {', '.join(map(str, r['lower'])) or 'none'}"
        if r["higher"]:
            bit += f", higher at {', '.join(map(str, r['higher']))}"
        if r["from"] is not None:
            bit += f" (separates from depth {r['from']} on)"
        per_measure.append(bit)
    depth_text = (
        f"Deep linear networks, depths {depths_all}, BN vs no BN paired by seed: " + "; ".join(per_measure) + ". "
        + (f"By the rule '≥ 2 of 3 measures resolved lower, none higher', BN smooths the landscape at depth(s) "
           f"{', '.join(map(str, smoother_depths))}." if smoother_depths else
           "By the rule '≥ 2 of 3 measures resolved lower, none higher', BN smooths the landscape at no depth here.")
        + (f" Resolved rougher (≥ 2 higher, none lower) at depth(s) {', '.join(map(str, rougher_depths))}."
           if rougher_depths else "")
    )
    deepest = sweep["depths"][-1]
    dd = smooth[deepest]
    depth_text += (f" At depth {deepest}: " + "; ".join(f"{label}: {dd['cmp'][k].text('.3g')}"
                                                       for k, label in LAND_MEASURES) + ".")

    answer = "\n\n".join([
        f"Speed (Ioffe & Szegedy's Figure 1 net): {speed_text(metrics, speed, steps)} Final test accuracy after "
        f"{steps} steps: BN {pm(metrics['BN']['final_acc'], '.1f', '%')}, no BN "
        f"{pm(metrics['no BN']['final_acc'], '.1f', '%')} (mean ± 95 % interval).",
        f"Noisy BN, whose layer inputs jump at every step (median jitter {m('noisy BN', 'jitter'):.2f} vs "
        f"{m('BN', 'jitter'):.2f} with BN and {m('no BN', 'jitter'):.2f} without), ends at final accuracy "
        f"{noisy.text('.1f', unit='%')}"
        + ((". No difference from BN is resolved although its inputs move far more, consistent with Santurkar et al.: "
            "stable layer inputs are not what makes BN train well here." if noisy.sign == 0 else
            ". It is resolved below BN here, so this run does not reproduce that part of Santurkar et al.")
           if noisy.informative else ".")
        + f" Gradient-based ICS ‖G − G′‖: {ics_c.text('.3g')}.",
        "Landscape on the sigmoid MLP (second half of training): " + "; ".join(
            f"{label}: {land[k].verdict('higher', 'lower')}" for k, label in LAND_MEASURES) + ".",
        depth_text,
    ])
    n_land_lower = sum(c.sign < 0 for c in land.values())
    finding = (
        f"Steps to {100 * TARGET:.0f}% accuracy: BN {pm(metrics['BN']['steps_to_target'], '.0f')}, no BN "
        f"{_reached_pm(metrics['no BN']['steps_to_target'], steps)}; noisy BN ended at "
        f"{pm(metrics['noisy BN']['final_acc'], '.1f', '%')} vs BN {pm(metrics['BN']['final_acc'], '.1f', '%')} "
        f"({noisy.verdict()})"
        + (" although its inputs move far more" if noisy.informative and noisy.sign == 0 else "")
        + f". The landscape is resolved smoother with BN on {n_land_lower} of 3 measures on the sigmoid MLP; on deep "
        "linear nets (depths " + depths_all + ") "
        + "; ".join(f"{label} {'separates (BN lower) from depth ' + str(sep[k]['from']) + ' on' if sep[k]['from'] else 'never separates lower'}"
                    for k, label in LAND_MEASURES)
        + "."
    )
    results = {
        "steps": steps,
        "metrics": {v: {k: mean_std(vals)[0] for k, vals in metrics[v].items()} for v in VARIANTS},
        "per_seed": metrics,
        "depth_sweep": {k: v for k, v in sweep.items()},
        "smoother_depths": smoother_depths,
        "rougher_depths": rougher_depths,
        "separation": sep,
    }
    return Section(
        name=NAME, title=TITLE, question=QUESTION,
        setup=(
            f"Part 1: MLP 784-{'-'.join(map(str, HIDDEN))}-10 with sigmoids (Ioffe & Szegedy's Figure 1 net; "
            f"Glorot-normal weights) on 4000 MNIST digits (1000 test), SGD (momentum 0.9) lr {LR}, batch {BATCH}, "
            f"{steps} steps, for three variants: no normalization (linear layers with bias, zero-initialized), "
            "BatchNorm before every sigmoid, and noisy BN (BN, then y·s + m with per-unit m ~ U(−1, 1) and log s ~ "
            "U(−log 2, log 2) redrawn every step; no noise in eval). Test accuracy every "
            f"{EVAL_EVERY} steps (the 85 % crossing interpolated linearly between evaluations). Every {every} steps, "
            f"on a fresh training batch of {BATCH}: internal_covariate_shift (every weight layer, lr {LR}) and "
            "loss_landscape (steps 0.5, 1, 2, 4 × lr), in training mode. Percentiles are of the training batch's "
            "input to the last hidden layer's sigmoids at every step; 'median jitter' is mean_t |p50[t+1] − p50[t]| / "
            "mean_t (p85 − p15), averaged over the 100 units, second half of training.\n\n"
            f"Part 2: deep linear networks of depth {', '.join(map(str, sweep['depths']))} (width {DLN_WIDTH}, no "
            f"biases, LeCun-normal weights, BatchNorm after every layer but the last or none) regress y = A x + noise "
            f"on {DLN_SAMPLES} synthetic Gaussian samples (MSE, plain SGD, batch {DLN_BATCH}, {sweep['steps']} steps). "
            f"Each network trains at the rate of {', '.join(f'{lr:g}' for lr in sweep['lrs'])} with the lowest final "
            f"training loss on the first seed; ICS and the landscape are measured at 25/50/75/100 % of training with "
            f"the same probe step {PROBE_LR} for every network. {len(seeds)} seed(s); comparisons are paired by seed."
        ),
        answer=answer, finding=finding, tables=[table, d_table], figures=[figure1, figure2, figure3],
        results=results,
        notes=["Ioffe & Szegedy trained 50 000 steps on the full MNIST; part 1 is much shorter, on 4000 digits.",
               "Santurkar et al. measure on VGG/CIFAR-10 and a 25-layer linear net; part 2 follows their deep-linear "
               "protocol at CPU scale (width, data and step counts are this lab's choices)."],
    )


def _figure1(runs, steps) -> Figure:
    colors = {"no BN": "tab:gray", "BN": "tab:blue", "noisy BN": "tab:orange"}
    fig, axes = subplots(1, 4, figsize=(15, 3.4))
    for v in VARIANTS:
        n = min(len(r["test_acc"]) for r in runs[v])
        acc = np.array([r["test_acc"][:n] for r in runs[v]]) * 100
        axes[0].plot(runs[v][0]["eval_steps"][:n], acc.mean(0), color=colors[v], label=v)
    axes[0].axhline(100 * TARGET, color="k", lw=0.7, ls=(0, (1, 3)), label=f"{100 * TARGET:.0f}% target")
    axes[0].set_title("(a) test accuracy")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("test accuracy (%)")
    smoothed = {v: _smooth(runs[v][0]["pct"][:, :, 0], SMOOTH) for v in VARIANTS}
    lo = min(float(np.min(p)) for p in smoothed.values())
    hi = max(float(np.max(p)) for p in smoothed.values())
    pad = 0.05 * (hi - lo + 1e-9)
    for ax, v, tag in zip(axes[1:], VARIANTS, "bcd"):
        p = smoothed[v]
        for i, ls in enumerate((":", "-", "--")):
            ax.plot(runs[v][0]["steps"], p[:, i], color=colors[v], ls=ls, lw=1.2)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"({tag}) {v}: a last-layer sigmoid input", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("sigmoid input (unit 0)")
    from matplotlib.lines import Line2D

    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="k", ls=ls, lw=1.2) for ls in (":", "-", "--")]
    labels += [f"{q:.0f}th percentile (b–d)" for q in PERCENTILES]
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    return Figure(fig, "Ioffe & Szegedy's Figure 1 at CPU scale: (a) test accuracy (mean over seeds) of the 3×100 "
                       "sigmoid MLP with batch 60; (b–d) 15/50/85th percentiles, over each training batch, of the input "
                       f"to one sigmoid of the last hidden layer (first seed), running mean over {SMOOTH} steps, the "
                       "same y-axis in (b–d).")


def _figure2(runs) -> Figure:
    colors = {"no BN": "tab:gray", "BN": "tab:blue", "noisy BN": "tab:orange"}
    fig, axes = subplots(1, 4, figsize=(15, 3.4))
    for ax, key, label in zip(axes, ("ics_l2", "ics_cos", "loss_range", "beta"),
                              ("ICS ‖G − G′‖ (mean over layers)", "ICS cos(G, G′)", "loss range along the gradient",
                               "effective β-smoothness")):
        for v, mk in zip(VARIANTS, "osD"):
            vals = np.array([r[key] for r in runs[v]], dtype=float)
            ax.plot(runs[v][0]["land_steps"], np.nanmean(vals, 0), marker=mk, ms=3, color=colors[v], label=v)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=9)
        if key != "ics_cos":
            ax.set_yscale("log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    return Figure(fig, "Santurkar et al.'s measurements over training on the sigmoid MLP (mean over seeds): "
                       "gradient-based ICS of the weight layers (lower ‖G − G′‖ and higher cos mean less shift) and the "
                       f"loss landscape along the gradient, moving 0.5–4 × lr = {LR} (lower is smoother).")


def _figure3(sweep) -> Figure:
    from matplotlib.ticker import NullFormatter

    fig, axes = subplots(1, 4, figsize=(15, 3.4))
    keys = [("ics_l2", "ICS ‖G − G′‖")] + list(LAND_MEASURES)
    depths = np.asarray(sweep["depths"], dtype=float)
    for ax, (k, label) in zip(axes, keys):
        for bn, color, mk, ls, shift in ((False, "tab:gray", "o", "--", 0.97), (True, "tab:blue", "s", "-", 1.03)):
            vals = np.array([sweep["runs"][f"{d}-{'bn' if bn else 'plain'}"][k] for d in sweep["depths"]], dtype=float)
            mean = np.nanmean(vals, axis=1)
            std = np.nanstd(vals, axis=1)
            ax.errorbar(depths * shift, mean, yerr=std, color=color, marker=mk, ls=ls, capsize=2,
                        label="BN" if bn else "no BN")
        ax.set_xscale("log")
        ax.set_xticks(depths, [str(int(d)) for d in depths])
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the swept depths are labelled
        ax.set_yscale("log")
        ax.set_xlabel("depth (linear layers)")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=9)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    return Figure(fig, "Deep linear networks: ICS and the three landscape measures against depth, with and without BN "
                       "(mean ± std over seeds, each network at its own best learning rate, probe step "
                       f"{PROBE_LR}; the two series are offset slightly along x so neither hides the other).")
