"""Text-to-image evaluation in GenEval's format.

Generation writes GenEval's layout, so GenEval's own scorer can read it too:

    DIR/<index:05d>/metadata.jsonl      the prompt's metadata record (one line)
    DIR/<index:05d>/samples/<k:04d>.png its images

Image k of prompt i is generated with seed `seed + i` (all K images of a prompt in one call),
so a run is resumable (a prompt whose metadata and K samples exist is skipped; metadata is
written last) and shardable under `accelerate launch` (each process takes a disjoint share of
the prompts via `process_shard`).

Judging (`judge_folder`) reads such a folder with the Shapes judge and writes
`DIR/results.jsonl` (one line per image) and `DIR/summary.json` (per category, overall = mean
of the six, the held-out slice: prompts naming a held-out color–shape pair, and two clutter
checks: the score without extra objects and the objects per image).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from unipic.api import UserError
from unipic.distributed import process_shard
from unipic.eval.contact_sheet import Tile, contact_sheet
from unipic.eval.report import (
    announce_plan,
    by_group,
    check_image_size,
    format_table,
    mean_of,
    output_folder,
    score,
    wait_for_all_processes,
)
from unipic.io_utils import atomic_write_json, atomic_write_jsonl, save_image_atomic
from unipic.world.geneval import evaluate_record, is_shapes_record, load_metadata_lines, names_held_out
from unipic.world.geneval import shapes_eval_metadata as _shapes_eval_metadata
from unipic.world.judge import judge
from unipic.world.spec import MIN_EVAL_SIZE
from unipic.world.text import TAGS

logger = logging.getLogger(__name__)

_PROMPT_DIR = re.compile(r"\d{5}")
METADATA_FILE = "metadata.jsonl"


# ---------------------------------------------------------------------------------------------
# Prompt sets
# ---------------------------------------------------------------------------------------------


def load_metadata(path: str | Path | None = None) -> list[dict]:
    """GenEval metadata records from a JSONL file, or GenEval's 553 prompts when `path` is None."""
    if path is None:
        text = (resources.files("unipic") / "assets" / "benchmarks" / "geneval" / "evaluation_metadata.jsonl").read_text(
            encoding="utf-8")
        source = "packaged GenEval metadata"
    else:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"--metadata {path} is a folder; give the GenEval-style metadata JSONL file")
        if not path.is_file():
            raise UserError(f"--metadata {path}: file not found (expected GenEval-style metadata JSONL)")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as error:
            raise UserError(f"--metadata {path} is not UTF-8 text (offset {error.start}); save it as UTF-8") from None
    try:
        return load_metadata_lines(text.splitlines(), source)
    except ValueError as err:
        raise UserError(str(err)) from None


def shapes_eval_metadata(n_per_category: int, seed: int = 0) -> list[dict]:
    """The ShapesEval prompt set (see `unipic.world.geneval.shapes_eval_metadata`)."""
    if not isinstance(n_per_category, int) or n_per_category < 1:
        raise UserError(f"--n-per-category must be a positive integer, got {n_per_category!r}")
    return _shapes_eval_metadata(n_per_category, seed)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _sample_path(folder: Path, k: int) -> Path:
    return folder / "samples" / f"{k:04d}.png"


def _finished(folder: Path, record: dict, images_per_prompt: int) -> bool:
    meta = folder / METADATA_FILE
    if not meta.is_file():
        return False
    try:
        existing = json.loads(meta.read_text(encoding="utf-8").splitlines()[0])
    except (json.JSONDecodeError, IndexError):
        return False
    if existing != record:
        raise UserError(f"{folder} already holds the prompt {existing.get('prompt')!r}, not {record['prompt']!r}; "
                        "use a fresh --out folder for a different prompt set")
    return all(_sample_path(folder, k).is_file() for k in range(images_per_prompt))


