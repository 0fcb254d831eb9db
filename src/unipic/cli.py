"""The `unipic` command line: generate, edit, inpaint, outpaint, caption, state-dict, convert, eval, data, train,
serve.

Each handler only parses arguments, builds settings and calls library functions. A user mistake
(missing file, bad size, unknown model, ...) raises `UserError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from unipic.api import CheckedInputs, UserError
from unipic.checks import (
    INPUT_RESIZE_MODES,
    MAX_CFG,
    MAX_TEMPERATURE,
    PIXEL_MULTIPLE,
    check_choice,
    check_int,
    check_number,
    check_seed,
    check_size,
    check_writable,
)
from unipic.cli_common import add_model_options

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger("unipic")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors in one line (and exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------
# Shared option groups
# ---------------------------------------------------------------------------------------------


def add_sampling_options(parser: argparse.ArgumentParser, *, edit: bool = False, sizes: bool = True) -> None:
    """Options shared by generate, edit, inpaint and outpaint (defaults come from the model's config when
    omitted); `sizes=False` leaves out the output size and batch options (the output takes the input's size)."""
    group = parser.add_argument_group("sampling (defaults: the model's own settings)")
    seed_default = ("a random seed, recorded in the output" if edit or not sizes else
                    "random for a single prompt, recorded in the PNG; 0 with --prompt-file, so a rerun resumes; "
                    "prompt i of a file uses seed + i")
    group.add_argument("--seed", type=int, default=None,
                       help=f"random seed, 0 to 2**64-1; the same seed on the same device reproduces the output "
                            f"(default: {seed_default})")
    if not sizes:
        parser.set_defaults(size=None, height=None, width=None, batch_size=None, fast=None, head_anneal=None,
                            guidance_interval=None, uncond_interval=None, head_solver=None)
    if sizes:
        group.add_argument("--size", type=int, default=None,
                           help="square output side in pixels, a multiple of 16 (default: the model's, e.g. 128 "
                                "for the embedded model, 1024 for UniPic-1.5B); sizes the model's positions or this "
                                "machine's memory cannot hold are refused with the largest that fits")
        group.add_argument("--height", type=int, default=None, help="output height in pixels (overrides --size)")
        group.add_argument("--width", type=int, default=None, help="output width in pixels (overrides --size)")
    group.add_argument("--steps", type=int, default=None,
                       help="sampling steps: MAR reveal steps for UniPic-1, denoising steps for UniPic-2")
    group.add_argument("--cfg", type=float, default=None,
                       help=f"classifier-free guidance scale, 0 to {MAX_CFG:g} (UniPic-1 guides at every scale "
                            "but 1, so 0 = unconditional; UniPic-2 only above 1; see docs/sampling.md)"
                            + (" against 'Repeat this image.'" if edit else " against the null prompt"
                               if sizes else " against the null prompt (UniPic-2: the negative prompt)"))
    group.add_argument("--cfg-schedule", choices=("constant", "linear"), default=None,
                       help="UniPic-1: guidance constant over steps, or growing linearly as tokens are revealed")
    group.add_argument("--temperature", type=float, default=None,
                       help=f"UniPic-1: scale of the diffusion head's per-step noise, 0 to {MAX_TEMPERATURE:g} "
                            "(lower = more conservative)")
    group.add_argument("--head-steps", type=int, default=None,
                       help="UniPic-1: denoising steps of the per-token diffusion head (released model: 100)")
    if sizes:  # generate and edit; inpainting runs the exact sampler
        speed = group.add_mutually_exclusive_group()
        speed.add_argument("--fast", dest="fast", action="store_const", const=True, default=None,
                           help="UniPic-1: training-free shortcuts: half the MAR steps (unless --steps is given), the "
                                "head sampled by DPM-Solver++ in 8 steps (--head-solver dpm++2m; unless --head-steps "
                                "is given) and unconditional rows through MAR + LLM every 2nd step (--uncond-interval "
                                "2; every step when only one MAR step is left); each option given explicitly wins "
                                "over --fast; see docs/sampling.md for the measured speed and quality")
        speed.add_argument("--exact", dest="fast", action="store_const", const=False,
                           help="UniPic-1: the exact sampler (the default), reproducible bit for bit on one machine")
        group.add_argument("--head-solver", choices=("ddpm", "dpm++2m"), default=None,
                           help="UniPic-1: the diffusion head's sampler: 'ddpm' (ancestral, the trained process; the "
                                "default) or 'dpm++2m' (DPM-Solver++(2M), deterministic, for few steps; with --fast)")
        group.add_argument("--head-anneal", type=float, default=None,
                           help="UniPic-1: head steps at the last MAR step as a fraction of --head-steps, falling "
                                "linearly from 1 (default 1, with --fast --head-solver ddpm 0.2; 1 = off)")
        group.add_argument("--guidance-interval", type=int, default=None,
                           help="UniPic-1: run the unconditional head rows every K-th head step and reuse the "
                                "guidance residual between (default 1 = off, also with --fast)")
        group.add_argument("--uncond-interval", type=int, default=None,
                           help="UniPic-1: run the unconditional rows through MAR and the LLM every K-th MAR step and "
                                "reuse their last difference to the conditional ones between (default 1 = off, with "
                                "--fast 2 or the MAR step count when smaller; an explicit value wins over --fast)")
        group.add_argument("--batch-size", type=int, default=None, help="images generated per forward pass (default 8)")
    group.add_argument("--cpu-offload", action="store_true",
                       help="UniPic-2: keep sub-models on the CPU and move each to the GPU only while it runs")
    group.add_argument("--vae-tiling", action="store_true", help="UniPic-2: decode large images tile by tile")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_mask_options(parser: argparse.ArgumentParser) -> None:
    """--grow and --feather, shared by inpaint and outpaint."""
    from unipic.inpainting import DEFAULT_FEATHER, DEFAULT_GROW

    group = parser.add_argument_group("mask")
    group.add_argument("--grow", type=int, default=DEFAULT_GROW,
                       help=f"dilate the mask by this many pixels first (default {DEFAULT_GROW})")
    group.add_argument("--feather", type=int, default=DEFAULT_FEATHER,
                       help="the generated pixels fade into the source over this many pixels inside the mask; "
                            f"outside it every pixel is the source's (default {DEFAULT_FEATHER}, 0 = hard edge)")


def _size_from_args(args: argparse.Namespace) -> tuple[int | None, int | None]:
    height = args.height if args.height is not None else args.size
    width = args.width if args.width is not None else args.size
    return height, width


def _sampling_options(args: argparse.Namespace) -> dict:
    options = {}
    for key in ("steps", "cfg", "cfg_schedule", "temperature", "head_steps", "batch_size", "input_resize", "fast",
                "head_anneal", "guidance_interval", "uncond_interval", "head_solver"):
        value = getattr(args, key, None)
        # --exact is the default sampler: passing nothing keeps it valid for every model family.
        if value is not None and not (key == "fast" and value is False):
            options[key] = value
    return options


def _check_sampling_args(args: argparse.Namespace, *, seeds: int = 1) -> None:
    """The option checks that need no model, run before loading one (names as typed on the command line).

    `seeds` = 0: the caller checks --seed itself (inpaint, in its model-free request check).
    """
    for flag, key in (("--size", "size"), ("--height", "height"), ("--width", "width")):
        value = getattr(args, key)
        if value is None:
            continue
        # Early, before loading: the oracle renders any size, every model family needs a multiple of
        # 16 (the loaded pipeline's check_inputs then applies its own stride).
        if args.model == "shapes-oracle":
            check_int(value, flag, minimum=16)
        else:
            check_size(value, flag, PIXEL_MULTIPLE)
    if seeds:
        check_seed(args.seed, "--seed", count=seeds)
    for flag, key in (("--steps", "steps"), ("--head-steps", "head_steps"), ("--batch-size", "batch_size"),
                      ("--guidance-interval", "guidance_interval"), ("--uncond-interval", "uncond_interval")):
        if getattr(args, key) is not None:
            check_int(getattr(args, key), flag, minimum=1)
    if args.cfg is not None:
        check_number(args.cfg, "--cfg", minimum=0.0, maximum=MAX_CFG, hint=" (1 = no guidance)")
    if args.temperature is not None:
        check_number(args.temperature, "--temperature", minimum=0.0, maximum=MAX_TEMPERATURE)
    if args.head_anneal is not None:
        check_number(args.head_anneal, "--head-anneal", minimum=0.0, maximum=1.0, above_minimum=True,
                     hint=" (1 = off)")
    if getattr(args, "input_resize", None) is not None:  # edit only
        check_choice(args.input_resize, "--input-resize", INPUT_RESIZE_MODES)


def _load(args: argparse.Namespace):
    """The one loader (`unipic.loading.load_pipeline`) on the parsed model options, set up for the CLI."""
    from unipic.cli_common import loader_kwargs
    from unipic.loading import cpu_threads_for, load_pipeline

    pipeline = load_pipeline(args.model, **loader_kwargs(args))
    cpu_threads_for(pipeline)  # one thread for a small model on CPU (issue 40)
    args.loaded_pipeline = pipeline  # outputs record its device and dtype (`_metadata`)
    return pipeline


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file (first frame, decoded), with a one-line UserError for anything unreadable."""
    from unipic.images import open_image as _open

    return _open(path)


def _check_output_file(path: str, *, overwrite: bool, flag: str = "-o") -> Path:
    """An image file name we may write: known suffix, not a folder, a writable place, no silent overwrite."""
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"{flag} {path}: give an image file name ending in .png (or .jpg/.webp)")
    if out.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another name")
    check_writable(out.parent, flag, path)
    return out


def _metadata(args: argparse.Namespace, request: CheckedInputs, seed: int | None, **extra: object) -> dict[str, str]:
    """What an output was made from, once each: model, seed, the settings sampling used (with the
    device and dtype, which change pixels), the text."""
    from unipic.api import runtime_settings
    from unipic.io_utils import output_record

    settings = {**request.settings, **runtime_settings(getattr(args, "loaded_pipeline", None))}
    return output_record(str(args.model or "default"), seed, settings, **extra)


# ---------------------------------------------------------------------------------------------
# generate / edit / caption
# ---------------------------------------------------------------------------------------------


def _read_rows(path: str, *, flag: str = "--prompt-file", shape: str = '{"prompt": ...}') -> list:
    """The entries of a JSON list or a JSONL file (a UTF-8 byte-order mark is allowed)."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{flag} {file} is a folder; give a JSON or JSONL file")
    if not file.is_file():
        raise UserError(f"{flag} {file}: file not found")
    try:
        # utf-8-sig: editors on Windows start UTF-8 files with a byte-order mark.
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{flag} {file} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                        f"{error.start}); save it as UTF-8") from None
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else None
    except json.JSONDecodeError:
        rows = None
    if rows is None:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{file}:{number}: not JSON; use a JSON list or JSONL of {shape}") from None
    if not rows:
        raise UserError(f"{file}: no entries found; use a JSON list or JSONL of {shape}")
    return rows


