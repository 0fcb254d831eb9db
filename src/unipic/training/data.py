"""Adapter from `unipic.data` examples to training batches.

Examples come from the Shapes-world streams (`unipic.data.datasets.ShapesStream`) or from
folders in the on-disk layout (`unipic.data.disk.read_folder`), as dicts with the layout's keys:
t2i {image, text}, i2t {image, question, answer}, edit {source, instruction, target}.

Sampling (as upstream's multi-source sampler, spec §12.2): batches never mix tasks. Micro-batch
m belongs to task `schedule[m % len(schedule)]`, where the schedule repeats each task `data.tasks`
times in the order t2i, i2t, edit; every micro-batch therefore computes one task's loss.

Positions: each process counts the examples it has consumed per task. Its k-th example of a task
is global example `k * world_size + rank` — for a world stream a pure function of (seed, index),
for a folder an index into a permutation reshuffled each epoch from (seed, task, epoch) — so a
resumed run jumps straight to its position without replaying anything.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch

from unipic.training.config import TASKS, DataConfig
from unipic.unipic1.sampling.prompts import (
    center_crop_resize,
    edit_user_text,
    expand_image_placeholder,
    format_instruction,
    images_to_tensor,
    pad_to_square,
    padding_id,
)

IMAGE_KEYS = {"t2i": ("image",), "i2t": ("image",), "edit": ("source", "target")}
# The training-only targets a world batch can carry, each read by one family of losses:
# objects (loss.object_readout at each object's centre cell), object_cells (the same at every cell
# one object alone covers: loss.object_readout_cells=covered), attend (loss.attend_named), relation
# (loss.attend_relation, loss.relation_readout), edit_attend (loss.attend_edit), edit_region
# (loss.edit_region_readout), edit_keep (models with edit_keep_mask: the cells an edit leaves alone),
# edit_target (loss.edit_target_readout: where the edited object lies in the target, its shape and colour).
TARGETS = ("objects", "object_cells", "attend", "relation", "edit_attend", "edit_region", "edit_keep",
           "edit_target")


class TaskSource:
    """One task's examples for one process: `get(k)` is this process's k-th example."""

    def __init__(self, task: str, config: DataConfig, rank: int, world_size: int) -> None:
        self.task, self.rank, self.world_size = task, rank, world_size
        self.seed = config.world_seed
        self.pool = config.world_pool
        self.questions = config.i2t_questions
        if config.source == "world":
            from unipic.data.datasets import ShapesStream
            from unipic.world.questions import QUESTION_KINDS
            from unipic.world.spec import EDIT_KINDS

            self.kinds = tuple(config.i2t_kinds) or QUESTION_KINDS
            self._stream = ShapesStream(task, seed=config.world_seed, size=config.image_size, train=True,
                                        rank=rank, world_size=world_size, layout=config.world_layout,
                                        question_kinds=self.kinds, edit_kinds=tuple(config.edit_kinds) or EDIT_KINDS,
                                        edit_placement=config.edit_placement)
            self._folder = None
        else:
            from unipic.data.disk import read_folder

            self._stream = None
            self._folder = read_folder(config.folders[task], task)
            self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        if self._folder is not None:
            return len(self._folder)
        return self.pool or 2**62

    def get(self, k: int) -> dict:
        """This process's k-th example, with `example_id`: which underlying example it is (a world
        example index or a folder row), the key under which its images' latents may be cached."""
        index = k * self.world_size + self.rank  # global example index
        if self._stream is not None:
            example_id = index % self.pool if self.pool else index
            if self.task == "edit":
                # Editing examples also carry the box of the object their instruction names (none
                # for add), for loss.attend_edit and loss.edit_region_readout; the boxes of the
                # objects it leaves alone and of the edited object in the target (none for remove),
                # for models with edit_keep_mask.
                example, edit = self._stream.example(example_id, with_world=True)
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
            if self.task != "i2t":
                return {**self._stream.example(example_id), "example_id": example_id}
            # Understanding examples also carry their objects, for loss.object_readout.
            example, world = self._stream.example(example_id, with_world=True)
            objects = [(o.cx, o.cy, o.shape, o.color) for o in world.scene.objects]
            row = {**example, "example_id": example_id, "objects": objects,
                   "object_boxes": [o.box for o in world.scene.objects]}
            from unipic.world.questions import named_objects, relation_order

            questions = [world.question]
            if self.questions > 1:
                from unipic.world.examples import extra_questions

                more = extra_questions(self.seed, example_id, world.scene, world.question, self.questions - 1,
                                       self.kinds)
                row["more_questions"] = [(q.question, q.answer) for q in more]
                questions += more
            # Per turn, the boxes of the objects its question names (for loss.attend_named; a
            # relation's two in the question's order) and a relation's order (loss.relation_readout).
            row["named_boxes"] = [[o.box for o in named_objects(world.scene, q)] for q in questions]
            row["relation_order"] = [relation_order(world.scene, q) for q in questions]
            return row
        n = len(self._folder)
        epoch, offset = divmod(index, n)
        if self._perm is None or self._perm[0] != epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, TASKS.index(self.task), epoch))
            self._perm = (epoch, torch.randperm(n, generator=generator))
        row = int(self._perm[1][offset])
        return {**self._folder.load(row), "example_id": row}


