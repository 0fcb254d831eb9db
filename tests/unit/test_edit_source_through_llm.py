"""`edit_source_through_llm`: the instruction precedes the source image, and x_con reads the
source rows' LLM states (our editing extension; upstream's order stays the default)."""

from __future__ import annotations

import copy

import pytest
import torch

from unipic.training.losses import edit_loss
from unipic.unipic1.sampling.edit import build_edit_condition, edit_images
from unipic.unipic1.sampling.prompts import edit_user_text
from unipic.unipic1.sampling.reference import reference_edit_images


@pytest.fixture(scope="module")
def instructed_model(tiny_model_and_tokenizer):
    """A copy of the tiny model with the extension switched on (the shared fixture stays upstream's)."""
    model, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    model.config.edit_source_through_llm = True
    return model, tokenizer


def _condition(model, tokenizer, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_con, prefix) of one edit of a fixed random source, without guidance."""
    source = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = model.grid_for(64, 64)
    x_con, z_src = model.extract_visual_feature(model.encode_images(source), None, grid)
    prefix, _, x_con = build_edit_condition(model, tokenizer, [instruction], x_con, z_src, cfg=1.0,
                                            device=torch.device("cpu"))
    return x_con, prefix


def test_edit_prompt_order_follows_the_model(tiny_model_and_tokenizer, instructed_model) -> None:
    upstream, instructed = tiny_model_and_tokenizer[0].config, instructed_model[0].config
    assert edit_user_text(upstream, "Remove the star.") == "<image>\nRemove the star."
    assert edit_user_text(instructed, "Remove the star.") == "Remove the star.\n<image>"


@torch.no_grad()
def test_only_the_extension_lets_x_con_depend_on_the_instruction(tiny_model_and_tokenizer, instructed_model) -> None:
    # Upstream's source rows come before the instruction in a causal LLM and x_con never enters it,
    # so x_con is the same for every instruction; with the extension it reads the instruction.
    for (model, tokenizer), should_differ in ((tiny_model_and_tokenizer, False), (instructed_model, True)):
        a, _ = _condition(model, tokenizer, "Remove the star.")
        b, _ = _condition(model, tokenizer, "Make the circle blue.")
        assert a.shape == (1, model.num_image_tokens(model.grid_for(64, 64)), model.config.mar.encoder_embed_dim)
        assert (not torch.equal(a, b)) is should_differ


@torch.no_grad()
def test_instructed_x_con_adds_each_source_row_to_its_own_position(instructed_model) -> None:
    model, _ = instructed_model
    buf, length, hidden = model.config.mar.buffer_size, 4, model.config.llm.hidden_size
    x_con = torch.zeros(1, buf + length, model.config.mar.encoder_embed_dim)
    input_ids = torch.tensor([[5, 6] + [model.image_token_id] * (length + buf) + [7]])
    prefix_hidden = torch.zeros(1, input_ids.shape[1], hidden)
    grid_row = 2 + 1  # the second grid cell's row: text rows first, then cells in raster order
    prefix_hidden[0, grid_row] = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    out = model.instructed_x_con(x_con, model.image_rows(prefix_hidden, input_ids))
    empty = model.proj_out(torch.zeros(1, hidden))[0]
    moved = model.proj_out(prefix_hidden[:, grid_row])[0]
    # x_con lays out buffers first, so the second cell sits at buf + 1.
    assert torch.allclose(out[0, buf + 1], moved, atol=1e-6)
    assert all(torch.allclose(out[0, i], empty, atol=1e-6) for i in range(buf + length) if i != buf + 1)
    with pytest.raises(ValueError, match="source rows"):
        model.instructed_x_con(x_con[:, 1:], model.image_rows(prefix_hidden, input_ids))


def test_the_extensions_edit_loss_trains_proj_out_through_the_source_rows(instructed_model) -> None:
    model, tokenizer = copy.deepcopy(instructed_model[0]).train(), instructed_model[1]
    from unipic.unipic1.sampling.prompts import tokenize_chat

    grid = model.grid_for(64, 64)
    ids, mask = tokenize_chat(model.config, tokenizer, [edit_user_text(model.config, "Remove the star.")],
                              device=torch.device("cpu"), image_rows=model.num_image_tokens(grid))
    seen = {}
    original = model.instructed_x_con

    def spy(x_con, source_rows):
        seen["called"] = source_rows.shape
        return original(x_con, source_rows)

    model.instructed_x_con = spy
    source = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss = edit_loss(model, source, source.flip(-1), ids, mask, generator=torch.Generator().manual_seed(0))
    # Every source `<image>` row of the prompt reaches x_con (grid cells and buffers).
    assert seen["called"] == (1, model.num_image_tokens(grid), model.config.llm.hidden_size)
    assert torch.isfinite(loss)


@torch.no_grad()
def test_exact_edit_sampler_equals_the_reference_loop_with_the_extension(instructed_model) -> None:
    model, tokenizer = instructed_model
    settings = {"steps": 3, "cfg": 3.0, "head_steps": 6}
    source = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = edit_images(model, tokenizer, source, ["make it blue"], generator=torch.Generator().manual_seed(5),
                       **settings)
    plain = reference_edit_images(model, tokenizer, source, ["make it blue"],
                                  generator=torch.Generator().manual_seed(5), **settings)
    assert ours.shape == (1, 3, 64, 64)
    assert (ours - plain).abs().max().item() <= 1e-5


@torch.no_grad()
def test_the_edit_sampler_runs_the_prefix_through_the_llm_once(tiny_model_and_tokenizer, instructed_model) -> None:
    # The extension reads the prefix's LLM states for x_con; the sampler reuses that pass's cache.
    source = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for model, tokenizer in (tiny_model_and_tokenizer, instructed_model):
        lengths = []
        handle = model.llm.model.register_forward_pre_hook(
            lambda _module, _args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
        try:
            edit_images(model, tokenizer, source, ["make it blue"], steps=2, cfg=3.0, head_steps=2,
                        generator=torch.Generator().manual_seed(5))
        finally:
            handle.remove()
        prefix_len = max(lengths)  # the loop's passes hold only image rows, fewer than the prefix's
        assert lengths.count(prefix_len) == 1
        assert len(lengths) == 1 + 2  # the prefix, then one pass per MAR step
