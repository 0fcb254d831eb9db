"""`loss.edit_target_readout`: training-only read-outs, from the MAR decoder's z of an edit, of where
the edited object lies in the target and its shape and colour (our extension, Shapes world)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from unipic.world.spec import COLORS, SHAPES


def _batch(model, tokenizer, repeat_prob: float = 0.0, size: int = 64, count: int = 12):
    from unipic.training.config import DataConfig
    from unipic.training.data import BatchBuilder, TaskSource

    data = DataConfig(world_seed=5, image_size=size, batch_size=count, cache_latents=False,
                      edit_repeat_prob=repeat_prob)
    examples = [TaskSource("edit", data, 0, 1).get(k) for k in range(count)]
    return examples, BatchBuilder(model, tokenizer, data, ["edit_target"])("edit", examples,
                                                                           np.random.default_rng(0))


def test_the_batch_marks_the_edited_object_of_the_target(tiny_model_and_tokenizer) -> None:
    from unipic.world.examples import edit_example
    from unipic.world.scene import covered_cells

    model, tokenizer = tiny_model_and_tokenizer
    grid = model.grid_for(64, 64)
    examples, batch = _batch(model, tokenizer)
    kinds = set()
    labelled = {}
    for b, ex in enumerate(examples):
        edit = edit_example(5, ex["example_id"])
        kinds.add(edit.kind)
        if edit.new_index is None:  # remove draws nothing
            assert not batch["edit_drawn"][b] and not batch["edit_drawn_region"][b].any()
            continue
        drawn = edit.target.objects[edit.new_index]
        assert batch["edit_drawn"][b]
        assert set(torch.nonzero(batch["edit_drawn_region"][b]).flatten().tolist()) == set(
            covered_cells(drawn.box, *grid))
        others = {c for i, o in enumerate(edit.target.objects) if i != edit.new_index
                  for c in covered_cells(o.box, *grid)}
        labelled[b] = (set(covered_cells(drawn.box, *grid)) - others, (SHAPES.index(drawn.shape),
                                                                       list(COLORS).index(drawn.color)))
    assert "remove" in kinds and len(kinds) >= 3
    for b, (cells, label) in labelled.items():
        rows = batch["edit_drawn_index"][:, 0] == b
        assert set(batch["edit_drawn_index"][rows, 1].tolist()) == cells
        assert all(tuple(pair) == label for pair in batch["edit_drawn_labels"][rows].tolist())
    assert set(batch["edit_drawn_index"][:, 0].tolist()) <= set(labelled)
    # "Repeat this image." examples draw nothing new.
    _, repeats = _batch(model, tokenizer, repeat_prob=1.0)
    assert not repeats["edit_drawn"].any() and len(repeats["edit_drawn_index"]) == 0


def test_the_read_out_trains_the_decoder_and_round_trips_with_checkpoints(tiny_model_and_tokenizer,
                                                                           tmp_path) -> None:
    from unipic.training.config import LossConfig
    from unipic.training.jobs import UniPicLoss

    model, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(model).train()
    _, batch = _batch(model, tokenizer)
    assert batch["edit_drawn"].any()
    loss = UniPicLoss(model, LossConfig(weights={"edit": 1.0}, edit_target_readout=1.0))
    out = loss("edit", batch, torch.Generator().manual_seed(0))
    assert "loss_edit_target" in out and torch.isfinite(out["loss_edit_target"])
    plain = UniPicLoss(model, LossConfig(weights={"edit": 1.0}))("edit", batch, torch.Generator().manual_seed(0))
    # The total is the task loss plus the read-out (same masks and noise: same generator seed).
    assert torch.allclose(out["loss"], plain["loss"] + out["loss_edit_target"], atol=1e-5)
    out["loss"].backward()
    assert loss.world.drawn.what.shape.weight.grad.abs().sum() > 0
    assert loss.world.drawn.where.region.weight.grad.abs().sum() > 0
    assert model.mar.decoder_embed.weight.grad.abs().sum() > 0  # the decoder itself learns from it


def test_a_run_saves_and_continues_the_read_out(tmp_path) -> None:
    from unipic.training.config import load_config
    from unipic.training.jobs import DRAWN_FILE, UniPicJob

    config = load_config(None, ["stage=joint", "data.image_size=64", "data.tasks={edit: 1}",
                                "loss.edit_target_readout=0.5"])
    job = UniPicJob(config, None)
    assert "loss_edit_target" in job.metric_names and job.module.world.drawn.weight == 0.5
    torch.nn.init.constant_(job.module.world.drawn.what.color.bias, 0.25)
    job.save_weights(tmp_path)
    assert (tmp_path / DRAWN_FILE).is_file()
    resumed = UniPicJob(config, tmp_path)
    assert torch.equal(resumed.module.world.drawn.what.color.bias, torch.full_like(resumed.module.world.drawn.what.color.bias,
                                                                            0.25))


def test_folder_data_cannot_ask_for_it() -> None:
    from unipic.api import UserError
    from unipic.training.config import load_config

    with pytest.raises(UserError, match="loss.edit_target_readout=1.0 needs data.source=world"):
        load_config(None, ["stage=joint", "data.source=folder", "data.folders.edit=/x", "data.tasks={edit: 1}",
                           "loss.edit_target_readout=1.0"]).validate()
    with pytest.raises(UserError, match="loss.edit_target_readout must be >= 0"):
        load_config(None, ["stage=joint", "loss.edit_target_readout=-1"]).validate()


def test_every_training_only_part_is_left_out_of_a_packaged_model() -> None:
    from unipic.training.config import load_config
    from unipic.training.jobs import TRAINING_ONLY_FILES, UniPicJob

    config = load_config(None, ["stage=joint", "data.image_size=64", "data.tasks={i2t: 1, edit: 1}",
                                "loss.token_probe=1.0", "loss.object_readout=1.0", "loss.relation_readout=1.0",
                                "loss.edit_region_readout=1.0", "loss.edit_target_readout=1.0"])
    names = [name for _, name in UniPicJob(config, None)._training_only_parts()]
    assert len(names) == 5 and set(names) <= set(TRAINING_ONLY_FILES)  # scripts/package_default_model.py skips these
