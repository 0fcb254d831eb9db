"""The tiny configuration and the offline tokenizers."""

from __future__ import annotations

from unipic.unipic2.tiny import (
    QWEN_SPECIAL_TOKENS,
    TINY_CONFIG,
    tiny_clip_tokenizer,
    tiny_qwen_tokenizer,
    tiny_t5_tokenizer,
)


def _strip_notes(value):
    """Drop documentation keys (leading underscore) recursively."""
    if isinstance(value, dict):
        return {k: _strip_notes(v) for k, v in value.items() if not k.startswith("_")}
    return value


def test_embedded_tiny_config_equals_the_reference_file(reference_tiny_config):
    reference = _strip_notes(reference_tiny_config)
    reference.pop("full_size_reference")
    assert _strip_notes(TINY_CONFIG) == reference


def test_clip_tokenizer_matches_the_tiny_clip_config():
    tok = tiny_clip_tokenizer()
    cfg = TINY_CONFIG["sd35m_kontext"]["text_encoder"]
    ids = tok(["a photo of a cat", "zebra!"], padding="max_length", max_length=77, truncation=True).input_ids
    assert all(len(row) == 77 for row in ids)
    assert ids[0][0] == cfg["bos_token_id"] and ids[0][6] == cfg["eos_token_id"]  # <bos>, 5 words, <eos>
    assert max(max(row) for row in ids) < cfg["vocab_size"]
    long_ids = tok(["cat " * 200], truncation=True, max_length=77).input_ids[0]
    assert len(long_ids) == 77 and long_ids[-1] == cfg["eos_token_id"]


def test_t5_tokenizer_appends_eos_and_pads_with_zero():
    tok = tiny_t5_tokenizer()
    ids = tok(["a photo of a cat", "xylophone?"], padding="max_length", max_length=16, truncation=True).input_ids
    assert 2 not in ids[0] and ids[0][5] == 1 and ids[0][-1] == 0  # 5 known words (no <unk>=2), </s>=1, <pad>=0
    assert max(max(row) for row in ids) < TINY_CONFIG["sd35m_kontext"]["text_encoder_3"]["vocab_size"]


def test_qwen_tokenizer_special_ids_match_the_tiny_qwen_config():
    tok = tiny_qwen_tokenizer()
    q = TINY_CONFIG["metaquery"]["qwen2_5_vl"]
    assert tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)) == list(range(1000, 1007))
    assert tok.convert_tokens_to_ids("<|image_pad|>") == q["image_token_id"]
    assert tok.eos_token_id == q["text_config"]["eos_token_id"] and tok.pad_token_id == q["text_config"]["pad_token_id"]
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>make it red<|im_end|>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[:1] == [1004] and ids.count(1000) == 1 and max(ids) < q["text_config"]["vocab_size"]
    assert tok.decode(ids) == text
