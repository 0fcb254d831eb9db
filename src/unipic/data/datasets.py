"""Torch datasets: Shapes-world examples streamed on the fly, and folders in the disk layout.

Every dataset yields dicts with the same keys as the disk layout's rows, images opened:

    t2i   {"task", "index", "image": PIL.Image, "text": str, ...}
    i2t   {"task", "index", "image": PIL.Image, "question": str, "answer": str, ...}
    edit  {"task", "index", "source": PIL.Image, "instruction": str, "target": PIL.Image, ...}

so training code reads generated and user data the same way. Pass `transform` to turn a dict
into tensors (it runs inside the DataLoader workers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from unipic.data.disk import read_folder
from unipic.distributed import process_rank_and_world
from unipic.world.examples import LAYOUTS, TASKS, make_example
from unipic.world.questions import QUESTION_KINDS
from unipic.world.render import render
from unipic.world.scene import rng_for
from unipic.world.spec import EDIT_KINDS


def render_example(task: str, example, index: int, size: int) -> dict:
    """A generated example as a dict of the disk layout's keys, images rendered at `size`."""
    if task == "t2i":
        return {"task": task, "index": index, "image": render(example.scene, size), "text": example.text,
                "kind": example.kind}
    if task == "i2t":
        q = example.question
        return {"task": task, "index": index, "image": render(example.scene, size), "question": q.question,
                "answer": q.answer, "kind": q.kind}
    return {"task": task, "index": index, "source": render(example.source, size),
            "instruction": example.instruction, "target": render(example.target, size), "kind": example.kind}


class _Stream(IterableDataset):
    """Shared sharding: global example indices start, start+1, ... are dealt round-robin over
    (accelerate/torchrun process) x (DataLoader worker), so each index is produced exactly once
    across all of them; process r always gets the indices = r mod world size, however many
    DataLoader workers it uses."""

    def __init__(self, seed: int, size: int, length: int | None, start: int, transform: Callable | None,
                 rank: int | None, world_size: int | None) -> None:
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an integer >= 16, got {size!r}")
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0 or None (endless), got {length}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.seed, self.size, self.length, self.start, self.transform = seed, size, length, start, transform
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless stream (length=None) has no len()")
        return self.length

    def example(self, index: int) -> dict:
        raise NotImplementedError

    def _shard(self) -> tuple[int, int]:
        if self.rank is None or self.world_size is None:
            rank, world = process_rank_and_world()
        else:
            rank, world = self.rank, self.world_size
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # Rank-major: a process sees indices = rank mod world whatever its number of workers.
        return worker * world + rank, world * workers

    def __iter__(self):
        shard, shards = self._shard()
        index = self.start + shard
        stop = None if self.length is None else self.start + self.length
        while stop is None or index < stop:
            item = self.example(index)
            yield self.transform(item) if self.transform is not None else item
            index += shards