def generate_geneval(pipeline, metadata: Sequence[dict], out_dir: str | Path, images_per_prompt: int = 4,
                     size: int | None = None, seed: int = 0, model_name: str | None = None,
                     progress: bool = True) -> dict:
    """Generate images for GenEval metadata into GenEval's folder layout (resumable, sharded).

    Args:
        pipeline: any `UnifiedPipeline`.
        metadata: GenEval records (`tag`, `include`, `prompt`, ...).
        out_dir: output folder.
        images_per_prompt: K images per prompt (GenEval uses 4).
        size: square image side (None: the model's default).
        seed: base seed; prompt i uses `seed + i`.
        model_name: recorded in the PNG text chunks.

    Returns:
        {"generated": prompts generated by this process, "skipped": already finished}.
    """
    from tqdm.auto import tqdm

    if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be a positive integer, got {images_per_prompt!r}")
    check_image_size(size)
    out = output_folder(out_dir)
    mine = process_shard(list(range(len(metadata))))
    # Decide what is left first, so the count up front and the time left cover only real work.
    todo = [i for i in mine if not _finished(out / f"{i:05d}", metadata[i], images_per_prompt)]
    skipped = len(mine) - len(todo)
    announce_plan(f"geneval ({len(todo)} prompts x {images_per_prompt})", len(todo) * images_per_prompt,
                  done=skipped, progress=progress)
    settings = None
    with tqdm(total=len(todo) * images_per_prompt, desc="geneval", unit="image", disable=not progress) as bar:
        for index in todo:
            record = metadata[index]
            folder = out / f"{index:05d}"
            if settings is None:  # the same for every prompt: record what sampling actually uses
                settings = _settings_used(pipeline, record["prompt"], size, images_per_prompt, seed + index)
            images = pipeline.text_to_image([record["prompt"]], height=size, width=size,
                                            images_per_prompt=images_per_prompt, seed=seed + index)[0]
            if len(images) != images_per_prompt:
                raise RuntimeError(f"the pipeline returned {len(images)} images for one prompt, "
                                   f"expected {images_per_prompt}")
            for k, image in enumerate(images):
                chunks = {"prompt": record["prompt"], "seed": seed + index, "image_index": k,
                          "model": model_name or "", "settings": settings}
                save_image_atomic(image, _sample_path(folder, k), chunks)
            atomic_write_jsonl(folder / METADATA_FILE, [record])  # last: marks the prompt finished
            bar.update(images_per_prompt)
    return {"generated": len(todo), "skipped": skipped}


def _settings_used(pipeline, prompt: str, size: int | None, images_per_prompt: int, seed: int) -> str:
    """The pipeline's resolved settings as JSON (its defaults for pipelines without `check_inputs`)."""
    check = getattr(pipeline, "check_inputs", None)
    if check is None:
        return json.dumps(pipeline.sampling_defaults(), sort_keys=True, default=str)
    request = check("text_to_image", [prompt], height=size, width=size, images_per_prompt=images_per_prompt,
                    seed=seed)
    return json.dumps(request.settings, sort_keys=True, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------------


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path} is not a readable image ({type(err).__name__})") from None


def judge_folder(out_dir: str | Path, progress: bool = True) -> dict:
    """Judge a GenEval-layout folder with the Shapes judge; write results.jsonl and summary.json.

    Returns:
        The summary (also written to `DIR/summary.json`).

    Raises:
        UserError: the folder holds no GenEval prompt folders, or none with Shapes-world classes.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"{out} is not a folder")
    folders = sorted(d for d in out.iterdir() if d.is_dir() and _PROMPT_DIR.fullmatch(d.name))
    if not folders:
        raise UserError(f"{out} holds no GenEval prompt folders (00000/metadata.jsonl + samples/0000.png ...); "
                        "generate them with `unipic eval geneval`")
    rows: list[dict] = []
    foreign: list[str] = []
    incomplete = 0
    small_sizes: set[int] = set()
    for folder in tqdm(folders, desc="judging", unit="prompt", disable=not progress):
        meta = folder / METADATA_FILE
        samples = sorted((folder / "samples").glob("*.png")) if (folder / "samples").is_dir() else []
        if not meta.is_file() or not samples:
            incomplete += 1
            continue
        try:
            record = load_metadata_lines(meta.read_text(encoding="utf-8").splitlines()[:1], str(meta))[0]
        except ValueError as err:
            raise UserError(str(err)) from None
        if not is_shapes_record(record):
            foreign.append(record["prompt"])
            continue
        held_out = names_held_out(record)
        for sample in samples:
            image = _open(sample)
            if image.width != image.height:
                raise UserError(f"{sample} is {image.width}x{image.height}; the Shapes judge needs square images")
            if image.width < MIN_EVAL_SIZE:
                small_sizes.add(image.width)
            found = judge(image)
            correct, reason = evaluate_record(record, found)
            rows.append({"filename": sample.relative_to(out).as_posix(), "tag": record["tag"], "prompt": record["prompt"],
                         "correct": correct, "reason": reason, "held_out": held_out,
                         "objects": [d.to_dict() for d in found],
                         "correct_no_extra": correct and len(found) == expected_objects(record)})
    if foreign:
        logger.warning("skipped %d prompts whose classes are not Shapes-world shapes (e.g. %r); score those with "
                       "GenEval's official evaluator", len(foreign), foreign[0])
    if incomplete:
        logger.warning("skipped %d unfinished prompt folders (no metadata.jsonl or no samples)", incomplete)
    if small_sizes:
        logger.warning("images of side %s < %d: the judge is only exact at S >= %d", sorted(small_sizes),
                       MIN_EVAL_SIZE, MIN_EVAL_SIZE)
    if not rows:
        raise UserError(f"nothing in {out} can be judged with the Shapes judge: "
                        + (f"its prompts name non-shape classes (e.g. {foreign[0]!r}); score real GenEval "
                           "prompts with GenEval's official evaluator" if foreign else "no finished prompts"))
    summary = summarize(rows)
    summary["skipped_prompts"] = {"not_shapes": len(foreign), "unfinished": incomplete}
    atomic_write_jsonl(out / "results.jsonl", rows)
    atomic_write_json(out / "summary.json", summary)
    return summary


def expected_objects(record: dict) -> int:
    """How many objects a prompt's record names (the sum of its `include` counts)."""
    return sum(int(entry.get("count", 1)) for entry in record["include"])


