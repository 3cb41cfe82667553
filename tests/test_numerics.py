"""Numerics on purpose: large offsets (1e4, 1e6), the naive one-pass formula failing where ours holds,
low-precision inputs, and chunked statistics merging exactly (scikit-learn / Flax style)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import BatchNorm, batch_norm, batch_stats, reference
from batchnorm.functional import merge_stats


def _offset_data(offset: float, shape=(256, 4, 16), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) + offset


def _truth(x64: torch.Tensor, axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x64.dim()) if d != axis]
    var, mean = torch.var_mean(x64, dim=dims, correction=0)
    return mean, var


def naive_one_pass_var(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """E[x²] − E[x]² accumulated in x's dtype: the textbook formula that cancels catastrophically."""
    dims = [d for d in range(x.dim()) if d != axis]
    return (x * x).mean(dims) - x.mean(dims) ** 2


@pytest.mark.parametrize("axis", [1, -1])
def test_float32_offset_1e4_variance_within_1e3(axis, backend) -> None:
    x64 = _offset_data(1e4)
    if axis == -1:
        x64 = x64.movedim(1, -1).contiguous()
    x32 = x64.float()
    # the truth is the float64 statistic of the *float32* data (rounding the input is not our error)
    mean_t, var_t = _truth(x32.double(), axis % 3)
    mean, var, _ = batch_stats(x32, axis=axis)
    assert var.dtype == torch.float32
    rel = ((var.double() - var_t).abs() / var_t).max().item()
    assert rel < 1e-3, rel
    assert ((mean.double() - mean_t).abs() / mean_t.abs()).max().item() < 1e-6


def test_naive_one_pass_fails_on_the_same_data() -> None:
    """The comparison the issue asks for: the naive float32 formula is off by far more than 10%."""
    x32 = _offset_data(1e4).float()
    _, var_t = _truth(x32.double())
    naive = naive_one_pass_var(x32)
    rel_naive = ((naive.double() - var_t).abs() / var_t).max().item()
    rel_ours = ((batch_stats(x32)[1].double() - var_t).abs() / var_t).max().item()
    assert rel_naive > 0.1, rel_naive
    assert rel_ours < 1e-3 < rel_naive


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_layer_output_under_large_offsets(offset, backend) -> None:
    """Flax-style stress: with x = offset + N(0, 1) in float32, outputs still have unit variance per feature
    and match the float64 computation on the same float32 input (to float32 rounding of x itself)."""
    x32 = _offset_data(offset, shape=(64, 3, 32)).float()
    layer = BatchNorm(3)
    y = layer(x32)
    y64 = reference.forward_train(x32.double().numpy(), axis=1)[0]
    # x itself is rounded to ulp(offset) ≈ offset·6e-8; relative to a unit std that is the floor
    floor = offset * 1.2e-7
    np.testing.assert_allclose(y.detach().double().numpy(), y64, atol=max(1e-4, 20 * floor), rtol=0)
    _, var_y, _ = batch_stats(y)
    torch.testing.assert_close(var_y, torch.ones(3), rtol=1e-3 if offset < 1e5 else 0.05, atol=0)
    # running estimates: mean ≈ 0.1·offset, unbiased variance ≈ 0.9 + 0.1·σ²
    _, var_t = _truth(x32.double())
    n = 64 * 32
    expected_rv = 0.9 + 0.1 * var_t * n / (n - 1)
    torch.testing.assert_close(layer.running_var.double(), expected_rv, rtol=1e-3 if offset < 1e5 else 0.05, atol=0)


def test_offset_1e6_naive_is_meaningless_ours_is_not() -> None:
    x32 = _offset_data(1e6, shape=(128, 2, 32)).float()
    _, var_t = _truth(x32.double())
    rel_ours = ((batch_stats(x32)[1].double() - var_t).abs() / var_t).max().item()
    rel_naive = ((naive_one_pass_var(x32).double() - var_t).abs() / var_t).max().item()
    assert rel_ours < 1e-2, rel_ours
    assert rel_naive > 1.0, rel_naive


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_statistics_in_float32(dtype, backend) -> None:
    x = (torch.randn(512, 3, 8) * 0.5 + 100).to(dtype)
    mean, var, _ = batch_stats(x)
    assert mean.dtype == var.dtype == torch.float32
    mean_t, var_t = _truth(x.double())
    torch.testing.assert_close(var.double(), var_t, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), mean_t, rtol=1e-6, atol=0)
    layer = BatchNorm(3)
    y = layer(x)
    assert y.dtype == dtype and layer.running_var.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("chunks", [[1, 2, 50, 203, 256], [128, 128], [255, 1]])
