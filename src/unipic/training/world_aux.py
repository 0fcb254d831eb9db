"""The Shapes world's training-only auxiliary losses: their batch targets, read-outs and
attention supervision, behind one narrow interface.

The generic UniPic-1 trainer (`training.jobs`, `training.losses`, `training.data`) trains on any
data; these extras need world scenes, whose every object is labelled exactly, and are off unless a
run file asks for them (`loss.object_readout`, `loss.attend_named`, `loss.attend_relation`,
`loss.relation_readout`, `loss.attend_edit`, `loss.edit_region_readout`,
`loss.edit_target_readout`, and models with `edit_keep_mask`). The trainer meets them only as:

- `world_example`: a world stream's example with the scene facts the targets need;
- `WorldTargets`: adds the wanted target tensors to an i2t or edit batch;
- `WorldAuxiliaryLosses`: one module with `before`/`capturing`/`after` hooks around a task's own
  loss, returning its extra terms, and the training-only parts it keeps beside the model.

Inference never uses any of it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from unipic.api import UserError
from unipic.training.config import LossConfig
from unipic.training.losses import captured_inputs, captured_output

# The training-only targets a world batch can carry, each read by one family of losses:
# objects (loss.object_readout at each object's centre cell), object_cells (the same at every cell
# one object alone covers: loss.object_readout_cells=covered), attend (loss.attend_named), relation
# (loss.attend_relation, loss.relation_readout), edit_attend (loss.attend_edit), edit_region
# (loss.edit_region_readout), edit_keep (models with edit_keep_mask: the cells an edit leaves alone),
# edit_target (loss.edit_target_readout: where the edited object lies in the target, its shape and colour).
TARGETS = ("objects", "object_cells", "attend", "relation", "edit_attend", "edit_region", "edit_keep",
           "edit_target")


def wanted_targets(loss: LossConfig, edit_keep_mask: bool) -> list[str]:
    """The batch targets (TARGETS) a run's losses read; empty for a run without world extras."""
    readout_cells = "object_cells" if loss.object_readout_cells == "covered" else "objects"
    wanted = {readout_cells: loss.object_readout > 0, "attend": loss.attend_named > 0,
              "relation": loss.attend_relation > 0 or loss.relation_readout > 0, "edit_attend": loss.attend_edit > 0,
              "edit_region": loss.edit_region_readout > 0, "edit_keep": edit_keep_mask,
              "edit_target": loss.edit_target_readout > 0}
    return [name for name, on in wanted.items() if on]


def metric_names(loss: LossConfig, edit_keep_mask: bool, tasks: Collection[str], object_readout: bool) -> list[str]:
    """The extra loss columns a run logs, in the order of its metrics file."""
    names = []
    if object_readout and "i2t" in tasks:
        names.append("loss_readout")
    if "i2t" in tasks:
        for name, weight in (("loss_attend", loss.attend_named), ("loss_attend_relation", loss.attend_relation),
                             ("loss_relation", loss.relation_readout)):
            if weight > 0:
                names.append(name)
    if "edit" in tasks:
        for name, weight in (("loss_attend_edit", loss.attend_edit), ("loss_edit_region", loss.edit_region_readout),
                             ("loss_edit_keep", loss.edit_keep if edit_keep_mask else 0),
                             ("loss_edit_target", loss.edit_target_readout)):
            if weight > 0:
                names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Examples and batch targets
# ---------------------------------------------------------------------------------------------


