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

NAME = "internal-covariate-shift"
TITLE = "4. Internal covariate shift: Ioffe & Szegedy's Figure 1 and Santurkar et al.'s tests"
QUESTION = "Does BN work by reducing internal covariate shift, or by making the loss landscape smoother?"

BATCH = 60
LR = 0.1  # SGD with momentum 0.9, the same for every variant
HIDDEN = (100, 100, 100)
PERCENTILES = (15.0, 50.0, 85.0)
TARGET = 0.85  # test accuracy whose first crossing measures training speed
VARIANTS = ("no BN", "BN", "noisy BN")


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
    """First evaluated step whose accuracy reaches ``target`` (NaN if none does).

    Example: ``steps_to([50, 100, 150], [0.5, 0.9, 0.95], 0.85) == 100``.
    """
    for step, acc in zip(eval_steps, accuracies):
        if acc >= target:
            return float(step)
    return math.nan


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
            ics = internal_covariate_shift(net, ce, batch, lr=LR)
            record["land_steps"].append(step)
            record["ics_l2"].append(float(np.mean([v["l2"] for v in ics.values()])))
            record["ics_cos"].append(float(np.nanmean([v["cos"] for v in ics.values()])))
            land = loss_landscape(net, ce, batch, lr=LR, steps=(0.5, 1, 2, 4))
            record["loss_range"].append(land["loss_range"])
            record["grad_pred"].append(land["gradient_predictiveness"])
            record["beta"].append(land["beta_smoothness"])
            record["grad_norm"].append(land["grad_norm"])

    hist = train.fit(model, (x, y), ctx=ctx, lr=LR, seed=seed, steps=steps, batch_size=BATCH, optimizer="sgd",
                     eval_data=(xt, yt), eval_every=max(1, every // 2), on_step=on_step, final_train_eval=False,
                     desc=f"{variant} s={seed}")
    hook.remove()
    record["eval_steps"] = hist.eval_steps
    record["test_acc"] = hist.test_acc
    record["final_acc"] = hist.final_test_acc if not hist.diverged else math.nan
    record["pct"] = np.stack(record["pct"])  # (T, 3, C)
    return record


def run(ctx: Context) -> Section:
    digits = data.mnist_digits()
    steps = ctx.budget(1000, 300)
    every = ctx.budget(100, 100)
    seeds = ctx.seed_values()
    runs = {v: [_train_one(ctx, v, s, steps, every, digits) for s in seeds] for v in VARIANTS}

    def per_seed(v: str, key: str, reduce=np.nanmean) -> list[float]:
        return [float(reduce(r[key])) for r in runs[v]]

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
            ("grad_pred", "gradient change ‖∇L(θ′) − ∇L(θ)‖", 3), ("beta", "effective β-smoothness", 3), ("grad_norm", "gradient norm ‖∇L‖", 3)]
    def reached(vals: list[float]) -> str:
        """Steps to the target over seeds, saying how many seeds never got there (instead of printing nan)."""
        hit = [x for x in vals if math.isfinite(x)]
        if len(hit) == len(vals):
            return fmt(hit, 0)
        if not hit:
            return f"never within {steps} steps"
        return f"{np.mean(hit):.0f} in {len(hit)} of {len(vals)} seeds (never within {steps} in the others)"

    def when(vals: list[float]) -> str:
        text = reached(vals)
        return text if text.startswith("never") else f"after {text} steps"

    cell = lambda v, k, d: reached(metrics[v][k]) if k == "steps_to_target" else fmt(metrics[v][k], d)  # noqa: E731
    table = Table(["network"] + [c[1] for c in cols],
                  [[v] + [cell(v, k, d) for k, _, d in cols] for v in VARIANTS],
                  caption="Mean ± std over seeds. ICS and landscape numbers average the measurements of the second "
                          "half of training (every layer for ICS); jitter is per step, over the second half, relative "
                          "to the 15–85 band (see setup)")

    colors = {"no BN": "tab:gray", "BN": "tab:blue", "noisy BN": "tab:orange"}
    fig1, axes = subplots(1, 4, figsize=(15, 3.4))
    for v in VARIANTS:
        acc = np.array([r["test_acc"] for r in runs[v]]) * 100
        axes[0].plot(runs[v][0]["eval_steps"], acc.mean(0), color=colors[v], label=v)
    axes[0].set_title("(a) test accuracy")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8)
    for ax, v, tag in zip(axes[1:], VARIANTS, "bcd"):
        r = runs[v][0]
        p = r["pct"][:, :, 0]
        for i, (q, ls) in enumerate(zip(PERCENTILES, (":", "-", "--"))):
            ax.plot(r["steps"], p[:, i], color=colors[v], ls=ls, lw=0.8, label=f"{q:.0f}th percentile")
        ax.set_title(f"({tag}) {v}: input of a last-layer sigmoid")
        ax.set_xlabel("training step")
        ax.set_ylabel("sigmoid input (unit 0)")
        ax.legend(fontsize=7)
    figure1 = Figure(fig1, "Ioffe & Szegedy's Figure 1 at CPU scale: (a) test accuracy (mean over seeds) of the "
                           "3×100 sigmoid MLP with batch 60; (b–d) 15/50/85th percentiles, over each training batch, "
                           "of the input to one sigmoid of the last hidden layer (first seed).")

    fig2, axes2 = subplots(1, 4, figsize=(15, 3.4))
    for ax, key, label in zip(axes2, ("ics_l2", "ics_cos", "loss_range", "beta"),
                              ("ICS ‖G − G′‖ (mean over layers)", "ICS cos(G, G′)", "loss range along the gradient",
                               "effective β-smoothness")):
        for v in VARIANTS:
            vals = np.array([r[key] for r in runs[v]], dtype=float)
            ax.plot(runs[v][0]["land_steps"], np.nanmean(vals, 0), marker="o", ms=3, color=colors[v], label=v)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(label)
        if key != "ics_cos":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    figure2 = Figure(fig2, "Santurkar et al.'s measurements over training (mean over seeds): gradient-based ICS of "
                           "the weight layers (lower ‖G − G′‖ and higher cos mean less shift) and the loss landscape "
                           f"along the gradient, moving 0.5–4 × lr = {LR} (lower is smoother).")

    m = lambda v, k: mean_std(metrics[v][k])[0]  # noqa: E731
    noisy_ok = m("noisy BN", "final_acc") >= m("BN", "final_acc") - 1.0
    ics_lower = m("BN", "ics_l2") < m("no BN", "ics_l2") and m("BN", "ics_cos") >= m("no BN", "ics_cos")
    ics_higher = m("BN", "ics_l2") > m("no BN", "ics_l2") and m("BN", "ics_cos") <= m("no BN", "ics_cos")
    if ics_lower:
        ics_text = ("by this measure BN does reduce ICS here (Santurkar et al. found no reduction on VGG), but noisy BN "
                    f"has far more of it (‖G − G′‖ {m('noisy BN', 'ics_l2'):.3g}, cos {m('noisy BN', 'ics_cos'):.3f}) "
                    "and trains as well, so the reduction does not explain the speed-up. ")
    elif ics_higher:
        ics_text = "BN does not reduce ICS in this sense, as Santurkar et al. found. "
    else:
        ics_text = "the two measures disagree, so BN neither clearly reduces nor increases ICS here. "

    def compare(key: str, label: str, digits: str = ".3g") -> str:
        b, n = m("BN", key), m("no BN", key)
        return f"{label} {b:{digits}} with BN vs {n:{digits}} without ({'lower' if b < n else 'higher'} with BN)"

    smoother = sum(m("BN", k) < m("no BN", k) for k in ("loss_range", "grad_pred", "beta"))
    answer = (
        f"BN reaches {100 * TARGET:.0f}% test accuracy {when(metrics['BN']['steps_to_target'])} (without BN: "
        f"{when(metrics['no BN']['steps_to_target'])}; mean over seeds; "
        f"Ioffe & Szegedy's Figure 1 shows the same faster start), and ends at {m('BN', 'final_acc'):.1f}% vs "
        f"{m('no BN', 'final_acc'):.1f}% after {steps} steps. Noisy BN, whose layer inputs jump at every step (median jitter "
        f"{m('noisy BN', 'jitter'):.2f} vs {m('BN', 'jitter'):.2f} with BN and {m('no BN', 'jitter'):.2f} without), "
        f"reaches {100 * TARGET:.0f}% {when(metrics['noisy BN']['steps_to_target'])} and ends at "
        f"{m('noisy BN', 'final_acc'):.1f}%"
        + (" — as well as BN, so stable layer-input distributions are not what makes BN train well. " if noisy_ok
           else " — clearly below BN here, so this run does not reproduce that part of Santurkar et al. ")
        + f"Gradient-based ICS: ‖G − G′‖ {m('BN', 'ics_l2'):.3g} with BN vs {m('no BN', 'ics_l2'):.3g} without, cos "
        f"{m('BN', 'ics_cos'):.3f} vs {m('no BN', 'ics_cos'):.3f}: " + ics_text
        + f"Landscape ({smoother} of 3 measures lower with BN): " + "; ".join(
            [compare("loss_range", "loss range"), compare("grad_pred", "gradient change"),
             compare("beta", "effective β-smoothness")])
        + (". Santurkar et al.'s smoother-landscape explanation is supported here." if smoother >= 2
           else ". The smoother-landscape explanation is not supported by this run's numbers.")
    )
    return Section(
        name=NAME, title=TITLE, question=QUESTION,
        setup=(
            f"MLP 784-{'-'.join(map(str, HIDDEN))}-10 with sigmoids (Ioffe & Szegedy's Figure 1 net; Glorot-normal weights) on "
            f"4000 MNIST digits (1000 test), SGD (momentum 0.9) lr {LR}, batch {BATCH}, {steps} steps, for three variants: no "
            "normalization (linear layers with bias, zero-initialized), BatchNorm before every sigmoid, and noisy BN (BN, then y·s + m "
            "with per-unit m ~ U(−1, 1) and log s ~ U(−log 2, log 2) redrawn every step; no noise in eval). "
            f"Every {every} steps, on a fresh training batch of {BATCH}: internal_covariate_shift (every weight layer, "
            f"lr {LR}) and loss_landscape (steps 0.5, 1, 2, 4 × lr), in training mode. Percentiles are of the "
            "training batch's input to the last hidden layer's sigmoids at every step; 'median jitter' is "
            "mean_t |p50[t+1] − p50[t]| / mean_t (p85 − p15), averaged over the 100 units, second half of training. "
            f"{len(seeds)} seed(s)."
        ),
        answer=answer, tables=[table], figures=[figure1, figure2],
        results={"steps": steps, "metrics": {v: {k: mean_std(vals)[0] for k, vals in metrics[v].items()}
                                             for v in VARIANTS}},
        notes=["Ioffe & Szegedy trained 50 000 steps on the full MNIST; this run is much shorter, on 4000 digits.",
               "Santurkar et al. measure on VGG/CIFAR-10 and a 25-layer linear net; this is the same protocol on a "
               "small MLP."],
    )
