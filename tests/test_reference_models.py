"""The shipped, trained digits reference models: they load with plain ``from_pretrained`` and work.

Thresholds sit well below the numbers measured below (and in the README) but far above
chance (10%), so an untrained or broken model fails them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualcache_diffusers.reference import digits

NUM_SAMPLES = 20  # two per digit
STEPS = 20
# Measured with this call on seeds 123 / 1 / 2: DiT 1.00 / 0.90 / 0.95, PixArt 0.65 / 0.45 / 0.50 (chance 0.10).
DIT_MIN_ACCURACY = 0.7
PIXART_MIN_ACCURACY = 0.3


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier() -> digits.DigitsClassifier:
    return digits.DigitsClassifier.from_pretrained(digits.CLASSIFIER_DIR)


def _accuracy(classifier: digits.DigitsClassifier, images, labels: list[int]) -> float:
    preds = classifier.predict(digits.to_classifier_input(images))
    return (preds == torch.tensor(labels)).float().mean().item()


def test_classifier_loads_and_is_accurate_on_test_split(classifier):
    assert not classifier.training
    test = digits.load_digits_data("test")
    acc = (classifier.predict(test.images) == test.labels).float().mean().item()
    assert acc >= 0.95, acc
    feats = classifier.features(test.images[:8])
    assert feats.shape == (8, classifier.config.feature_dim)


def test_dit_pipeline_generates_requested_digits(classifier):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(digits.DIT_DIGITS_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_embeds_ada_norm >= digits.DIT_NULL_CLASS
    labels = [i % digits.NUM_CLASSES for i in range(NUM_SAMPLES)]
    out = pipe(
        class_labels=labels,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(123),
        output_type="np",
    )
    images = out.images
    assert images.shape == (NUM_SAMPLES, digits.IMAGE_SIZE, digits.IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    assert _accuracy(classifier, images, labels) >= DIT_MIN_ACCURACY


def test_pixart_pipeline_generates_prompted_digits(classifier):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(digits.PIXART_DIGITS_DIR)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % digits.NUM_CLASSES for i in range(NUM_SAMPLES)]
    prompts = [digits.caption_for(y, ["thick"] if i < digits.NUM_CLASSES else []) for i, y in enumerate(labels)]
    out = pipe(
        prompt=prompts,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(123),
        output_type="np",
        **digits.PIXART_CALL_KWARGS,
    )
    images = out.images
    assert images.shape == (NUM_SAMPLES, digits.IMAGE_SIZE, digits.IMAGE_SIZE, 3)
    assert _accuracy(classifier, images, labels) >= PIXART_MIN_ACCURACY


def test_frechet_distance_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 6))
    assert abs(digits.frechet_distance(feats, feats)) < 1e-6


def test_frechet_distance_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    n, d = 200_000, 3
    mu_a, mu_b = np.array([0.0, 1.0, -1.0]), np.array([2.0, 0.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    a = rng.normal(size=(n, d)) * np.sqrt(var_a) + mu_a
    b = rng.normal(size=(n, d)) * np.sqrt(var_b) + mu_b
    # Diagonal covariances: ||mu_a - mu_b||^2 + sum_i (sigma_a_i - sigma_b_i)^2.
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert digits.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    # Symmetric, and translation of both sets changes nothing.
    assert digits.frechet_distance(b, a) == pytest.approx(digits.frechet_distance(a, b), rel=1e-6)
    assert digits.frechet_distance(a + 5.0, b + 5.0) == pytest.approx(digits.frechet_distance(a, b), rel=1e-6)


def test_frechet_distance_full_covariance_closed_form():
    # Same covariance, different means: FD = ||mu_a - mu_b||^2 exactly in expectation.
    rng = np.random.default_rng(1)
    cov = np.array([[2.0, 0.8], [0.8, 1.0]])
    chol = np.linalg.cholesky(cov)
    base = rng.normal(size=(100_000, 2)) @ chol.T
    shift = np.array([1.5, -2.0])
    assert digits.frechet_distance(base, base + shift) == pytest.approx((shift**2).sum(), abs=1e-6)
