"""The training-only loss terms: object-token weighting (`loss.object_weight`), changed-token
weighting of edits (`loss.edit_changed_weight`) and their attention supervision (`loss.attend_edit`), the token probe
the understanding features' object read-outs (`loss.object_readout`), and the relation turns'
split attention and order read-out (`loss.attend_relation`, `loss.relation_readout`)."""

from __future__ import annotations

import math

import pytest
import torch

from unipic.training.config import LossConfig
from unipic.training.losses import (
    TokenProbe,
    changed_tokens,
    edit_loss,
    object_tokens,
    text_to_image_loss,
)
from unipic.training.world_aux import ObjectReadout, RelationReadout


@pytest.fixture(scope="module")
def tiny():
    from unipic.loading import tiny_random_model

    model, _ = tiny_random_model(seed=0)
    return model.train()


def test_object_tokens_are_the_ones_unlike_the_background():
    tokens = torch.full((2, 10, 4), 0.3)  # a flat background token
    tokens[0, [2, 7]] = torch.tensor([2.0, -1.0, 0.5, 0.0])
    tokens[1, 4] += 0.2  # a small wobble of the background is not an object
    found = object_tokens(tokens)
    assert found[0].nonzero().flatten().tolist() == [2, 7]
    assert not found[1].any()


def _t2i_loss(model, tokens, object_weight):
    ids = torch.full((tokens.shape[0], 5), 65)
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)  # dropout
    pixels = torch.zeros(tokens.shape[0], 3, 64, 64)  # only its size is read: the tokens are given
    return text_to_image_loss(model, pixels, ids, torch.ones_like(ids), generator=generator, tokens=tokens,
                              object_weight=object_weight)


def test_object_weight_reweights_only_images_with_objects(tiny):
    flat = torch.full((2, 16, tiny.config.token_dim), 0.1)  # 4×4 token grid at 64 px
    # A flat image has no object tokens: the weighted loss is the plain one.
    assert torch.allclose(_t2i_loss(tiny, flat, 0.0), _t2i_loss(tiny, flat, 4.0))
    scene = flat.clone()
    scene[:, [0, 1, 4, 5]] = 3.0  # an object in the top-left 2×2 tokens
    plain, weighted = _t2i_loss(tiny, scene, 0.0), _t2i_loss(tiny, scene, 4.0)
    assert torch.isfinite(weighted) and not torch.allclose(plain, weighted)


def test_changed_tokens_are_where_the_target_differs_from_the_source():
    source = torch.zeros(2, 6, 4)
    target = source.clone()
    target[0, [1, 5]] = torch.tensor([0.0, 2.0, 0.0, 0.0])
    target[1, 3] += 0.3  # a small wobble (VAE noise around an unchanged object) is not a change
    found = changed_tokens(source, target)
    assert found[0].nonzero().flatten().tolist() == [1, 5]
    assert not found[1].any()


def _edit_loss(model, source, target, changed_weight):
    count = model.num_image_tokens((4, 4))
    ids = torch.full((source.shape[0], count + 4), 65)
    ids[:, 2:2 + count] = model.image_token_id  # the source's <image> rows
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)  # dropout
    pixels = torch.zeros(source.shape[0], 3, 64, 64)  # only its size is read: the tokens are given
    return edit_loss(model, pixels, pixels, ids, torch.ones_like(ids), generator=generator, source_tokens=source,
                     target_tokens=target, changed_weight=changed_weight)


def test_edit_changed_weight_reweights_only_edits_that_change_tokens(tiny):
    source = torch.full((2, 16, tiny.config.token_dim), 0.1)
    source[:, [0, 1, 4, 5]] = 3.0  # an object in the top-left 2×2 tokens
    # A copy changes nothing: the weighted loss is the plain one.
    assert torch.allclose(_edit_loss(tiny, source, source, 0.0), _edit_loss(tiny, source, source, 4.0))
    target = source.clone()
    target[:, [0, 1, 4, 5]] = -3.0  # the object recoloured
    plain, weighted = _edit_loss(tiny, source, target, 0.0), _edit_loss(tiny, source, target, 4.0)
    assert torch.isfinite(weighted) and not torch.allclose(plain, weighted)


def test_token_probe_regresses_hidden_tokens_only():
    probe = TokenProbe(cond_dim=6, token_dim=3, weight=1.0)
    torch.nn.init.zeros_(probe.linear.weight)
    torch.nn.init.zeros_(probe.linear.bias)
    z = torch.randn(1, 4, 6)
    tokens = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # the last two are visible: not scored
    assert probe.loss(z, tokens, mask).item() == pytest.approx((1.0 + 4.0) / 2)


