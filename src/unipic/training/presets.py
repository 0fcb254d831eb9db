"""The embedded Shapes-world model: its size preset and its world-text tokenizer.

The embedded model is trained from scratch on this project's Shapes world (docs/world.md) by the
recipe in `configs/shapes/` (VAE → MAR pre-training → alignment → joint → SFT). It keeps every
part of UniPic-1 (KL-16 VAE, MAR encoder/decoder with a per-token diffusion head, Qwen2 LLM,
projectors) at a size whose whole recipe trains on a 2-core CPU in a few hours and whose weights
fit in 40 MB of float32 safetensors. Its images are 128 px (an 8×8 token grid).
"""

from __future__ import annotations

from collections.abc import Iterator

from unipic.config import CHATML_TEMPLATE, LLMConfig, SamplingConfig, UniPicConfig
from unipic.models.diffusion_head import DiffusionHeadConfig
from unipic.models.mar import MARConfig
from unipic.models.vae import VAEConfig
from unipic.sampling.prompts import format_instruction
from unipic.tokenizer import CHATML_SPECIALS

SHAPES_EMBEDDED = "shapes-embedded"
WORLD_VOCAB_SIZE = 512  # byte-level BPE over world text: every world word becomes one or two symbols
CORPUS_EXAMPLES = 2000  # examples per task fed to the tokenizer trainer
CORPUS_SEED = 12345  # a stream seed of its own, so the tokenizer does not depend on the data seed


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
        # the same budget (docs/training.md, issue 9 experiments). 4×4 pixel patches are folded into
        # channels first and two levels (64, 128 channels) follow, so every convolution runs at 1/4
        # resolution or less and the frozen encoder that sees every training image costs little.
        vae=VAEConfig(ch=32, ch_mult=(2, 4), num_res_blocks=1, patch_size=4, embed_dim=4),
        mar=MARConfig(img_size=128, vae_stride=8, patch_size=2, encoder_embed_dim=192, encoder_depth=3,
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


def world_text_corpus(n_per_task: int = CORPUS_EXAMPLES, seed: int = CORPUS_SEED) -> Iterator[str]:
    """Every kind of text the model meets in training, as it appears in the prompts, specials removed.

    The ChatML specials and `<image>` are added to the tokenizer as whole tokens afterwards, so
    they are cut out here rather than learned as byte merges.
    """
    from unipic.world.examples import make_example
    from unipic.world.geneval import shapes_eval_metadata

    sampling = SamplingConfig()
    fixed = [sampling.cfg_prompt, sampling.edit_cfg_prompt, sampling.caption_prompt, "Edit this image."]
    texts: list[str] = []
    for i in range(n_per_task):
        t2i = make_example("t2i", seed, i)
        texts.append(sampling.t2i_prompt.format(prompt=t2i.text))
        i2t = make_example("i2t", seed, i)
        texts.append(f"<image>\n{i2t.question.question}")
        texts.append(i2t.question.answer)
        edit = make_example("edit", seed, i)
        texts.append(f"<image>\n{edit.instruction}")
    texts += [sampling.t2i_prompt.format(prompt=r["prompt"]) for r in shapes_eval_metadata(20, seed)]
    texts += fixed
    for text in texts:
        yield _strip_specials(format_instruction(CHATML_TEMPLATE, text))


def _strip_specials(text: str) -> str:
    # A newline, not a space: in real prompts the word after a special has no leading space.
    for special in (*CHATML_SPECIALS, "<image>"):
        text = text.replace(special, "\n")
    return text


def build_shapes_tokenizer(vocab_size: int = WORLD_VOCAB_SIZE):
    """The embedded model's tokenizer: byte-level BPE trained on `world_text_corpus()` (deterministic)."""
    from unipic.tokenizer import build_world_tokenizer

    return build_world_tokenizer(world_text_corpus(), vocab_size=vocab_size)