def _read_prompt_file(path: str) -> list[str]:
    """Prompts from upstream's JSON list of {"prompt": ...} (or of strings), or a JSONL file of such objects."""
    prompts = []
    for number, row in enumerate(_read_rows(path), start=1):
        prompt = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(prompt, str):
            found = "nothing" if prompt is None else f"{type(prompt).__name__} {json.dumps(prompt)[:40]}"
            raise UserError(f"{path}: entry {number}'s prompt is {found}, not a string; "
                            'give each prompt as a string or as {"prompt": "..."}')
        if not prompt.strip():
            raise UserError(f"{path}: entry {number}'s prompt is empty")
        prompts.append(prompt)
    return prompts


def _output_paths(out: Path, count: int) -> list[Path]:
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(count)]


def cmd_generate(args: argparse.Namespace) -> int:
    """`unipic generate`: one prompt to -o FILE, or a prompt file to -o FOLDER (sharded under accelerate)."""
    from unipic.io_utils import save_image_atomic

    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("give either a PROMPT or --prompt-file FILE")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("the prompt is empty; describe the image to generate")
    check_int(args.images_per_prompt, "--images-per-prompt", minimum=1)
    if args.prompt_file is not None:
        return _generate_batch(args)
    _check_sampling_args(args)
    out = _check_output_file(args.output, overwrite=args.overwrite or args.images_per_prompt > 1)
    paths = _output_paths(out, args.images_per_prompt)
    if len(paths) > 1:  # -o x.png with -n 2 writes x-0.png and x-1.png, not x.png
        for path in paths:
            _check_output_file(str(path), overwrite=args.overwrite)
    pipeline = _load(args)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    height, width = _size_from_args(args)
    request = pipeline.check_inputs("text_to_image", [args.prompt], height=height, width=width,
                                    images_per_prompt=args.images_per_prompt, seed=seed, **_sampling_options(args))
    images = pipeline.run(request, progress=not args.quiet)[0]
    for k, (image, path) in enumerate(zip(images, paths)):
        save_image_atomic(image, path, _metadata(args, request, seed, prompt=args.prompt, index=k))
        print(path)
    return 0


