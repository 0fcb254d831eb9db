"""Batches from examples, round-robin task schedule, folder data, parameter groups, LR and EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unipic.training.config import DataConfig, OptimConfig
from unipic.training.data import BatchBuilder, TaskData
from unipic.training.optim import EMA, lr_at, param_groups


@pytest.fixture(scope="module")
def tiny():
    from unipic.loading import tiny_random_model

    return tiny_random_model(seed=0)


def test_round_robin_schedule_and_positions():
    data = TaskData(DataConfig(tasks={"t2i": 2, "i2t": 0, "edit": 1}, batch_size=3, image_size=64), rank=1,
                    world_size=2)
    assert [data.task_for(m) for m in range(6)] == ["t2i", "t2i", "edit"] * 2
    first = data.next_examples("t2i")
    assert [ex["index"] for ex in first] == [1, 3, 5]  # this process's share: k * world + rank
    assert data.state_dict() == {"t2i": 3, "edit": 0}
    again = TaskData(DataConfig(tasks={"t2i": 2, "edit": 1}, batch_size=3, image_size=64), rank=1, world_size=2)
    again.load_state_dict({"t2i": 3})
    assert [ex["index"] for ex in again.next_examples("t2i")] == [7, 9, 11]


def test_batches_match_the_inference_layout(tiny):
    model, tokenizer = tiny
    cfg = DataConfig(tasks={"t2i": 1, "i2t": 1, "edit": 1}, batch_size=2, image_size=64, unconditional_prob=0.0,
                     edit_repeat_prob=0.0)
    data, builder = TaskData(cfg, 0, 1), BatchBuilder(model, tokenizer, cfg)
    rng = np.random.default_rng(0)
    t2i = builder("t2i", data.next_examples("t2i"), rng)
    assert t2i["pixels"].shape == (2, 3, 64, 64) and t2i["pixels"].min() >= -1 and t2i["pixels"].max() <= 1
    text = tokenizer.decode(t2i["input_ids"][0][t2i["attention_mask"][0].bool()])
    assert text.startswith("<|im_start|>user\nGenerate an image: ") and text.endswith("<|im_start|>assistant\n")

    examples = data.next_examples("i2t")
    i2t = builder("i2t", examples, rng)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((i2t["input_ids"][0] == image_id).sum()) == model.num_understanding_tokens(64)
    supervised = i2t["labels"][0][i2t["labels"][0] >= 0]
    assert tokenizer.decode(supervised) == examples[0]["answer"] + "<|im_end|>"  # only the answer is learned

    edit = builder("edit", data.next_examples("edit"), rng)
    assert int((edit["input_ids"][1] == image_id).sum()) == model.num_image_tokens((4, 4))
    assert edit["source"].shape == edit["target"].shape == (2, 3, 64, 64)


def test_several_questions_per_understanding_image(tiny):
    model, tokenizer = tiny
    cfg = DataConfig(tasks={"i2t": 1}, batch_size=4, image_size=64, i2t_questions=4)
    examples = TaskData(cfg, 0, 1).next_examples("i2t")
    single = TaskData(DataConfig(tasks={"i2t": 1}, batch_size=4, image_size=64), 0, 1).next_examples("i2t")
    assert [ex["question"] for ex in examples] == [ex["question"] for ex in single]  # the first turn is unchanged
    for ex in examples:
        asked = [ex["question"]] + [q for q, _ in ex["more_questions"]]
        assert 2 <= len(asked) <= 4 and len(set(asked)) == len(asked)
    batch = BatchBuilder(model, tokenizer, cfg)("i2t", examples, np.random.default_rng(0))
    row, ex = 0, examples[0]
    supervised = tokenizer.decode(batch["labels"][row][batch["labels"][row] >= 0])
    assert supervised == "".join(a + "<|im_end|>" for a in [ex["answer"]] + [a for _, a in ex["more_questions"]])
    text = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
    assert text.count("<|im_start|>user\n") == 1 + len(ex["more_questions"])  # one chat turn per question


def test_named_objects_are_what_each_question_points_at():
    from unipic.world.questions import Question, named_objects, relation_order
    from unipic.world.scene import Scene, WorldObject

    star, circle = WorldObject("red", "star", 0.3, 0.3, 0.2), WorldObject("blue", "circle", 0.7, 0.7, 0.2)
    scene = Scene((star, circle))
    assert named_objects(scene, Question("count", "How many stars are there?", "one")) == [star]
    assert named_objects(scene, Question("count", "How many crosses are there?", "zero")) == []
    assert named_objects(scene, Question("color", "What color is the circle?", "blue")) == [circle]
    assert named_objects(scene, Question("shape", "What shape is the red object?", "star")) == [star]
    assert named_objects(scene, Question("relation", "Is the star left of the circle?", "yes")) == [star, circle]
    assert named_objects(scene, Question("relation", "Is the circle right of the star?", "yes")) == [circle, star]
    assert named_objects(scene, Question("caption", "Describe the image.", "...")) == []
    assert relation_order(scene, Question("relation", "Is the star above the circle?", "yes")) == (True, True)
    assert relation_order(scene, Question("relation", "Is the circle left of the star?", "no")) == (False, False)
    assert relation_order(scene, Question("color", "What color is the circle?", "blue")) is None


def _world_i2t_batch(tiny, questions: int) -> tuple[list[dict], dict]:
    """Four world understanding examples (seed 5, 64 px) with `questions` turns each, and their batch."""
    model, tokenizer = tiny
    cfg = DataConfig(tasks={"i2t": 1}, batch_size=4, image_size=64, i2t_questions=questions, world_seed=5)
    examples = TaskData(cfg, 0, 1).next_examples("i2t")
    return examples, BatchBuilder(model, tokenizer, cfg)("i2t", examples, np.random.default_rng(0))


def test_batches_carry_only_the_targets_their_run_reads(tiny):
    model, tokenizer = tiny
    cfg = DataConfig(tasks={"i2t": 1}, batch_size=4, image_size=64, i2t_questions=3, world_seed=5)
    examples = TaskData(cfg, 0, 1).next_examples("i2t")
    every = BatchBuilder(model, tokenizer, cfg)("i2t", examples, np.random.default_rng(0))
    assert {"object_index", "attend_query", "relation_query"} <= set(every)
    only = BatchBuilder(model, tokenizer, cfg, ["attend"])("i2t", examples, np.random.default_rng(0))
    assert "attend_query" in only and not {"object_index", "relation_query"} & set(only)
    assert torch.equal(only["input_ids"], every["input_ids"]) and torch.equal(only["attend_target"], every["attend_target"])
    with pytest.raises(ValueError, match="unknown batch targets"):
        BatchBuilder(model, tokenizer, cfg, ["attention"])


def test_relation_targets_split_the_two_named_shapes(tiny):
    from unipic.world.examples import extra_questions, i2t_example
    from unipic.world.questions import named_objects
    from unipic.world.scene import covered_cells

    model, tokenizer = tiny
    examples, batch = _world_i2t_batch(tiny, questions=8)
    query, order = batch["relation_query"], batch["relation_order"]
    assert len(query) == sum(o is not None for ex in examples for o in ex["relation_order"]) > 0
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    image_rows = {b: torch.nonzero(batch["input_ids"][b] == image_id).flatten() for b in range(len(examples))}
    rows, cols = model.understanding_grid(64)
    checked = 0
    for b, ex in enumerate(examples):
        world = i2t_example(5, ex["example_id"])
        questions = [world.question] + extra_questions(5, ex["example_id"], world.scene, world.question, 7)
        for question in questions:
            if question.kind != "relation":
                continue
            first, second = named_objects(world.scene, question)
            k = checked
            assert int(query[k, 0]) == b
            assert order[k].tolist() == [float(first.cx < second.cx), float(first.cy < second.cy)]
            for cells, obj in ((batch["relation_first"][k], first), (batch["relation_second"][k], second)):
                found = {int((image_rows[b] == p).nonzero()) for p in torch.nonzero(cells).flatten()}
                assert found == set(covered_cells(obj.box, rows, cols))
            checked += 1
    assert checked == len(query)


def test_attention_targets_point_from_each_answer_row_to_the_named_objects(tiny):
    from unipic.world.examples import i2t_example

    model, tokenizer = tiny
    examples, batch = _world_i2t_batch(tiny, questions=3)
    query, target = batch["attend_query"], batch["attend_target"]
    assert len(query) == sum(1 for ex in examples for boxes in ex["named_boxes"] if boxes) > 0
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for (row, position), cells in zip(query.tolist(), target):
        # The query row is the last prompt row: it predicts the answer's first token.
        assert batch["labels"][row, position] == -100 and batch["labels"][row, position + 1] >= 0
        assert cells.any() and bool((batch["input_ids"][row][cells] == image_id).all())
    # The first turn of example 0: its cells are those its named objects' boxes cover on the 4×4 grid.
    first = i2t_example(5, examples[0]["example_id"])
    from unipic.world.questions import named_objects
    from unipic.world.scene import covered_cells

    named = named_objects(first.scene, first.question)
    if named:
        rows, cols = model.understanding_grid(64)
        expected = {cell for obj in named for cell in covered_cells(obj.box, rows, cols)}
        image_rows = torch.nonzero(batch["input_ids"][0] == image_id).flatten()
        found = {int((image_rows == p).nonzero()) for p in torch.nonzero(target[0]).flatten()}
        assert query[0, 0] == 0 and found == expected


def test_head_attention_equals_the_layers_eager_weights(tiny):
    from unipic.training.losses import captured_inputs
    from unipic.training.world_aux import head_attention

    model, _ = tiny
    llm = model.llm.model
    torch.manual_seed(0)
    embeds = torch.randn(2, 9, model.config.llm.hidden_size)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    layer = llm.layers[1].self_attn
    previous = llm.config._attn_implementation
    try:
        llm.config._attn_implementation = "eager"
        with captured_inputs(layer) as captured, torch.no_grad():
            out = llm(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
    finally:
        llm.config._attn_implementation = previous
    query = torch.tensor([[0, 8], [1, 5], [0, 3]])
    for head in range(model.config.llm.num_attention_heads):
        with torch.no_grad():
            mine = head_attention(layer, captured["hidden_states"], captured["position_embeddings"], mask, query, head)
        eager = out.attentions[1][query[:, 0], head, query[:, 1]]  # (K, T)
        torch.testing.assert_close(mine, eager, atol=1e-5, rtol=1e-4)
    assert bool((mine[1, 6:] == 0).all()) and bool((mine[2, 4:] == 0).all())  # padding and the future get nothing


def test_covered_cells():
    from unipic.world.scene import covered_cells

    assert covered_cells((0.0, 0.0, 0.25, 0.25), 4, 4) == [0]  # an edge on a border stays out of the next cell
    assert covered_cells((0.2, 0.3, 0.3, 0.55), 4, 4) == [4, 5, 8, 9]
    assert covered_cells((0.9, 0.9, 1.0, 1.0), 4, 4) == [15]


def test_prompt_dropout_and_repeat_examples(tiny):
    model, tokenizer = tiny
    cfg = DataConfig(tasks={"t2i": 1, "edit": 1}, batch_size=4, image_size=64, unconditional_prob=1.0,
                     edit_repeat_prob=1.0)
    data, builder = TaskData(cfg, 0, 1), BatchBuilder(model, tokenizer, cfg)
    t2i = builder("t2i", data.next_examples("t2i"), np.random.default_rng(0))
    assert "Generate an image.<|im_end|>" in tokenizer.decode(t2i["input_ids"][0])
    edit = builder("edit", data.next_examples("edit"), np.random.default_rng(0))
    assert torch.equal(edit["source"], edit["target"])
    assert "Repeat this image." in tokenizer.decode(edit["input_ids"][0])


def test_training_on_an_exported_folder(tmp_path):
    """Users train on their own images through the on-disk layout of `unipic data export`."""
    from tiny_overrides import TINY

    from unipic.data.disk import export
    from unipic.training.config import load_config
    from unipic.training.trainer import train

    export("t2i", 5, tmp_path / "t2i", seed=3, size=64, progress=False)
    export("edit", 3, tmp_path / "edit", seed=3, size=64, progress=False)
    config = load_config(None, [*TINY, f"out_dir={tmp_path / 'run'}", "stage=joint", "data.source=folder",
                                f"data.folders.t2i={tmp_path / 't2i'}", f"data.folders.edit={tmp_path / 'edit'}",
                                "data.tasks={t2i: 1, edit: 1}", "train.max_steps=4", "data.batch_size=3"])
    result = train(config)
    assert result.finished
    # 2 t2i batches of 3 from 5 examples: the second epoch is reshuffled, every example still used.
    import json

    positions = json.loads((result.checkpoint / "data-rank0.json").read_text())["positions"]
    assert positions == {"t2i": 6, "edit": 6}


def test_parameter_groups_follow_upstream(tiny):
    model, _ = tiny
    groups = param_groups(model, weight_decay=0.02)
    assert [g["weight_decay"] for g in groups] == [0.02, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    head = {n for n, p in model.named_parameters() if "diffloss" in n}
    assert head and head <= no_decay  # every diffusion-head tensor, matrices included
    assert all(n.endswith(".bias") or "diffloss" in n or model.get_parameter(n).ndim <= 1 for n in no_decay)
    assert "mar.encoder_blocks.0.attn.qkv.weight" in decay and "mar.encoder_norm.weight" in no_decay
    assert not any(n.startswith("vae.") for n in decay | no_decay), "frozen parameters are left out"


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    constant = OptimConfig(lr=2.0, warmup_ratio=0.0, schedule="constant")
    assert {lr_at(s, constant, 50) for s in range(50)} == {2.0}


def test_ema_warms_up_then_tracks():
    layer = torch.nn.Linear(2, 2)
    start = layer.weight.detach().clone()
    ema = EMA(layer, decay=0.99)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema.update(layer)  # first update: decay min(0.99, 2/11), so mostly the new weights
    decay = 2 / 11
    assert torch.allclose(ema.shadow["weight"], decay * start + (1 - decay) * 1.0)
    for _ in range(2000):
        ema.update(layer)
    assert torch.allclose(ema.shadow["weight"], torch.ones(2, 2))
    target = torch.nn.Linear(2, 2)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])


def test_world_pool_repeats_examples_and_caches_their_latents(tiny):
    """A finite world pool cycles through the same examples; each image is VAE-encoded once and the
    cached tokens equal a fresh encoding (a repeated edit's target is its source's tokens)."""
    model, tokenizer = tiny
    cfg = DataConfig(tasks={"t2i": 1, "i2t": 1, "edit": 1}, batch_size=4, image_size=64, world_pool=6,
                     edit_repeat_prob=0.5)
    data, builder = TaskData(cfg, 0, 1), BatchBuilder(model, tokenizer, cfg)
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(3):
        for task in ("t2i", "i2t", "edit"):
            examples = data.next_examples(task)
            batch = builder(task, examples, rng)
            if task == "t2i":
                seen += [ex["example_id"] for ex in examples]
            for key in ("pixels", "source", "target"):
                if key in batch:
                    assert torch.allclose(batch[f"{key}_tokens"], model.encode_images(batch[key]), atol=1e-5)
    assert seen == [k % 6 for k in range(12)]
    assert len(builder.latent_cache) == 6 * 4  # t2i, i2t, edit source and target: each example once


def test_endless_stream_has_no_latent_cache(tiny):
    model, tokenizer = tiny
    builder = BatchBuilder(model, tokenizer, DataConfig(batch_size=2, image_size=64))
    assert builder.latent_cache is None  # nothing repeats, so nothing is kept


def test_question_kinds_restrict_every_turn():
    from unipic.training.data import TaskSource
    from unipic.world.questions import _parse_question

    cfg = DataConfig(tasks={"i2t": 1}, image_size=64, i2t_questions=4, i2t_kinds=["relation", "count"], world_seed=5)
    source = TaskSource("i2t", cfg, 0, 1)
    kinds = set()
    for k in range(12):
        ex = source.get(k)
        for question in [ex["question"]] + [q for q, _ in ex["more_questions"]]:
            kinds.add(_parse_question(question)[0])
    assert kinds == {"relation", "count"}
    # With all kinds given, the examples are those of the default (empty) setting.
    everything = TaskSource("i2t", DataConfig(tasks={"i2t": 1}, image_size=64, i2t_questions=4, world_seed=5,
                                              i2t_kinds=["caption", "count", "color", "shape", "relation"]), 0, 1)
    default = TaskSource("i2t", DataConfig(tasks={"i2t": 1}, image_size=64, i2t_questions=4, world_seed=5), 0, 1)
    for k in range(4):
        a, b = everything.get(k), default.get(k)
        assert a["question"] == b["question"] and a["more_questions"] == b["more_questions"]


def test_edit_kinds_restrict_the_edits():
    from unipic.training.data import TaskSource
    from unipic.world.edits import parse_instruction

    def kinds_of(cfg: DataConfig) -> list[str]:
        source = TaskSource("edit", cfg, 0, 1)
        return [parse_instruction(source.get(k)["instruction"])["kind"] for k in range(12)]

    assert set(kinds_of(DataConfig(tasks={"edit": 1}, image_size=64, edit_kinds=["recolor"], world_seed=5))) == {"recolor"}
    # With all kinds given, the examples are those of the default (empty) setting.
    default = kinds_of(DataConfig(tasks={"edit": 1}, image_size=64, world_seed=5))
    assert len(set(default)) > 1
    assert kinds_of(DataConfig(tasks={"edit": 1}, image_size=64, world_seed=5,
                               edit_kinds=["recolor", "remove", "add", "replace", "move"])) == default
