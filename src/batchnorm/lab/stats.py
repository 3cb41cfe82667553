"""The one place where the lab decides whether a measured difference is real at this budget.

Every answer that says "A is higher than B" goes through :func:`compare`: from the per-seed values
of both sides (paired by seed when the experiment pairs them: same seed, same initialization and
batches, same data split) it computes the mean difference and a 95 % Student-t interval for it, and
calls the difference *resolved* only when that interval excludes zero (and the difference exceeds an
optional floor such as the test set's binomial noise). Otherwise the text says "indistinguishable at
this budget". With one seed nothing is resolved: a single run has no spread to compare against.

Rule (paired, n seeds, d_i = a_i − b_i)::

    d̄ = mean(d),  half = t_{0.975, n−1} · sd(d) / √n,  resolved ⇔ n ≥ 2 and |d̄| > max(half, floor)

Unpaired: Welch's interval with the Welch–Satterthwaite degrees of freedom.

Example::

    >>> c = compare([0.91, 0.92, 0.90], [0.80, 0.82, 0.81], paired=True, names=("BN", "no BN"))
    >>> c.resolved, c.sign
    (True, 1)
    >>> c.text(".3f")
    'BN 0.910 vs no BN 0.810: difference +0.100 ± 0.025 (95 % interval, paired by seed, n = 3) — BN higher'

Milestones such as "steps to 85 % accuracy" use :func:`crossing`, which interpolates linearly between
evaluations instead of reporting the first evaluation step (the spread would otherwise be the grid).

Reference: Student's t interval for a mean; B. L. Welch, Biometrika 34 (1947).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
UNRESOLVED = "indistinguishable at this budget"


def _t(df: float, level: float = LEVEL) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray([float(v) if v is not None else math.nan for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """``(mean, half-width)`` of the ``level`` Student-t interval of the mean of the finite values.

    The half-width is NaN for fewer than two values. Example: ``interval([1.0, 3.0])[0] == 2.0``.
    """
    arr = _finite(values)
    if arr.size == 0:
        return math.nan, math.nan
    if arr.size < 2:
        return float(arr.mean()), math.nan
    return float(arr.mean()), _t(arr.size - 1, level) * float(arr.std(ddof=1)) / math.sqrt(arr.size)


def pm(values: Sequence[float], spec: str = ".3f", unit: str = "", level: float = LEVEL) -> str:
    """``"0.912 ± 0.010"``: the mean ± the half-width of its 95 % interval (``"0.912 (1 run)"`` for one value).

    Example: ``pm([1.0, 1.0, 1.0]) == "1.000 ± 0.000"``; ``pm([88.3], ".1f", "%") == "88.3% (1 run)"``.
    """
    m, h = interval(values, level)
    if not math.isfinite(m):
        return "n/a"
    if not math.isfinite(h):
        return f"{m:{spec}}{unit} (1 run)"
    return f"{m:{spec}}{unit} ± {h:{spec}}{unit}"


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare`: means, the difference ``a − b`` and whether it is resolved."""

    names: tuple[str, str]
    mean_a: float
    mean_b: float
    diff: float
    half: float  # half-width of the interval of diff (NaN with fewer than two pairs/values)
    n: int
    paired: bool
    floor: float
    resolved: bool
    by: str = "seed"  # what the pairs share ("seed", "round", ...)

    min_n: int = 2

    @property
    def informative(self) -> bool:
        """True when there were enough pairs/values to resolve, so "not resolved" says something about the effect."""
        return self.n >= max(2, self.min_n)

    @property
    def sign(self) -> int:
        """+1 if a is resolved higher, −1 if resolved lower, 0 if indistinguishable."""
        return 0 if not self.resolved else (1 if self.diff > 0 else -1)

    def verdict(self, higher: str = "higher", lower: str = "lower") -> str:
        """``"BN higher"``, ``"BN lower"`` or ``"indistinguishable at this budget"``."""
        if not self.resolved:
            return UNRESOLVED
        return f"{self.names[0]} {higher if self.diff > 0 else lower}"

    def text(self, spec: str = ".3f", *, unit: str = "", higher: str = "higher", lower: str = "lower") -> str:
        """One clause with both means, the difference, its interval, how it was paired, and the verdict."""
        a, b = self.names
        how = f"paired by {self.by}, n = {self.n}" if self.paired else f"unpaired, n = {self.n}"
        if math.isfinite(self.half):
            d = f"{self.diff:+{spec}}{unit} ± {self.half:{spec}}{unit} (95 % interval, {how})"
        else:
            d = f"{self.diff:+{spec}}{unit} (one run: no interval)"
        return (f"{a} {self.mean_a:{spec}}{unit} vs {b} {self.mean_b:{spec}}{unit}: difference {d} — "
                f"{self.verdict(higher, lower)}")


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    paired: bool,
    names: tuple[str, str] = ("A", "B"),
    floor: float = 0.0,
    level: float = LEVEL,
    by: str = "seed",
    min_n: int = 2,
) -> Comparison:
    """Decide whether ``mean(a) − mean(b)`` is resolved by the per-seed values (see the module docstring).

    Args:
        a, b: one value per seed (NaN/None = a failed run; paired comparisons drop that seed on both sides).
        paired: True when ``a[i]`` and ``b[i]`` share seed ``i`` (same init/batches/split); the lengths must match.
        names: labels used by :meth:`Comparison.text`.
        floor: a difference at most this large is never called resolved (e.g. binomial test-set noise).
        level: confidence level of the interval.
        by: what a pair shares, for the text ("seed", "round").
        min_n: fewest pairs/values that may resolve a difference (2; a smoke test passes more to resolve nothing).

    Shape: 1-D sequences; paired ones of equal length.
    Example: ``compare([1, 1.1], [1.05, 1.0], paired=True).resolved is False``.
    """
    if paired:
        if len(a) != len(b):
            raise ValueError(f"compare(paired=True) expected equal lengths (one value per seed), got {len(a)} and "
                             f"{len(b)}. Pass paired=False for independent samples.")
        pa = np.asarray([math.nan if v is None else float(v) for v in a], dtype=float)
        pb = np.asarray([math.nan if v is None else float(v) for v in b], dtype=float)
        ok = np.isfinite(pa) & np.isfinite(pb)
        pa, pb = pa[ok], pb[ok]
        n = int(pa.size)
        if n == 0:
            return Comparison(names, math.nan, math.nan, math.nan, math.nan, 0, True, floor, False, by)
        diff, half = interval(pa - pb, level)
        mean_a, mean_b = float(pa.mean()), float(pb.mean())
    else:
        fa, fb = _finite(a), _finite(b)
        n = int(min(fa.size, fb.size))
        if n == 0:
            return Comparison(names, math.nan, math.nan, math.nan, math.nan, 0, False, floor, False, by)
        mean_a, mean_b = float(fa.mean()), float(fb.mean())
        diff = mean_a - mean_b
        if n < 2:
            half = math.nan
        else:
            va, vb = fa.var(ddof=1) / fa.size, fb.var(ddof=1) / fb.size
            se = math.sqrt(va + vb)
            if se == 0:
                half = 0.0
            else:
                df = (va + vb) ** 2 / (va**2 / (fa.size - 1) + vb**2 / (fb.size - 1))
                half = _t(df, level) * se
    resolved = bool(n >= max(2, min_n) and math.isfinite(half) and abs(diff) > max(half, floor))
    return Comparison(names, mean_a, mean_b, float(diff), float(half), n, paired, float(floor), resolved, by, min_n)


def crossing(steps: Sequence[float], values: Sequence[float], target: float) -> float:
    """The step at which ``values`` first reaches ``target``, interpolated linearly between evaluations.

    Returns ``steps[0]`` if the first value already reaches it and NaN if none does. Linear interpolation
    between the last evaluation below the target and the first at or above it removes the grid
    quantization of "first evaluation that reaches the target".

    Example: ``crossing([0, 10, 20], [0.5, 0.7, 0.9], 0.8)`` is 15.0 (up to rounding).
    """
    prev_s, prev_v = None, None
    for s, v in zip(steps, values):
        if v >= target:
            if prev_s is None or v == prev_v:
                return float(s)
            return float(prev_s + (target - prev_v) * (s - prev_s) / (v - prev_v))
        prev_s, prev_v = s, v
    return math.nan


def binomial_noise(accuracy: float, n_test: int) -> float:
    """Standard deviation of a test accuracy measured on ``n_test`` samples: ``√(p(1−p)/n)``.

    Example: ``round(binomial_noise(0.9, 1000), 4) == 0.0095``.
    """
    if not math.isfinite(accuracy) or n_test < 1:
        return 0.0
    p = min(max(accuracy, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n_test)