_BATCH_NAME = re.compile(r"\d{5}(?:_\d+)?\.png")


def _generate_batch(args: argparse.Namespace) -> int:
    """Batch mode: every prompt of a file into -o FOLDER; resumes only outputs made by the same request."""
    from tqdm.auto import tqdm

    from unipic.distributed import process_rank_and_world, process_shard
    from unipic.io_utils import save_image_atomic

    prompts = _read_prompt_file(args.prompt_file)
    out_dir = _batch_folder(args)
    # A fixed default seed keeps a rerun of the same command a resume (seeds are recorded per image).
    base_seed = args.seed if args.seed is not None else 0
    _check_sampling_args(args, seeds=len(prompts))
    rank, world = process_rank_and_world()
    k_max = args.images_per_prompt

    def paths_for(index: int) -> list[Path]:
        if k_max == 1:
            return [out_dir / f"{index:05d}.png"]
        return [out_dir / f"{index:05d}_{k}.png" for k in range(k_max)]

    pipeline = _load(args)
    height, width = _size_from_args(args)
    # Prompt i uses seed base + i, so results do not depend on sharding or resuming.
    request = pipeline.check_inputs("text_to_image", prompts, height=height, width=width, images_per_prompt=k_max,
                                    seed=[base_seed + i for i in range(len(prompts))], **_sampling_options(args))
    seeds = request.seed

    def record(index: int, k: int) -> dict:
        return _metadata(args, request, seeds[index], prompt=prompts[index], index=k, prompt_index=index)

    # What is on disk now, compared with what this request would write there.
    wanted = {path: (index, k) for index in range(len(prompts)) for k, path in enumerate(paths_for(index))}
    stale = _stale_outputs(out_dir, wanted, lambda key: record(*key))
    _refuse_or_clear_stale(stale, wanted, out_dir, args, rank)
    mine = process_shard(list(range(len(prompts))), rank, world)
    todo = [i for i in mine if not all(p.is_file() and p not in stale for p in paths_for(i))]
    skipped = len(mine) - len(todo)
    if skipped:
        print(f"process {rank + 1}/{world}: skipped {skipped} prompt(s) already made by this request in {out_dir}")
    if stale:
        print(f"process {rank + 1}/{world}: replacing {len(stale)} image(s) made by a different request (--overwrite)")
    for index in tqdm(todo, desc=f"prompts (process {rank + 1}/{world})", disable=args.quiet):
        images = pipeline.run(request.select([index]))[0]  # checked above, with every prompt
        for k, (image, path) in enumerate(zip(images, paths_for(index))):
            save_image_atomic(image, path, record(index, k))
    print(f"process {rank + 1}/{world}: wrote {len(todo)} prompt(s) to {out_dir}")
    return 0


