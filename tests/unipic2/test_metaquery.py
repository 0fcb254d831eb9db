"""UniPic2MetaQueryPipeline: explicit positions, query conditioning, edits, image-to-text."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from unipic.api import UserError
from unipic.unipic2.pipeline_metaquery import (
    T2I_PREFIX,
    UniPic2MetaQueryPipeline,
    chat_prompt,
    query_position_ids,
)
from unipic.unipic2.tiny import TINY_CONFIG, random_image

S = 64  # MetaQuery edits need multiples of 32 (Qwen grid = DiT grid / 2)
NUM_QUERIES = TINY_CONFIG["metaquery"]["conditioner"]["num_queries"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_chat_prompt_has_no_system_turn():
    assert chat_prompt(T2I_PREFIX + "a cat") == (
        "<|im_start|>user\nGenerate an image: a cat<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt("make it red", with_image=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>make it red<|im_end|>\n<|im_start|>assistant\n"
    )


def test_positions_are_the_mask_cumsum_on_all_three_axes():
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pos = query_position_ids(mask)
    assert pos.shape == (3, 2, 7)
    assert pos[0, 0].tolist() == [0, 1, 2, 1, 1, 3, 4]  # the queries continue the count of real tokens
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[1], pos[2])


def test_padded_batch_equals_unpadded_rows(mq_pipe):
    """Ragged prompts in one batch give the same query states as each prompt alone (spec §4.6)."""
    texts = [chat_prompt(T2I_PREFIX + "a cat"), chat_prompt(T2I_PREFIX + "two green apples and a wooden table at sunset")]
    with torch.no_grad():
        batched = mq_pipe.encode_query_states(texts)
        alone = torch.cat([mq_pipe.encode_query_states([t]) for t in texts])
    assert batched.shape == (2, NUM_QUERIES, TINY_CONFIG["metaquery"]["conditioner"]["llm_hidden_size"])
    diff = (batched - alone).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff}"


def test_text_to_image_equals_stock_sd3_pipeline_on_metaquery_embeddings(mq_pipe):
    """The denoising part is SD3's: the stock pipeline fed our conditioner outputs gives the same image."""
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = mq_pipe.encode_prompt(["a cat", "a dog"], negative_prompt="")
    assert embeds.shape == (2, NUM_QUERIES, 64) and pooled.shape == (2, 48)
    stock = StableDiffusion3Pipeline(
        transformer=mq_pipe.transformer, scheduler=copy.deepcopy(mq_pipe.scheduler), vae=mq_pipe.vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    stock.set_progress_bar_config(disable=True)
    kwargs = {"height": S, "width": S, "num_inference_steps": 2, "guidance_scale": 3.5, "output_type": "np"}
    ours = mq_pipe(prompt=["a cat", "a dog"], generator=_gen(1), **kwargs).images
    theirs = stock(prompt_embeds=embeds, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                   negative_pooled_prompt_embeds=neg_pooled, generator=_gen(1), **kwargs).images
    diff = np.abs(ours - theirs).max()
    assert diff == 0.0, f"max abs diff {diff}"


def test_edit_feeds_the_image_to_qwen_and_is_reproducible(mq_pipe, monkeypatch):
    image = random_image(S, S, seed=3)
    seen = []
    original = mq_pipe.encode_query_states

    def spy(texts, image_features=None):
        seen.append((texts, image_features))
        return original(texts, image_features)

    monkeypatch.setattr(mq_pipe, "encode_query_states", spy)
    first = mq_pipe(prompt="make it red", image=image, num_inference_steps=2, generator=_gen(4), output_type="np").images
    torch.manual_seed(123)
    second = mq_pipe(prompt="make it red", image=image, num_inference_steps=2, generator=_gen(4), output_type="np").images
    assert first.shape == (1, S, S, 3) and np.array_equal(first, second)
    texts, features = seen[0]
    assert len(texts) == 2 and all("<|image_pad|>" in t for t in texts)  # negative and positive both see the image
    assert [f.shape[0] for f in features] == [(S // 32) ** 2] * 2  # vision grid = half the DiT grid per side


def test_precomputed_embeddings_skip_qwen(mq_pipe):
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = mq_pipe.encode_prompt("a cat")
    kwargs = {"height": S, "width": S, "num_inference_steps": 1, "output_type": "latent"}
    a = mq_pipe(prompt="a cat", generator=_gen(0), **kwargs).images
    b = mq_pipe(prompt_embeds=embeds, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=neg_pooled, generator=_gen(0), **kwargs).images
    assert torch.equal(a, b)


def test_image_to_text_decodes_only_new_tokens(mq_pipe):
    answers = mq_pipe.image_to_text([random_image(S, S), random_image(40, 56, mode="RGBA")],
                                    ["Describe the image.", "What is it?"], max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert not any("user" in a and "assistant" in a for a in answers)
    again = mq_pipe.image_to_text(random_image(S, S), "Describe the image.", max_new_tokens=6)
    assert again == answers[:1]  # greedy by default


def test_without_qwen_the_error_says_how_to_provide_it(mq_pipe):
    pipe = UniPic2MetaQueryPipeline(transformer=mq_pipe.transformer, scheduler=mq_pipe.scheduler, vae=mq_pipe.vae,
                                    conditioner=mq_pipe.conditioner)
    with pytest.raises(UserError, match="qwen_path"):
        pipe(prompt="a cat", height=S, width=S, num_inference_steps=1)
    with pytest.raises(UserError, match="Qwen2.5-VL"):
        pipe.image_to_text(random_image(S, S))


@pytest.mark.parametrize("builder", ["build_tiny_kontext_pipeline", "build_tiny_metaquery_pipeline"])
def test_model_cpu_offload_hooks_give_the_same_result(builder):
    """diffusers' model offload, pointed at the CPU, exercises the hook plumbing without a GPU
    (the MetaQuery query encoder calls Qwen submodules directly and must trigger the hook itself)."""
    from unipic.unipic2 import tiny

    pipe = getattr(tiny, builder)(seed=0)
    kwargs = {"prompt": "make it red", "image": random_image(S, S), "num_inference_steps": 2, "output_type": "np"}
    expected = pipe(**kwargs, generator=_gen(0)).images
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._all_hooks
    assert np.array_equal(pipe(**kwargs, generator=_gen(0)).images, expected)
    if isinstance(pipe, UniPic2MetaQueryPipeline):
        assert isinstance(pipe.image_to_text(random_image(S, S), "?", max_new_tokens=2)[0], str)
