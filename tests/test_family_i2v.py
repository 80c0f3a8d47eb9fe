"""Image-to-video variants through the public API, with the family checks of ``family_harness``: Wan 2.1 I2V
(CLIP image embeddings as extra cross-attention keys / values, the image latents concatenated to the noise),
CogVideoX I2V (image latents concatenated along channels) and HunyuanVideo 1.5 I2V (SigLIP image tokens in the
text stream, the first frame as a condition). Tiny configs, built offline; outputs compared as latents (the tiny
video VAEs' decoders would cost more CPU time than the denoising loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    WanImageToVideoPipeline,
)
from family_harness import FamilyCase, check_family
from PIL import Image
from test_family_hunyuan_video15 import _embeds, tiny_hunyuan_video15_pipeline
from test_family_wan import _text, _transformer, _vae
from tiny_pipelines import tiny_t5_encoder, tiny_t5_tokenizer
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def _image(size: int = 128) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ---- Wan 2.1 I2V ----------------------------------------------------------------------------------------------
WAN_TEXT_LEN = 512  # Wan's I2V cross-attention splits [image; text] keys assuming 512 text tokens
_WAN_EMBEDS = torch.randn(2, 1, WAN_TEXT_LEN, 16, generator=torch.Generator().manual_seed(0))


def tiny_wan_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.1 I2V: 36 input channels (16 noise + 4 mask + 16 image latents), CLIP image embeddings (17 tokens of
    width 32) as extra keys / values of every block's `attn2`."""
    tokenizer, encoder = _text(seed)
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=32,
    )).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformer = _transformer(seed, in_channels=36, image_dim=32, added_kv_proj_dim=32)
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=_vae(seed),
                                   scheduler=FlowMatchEulerDiscreteScheduler(), image_processor=processor,
                                   image_encoder=image_encoder, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 256x256 pixels -> 32x32 latents, patch (1, 2, 2) -> 256 tokens per frame, 2 latent frames. At 128x128 (128 video
# tokens) the 512 + 17 context rows every cross-attention projects at each partial step outweighed the video rows
# (DuCa cut the whole call's FLOPs 1.86x, ToCa 1.76x); a real Wan clip has tens of thousands of video tokens.
WAN_I2V = FamilyCase(
    "wan21_i2v", build=tiny_wan_i2v_pipeline, output_type="latent", two_call_cfg=True,
    call_kwargs=dict(image=_image(256), prompt_embeds=_WAN_EMBEDS[0], negative_prompt_embeds=_WAN_EMBEDS[1],
                     height=256, width=256, num_frames=5, guidance_scale=4.0),
)


# ---- CogVideoX I2V --------------------------------------------------------------------------------------------
def tiny_cogvideox_i2v_pipeline(seed: int = 0) -> CogVideoXImageToVideoPipeline:
    """64x64 pixels through a 2-level CogVideoX VAE (4x spatial, 4x temporal) -> 16x16 latents, patch 2 -> 64
    tokens per frame; 9 frames -> 3 latent frames; 8 input channels (4 noise + 4 image latents); 3 blocks."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, d_model=8, d_ff=16, num_heads=2, d_kv=4)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=4,
        text_embed_dim=8, num_layers=3, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
        down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
        norm_num_groups=2, temporal_compression_ratio=4, sample_height=64, sample_width=64,
    ).eval()
    pipe = CogVideoXImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                         transformer=transformer, scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


COGVIDEOX_I2V = FamilyCase(
    "cogvideox_i2v", build=tiny_cogvideox_i2v_pipeline, output_type="latent",
    call_kwargs=dict(image=_image(64), prompt="a red car", negative_prompt="a blue tree", height=64, width=64,
                     num_frames=9, guidance_scale=6.0, max_sequence_length=8),
)


# ---- HunyuanVideo 1.5 I2V -------------------------------------------------------------------------------------
def tiny_hunyuan_video15_i2v_pipeline(seed: int = 0) -> HunyuanVideo15ImageToVideoPipeline:
    """The T2V tiny model of test_family_hunyuan_video15 with ``task_type="i2v"``, and a SigLIP image encoder
    (16 tokens of width 8, the transformer's ``image_embed_dim``)."""
    t2v = tiny_hunyuan_video15_pipeline(seed)
    t2v.transformer.register_to_config(task_type="i2v")
    torch.manual_seed(seed)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
    )).eval()
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=t2v.transformer, vae=t2v.vae, scheduler=t2v.scheduler,
        text_encoder_2=None, tokenizer_2=None, guider=t2v.guider, image_encoder=image_encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


HUNYUAN_VIDEO15_I2V = FamilyCase(
    "hunyuan_video15_i2v", build=tiny_hunyuan_video15_i2v_pipeline, output_type="latent", two_call_cfg=True,
    call_kwargs=dict(image=_image(), num_frames=13, **_embeds(1), **_embeds(2, "negative_")),
)

CASES = {case.name: case for case in (WAN_I2V, COGVIDEOX_I2V, HUNYUAN_VIDEO15_I2V)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_i2v_family_contract(name):
    check_family(CASES[name])
