"""Named UniPic-1 model presets: the released 1.5B layout, a ~100M benchmark layout, the tiny test
layout and the embedded Shapes-world model (`shapes-embedded`, trained by `configs/shapes/`).

Each preset is a function returning a fresh `UniPicConfig`; `PRESETS` maps the names that
`unipic state-dict --preset` and `unipic convert --preset` accept (the embedded model's preset is
sized by its tokenizer, so training builds it through `shapes_embedded_config`).
"""

from __future__ import annotations

from typing import Any

from unipic.unipic1.models.config import LLMConfig, SiglipConfig, UniPicConfig
from unipic.unipic1.models.diffusion_head import DiffusionHeadConfig
from unipic.unipic1.models.mar import MARConfig
from unipic.unipic1.models.vae import VAEConfig
from unipic.unipic1.settings import SamplingConfig

SHAPES_EMBEDDED = "shapes-embedded"
WORLD_VOCAB_SIZE = 512  # byte-level BPE over world text: every world word becomes one or two symbols


def unipic1_1_5b() -> UniPicConfig:
    """The released Skywork-UniPic-1.5B layout (MAR-H at 512 px, Qwen2.5-1.5B, SigLIP2 so400m/16)."""
    return UniPicConfig(
        vae=VAEConfig(),
        mar=MARConfig(img_size=512, encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                      decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16, buffer_size=64,
                      class_num=1000),
        head=DiffusionHeadConfig(depth=12, width=1536, num_sampling_steps=100),
        llm=LLMConfig(),
        siglip=SiglipConfig(),
        # Upstream scripts: 1024 px for every task (image2text.py --image_size 1024) and answers of up
        # to 1024 new tokens; the paper's 512 px understanding resolution is not what the release runs.
        sampling=SamplingConfig(image_size=1024, understanding_image_size=1024, num_iter=32, max_new_tokens=1024),
    )


def _byte_tokenizer_llm(**kwargs: Any) -> LLMConfig:
    # Byte-level toy tokenizer: 256 bytes + 3 ChatML specials + `<image>` (ids 256..259).
    return LLMConfig(vocab_size=512, bos_token_id=None, eos_token_id=258, **kwargs)


def unipic1_tiny() -> UniPicConfig:
    """The tiny test layout of `unipic1_tiny_config.json` (about 4.8M parameters)."""
    return UniPicConfig(
        vae=VAEConfig(ch=32),
        mar=MARConfig(img_size=64, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                      decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, buffer_size=4,
                      class_num=10),
        head=DiffusionHeadConfig(depth=2, width=64, num_sampling_steps=10),
        llm=_byte_tokenizer_llm(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        siglip=SiglipConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=64, patch_size=16),
        sampling=SamplingConfig(image_size=128, understanding_image_size=64, num_iter=4, max_new_tokens=32),
    )


def unipic1_medium() -> UniPicConfig:
    """A ~100M-parameter layout for benchmarks: every part scaled down from the 1.5B model."""
    return UniPicConfig(
        vae=VAEConfig(ch=64),
        mar=MARConfig(img_size=256, encoder_embed_dim=512, encoder_depth=6, encoder_num_heads=8,
                      decoder_embed_dim=512, decoder_depth=6, decoder_num_heads=8, buffer_size=16,
                      class_num=10),
        head=DiffusionHeadConfig(depth=6, width=768, num_sampling_steps=50),
        llm=_byte_tokenizer_llm(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192),
        siglip=None,
        sampling=SamplingConfig(image_size=256, understanding_image_size=256, num_iter=16, max_new_tokens=64),
    )


PRESETS = {
    "unipic1-1.5b": unipic1_1_5b,
    "unipic1-medium": unipic1_medium,
    "unipic1-tiny": unipic1_tiny,
}


def get_preset(name: str) -> UniPicConfig:
    """A fresh config for a named preset (ValueError listing the names for an unknown one)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def shapes_embedded_config(vocab_size: int = WORLD_VOCAB_SIZE) -> UniPicConfig:
    """The embedded Shapes model (9.31M parameters, ≈37 MB in float32 safetensors).

    Args:
        vocab_size: the tokenizer's length; the embedding is rounded up to a multiple of 64
            (spare rows, as the released model has).
    """
    rows = -(-vocab_size // 64) * 64
    return UniPicConfig(
        # KL-8 with 4 latent channels (as LDM's f8c4) and MAR patches of 2×2 latents, so the token grid
        # (8×8 at 128 px) and token width (16) are those of the released KL-16 layout, but the decoder
        # starts from a 16×16 latent: it learned sharp shapes faster per step than the KL-16 layout at
        # the same budget (research/shapes-model-notebook.md, issue 9 experiments). 4×4 pixel patches are folded into
        # channels first and two levels (64, 128 channels) follow, so every convolution runs at 1/4
        # resolution or less and the frozen encoder that sees every training image costs little.
        vae=VAEConfig(ch=32, ch_mult=(2, 4), num_res_blocks=1, patch_size=4, embed_dim=4),
        mar=MARConfig(img_size=128, patch_size=2, encoder_embed_dim=192, encoder_depth=3,
                      encoder_num_heads=4, decoder_embed_dim=192, decoder_depth=3, decoder_num_heads=4,
                      buffer_size=8, class_num=1),
        head=DiffusionHeadConfig(depth=3, width=256, num_sampling_steps=50),
        llm=LLMConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=rows, rope_theta=10_000.0, max_position_embeddings=1024,
                      bos_token_id=None, eos_token_id=None),  # eos set from the tokenizer by `build.py`
        siglip=None,
        # `unipic caption` asks the world's own caption question, the one the model is trained on.
        sampling=SamplingConfig(image_size=128, understanding_image_size=128, num_iter=16, cfg=3.0,
                                max_new_tokens=48, caption_prompt="Describe the image."),
    )
