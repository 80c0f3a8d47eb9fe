"""AuraFlow (joint blocks returning (text, image), then single blocks on [register + text; image])."""

from __future__ import annotations

import pytest
import torch
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
from family_harness import FamilyCase, check_family, check_unread_work_is_skipped
from tiny_pipelines import tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae

from dualcache_diffusers import engine


def tiny_auraflow_pipeline(seed: int = 0) -> AuraFlowPipeline:
    """16x16 latents, patch 2 -> 64 image tokens; 8 register + 8 text tokens; 3 joint + 3 single blocks."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, num_heads=2, umt5=True)
    transformer = AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=3, num_single_dit_layers=3,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, out_channels=4,
        pos_embed_max_size=64,
    ).eval()
    pipe = AuraFlowPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(seed),
                            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASE = FamilyCase(
    "auraflow",
    build=tiny_auraflow_pipeline,
    call_kwargs=dict(prompt="a red car", negative_prompt="a blue car", height=16, width=16, max_sequence_length=8,
                     guidance_scale=4.0),
)


def test_auraflow_family_contract():
    check_family(CASE)


# the DuCa preset (its conservative steps reuse attn whole), aggressive steps that forecast every module (instead of
# skipping the stack: ff reuses there too, so the single blocks' attn must return one row of zeros) and a budget's
# plan
SKIPPING = [(dict(config="duca"), False), (dict(config="duca", aggressive="reuse"), True), (dict(budget=4), False)]


@pytest.mark.parametrize("options, sole_reader", SKIPPING, ids=["duca", "duca-aggressive-reuse", "budget=4"])
def test_auraflow_skips_the_norms_of_reused_modules_and_unread_forecasts(options, sole_reader, monkeypatch):
    """Joint blocks: norm1.norm and norm1_context.norm (for attn alone), norm2 (ff) and norm2_context (ff_context).
    Single blocks: norm1.norm (attn) and norm2 (ff), and attn's forecast where ff, its sole reader, reuses. One row
    each, the images bit for bit those with every norm running and every forecast computed."""
    zeros = []
    original = engine._one_row_of_zeros

    def counting(value, device):
        zeros.append(value)
        return original(value, device)

    monkeypatch.setattr(engine, "_one_row_of_zeros", counting)
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))
    assert zeros or not sole_reader