def test_chunked_merge_equals_one_batch(chunks) -> None:
    """Chan's merge of per-chunk (count, mean, m2) equals the statistics of the whole batch, even when
    chunks have one row and the data sit at 1e4 (scikit-learn's chunk sizes 1, 2, 50, n, n+k)."""
    x = _offset_data(1e4, shape=(sum(chunks), 3)).float()
    n, m, m2 = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    start = 0
    for size in chunks:
        mean_c, var_c, count_c = batch_stats(x[start : start + size])
        n, m, m2 = merge_stats(n, m, m2, count_c, mean_c, var_c * count_c)
        start += size
    mean_t, var_t = _truth(x.double())
    assert torch.equal(n, torch.full((3,), float(sum(chunks))))
    torch.testing.assert_close((m2 / n).double(), var_t, rtol=1e-3, atol=0)
    torch.testing.assert_close(m.double(), mean_t, rtol=1e-6, atol=0)


def test_constant_feature_is_finite(backend) -> None:
    """Zero variance: y = β (x̂ = 0), gradients finite; eps is what keeps 1/σ finite.

    Our kernels form the constants in float64 and give β exactly; ATen's float32 kernel (native backend)
    carries its own round-off of the mean, amplified by 1/sqrt(eps): there it must equal torch's BatchNorm.
    """
    x = torch.full((8, 2), 3.0, requires_grad=True)
    layer = BatchNorm(2)
    with torch.no_grad():
        layer.bias.fill_(0.5)
    y = layer(x)
    if backend == "native":
        ref = torch.nn.BatchNorm1d(2)
        with torch.no_grad():
            ref.bias.fill_(0.5)
        torch.testing.assert_close(y, ref(x))
    else:
        torch.testing.assert_close(y, torch.full((8, 2), 0.5))
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    assert torch.equal(layer.running_var, torch.full((2,), 0.9))


def test_large_batch_float32_mean_is_accurate() -> None:
    """Many positions per feature (2M): the sum is accurate to float32 (no drift from long accumulation)."""
    x = _offset_data(3.0, shape=(64, 2, 16384)).float()
    mean, var, count = batch_stats(x)
    mean_t, var_t = _truth(x.double())
    assert int(count[0]) == 64 * 16384
    torch.testing.assert_close(mean.double(), mean_t, rtol=1e-5, atol=0)
    torch.testing.assert_close(var.double(), var_t, rtol=1e-4, atol=0)


def test_output_float32_close_to_float64_truth() -> None:
    x64 = torch.randn(32, 4, 10, dtype=torch.float64) * 7 - 3
    y32 = batch_norm(x64.float(), None, None, training=True)
    y64 = batch_norm(x64, None, None, training=True)
    torch.testing.assert_close(y32.double(), y64, rtol=0, atol=5e-6)


def test_empty_chunks_are_the_merge_identity() -> None:
    """batch_stats of nothing is (0, 0, count 0), so merging an empty chunk changes nothing (no NaN)."""
    x = torch.randn(10, 3, dtype=torch.float64) + 5
    mean, var, n = batch_stats(x)
    for empty in (torch.randn(0, 3, dtype=torch.float64), batch_stats(x, mask=torch.zeros(10, dtype=torch.bool))):
        e_mean, e_var, e_n = batch_stats(empty) if isinstance(empty, torch.Tensor) else empty
        assert torch.equal(e_n, torch.zeros(3, dtype=e_n.dtype))
        assert torch.equal(e_mean, torch.zeros(3, dtype=e_mean.dtype)) and torch.equal(e_var, torch.zeros(3, dtype=e_var.dtype))
        m_n, m_mean, m_m2 = merge_stats(n, mean, var * n, e_n, e_mean, e_var * e_n)
        assert torch.equal(m_n, n) and torch.equal(m_mean, mean) and torch.equal(m_m2, var * n)


def test_eval_float64_input_with_float32_buffers_is_computed_in_float64(backend) -> None:
    """A float32 layer given float64 input normalizes in float64: the constants are not rounded to float32."""
    layer = BatchNorm(3).eval()
    with torch.no_grad():
        layer.running_mean.fill_(1e4)
    x = (1e4 + 1e-3 * torch.randn(64, 3, 50)).double()
    y = layer(x)
    truth = (x - 1e4) / np.sqrt(1.0 + 1e-5)
    assert y.dtype == torch.float64
    assert (y - truth).abs().max().item() < 1e-9
