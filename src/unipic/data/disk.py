"""The on-disk dataset layout (read by the training pipeline, written by `unipic data export`,
and the format users put their own data in). See `src/unipic/data/README.md`.

    DIR/data.jsonl     one JSON object per example
    DIR/images/...     the images the rows point to (paths relative to DIR, or absolute)
    DIR/info.json      optional; written by `unipic data export` (task, seed, size, ...)

Rows by task (extra keys are allowed and ignored by the readers):

    t2i   {"image": "images/00000000.png", "text": "a photo of a red circle"}
    i2t   {"image": "images/00000000.png", "question": "Describe the image.", "answer": "..."}
    edit  {"source": "images/00000000_source.png", "instruction": "Remove the star.",
           "target": "images/00000000_target.png"}

This module needs no torch; `unipic.data.datasets.FolderDataset` wraps it for DataLoaders.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from unipic.api import UserError
from unipic.io_utils import atomic_write_json, atomic_write_jsonl, save_image_atomic
from unipic.world.examples import TASKS, make_example
from unipic.world.render import render

logger = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
INFO_FILE = "info.json"
EXPORT_FORMAT = "unipic-shapes-export"
EXPORT_VERSION = 1  # bump when the generators change what example i is
TEXT_KEYS = {"t2i": ("text",), "i2t": ("question", "answer"), "edit": ("instruction",)}
IMAGE_KEYS = {"t2i": ("image",), "i2t": ("image",), "edit": ("source", "target")}


def required_keys(task: str) -> tuple[str, ...]:
    return IMAGE_KEYS[task] + TEXT_KEYS[task]


def detect_task(row: dict) -> str | None:
    """The task a row belongs to, from its keys (None when it fits none)."""
    for task in ("edit", "i2t", "t2i"):  # most specific first: i2t rows also have "image"
        if all(k in row for k in required_keys(task)):
            return task
    return None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskFolder:
    """A validated dataset folder: its task, root and rows (paths resolved to absolute)."""

    root: Path
    task: str
    rows: list[dict]

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> dict:
        """Row `index` with its images opened as RGB PIL images (same keys as the streams)."""
        row = self.rows[index]
        out = {"task": self.task, "index": index}
        out.update({k: row[k] for k in TEXT_KEYS[self.task]})
        for key in IMAGE_KEYS[self.task]:
            try:
                with Image.open(row[key]) as img:
                    out[key] = img.convert("RGB")
            except OSError as err:
                raise UserError(f"{self.root / DATA_FILE} row {index + 1}: cannot read image {row[key]} ({err})") from None
        return out


def read_folder(root: str | Path, task: str | None = None, check_files: bool = True) -> DiskFolder:
    """Read and validate a dataset folder.

    Args:
        root: the folder holding `data.jsonl`.
        task: 't2i', 'i2t' or 'edit'; None detects it from `info.json` or the first row's keys.
        check_files: check that every image a row names exists.

    Raises:
        UserError: naming the file, the line and the fix for any problem.
    """
    root = Path(root)
    data = root / DATA_FILE
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    if not data.is_file():
        raise UserError(f"{root} has no {DATA_FILE}; a dataset folder holds {DATA_FILE} plus its images "
                        "(see `unipic data export --help`)")
    if task is not None and task not in TASKS:
        raise UserError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    info_task = _read_info(root).get("task")
    if task is None:
        task = info_task
    elif info_task is not None and info_task != task:
        raise UserError(f"{root} holds {info_task} data ({INFO_FILE}), not {task}")
    rows = []
    with open(data, encoding="utf-8") as handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{data} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if task is None:
                task = detect_task(row)
                if task is None:
                    raise UserError(f"{where}: cannot tell the task from keys {sorted(row)}; rows need "
                                    + "; ".join(f"{t}: {', '.join(required_keys(t))}" for t in TASKS))
            rows.append(_check_row(row, task, root, where, check_files))
    if not rows:
        raise UserError(f"{data} holds no rows")
    return DiskFolder(root, task, rows)


def _read_info(root: Path) -> dict:
    path = root / INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object")
    return info


def _check_row(row: dict, task: str, root: Path, where: str, check_files: bool) -> dict:
    missing = [k for k in required_keys(task) if k not in row]
    if missing:
        raise UserError(f"{where}: {task} rows need {', '.join(required_keys(task))}; missing {', '.join(missing)}")
    out = dict(row)
    for key in required_keys(task):
        if not isinstance(row[key], str) or not row[key]:
            raise UserError(f"{where}: {key!r} must be a non-empty string, got {row[key]!r}")
    for key in IMAGE_KEYS[task]:
        path = Path(row[key])
        path = path if path.is_absolute() else root / path
        if check_files and not path.is_file():
            raise UserError(f"{where}: image {row[key]!r} not found (looked for {path})")
        out[key] = path
    return out


# ---------------------------------------------------------------------------------------------
# Exporting generated Shapes data
# ---------------------------------------------------------------------------------------------


def _file_names(task: str, index: int) -> dict[str, str]:
    if task == "edit":
        return {"source": f"images/{index:08d}_source.png", "target": f"images/{index:08d}_target.png"}
    return {"image": f"images/{index:08d}.png"}


def _row_and_scenes(task: str, example, index: int) -> tuple[dict, dict]:
    """The JSONL row of an example and the scene to render for each image key."""
    names = _file_names(task, index)
    if task == "t2i":
        row = {"image": names["image"], "text": example.text}
        meta = {"kind": f"{example.kind}:{example.form}", "scene": example.scene.to_dict()}
        scenes = {"image": example.scene}
    elif task == "i2t":
        q = example.question
        row = {"image": names["image"], "question": q.question, "answer": q.answer}
        meta = {"kind": q.kind, "scene": example.scene.to_dict()}
        scenes = {"image": example.scene}
    else:
        row = {"source": names["source"], "instruction": example.instruction, "target": names["target"]}
        meta = {"kind": example.kind, "source": example.source.to_dict(), "target": example.target.to_dict()}
        scenes = {"source": example.source, "target": example.target}
    row["meta"] = meta
    return row, {key: (names[key], scene) for key, scene in scenes.items()}


def export(
    task: str,
    n: int,
    out: str | Path,
    seed: int = 0,
    size: int = 128,
    train: bool = True,
    progress: bool = True,
) -> Path:
    """Write `n` generated examples of `task` to `out` in the dataset layout; resumable.

    Example i is a pure function of (seed, i): a rerun skips images already written (every file
    is written atomically, so an existing file is complete) and rewrites `data.jsonl`
    atomically, at checkpoints and at the end, with the rows of examples 0..k that are done.
    Rerunning with a larger `n` extends the export.

    Raises:
        UserError: bad arguments, or `out` holds an export made with other settings.
    """
    from tqdm.auto import tqdm

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"--n must be a positive integer, got {n!r}")
    if not isinstance(size, int) or size < 16:
        raise UserError(f"--size must be an integer >= 16, got {size!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    settings = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "task": task, "seed": seed,
                "size": size, "train": train}
    info = _read_info(out) if out.is_dir() else {}
    if info:
        clash = {k: info.get(k) for k in settings if info.get(k) != settings[k]}
        if clash:
            raise UserError(f"{out} holds an export made with {clash}, not {({k: settings[k] for k in clash})}; "
                            "use a new --out folder or the same options to resume")
    elif out.is_dir() and (out / DATA_FILE).exists():
        raise UserError(f"{out} already holds a {DATA_FILE} that `unipic data export` did not write; "
                        "choose an empty --out folder")
    atomic_write_json(out / INFO_FILE, {**settings, "n": info.get("n", 0)})
    checkpoint = max(1000, n // 20)
    rows: list[dict] = []
    rendered = 0
    for i in tqdm(range(n), desc=f"export {task}", unit="ex", disable=not progress):
        row, images = _row_and_scenes(task, make_example(task, seed, i, train), i)
        for name, scene in images.values():
            path = out / name
            if not path.exists():
                save_image_atomic(render(scene, size), path)
                rendered += 1
        rows.append(row)
        if (i + 1) % checkpoint == 0:
            atomic_write_jsonl(out / DATA_FILE, rows)
    atomic_write_jsonl(out / DATA_FILE, rows)
    atomic_write_json(out / INFO_FILE, {**settings, "n": n})
    logger.info("exported %d %s examples to %s (%d images rendered, the rest already there)", n, task, out, rendered)
    return out