def summarize(rows: Sequence[dict]) -> dict:
    """Per-category scores (fraction of images judged correct), overall = mean of the six
    categories (None unless all six are present), and the held-out / seen slices.

    With K images per prompt a category's image fraction equals the mean over its prompts of
    the fraction of that prompt's images judged correct (GenEval's convention).

    GenEval's rules accept objects the prompt did not ask for, so a canvas cluttered with random
    shapes passes "a photo of a circle" whenever one of them reads as a circle. `no_extra_objects`
    (correct *and* exactly as many objects as the prompt names) and `objects_per_image` are
    reported beside the score so that clutter cannot pass for drawing; the score itself follows
    GenEval."""
    categories = by_group(rows, lambda r: r["tag"], TAGS)
    no_extra = by_group(rows, lambda r: r["tag"], TAGS, key="correct_no_extra")
    prompts_per_tag: dict[str, set] = {}
    for r in rows:
        prompts_per_tag.setdefault(r["tag"], set()).add(r["filename"].split("/")[0])
    for tag, entry in categories.items():
        entry["n_images"] = entry.pop("n")
        entry["n_prompts"] = len(prompts_per_tag[tag])
    held = [r for r in rows if r["held_out"]]
    seen = [r for r in rows if not r["held_out"]]
    return {
        "benchmark": "GenEval format, Shapes judge",
        "overall": mean_of(categories, TAGS),
        "categories": categories,
        "missing_categories": [t for t in TAGS if t not in categories],
        "held_out": {**score(held), "n_prompts": len({r["filename"].split("/")[0] for r in held})},
        "seen": {**score(seen), "n_prompts": len({r["filename"].split("/")[0] for r in seen})},
        "held_out_by_category": by_group(held, lambda r: r["tag"], TAGS),
        "no_extra_objects": {"overall": mean_of(no_extra, TAGS), "categories": no_extra},
        "objects_per_image": sum(len(r["objects"]) for r in rows) / len(rows) if rows else None,
        "n_images": len(rows),
    }


def summary_table(summary: dict) -> str:
    """The printed table of a `summarize` result."""
    entries = [(tag, e["score"], e["n_images"]) for tag, e in summary["categories"].items()]
    entries += [("overall (mean of 6)", summary["overall"], None),
                ("held-out pairs", summary["held_out"]["score"], summary["held_out"]["n"]),
                ("seen pairs", summary["seen"]["score"], summary["seen"]["n"]),
                ("overall, no extra objects", summary["no_extra_objects"]["overall"], None),
                ("objects per image", summary["objects_per_image"], summary["n_images"])]
    return format_table("text to image (Shapes judge, fraction of images correct)", entries)


# ---------------------------------------------------------------------------------------------
# `unipic eval t2i`: ShapesEval end to end
# ---------------------------------------------------------------------------------------------


def t2i_contact_sheet(out_dir: str | Path, max_tiles: int = 240) -> Image.Image:
    """Sheet of each prompt's first image with its prompt and verdict (at most `max_tiles`)."""
    out = Path(out_dir)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines() if line]
    first = [r for r in rows if r["filename"].endswith("/0000.png")] or rows
    if len(first) > max_tiles:  # keep every category represented: take evenly spaced tiles
        step = len(first) / max_tiles
        first = [first[int(i * step)] for i in range(max_tiles)]
    tiles = [Tile([_open(out / r["filename"])], [r["prompt"], r["reason"] or r["tag"]], r["correct"]) for r in first]
    return contact_sheet(tiles)


def run_t2i_eval(pipeline, out_dir: str | Path, n_per_category: int = 20, images_per_prompt: int = 4,
                 size: int = 128, seed: int = 0, model_name: str | None = None, progress: bool = True) -> dict | None:
    """ShapesEval: build the prompt set, generate (GenEval layout), judge, draw a contact sheet.

    Writes `DIR/evaluation_metadata.jsonl`, the prompt folders, `results.jsonl`, `summary.json`
    and `contact_sheet.png`. Under `accelerate launch` every process generates its share and the
    main process judges; the others return None.
    """
    metadata = shapes_eval_metadata(n_per_category, seed)
    out = Path(out_dir)
    generate_geneval(pipeline, metadata, out, images_per_prompt, size, seed, model_name, progress)
    if not wait_for_all_processes():
        return None
    atomic_write_jsonl(out / "evaluation_metadata.jsonl", metadata)
    summary = judge_folder(out, progress)
    save_image_atomic(t2i_contact_sheet(out), out / "contact_sheet.png")
    return summary
