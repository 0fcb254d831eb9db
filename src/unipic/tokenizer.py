"""Tokenizers: the real Qwen2.5 one from a folder, and small ones built offline for tiny models.

UniPic appends `<image>` right after the tokenizer's last id (151665 for Qwen2.5) and never
resizes the embedding, which already has spare rows. The toy byte-level tokenizer used by the
tiny presets follows the same rule: 256 byte symbols, the ChatML specials at 256-258 and
`<image>` at 259, inside a 512-row embedding.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (so every byte is one vocabulary symbol)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_byte_tokenizer(image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ids 0-255 = bytes, ChatML specials at 256-258, `image_token` at 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = _bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="right")
    # Added in id order first, then named: eos/pad must not claim ids of their own.
    tokenizer.add_special_tokens({"additional_special_tokens": [*CHATML_SPECIALS]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    add_image_token(tokenizer, image_token)
    return tokenizer


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = "<image>") -> int:
    """Register `image_token` as a special token (no-op if present) and return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(image_token)


def load_tokenizer(folder: str | Path, image_token: str = "<image>") -> PreTrainedTokenizerBase:
    """Load a tokenizer saved in a model folder (Qwen2.5 or ours) and make sure `image_token` exists."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    add_image_token(tokenizer, image_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
