"""Partial RoPE self-attention, module by module: selected queries against all keys and values, the
rotary table sliced to the selected rows, equal the same rows of the stock attention."""

from __future__ import annotations

import pytest
import torch
from test_family_ltx import tiny_ltx_pipeline
from test_family_wan import WAN_CONFIG

from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.partial_attention import RotaryAttention, rotary_partial_attention


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN_CONFIG).eval()
    rope = model.rope(torch.zeros(2, 16, 2, 16, 16))  # (1, S, 1, D) tables for 2 x 8 x 8 tokens
    return model, model.blocks[1].attn1, lambda x: ((x, None, None, rope), {})


def _ltx():
    model = tiny_ltx_pipeline().transformer
    rope = model.rope(torch.zeros(2, 128, 8), 2, 8, 8)  # (B, S, D) tables
    return model, model.transformer_blocks[1].attn1, lambda x: (
        (), dict(hidden_states=x, encoder_hidden_states=None, image_rotary_emb=rope))


FAMILIES = {"wan": _wan, "ltx": _ltx}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, attn, call = FAMILIES[request.param]()
    spec = find_adapter(model).module_specs(model)["attn1"].rotary  # what the adapter declares
    assert spec is not None
    return attn, call, spec


def _stock(attn, args, kwargs):
    with torch.no_grad():
        return type(attn).forward(attn, *args, **kwargs)