def _difference(found: dict[str, str], expected: dict[str, str]) -> str:
    """'' when an output's record equals this request's, else what differs, e.g. "cfg 3.0 -> 5.0"."""
    if not found:
        return "no unipic record in the file"

    def short(value: object) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "...'"

    parts = []
    for key in sorted(expected):
        if found.get(key) == expected[key]:
            continue
        if key == "settings":
            try:
                old = json.loads(found.get(key) or "{}")
            except json.JSONDecodeError:
                old = {}
            new = json.loads(expected[key])
            parts += [f"{name} {short(old.get(name))} -> {short(new.get(name))}"
                      for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        else:
            parts.append(f"{key} {short(found.get(key))} -> {short(expected[key])}")
    return ", ".join(parts)


MAX_EDIT_IMAGES = 6  # UniPic-3 takes 1 to 6 input images; the other families one


def _split_edit_inputs(args: argparse.Namespace) -> tuple[list[str], str]:
    """`IMAGE [IMAGE ...] INSTRUCTION` -> (image paths, instruction), checked before any model loads."""
    if len(args.inputs) < 2:
        raise UserError("give at least one IMAGE and then the INSTRUCTION, e.g. unipic edit photo.png "
                        "\"Make the sky blue.\" (or --prompt-file JOBS for a batch)")
    *paths, instruction = args.inputs
    if not instruction.strip():
        raise UserError("the instruction is empty; say how to edit the image")
    if len(paths) > MAX_EDIT_IMAGES:
        raise UserError(f"{len(paths)} images given; UniPic-3 takes 1 to {MAX_EDIT_IMAGES} per instruction "
                        "(UniPic-1 and UniPic-2 take one)")
    return paths, instruction


def _check_image_count(pipeline, count: int, args: argparse.Namespace) -> None:
    """More than one input image needs a family that composes several (UniPic-3)."""
    most = int(pipeline.sampling_defaults().get("max_input_images", 1))
    if count > most:
        module = type(pipeline).__module__
        family = next((name for key, name in (("unipic1", "UniPic-1"), ("unipic2", "UniPic-2"), ("oracle", "Shapes oracle"))
                       if key in module), type(pipeline).__name__)
        raise UserError(f"--model {args.model or 'default'} ({family}) edits one image per instruction; {count} were "
                        "given (a UniPic-3 model takes 1 to 6)")


def _edit_options(args: argparse.Namespace) -> dict:
    options = _sampling_options(args)
    if getattr(args, "negative_prompt", None) is not None:
        options["negative_prompt"] = args.negative_prompt
    return options


def _edit_request(pipeline, sources: list, instruction: str, seed: int, args: argparse.Namespace) -> CheckedInputs:
    """The checked request of one instruction applied to its sources (one image, or a list for UniPic-3).

    Without a size the pipeline decides it (UniPic-1: the source's aspect ratio), as for the server.
    """
    height, width = _size_from_args(args)
    entry = sources[0] if len(sources) == 1 else sources
    return pipeline.check_inputs("edit_image", [instruction], [entry], height=height, width=width, seed=seed,
                                 **_edit_options(args))


def _edit_one(pipeline, sources: list, instruction: str, seed: int, args: argparse.Namespace, *,
              progress: bool, request: CheckedInputs | None = None) -> tuple[Image.Image, CheckedInputs]:
    """One instruction applied to its sources: the image and its request (checked here unless given)."""
    if request is None:
        request = _edit_request(pipeline, sources, instruction, seed, args)
    [image] = pipeline.run(request, progress=progress)
    return image, request


def _source_record(paths: Sequence[str]) -> dict[str, str]:
    """The input file names an edit records: `source` for one, `sources` (a JSON list) for several."""
    if len(paths) == 1:
        return {"source": str(paths[0])}
    return {"sources": json.dumps([str(p) for p in paths])}


def cmd_edit(args: argparse.Namespace) -> int:
    """`unipic edit IMAGE [IMAGE ...] INSTRUCTION -o OUT`, or a batch with --prompt-file."""
    from unipic.io_utils import save_image_atomic

    if args.prompt_file is not None:
        if args.inputs:
            raise UserError("give either IMAGE ... INSTRUCTION or --prompt-file, not both")
        return _edit_batch(args)
    paths, instruction = _split_edit_inputs(args)
    _check_sampling_args(args)
    out = _check_output_file(args.output, overwrite=args.overwrite)
    sources = [open_image(path) for path in paths]
    pipeline = _load(args)
    _check_image_count(pipeline, len(sources), args)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    image, request = _edit_one(pipeline, sources, instruction, seed, args, progress=not args.quiet)
    save_image_atomic(image, out, _metadata(args, request, seed, instruction=instruction, **_source_record(paths)))
    print(out)
    return 0


def _read_edit_jobs(path: str) -> list[tuple[list[Path], str]]:
    """Edit jobs from a JSON list / JSONL file of {"images": [...], "instruction": ...}; paths resolved, checked."""
    shape = '{"images": [...], "instruction": ...}'
    folder = Path(path).parent
    jobs = []
    for number, row in enumerate(_read_rows(path, shape=shape), start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: entry {number} is {type(row).__name__}, not an object; give {shape}")
        images = row.get("images", [row["image"]] if "image" in row else None)
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
            raise UserError(f"{path}: entry {number} needs \"images\": a list of 1 to {MAX_EDIT_IMAGES} file paths")
        if len(images) > MAX_EDIT_IMAGES:
            raise UserError(f"{path}: entry {number} has {len(images)} images; at most {MAX_EDIT_IMAGES}")
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError(f"{path}: entry {number} needs a non-empty \"instruction\" string")
        resolved = [Path(i).expanduser() if Path(i).expanduser().is_absolute() else folder / i for i in images]
        for image in resolved:
            if not image.is_file():
                raise UserError(f"{path}: entry {number}: image not found: {image}")
        jobs.append((resolved, instruction))
    return jobs


def _batch_folder(args: argparse.Namespace) -> Path:
    """-o as a batch's output folder (checked before the model loads)."""
    out_dir = Path(args.output)
    if out_dir.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"-o {args.output}: with --prompt-file, -o is an output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {args.output} is a file; with --prompt-file, -o names a folder")
    check_writable(out_dir, "-o", args.output)
    return out_dir


def _stale_outputs(out_dir: Path, wanted: dict[Path, object], expected) -> dict[Path, str]:
    """Our NNNNN.png files in `out_dir` that this request would not write as they are: path -> why.

    `wanted` maps each output path of the request to its key; `expected(key)` is its metadata record.
    """
    from unipic.io_utils import read_image_metadata

    on_disk = sorted(p for p in out_dir.glob("*.png") if _BATCH_NAME.fullmatch(p.name)) if out_dir.is_dir() else []
    stale: dict[Path, str] = {}
    for path in on_disk:
        if path not in wanted:
            stale[path] = "not part of this request"
            continue
        difference = _difference(read_image_metadata(path), expected(wanted[path]))
        if difference:
            stale[path] = difference
    return stale


def _refuse_or_clear_stale(stale: dict[Path, str], wanted: dict[Path, object], out_dir: Path,
                           args: argparse.Namespace, rank: int) -> None:
    """Without --overwrite another request's outputs are an error; with it, ours not wanted are removed."""
    if stale and not args.overwrite:
        first = next(iter(stale))
        raise UserError(f"-o {out_dir} holds {len(stale)} image(s) made by a different request (e.g. {first.name}: "
                        f"{stale[first]}); pass --overwrite to replace them, or use a new folder")
    if stale and rank == 0:
        for path in stale:
            if path not in wanted:
                path.unlink(missing_ok=True)  # only our own NNNNN.png names, and only with --overwrite


def _edit_batch(args: argparse.Namespace) -> int:
    """Batch mode: every job of a file into -o FOLDER; resumes only outputs made by the same request."""
    from tqdm.auto import tqdm

    from unipic.distributed import process_rank_and_world, process_shard
    from unipic.io_utils import save_image_atomic

    jobs = _read_edit_jobs(args.prompt_file)
    out_dir = _batch_folder(args)
    base_seed = args.seed if args.seed is not None else 0  # fixed, so a rerun of the command resumes
    _check_sampling_args(args, seeds=len(jobs))
    rank, world = process_rank_and_world()
    pipeline = _load(args)
    _check_image_count(pipeline, max(len(paths) for paths, _ in jobs), args)
    paths = {index: out_dir / f"{index:05d}.png" for index in range(len(jobs))}
    sources: dict[int, list] = {}

    def job(index: int) -> tuple[list, str, int]:
        if index not in sources:
            sources[index] = [open_image(p) for p in jobs[index][0]]
        return sources[index], jobs[index][1], base_seed + index

    def record(index: int, request: CheckedInputs) -> dict:
        return _metadata(args, request, base_seed + index, instruction=jobs[index][1], prompt_index=index,
                         **_source_record([str(p) for p in jobs[index][0]]))

    checked: dict[int, CheckedInputs] = {}  # each job's request, checked once

    def request_for(index: int) -> CheckedInputs:
        if index not in checked:
            checked[index] = _edit_request(pipeline, *job(index), args)
        return checked[index]

    def expected(index: int) -> dict:
        return record(index, request_for(index))

    wanted = {path: index for index, path in paths.items()}
    stale = _stale_outputs(out_dir, wanted, expected)
    _refuse_or_clear_stale(stale, wanted, out_dir, args, rank)
    mine = process_shard(list(range(len(jobs))), rank, world)
    todo = [i for i in mine if not (paths[i].is_file() and paths[i] not in stale)]
    if len(mine) > len(todo):
        print(f"process {rank + 1}/{world}: skipped {len(mine) - len(todo)} job(s) already made by this request "
              f"in {out_dir}")
    for index in tqdm(todo, desc=f"edits (process {rank + 1}/{world})", disable=args.quiet):
        images, instruction, seed = job(index)
        image, request = _edit_one(pipeline, images, instruction, seed, args, progress=False,
                                   request=request_for(index))
        save_image_atomic(image, paths[index], record(index, request))
        sources.pop(index, None)
        checked.pop(index, None)
    print(f"process {rank + 1}/{world}: wrote {len(todo)} job(s) to {out_dir}")
    return 0


def _inpainting_pipeline(args: argparse.Namespace):
    """The loaded pipeline, refused with a one-line error when its family cannot inpaint."""
    from unipic.api import InpaintingPipeline, UnsupportedTaskError

    pipeline = _load(args)
    if not isinstance(pipeline, InpaintingPipeline):
        raise UnsupportedTaskError(f"--model {args.model or 'default'} ({type(pipeline).__name__}) cannot inpaint")
    return pipeline


def cmd_inpaint(args: argparse.Namespace) -> int:
    """`unipic inpaint IMAGE MASK PROMPT -o OUT` or `unipic inpaint IMAGE PROMPT --box x0,y0,x1,y1 -o OUT`."""
    from unipic.images import upright_size
    from unipic.inpainting import box_mask, check_inpaint_request, parse_box
    from unipic.io_utils import save_image_atomic

    if args.box is not None:
        if len(args.inputs) != 1:
            raise UserError(f"with --box give IMAGE PROMPT only (got {len(args.inputs) + 1} positional arguments); "
                            "the box replaces the MASK file")
        mask_path, prompt = None, args.inputs[0]
    else:
        if len(args.inputs) != 2:
            raise UserError("give IMAGE MASK PROMPT (MASK: a PNG, white = regenerate), or IMAGE PROMPT --box x0,y0,x1,y1")
        mask_path, prompt = args.inputs
    if not prompt.strip():
        raise UserError("the prompt is empty; describe the picture the masked region belongs to")
    _check_sampling_args(args, seeds=0)
    out = _check_output_file(args.output, overwrite=args.overwrite)
    source = open_image(args.image)
    if mask_path is None:
        mask_name = f"--box {args.box}"
        mask = box_mask(upright_size(source), parse_box(args.box))
    else:
        from unipic.images import open_image as open_named

        mask_name = f"mask {mask_path}"
        mask = open_named(mask_path, name="mask")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    # Before loading: the prompt, seed, --grow/--feather and the mask, checked and grown once (a --grow
    # that swallows the whole image fails here); the loaded family adds its settings.
    request = check_inpaint_request([source], [mask], [prompt], seed=seed, grow=args.grow, feather=args.feather,
                                    mask_names=[mask_name], names=("--grow", "--feather", "--seed"))
    pipeline = _inpainting_pipeline(args)
    request = pipeline.inpaint_settings(request, **_sampling_options(args))
    [image] = pipeline.run(request, progress=not args.quiet)
    where = {"box": args.box} if mask_path is None else {"mask": str(mask_path)}
    save_image_atomic(image, out, _metadata(args, request, seed, prompt=prompt, source=str(args.image), **where))
    print(out)
    return 0


def cmd_outpaint(args: argparse.Namespace) -> int:
    """`unipic outpaint IMAGE PROMPT --left N --right N --top N --bottom N -o OUT`."""
    from unipic.inpainting import check_grow_feather, check_padding, outpaint_request
    from unipic.io_utils import save_image_atomic

    if not args.prompt.strip():
        raise UserError("the prompt is empty; describe the whole extended picture")
    _check_sampling_args(args)
    check_grow_feather(args.grow, args.feather, ("--grow", "--feather"))
    out = _check_output_file(args.output, overwrite=args.overwrite)
    source = open_image(args.image)
    sides = ("left", "right", "top", "bottom")
    pads = dict(zip(sides, check_padding(*(getattr(args, side) for side in sides),
                                         names=tuple(f"--{side}" for side in sides))))
    pipeline = _inpainting_pipeline(args)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    # The padded canvas and its border mask, checked once as an inpainting request, then sampled.
    request = outpaint_request(pipeline, [source], [args.prompt], **pads, seed=seed, grow=args.grow,
                               feather=args.feather, **_sampling_options(args))
    [image] = pipeline.run(request, progress=not args.quiet)
    save_image_atomic(image, out, _metadata(args, request, seed, prompt=args.prompt, source=str(args.image),
                                            padding=json.dumps(pads)))
    print(out)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """`unipic caption IMAGE [--prompt Q]`: print the answer alone on stdout."""
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; ask a question or leave it out for a description")
    if args.max_new_tokens is not None:
        check_int(args.max_new_tokens, "--max-new-tokens", minimum=1)
    check_seed(args.seed, "--seed")
    options: dict = {}
    if args.sample:
        temperature = 1.0 if args.temperature is None else args.temperature
        options.update(do_sample=True, temperature=check_number(
            temperature, "--temperature", minimum=0.0, above_minimum=True, maximum=MAX_TEMPERATURE,
            hint=" with --sample (for greedy decoding leave out --sample)"))
    elif args.temperature is not None:
        raise UserError(f"--temperature {args.temperature} applies only with --sample; add --sample or leave it out")
    image = open_image(args.image)
    pipeline = _load(args)
    question = args.prompt
    if question is None:
        question = str(pipeline.sampling_defaults().get("caption_question", "Describe the image in detail."))
    [answer] = pipeline.image_to_text([image], [question], max_new_tokens=args.max_new_tokens, seed=args.seed,
                                      **options)
    print(answer)
    return 0


# ---------------------------------------------------------------------------------------------
# state-dict / convert
# ---------------------------------------------------------------------------------------------


def cmd_state_dict(args: argparse.Namespace) -> int:
    """`unipic state-dict --preset P`: the tensor names/shapes the loader accepts, from a meta build."""
    from unipic.unipic1.checkpoint import expected_tensors
    from unipic.unipic1.models.presets import get_preset

    try:
        config = get_preset(args.preset)
    except ValueError as error:
        raise UserError(str(error)) from None
    lines = [f"{name}\t[{', '.join(str(d) for d in shape)}]" for name, shape in expected_tensors(config).items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`unipic convert`: official release files → our model folder."""
    if args.unipic3 is not None:
        from unipic.unipic3 import convert_release

        if args.checkpoint or args.llm or args.vae:
            raise UserError("--unipic3 converts a UniPic-3 release folder; --checkpoint/--llm/--vae are UniPic-1's")
        if Path(args.out).exists() and any(Path(args.out).iterdir()):
            raise UserError(f"--out {args.out} exists and is not empty; choose a new folder")
        print(convert_release(args.unipic3, args.out, base=args.base, variant=args.variant, ema=args.ema))
        return 0
    if not args.checkpoint or not args.llm:
        raise UserError("UniPic-1 conversion needs --checkpoint and --llm (or --unipic3 FOLDER for a UniPic-3 release)")
    from unipic.unipic1.convert import convert_official

    folder = convert_official(checkpoint=args.checkpoint, llm_folder=args.llm, vae_checkpoint=args.vae,
                              out=args.out, preset=args.preset, dtype=args.save_dtype,
                              understanding_encoder=args.understanding_encoder)
    print(folder)
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full `unipic` argument parser."""
    parser = OneLineParser(prog="unipic", description="Skywork UniPic unified multimodal models: text-to-image, "
                           "instruction editing and image-to-text, on CPU or GPU.")
    parser.add_argument("--version", action="version", version=f"unipic {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    gen = sub.add_parser("generate", help="text to image", description="Generate images from a prompt, or from "
                         "every prompt of a file (JSON list of {\"prompt\": ...}, or JSONL). Under "
                         "`accelerate launch` a prompt file is split across processes.")
    gen.add_argument("prompt", nargs="?", default=None, help="what to draw")
    gen.add_argument("--prompt-file", default=None, help="batch mode: a JSON list or JSONL file of {\"prompt\": ...}")
    gen.add_argument("-o", "--output", default="output.png",
                     help="output image (single prompt; several images get -0, -1, ... suffixes) or output folder "
                          "(with --prompt-file: files NNNNN.png; a rerun of the same request resumes, and a folder "
                          "holding images of a different request is refused) (default: output.png). Each PNG "
                          "records its prompt, seed, model and settings in text chunks; .jpg/.webp in EXIF")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace existing output files (by default an existing -o file is an error; in batch "
                          "mode: replace images made by a different request)")
    gen.add_argument("-n", "--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    add_model_options(gen)
    add_sampling_options(gen)
    gen.set_defaults(handler=cmd_generate)

    edit = sub.add_parser("edit", help="edit an image (UniPic-3: compose 1-6 images) by an instruction",
                          usage="unipic edit [options] IMAGE [IMAGE ...] INSTRUCTION\n"
                                "       unipic edit [options] --prompt-file JOBS.jsonl -o FOLDER",
                          description="Edit IMAGE following INSTRUCTION. Without a size the output keeps the "
                                      "source's aspect ratio (UniPic-1: at about the model's default pixel count; "
                                      "UniPic-2: its longer side 512), as the server does. UniPic-1 centre-crops "
                                      "the source to the "
                                      "output aspect ratio and resizes it to the output size; UniPic-2 resizes it "
                                      "straight to the output size, as upstream does (see --input-resize). UniPic-3 "
                                      "takes 1 to 6 images (edited or composed into one picture; they share a "
                                      "pixel budget of about 1024x1024) and gives the first image's budgeted size "
                                      "unless --size or --height/--width say otherwise.")
    edit.add_argument("inputs", nargs="*", metavar="IMAGE [IMAGE ...] INSTRUCTION",
                      help="source image file(s), then what to change, e.g. 'Change the color of the circle to "
                           "blue.' Images of any mode are converted (16-bit and palette images are scaled, "
                           "transparency is composited onto grey (UniPic-1) or white (UniPic-2/3), an animation "
                           "gives its first frame, a phone photo is turned upright by its EXIF orientation). More "
                           "than one image needs a UniPic-3 model")
    edit.add_argument("--prompt-file", default=None, metavar="JOBS",
                      help="batch mode: a JSON list or JSONL file of {\"images\": [paths], \"instruction\": text} "
                           "(or {\"image\": path, ...}); relative paths are relative to the file's folder. -o is "
                           "then a folder; job i is written to NNNNN.png with seed --seed + i (default 0), a rerun "
                           "resumes, and `accelerate launch --multi_gpu --num_processes N` shards the jobs")
    edit.add_argument("--negative-prompt", default=None,
                      help="UniPic-2/3: the negative prompt of classifier-free guidance (UniPic-3 default: ' ', "
                           "as upstream's scripts)")
    edit.add_argument("-o", "--output", default="edited.png",
                      help="output image, recording its instruction, input file names, seed, model and settings "
                           "(PNG text chunks; .jpg/.webp: EXIF) (default: edited.png); with --prompt-file a folder")
    edit.add_argument("--overwrite", action="store_true", help="replace -o if it exists (by default an error)")
    add_model_options(edit)
    add_sampling_options(edit, edit=True)
    edit.add_argument("--input-resize", default=None, metavar="{" + ",".join(INPUT_RESIZE_MODES) + "}",
                      help="UniPic-2: bring the source to the output size by resizing straight to it ('stretch', "
                           "upstream's behaviour, the default) or by centre-cropping to its aspect ratio first ('crop')")
    edit.set_defaults(handler=cmd_edit)

    inp = sub.add_parser("inpaint", help="regenerate the masked part of an image",
                         usage="unipic inpaint [options] IMAGE MASK PROMPT\n       "
                               "unipic inpaint [options] IMAGE PROMPT --box x0,y0,x1,y1",
                         description="Regenerate the pixels of IMAGE that MASK marks (white = regenerate), or the "
                                     "pixels of --box, so that the picture matches PROMPT; every other pixel stays "
                                     "exactly the source's. UniPic-1 regenerates each 16-pixel token holding a masked "
                                     "pixel (the rest stay visible to the model from the first step); UniPic-2 keeps "
                                     "the unmasked latents on the source's noising trajectory. The output has the "
                                     "source's size.")
    inp.add_argument("image", help="source image file (transparency is composited as for `edit`)")
    inp.add_argument("inputs", nargs="+", metavar="[MASK] PROMPT",
                     help="MASK: a mask image of the source's size, white (>= 128 in greyscale) = regenerate; "
                          "leave it out with --box. PROMPT: a description of the whole picture (or of what goes "
                          "in the mask)")
    inp.add_argument("--box", default=None, metavar="x0,y0,x1,y1",
                     help="mask this pixel box instead of reading a MASK file (x1, y1 exclusive)")
    inp.add_argument("-o", "--output", default="inpainted.png",
                     help="output image, recording its prompt, mask, seed, model and settings (PNG text chunks; "
                          ".jpg/.webp: EXIF) (default: inpainted.png)")
    inp.add_argument("--overwrite", action="store_true", help="replace -o if it exists (by default an error)")
    _add_mask_options(inp)
    add_model_options(inp)
    add_sampling_options(inp, sizes=False)
    inp.set_defaults(handler=cmd_inpaint)

    outp = sub.add_parser("outpaint", help="extend an image beyond its borders",
                          description="Pad IMAGE by --left/--right/--top/--bottom pixels (multiples of 16; the new "
                                      "border starts as copies of the edge pixels) and draw the border from PROMPT "
                                      "by inpainting it; the source's pixels stay exactly as they are.")
    outp.add_argument("image", help="source image file")
    outp.add_argument("prompt", help="a description of the whole extended picture")
    for side in ("left", "right", "top", "bottom"):
        outp.add_argument(f"--{side}", type=int, default=0,
                          help=f"pixels to add on the {side}, a multiple of 16 (default 0)")
    outp.add_argument("-o", "--output", default="outpainted.png",
                      help="output image, recording its prompt, padding, seed, model and settings (PNG text chunks; "
                           ".jpg/.webp: EXIF) (default: outpainted.png)")
    outp.add_argument("--overwrite", action="store_true", help="replace -o if it exists (by default an error)")
    _add_mask_options(outp)
    add_model_options(outp)
    add_sampling_options(outp, sizes=False)
    outp.set_defaults(handler=cmd_outpaint)

    cap = sub.add_parser("caption", help="image to text", description="Describe IMAGE or answer --prompt about it; "
                         "prints the answer alone on stdout.")
    cap.add_argument("image", help="image file")
    cap.add_argument("--prompt", default=None, help="question to ask (default: the model's description prompt)")
    cap.add_argument("--max-new-tokens", type=int, default=None,
                     help="longest answer in tokens, at least 1 (default: model's)")
    cap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    cap.add_argument("--temperature", type=float, default=None,
                     help=f"sampling temperature, above 0 and at most {MAX_TEMPERATURE:g} (only with --sample; "
                          "default 1)")
    cap.add_argument("--seed", type=int, default=None, help="seed for --sample, 0 to 2**64-1")
    cap.add_argument("--quiet", action="store_true", help="no progress output (only the answer is printed)")
    add_model_options(cap)
    cap.set_defaults(handler=cmd_caption)

    sd = sub.add_parser("state-dict", help="print the tensor names and shapes of a preset",
                        description="Build a preset on the meta device and print every tensor name the loader "
                                    "accepts from an official checkpoint, with its shape: name<TAB>[d0, d1, ...].")
    sd.add_argument("--preset", default="unipic1-1.5b", help="unipic1-1.5b, unipic1-medium or unipic1-tiny "
                    "(default: unipic1-1.5b)")
    sd.set_defaults(handler=cmd_state_dict)

    conv = sub.add_parser("convert", help="official release files → unipic model folder",
                          description="Convert Skywork-UniPic-1.5B release files (combined pytorch_model.bin, the "
                                      "Qwen2.5-1.5B-Instruct folder, kl16.ckpt) into a unipic model folder "
                                      "(config.json + safetensors + tokenizer). Strict: every tensor must match. "
                                      "With --unipic3 RELEASE: write the chosen UniPic-3 transformer as safetensors "
                                      "(the DMD release's EMA weights are a pickled .bin, read with "
                                      "torch.load(weights_only=True)) plus unipic3.json recording the variant and "
                                      "where the shared components are, so --model OUT needs no further options.")
    conv.add_argument("--checkpoint", default=None,
                      help="UniPic-1: the release's pytorch_model.bin (or .safetensors, or a sharded index .json)")
    conv.add_argument("--llm", default=None, help="UniPic-1: the Qwen2.5-1.5B-Instruct folder (config.json + tokenizer)")
    conv.add_argument("--vae", default=None, help="UniPic-1: kl16.ckpt, when the checkpoint carries no vae.* tensors")
    conv.add_argument("--unipic3", default=None, metavar="RELEASE",
                      help="a UniPic-3 release folder (Unipic3, Unipic3-Consistency-Model or Unipic3-DMD)")
    conv.add_argument("--base", default=None, metavar="FOLDER",
                      help="with --unipic3: the Qwen-Image-Edit folder for what the release lacks (CM release)")
    conv.add_argument("--variant", default=None, choices=("base", "cm", "dmd"),
                      help="with --unipic3: the sampler where the folder cannot tell (recorded in the output)")
    conv.add_argument("--ema", default=None, action=argparse.BooleanOptionalAction,
                      help="with --unipic3: convert ema_transformer/ (--ema) or transformer/ (--no-ema) "
                           "(default: upstream's choice, the EMA one for CM and DMD)")
    conv.add_argument("--out", required=True, help="output model folder")
    conv.add_argument("--preset", default="unipic1-1.5b", help="layout to check against (default unipic1-1.5b)")
    conv.add_argument("--save-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                      help="dtype of the saved weights (default bfloat16, as released)")
    conv.add_argument("--understanding-encoder", default="mar", choices=("mar", "siglip2"),
                      help="image-to-text features: 'mar' (the released code path) or 'siglip2' (the paper's)")
    conv.set_defaults(handler=cmd_convert)

    for module, function in (("unipic.eval.cli", "register_eval_commands"), ("unipic.data.cli", "register_data_commands"),
                             ("unipic.training.cli", "register_train_commands"),
                             ("unipic.serve.cli", "register_serve_commands")):
        register = _optional_register(module, function)
        if register is not None:
            register(sub)
    return parser


def _optional_register(module_name: str, function: str):
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            return None
        raise
    return getattr(module, function, None)


_QUIET_LIBRARY_LOGGING = ("transformers.utils.logging", "diffusers.utils.logging", "huggingface_hub.utils")


def _disable_progress_bars(module) -> None:
    disable = getattr(module, "disable_progress_bar", None) or getattr(module, "disable_progress_bars", None)
    if disable is not None:
        disable()


class _QuietOnImport:
    """A meta-path finder that disables a library's progress bars right after its logging module loads.

    Importing transformers' or diffusers' logging just to silence it costs ~2 s (diffusers.utils
    imports torch._dynamo), more than drawing an image and far more than `--help` or a usage error
    (issue 40); most commands never import those libraries at all.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        import importlib.util

        spec = importlib.util.find_spec(fullname)  # the other finders' answer (this one no longer matches)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_quiet(module) -> None:
                exec_module(module)
                _disable_progress_bars(module)

            spec.loader.exec_module = exec_then_quiet
        return spec


def _quiet_library_progress_bars() -> None:
    """Hide the libraries' weight-loading bars (now if imported, else when they are); unipic's own bars stay."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub, and transformers reads it
    pending = []
    for name in _QUIET_LIBRARY_LOGGING:
        if name in sys.modules:
            _disable_progress_bars(sys.modules[name])
        else:
            pending.append(name)
    if pending and not any(isinstance(finder, _QuietOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietOnImport(pending))


def _version() -> str:
    from unipic import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `unipic` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `unipic train RUN.yaml a=1 --resume b=2`: argparse stops collecting the overrides at the
    # first option, so key=value items after one come back unparsed; they are overrides all the same.
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="unipic: %(message)s")
    if not args.verbose:
        # transformers/diffusers chatter is not for end users. They reset their loggers when first
        # imported (after this point), so their own environment switches are the reliable way.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        for name in ("transformers", "diffusers", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _quiet_library_progress_bars()
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"unipic {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unipic: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(f"unipic {args.command}: error: no space left on the device{where}; free some space or "
              "write the output elsewhere (-o)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
