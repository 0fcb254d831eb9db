"""`placement="fixed"` edits (training data, `data.edit_placement`): an add's box and a move's
distance are a function of the source scene, and every such edit is one the judge accepts."""

from __future__ import annotations

import numpy as np
import pytest

from unipic.world.edits import FIXED_ADD_SIZE, apply_instruction, edit_succeeded, sample_edit
from unipic.world.scene import LATTICE
from unipic.world.spec import MOVE_MIN, MOVE_SAFETY


@pytest.mark.parametrize("kind", ["add", "move"])
def test_fixed_placement_is_a_function_of_the_source_and_valid(kind: str) -> None:
    targets = set()
    for seed in range(40):
        edit = sample_edit(np.random.default_rng(seed), kind, placement="fixed")
        edit.target.validate()
        again = apply_instruction(np.random.default_rng(seed + 1000), edit.source, edit.instruction, "fixed")
        assert again.target == edit.target  # another generator, the same target
        new = edit.target.objects[edit.new_index]
        # The judge's own check on the exact target scene's objects.
        assert edit_succeeded(edit, edit.target.objects)[0]
        if kind == "add":
            assert new.size == FIXED_ADD_SIZE
            targets.add((new.cx, new.cy))
        else:
            old = edit.source.objects[edit.index]
            distance = abs(new.cx - old.cx) + abs(new.cy - old.cy)
            assert distance >= MOVE_MIN + MOVE_SAFETY - 1e-9
            targets.add(round(distance * LATTICE))
    if kind == "add":
        assert len(targets) < 20  # far fewer places than random placement gives
    else:
        assert min(targets) == round((MOVE_MIN + MOVE_SAFETY) * LATTICE + 0.5)  # the shortest move is taken


def test_random_placement_is_unchanged_and_bad_names_fail() -> None:
    edit = sample_edit(np.random.default_rng(7), "add")
    assert edit == sample_edit(np.random.default_rng(7), "add", placement="random")
    with pytest.raises(ValueError, match="unknown placement"):
        apply_instruction(np.random.default_rng(0), edit.source, edit.instruction, "canonical")


def test_training_data_takes_the_run_option() -> None:
    from unipic.api import UserError
    from unipic.training.config import DataConfig, load_config
    from unipic.training.data import TaskSource
    from unipic.world.examples import edit_example

    data = DataConfig(world_seed=3, image_size=64, edit_placement="fixed", edit_kinds=["add"])
    source = TaskSource("edit", data, 0, 1)
    for k in range(4):
        example = source.get(k)
        edit = edit_example(3, example["example_id"], kinds=("add",), placement="fixed")
        assert example["new_boxes"] == [edit.target.objects[edit.new_index].box]
        assert edit.target.objects[edit.new_index].size == FIXED_ADD_SIZE
    with pytest.raises(UserError, match="data.edit_placement must be one of"):
        load_config(None, ["stage=joint", "data.edit_placement=canonical"]).validate()