def world_example(stream, task: str, example_id: int, seed: int, questions: int, kinds: Sequence[str]) -> dict:
    """A world stream's example `example_id` with the scene facts the auxiliary targets read."""
    if task == "edit":
        # Editing examples also carry the box of the object their instruction names (none
        # for add), for loss.attend_edit and loss.edit_region_readout; the boxes of the
        # objects it leaves alone and of the edited object in the target (none for remove),
        # for models with edit_keep_mask.
        example, edit = stream.example(example_id, with_world=True)
        boxes = [] if edit.index is None else [edit.source.objects[edit.index].box]
        kept = [o.box for i, o in enumerate(edit.source.objects) if i != edit.index]
        new = [] if edit.new_index is None else [edit.target.objects[edit.new_index].box]
        # And the edited object's shape, colour and index in the target, with every target
        # box, for loss.edit_target_readout (the cells that object alone covers).
        drawn = [] if edit.new_index is None else [(edit.target.objects[edit.new_index].shape,
                                                    edit.target.objects[edit.new_index].color)]
        return {**example, "example_id": example_id, "edited_boxes": boxes, "kept_boxes": kept,
                "new_boxes": new, "new_objects": drawn, "new_target_index": edit.new_index,
                "target_boxes": [o.box for o in edit.target.objects]}
    if task != "i2t":
        return {**stream.example(example_id), "example_id": example_id}
    # Understanding examples also carry their objects, for loss.object_readout.
    example, world = stream.example(example_id, with_world=True)
    objects = [(o.cx, o.cy, o.shape, o.color) for o in world.scene.objects]
    row = {**example, "example_id": example_id, "objects": objects,
           "object_boxes": [o.box for o in world.scene.objects]}
    from unipic.world.questions import named_objects, relation_order

    asked = [world.question]
    if questions > 1:
        from unipic.world.examples import extra_questions

        more = extra_questions(seed, example_id, world.scene, world.question, questions - 1, kinds)
        row["more_questions"] = [(q.question, q.answer) for q in more]
        asked += more
    # Per turn, the boxes of the objects its question names (for loss.attend_named; a
    # relation's two in the question's order) and a relation's order (loss.relation_readout).
    row["named_boxes"] = [[o.box for o in named_objects(world.scene, q)] for q in asked]
    row["relation_order"] = [relation_order(world.scene, q) for q in asked]
    return row


