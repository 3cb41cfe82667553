"""Diagnostics: observe what batch norm does inside any model (docs/diagnostics.md).

* :func:`monitor` — per-step statistics of every BN-like layer (Ioffe & Szegedy 2015, Figure 1);
* :func:`internal_covariate_shift` — Santurkar et al. (2018), Definition 2.1;
* :func:`loss_landscape` — Santurkar et al. (2018), Section 3.1 (loss range, gradient
  predictiveness, effective β-smoothness);
* :func:`describe` — a table of every BN-like layer: axes, samples per statistic, running state.
"""

from .describe import Description, describe
from .ics import internal_covariate_shift
from .landscape import loss_landscape
from .monitor import STATISTICS, Monitor, monitor

__all__ = [
    "Description",
    "Monitor",
    "STATISTICS",
    "describe",
    "internal_covariate_shift",
    "loss_landscape",
    "monitor",
]
