"""Tokenizers: the real Qwen2.5 one from a folder, and small ones built offline for tiny models.

UniPic appends `<image>` right after the tokenizer's last id (151665 for Qwen2.5) and never
resizes the embedding, which already has spare rows. The toy byte-level tokenizer used by the
tiny presets follows the same rule: 256 byte symbols, the ChatML specials at 256-258 and
`<image>` at 259, inside a 512-row embedding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from unipic.api import UserError

if TYPE_CHECKING:  # transformers is imported where a function needs it (it costs ~0.8 s)
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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
    return _with_chatml_specials(backend, image_token)


def _with_chatml_specials(backend, image_token: str) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers` backend and append the ChatML specials, then `image_token` (Qwen's order)."""
    from transformers import PreTrainedTokenizerFast

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
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    # Without these files transformers tries to convert a slow tokenizer and fails with a long traceback.
    if not (folder / "tokenizer.json").is_file() and not ((folder / "vocab.json").is_file()
                                                          and (folder / "merges.txt").is_file()):
        raise UserError(f"{folder} has no tokenizer.json (nor vocab.json + merges.txt); copy the tokenizer files "
                        "into the model folder")
    # AutoTokenizer also reads the folder's config.json, whose model_type ("unipic1") transformers
    # does not know, and warns about it; the tokenizer files alone decide the tokenizer here.
    config_logger = hf_logging.get_logger("transformers.configuration_utils")
    level = config_logger.level
    config_logger.setLevel(hf_logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    except (OSError, ValueError, TypeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{folder}: the tokenizer files cannot be loaded ({first[:160]})") from None
    finally:
        config_logger.setLevel(level)
    add_image_token(tokenizer, image_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_world_tokenizer(corpus: Iterable[str], vocab_size: int = 512,
                          image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE on `corpus` (e.g. Shapes-world text) for a model trained from scratch.

    The layout follows Qwen2.5's: learned byte-level BPE symbols first, then the ChatML specials
    `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and finally `image_token`, so `vocab_size` counts
    all of them (pad = `<|endoftext|>`, eos = `<|im_end|>`). Every byte is in the base alphabet, so
    any text round-trips (`decode(encode(x)) == x`), not only world text. Training is deterministic
    for a given corpus order (the merges break count ties by pair order).

    Args:
        corpus: training texts (iterated once).
        vocab_size: total vocabulary size including the 256 byte symbols and the 4 specials.
        image_token: the image placeholder appended last.

    Raises:
        ValueError: when `vocab_size` cannot hold the byte alphabet and the specials.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [*CHATML_SPECIALS, image_token]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} must be at least {256 + len(specials)} (bytes + specials)")
    backend = Tokenizer(models.BPE(fuse_unk=False))
    # GPT-2 style: split into words/punctuation first (merges never cross words), bytes as symbols.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    backend.train_from_iterator(list(corpus), trainer=trainer)
    # Specials after the learned symbols, in Qwen's order; `<image>` last (as UniPic appends it).
    return _with_chatml_specials(backend, image_token)


class InferenceTokenizer:
    """The tokenizer of a model folder for sampling, read by `tokenizers` alone (no transformers import).

    Encoding (`__call__`, `encode`), `convert_tokens_to_ids`, `get_vocab` and the pad/eos/unk
    ids are answered from `tokenizer.json` and `tokenizer_config.json`, the same ids as
    transformers' fast tokenizer gives (tests/unit/test_light_llm.py); every other attribute
    (decode, save_pretrained, chat templates, ...) is transformers' tokenizer, loaded by
    `load_tokenizer` the first time one is asked for.
    """

    def __init__(self, folder: Path, backend, image_token: str, pad_token: str, eos_token: str | None,
                 unk_token: str | None) -> None:
        self._folder, self._backend, self._image_token = folder, backend, image_token
        self.pad_token, self.eos_token, self.unk_token = pad_token, eos_token, unk_token
        self._full = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._backend.token_to_id(tokens)
        return [self._backend.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.pad_token) if self.pad_token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.eos_token) if self.eos_token is not None else None

    @property
    def unk_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.unk_token) if self.unk_token is not None else None

    def full(self) -> PreTrainedTokenizerBase:
        """transformers' tokenizer of the same folder (loaded once)."""
        if self._full is None:
            self._full = load_tokenizer(self._folder, self._image_token)
        return self._full

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_full", "_folder", "_backend", "_image_token"):
            raise AttributeError(name)
        return getattr(self.full(), name)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_inference_tokenizer(folder: str | Path, image_token: str = "<image>"):
    """`InferenceTokenizer` for a folder whose tokenizer.json already holds `image_token` as an added
    special token and whose tokenizer_config.json names the pad or eos token; otherwise (any other
    layout, or anything unexpected) `load_tokenizer`, transformers' tokenizer."""
    folder = Path(folder)
    try:
        from tokenizers import Tokenizer

        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        added = {t.get("content"): t for t in data.get("added_tokens", [])}
        eos, pad = _token_text(config.get("eos_token")), _token_text(config.get("pad_token"))
        unk = _token_text(config.get("unk_token"))
        simple = (config.get("backend", "tokenizers") == "tokenizers" and not config.get("add_bos_token")
                  and not config.get("add_eos_token") and config.get("padding_side", "right") == "right"
                  and image_token in added and added[image_token].get("special")
                  and all(t is None or t in added for t in (eos, pad, unk)) and (pad or eos))
        if simple:
            backend = Tokenizer.from_str(json.dumps(data))
            return InferenceTokenizer(folder, backend, image_token, pad or eos, eos, unk)
    except (OSError, ValueError, TypeError, AttributeError, ImportError):
        pass
    return load_tokenizer(folder, image_token)