def test_object_readout_scores_the_picked_features():
    readout = ObjectReadout(hidden_size=4, num_shapes=6, num_colors=10, weight=1.0)
    for layer in (readout.shape, readout.color):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    features = torch.randn(2, 5, 4)
    index, labels = torch.tensor([[0, 3], [1, 0]]), torch.tensor([[2, 7], [5, 0]])
    # Uniform predictions: the summed cross-entropy is log 6 + log 10 whatever the labels.
    assert readout.loss(features, index, labels).item() == pytest.approx(math.log(6) + math.log(10), rel=1e-5)
    readout.shape.weight.data[2, 0] = 50.0  # shape 2 wins where the feature's channel 0 is large
    features[0, 3, 0], features[1, 0, 0] = 1.0, -1.0
    per_object = readout.loss(features[:1], index[:1], labels[:1]) - math.log(10)
    assert per_object.item() < 1e-6


def test_world_understanding_batches_name_each_object_at_its_token():
    import numpy as np

    from unipic.loading import tiny_random_model
    from unipic.training.config import DataConfig
    from unipic.training.data import BatchBuilder, TaskSource
    from unipic.world.spec import COLORS, SHAPES

    model, tokenizer = tiny_random_model(seed=0)
    data = DataConfig(world_seed=3, image_size=64, batch_size=4, cache_latents=False)
    source = TaskSource("i2t", data, 0, 1)
    examples = [source.get(k) for k in range(4)]
    batch = BatchBuilder(model, tokenizer, data)("i2t", examples, np.random.default_rng(0))
    rows, cols = model.grid_for(64, 64)
    expected = [(row, min(int(cy * rows), rows - 1) * cols + min(int(cx * cols), cols - 1),
                 SHAPES.index(shape), list(COLORS).index(color))
                for row, ex in enumerate(examples) for cx, cy, shape, color in ex["objects"]]
    found = torch.cat([batch["object_index"], batch["object_labels"]], dim=1).tolist()
    assert found == [list(e) for e in expected] and len(found) >= 4


def test_covered_object_cells_name_every_cell_one_object_alone_covers():
    import numpy as np

    from unipic.loading import tiny_random_model
    from unipic.training.config import DataConfig
    from unipic.training.data import BatchBuilder, TaskSource
    from unipic.world.scene import covered_cells
    from unipic.world.spec import SHAPES

    model, tokenizer = tiny_random_model(seed=0)
    data = DataConfig(world_seed=3, image_size=64, batch_size=6, cache_latents=False)
    examples = [TaskSource("i2t", data, 0, 1).get(k) for k in range(6)]
    batch = BatchBuilder(model, tokenizer, data, ["object_cells"])("i2t", examples, np.random.default_rng(0))
    grid = model.grid_for(64, 64)
    found = {(row, cell): shape for (row, cell), (shape, _) in zip(batch["object_index"].tolist(),
                                                                  batch["object_labels"].tolist())}
    assert len(found) == len(batch["object_index"])  # each cell once
    shared = 0
    for row, ex in enumerate(examples):
        cells = [set(covered_cells(box, *grid)) for box in ex["object_boxes"]]
        for k, (_, _, shape, _) in enumerate(ex["objects"]):
            alone = cells[k] - set().union(*(c for j, c in enumerate(cells) if j != k))
            shared += len(cells[k] - alone)
            assert {cell for (r, cell) in found if r == row and found[(r, cell)] == SHAPES.index(shape)} >= alone
        assert {cell for (r, cell) in found if r == row} == set().union(*cells) - {
            cell for k, c in enumerate(cells) for cell in c if any(cell in o for j, o in enumerate(cells) if j != k)}
    assert shared > 0  # the batch does test overlapping boxes
    # The default reads one cell per object, as before.
    centre = BatchBuilder(model, tokenizer, data, ["objects"])("i2t", examples, np.random.default_rng(0))
    assert len(centre["object_index"]) == sum(len(ex["objects"]) for ex in examples) < len(found)


