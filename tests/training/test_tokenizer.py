"""The world tokenizer: deterministic byte-level BPE with ChatML specials, lossless on world text."""

from __future__ import annotations

import pytest

from unipic.training.presets import build_shapes_tokenizer
from unipic.unipic1.models.presets import WORLD_VOCAB_SIZE, shapes_embedded_config
from unipic.unipic1.tokenizer import CHATML_SPECIALS, build_world_tokenizer


@pytest.fixture(scope="module")
def world_tokenizer():
    return build_shapes_tokenizer()


def test_specials_and_ids(world_tokenizer):
    tok = world_tokenizer
    ids = tok.convert_tokens_to_ids([*CHATML_SPECIALS, "<image>"])
    n = len(tok)
    assert n <= WORLD_VOCAB_SIZE
    assert ids == [n - 4, n - 3, n - 2, n - 1]  # after the learned symbols, `<image>` last
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    text = "<|im_start|>user\n<image><image>\nHow many stars are there?<|im_end|>\n<|im_start|>assistant\n"
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert encoded.count(ids[3]) == 2 and encoded[0] == ids[1]


def test_round_trip_on_world_text(world_tokenizer):
    from unipic.world.examples import make_example

    texts = ["Generate an image: a photo of a blue diamond below a pink square", "Describe the image.",
             "Change the color of the circle to white.", "ünïcödé and émojis 🙂 survive too"]
    for i in range(50):
        texts += [make_example("t2i", 99, i).text, make_example("i2t", 99, i).question.answer,
                  make_example("edit", 99, i).instruction]
    for text in texts:
        ids = world_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert world_tokenizer.decode(ids) == text
    # World words are single symbols: compact prompts.
    assert len(world_tokenizer(" a photo of a red circle", add_special_tokens=False)["input_ids"]) == 6


def test_deterministic_and_saved(tmp_path, world_tokenizer):
    from unipic.unipic1.tokenizer import load_tokenizer

    corpus = ["a red circle and a blue star"] * 20 + ["How many crosses are there?"] * 20
    a, b = build_world_tokenizer(corpus, 300), build_world_tokenizer(corpus, 300)
    assert a.get_vocab() == b.get_vocab()
    assert build_shapes_tokenizer().get_vocab() == world_tokenizer.get_vocab()
    world_tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    text = "<|im_start|>assistant\ntwo<|im_end|>"
    assert loaded(text, add_special_tokens=False)["input_ids"] == world_tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="vocab_size"):
        build_world_tokenizer(corpus, 100)


def test_embedded_preset_size(world_tokenizer):
    from safetensors.torch import save

    from unipic.unipic1.checkpoint import build_model

    config = shapes_embedded_config(len(world_tokenizer))
    assert config.llm.vocab_size % 64 == 0 and config.llm.vocab_size >= len(world_tokenizer)
    model = build_model(config, seed=0)
    state = {k: v for k, v in model.state_dict().items() if k != "llm.lm_head.weight"}
    assert len(save(state)) <= 40 * 1024**2  # the embedded model ships as ≤ 40 MB of float32 safetensors
    assert model.grid_for(128, 128) == (8, 8)
