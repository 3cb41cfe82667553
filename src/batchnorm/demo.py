"""``batchnorm demo``: a small 1-D CNN on MNIST-1D, trained with and without BatchNorm."""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

from .lab.data import mnist1d
from .layers import BatchNorm


def cnn1d(use_bn: bool, width: int = 32) -> nn.Sequential:
    """Three conv layers (kernel 5) → global average pool → linear, optionally with BatchNorm after each conv."""
    layers: list[nn.Module] = []
    c_in = 1
    for _ in range(3):
        layers.append(nn.Conv1d(c_in, width, 5, padding=2, bias=not use_bn))
        if use_bn:
            layers.append(BatchNorm(width))
        layers.append(nn.ReLU())
        c_in = width
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def train_eval(model: nn.Module, data, *, epochs: int, lr: float, batch_size: int, seed: int, label: str) -> float:
    x, y, xt, yt = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = epochs * (len(x) // batch_size)
    with tqdm(total=steps, desc=label, leave=False) as bar:
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x), generator=gen)
            for i in range(len(x) // batch_size):
                idx = order[i * batch_size : (i + 1) * batch_size]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
    model.eval()
    with torch.no_grad():
        return (model(xt).argmax(1) == yt).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="batchnorm demo", description=__doc__)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    data = mnist1d()
    start = time.perf_counter()
    results = {}
    for use_bn in (False, True):
        torch.manual_seed(a.seed)
        label = "with BatchNorm" if use_bn else "without BN"
        results[label] = train_eval(cnn1d(use_bn), data, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed, label=label)
    print(f"MNIST-1D, 1-D CNN, {a.epochs} epochs, SGD lr={a.lr}, batch {a.batch_size}:")
    print(f"{'model':<16} {'test accuracy':>13}")
    for label, acc in results.items():
        print(f"{label:<16} {acc:>13.3f}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0
