"""Video helpers (GIF writing, clip grids), temporal-consistency metrics and the moving-digits data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dualcache_diffusers import metrics, video
from dualcache_diffusers.reference import digits, moving_digits


def _clips(n: int = 2, f: int = 4, size: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, f, size, size, 3))


# ---------------------------------------------------------------------------------------------- GIF / grid


def test_clip_grid_places_each_clip_frame_in_its_cell():
    clips = np.zeros((3, 2, 4, 5, 3), dtype=np.uint8)
    for i in range(3):
        for t in range(2):
            clips[i, t] = 10 * i + t + 1
    frames = video.clip_grid(clips, ncols=2, scale=1, pad=1, background=0)
    assert len(frames) == 2
    assert frames[0].size == (2 * (5 + 1) + 1, 2 * (4 + 1) + 1)
    for t, frame in enumerate(frames):
        a = np.asarray(frame)
        assert (a[1:5, 1:6] == 1 + t).all()  # clip 0: row 0, column 0
        assert (a[1:5, 7:12] == 11 + t).all()  # clip 1: row 0, column 1
        assert (a[6:10, 1:6] == 21 + t).all()  # clip 2: row 1, column 0
        assert (a[6:10, 7:12] == 0).all()  # empty cell keeps the background
        assert (a[0] == 0).all()


def test_clip_input_formats_agree():
    rng = np.random.default_rng(1)
    as_uint8 = rng.integers(0, 256, (2, 3, 4, 4, 3), dtype=np.uint8)
    as_float = as_uint8 / 255.0
    as_tensor = torch.from_numpy(as_float).permute(0, 1, 4, 2, 3)
    as_pil = [[Image.fromarray(frame) for frame in clip] for clip in as_uint8]
    for clips in (as_float, as_tensor, as_pil):
        np.testing.assert_array_equal(video.clips_to_uint8(clips), as_uint8)
    gray = video.clips_to_uint8(np.zeros((1, 2, 4, 4, 1)))
    assert gray.shape == (1, 2, 4, 4, 3)
    with pytest.raises(ValueError):
        video.clips_to_uint8(np.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError):
        video.clips_to_uint8([[Image.new("RGB", (4, 4))], [Image.new("RGB", (4, 4))] * 2])


def test_save_gif_round_trips_frames_and_timing(tmp_path):
    clips = np.zeros((2, 5, 8, 8, 3), dtype=np.uint8)
    for t in range(5):
        clips[0, t, :, t] = 255  # a bright column moving right
        clips[1, t, t, :] = 255  # a bright row moving down
    path = video.save_gif(clips, tmp_path / "out" / "clips.gif", fps=5, scale=2, pad=1)
    with Image.open(path) as gif:
        assert gif.n_frames == 5
        assert gif.info["duration"] == 200
        assert gif.info.get("loop") == 0
        expected = video.clip_grid(clips, scale=2, pad=1)
        assert gif.size == expected[0].size
        for t in range(5):
            gif.seek(t)
            np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), np.asarray(expected[t]))


def test_frame_strip_grid_has_a_row_per_clip_and_a_column_per_frame():
    clips = np.zeros((2, 3, 4, 4, 3), dtype=np.uint8)
    clips[1, 2] = 200
    still = np.asarray(video.frame_strip_grid(clips, scale=1, pad=1, background=50))
    assert still.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert (still[6:10, 11:15] == 200).all()  # clip 1 (row 1), frame 2 (column 2)
    assert (still[1:5, 11:15] == 0).all()


# ------------------------------------------------------------------------------------------------ metrics


def test_frame_psnr_is_per_frame():
    ref = np.zeros((1, 3, 4, 4, 1))
    other = ref.copy()
    other[0, 1] += 0.1  # MSE 0.01 in frame 1 only
    np.testing.assert_allclose(metrics.frame_psnr(other, ref), [[np.inf, 20.0, np.inf]])


def test_static_error_keeps_temporal_psnr_infinite_but_flicker_lowers_it():
    ref = _clips()
    static = ref.copy()
    static[..., 0] += 0.05  # the same error in every frame: the differences are unchanged (up to rounding)
    assert (metrics.temporal_psnr(static, ref) > 200).all()
    assert (metrics.frame_psnr(static, ref) < 40).all()
    flicker = ref.copy()
    flicker[:, 1::2] += 0.1  # every other frame brighter: each difference is off by 0.1 everywhere
    np.testing.assert_allclose(metrics.temporal_psnr(flicker, ref), 20.0, atol=1e-9)
    np.testing.assert_allclose(metrics.frame_psnr(flicker, ref)[:, 1::2], 20.0, atol=1e-9)


def test_temporal_consistency_summary_and_formats():
    ref = _clips(n=2, f=3)
    other = ref.copy()
    other[0, 2] += 0.1  # one transition of one clip: MSE 0.01 -> 20 dB; frame 2 of clip 0 also 20 dB
    tensor = torch.from_numpy(other).permute(0, 1, 4, 2, 3)
    summary = metrics.temporal_consistency(tensor, ref)
    assert summary["temporal_psnr_min"] == pytest.approx(20.0)
    # 4 transitions: one at 20 dB, three identical (counted as the 100 dB cap)
    assert summary["temporal_psnr"] == pytest.approx((20.0 + 3 * metrics.PSNR_CAP_DB) / 4)
    assert summary["frame_psnr"] == pytest.approx((20.0 + 5 * metrics.PSNR_CAP_DB) / 6)
    assert metrics.temporal_consistency(ref, ref)["temporal_psnr"] == math.inf
    pil = [[Image.fromarray((frame * 255).astype(np.uint8)) for frame in clip] for clip in ref]
    assert metrics.frame_psnr(pil, ref).min() > 40  # uint8 rounding only
    with pytest.raises(ValueError):
        metrics.temporal_psnr(ref[:, :1], ref[:, :1])
    with pytest.raises(ValueError):
        metrics.frame_psnr(ref, ref[:, :2])


# ------------------------------------------------------------------------------------------ moving digits


def test_captions_and_tokenizer_cover_the_motion_words():
    assert moving_digits.caption_for(7, "left") == "a seven moving left"
    assert moving_digits.caption_for(8, "up") == "an eight moving up"
    assert moving_digits.parse_caption("an eight moving up") == (8, "up")
    assert moving_digits.parse_caption("a seven") == (7, None)
    with pytest.raises(ValueError):
        moving_digits.caption_for(1, "sideways")
    tok = moving_digits.build_caption_tokenizer()
    image_tok = digits.build_caption_tokenizer()
    ids = tok("an eight moving up").input_ids
    assert len(ids) == 5 and tok.unk_token_id not in ids  # one token per word + </s>
    # The image words keep their ids, so the PixArt text encoder's embeddings stay valid.
    assert tok("a thick seven").input_ids == image_tok("a thick seven").input_ids


def test_clips_are_deterministic_and_move_as_captioned():
    a = moving_digits.evaluation_clips("test", per_pair=1, seed=3)
    b = moving_digits.evaluation_clips("test", per_pair=1, seed=3)
    assert torch.equal(a.clips, b.clips)
    n = digits.NUM_CLASSES * len(moving_digits.DIRECTIONS)
    assert a.clips.shape == (n, moving_digits.NUM_FRAMES, 1, moving_digits.CANVAS, moving_digits.CANVAS)
    assert a.clips.min() >= -1 and a.clips.max() <= 1
    assert a.captions[0] == "a zero moving left" and a.captions[-1] == "a nine moving down"
    clips01 = (a.clips[:, :, 0] + 1) / 2
    assert torch.equal(moving_digits.predicted_directions(clips01), a.directions)
    # The centre-of-mass track follows the rendered box centre (same displacement within half a pixel).
    rendered = a.positions[:, -1] - a.positions[:, 0]
    torch.testing.assert_close(moving_digits.displacement(clips01), rendered, atol=0.5, rtol=0)
    travel = rendered.norm(dim=1)
    assert (travel >= moving_digits.TRAVEL[0] - 1e-4).all() and (travel <= moving_digits.TRAVEL[1] + 1e-4).all()
    # Every frame keeps the whole digit box inside the canvas.
    half = moving_digits.DIGIT_SIZE / 2
    assert (a.positions >= half - 1e-4).all() and (a.positions <= moving_digits.CANVAS - half + 1e-4).all()
    other = moving_digits.evaluation_clips("test", per_pair=1, seed=4)
    assert not torch.equal(a.clips, other.clips)


def test_training_clips_pair_every_digit_with_every_direction():
    data = moving_digits.training_clips("test", seed=0)  # the small split keeps the test fast
    counts = torch.bincount(data.directions, minlength=len(moving_digits.DIRECTIONS))
    assert (counts == counts[0]).all()
    assert torch.equal(moving_digits.predicted_directions((data.clips[:, :, 0] + 1) / 2), data.directions)


def test_clip_quality_reads_real_clips_and_rejects_frozen_or_wrong_ones():
    classifier = digits.DigitsClassifier.from_pretrained()
    real = moving_digits.evaluation_clips("test", per_pair=1, seed=0)
    clips01 = (real.clips[:, :, 0] + 1) / 2
    good = moving_digits.clip_quality(classifier, clips01, real.labels, real.directions)
    # Measured 0.95 (digit crops of real test digits) and 1.0 (direction) on 120 clips; 40 here.
    assert good.digit_accuracy >= 0.8 and good.clip_digit_accuracy >= 0.8
    assert good.direction_accuracy == 1.0
    assert moving_digits.TRAVEL[0] - 0.5 <= good.mean_travel <= moving_digits.TRAVEL[1] + 0.5
    assert good.mean_off_axis < 0.5
    frozen = clips01[:, :1].expand_as(clips01)  # first frame repeated: no motion
    still = moving_digits.clip_quality(classifier, frozen, real.labels, real.directions)
    assert abs(still.mean_travel) < 1e-3
    opposite = real.directions ^ 1  # left <-> right, up <-> down
    wrong = moving_digits.clip_quality(classifier, clips01, (real.labels + 1) % 10, opposite)
    assert wrong.direction_accuracy == 0.0 and wrong.mean_travel < -5
    assert wrong.digit_accuracy < 0.3