class WorldTargets:
    """Adds the wanted training-only target tensors to an i2t or edit batch of world examples."""

    def __init__(self, model, size: int, targets: Collection[str]) -> None:
        self.model = model
        self.size = size
        self.targets = set(targets)
        unknown = self.targets - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown batch targets {sorted(unknown)}; known: {list(TARGETS)}")
        if {"objects", "object_cells"} <= self.targets:
            raise ValueError("batch targets 'objects' and 'object_cells' are alternatives; give one")

    def add_i2t(self, batch: dict, examples: Sequence[dict], answer_rows: list[list[int]]) -> None:
        """Object, attention and relation targets of an understanding batch (each when wanted)."""
        if {"objects", "object_cells"} & self.targets and all("objects" in ex for ex in examples):
            batch["object_index"], batch["object_labels"] = self.object_targets(examples,
                                                                                "object_cells" in self.targets)
        if "attend" in self.targets and all("named_boxes" in ex for ex in examples):
            batch["attend_query"], batch["attend_target"] = self.attention_targets(examples, batch["input_ids"],
                                                                                   answer_rows)
        if "relation" in self.targets and all("relation_order" in ex for ex in examples):
            batch.update(self.relation_targets(examples, batch["input_ids"], answer_rows))

    def add_edit(self, batch: dict, examples: Sequence[dict], repeats: Sequence[bool]) -> None:
        """Region, attention, keep and edited-object targets of an edit batch (each when wanted)."""
        wanted = {"edit_attend", "edit_region"} & self.targets
        if wanted and all("edited_boxes" in ex for ex in examples):
            named, region = self.edit_regions(examples, repeats)
            if "edit_region" in wanted:
                batch["edit_named"], batch["edit_region"] = named, region
            if "edit_attend" in wanted:
                batch["edit_attend_target"] = self.edit_attention_targets(batch["input_ids"], region)
        if "edit_keep" in self.targets and all("kept_boxes" in ex for ex in examples):
            batch["edit_keep"] = self.edit_keep(examples, repeats)
        if "edit_target" in self.targets and all("new_objects" in ex for ex in examples):
            batch.update(self.edit_target_targets(examples, repeats))

    def _cells_of(self, boxes: Sequence, image_positions: torch.Tensor, length: int) -> torch.Tensor:
        """(length,) bool: the `<image>` rows (at `image_positions`, grid cells first) of the
        understanding-grid cells that `boxes` cover."""
        from unipic.world.scene import covered_cells

        rows, cols = self.model.understanding_grid(self.size)
        target = torch.zeros(length, dtype=torch.bool)
        for box in boxes:
            target[image_positions[covered_cells(box, rows, cols)]] = True
        return target

    def relation_targets(self, examples: Sequence[dict], input_ids: torch.Tensor,
                          answer_rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Per relation turn: relation_query (R, 2) (batch row, answer row); relation_order (R, 2)
        float, whether the first named shape lies left of / above the second; relation_first and
        relation_second (R, T) bool, the `<image>` rows each of the two covers."""
        image_id, length = self.model.image_token_id, input_ids.shape[1]
        queries, orders, first, second = [], [], [], []
        for b, ex in enumerate(examples):
            image_positions = torch.nonzero(input_ids[b] == image_id).flatten()
            for answer_row, order, boxes in zip(answer_rows[b], ex["relation_order"], ex["named_boxes"]):
                if order is None:
                    continue
                queries.append((b, answer_row))
                orders.append([float(order[0]), float(order[1])])
                first.append(self._cells_of(boxes[:1], image_positions, length))
                second.append(self._cells_of(boxes[1:], image_positions, length))
        if not queries:
            empty = torch.zeros((0, length), dtype=torch.bool)
            return {"relation_query": torch.zeros((0, 2), dtype=torch.long), "relation_order": torch.zeros((0, 2)),
                    "relation_first": empty, "relation_second": empty}
        return {"relation_query": torch.tensor(queries, dtype=torch.long), "relation_order": torch.tensor(orders),
                "relation_first": torch.stack(first), "relation_second": torch.stack(second)}

    def attention_targets(self, examples: Sequence[dict], input_ids: torch.Tensor,
                           answer_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 2) (batch row, answer row) of every turn that names an object, and (K, T) bool: the
        `<image>` rows of the token cells that those objects' boxes cover."""
        image_id = self.model.image_token_id
        queries, targets = [], []
        for b, ex in enumerate(examples):
            image_positions = torch.nonzero(input_ids[b] == image_id).flatten()  # grid cells first (MAR: buffers last)
            for answer_row, boxes in zip(answer_rows[b], ex["named_boxes"]):
                if not boxes:
                    continue
                queries.append((b, answer_row))
                targets.append(self._cells_of(boxes, image_positions, input_ids.shape[1]))
        if not queries:
            return torch.zeros((0, 2), dtype=torch.long), torch.zeros((0, input_ids.shape[1]), dtype=torch.bool)
        return torch.tensor(queries, dtype=torch.long), torch.stack(targets)

    def object_targets(self, examples: Sequence[dict], covered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 2) (row, feature index) and (K, 2) (shape, colour) indices: per object of the batch's
        world scenes, the token under its centre, or with `covered` every cell its box alone covers."""
        from unipic.world.scene import sole_covered_cells
        from unipic.world.spec import COLORS, SHAPES

        rows, cols = self.model.understanding_grid(self.size)
        colors = list(COLORS)
        index, labels = [], []
        for row, ex in enumerate(examples):
            sole = sole_covered_cells(ex["object_boxes"], rows, cols) if covered else None
            for k, (cx, cy, shape, color) in enumerate(ex["objects"]):
                if covered:
                    cells = sole[k]
                else:
                    cells = [min(int(cy * rows), rows - 1) * cols + min(int(cx * cols), cols - 1)]
                index += [(row, cell) for cell in cells]
                labels += [(SHAPES.index(shape), colors.index(color))] * len(cells)
        return torch.tensor(index, dtype=torch.long).view(-1, 2), torch.tensor(labels, dtype=torch.long).view(-1, 2)

    def edit_target_targets(self, examples: Sequence[dict], repeats: Sequence[bool]) -> dict[str, torch.Tensor]:
        """Where the edited object lies in the target and what it is, for every example that draws
        one (not remove, not "Repeat this image."): edit_drawn (B,) bool; edit_drawn_region (B, L)
        bool, raster order, the cells its box covers; edit_drawn_index (K, 2) (row, cell) and
        edit_drawn_labels (K, 2) (shape, colour), over the cells its box alone covers in the target."""
        from unipic.world.scene import covered_cells, sole_covered_cells
        from unipic.world.spec import COLORS, SHAPES

        rows, cols = self.model.grid_for(self.size, self.size)
        colors = list(COLORS)
        drawn = torch.zeros(len(examples), dtype=torch.bool)
        region = torch.zeros(len(examples), rows * cols, dtype=torch.bool)
        index, labels = [], []
        for b, (ex, repeat) in enumerate(zip(examples, repeats)):
            if repeat or not ex["new_objects"]:
                continue
            (box,), ((shape, color),) = ex["new_boxes"], ex["new_objects"]
            drawn[b] = True
            region[b, covered_cells(box, rows, cols)] = True
            sole = sole_covered_cells(ex["target_boxes"], rows, cols)[ex["new_target_index"]]
            index += [(b, cell) for cell in sole]
            labels += [(SHAPES.index(shape), colors.index(color))] * len(sole)
        return {"edit_drawn": drawn, "edit_drawn_region": region,
                "edit_drawn_index": torch.tensor(index, dtype=torch.long).view(-1, 2),
                "edit_drawn_labels": torch.tensor(labels, dtype=torch.long).view(-1, 2)}

    def edit_keep(self, examples: Sequence[dict], repeats: Sequence[bool]) -> torch.Tensor:
        """(B, L) bool, raster order: the cells an edit leaves alone. Those the boxes of the objects
        it does not touch cover, less those the named object (in the source) or the edited object
        (in the target) covers; for "Repeat this image." examples, every object's cells."""
        from unipic.world.scene import cells_left

        rows, cols = self.model.grid_for(self.size, self.size)
        keep = torch.zeros(len(examples), rows * cols, dtype=torch.bool)
        for b, (ex, repeat) in enumerate(zip(examples, repeats)):
            if repeat:
                cells = cells_left(ex["kept_boxes"] + ex["edited_boxes"], [], rows, cols)
            else:
                cells = cells_left(ex["kept_boxes"], ex["edited_boxes"] + ex["new_boxes"], rows, cols)
            keep[b, sorted(cells)] = True
        return keep

    def edit_regions(self, examples: Sequence[dict], repeats: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) bool: whether the example's instruction names a source object (not add, not a
        repeat), and (B, L) bool: the token cells, in raster order, that object covers."""
        from unipic.world.scene import covered_cells

        rows, cols = self.model.grid_for(self.size, self.size)
        named = torch.zeros(len(examples), dtype=torch.bool)
        region = torch.zeros(len(examples), rows * cols, dtype=torch.bool)
        for b, (ex, repeat) in enumerate(zip(examples, repeats)):
            if ex["edited_boxes"] and not repeat:
                named[b] = True
                for box in ex["edited_boxes"]:
                    region[b, covered_cells(box, rows, cols)] = True
        return named, region

    def edit_attention_targets(self, input_ids: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the source `<image>` rows of the cells in `region` (B, L), the named object's
        (none for add and "repeat this image" examples)."""
        targets = torch.zeros(input_ids.shape, dtype=torch.bool)
        for b in torch.nonzero(region.any(dim=1)).flatten().tolist():
            # The source's first L `<image>` rows are its grid cells in raster order (buffers last).
            image_positions = torch.nonzero(input_ids[b] == self.model.image_token_id).flatten()
            targets[b, image_positions[: region.shape[1]][region[b]]] = True
        return targets


