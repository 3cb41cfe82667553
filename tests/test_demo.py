"""`batchnorm demo`: trains both models and prints their test accuracies side by side."""

from __future__ import annotations

import re

import torch

from batchnorm import demo


def test_demo_prints_both_accuracies_above_chance_and_restores_threads(capsys) -> None:
    threads = torch.get_num_threads()
    assert demo.main(["--epochs", "2"]) == 0
    assert torch.get_num_threads() == threads  # the demo's one-thread setting does not leak into the caller
    out = capsys.readouterr().out
    acc = {label: float(v) for label, v in re.findall(r"^(without BN|with BatchNorm)\s+([0-9.]+)$", out, re.M)}
    assert set(acc) == {"without BN", "with BatchNorm"}
    assert all(0.2 < a <= 1.0 for a in acc.values()), acc  # 10 classes: chance is 0.1