def test_selected_rows_equal_full_attention_rows(family):
    attn, call, spec = family
    x = torch.randn(2, 128, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    args, kwargs = call(x)
    assert spec.supports(attn, args, kwargs)
    full = _stock(attn, args, kwargs)
    gen = torch.Generator().manual_seed(2)
    picked = torch.stack([torch.randperm(128, generator=gen)[:37] for _ in range(2)])  # other rows per sample
    with torch.no_grad():
        part = rotary_partial_attention(attn, spec, x, picked, args, kwargs)
    expected = full.gather(1, picked.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(part, expected, atol=1e-6, rtol=1e-5)


def test_every_row_selected_equals_full_attention(family):
    attn, call, spec = family
    x = torch.randn(2, 128, attn.to_q.in_features, generator=torch.Generator().manual_seed(3))
    args, kwargs = call(x)
    full = _stock(attn, args, kwargs)
    order = torch.randperm(128, generator=torch.Generator().manual_seed(4)).expand(2, 128)  # any order
    with torch.no_grad():
        part = rotary_partial_attention(attn, spec, x, order, args, kwargs)
    torch.testing.assert_close(part, full[:, order[0]], atol=1e-6, rtol=1e-5)


def test_a_wrongly_sliced_table_is_caught(family):
    """The check above fails when the queries get the table of other rows (the test can fail)."""
    attn, call, spec = family
    x = torch.randn(2, 128, attn.to_q.in_features, generator=torch.Generator().manual_seed(5))
    args, kwargs = call(x)
    full = _stock(attn, args, kwargs)
    picked = torch.arange(40, 80).expand(2, 40)
    with torch.no_grad():
        shifted = rotary_partial_attention(attn, spec, x, picked, args, kwargs)
        wrong = RotaryAttention(spec.arg, spec.apply, spec.position, spec.token_axis, spec.batch_axis, spec.norm,
                                spec.rope, spec.processors)
        object.__setattr__(wrong, "slice_table", lambda table, p: spec.slice_table(table, p - 40))
        bad = rotary_partial_attention(attn, wrong, x, picked, args, kwargs)
    torch.testing.assert_close(shifted, full[:, 40:80], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(bad, full[:, 40:80], atol=1e-4)


def test_another_processor_is_not_reproduced(family):
    attn, call, spec = family
    args, kwargs = call(torch.zeros(2, 128, attn.to_q.in_features))
    original = attn.processor
    try:
        attn.processor = type("MyProcessor", (), {"__call__": original.__call__})()
        assert not spec.supports(attn, args, kwargs)
    finally:
        attn.processor = original


# ---- joint attention: every text row plus the selected image rows as queries ------------------------------------
TEXT = 8


def _flux_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(16.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(128), rows.reshape(-1), cols.reshape(-1)], -1)
    rope = model.pos_embed(torch.cat([torch.zeros(TEXT, 3), img_ids]))  # (S, D) over [text; image]
    return model, rope


def _hunyuan_model():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()
    rope = model.rope(torch.zeros(2, 4, 2, 8, 8))  # (N, D) over the image rows only
    mask = torch.ones(2, 1, 1, 128 + TEXT, dtype=torch.bool)
    mask[1, ..., -3:] = False  # the second sample's last text rows are padding
    return model, rope, mask


def _flux_double():
    model, rope = _flux_model()
    return model, "transformer_blocks", model.transformer_blocks[1].attn, lambda x, e: dict(
        hidden_states=x, encoder_hidden_states=e, image_rotary_emb=rope)


def _hunyuan_double():
    model, rope, mask = _hunyuan_model()
    return model, "transformer_blocks", model.transformer_blocks[1].attn, lambda x, e: dict(
        hidden_states=x, encoder_hidden_states=e, attention_mask=mask, image_rotary_emb=rope)


def _hunyuan_single():
    model, rope, mask = _hunyuan_model()
    return model, "single_transformer_blocks", model.single_transformer_blocks[1].attn, lambda x, e: dict(
        hidden_states=x, encoder_hidden_states=e, attention_mask=mask, image_rotary_emb=rope)


def _cogvideox():
    from test_family_cogvideox import tiny_cogvideox_pipeline

    pipe = tiny_cogvideox_pipeline()
    model = pipe.transformer
    rope = pipe._prepare_rotary_positional_embeddings(128, 128, 2, torch.device("cpu"))  # 2 x 8 x 8 video rows
    return model, "transformer_blocks", model.transformer_blocks[1].attn1, lambda x, e: dict(
        hidden_states=x, encoder_hidden_states=e, image_rotary_emb=rope)


JOINT = {"cogvideox": _cogvideox, "flux_double": _flux_double, "hunyuan_double": _hunyuan_double,
         "hunyuan_single": _hunyuan_single}


@pytest.fixture(scope="module", params=sorted(JOINT))
def joint(request):
    model, blocks, attn, call = JOINT[request.param]()
    adapter = find_adapter(model)
    spec = next(m for s in adapter.block_lists if s.attr == blocks for m in s.modules if m.rotary).rotary
    assert spec is not None and spec.text != "none"
    g = torch.Generator().manual_seed(1)
    dim = attn.to_q.in_features
    x, e = torch.randn(2, 128, dim, generator=g), torch.randn(2, TEXT, dim, generator=g)
    kwargs = call(x, e)
    assert spec.supports(attn, (), kwargs)
    return attn, spec, x, kwargs, _stock(attn, (), kwargs)


def _rows(t, picked):
    return t.gather(1, picked.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def test_joint_selected_rows_and_text_equal_stock(joint):
    attn, spec, x, kwargs, (image, text) = joint
    gen = torch.Generator().manual_seed(2)
    picked = torch.stack([torch.randperm(128, generator=gen)[:37] for _ in range(2)])
    with torch.no_grad():
        part_image, part_text = rotary_partial_attention(attn, spec, x, picked, (), kwargs)
    torch.testing.assert_close(part_image, _rows(image, picked), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(part_text, text, atol=1e-6, rtol=1e-5)


def test_joint_every_row_selected_equals_stock(joint):
    attn, spec, x, kwargs, (image, text) = joint
    order = torch.randperm(128, generator=torch.Generator().manual_seed(4)).expand(2, 128)
    with torch.no_grad():
        part_image, part_text = rotary_partial_attention(attn, spec, x, order, (), kwargs)
    torch.testing.assert_close(part_image, image[:, order[0]], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(part_text, text, atol=1e-6, rtol=1e-5)


def test_joint_wrongly_sliced_table_or_dropped_mask_is_caught(joint):
    """The checks above fail when the queries get other rows' table, or the mask is left out."""
    attn, spec, x, kwargs, (image, _) = joint
    picked = torch.arange(40, 80).expand(2, 40)
    wrong = RotaryAttention(spec.arg, spec.apply, spec.position, spec.token_axis, spec.batch_axis, spec.norm,
                            spec.rope, spec.processors, spec.text, spec.text_rope, spec.mask)
    object.__setattr__(wrong, "slice_table", lambda table, p: spec.slice_table(table, p - 40))
    with torch.no_grad():
        bad = rotary_partial_attention(attn, wrong, x, picked, (), kwargs)[0]
    assert not torch.allclose(bad, image[:, 40:80], atol=1e-4)
    if "attention_mask" in kwargs:
        with torch.no_grad():
            unmasked = rotary_partial_attention(attn, spec, x, picked, (), dict(kwargs, attention_mask=None))[0]
        assert not torch.allclose(unmasked[1], image[1, 40:80], atol=1e-4)


def test_flux_single_block_rows_equal_stock():
    """Flux's single blocks: one [text; image] stream, the table over all of it; text rows always recomputed."""
    model, rope = _flux_model()
    attn = model.single_transformer_blocks[1].attn
    spec = find_adapter(model).block_lists[1].modules[1].rotary
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, TEXT + 128, 32, generator=g)
    picked = torch.stack([torch.randperm(128, generator=g)[:30] for _ in range(2)]) + TEXT
    picked = torch.cat([torch.arange(TEXT).expand(2, TEXT), picked], 1)
    kwargs = dict(hidden_states=x, image_rotary_emb=rope)
    assert spec.supports(attn, (), kwargs)
    full = _stock(attn, (), kwargs)
    with torch.no_grad():
        part = rotary_partial_attention(attn, spec, x, picked, (), kwargs)
    torch.testing.assert_close(part, _rows(full, picked), atol=1e-6, rtol=1e-5)


def test_joint_flops_match_the_flop_counter(joint):
    from dualcache_diffusers.partial_attention import joint_flops
    from dualcache_diffusers.stats import flop_counter

    attn, spec, x, kwargs, _ = joint
    picked = torch.arange(40).expand(2, 40)
    for rows, call in ((128, lambda: _stock(attn, (), kwargs)),
                       (40, lambda: rotary_partial_attention(attn, spec, x, picked, (), kwargs))):
        with flop_counter() as counter, torch.no_grad():
            call()
        assert counter.get_total_flops() == 2 * joint_flops(attn, rows, 128, TEXT)