class TaskData:
    """The round-robin task schedule and each task's position for this process."""

    def __init__(self, config: DataConfig, rank: int, world_size: int) -> None:
        self.schedule = [t for t in TASKS for _ in range(config.tasks.get(t, 0))]
        self.sources = {t: TaskSource(t, config, rank, world_size) for t in dict.fromkeys(self.schedule)}
        self.positions = dict.fromkeys(self.sources, 0)
        self.batch_size = config.batch_size

    def task_for(self, micro_step: int) -> str:
        """Which task micro-batch `micro_step` (counted from the start of the run) belongs to."""
        return self.schedule[micro_step % len(self.schedule)]

    def next_examples(self, task: str) -> list[dict]:
        """The next `batch_size` examples of `task` (advances its position)."""
        start = self.positions[task]
        self.positions[task] = start + self.batch_size
        return [self.sources[task].get(k) for k in range(start, start + self.batch_size)]

    def state_dict(self) -> dict[str, int]:
        return dict(self.positions)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for task in self.positions:
            self.positions[task] = int(state.get(task, 0))


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (numpy's SeedSequence hashing; stable across platforms)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1, 2**31], dtype=np.uint64)))


# ---------------------------------------------------------------------------------------------
# Examples → tensors
# ---------------------------------------------------------------------------------------------


class BatchBuilder:
    """Turns a list of example dicts of one task into the tensors `training.losses` takes.

    Prompts use the model's chat template and its sampling prompts, exactly as inference builds
    them (so training and sampling see the same token layout):

    - t2i: user turn "Generate an image: {text}" (with probability `unconditional_prob` the CFG
      prompt "Generate an image." instead, spec §12.2);
    - i2t: user turn "<image>\\n{question}", assistant answer + "<|im_end|>"; only the answer is
      supervised (labels -100 elsewhere);
    - edit: user turn "<image>\\n{instruction}" with the source's h·w + buffer `<image>` rows
      (inference's layout; upstream's training data put them before the template, spec §15.17).
      With probability `edit_repeat_prob` an example becomes (source, "Repeat this image.",
      source), which teaches the branch editing CFG contrasts against.
    """

    def __init__(self, model, tokenizer, config: DataConfig, targets: Collection[str] | None = None) -> None:
        self.config = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = config
        # Which training-only targets world batches carry (TARGETS); None = all, with the object
        # read-out at centre cells. A run builds only those its losses read: about 1.6 ms a batch.
        self.targets = set(TARGETS) - {"object_cells"} if targets is None else set(targets)
        unknown = self.targets - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown batch targets {sorted(unknown)}; known: {list(TARGETS)}")
        if {"objects", "object_cells"} <= self.targets:
            raise ValueError("batch targets 'objects' and 'object_cells' are alternatives; give one")
        self.size = config.image_size
        self.pad_id = padding_id(tokenizer)
        # A finite data set (a world pool or folders) repeats its images, and the VAE is frozen.
        finite = config.source == "folder" or config.world_pool > 0
        self.latent_cache = LatentCache(model) if config.cache_latents and finite else None

    def __call__(self, task: str, examples: Sequence[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        batch = getattr(self, f"_{task}")(examples, rng)
        if self.latent_cache is not None:
            for key in ("pixels", "source", "target"):
                if key in batch:
                    roles = [key] * len(examples)
                    if key == "target":  # a "repeat this image" example's target is its source
                        roles = ["source" if r else "target" for r in batch["target_is_source"].tolist()]
                    batch[f"{key}_tokens"] = self.latent_cache.tokens(task, roles, examples, batch[key])
        return batch

    # --- helpers ------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _truncate(self, text: str) -> str:
        ids = self._ids(text)
        if len(ids) <= self.cfg.max_text_tokens:
            return text
        return self.tokenizer.decode(ids[: self.cfg.max_text_tokens])

    def _pixels(self, images: Sequence, pad: bool = False) -> torch.Tensor:
        size = self.size
        ready = []
        for image in images:
            if image.size != (size, size):
                image = pad_to_square(image).resize((size, size)) if pad else center_crop_resize(image, size, size)
            ready.append(image)
        return images_to_tensor(ready, torch.device("cpu"))

    def _pad(self, sequences: list[list[int]], labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
        """Right-pad (ids with eos, labels with -100, mask 0), as upstream's collate functions."""
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            out["labels"] = torch.full((len(sequences), length), -100, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            if labels is not None:
                out["labels"][row, : len(seq)] = torch.tensor(labels[row])
        return out

    def _prompt(self, text: str) -> str:
        return format_instruction(self.config.prompt_template, text)

    # --- tasks --------------------------------------------------------------------------------

    def _t2i(self, examples: Sequence[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        sampling = self.config.sampling
        texts = []
        for ex in examples:
            if rng.random() < self.cfg.unconditional_prob:
                texts.append(self._prompt(sampling.cfg_prompt))
            else:
                texts.append(self._prompt(sampling.t2i_prompt.format(prompt=self._truncate(ex["text"].strip()))))
        batch = self._pad([self._ids(t) for t in texts])
        batch["pixels"] = self._pixels([ex["image"] for ex in examples])
        return batch

    def _i2t(self, examples: Sequence[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        image_token = self.config.image_token
        count = self.model.num_understanding_tokens(self.size)
        suffix = self.config.prompt_template["SUFFIX"]
        sequences, labels, answer_rows = [], [], []
        for ex in examples:
            prompt = self._prompt(f"{image_token}\n{self._truncate(ex['question'].strip())}")
            turns = [(expand_image_placeholder(prompt, image_token, count), ex["answer"])]
            # Further turns about the same image: more supervised answers per encoded image.
            turns += [("\n" + self._prompt(self._truncate(q.strip())), a) for q, a in ex.get("more_questions", ())]
            sequence, label, rows = [], [], []
            for turn, answer in turns:
                turn_ids = self._ids(turn)
                answer_ids = self._ids(self._truncate(answer.strip()) + suffix)
                rows.append(len(sequence) + len(turn_ids) - 1)  # the row that predicts the answer's first token
                sequence += turn_ids + answer_ids
                label += [-100] * len(turn_ids) + answer_ids
            sequences.append(sequence)
            labels.append(label)
            answer_rows.append(rows)
        batch = self._pad(sequences, labels)
        batch["pixels"] = self._pixels([ex["image"] for ex in examples], pad=True)
        if {"objects", "object_cells"} & self.targets and all("objects" in ex for ex in examples):
            batch["object_index"], batch["object_labels"] = self._object_targets(examples,
                                                                                 "object_cells" in self.targets)
        if "attend" in self.targets and all("named_boxes" in ex for ex in examples):
            batch["attend_query"], batch["attend_target"] = self._attention_targets(examples, batch["input_ids"],
                                                                                    answer_rows)
        if "relation" in self.targets and all("relation_order" in ex for ex in examples):
            batch.update(self._relation_targets(examples, batch["input_ids"], answer_rows))
        return batch

    def _cells_of(self, boxes: Sequence, image_positions: torch.Tensor, length: int) -> torch.Tensor:
        """(length,) bool: the `<image>` rows (at `image_positions`, grid cells first) of the
        understanding-grid cells that `boxes` cover."""
        from unipic.world.scene import covered_cells

        rows, cols = self.model.understanding_grid(self.size)
        target = torch.zeros(length, dtype=torch.bool)
        for box in boxes:
            target[image_positions[covered_cells(box, rows, cols)]] = True
        return target

    def _relation_targets(self, examples: Sequence[dict], input_ids: torch.Tensor,
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

    def _attention_targets(self, examples: Sequence[dict], input_ids: torch.Tensor,
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

    def _object_targets(self, examples: Sequence[dict], covered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _edit(self, examples: Sequence[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        image_token = self.config.image_token
        count = self.model.num_image_tokens(self.model.grid_for(self.size, self.size))
        texts, sources, targets, repeats = [], [], [], []
        for ex in examples:
            instruction, target = self._truncate(ex["instruction"].strip()), ex["target"]
            repeat = rng.random() < self.cfg.edit_repeat_prob
            if repeat:
                instruction, target = self.config.sampling.edit_cfg_prompt, ex["source"]
            texts.append(expand_image_placeholder(self._prompt(edit_user_text(self.config, instruction)), image_token,
                                                  count))
            sources.append(ex["source"])
            targets.append(target)
            repeats.append(repeat)
        batch = self._pad([self._ids(t) for t in texts])
        batch["source"] = self._pixels(sources)
        batch["target"] = self._pixels(targets)
        batch["target_is_source"] = torch.tensor(repeats, dtype=torch.bool)
        wanted = {"edit_attend", "edit_region"} & self.targets
        if wanted and all("edited_boxes" in ex for ex in examples):
            named, region = self._edit_regions(examples, repeats)
            if "edit_region" in wanted:
                batch["edit_named"], batch["edit_region"] = named, region
            if "edit_attend" in wanted:
                batch["edit_attend_target"] = self._edit_attention_targets(batch["input_ids"], region)
        if "edit_keep" in self.targets and all("kept_boxes" in ex for ex in examples):
            batch["edit_keep"] = self._edit_keep(examples, repeats)
        if "edit_target" in self.targets and all("new_objects" in ex for ex in examples):
            batch.update(self._edit_target_targets(examples, repeats))
        return batch

    def _edit_target_targets(self, examples: Sequence[dict], repeats: Sequence[bool]) -> dict[str, torch.Tensor]:
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

    def _edit_keep(self, examples: Sequence[dict], repeats: Sequence[bool]) -> torch.Tensor:
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

    def _edit_regions(self, examples: Sequence[dict], repeats: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _edit_attention_targets(self, input_ids: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the source `<image>` rows of the cells in `region` (B, L), the named object's
        (none for add and "repeat this image" examples)."""
        targets = torch.zeros(input_ids.shape, dtype=torch.bool)
        for b in torch.nonzero(region.any(dim=1)).flatten().tolist():
            # The source's first L `<image>` rows are its grid cells in raster order (buffers last).
            image_positions = torch.nonzero(input_ids[b] == self.model.image_token_id).flatten()
            targets[b, image_positions[: region.shape[1]][region[b]]] = True
        return targets


class LatentCache:
    """The frozen VAE's tokens of each training image, encoded once and reused on every later epoch.

    Keyed by (task, image role, example id). Each image is encoded on its own, so its tokens do not
    depend on which batch first met it (a resumed run gets bit-identical tokens).
    """

    def __init__(self, model) -> None:
        self.model = model
        self._tokens: dict[tuple[str, str, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def tokens(self, task: str, roles: Sequence[str], examples: Sequence[dict], pixels: torch.Tensor) -> torch.Tensor:
        """(B, L, token_dim) tokens of `pixels` (B, 3, H, W), from the cache where present; `roles`
        name which image of each example a row is (image / source / target)."""
        rows = []
        for role, example, image in zip(roles, examples, pixels):
            key = (task, role, int(example["example_id"]))
            cached = self._tokens.get(key)
            if cached is None:
                device = next(self.model.vae.parameters()).device
                cached = self.model.encode_images(image[None].to(device))[0].cpu()
                self._tokens[key] = cached
            rows.append(cached)
        return torch.stack(rows)


def vae_pixels(examples: Sequence[dict], task: str, size: int, crop: int = 0,
               rng: np.random.Generator | None = None) -> torch.Tensor:
    """Every image of a list of examples (edit: sources and targets) as (N, 3, S, S) in [-1, 1];
    with `crop`, a random crop × crop window of each (the VAE is convolutional, so it trains on
    crops and runs on whole images, as LDM's autoencoders do)."""
    images = [center_crop_resize(ex[key], size, size) if ex[key].size != (size, size) else ex[key]
              for ex in examples for key in IMAGE_KEYS[task]]
    pixels = images_to_tensor(images, torch.device("cpu"))
    if not crop or crop >= size:
        return pixels
    corners = rng.integers(0, size - crop + 1, size=(len(images), 2))
    return torch.stack([p[:, y:y + crop, x:x + crop] for p, (y, x) in zip(pixels, corners.tolist())])