# ---------------------------------------------------------------------------------------------
# Read-outs and attention supervision
# ---------------------------------------------------------------------------------------------


class ObjectReadout(nn.Module):
    """Training-only linear read-outs of each object's shape and colour from the understanding
    feature of the token under its centre (Shapes world).

    Answers reach the understanding features at `loss.grad_scale` and, on a small budget, teach
    colour and the question priors long before shape; the trained MAR encoder then hands the LLM
    features that hold shape poorly (research/shapes-model-notebook.md). The world labels every object exactly, so
    a direct read-out at full gradient keeps shape and colour in the features. Inference never
    uses it; the trainer keeps its weights beside the model in checkpoints.
    """

    def __init__(self, hidden_size: int, num_shapes: int, num_colors: int, weight: float) -> None:
        super().__init__()
        self.shape = nn.Linear(hidden_size, num_shapes)
        self.color = nn.Linear(hidden_size, num_colors)
        self.weight = weight

    def loss(self, features: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed shape and colour cross-entropy: features (B, N, hidden), index (K, 2) = (row, token),
        labels (K, 2) = (shape, colour)."""
        picked = features[index[:, 0], index[:, 1]].float()  # (K, hidden)
        return F.cross_entropy(self.shape(picked), labels[:, 0]) + F.cross_entropy(self.color(picked), labels[:, 1])


class EditRegionReadout(nn.Module):
    """Training-only linear read-out, from each position's MAR decoder condition z (or, with
    `loss.edit_region_at=source`, each source grid row's final LLM state), of whether the source
    object the edit instruction names covers that token cell (Shapes world).

    Editing models learn the instruction's colour or shape but apply it to every object: nothing
    tells a decoder position whether it is the one named (research/shapes-model-notebook.md, "Fourteenth session").
    This read-out asks each position exactly that. Inference never uses it; the trainer keeps its
    weights beside the model in checkpoints.
    """

    def __init__(self, width: int, weight: float) -> None:
        super().__init__()
        self.region = nn.Linear(width, 1)
        self.weight = weight

    def loss(self, z: torch.Tensor, region: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy over every token of the rows that name an object: z (B, L, D),
        region (B, L) bool (cells the named object covers), named (B,) bool."""
        logits = self.region(z[named]).squeeze(-1).float()  # (B_named, L)
        return F.binary_cross_entropy_with_logits(logits, region[named].float())


class EditTargetReadout(nn.Module):
    """Training-only linear read-outs, from each MAR decoder condition z of an edit, of where the
    object the edit draws lies in the target (every cell its box covers) and, at the cells its box
    alone covers, its shape and colour (Shapes world).

    With the untouched objects kept, edits still draw the new colour as a blob and add or move
    nothing (research/shapes-model-notebook.md, "Seventeenth session"): the decoder positions of the edited object
    do not know what to draw there. This read-out asks them. Inference never uses it; the trainer
    keeps its weights beside the model in checkpoints.
    """

    def __init__(self, width: int, num_shapes: int, num_colors: int, weight: float) -> None:
        super().__init__()
        self.where = EditRegionReadout(width, weight)
        self.what = ObjectReadout(width, num_shapes, num_colors, weight)
        self.weight = weight

    def loss(self, z: torch.Tensor, drawn: torch.Tensor, region: torch.Tensor, index: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        """Region cross-entropy over the rows that draw an object plus shape and colour cross-entropy
        at its own cells: z (B, L, D), drawn (B,) bool, region (B, L) bool, index (K, 2) = (row,
        cell), labels (K, 2) = (shape, colour)."""
        loss = self.where.loss(z, region, drawn)
        if len(index):
            loss = loss + self.what.loss(z, index, labels)
        return loss


class RelationReadout(nn.Module):
    """Training-only linear read-out, from the final hidden state of the row that answers a relation
    question, of whether its first named shape lies left of and above its second (Shapes world).

    Attention supervision tells an answer where the named objects are, but the answer alone does
    not teach the LLM to compare two positions: relation answers stay at chance (research/shapes-model-notebook.md,
    "Eleventh session"). Reading the two comparisons out of the answer row gives that row a direct
    signal. Inference never uses it; the trainer keeps its weights beside the model in checkpoints.
    """

    def __init__(self, hidden_size: int, weight: float) -> None:
        super().__init__()
        self.order = nn.Linear(hidden_size, 2)
        self.weight = weight

    def loss(self, hidden: torch.Tensor, query: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy: hidden (B, T, hidden) the LLM's output, query (R, 2) = (batch row,
        answer row), order (R, 2) = (first left of second, first above second) as 0/1."""
        picked = hidden[query[:, 0], query[:, 1]].float()  # (R, hidden)
        return F.binary_cross_entropy_with_logits(self.order(picked), order.float())


def head_attention(attention: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   attention_mask: torch.Tensor, query: torch.Tensor, head: int = 0) -> torch.Tensor:
    """One head's attention weights from chosen rows, recomputed from a Qwen2 attention layer's input.

    hidden: (B, T, hidden) the layer's normalised input; position_embeddings: its rotary (cos, sin),
    each (B, T, head_dim); attention_mask: (B, T) key validity (right padding); query: (K, 2) (batch
    row, query row). Returns (K, T) softmax weights over the keys (causal, padding masked), equal to
    the weights the layer's eager attention computes for that head.
    """
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    head_dim = attention.head_dim
    kv_head = head // attention.num_key_value_groups  # grouped-query attention: heads share K/V in groups
    rows, positions = query[:, 0], query[:, 1]
    each = torch.arange(len(rows), device=hidden.device)
    states = hidden[rows]  # (K, T, hidden)
    q = attention.q_proj(states[each, positions])  # (K, heads·head_dim)
    q = q.view(len(rows), -1, head_dim)[:, head]  # (K, head_dim)
    k = attention.k_proj(states).view(len(rows), states.shape[1], -1, head_dim)[:, :, kv_head]  # (K, T, head_dim)
    # Without explicit position ids the rotary tables have a batch axis of one: broadcast it first.
    cos, sin = (table.expand(hidden.shape[0], -1, -1)[rows] for table in position_embeddings)  # (K, T, head_dim)
    q_cos, q_sin = cos[each, positions], sin[each, positions]  # (K, head_dim)
    # apply_rotary_pos_emb expects (batch, heads, length, dim): give q and k a heads axis of one.
    q, _ = apply_rotary_pos_emb(q[:, None, None], q[:, None, None], q_cos[:, None], q_sin[:, None])
    _, k = apply_rotary_pos_emb(k[:, None], k[:, None], cos, sin)
    scores = (k[:, 0] @ q[:, 0, 0, :, None]).squeeze(-1) * attention.scaling  # (K, T)
    keys = torch.arange(states.shape[1], device=hidden.device)
    visible = attention_mask[rows].bool() & (keys[None] <= positions[:, None])
    return scores.float().masked_fill(~visible, float("-inf")).softmax(-1)


def named_attention_loss(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−log of the attention mass (K, T) that falls on the target rows (K, T), averaged over queries."""
    return -(weights * target).sum(-1).clamp(min=1e-6).log().mean()


# ---------------------------------------------------------------------------------------------
# The auxiliary losses around a task's own loss
# ---------------------------------------------------------------------------------------------


class WorldAuxiliaryLosses(nn.Module):
    """The world's extra loss terms, built from the run's `LossConfig`; each term is off at weight 0.

    The trainer calls, for a task's batch: `before` (terms that read the inputs the task's loss
    starts from), `capturing` (a context open while the task's loss runs, recording the LLM
    layer inputs and outputs the terms need), then `after` (terms that read what the task's loss
    computed). Each returns {name: (weight, loss)}; `wants_decoder` says whether an edit's loss
    must hand out its decoder conditions.
    """

    def __init__(self, model, loss: LossConfig) -> None:
        super().__init__()
        from unipic.world.spec import COLORS, SHAPES

        config = model.config
        self.model = model
        self.attend_named, self.attend_layer, self.attend_relation = loss.attend_named, loss.attend_layer, loss.attend_relation
        self.attend_edit, self.edit_keep = loss.attend_edit, loss.edit_keep
        self.relation_layer = loss.relation_layer
        if loss.edit_region_at == "source" and not config.edit_source_through_llm:
            raise UserError("loss.edit_region_at=source reads source rows that see the instruction: it needs "
                            "model.edit_source_through_llm=true")
        # Created in this order from the run's seed: a run's read-outs start identical every time.
        self.relation = RelationReadout(config.llm.hidden_size, loss.relation_readout) if loss.relation_readout > 0 else None
        self.region_key = "source_rows" if loss.edit_region_at == "source" else "z"
        region_width = config.llm.hidden_size if loss.edit_region_at == "source" else config.mar.decoder_embed_dim
        self.region = EditRegionReadout(region_width, loss.edit_region_readout) if loss.edit_region_readout > 0 else None
        self.readout = None
        if loss.object_readout > 0:
            self.readout = ObjectReadout(config.llm.hidden_size, len(SHAPES), len(COLORS), loss.object_readout)
        self.drawn = None
        if loss.edit_target_readout > 0:
            self.drawn = EditTargetReadout(config.mar.decoder_embed_dim, len(SHAPES), len(COLORS),
                                           loss.edit_target_readout)

    def parts(self) -> list[tuple[str, nn.Module | None]]:
        """(role, module) of each training-only read-out, None where its loss is off."""
        return [("object_readout", self.readout), ("relation_readout", self.relation),
                ("edit_region_readout", self.region), ("edit_target_readout", self.drawn)]

    def _switches(self, task: str, batch: dict) -> dict[str, bool]:
        """Which terms this batch turns on (a term needs its weight and its targets)."""
        if task == "i2t":
            relations = len(batch.get("relation_query", ())) > 0
            return {"attend": self.attend_named > 0 and len(batch.get("attend_query", ())) > 0,
                    "split": self.attend_relation > 0 and relations,
                    "relation": self.relation is not None and relations,
                    "read_layer": self.relation is not None and relations and self.relation_layer >= 0}
        if task == "edit":
            targets, named, drawn = batch.get("edit_attend_target"), batch.get("edit_named"), batch.get("edit_drawn")
            return {"attend": self.attend_edit > 0 and targets is not None and bool(targets.any()),
                    "region": self.region is not None and named is not None and bool(named.any()),
                    "drawn": self.drawn is not None and drawn is not None and bool(drawn.any())}
        return {}

    def wants_decoder(self, batch: dict) -> bool:
        """Whether an edit batch's terms read the MAR decoder's conditions."""
        switches = self._switches("edit", batch)
        return switches["region"] or switches["drawn"]

    def before(self, task: str, batch: dict, features: torch.Tensor | None = None) -> dict[str, tuple[float, torch.Tensor]]:
        """Terms on the understanding features, computed before the task's loss (i2t: object read-out)."""
        if task == "i2t" and self.readout is not None and "object_index" in batch:
            return {"readout": (self.readout.weight, self.readout.loss(features, batch["object_index"],
                                                                        batch["object_labels"]))}
        return {}

    @contextmanager
    def capturing(self, task: str, batch: dict) -> Iterator[dict]:
        """Open while the task's loss runs: records the supervised layer's inputs and the relation
        read-out layer's output where this batch's terms need them."""
        switches = self._switches(task, batch)
        layers = self.model.llm.model.layers
        captured: dict = {}
        with ExitStack() as stack:
            if task == "i2t":
                # The supervised heads' weights are recomputed from the layer's input, so the LLM
                # itself keeps its fast attention kernel.
                captured["inputs"] = stack.enter_context(captured_inputs(
                    layers[self.attend_layer].self_attn, active=switches["attend"] or switches["split"]))
                # The relation read-out may read an earlier layer, leaving later ones to combine the
                # order with the question's relation word.
                source = layers[self.relation_layer if switches["read_layer"] else 0]
                captured["output"] = stack.enter_context(captured_output(source, active=switches["read_layer"]))
            elif task == "edit":
                captured["inputs"] = stack.enter_context(captured_inputs(layers[self.attend_layer].self_attn,
                                                                         active=switches["attend"]))
            yield captured

    def after(self, task: str, batch: dict, captured: dict, hidden: torch.Tensor | None = None,
              decoder: dict | None = None) -> dict[str, tuple[float, torch.Tensor]]:
        """Terms on what the task's loss computed: `hidden` the LLM's output (i2t), `decoder` the
        MAR decoder's conditions and source rows (edit)."""
        switches = self._switches(task, batch)
        layer = self.model.llm.model.layers[self.attend_layer].self_attn
        layer_input = captured.get("inputs", {})
        extra: dict[str, tuple[float, torch.Tensor]] = {}
        if task == "i2t":

            def attention_loss(query: torch.Tensor, target: torch.Tensor, head: int) -> torch.Tensor:
                weights = head_attention(layer, layer_input["hidden_states"], layer_input["position_embeddings"],
                                         batch["attention_mask"], query, head)
                return named_attention_loss(weights, target)

            if switches["attend"]:
                extra["attend"] = (self.attend_named, attention_loss(batch["attend_query"], batch["attend_target"], 0))
            if switches["split"]:
                # Two heads, one per named shape, so that the answer row receives both positions apart.
                query = batch["relation_query"]
                split = attention_loss(query, batch["relation_first"], 0) + attention_loss(query, batch["relation_second"], 1)
                extra["attend_relation"] = (self.attend_relation, split / 2)
            if switches["relation"]:
                read = captured["output"]["output"] if switches["read_layer"] else hidden
                extra["relation"] = (self.relation.weight, self.relation.loss(read, batch["relation_query"],
                                                                             batch["relation_order"]))
        elif task == "edit":
            keep = batch.get("edit_keep") if self.model.edit_keep is not None else None
            if keep is not None:
                logits = self.model.edit_keep_logits(decoder["source_rows"])  # (B, L)
                extra["edit_keep"] = (self.edit_keep, F.binary_cross_entropy_with_logits(logits, keep.float()))
            if switches["region"]:
                extra["edit_region"] = (self.region.weight, self.region.loss(decoder[self.region_key], batch["edit_region"],
                                                                           batch["edit_named"]))
            if switches["drawn"]:
                extra["edit_target"] = (self.drawn.weight, self.drawn.loss(decoder["z"], batch["edit_drawn"],
                                                                          batch["edit_drawn_region"],
                                                                          batch["edit_drawn_index"],
                                                                          batch["edit_drawn_labels"]))
            if switches["attend"]:
                extra["attend_edit"] = (self.attend_edit, self._edit_attention_loss(layer, layer_input,
                                                                                  batch["attention_mask"],
                                                                                  batch["edit_attend_target"]))
        return extra

    def _edit_attention_loss(self, layer: nn.Module, layer_input: dict, prefix_mask: torch.Tensor,
                             targets: torch.Tensor) -> torch.Tensor:
        """Head 0's attention from each image buffer row to the source rows of the named object.

        At the first sampling step every target token is hidden, so the buffer rows, last in the
        LLM's image rows, are all that carries the instruction to the MAR decoder; this tells them
        where in the source the instruction's object lies. targets: (B, T) over the prefix rows.
        """
        hidden = layer_input["hidden_states"]  # (B, T + L_vis + buffer, hidden)
        batch, prefix = targets.shape
        length, buffer = hidden.shape[1], self.model.config.mar.buffer_size
        rows = targets.any(dim=1).nonzero().flatten()
        query = torch.stack([rows.repeat_interleave(buffer),
                             torch.arange(length - buffer, length).repeat(len(rows))], dim=1)  # (K, 2)
        keys_valid = torch.cat([prefix_mask.bool(), prefix_mask.new_ones(batch, length - prefix, dtype=torch.bool)],
                               dim=1)  # (B, T + Lz): image rows follow every row's valid prefix
        weights = head_attention(layer, hidden, layer_input["position_embeddings"], keys_valid, query, 0)
        return named_attention_loss(weights, F.pad(targets, (0, length - prefix))[query[:, 0]])
