"""``batchnorm demo``: a small 1-D CNN on MNIST-1D, trained with and without BatchNorm.

The model is the lab's :class:`batchnorm.lab.models.CNN1d` (3 conv layers of width 32, kernel 5,
then mean pooling and a linear head) and the loop is the lab's :func:`batchnorm.lab.train.fit`.
"""

from __future__ import annotations

import argparse
import time

from .lab import train
from .lab.core import Context
from .lab.data import mnist1d
from .lab.models import CNN1d


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``batchnorm demo``: train both models, print their test accuracies; returns 0."""
    p = argparse.ArgumentParser(
        prog="batchnorm demo",
        description=("Train a small 1-D convolutional network (3 layers of 32 channels) on MNIST-1D twice, once "
                     "without and once with BatchNorm, and print both test accuracies. The data is generated "
                     "locally; nothing is downloaded."),
        epilog="For the full set of experiments and plots, run 'batchnorm lab'.",
    )
    p.add_argument("--epochs", type=int, default=8, metavar="N",
                   help="passes over the 4000 training sequences for each model (default 8)")
    p.add_argument("--lr", type=float, default=0.05, metavar="RATE",
                   help="learning rate of SGD with momentum 0.9 (default 0.05)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="samples per training step (default 64)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed for the weights and the order of the batches (default 0)")
    a = p.parse_args(argv)
    for name, value in (("--epochs", a.epochs), ("--batch-size", a.batch_size)):
        if value < 1:
            p.error(f"{name} must be at least 1, got {value}")
    if not a.lr > 0:
        p.error(f"--lr must be a positive number, got {a.lr}")
    import torch

    from .lab.run import set_threads

    before = torch.get_num_threads()
    set_threads(1)  # tiny models: one thread is fastest and gives the same numbers on any machine (as in the lab)
    try:
        _train_and_print(a)
    finally:
        set_threads(before)  # a caller's thread settings (e.g. a test session) are left as they were
    return 0


def _train_and_print(a: argparse.Namespace) -> None:
    x, y, xt, yt = mnist1d()
    ctx = Context(seeds=1, seed=a.seed)
    start = time.perf_counter()
    results = {}
    for norm, label in (("none", "without BN"), ("bn", "with BatchNorm")):
        model = train.seeded(ctx, a.seed, lambda norm=norm: CNN1d(1, 10, width=32, depth=3, norm=norm))
        hist = train.fit(model, (x, y), ctx=ctx, lr=a.lr, seed=a.seed, epochs=a.epochs, batch_size=a.batch_size,
                         optimizer="sgd", eval_data=(xt, yt), final_train_eval=False, desc=label)
        results[label] = hist.final_test_acc
    print(f"MNIST-1D, 1-D CNN, {a.epochs} epochs, SGD lr={a.lr}, batch {a.batch_size}:")
    print(f"{'model':<16} {'test accuracy':>13}")
    for label, acc in results.items():
        print(f"{label:<16} {acc:>13.3f}")
    print(f"({time.perf_counter() - start:.1f} s)")

