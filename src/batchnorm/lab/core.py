"""What every lab experiment shares: the run context, the section it returns, and small statistics helpers.

An experiment is a module in ``batchnorm/lab/`` with::

    NAME = "batch-size"                       # the command-line name
    TITLE = "Batch size: ..."                 # the report heading
    QUESTION = "Does BN work with batch size 1?"  # one sentence, the seed question it answers
    def run(ctx: Context) -> Section: ...

``run`` does all its measuring through ``ctx`` (seeds, budgets, progress bars) and returns a
:class:`Section`; the report writer turns sections into ``report.html``, ``report.md`` and
``results.json``. Every number in a section must come from this run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


@dataclass
class Context:
    """Settings of one lab run, handed to every experiment."""

    seeds: int = 3
    quick: bool = False
    seed: int = 0
    progress: bool = True

    def seed_values(self) -> list[int]:
        """The seeds to average over: ``seed, seed + 1, ...`` (``--seeds`` of them)."""
        return [self.seed + i for i in range(self.seeds)]

    def budget(self, full: int, quick: int) -> int:
        """A size (steps, epochs, samples) that shrinks under ``--quick``."""
        return quick if self.quick else full

    def bar(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = ""):
        """A tqdm progress bar that disappears when done (and is silent with ``progress=False``)."""
        return tqdm(iterable, total=total, desc=desc, leave=False, disable=not self.progress)

    def quiet(self) -> Context:
        """A copy of this context with progress bars off (for inner loops under an outer bar)."""
        return replace(self, progress=False)

    @staticmethod
    def manual_seed(seed: int) -> torch.Generator:
        """Seed torch and NumPy globally and return a torch generator with the same seed."""
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        return torch.Generator().manual_seed(seed)


@dataclass
class Table:
    """A table of the report: header row and rows of cells (strings or numbers)."""

    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    """A matplotlib figure with a caption; the report embeds it as a PNG."""

    figure: Any  # matplotlib.figure.Figure
    caption: str


@dataclass
class Section:
    """One experiment's part of the report."""

    name: str
    title: str
    question: str
    setup: str
    answer: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)  # plain numbers for results.json
    notes: list[str] = field(default_factory=list)
    #: one or two sentences for the report's "findings at a glance" (deciding number and its uncertainty)
    finding: str = ""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of finite-or-not values."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """``"0.912 ± 0.004"`` from repeated measurements."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, squeeze: bool = True):
    """``(figure, axes)`` like ``plt.subplots`` but without pyplot state (no GUI backend, nothing to close).

    Experiments should draw with this so the report writer can save figures from any thread/backend.
    Example: ``fig, ax = subplots(figsize=(5, 3)); ax.plot([0, 1]); Figure(fig, "a line")``.
    """
    from matplotlib.figure import Figure as _MplFigure

    fig = _MplFigure(figsize=figsize or (4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=squeeze)
    return fig, axes


def num(value: float, spec: str = ".3f", missing: str = "n/a") -> str:
    """Format one number for prose, or ``missing`` when it is NaN/inf (e.g. every run diverged).

    Example: ``num(0.91234) == "0.912"``, ``num(float("nan"), missing="diverged") == "diverged"``.
    """
    v = float(value)
    return format(v, spec) if math.isfinite(v) else missing
