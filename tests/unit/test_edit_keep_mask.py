"""`edit_keep_mask`: a head on the source rows' LLM states marks the cells an edit leaves alone; the
edit sampler keeps them at the source's tokens and training keeps them visible (our extension)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from unipic.unipic1.sampling.edit import edit_images


@pytest.fixture(scope="module")
def keep_model(tiny_model_and_tokenizer):
    """A copy of the tiny model with the instruction-first layout and a keep head."""
    model, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    model.config.edit_source_through_llm = True
    torch.manual_seed(0)
    model.add_edit_keep_head()
    return model.eval(), tokenizer


def _source() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _set_keep(model, cells: list[int] | None) -> None:
    """Make the head keep exactly `cells` of every source (None: keep none), whatever the rows hold."""
    torch.nn.init.zeros_(model.edit_keep.weight)
    torch.nn.init.constant_(model.edit_keep.bias, -20.0)
    if cells:
        original = model.edit_keep_logits

        def forced(rows: torch.Tensor) -> torch.Tensor:
            logits = original(rows)
            logits[:, cells] = 20.0
            return logits

        model.edit_keep_logits = forced


def test_the_option_needs_the_instruction_first_layout_and_round_trips(tiny_model_and_tokenizer, keep_model,
                                                                          tmp_path) -> None:
    from unipic.unipic1.checkpoint import load_model_folder, save_model_folder
    from unipic.unipic1.models.config import UniPicConfig

    with pytest.raises(ValueError, match="needs edit_source_through_llm"):
        UniPicConfig.from_dict({**tiny_model_and_tokenizer[0].config.to_dict(), "edit_keep_mask": True})
    settings = tiny_model_and_tokenizer[0].config.to_dict()
    with pytest.raises(ValueError, match="edit_keep_threshold must lie in"):
        UniPicConfig.from_dict({**settings, "sampling": {**settings["sampling"], "edit_keep_threshold": 1.0}})
    model, tokenizer = keep_model
    save_model_folder(model, tokenizer, tmp_path / "m")
    loaded, _ = load_model_folder(tmp_path / "m")
    assert loaded.config.edit_keep_mask and torch.equal(loaded.edit_keep.weight, model.edit_keep.weight)
    assert tiny_model_and_tokenizer[0].edit_keep is None  # upstream's layout has no head


@torch.no_grad()
def test_kept_cells_are_the_sources_tokens_and_the_rest_is_sampled(keep_model, monkeypatch) -> None:
    model, tokenizer = copy.deepcopy(keep_model[0]), keep_model[1]
    kept = [0, 1, 5, 9]
    _set_keep(model, kept)
    seen = []
    original = model.decode_tokens
    monkeypatch.setattr(model, "decode_tokens", lambda tokens, grid: seen.append(tokens) or original(tokens, grid))
    source = _source()
    out = edit_images(model, tokenizer, source, ["Remove the star.", "Add a red circle."], steps=3, cfg=3.0,
                      head_steps=4, generator=torch.Generator().manual_seed(1))
    assert out.shape == source.shape
    tokens, original_tokens = seen[-1], model.encode_images(source)
    assert torch.equal(tokens[:, kept], original_tokens[:, kept].float())
    others = [i for i in range(tokens.shape[1]) if i not in kept]
    assert not torch.allclose(tokens[:, others], original_tokens[:, others].float())


@torch.no_grad()
def test_keeping_no_cell_is_the_plain_sampler_and_keeping_all_returns_the_source(keep_model, monkeypatch) -> None:
    model, tokenizer = copy.deepcopy(keep_model[0]), keep_model[1]
    source = _source()[:1]
    settings = {"steps": 3, "cfg": 3.0, "head_steps": 4}
    _set_keep(model, None)
    masked = edit_images(model, tokenizer, source, ["Remove the star."], generator=torch.Generator().manual_seed(2),
                         **settings)
    plain_model = copy.deepcopy(model)
    plain_model.edit_keep = None
    plain = edit_images(plain_model, tokenizer, source, ["Remove the star."],
                        generator=torch.Generator().manual_seed(2), **settings)
    assert (masked - plain).abs().max().item() <= 1e-5
    grid = model.grid_for(64, 64)
    _set_keep(model, list(range(grid[0] * grid[1])))
    untouched = edit_images(model, tokenizer, source, ["Remove the star."], **settings)
    assert torch.equal(untouched, model.decode_tokens(model.encode_images(source).float(), grid))


@torch.no_grad()
def test_each_source_in_a_batch_is_edited_as_if_alone(keep_model) -> None:
    from unipic.unipic1.sampling.rng import GeneratorGroups

    model, tokenizer = copy.deepcopy(keep_model[0]), keep_model[1]
    torch.nn.init.normal_(model.edit_keep.weight, std=2.0, generator=torch.Generator().manual_seed(3))
    torch.nn.init.zeros_(model.edit_keep.bias)
    source, instructions = _source(), ["Remove the star.", "Change the color of the circle to blue."]
    settings = {"steps": 2, "cfg": 3.0, "head_steps": 3}
    seen = []
    original = model.edit_keep_logits
    model.edit_keep_logits = lambda rows: seen.append(original(rows)) or seen[-1]
    generators = GeneratorGroups([torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], [1, 1])
    together = edit_images(model, tokenizer, source, instructions, generator=generators, **settings)
    kept = torch.cat(seen)
    assert kept.shape == (2, model.grid_for(64, 64)[0] * model.grid_for(64, 64)[1])
    assert 0 < int((kept.sigmoid() > 0.5).sum()) < kept.numel()  # a mask that keeps some cells, not all
    for b, seed in enumerate((5, 6)):
        alone = edit_images(model, tokenizer, source[b : b + 1], instructions[b : b + 1],
                            generator=torch.Generator().manual_seed(seed), **settings)
        assert (together[b : b + 1] - alone).abs().max().item() <= 1e-5


def test_training_keeps_the_cells_visible_and_teaches_the_head(keep_model) -> None:
    from unipic.training.config import DataConfig, LossConfig
    from unipic.training.data import BatchBuilder, TaskSource
    from unipic.training.jobs import UniPicLoss
    from unipic.training.losses import _masked_targets_outside
    from unipic.world.examples import edit_example
    from unipic.world.scene import covered_cells

    model, tokenizer = copy.deepcopy(keep_model[0]).train(), keep_model[1]
    grid = model.grid_for(64, 64)
    for repeat_prob in (0.0, 1.0):
        data = DataConfig(world_seed=3, image_size=64, batch_size=6, cache_latents=False, edit_repeat_prob=repeat_prob)
        examples = [TaskSource("edit", data, 0, 1).get(k) for k in range(6)]
        batch = BatchBuilder(model, tokenizer, data, ["edit_keep"])("edit", examples, np.random.default_rng(0))
        for b, ex in enumerate(examples):
            edit = edit_example(3, ex["example_id"])
            cells = lambda objects: {c for o in objects for c in covered_cells(o.box, *grid)}  # noqa: E731
            if repeat_prob:
                expected = cells(edit.source.objects)
            else:
                untouched = [o for i, o in enumerate(edit.source.objects) if i != edit.index]
                changed = ([edit.source.objects[edit.index]] if edit.index is not None else []) + \
                          ([edit.target.objects[edit.new_index]] if edit.new_index is not None else [])
                expected = cells(untouched) - cells(changed)
            assert set(torch.nonzero(batch["edit_keep"][b]).flatten().tolist()) == expected
    keep = batch["edit_keep"]
    assert keep.any()
    for seed in range(5):
        hidden = _masked_targets_outside(model, keep, torch.Generator().manual_seed(seed)).bool()
        counts = hidden.sum(dim=1)
        assert (counts == counts[0]).all() and counts[0] > 0  # the MAR encoder needs equal counts
        others = (~keep).sum(dim=1)
        # Rows hide their other cells first: a kept cell is hidden only once all others are.
        assert ((hidden & keep).sum(dim=1) == (counts - others).clamp(min=0)).all()
    loss = UniPicLoss(model, LossConfig(weights={"edit": 1.0}))
    out = loss("edit", batch, torch.Generator().manual_seed(0))
    assert {"loss_edit", "loss_edit_keep"} <= set(out) and torch.isfinite(out["loss_edit_keep"])
    out["loss"].backward()
    assert model.edit_keep.weight.grad.abs().sum() > 0


def test_a_run_that_asks_for_the_head_without_the_instruction_first_layout_is_a_user_error() -> None:
    from unipic.api import UserError
    from unipic.training.config import load_config
    from unipic.training.jobs import UniPicJob

    config = load_config(None, ["stage=joint", "data.image_size=64", "model.edit_keep_mask=true"])
    with pytest.raises(UserError, match=r"model\.edit_keep_mask reads .* needs edit_source_through_llm=true"):
        UniPicJob(config, None)
    folder = load_config(None, ["stage=joint", "data.image_size=64", "model.edit_keep_mask=true",
                                "model.edit_source_through_llm=true", "data.source=folder",
                                "data.folders.edit=/nonexistent", "data.tasks={edit: 1}"])
    with pytest.raises(UserError, match="trains edits on world data"):
        UniPicJob(folder, None)
    untrained = load_config(None, ["stage=joint", "data.image_size=64", "model.edit_keep_mask=true",
                                   "model.edit_source_through_llm=true", "loss.edit_keep=0",
                                   "data.tasks={edit: 1}"])
    with pytest.raises(UserError, match="loss.edit_keep=0 leaves the keep head untrained"):
        UniPicJob(untrained, None)


def test_a_bad_model_setting_in_a_run_names_the_run_option() -> None:
    from unipic.api import UserError
    from unipic.training.config import load_config
    from unipic.training.jobs import UniPicJob

    config = load_config(None, ["stage=joint", "data.image_size=64", "model.sampling.edit_keep_threshold=1.5"])
    with pytest.raises(UserError, match=r"^model\.sampling\.edit_keep_threshold must lie in \(0, 1\), got 1\.5$"):
        UniPicJob(config, None)
