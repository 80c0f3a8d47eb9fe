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
