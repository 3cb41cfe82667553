"""Lab §9 (test-data-shift): the corruptions, the model, the data split and the 'samples needed' rule.

The section end to end runs in the quick lab (tests/test_lab.py); these are the parts it is built from.
"""

from __future__ import annotations

import pytest
import torch

from batchnorm.lab import run, shift


def _images(n=6, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_registered_and_protocol():
    assert dict(run.EXPERIMENTS)[shift.NAME] == "batchnorm.lab.shift"
    assert shift.TITLE.startswith("9.") and shift.QUESTION.endswith("?") and callable(shift.run)


def test_contrast_scales_deviations_from_each_image_mean():
    x = _images()
    y = shift.corrupt(x, "contrast", 0.3, seed=0)
    torch.testing.assert_close(y.mean((1, 2, 3)), x.mean((1, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.std((1, 2, 3)), 0.3 * x.std((1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_noise_is_seeded_clipped_and_of_the_given_size():
    x = torch.full((64, 1, 28, 28), 0.5)
    a, b = shift.corrupt(x, "noise", 0.1, seed=3), shift.corrupt(x, "noise", 0.1, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, shift.corrupt(x, "noise", 0.1, seed=4))
    assert a.min() >= 0 and a.max() <= 1
    assert float((a - x).std()) == pytest.approx(0.1, rel=0.05)


def test_blur_keeps_constant_images_and_the_mass_of_a_point():
    const = torch.full((2, 1, 28, 28), 0.7)
    torch.testing.assert_close(shift.corrupt(const, "blur", 1.2, seed=0), const)
    point = torch.zeros(1, 1, 28, 28)
    point[0, 0, 14, 14] = 1.0
    blurred = shift.corrupt(point, "blur", 1.0, seed=0)
    assert float(blurred.sum()) == pytest.approx(1.0, rel=1e-5) and float(blurred.max()) < 0.2


def test_rotation_by_zero_is_the_identity_and_keeps_shape():
    x = _images()
    torch.testing.assert_close(shift.corrupt(x, "rotate", 0.0, seed=0), x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shift.corrupt(x, "rotate", 30.0, seed=0), x, atol=1e-2)


def test_unknown_corruption_is_an_error():
    with pytest.raises(ValueError, match=r"unknown corruption 'fog'; expected one of \['blur', 'contrast'"):
        shift.corrupt(_images(), "fog", 1.0, seed=0)


def test_digits_and_model():
    x, y = shift.digits()
    assert x.shape == (5000, 1, 28, 28) and y.shape == (5000,)
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and set(y.tolist()) == set(range(10))
    assert shift.N_TRAIN + shift.N_POOL + 1000 == len(x)
    model = shift.digit_cnn()
    assert model(x[:3]).shape == (3, 10)
    assert sum(type(m).__name__ == "BatchNorm2d" for m in model.modules()) == len(shift.WIDTHS)


@pytest.mark.parametrize(
    "errors, source, expected",
    [({1: [60, 61, 59], 16: [30, 32, 31], 256: [20, 21, 19]}, [50, 52, 51], 16),   # helps from 16 on
     ({1: [40, 41, 39], 16: [55, 60, 50], 256: [20, 21, 19]}, [50, 52, 51], 256),  # 16 not resolved: only 256
     ({1: [60, 61, 59], 16: [60, 61, 59]}, [50, 52, 51], None)],                     # never
)
def test_samples_needed_rule(errors, source, expected):
    assert shift._needed(errors, source)[0] == expected
