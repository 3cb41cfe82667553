"""Reusable parity harness: run a layer of ours and a reference layer side by side and compare.

Used by the core tests and meant for the kernels and variants tests too::

    from harness import CASES, Case, make_pair, run_parity

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_my_kernel(case, backend):
        ours, ref = make_pair(case)
        run_parity(ours, ref, case)

What :func:`run_parity` checks, for ``case.steps`` training steps and then ``case.eval_steps``
evaluation steps (same random input and upstream gradient fed to both layers):

* outputs (ours in our layout vs the reference's output moved back from its layout),
  their dtype, and the input's memory format being preserved;
* input gradients and parameter gradients (``weight``, ``bias``), step by step;
* ``running_mean``, ``running_var`` and ``num_batches_tracked`` after every step.

The reference is any module that takes the feature axis at position 1 (``torch.nn.BatchNorm*d``
by default); a case with ``axis != 1`` is compared against the reference on the input with its
feature axis moved to 1 (``x.movedim(axis, 1)``), which is what a user would do by hand.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

import batchnorm

# (rtol, atol) per dtype: forward values, and gradients (which sum over many positions).
TOL = {
    torch.float64: {"fwd": (1e-9, 1e-10), "grad": (1e-8, 1e-9), "stat": (1e-10, 1e-11)},
    torch.float32: {"fwd": (1e-4, 2e-5), "grad": (1e-3, 1e-4), "stat": (1e-5, 1e-6)},
    # bf16 keeps 8 significant bits: one rounding step is ~0.4% relative; outputs of size ~3 may
    # differ by one ulp (1.6e-2) between two correct float32-accumulating implementations.
    torch.bfloat16: {"fwd": (2e-2, 3e-2), "grad": (3e-2, 5e-2), "stat": (1e-4, 1e-5)},
    torch.float16: {"fwd": (2e-3, 4e-3), "grad": (5e-3, 1e-2), "stat": (1e-4, 1e-5)},
}


@dataclass(frozen=True)
class Case:
    """One parity case: layer arguments and the input it is fed (in *our* layout)."""

    shape: tuple[int, ...]
    axis: int = 1
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    affine: bool = True
    bias: bool = True
    track_running_stats: bool = True
    momentum: float | None = 0.1
    eps: float = 1e-5
    steps: int = 3
    eval_steps: int = 1
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_features(self) -> int:
        return self.shape[self.axis]

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        parts = ["x".join(map(str, self.shape)), f"ax{self.axis}", dt]
        if self.channels_last:
            parts.append("cl")
        if not self.affine:
            parts.append("noaffine")
        elif not self.bias:
            parts.append("nobias")
        if not self.track_running_stats:
            parts.append("notrack")
        if self.momentum != 0.1:
            parts.append(f"mom{self.momentum}")
        return "-".join(parts)


def _build_cases() -> list[Case]:
    """The parity table: every rank 2..5 x both feature axes x dtypes x options, pruned to stay fast."""
    shapes = {2: (6, 3), 3: (4, 3, 5), 4: (3, 4, 3, 5), 5: (2, 3, 2, 3, 4)}
    cases: list[Case] = []
    for rank, shape in shapes.items():
        for axis, dtype in itertools.product((1, -1), (torch.float32, torch.float64, torch.bfloat16)):
            s = shape if axis == 1 else (shape[0], *shape[2:], shape[1])
            cases.append(Case(s, axis=axis, dtype=dtype))
        # options, one at a time and a few together, in float64 (exact) and float32
        for dtype in (torch.float64, torch.float32):
            cases += [
                Case(shape, dtype=dtype, affine=False),
                Case(shape, dtype=dtype, bias=False),
                Case(shape, dtype=dtype, track_running_stats=False),
                Case(shape, dtype=dtype, momentum=None),
                Case(shape, dtype=dtype, momentum=0.7, eps=1e-3),
            ]
        cases.append(Case(shape, axis=-1 if rank > 2 else 1, affine=False, momentum=None, dtype=torch.float64))
        if rank in (4, 5):
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                cases.append(Case(shape, dtype=dtype, channels_last=True))
            cases.append(Case(shape, channels_last=True, affine=False, track_running_stats=False))
    return cases


CASES: list[Case] = _build_cases()


def torch_cls(rank: int) -> type[nn.Module]:
    """The torch module for a rank: 2, 3 → BatchNorm1d; 4 → BatchNorm2d; 5 → BatchNorm3d."""
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]


def _kwargs(case: Case) -> dict:
    return dict(
        eps=case.eps, momentum=case.momentum, affine=case.affine,
        track_running_stats=case.track_running_stats, bias=case.bias,
    )


def make_pair(
    case: Case, cls: Callable[..., nn.Module] = batchnorm.BatchNorm, ref_cls: Callable[..., nn.Module] | None = None,
    **extra,
) -> tuple[nn.Module, nn.Module]:
    """Build ``(ours, reference)`` for ``case``; affine parameters get the same random values in both."""
    kw = _kwargs(case)
    # float64 inputs get a float64 module; bf16/fp16 inputs keep float32 parameters and buffers
    kw["dtype"] = torch.float64 if case.dtype == torch.float64 else torch.float32
    ours = cls(case.num_features, axis=case.axis, **kw, **case.extra, **extra)
    ref = (ref_cls or torch_cls(len(case.shape)))(case.num_features, **kw)
    if case.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ours.weight.copy_(ref.weight)
            if case.bias:
                ref.bias.uniform_(-0.5, 0.5)
                ours.bias.copy_(ref.bias)
    return ours, ref


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def make_input(case: Case, generator: torch.Generator | None = None, shift: float = 0.0) -> torch.Tensor:
    """A random input for ``case`` (non-zero mean and non-unit scale per feature), in its memory format."""
    x = torch.randn(case.shape, generator=generator, dtype=torch.float64)
    shape = [1] * len(case.shape)
    shape[case.axis] = case.num_features
    scale = torch.linspace(0.5, 3.0, case.num_features, dtype=torch.float64).reshape(shape)
    x = (x * scale + shift + torch.arange(case.num_features, dtype=torch.float64).reshape(shape)).to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def assert_close(actual, expected, tol: tuple[float, float], what: str) -> None:
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{what}: one side is None ({actual is None=}, {expected is None=})"
        return
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}",
    )


def compare_state(ours: nn.Module, ref: nn.Module, tol: tuple[float, float], when: str = "") -> None:
    """Running statistics, ``num_batches_tracked`` and parameters must agree (None on both sides too)."""
    for name in ("running_mean", "running_var"):
        assert_close(getattr(ours, name), getattr(ref, name), tol, f"{name} {when}")
    a, b = ours.num_batches_tracked, ref.num_batches_tracked
    assert (a is None) == (b is None), f"num_batches_tracked {when}: {a} vs {b}"
    if a is not None:
        assert int(a) == int(b), f"num_batches_tracked {when}: {int(a)} vs {int(b)}"
        assert a.dtype == b.dtype == torch.long


def run_parity(
    ours: nn.Module,
    ref: nn.Module,
    case: Case,
    *,
    inputs: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
    tol: dict | None = None,
    forward_kwargs: dict | None = None,
) -> list[torch.Tensor]:
    """Train ``case.steps`` steps, then evaluate ``case.eval_steps`` steps, comparing everything.

    ``inputs`` (our layout) default to :func:`make_input` draws; ``forward_kwargs`` go to ``ours`` only
    (e.g. an all-true mask). Returns our outputs, for extra checks by the caller.
    """
    tol = tol or TOL[case.dtype]
    g = torch.Generator().manual_seed(seed)
    total = case.steps + case.eval_steps
    if inputs is None:
        inputs = [make_input(case, g, shift=float(i)) for i in range(total)]
    ax = case.axis % len(case.shape)
    outs = []
    for step, x in zip(range(total), itertools.cycle(inputs)):
        training = step < case.steps
        ours.train(training)
        ref.train(training)
        when = f"({'train' if training else 'eval'} step {step}, case {case})"
        xo = x.detach().clone().requires_grad_(True)
        xr = x.detach().movedim(ax, 1).clone().requires_grad_(True)
        if case.channels_last and ax == 1:
            xo = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
            xr = xo.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        yo = ours(xo, **(forward_kwargs or {}))
        yr = ref(xr)
        assert yo.dtype == x.dtype, f"output dtype {when}: {yo.dtype} vs input {x.dtype}"
        assert yo.shape == x.shape
        assert _memory_format(yo) == _memory_format(xo), f"memory format not preserved {when}"
        assert_close(yo, yr.movedim(1, ax), tol["fwd"], f"output {when}")
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
        yo.backward(dy)
        yr.backward(dy.movedim(ax, 1))
        assert xo.grad is not None and xo.grad.dtype == x.dtype
        assert_close(xo.grad, xr.grad.movedim(1, ax), tol["grad"], f"input grad {when}")
        for name in ("weight", "bias"):
            po, pr = getattr(ours, name), getattr(ref, name)
            assert (po is None) == (pr is None), f"{name} presence {when}"
            if po is not None:
                assert po.dtype == pr.dtype, f"{name} dtype {when}"
                assert_close(po.grad, pr.grad, tol["grad"], f"{name}.grad {when}")
                po.grad = pr.grad = None
        compare_state(ours, ref, tol["stat"], when)
        outs.append(yo.detach())
    return outs


def parity_ids(cases: Iterable[Case]) -> list[str]:
    return [str(c) for c in cases]


def with_(case: Case, **changes) -> Case:
    """A copy of ``case`` with some fields changed (``dataclasses.replace``)."""
    return replace(case, **changes)
