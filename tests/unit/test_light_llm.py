"""Inference without transformers (issue 40): the light Qwen2 decoder and tokenizer equal transformers'."""

from __future__ import annotations

import copy

import numpy as np
import torch

from unipic.unipic1.checkpoint import load_model_folder
from unipic.unipic1.models.config import LLMConfig
from unipic.unipic1.models.qwen2 import KVCache, Qwen2ForCausalLM
from unipic.unipic1.pipeline import UniPicPipeline

CONFIG = LLMConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rope_theta=10000.0)


def _pair() -> tuple[Qwen2ForCausalLM, torch.nn.Module]:
    from transformers import Qwen2ForCausalLM as HF

    torch.manual_seed(0)
    hf = HF(CONFIG.to_transformers()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    light = Qwen2ForCausalLM(CONFIG).eval()
    light.load_state_dict(hf.state_dict(), strict=True)
    return light, hf


def test_same_parameter_names_as_transformers() -> None:
    light, hf = _pair()
    assert set(light.state_dict()) == set(hf.state_dict())
    assert light.lm_head.weight is light.model.embed_tokens.weight  # tied


@torch.no_grad()
def test_forward_with_padding_positions_and_cache_equals_transformers() -> None:
    from transformers import DynamicCache

    from unipic.unipic1.models.unipic import cache_argument

    light, hf = _pair()
    embeds = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    a = light.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    b = hf.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert (a - b)[valid].abs().max().item() <= 1e-5
    # A prefix pass into a cache, then rows after it with explicit positions (the sampler's use).
    ours, theirs = KVCache(), DynamicCache()
    light.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, past_key_values=ours)
    hf.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **{cache_argument(type(hf.model)): theirs})
    rows = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    full = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    positions = (full.cumsum(-1) - 1)[:, -3:]
    a = light.model(inputs_embeds=rows, attention_mask=full, position_ids=positions, past_key_values=ours,
                    use_cache=True).last_hidden_state
    b = hf.model(inputs_embeds=rows, attention_mask=full, position_ids=positions, use_cache=True,
                 **{cache_argument(type(hf.model)): theirs}).last_hidden_state
    assert (a - b).abs().max().item() <= 1e-5
    assert ours.get_seq_length() == 10
    ours.crop(-3)
    assert ours.get_seq_length() == 7


@torch.no_grad()
def test_generate_goes_through_transformers_on_the_same_tensors() -> None:
    light, hf = _pair()
    ids = torch.tensor([[5, 6, 7, 8]])
    out = light.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, hf.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0))
    assert light.transformers_model().model.embed_tokens.weight is light.model.embed_tokens.weight


def test_inference_loading_draws_the_same_pixels_and_tokens(tiny_model_folder) -> None:
    light_model, light_tok = load_model_folder(tiny_model_folder, inference=True)
    model, tok = load_model_folder(tiny_model_folder)
    assert type(light_model.llm).__module__ == "unipic.unipic1.models.qwen2"
    with torch.no_grad():  # the tiny model's head is zero-initialised; give it something to do
        for a, b in zip(light_model.parameters(), model.parameters()):
            noise = 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel()))
            a.add_(noise)
            b.add_(noise)
    for text in ("a red circle<image>", "<|im_start|>user\nhéllo 12<|im_end|>", " two  stars "):
        assert light_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert (light_tok.pad_token_id, light_tok.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    options = {"height": 32, "width": 32, "seed": 3, "steps": 2, "head_steps": 4}
    a = np.asarray(UniPicPipeline(light_model, light_tok).text_to_image(["a red circle"], **options)[0][0])
    b = np.asarray(UniPicPipeline(model, tok).text_to_image(["a red circle"], **options)[0][0])
    assert np.array_equal(a, b)
    source = UniPicPipeline(model, tok).text_to_image(["a star"], **options)[0][0]
    a = UniPicPipeline(light_model, light_tok).edit_image([source], ["make it blue"], seed=1, steps=2, head_steps=4)
    b = UniPicPipeline(copy.deepcopy(model), tok).edit_image([source], ["make it blue"], seed=1, steps=2, head_steps=4)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_only_small_llms_load_the_light_decoder(monkeypatch):
    """The embedded model (1.7M LLM parameters) samples with the light decoder; a checkpoint over the
    threshold (the 1.5B release) loads transformers' Qwen2, as upstream does."""
    import unipic.unipic1.checkpoint as checkpoint
    from unipic.loading import default_model_folder
    from unipic.unipic1.models.config import UniPicConfig

    assert checkpoint.llm_parameters(UniPicConfig()) > 1_500_000_000  # the release's Qwen2.5-1.5B
    light, _ = checkpoint.load_model_folder(default_model_folder(), inference=True)
    assert type(light.llm).__module__ == "unipic.unipic1.models.qwen2"
    monkeypatch.setattr(checkpoint, "LIGHT_LLM_PARAMETERS", 0)
    full, _ = checkpoint.load_model_folder(default_model_folder(), inference=True)
    assert type(full.llm).__module__.startswith("transformers.")
