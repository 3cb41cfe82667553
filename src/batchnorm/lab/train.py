"""Shared training and evaluation loops of the lab (minibatch SGD/Adam with a progress bar).

Example::

    >>> from batchnorm.lab import core, data, models, train
    >>> ctx = core.Context(seeds=1, quick=True)
    >>> x, y, xt, yt = data.mnist1d()
    >>> model = models.CNN1d(1, 10, norm="bn")
    >>> hist = train.fit(model, (x, y), ctx=ctx, epochs=2, lr=0.05, seed=0, eval_data=(xt, yt))
    >>> hist.final_test_acc
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .core import Context

#: a training run whose loss exceeds this (or is NaN/Inf) is stopped and marked diverged
DIVERGED_LOSS = 1e3


def set_threads(n: int = 1) -> None:
    """Use ``n`` intra-op threads everywhere (timings and results comparable across runs and machines)."""
    torch.set_num_threads(max(1, int(n)))


def batches(n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Index tensors of one shuffled epoch over ``n`` samples (``drop_last`` skips a short final batch).

    Example: ``[len(i) for i in batches(10, 4, torch.Generator().manual_seed(0))] == [4, 4]``.
    """
    if batch_size < 1:
        raise ValueError(f"batches expected batch_size >= 1, got {batch_size}.")
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
             train_mode: bool = False) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on ``(x, y)`` in eval mode (or train mode, no updates).

    ``train_mode=True`` normalizes with batch statistics of each evaluation batch, without touching
    running estimates (they are saved and restored). The model's mode is restored afterwards.
    """
    was_training = model.training
    saved = {k: v.clone() for k, v in model.state_dict().items()} if train_mode else None
    model.train(train_mode)
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size]).float()
        total_loss += nn.functional.cross_entropy(out, y[i : i + batch_size], reduction="sum").item()
        correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    if saved is not None:
        model.load_state_dict(saved)
    model.train(was_training)
    n = max(len(x), 1)
    return total_loss / n, correct / n


@dataclass
class History:
    """What one training run measured. ``steps`` and ``losses`` are per recorded step (every ``log_every``)."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    diverged: bool = False
    diverged_at: int | None = None
    final_train_loss: float = math.nan
    final_train_acc: float = math.nan
    final_test_loss: float = math.nan
    final_test_acc: float = math.nan
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def make_optimizer(model: nn.Module, name: str, lr: float, *, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``sgd`` (with momentum), ``sgd-plain`` or ``adam`` over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd-plain":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: expected 'sgd', 'sgd-plain' or 'adam'.")


def fit(
    model: nn.Module,
    train_data: tuple[torch.Tensor, torch.Tensor],
    *,
    ctx: Context,
    lr: float,
    seed: int,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int | None = None,
    log_every: int = 1,
    on_step: Callable[[int, nn.Module, torch.Tensor], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    desc: str = "train",
    final_train_eval: bool = True,
) -> History:
    """Train ``model`` with minibatches from ``train_data`` and return a :class:`History`.

    Runs ``steps`` optimizer steps, or ``epochs`` shuffled epochs (drop-last) when ``steps`` is None.
    Batches are drawn from a generator seeded by ``seed``, so two calls with the same model
    initialization and seed see the same batches. A loss above :data:`DIVERGED_LOSS` or non-finite
    stops training and sets ``diverged`` (final metrics are then NaN / chance as measured).
    ``on_step(step, model, loss)`` is called after each optimizer step (for diagnostics);
    ``eval_every`` evaluates ``eval_data`` every that many steps (and always at the end).
    """
    x, y = train_data
    if batch_size > len(x):
        raise ValueError(f"fit expected batch_size <= number of samples ({len(x)}), got {batch_size}.")
    gen = torch.Generator().manual_seed(int(seed))
    per_epoch = len(x) // batch_size
    total = int(steps) if steps is not None else int(epochs or 1) * per_epoch
    opt = make_optimizer(model, optimizer, lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = loss_fn or nn.functional.cross_entropy
    hist = History()
    start = time.perf_counter()
    step = 0

    def record_eval() -> None:
        if eval_data is None:
            return
        loss, acc = evaluate(model, *eval_data)
        hist.eval_steps.append(step)
        hist.test_loss.append(loss)
        hist.test_acc.append(acc)

    model.train()
    with ctx.bar(total=total, desc=desc) as bar:
        while step < total and not hist.diverged:
            for idx in batches(len(x), batch_size, gen):
                out = model(x[idx])
                loss = loss_fn(out, y[idx])
                value = float(loss.detach())
                if not math.isfinite(value) or value > DIVERGED_LOSS:
                    hist.diverged, hist.diverged_at = True, step
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step % log_every == 0 or step == total:
                    hist.steps.append(step)
                    hist.losses.append(value)
                if on_step is not None:
                    on_step(step, model, loss.detach())
                if eval_every and step % eval_every == 0 and step < total:
                    record_eval()
                    model.train()
                bar.update()
                if step >= total:
                    break
    model.eval()
    if not hist.diverged:
        record_eval()
        if hist.test_acc:
            hist.final_test_loss, hist.final_test_acc = hist.test_loss[-1], hist.test_acc[-1]
        if final_train_eval:
            hist.final_train_loss, hist.final_train_acc = evaluate(model, x, y)
            if not math.isfinite(hist.final_train_loss):
                hist.diverged, hist.diverged_at = True, step
    hist.seconds = time.perf_counter() - start
    return hist


def seeded(ctx: Context, seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model right after seeding torch/NumPy with ``seed`` (same init for the same seed)."""
    ctx.manual_seed(seed)
    return build()