def test_relation_readout_scores_the_answer_rows():
    readout = RelationReadout(hidden_size=3, weight=1.0)
    torch.nn.init.zeros_(readout.order.weight)
    torch.nn.init.zeros_(readout.order.bias)
    hidden = torch.zeros(2, 6, 3)
    query, order = torch.tensor([[0, 4], [1, 2]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Zero logits: each bit costs log 2 whatever the answer.
    assert readout.loss(hidden, query, order).item() == pytest.approx(math.log(2), rel=1e-6)
    readout.order.weight.data[:] = torch.tensor([[20.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
    hidden[0, 4] = torch.tensor([1.0, -1.0, 0.0])  # the picked rows agree with their targets
    hidden[1, 2] = torch.tensor([-1.0, 1.0, 0.0])
    assert readout.loss(hidden, query, order).item() < 1e-6
    hidden[1, 3] = torch.tensor([1.0, -1.0, 0.0])  # a row no query picks changes nothing
    assert readout.loss(hidden, query, order).item() < 1e-6


def test_relation_losses_train_two_heads_and_the_readout():
    import numpy as np

    from unipic.loading import tiny_random_model
    from unipic.training.config import DataConfig
    from unipic.training.data import BatchBuilder, TaskSource
    from unipic.training.jobs import UniPicLoss

    model, tokenizer = tiny_random_model(seed=0)
    data = DataConfig(world_seed=3, image_size=64, batch_size=4, cache_latents=False, i2t_questions=8)
    source = TaskSource("i2t", data, 0, 1)
    batch = BatchBuilder(model, tokenizer, data)("i2t", [source.get(k) for k in range(4)], np.random.default_rng(0))
    assert len(batch["relation_query"]) > 0
    loss = UniPicLoss(model.train(), LossConfig(weights={"i2t": 1.0}, attend_named=1.0, attend_relation=1.0, relation_readout=1.0))
    out = loss("i2t", batch, torch.Generator().manual_seed(0))
    assert {"loss_i2t", "loss_attend", "loss_attend_relation", "loss_relation"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert loss.world.relation.order.weight.grad.abs().sum() > 0
    q_proj = model.llm.model.layers[1].self_attn.q_proj.weight.grad
    head_dim = model.llm.model.layers[1].self_attn.head_dim
    # Both supervised heads' query rows get a gradient from the attention losses.
    assert q_proj[:head_dim].abs().sum() > 0 and q_proj[head_dim:2 * head_dim].abs().sum() > 0


def test_relation_readout_reads_the_chosen_layer():
    import numpy as np

    from unipic.loading import tiny_random_model
    from unipic.training.config import DataConfig
    from unipic.training.data import BatchBuilder, TaskSource
    from unipic.training.jobs import UniPicLoss

    model, tokenizer = tiny_random_model(seed=0)
    model.eval()  # no dropout: the two passes below must see the same hidden states
    data = DataConfig(world_seed=3, image_size=64, batch_size=4, cache_latents=False, i2t_questions=8)
    source = TaskSource("i2t", data, 0, 1)
    batch = BatchBuilder(model, tokenizer, data)("i2t", [source.get(k) for k in range(4)], np.random.default_rng(0))
    with torch.no_grad():
        features = model.understanding_features(batch["pixels"])
        embeds = model.fill_image_rows(batch["input_ids"], features)
        states = model.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                 output_hidden_states=True).hidden_states  # embeddings, then each layer
        for layer in (0, -1):
            loss = UniPicLoss(model, LossConfig(weights={"i2t": 1.0}, relation_readout=1.0, relation_layer=layer))
            got = loss("i2t", batch, torch.Generator().manual_seed(0))["loss_relation"]
            hidden = states[1] if layer == 0 else model.llm.model(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
            want = loss.world.relation.loss(hidden, batch["relation_query"], batch["relation_order"])
            assert torch.allclose(got, want, atol=1e-5), layer
        # An early layer's rows differ from the final output's: the option reads what it says.
        assert not torch.allclose(states[1], states[-1])


def test_edit_attention_points_the_buffer_rows_at_the_named_object():
    import numpy as np

    from unipic.loading import tiny_random_model
    from unipic.training.config import DataConfig
    from unipic.training.data import BatchBuilder, TaskSource
    from unipic.training.jobs import UniPicLoss
    from unipic.world.examples import edit_example
    from unipic.world.scene import covered_cells

    model, tokenizer = tiny_random_model(seed=0)
    data = DataConfig(world_seed=3, image_size=64, batch_size=6, cache_latents=False, edit_repeat_prob=0.0)
    source = TaskSource("edit", data, 0, 1)
    examples = [source.get(k) for k in range(6)]
    batch = BatchBuilder(model, tokenizer, data)("edit", examples, np.random.default_rng(0))
    targets = batch["edit_attend_target"]
    image_id = model.image_token_id
    grid = model.grid_for(64, 64)
    named = 0
    for b, ex in enumerate(examples):
        edit = edit_example(3, ex["example_id"])
        if edit.index is None:  # add names no object of the source
            assert not targets[b].any()
            continue
        named += 1
        image_rows = torch.nonzero(batch["input_ids"][b] == image_id).flatten()
        found = {int((image_rows == p).nonzero()) for p in torch.nonzero(targets[b]).flatten()}
        assert found == set(covered_cells(edit.source.objects[edit.index].box, *grid)) and found
    assert named > 0
    loss = UniPicLoss(model.train(), LossConfig(weights={"edit": 1.0}, attend_edit=1.0))
    out = loss("edit", batch, torch.Generator().manual_seed(0))
    assert {"loss_edit", "loss_attend_edit"} <= set(out) and all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    q_proj = model.llm.model.layers[1].self_attn.q_proj.weight.grad
    assert q_proj[:model.llm.model.layers[1].self_attn.head_dim].abs().sum() > 0  # head 0 is supervised
    # A "repeat this image" batch names nothing: no attention term.
    repeat = BatchBuilder(model, tokenizer, DataConfig(world_seed=3, image_size=64, batch_size=6,
                                                       cache_latents=False, edit_repeat_prob=1.0))
    batch = repeat("edit", examples, np.random.default_rng(0))
    assert not batch["edit_attend_target"].any()
    assert "loss_attend_edit" not in loss("edit", batch, torch.Generator().manual_seed(0))


def test_edit_region_readout_learns_which_cells_the_named_object_covers():
    import numpy as np

    from unipic.loading import tiny_random_model
    from unipic.training.config import DataConfig
    from unipic.training.data import BatchBuilder, TaskSource
    from unipic.training.jobs import UniPicLoss
    from unipic.training.world_aux import EditRegionReadout
    from unipic.world.examples import edit_example
    from unipic.world.scene import covered_cells

    model, tokenizer = tiny_random_model(seed=0)
    data = DataConfig(world_seed=3, image_size=64, batch_size=6, cache_latents=False, edit_repeat_prob=0.0)
    examples = [TaskSource("edit", data, 0, 1).get(k) for k in range(6)]
    batch = BatchBuilder(model, tokenizer, data, ["edit_region"])("edit", examples, np.random.default_rng(0))
    assert "edit_attend_target" not in batch  # only the targets asked for
    grid = model.grid_for(64, 64)
    for b, ex in enumerate(examples):
        edit = edit_example(3, ex["example_id"])
        assert bool(batch["edit_named"][b]) == (edit.index is not None)
        cells = set(covered_cells(edit.source.objects[edit.index].box, *grid)) if edit.index is not None else set()
        assert set(torch.nonzero(batch["edit_region"][b]).flatten().tolist()) == cells
    assert batch["edit_named"].any()
    loss = UniPicLoss(model.train(), LossConfig(weights={"edit": 1.0}, edit_region_readout=1.0))
    out = loss("edit", batch, torch.Generator().manual_seed(0))
    assert {"loss_edit", "loss_edit_region"} <= set(out) and torch.isfinite(out["loss_edit_region"])
    out["loss"].backward()
    assert loss.world.region.region.weight.grad.abs().sum() > 0
    assert model.mar.decoder_blocks[0].mlp.fc1.weight.grad.abs().sum() > 0  # the decoder is taught, too
    # The read-out scores exactly the named rows: zero logits cost log 2 per cell.
    readout = EditRegionReadout(width=4, weight=1.0)
    torch.nn.init.zeros_(readout.region.weight)
    torch.nn.init.zeros_(readout.region.bias)
    region, named = torch.zeros(2, 3, dtype=torch.bool), torch.tensor([True, False])
    assert readout.loss(torch.randn(2, 3, 4), region, named).item() == pytest.approx(math.log(2), rel=1e-6)


def test_edit_region_readout_can_read_the_source_rows_that_see_the_instruction():
    import copy

    import numpy as np

    from unipic.api import UserError
    from unipic.loading import tiny_random_model
    from unipic.training.config import DataConfig
    from unipic.training.data import BatchBuilder, TaskSource
    from unipic.training.jobs import UniPicLoss

    model, tokenizer = tiny_random_model(seed=0)
    with pytest.raises(UserError, match="needs model.edit_source_through_llm=true"):
        UniPicLoss(model, LossConfig(weights={"edit": 1.0}, edit_region_readout=1.0, edit_region_at="source"))
    model = copy.deepcopy(model)
    model.config.edit_source_through_llm = True
    data = DataConfig(world_seed=3, image_size=64, batch_size=4, cache_latents=False, edit_repeat_prob=0.0)
    examples = [TaskSource("edit", data, 0, 1).get(k) for k in range(4)]
    batch = BatchBuilder(model, tokenizer, data, ["edit_region"])("edit", examples, np.random.default_rng(0))
    assert batch["edit_named"].any()
    loss = UniPicLoss(model.train(), LossConfig(weights={"edit": 1.0}, edit_region_readout=1.0, edit_region_at="source"))
    assert loss.world.region.region.in_features == model.config.llm.hidden_size
    out = loss("edit", batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss_edit_region"])
    out["loss"].backward()
    # The source rows' LLM states are what it reads: the LLM learns from it, the MAR decoder does not.
    assert model.llm.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    region_only = copy.deepcopy(model)
    region_only.zero_grad()
    out = UniPicLoss(region_only.train(), LossConfig(weights={"edit": 0.0}, edit_region_readout=1.0, edit_region_at="source"))(
        "edit", batch, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert region_only.llm.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in region_only.mar.decoder_blocks.parameters())
