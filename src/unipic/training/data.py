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
from unipic.training.world_aux import TARGETS, WorldTargets, world_example
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
            return world_example(self._stream, self.task, example_id, self.seed, self.questions, self.kinds)
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
        self.size = config.image_size
        # Which Shapes-world training-only targets batches carry (world_aux.TARGETS); None = all,
        # with the object read-out at centre cells. A run builds only those its losses read.
        self.world = WorldTargets(model, self.size, set(TARGETS) - {"object_cells"} if targets is None else targets)
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
        self.world.add_i2t(batch, examples, answer_rows)
        return batch

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
        self.world.add_edit(batch, examples, repeats)
        return batch

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
