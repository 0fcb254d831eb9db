"""The embedded Shapes-world model's world-text tokenizer (its size preset: `unipic.unipic1.models.presets`).

The embedded model is trained from scratch on this project's Shapes world (docs/world.md) by the
recipe in `configs/shapes/` (VAE → MAR pre-training → alignment → joint → SFT). It keeps every
part of UniPic-1 (KL-16 VAE, MAR encoder/decoder with a per-token diffusion head, Qwen2 LLM,
projectors) at a size whose whole recipe trains on a 2-core CPU in a few hours and whose weights
fit in 40 MB of float32 safetensors. Its images are 128 px (an 8×8 token grid).
"""

from __future__ import annotations

from collections.abc import Iterator

from unipic.unipic1.models.presets import WORLD_VOCAB_SIZE
from unipic.unipic1.sampling.prompts import format_instruction
from unipic.unipic1.settings import CHATML_TEMPLATE, SamplingConfig
from unipic.unipic1.tokenizer import CHATML_SPECIALS

CORPUS_EXAMPLES = 2000  # examples per task fed to the tokenizer trainer
CORPUS_SEED = 12345  # a stream seed of its own, so the tokenizer does not depend on the data seed


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
    from unipic.unipic1.tokenizer import build_world_tokenizer

    return build_world_tokenizer(world_text_corpus(), vocab_size=vocab_size)
