"""Experiment 5: how BN computes statistics in hidden layers (seed 004).

A hidden layer's output rarely has the input's dimensions; BN does not care, because it keeps one
mean and one variance *per feature of the tensor it receives* and averages over every other axis:

==================  ======================  =====================  =======================
layer               tensor                  axes reduced           values per statistic
==================  ======================  =====================  =======================
dense               ``(N, C)``              ``(0,)``               N
conv 1-D            ``(N, C, L)``           ``(0, 2)``             N·L
conv 2-D            ``(N, C, H, W)``        ``(0, 2, 3)``          N·H·W
sequence (C last)   ``(N, L, C)``, mask     ``(0, 1)``             number of unpadded steps
==================  ======================  =====================  =======================

The experiment trains four small networks (dense, 1-D conv, 2-D conv, masked sequence model) for a
few steps, then, for every BN layer, captures its input in one training step and checks against the
NumPy textbook algorithm (:mod:`batchnorm.reference`): the statistics (from
:func:`batchnorm.functional.batch_stats` and from the layer's own running-average update), the output,
and the count of values per statistic; :func:`batchnorm.diagnostics.describe` gives the layer table.

Reference: Ioffe & Szegedy (2015), Algorithm 1 and Section 3.2 (convolutions: "effective mini-batch
of size m' = |B|·p·q").
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import reference
from ..diagnostics import describe
from ..functional import batch_stats
from ..layers import BatchNorm
from . import data, models, train
from .core import Context, Figure, Section, Table, subplots

NAME = "hidden-layer-statistics"
TITLE = "5. How are BN statistics computed in hidden layers?"
QUESTION = (
    "Hidden layers have other dimensions than the input: over which values are a hidden BN layer's mean and "
    "variance computed, and does the change of dimensions matter?"
)

BATCH = 32


class Conv2dNet(nn.Module):
    """Two Conv2d → BN → ReLU blocks (stride 1 then 2) → mean pool → Linear, for 28×28 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), BatchNorm(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), BatchNorm(16), nn.ReLU()),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x.reshape(-1, 1, 28, 28)).mean(dim=(2, 3)))


