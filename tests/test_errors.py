"""Every bad input gets a ValueError/TypeError saying what was expected, what came, and what to do.

The wording is pinned here (``match=``); change a message in ``_checks.py`` and here together.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm, batch_stats

ONE_VALUE_REMEDIES = r"model\.eval\(\).*BatchRenorm.*GroupNorm"

# (id, callable, exception, regex)
CASES = [
    # wrong feature count
    ("features", lambda: BatchNorm(4)(torch.randn(2, 3, 5)), ValueError,
     r"BatchNorm expected 4 features along axis 1, got input of shape \(2, 3, 5\) with 3 there\. "
     r"Build the layer with num_features=3, or pass axis="),
    ("features-axis-last", lambda: BatchNorm(4, axis=-1)(torch.randn(2, 4, 5)), ValueError,
     r"expected 4 features along axis 2, got input of shape \(2, 4, 5\) with 5 there"),
    ("features-2d", lambda: BatchNorm2d(4)(torch.randn(2, 3, 5, 5)), ValueError, r"BatchNorm2d expected 4 features"),
    # rank < 2
    ("rank1", lambda: BatchNorm(3)(torch.randn(3)), ValueError,
     r"BatchNorm expected an input with at least 2 dimensions \(N, C, \.\.\.\), got a 1D input of shape \(3,\)\. "
     r"Put the samples of a batch along a batch axis"),
    ("rank0", lambda: BatchNorm(3)(torch.tensor(1.0)), ValueError, r"got a 0D input of shape \(\)"),
    ("rank1-functional", lambda: batch_stats(torch.randn(5)), ValueError, r"batch_stats expected an input with at least 2"),
    ("rank1-batch_norm", lambda: batch_norm(torch.randn(5), None, None), ValueError, r"batch_norm expected an input with at least 2"),
    # fixed-rank classes
    ("1d-rank4", lambda: BatchNorm1d(3)(torch.randn(2, 3, 4, 4)), ValueError,
     r"BatchNorm1d expected 2D or 3D input, got 4D input of shape \(2, 3, 4, 4\)\. Use batchnorm\.BatchNorm for any rank"),
    ("2d-rank3", lambda: BatchNorm2d(3)(torch.randn(2, 3, 4)), ValueError, r"BatchNorm2d expected 4D input, got 3D"),
    ("3d-rank4", lambda: BatchNorm3d(3)(torch.randn(2, 3, 4, 4)), ValueError, r"BatchNorm3d expected 5D input, got 4D"),
    # axis out of range / not an int
    ("axis-range", lambda: BatchNorm(3, axis=3)(torch.randn(2, 3, 4)), ValueError,
     r"axis=3 is out of range for a 3D input of shape \(2, 3, 4\): expected an integer in \[-3, 2\]\. "
     r"Use axis=1 for \(N, C, \.\.\.\) inputs and axis=-1"),
    ("axis-range-neg", lambda: batch_stats(torch.randn(2, 3), axis=-3), ValueError, r"axis=-3 is out of range for a 2D input"),
    ("axis-range-bn", lambda: batch_norm(torch.randn(2, 3), None, None, axis=2), ValueError, r"axis=2 is out of range"),
    ("axis-type", lambda: BatchNorm(3, axis=1.0), TypeError, r"axis must be an int, got float 1\.0\. Pass the index"),
    ("axis-bool", lambda: BatchNorm(3, axis=True), TypeError, r"axis must be an int, got bool"),
    # dtype
    ("dtype-int", lambda: BatchNorm(3)(torch.ones(4, 3, dtype=torch.long)), TypeError,
     r"BatchNorm expected a floating-point input \(float16, bfloat16, float32 or float64\), got dtype torch\.int64\. "
     r"Convert it first, e.g\. x\.float\(\)"),
    ("dtype-bool", lambda: BatchNorm(3)(torch.ones(4, 3, dtype=torch.bool)), TypeError, r"got dtype torch\.bool"),
    ("dtype-complex", lambda: batch_stats(torch.ones(4, 3, dtype=torch.complex64)), TypeError, r"got dtype torch\.complex64"),
    ("not-a-tensor", lambda: BatchNorm(3)([[1.0, 2.0, 3.0]]), TypeError,
     r"BatchNorm expected a torch\.Tensor input, got list\. Convert it with torch\.as_tensor"),
    # num_features
    ("num_features-0", lambda: BatchNorm(0), ValueError,
     r"BatchNorm expected num_features to be a positive int, got 0\. Pass the size of the feature axis"),
    ("num_features-float", lambda: BatchNorm(2.5), ValueError, r"positive int, got 2\.5"),
    # momentum
    *[(f"momentum-{m!r}", (lambda m=m: BatchNorm(3, momentum=m)), ValueError,
       r"momentum must be None or a number in \[0, 1\], got .*\. It is the weight of the new batch \(PyTorch convention\): "
       r"a Keras/Flax momentum of 0\.99 is momentum=0\.01 here")
      for m in (-0.1, 1.5, float("nan"), "0.1", True)],
    ("momentum-functional", lambda: batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=2.0),
     ValueError, r"momentum must be None or a number in \[0, 1\], got 2\.0"),
    # eps
    *[(f"eps-{e!r}", (lambda e=e: BatchNorm(3, eps=e)), ValueError,
       r"eps must be a finite number > 0, got .*\. It keeps 1/sqrt\(var \+ eps\) finite")
      for e in (0.0, -1e-5, float("nan"), float("inf"), 0)],
    ("eps-functional", lambda: batch_norm(torch.randn(4, 3), None, None, eps=0.0), ValueError, r"eps must be a finite number > 0, got 0\.0"),
    # one value per feature when training
    ("one-value-2d", lambda: BatchNorm(3)(torch.randn(1, 3)), ValueError,
     r"BatchNorm expected more than 1 value per feature when training, got 1 for input of shape \(1, 3\)\. "
     r"Statistics of one value are undefined\. Instead: call model\.eval\(\) to normalize with the running estimates, "
     r"use a larger batch, use batchnorm\.BatchRenorm.*or use a batch-independent norm such as torch\.nn\.GroupNorm"),
    ("one-value-3d", lambda: BatchNorm1d(3)(torch.randn(1, 3, 1)), ValueError, r"got 1 for input of shape \(1, 3, 1\)"),
    ("one-value-4d", lambda: BatchNorm2d(3)(torch.randn(1, 3, 1, 1)), ValueError, ONE_VALUE_REMEDIES),
    ("one-value-axis-last", lambda: BatchNorm(3, axis=-1)(torch.randn(1, 1, 3)), ValueError, ONE_VALUE_REMEDIES),
    ("one-value-untracked", lambda: BatchNorm(3, track_running_stats=False).eval()(torch.randn(1, 3)), ValueError,
     ONE_VALUE_REMEDIES),
    ("one-value-functional", lambda: batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True),
     ValueError, r"batch_norm expected more than 1 value per feature when training, got 1"),
    ("one-value-mask", lambda: BatchNorm(3)(torch.randn(2, 3, 4), mask=torch.eye(2, 4, dtype=torch.bool)[:1].expand(2, 4) & (torch.arange(2) == 0)[:, None]),
     ValueError, r"got 1 \(counting only positions where mask is True\) for input of shape \(2, 3, 4\).*" + ONE_VALUE_REMEDIES),
    ("zero-value-mask", lambda: BatchNorm(3, axis=-1)(torch.randn(2, 4, 3), mask=torch.zeros(2, 4, dtype=torch.bool)),
     ValueError, r"got 0 \(counting only positions where mask is True\)"),
    # mask shape / dtype / type
    ("mask-shape", lambda: BatchNorm(3)(torch.randn(4, 3, 5), mask=torch.ones(4, 6, dtype=torch.bool)), ValueError,
     r"mask must have the shape of the input without the feature axis, \(4, 5\) \(or broadcast to it\), got \(4, 6\) "
     r"for input of shape \(4, 3, 5\) with axis=1\. Pass a mask without the feature axis: a padding mask for "
     r"\(N, C, L\) input is \(N, L\)"),
    ("mask-with-feature-axis", lambda: BatchNorm(3)(torch.randn(4, 3, 5), mask=torch.ones(4, 3, 5, dtype=torch.bool)),
     ValueError, r"mask must have the shape of the input without the feature axis, \(4, 5\)"),
    ("mask-dtype", lambda: BatchNorm(3)(torch.randn(4, 3, 5), mask=torch.ones(4, 5)), TypeError,
     r"mask must be a boolean tensor, got dtype torch\.float32\. Pass mask\.bool\(\)"),
    ("mask-dtype-int", lambda: batch_stats(torch.randn(4, 3), mask=torch.ones(4, dtype=torch.long)), TypeError,
     r"mask must be a boolean tensor, got dtype torch\.int64"),
    ("mask-type", lambda: BatchNorm(3)(torch.randn(4, 3), mask=[True] * 4), TypeError,
     r"mask must be a boolean torch\.Tensor of shape \(4,\), got list\. Build it with torch\.as_tensor"),
    ("mask-device", lambda: BatchNorm(3)(torch.randn(4, 3), mask=torch.ones(4, dtype=torch.bool, device="meta")),
     ValueError, r"mask must be on the input's device \(cpu\), got a mask on meta\. Move it with mask\.to\(x\.device\)"),
    # functional buffers of the wrong size
    ("running-shape", lambda: batch_norm(torch.randn(4, 3), torch.zeros(4), torch.ones(3)), ValueError,
     r"batch_norm expected running_mean of shape \(3,\) for input of shape \(4, 3\) with axis=1, got \(4,\)\. "
     r"Pass per-feature tensors of length 3"),
    ("momentum-none-no-counter", lambda: batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None),
     ValueError, r"batch_norm expected num_batches_tracked with momentum=None .*got None\. Pass num_batches_tracked="),
    ("weight-shape", lambda: batch_norm(torch.randn(4, 3), None, None, torch.ones(2)), ValueError,
     r"expected weight of shape \(3,\)"),
]


@pytest.mark.parametrize("fn, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_message(fn, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        fn()


def test_every_message_says_expected_got_and_what_to_do() -> None:
    """A structural check on the table: each pinned message was raised and names what came in."""
    for name, fn, exc, _ in CASES:
        with pytest.raises(exc) as info:
            fn()
        msg = str(info.value)
        assert "expected" in msg or "must" in msg, (name, msg)
        assert any(w in msg for w in ("got", "is out of range for")), (name, msg)
        assert any(w in msg for w in ("Use ", "use ", "Pass ", "pass ", "Put ", "Convert", "Build", "Move it", "call ")), (name, msg)


@pytest.mark.parametrize("attr, value, pattern", [("momentum", 1.5, "momentum must be"), ("eps", 0.0, "eps must be")])
def test_reassigned_attributes_are_checked_at_forward(attr, value, pattern) -> None:
    layer = BatchNorm(3)
    setattr(layer, attr, value)
    with pytest.raises(ValueError, match=pattern):
        layer(torch.randn(4, 3))


@pytest.mark.parametrize(
    "shape, kwargs",
    [((1, 3), {}), ((1, 3, 1), {}), ((1, 3), {"track_running_stats": False})],
)
def test_one_value_is_fine_in_eval_mode(shape, kwargs) -> None:
    """The remedy the message names really works (eval with running estimates)."""
    layer = BatchNorm(3, **kwargs).eval()
    if layer.track_running_stats:
        assert layer(torch.randn(shape)).shape == shape
    else:
        with pytest.raises(ValueError, match="more than 1 value"):
            layer(torch.randn(shape))


@pytest.mark.parametrize("shape", [(1, 3, 2), (2, 3)])
def test_two_values_train_like_torch(shape) -> None:
    ours, ref = BatchNorm(3), nn.BatchNorm1d(3)
    torch.testing.assert_close(ours(x := torch.randn(shape)), ref(x), rtol=1e-4, atol=1e-5)


def test_one_value_error_also_raised_by_torch() -> None:
    """The same inputs that torch refuses (so ours is not stricter)."""
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm1d(3)(torch.randn(1, 3))


# -- non-finite batches --------------------------------------------------------------------------

BAD = [
    ("nan", float("nan"), {}),
    ("inf", float("inf"), {}),
    ("-inf", float("-inf"), {"axis": -1}),
    ("nan-cumulative", float("nan"), {"momentum": None}),
]


@pytest.mark.parametrize("value, kwargs", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_non_finite_batch_leaves_running_estimates_unchanged(value, kwargs) -> None:
    layer = BatchNorm(3, **kwargs)
    good = torch.randn(6, 3, 4) if kwargs.get("axis", 1) == 1 else torch.randn(6, 4, 3)
    layer(good)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn_like(good)
    index = (2, 0, 1) if kwargs.get("axis", 1) == 1 else (2, 1, 0)
    bad[index] = value  # only feature 0 is poisoned
    with pytest.warns(RuntimeWarning, match=r"batch statistics are not finite .*running estimates and num_batches_tracked were left unchanged"):
        y = layer(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k  # every feature, and the count
    assert y.shape == bad.shape
    # the output is still computed: the clean features are normalized with their batch statistics
    ax = layer.axis % 3
    clean = bad.index_select(ax, torch.tensor([1, 2]))
    dims = [d for d in range(3) if d != ax]
    var, mean = torch.var_mean(clean, dim=dims, correction=0, keepdim=True)
    expected = (clean - mean) / torch.sqrt(var + layer.eps)
    torch.testing.assert_close(y.index_select(ax, torch.tensor([1, 2])), expected, rtol=1e-4, atol=1e-5)
    assert not torch.isfinite(y.index_select(ax, torch.tensor([0]))).all()
    # and a good batch afterwards updates as usual
    layer(good)
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_non_finite_batch_functional_with_counter() -> None:
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(5)
    x = torch.randn(4, 3)
    x[0, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(nbt) == 5


def test_finite_batch_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchNorm(3)(torch.randn(4, 3) * 1e3)


def test_float16_overflowing_batch_is_finite() -> None:
    """Values near fp16's max: statistics are reduced in float32, so nothing overflows (torch #20215)."""
    x = (torch.rand(64, 3) * 30000 + 30000).half()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = BatchNorm(3)
        y = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_var).all()
    assert batchnorm.batch_stats(x)[1].dtype == torch.float32


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_at_masked_positions_do_not_count(value, backend) -> None:
    """Padding may hold garbage (NaN/Inf from a previous layer): masked-out positions never enter the
    statistics, so the batch is accepted, the counted outputs are finite and equal those with clean padding."""
    x = torch.randn(3, 5, 2)
    mask = torch.arange(5) < torch.tensor([5, 3, 2])[:, None]
    dirty = x.clone()
    dirty[~mask] = value
    clean_layer, dirty_layer = BatchNorm(2, axis=-1), BatchNorm(2, axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_dirty = dirty_layer(dirty, mask=mask)
    y_clean = clean_layer(x, mask=mask)
    torch.testing.assert_close(y_dirty[mask], y_clean[mask])
    torch.testing.assert_close(dirty_layer.running_var, clean_layer.running_var)
    assert int(dirty_layer.num_batches_tracked) == 1
    # Gradients are those of the formula, in which every position's x̂ enters Σ dy·x̂ (masked positions
    # are normalized too); IEEE gives 0·NaN = NaN, so backward needs finite padding, as documented.
    # With finite garbage the gradient of the counted positions does not depend on the garbage:
    x_big = x.clone()
    x_big[~mask] = 1e6
    grads = []
    for xin in (x, x_big):
        xr = xin.clone().requires_grad_(True)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * mask.unsqueeze(-1)
        BatchNorm(2, axis=-1)(xr, mask=mask).backward(dy)  # a loss that ignores padding
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1])