class ShapesStream(_Stream):
    """Examples of one task ('t2i', 'i2t' or 'edit') generated on the fly from a seed.

    Args:
        task: which task.
        seed: stream seed; example i is a pure function of (seed, i).
        size: image side S.
        length: number of examples (None: endless).
        start: first example index (e.g. to continue where an export stopped).
        train: training stream (no held-out pairs) or evaluation stream.
        transform: optional function applied to each example dict.
        rank, world_size: override the launcher's process rank (default: from the environment).
        layout: text-to-image scenes: "random" (the world's) or "canonical" (one fixed scene per
            text, `unipic.world.canonical`).
        question_kinds: image-to-text: the kinds each example's question is drawn from (uniformly).
        edit_kinds: editing: the kinds each example's edit is drawn from (uniformly).
        edit_placement: editing: where added and moved objects go, "random" or "fixed"
            (`unipic.world.edits`).
    """

    def __init__(self, task: str, seed: int = 0, size: int = 128, length: int | None = None, start: int = 0,
                 train: bool = True, transform: Callable | None = None, rank: int | None = None,
                 world_size: int | None = None, layout: str = "random",
                 question_kinds: Sequence[str] = QUESTION_KINDS, edit_kinds: Sequence[str] = EDIT_KINDS,
                 edit_placement: str = "random") -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        super().__init__(seed, size, length, start, transform, rank, world_size)
        unknown = sorted(set(question_kinds) - set(QUESTION_KINDS))
        if unknown or not question_kinds:
            raise ValueError(f"question kinds {list(question_kinds)} must be some of {', '.join(QUESTION_KINDS)}")
        unknown = sorted(set(edit_kinds) - set(EDIT_KINDS))
        if unknown or not edit_kinds:
            raise ValueError(f"edit kinds {list(edit_kinds)} must be some of {', '.join(EDIT_KINDS)}")
        self.task, self.train, self.layout = task, train, layout
        self.question_kinds, self.edit_kinds = tuple(question_kinds), tuple(edit_kinds)
        self.edit_placement = edit_placement

    def example(self, index: int, with_world: bool = False):
        """Example `index` as a dict of the disk layout's keys; with `with_world`, a pair (that dict,
        the world's example object with its scene)."""
        example = make_example(self.task, self.seed, index, self.train, self.layout, self.question_kinds,
                               self.edit_kinds, self.edit_placement)
        rendered = render_example(self.task, example, index, self.size)
        return (rendered, example) if with_world else rendered


class ShapesMixedStream(_Stream):
    """A mixture of the three tasks: example i draws its task from `weights` with its own
    generator (a pure function of (seed, i)), then is that task's example i.

    Args:
        weights: {task: weight}, e.g. {"t2i": 2, "i2t": 1, "edit": 1}; missing tasks get 0.
        Other arguments as `ShapesStream`.
    """

    def __init__(self, weights: Mapping[str, float] | None = None, seed: int = 0, size: int = 128,
                 length: int | None = None, start: int = 0, train: bool = True,
                 transform: Callable | None = None, rank: int | None = None,
                 world_size: int | None = None) -> None:
        weights = dict(weights or dict.fromkeys(TASKS, 1.0))
        unknown = set(weights) - set(TASKS)
        if unknown or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"weights must map tasks {TASKS} to non-negative numbers with a positive sum, got {weights}")
        super().__init__(seed, size, length, start, transform, rank, world_size)
        self.tasks = [t for t in TASKS if weights.get(t, 0) > 0]
        total = sum(weights[t] for t in self.tasks)
        self.cumulative = np.cumsum([weights[t] / total for t in self.tasks])
        self.train = train

    def task_of(self, index: int) -> str:
        u = rng_for(self.seed, 77, index).random()
        return self.tasks[min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.tasks) - 1)]

    def example(self, index: int) -> dict:
        task = self.task_of(index)
        return render_example(task, make_example(task, self.seed, index, self.train), index, self.size)


class FolderDataset(Dataset):
    """A map-style dataset over a folder in the disk layout (see `unipic.data.disk`).

    Args:
        root: the folder holding `data.jsonl`.
        task: expected task (None: detect it).
        transform: optional function applied to each example dict.
        check_files: check at construction that every image exists.

    Raises:
        UserError: the folder is not a valid dataset (the message names the line and the fix).
    """

    def __init__(self, root: str | Path, task: str | None = None, transform: Callable | None = None,
                 check_files: bool = True) -> None:
        self.folder = read_folder(root, task, check_files)
        self.task = self.folder.task
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        item = self.folder.load(index % len(self))
        return self.transform(item) if self.transform is not None else item


def pil_collate(batch: list[dict]) -> dict[str, list]:
    """Collate example dicts into a dict of lists, keeping PIL images and strings as they are.
    Keys some examples lack (mixed-task batches) get None in their places."""
    keys = list(dict.fromkeys(key for item in batch for key in item))
    return {key: [item.get(key) for item in batch] for key in keys}


__all__ = ["FolderDataset", "ShapesMixedStream", "ShapesStream", "pil_collate", "render_example"]