class _Masked(nn.Module):
    """Call a SeqNet with a fixed padding mask (so the training loop can stay mask-agnostic)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask if self.mask is not None and self.mask.shape[0] == x.shape[0] else None
        return self.net(x, mask=mask)


def _networks(seed: int):
    """(label, model, train data (x, y), input description) for the four layer kinds."""
    x1, y1, _, _ = data.mnist1d()
    xd, yd, _, _ = data.mnist_digits(seed=0)
    seq_x = x1.movedim(1, -1)  # (N, 40, 1): a sequence of 40 steps with 1 feature
    return [
        ("dense", models.MLP(40, [128, 64], 10, norm="bn"), (x1.flatten(1), y1), "MNIST-1D, 40 features"),
        ("conv 1-D", models.CNN1d(1, 10, width=24, depth=2, norm="bn"), (x1, y1), "MNIST-1D, 1 channel × 40"),
        ("conv 2-D", Conv2dNet(), (xd, yd), "MNIST digits, 1 × 28 × 28"),
        ("sequence", _Masked(models.SeqNet(1, 10, hidden=32, depth=2, norm="bn")), (seq_x, y1),
         "MNIST-1D as 40 steps × 1 feature, padded"),
    ]


def _formula(shape: tuple[int, ...], axis: int, masked: bool) -> str:
    names = {2: ["N", "C"], 3: ["N", "C", "L"], 4: ["N", "C", "H", "W"]}[len(shape)]
    if axis == len(shape) - 1 and len(shape) == 3:
        names = ["N", "L", "C"]
    reduced = [f"{n}={s}" for i, (n, s) in enumerate(zip(names, shape)) if i != axis]
    return ("unpadded of " if masked else "") + " · ".join(reduced)


def run(ctx: Context) -> Section:
    warm = ctx.budget(30, 5)
    seeds = ctx.seed_values()
    rows_by_layer: dict[tuple[str, str], dict] = {}
    scatter: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    describe_rows: list[list] = []
    for seed in ctx.bar(seeds, desc=NAME):
        torch.manual_seed(seed)
        for label, model, (x, y), what in _networks(seed):
            gen = torch.Generator().manual_seed(seed)
            if isinstance(model, _Masked):
                lengths = torch.randint(10, 41, (BATCH,), generator=gen)
                model.mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
            ctx.manual_seed(seed)
            # a few real training steps so that the hidden activations are not just the initialization's
            train.fit(model, (x, y), ctx=ctx.quiet(), lr=0.05, seed=seed, steps=warm, batch_size=BATCH,
                      final_train_eval=False)
            bns = [(n, m) for n, m in model.named_modules() if isinstance(m, BatchNorm)]
            captured: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
            hooks = [m.register_forward_pre_hook(
                lambda mod, args, kwargs, n=n, captured=captured: captured.update({n: (args[0].detach().clone(), kwargs.get("mask"))}),
                with_kwargs=True) for n, m in bns]
            outs: dict[str, torch.Tensor] = {}
            hooks += [m.register_forward_hook(lambda mod, a, o, n=n, outs=outs: outs.update({n: o.detach().clone()})) for n, m in bns]
            before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns}
            idx = torch.randperm(len(x), generator=gen)[:BATCH]
            model.train()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            for h in hooks:
                h.remove()
            if seed == seeds[0]:
                desc = describe(model)
                for r in desc.rows:
                    describe_rows.append([label, r.get("layer"), r.get("features"), str(r.get("input_shape")),
                                          str(r.get("reduction_axes")), r.get("samples_per_statistic")])
            for name, m in bns:
                xin, mask = captured[name]
                axis = m.axis % xin.dim()
                mean, var, count = batch_stats(xin, axis=axis, mask=mask)
                mask_np = None if mask is None else mask.numpy()
                y_ref, mean_ref, var_ref, n_ref, _ = reference.forward_train(
                    xin.double().numpy(), m.weight.detach().double().numpy(), m.bias.detach().double().numpy(),
                    eps=m.eps, axis=axis, mask=mask_np)
                rm_ref, rv_ref = reference.update_running(before[name][0].double().numpy(), before[name][1].double().numpy(),
                                                          mean_ref, var_ref, n_ref, m.momentum)
                scale = lambda a: max(1.0, float(np.abs(a).max()))  # noqa: E731
                err = {
                    "mean": float(np.abs(mean.double().numpy() - mean_ref).max()) / scale(mean_ref),
                    "var": float(np.abs(var.double().numpy() - var_ref).max()) / scale(var_ref),
                    "output": float(np.abs(outs[name].double().numpy() - y_ref).max()) / scale(y_ref),
                    "running": max(float(np.abs(m.running_mean.double().numpy() - rm_ref).max()) / scale(rm_ref),
                                   float(np.abs(m.running_var.double().numpy() - rv_ref).max()) / scale(rv_ref)),
                }
                # the layer's own statistic, read back from its running-average update
                layer_mean = ((m.running_mean.double() - (1 - m.momentum) * before[name][0].double()) / m.momentum).numpy()
                n = float(n_ref)
                layer_var = ((m.running_var.double() - (1 - m.momentum) * before[name][1].double()) / m.momentum
                             * (n - 1) / n).numpy()  # running_var stores the unbiased variance
                if seed == seeds[0]:
                    scatter.append((mean_ref, layer_mean, var_ref, layer_var))
                key = (label, name)
                r = rows_by_layer.setdefault(key, {"what": what, "shape": tuple(xin.shape), "axis": axis,
                                                   "count": [], "n_ref": [], "C": xin.shape[axis], "err": [],
                                                   "masked": mask is not None})
                r["count"].append(int(count.min()))
                r["n_ref"].append(int(n_ref))
                r["err"].append(err)

    rows, results = [], {"layers": {}}
    for (label, name), r in rows_by_layer.items():
        shape, axis = r["shape"], r["axis"]
        reduced = tuple(i for i in range(len(shape)) if i != axis)
        worst = {k: max(e[k] for e in r["err"]) for k in r["err"][0]}
        counts = sorted(set(r["count"]))
        rows.append([label, name, r["what"], str(shape), axis, str(reduced), _formula(shape, axis, r["masked"]),
                     "–".join(str(c) for c in (counts if len(counts) == 1 else (counts[0], counts[-1]))),
                     r["C"], all(a == b for a, b in zip(r["count"], r["n_ref"])),
                     f"{worst['mean']:.1e}", f"{worst['var']:.1e}", f"{worst['output']:.1e}", f"{worst['running']:.1e}"])
        results["layers"][f"{label}/{name}"] = {"input_shape": list(shape), "axis": axis, "reduced_axes": list(reduced),
                                                "values_per_statistic": r["count"], "features": r["C"],
                                                "max_rel_err": worst}
    tables = [
        Table(["network", "BN layer", "network input", "BN input shape", "feature axis", "axes reduced",
               "values per statistic", "count", "statistics (C)", "count = reference", "mean err",
               "var err", "output err", "running-stats err"], rows,
              f"Every BN layer of four small networks in one training step (batch {BATCH}), against the NumPy "
              "reference (errors: largest relative deviation over features and seeds; the sequence model's "
              "count varies with the random padding)."),
    ]
    if describe_rows:
        tables.append(Table(["network", "layer", "features", "input shape", "reduction axes", "samples per statistic"],
                            describe_rows, "batchnorm.diagnostics.describe on the same networks (first seed). describe reads shapes only, so for the "
                            "masked sequence layers it shows N·L; the mask lowers the real count (table above)."))
    worst_all = max(max(e[k] for e in r["err"] for k in e) for r in rows_by_layer.values())
    results["max_rel_err"] = worst_all
    results["counts_match"] = all(all(a == b for a, b in zip(r["count"], r["n_ref"])) for r in rows_by_layer.values())

    figs = _figures(rows_by_layer, scatter)
    setup = (
        f"Four networks with BatchNorm after every linear/conv layer — dense MLP 40 → 128 → 64 → 10, 1-D CNN "
        f"(2 × 24 channels) on MNIST-1D, 2-D CNN (8, 16 channels) on 28 × 28 digits, and a sequence model with "
        f"features last (BatchNorm(axis=-1) on (N, L, 32), random padding lengths 10–40 masked out) — train "
        f"{warm} SGD steps, then one training step with batch {BATCH} is captured and every BN layer is compared "
        f"with batchnorm.reference.forward_train / update_running in float64; seeds {seeds}."
    )
    ex: dict = {}
    for (label, _name), r in rows_by_layer.items():
        ex.setdefault(label, r)
    from .report import glance_answer

    agrees = bool(results["counts_match"]) and results["max_rel_err"] < 1e-5
    finding = glance_answer(
        "Yes" if agrees else "No",
        ", ".join(f"{label} {_formula(r['shape'], r['axis'], r['masked'])} = {int(np.mean(r['count']))} values"
                  for label, r in ex.items())
        + f" per statistic, matching the NumPy reference to {results['max_rel_err']:.0e} (value counts "
        f"{'all equal' if results['counts_match'] else 'NOT all equal'}); the change of dimensions between layers plays "
        "no role",
    )
    return Section(NAME, TITLE, QUESTION, setup, _answer(rows_by_layer, results), finding=finding, tables=tables, figures=figs,
                   results=results)


def _figures(rows_by_layer, scatter) -> list[Figure]:
    fig, ax = subplots(figsize=(8, 3.8))
    labels = [f"{lbl}\n{name}" for lbl, name in rows_by_layer]
    counts = [np.mean(r["count"]) for r in rows_by_layer.values()]
    feats = [r["C"] for r in rows_by_layer.values()]
    pos = np.arange(len(labels))
    ax.bar(pos - 0.2, counts, width=0.4, label="values per statistic")
    ax.bar(pos + 0.2, feats, width=0.4, label="statistics (features C)")
    ax.set_yscale("log")
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("count (log scale)")
    ax.set_title(f"What each BN layer averages over (batch N = {BATCH})")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    figs = [Figure(fig, "Per BN layer: how many values each mean/variance averages (N, N·L, N·H·W, unpadded "
                        "steps) and how many statistics it keeps (one pair per feature).")]
    fig, axes = subplots(1, 2, figsize=(10, 4.4))
    names = [f"{lbl} {name}" for lbl, name in rows_by_layer]
    for i, (mref, mlayer, vref, vlayer) in enumerate(scatter):
        marker = "os^Dv"[(i // 10) % 5]
        label = names[i] if i < len(names) else f"layer {i + 1}"
        axes[0].scatter(mref, mlayer, s=8, color=f"C{i % 10}", marker=marker, label=label)
        axes[1].scatter(vref, vlayer, s=8, color=f"C{i % 10}", marker=marker)
    for ax, what in ((axes[0], "mean"), (axes[1], "variance")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x" if what == "mean" else None)
        ax.set_xlabel(f"reference {what} (NumPy, by hand)")
        ax.set_ylabel(f"layer's {what}")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=7,
               title="BN layer (network, module name)", title_fontsize=7)
    axes[0].set_title("Batch mean per feature: layer vs reference")
    axes[1].set_title("Batch variance per feature: layer vs reference")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    figs.append(Figure(fig, "Every feature of every BN layer (first seed; colour and marker = layer, see the legend). The layer's batch mean and variance are "
                            "read back from its own running-average update; they "
                            "agree with the hand-computed values when they lie on the dashed line."))
    return figs


def _answer(rows_by_layer, results) -> str:
    parts = []
    ex = {}
    for (label, _name), r in rows_by_layer.items():
        ex.setdefault(label, r)
    bits = []
    for label, r in ex.items():
        shape, axis = r["shape"], r["axis"]
        bits.append(f"{label}: input {tuple(shape)}, one mean/variance per feature (C = {r['C']}) over "
                    f"{_formula(shape, axis, r['masked'])} = {int(np.mean(r['count']))} values")
    parts.append("Per feature, over every other axis of the tensor the layer receives — " + "; ".join(bits) + ".")
    ok = results["counts_match"] and results["max_rel_err"] < 1e-4
    parts.append(
        f"Against the NumPy reference the layers' means, variances, outputs and running-statistics updates agree to "
        f"{results['max_rel_err']:.1e} (relative, float32 vs float64) and every count matches"
        if ok else
        f"Against the NumPy reference the largest relative deviation was {results['max_rel_err']:.1e} and the counts "
        f"{'matched' if results['counts_match'] else 'did NOT all match'}: this needs investigating"
    )
    parts[-1] += (". The dimension change between layers does not enter anywhere: a layer with 128 features keeps "
                  "128 means and 128 variances whatever the input had (40 features, 1 channel, 1 × 28 × 28 pixels), "
                  "and convolutional and sequence layers simply have more values per statistic (every position "
                  "shares its channel's statistics; padded steps are excluded by the mask).")
    return "\n\n".join(parts)
