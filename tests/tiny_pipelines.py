"""Tiny, deterministic, offline `DiTPipeline` / `PixArtAlphaPipeline` / `PixArtSigmaPipeline` builders, and the
tiny text encoders and tokenizers (T5 / UMT5, CLIP, Gemma2) every family test shares.

Every model is built from a config with random weights drawn after `torch.manual_seed(seed)`, so two calls with the
same arguments return pipelines with bit-identical weights. Nothing is downloaded.

Typical calls (10 steps take well under a second on CPU):

    pipe = tiny_dit_pipeline()
    images = pipe(class_labels=[1], num_inference_steps=10, generator=torch.manual_seed(0), output_type="np").images

    pipe = tiny_pixart_pipeline()
    images = pipe("a cat", num_inference_steps=10, generator=torch.manual_seed(0), output_type="np",
                  **TINY_PIXART_CALL_KWARGS).images
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

# Latent grid of the tiny pipelines: 8x8 latents, patch size 2 -> 16 tokens.
TINY_SAMPLE_SIZE = 8
# Keyword arguments the tiny PixArt pipelines need on every call: resolution binning only knows the real sample
# sizes, caption cleaning needs optional packages, and a short prompt length keeps the text encoder cheap.
TINY_PIXART_CALL_KWARGS: dict[str, Any] = {
    "use_resolution_binning": False,
    "clean_caption": False,
    "max_sequence_length": 8,
}

_WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "bird",
    "car",
    "tree",
    "house",
    "red",
    "green",
    "blue",
    "small",
    "big",
    "on",
    "in",
    "with",
    "and",
    "an",
    "astronaut",
    "riding",
    "horse",
    "mars",
    "painting",
    "sunset",
    "mountain",
    "river",
    "city",
    "night",
)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A one-level `AutoencoderKL` (scale factor 1, 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_SAMPLE_SIZE,
    ).eval()


def tiny_dit_pipeline(seed: int = 0, num_layers: int = 2, sample_size: int = TINY_SAMPLE_SIZE) -> DiTPipeline:
    """A class-conditional `DiTPipeline` with a `num_layers`-block `DiTTransformer2DModel` (hidden size 16).

    `num_embeds_ada_norm` is 1000 because the pipeline uses class id 1000 as the null class for guidance.
    The transformer predicts a learned sigma (8 output channels), like the released DiT checkpoints.
    """
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=4,
    ).eval()
    pipe = DiTPipeline(
        transformer=transformer,
        vae=tiny_vae(seed),
        scheduler=DDIMScheduler(),
        id2label={i: f"class_{i}" for i in range(10)},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """An offline T5 tokenizer: one Unigram piece per word of a small vocabulary, `</s>` appended.

    A Unigram backend (like real T5) so that `save_pretrained` / `from_pretrained` round-trips.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + word, -1.0) for word in _WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=64)


def tiny_t5_encoder(
    tokenizer: Any, d_model: int = 32, d_ff: int = 37, num_heads: int = 4, d_kv: int = 8, umt5: bool = False
) -> T5EncoderModel | UMT5EncoderModel:
    """A one-layer T5 (or UMT5) text encoder for ``tokenizer``; seed torch before calling for fixed weights."""
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=1, num_heads=num_heads,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return model_cls(config).eval()


_CLIP_WORDS = ("a", "red", "car", "cat", "photo", "of", "the", "blurry")


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """An offline CLIP tokenizer: a few whole words plus single letters, no merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in _CLIP_WORDS:
        vocab[word + "</w>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=model_max_length)


def tiny_clip_text_encoder(
    tokenizer: CLIPTokenizer, hidden: int = 32, intermediate: int = 37, max_positions: int = 77,
    projection_dim: int | None = None, with_projection: bool = False,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A one-layer CLIP text encoder (``with_projection``: `CLIPTextModelWithProjection`, as SD3 uses)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_positions, projection_dim=projection_dim or hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_gemma_tokenizer(padding_side: str = "right") -> GemmaTokenizer:
    """A character-level Gemma BPE tokenizer (no merges), built in memory."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for c in "abcdefghijklmnopqrstuvwxyz<>.,-":
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], padding_side=padding_side)


def tiny_gemma2_encoder(
    tokenizer: GemmaTokenizer, hidden: int = 8, intermediate: int = 16, layers: int = 1, head_dim: int = 4
) -> Gemma2Model:
    """A tiny `Gemma2Model` text encoder (2 heads, 1 key/value head)."""
    return Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=2, eos_token_id=1,
    )).eval()


def tiny_pixart_pipeline(
    seed: int = 0, num_layers: int = 2, variant: Literal["alpha", "sigma"] = "alpha"
) -> PixArtAlphaPipeline | PixArtSigmaPipeline:
    """A text-conditional PixArt pipeline: `num_layers`-block `PixArtTransformer2DModel` (hidden 16) + 1-layer T5.

    Call it with `**TINY_PIXART_CALL_KWARGS`.
    """
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=TINY_SAMPLE_SIZE,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_num_groups=4,
    ).eval()
    pipeline_cls = PixArtSigmaPipeline if variant == "sigma" else PixArtAlphaPipeline
    pipe = pipeline_cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_vae(seed),
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
