"""PSNR / SSIM / classifier metrics on inputs whose answer is known."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dualcache_diffusers import metrics
from dualcache_diffusers.reference.digits import DigitsClassifier


def _random_images(n: int = 3, size: int = 16, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, channels))


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    images = _random_images()
    assert np.isinf(metrics.psnr(images, images)).all()
    np.testing.assert_allclose(metrics.ssim(images, images), 1.0)


def test_known_mse_gives_known_psnr():
    zeros = np.zeros((2, 8, 8, 3))
    np.testing.assert_allclose(metrics.psnr(zeros, zeros + 0.1), 20.0, atol=1e-9)  # MSE 0.01
    np.testing.assert_allclose(metrics.psnr(zeros, zeros + 0.01), 40.0, atol=1e-9)  # MSE 1e-4
    np.testing.assert_allclose(metrics.mse(zeros, zeros + 0.5), 0.25)
    half = zeros.copy()
    half[:, :4] = 0.2  # half the pixels off by 0.2: MSE 0.02
    np.testing.assert_allclose(metrics.psnr(zeros, half), 10 * math.log10(1 / 0.02), atol=1e-9)
    np.testing.assert_allclose(metrics.psnr(zeros, zeros + 25.5, data_range=255.0), 20.0, atol=1e-9)


def test_an_image_holding_nan_is_not_scored_as_identical():
    images = _random_images()
    broken = images.copy()
    broken[1, 0, 0, 0] = np.nan
    scores = metrics.psnr(broken, images)
    assert np.isinf(scores[0]) and np.isnan(scores[1]) and np.isinf(scores[2])
    clips = np.stack([broken, images])  # [2 clips, 3 frames, H, W, C]
    frames = metrics.frame_psnr(clips, np.stack([images, images]))
    assert np.isnan(frames[0, 1]) and np.isinf(frames[1]).all()


def test_psnr_is_per_image():
    a = np.zeros((2, 8, 8, 1))
    b = a.copy()
    b[1] += 0.1
    result = metrics.psnr(a, b)
    assert np.isinf(result[0]) and result[1] == pytest.approx(20.0)


def test_ssim_of_constant_images_matches_the_formula():
    """Constant images have zero variance, so SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b = 0.3, 0.6
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    x, y = np.full((1, 16, 16, 3), a), np.full((1, 16, 16, 3), b)
    np.testing.assert_allclose(metrics.ssim(x, y), expected, rtol=1e-6)


def test_ssim_orders_by_distortion_and_is_symmetric():
    clean = _random_images(seed=1)
    noise = np.random.default_rng(2).normal(size=clean.shape)
    slightly = np.clip(clean + 0.02 * noise, 0, 1)
    heavily = np.clip(clean + 0.3 * noise, 0, 1)
    s_slight, s_heavy = metrics.ssim(clean, slightly), metrics.ssim(clean, heavily)
    assert (s_slight > s_heavy).all() and (s_slight < 1).all() and (s_heavy > -1).all()
    np.testing.assert_allclose(metrics.ssim(slightly, clean), s_slight)
    assert (metrics.psnr(clean, slightly) > metrics.psnr(clean, heavily)).all()


def test_ssim_works_on_images_smaller_than_the_default_window():
    a, b = _random_images(size=5, seed=3), _random_images(size=5, seed=4)
    assert np.isfinite(metrics.ssim(a, b)).all()
    with pytest.raises(ValueError, match="at least 3x3"):
        metrics.ssim(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1)))


def test_input_formats_agree():
    """PIL list, uint8 array, float NHWC array and NCHW tensor of the same pixels give the same numbers."""
    u8 = (_random_images(seed=5) * 255).round().astype(np.uint8)
    other = (_random_images(seed=6) * 255).round().astype(np.uint8)
    as_float = u8 / 255.0
    as_pil = [Image.fromarray(img) for img in u8]
    as_tensor = torch.from_numpy(as_float).permute(0, 3, 1, 2)
    expected = metrics.psnr(u8, other)
    for images in (as_float, as_pil, as_tensor):
        np.testing.assert_allclose(metrics.psnr(images, other), expected)
        np.testing.assert_allclose(metrics.ssim(images, other), metrics.ssim(u8, other))
    assert metrics.as_float_images(as_pil[0]).shape == (1, 16, 16, 3)
    assert metrics.as_float_images(np.zeros((4, 8, 8))).shape == (4, 8, 8, 1)  # grayscale batch


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(np.zeros((1, 8, 8, 3)), np.zeros((2, 8, 8, 3)))
    with pytest.raises(TypeError, match="PIL images, a numpy array or a torch tensor"):
        metrics.psnr([1, 2], [1, 2])


def test_mean_psnr_caps_identical_images():
    assert metrics.mean_psnr([np.inf, np.inf]) == np.inf
    assert metrics.mean_psnr([np.inf, 30.0]) == pytest.approx((metrics.PSNR_CAP_DB + 30.0) / 2)
    assert metrics.mean_psnr([20.0, 30.0]) == pytest.approx(25.0)
    assert math.isnan(metrics.mean_psnr([]))


def test_frechet_distance_known_values():
    features = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shifted = features + torch.tensor([2.0, 0.0, 0.0, 0.0])  # same covariance, mean moved by 2: FD = 4
    assert metrics.frechet_distance(features, shifted) == pytest.approx(4.0, rel=1e-6)


def test_classifier_metrics_with_a_classifier(tmp_path):
    torch.manual_seed(0)
    classifier = DigitsClassifier().eval()
    classifier.save_pretrained(tmp_path / "clf")
    loaded = metrics.load_classifier(tmp_path / "clf")
    images = _random_images(n=6, size=32, seed=7).astype(np.float32)
    features = metrics.classifier_features(loaded, images)
    assert features.shape == (6, loaded.config.feature_dim)
    own = loaded.predict(metrics._classifier_input(images)).tolist()
    assert metrics.classifier_accuracy(loaded, images, own) == 1.0
    assert metrics.classifier_accuracy(loaded, images, [(p + 1) % 10 for p in own]) == 0.0
    fd = metrics.frechet_distance_to_real(loaded, images)
    assert math.isfinite(fd) and fd >= 0


def test_missing_classifier_warns_and_returns_none(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dualcache_diffusers.metrics"):
        assert metrics.load_classifier(tmp_path / "nothing") is None
    assert "Frechet distance and accuracy are skipped" in caplog.text


@pytest.mark.parametrize(
    ("text", "digit"),
    [("a thick seven", 7), ("an eight", 8), ("zero", 0), ("3", 3), ("class_4", 4), ("a cat", None),
     ("one two", None)],
)
def test_digit_of_text(text, digit):
    assert metrics.digit_of_text(text) == digit
