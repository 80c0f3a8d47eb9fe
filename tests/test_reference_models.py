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
# 32 px PSNR of the shipped PixArt's distilled 16x VAE against the 2x VAE it replaces (docs/reference_models.md:
# 27.0 dB over 20 captions x seeds at 20 steps, 21-36 dB per image).
PIXART_MIN_VAE_PSNR = 25.0


pytestmark = pytest.mark.usefixtures("single_thread_module")  # tiny models: one thread (conftest)


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


def test_pixart_plain_call_works_with_stock_defaults():
    """``pipe(prompt=[...])`` with diffusers' defaults (resolution binning on): 256 px bin, 512 px output."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(digits.PIXART_DIGITS_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor * pipe.transformer.config.sample_size == 512
    image = pipe(prompt=["a seven"], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (512, 512)
    small = pipe(prompt=["a seven"], num_inference_steps=2, output_type="np", **digits.PIXART_CALL_KWARGS).images
    assert small.shape == (1, digits.IMAGE_SIZE, digits.IMAGE_SIZE, 3)


def test_pixart_binned_config_keeps_the_trained_transformer_and_latents():
    """The shipped config (sample_size 32, interpolation_scale 2) computes exactly what the training config
    (sample_size 16, 8x8 tokens at their native positions) computes, on the 16x16 latents of the 256 px bin;
    the VAE decodes them to a 32 px image upsampled 8x (nearest), which the pipeline's resize reads back."""
    from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel

    pipe = PixArtAlphaPipeline.from_pretrained(digits.PIXART_DIGITS_DIR)
    shipped = pipe.transformer.eval()
    trained = PixArtTransformer2DModel.from_config(
        {**shipped.config, "sample_size": 16, "interpolation_scale": None}
    ).eval()
    trained.load_state_dict(shipped.state_dict())
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    text = torch.randn(2, 16, shipped.config.caption_channels, generator=gen)
    mask = torch.ones(2, 16)
    mask[:, 4:] = 0
    kwargs = dict(encoder_hidden_states=text, encoder_attention_mask=mask, timestep=torch.tensor([999, 10]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        assert torch.equal(shipped(latents, **kwargs).sample, trained(latents, **kwargs).sample)
        image = pipe.vae.decode(latents).sample
        assert image.shape == (2, 3, 256, 256)
        small = image[:, :, ::8, ::8]
        assert torch.equal(image, small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3))
        resized = pipe.image_processor.resize_and_crop_tensor(image, 32, 32)
        assert torch.equal(resized, small)
        # close to the 2x AutoencoderKL the transformer was trained with (still shipped with the DiT)
        old = AutoencoderKL.from_pretrained(digits.DIT_DIGITS_DIR / "vae").eval()
        z = pipe(prompt=["a seven", "a thick two"], num_inference_steps=8, output_type="latent", generator=gen,
                 **digits.PIXART_CALL_KWARGS).images
        new_img = (pipe.vae.decode(z).sample[:, :, ::8, ::8] / 2 + 0.5).clamp(0, 1)
        old_img = (old.decode(z / old.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    psnr = 10 * torch.log10(1 / torch.mean((new_img - old_img) ** 2)).item()
    assert psnr > PIXART_MIN_VAE_PSNR, psnr


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


def test_flow_objective_of_the_training_script_is_the_one_diffusers_flow_schedulers_invert():
    """`train_reference_models.py --dit-objective flow` trains on what DPM-Solver++ with flow sigmas decodes:
    at the noise level s of the timestep 1000 s, the clean latents are the noisy ones minus s times the target."""
    from diffusers import DPMSolverMultistepScheduler
    from repo_files import load_repo_file

    train = load_repo_file("scripts/train_reference_models.py", "train_reference_models")

    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    noisy, timesteps, target = train.flow_matching_batch(z0, noise, torch.Generator().manual_seed(0))
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=1.0, prediction_type="flow_prediction")
    scheduler.set_timesteps(20)
    for row in range(2):
        scheduler._step_index = 3
        scheduler.sigmas[3] = timesteps[row] / scheduler.config.num_train_timesteps
        x0 = scheduler.convert_model_output(target[row : row + 1], sample=noisy[row : row + 1])
        torch.testing.assert_close(x0, z0[row : row + 1], atol=1e-5, rtol=1e-5)
    assert ((timesteps > 0) & (timesteps < 1000)).all() and timesteps[0] != timesteps[1]
