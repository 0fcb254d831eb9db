"""The `unipic` command line: generate, edit, caption, state-dict, convert, eval, data, train, serve.

Each handler only parses arguments, builds settings and calls library functions. A user mistake
(missing file, bad size, unknown model, ...) raises `UserError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from unipic.api import UserError
from unipic.cli_common import add_model_options

logger = logging.getLogger("unipic")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors in one line (and exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------
# Shared option groups
# ---------------------------------------------------------------------------------------------


def add_sampling_options(parser: argparse.ArgumentParser, *, edit: bool = False) -> None:
    """Options shared by generate and edit (defaults come from the model's config when omitted)."""
    group = parser.add_argument_group("sampling (defaults: the model's own settings)")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed; the same seed on the same device reproduces the output "
                            "(default: a random seed, recorded in the PNG)")
    group.add_argument("--size", type=int, default=None,
                       help="square output side in pixels, a multiple of 16 (default: the model's, e.g. 128 "
                            "for the embedded model, 1024 for UniPic-1.5B)")
    group.add_argument("--height", type=int, default=None, help="output height in pixels (overrides --size)")
    group.add_argument("--width", type=int, default=None, help="output width in pixels (overrides --size)")
    group.add_argument("--steps", type=int, default=None,
                       help="sampling steps: MAR reveal steps for UniPic-1, denoising steps for UniPic-2")
    group.add_argument("--cfg", type=float, default=None,
                       help="classifier-free guidance scale (1 = no guidance)"
                            + (" against 'Repeat this image.'" if edit else " against the null prompt"))
    group.add_argument("--cfg-schedule", choices=("constant", "linear"), default=None,
                       help="UniPic-1: guidance constant over steps, or growing linearly as tokens are revealed")
    group.add_argument("--temperature", type=float, default=None,
                       help="UniPic-1: scale of the diffusion head's per-step noise (lower = more conservative)")
    group.add_argument("--head-steps", type=int, default=None,
                       help="UniPic-1: denoising steps of the per-token diffusion head (released model: 100)")
    group.add_argument("--batch-size", type=int, default=None, help="images generated per forward pass (default 8)")
    group.add_argument("--cpu-offload", action="store_true",
                       help="UniPic-2: keep sub-models on the CPU and move each to the GPU only while it runs")
    group.add_argument("--vae-tiling", action="store_true", help="UniPic-2: decode large images tile by tile")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _size_from_args(args: argparse.Namespace) -> tuple[int | None, int | None]:
    height = args.height if args.height is not None else args.size
    width = args.width if args.width is not None else args.size
    return height, width


def _sampling_options(args: argparse.Namespace) -> dict:
    options = {}
    for key in ("steps", "cfg", "cfg_schedule", "temperature", "head_steps", "batch_size"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    return options


def _load(args: argparse.Namespace):
    from unipic.loading import load_pipeline

    return load_pipeline(args.model, device=args.device, dtype=args.dtype, qwen_path=getattr(args, "qwen", None),
                         cpu_offload=getattr(args, "cpu_offload", False), vae_tiling=getattr(args, "vae_tiling", False))


def open_image(path: str | os.PathLike):
    """Open an image file as RGB, with a one-line UserError for a missing file or a non-image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            # RGBA, palette and grayscale inputs are converted (upstream crashed on them).
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path} is not a readable image ({type(error).__name__})") from None


def _check_output_path(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"-o {path}: give an image file name ending in .png (or .jpg/.webp)")
    if out.exists() and out.is_dir():
        raise UserError(f"-o {path} is a folder; give a file name")
    return out


def _metadata(args: argparse.Namespace, pipeline, seed: int, **extra) -> dict:
    settings = dict(pipeline.sampling_defaults())
    settings.update(_sampling_options(args))
    height, width = _size_from_args(args)
    if height is not None:
        settings.update(height=height, width=width)
    return {"software": "unipic", "model": str(args.model or "default"), "seed": seed,
            "settings": json.dumps(settings, sort_keys=True), **extra}


# ---------------------------------------------------------------------------------------------
# generate / edit / caption
# ---------------------------------------------------------------------------------------------


def _read_prompt_file(path: str) -> list[str]:
    """Prompts from upstream's JSON list of {"prompt": ...}, a JSONL file of such objects, or plain lines."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompt file not found: {file}")
    text = file.read_text(encoding="utf-8")
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
                raise UserError(f"{file}:{number}: not JSON; use a JSON list or JSONL of {{\"prompt\": ...}}") from None
    prompts = []
    for number, row in enumerate(rows, start=1):
        prompt = row.get("prompt") if isinstance(row, dict) else row if isinstance(row, str) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{file}: entry {number} has no non-empty \"prompt\"")
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"{file}: no prompts found")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    """`unipic generate`: one prompt to -o FILE, or a prompt file to -o FOLDER (sharded under accelerate)."""
    from unipic.io_utils import save_image_atomic

    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("give either a PROMPT or --prompt-file FILE")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("the prompt is empty; describe the image to generate")
    if args.images_per_prompt < 1:
        raise UserError(f"--images-per-prompt {args.images_per_prompt} must be at least 1")
    height, width = _size_from_args(args)
    if args.prompt_file is None:
        out = _check_output_path(args.output)
        pipeline = _load(args)
        seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
        images = pipeline.text_to_image([args.prompt], height=height, width=width,
                                        images_per_prompt=args.images_per_prompt, seed=seed,
                                        progress=not args.quiet, **_sampling_options(args))[0]
        paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(images))]
        for k, (image, path) in enumerate(zip(images, paths)):
            save_image_atomic(image, path, _metadata(args, pipeline, seed, prompt=args.prompt, index=str(k)))
            print(path)
        return 0
    return _generate_batch(args, height, width)


def _generate_batch(args: argparse.Namespace, height: int | None, width: int | None) -> int:
    from tqdm.auto import tqdm

    from unipic.distributed import process_rank_and_world, process_shard
    from unipic.io_utils import save_image_atomic

    prompts = _read_prompt_file(args.prompt_file)
    out_dir = Path(args.output)
    if out_dir.suffix.lower() in (".png", ".jpg", ".jpeg"):
        raise UserError(f"-o {args.output}: with --prompt-file, -o is an output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    base_seed = args.seed if args.seed is not None else 0
    rank, world = process_rank_and_world()
    k_max = args.images_per_prompt

    def paths_for(index: int) -> list[Path]:
        if k_max == 1:
            return [out_dir / f"{index:05d}.png"]
        return [out_dir / f"{index:05d}_{k}.png" for k in range(k_max)]

    mine = process_shard(list(range(len(prompts))), rank, world)
    todo = [i for i in mine if not all(p.exists() for p in paths_for(i))]  # resumable
    if not todo:
        print(f"all {len(mine)} prompts of this process are already done in {out_dir}")
        return 0
    pipeline = _load(args)
    for index in tqdm(todo, desc=f"prompts (process {rank + 1}/{world})", disable=args.quiet):
        # Seed per prompt index, so results do not depend on sharding or resuming.
        seed = base_seed + index
        images = pipeline.text_to_image([prompts[index]], height=height, width=width, images_per_prompt=k_max,
                                        seed=seed, **_sampling_options(args))[0]
        for k, (image, path) in enumerate(zip(images, paths_for(index))):
            save_image_atomic(image, path, _metadata(args, pipeline, seed, prompt=prompts[index], index=str(k),
                                                     prompt_index=str(index)))
    print(f"process {rank + 1}/{world}: wrote {len(todo)} prompt(s) to {out_dir}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """`unipic edit IMAGE INSTRUCTION -o OUT`."""
    from unipic.io_utils import save_image_atomic

    if not args.instruction.strip():
        raise UserError("the instruction is empty; say how to edit the image")
    out = _check_output_path(args.output)
    source = open_image(args.image)
    height, width = _size_from_args(args)
    pipeline = _load(args)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    [image] = pipeline.edit_image([source], [args.instruction], height=height, width=width, seed=seed,
                                  progress=not args.quiet, **_sampling_options(args))
    save_image_atomic(image, out, _metadata(args, pipeline, seed, instruction=args.instruction,
                                            source=str(args.image)))
    print(out)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """`unipic caption IMAGE [--prompt Q]`: print the answer alone on stdout."""
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; ask a question or leave it out for a description")
    image = open_image(args.image)
    pipeline = _load(args)
    question = args.prompt
    if question is None:
        question = getattr(getattr(getattr(pipeline, "config", None), "sampling", None), "caption_prompt",
                           "Describe the image in detail.")
    options = {}
    if args.sample:
        options.update(do_sample=True, temperature=args.temperature if args.temperature is not None else 1.0)
    [answer] = pipeline.image_to_text([image], [question], max_new_tokens=args.max_new_tokens, seed=args.seed,
                                      **options)
    print(answer)
    return 0


# ---------------------------------------------------------------------------------------------
# state-dict / convert
# ---------------------------------------------------------------------------------------------


def cmd_state_dict(args: argparse.Namespace) -> int:
    """`unipic state-dict --preset P`: the tensor names/shapes the loader accepts, from a meta build."""
    from unipic.checkpoint import expected_tensors
    from unipic.config import get_preset

    try:
        config = get_preset(args.preset)
    except ValueError as error:
        raise UserError(str(error)) from None
    lines = [f"{name}\t[{', '.join(str(d) for d in shape)}]" for name, shape in expected_tensors(config).items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`unipic convert`: official release files → our model folder."""
    from unipic.convert.official import convert_official

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
                     help="output PNG (single prompt; several images get -0, -1, ... suffixes) or output folder "
                          "(with --prompt-file; files NNNNN.png, resumable) (default: output.png)")
    gen.add_argument("-n", "--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    add_model_options(gen)
    add_sampling_options(gen)
    gen.set_defaults(handler=cmd_generate)

    edit = sub.add_parser("edit", help="edit an image by an instruction",
                          description="Edit IMAGE following INSTRUCTION. The source is centre-cropped to the output "
                                      "aspect ratio and resized to the output size.")
    edit.add_argument("image", help="source image file (any mode: RGBA, grayscale, ... are converted)")
    edit.add_argument("instruction", help="what to change, e.g. 'Change the color of the circle to blue.'")
    edit.add_argument("-o", "--output", default="edited.png", help="output PNG (default: edited.png)")
    add_model_options(edit)
    add_sampling_options(edit, edit=True)
    edit.set_defaults(handler=cmd_edit)

    cap = sub.add_parser("caption", help="image to text", description="Describe IMAGE or answer --prompt about it; "
                         "prints the answer alone on stdout.")
    cap.add_argument("image", help="image file")
    cap.add_argument("--prompt", default=None, help="question to ask (default: the model's description prompt)")
    cap.add_argument("--max-new-tokens", type=int, default=None, help="longest answer in tokens (default: model's)")
    cap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    cap.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample)")
    cap.add_argument("--seed", type=int, default=None, help="seed for --sample")
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
                                      "(config.json + safetensors + tokenizer). Strict: every tensor must match.")
    conv.add_argument("--checkpoint", required=True,
                      help="the release's pytorch_model.bin (or .safetensors, or a sharded index .json)")
    conv.add_argument("--llm", required=True, help="the Qwen2.5-1.5B-Instruct folder (config.json + tokenizer)")
    conv.add_argument("--vae", default=None, help="kl16.ckpt, when the checkpoint carries no vae.* tensors")
    conv.add_argument("--out", required=True, help="output model folder")
    conv.add_argument("--preset", default="unipic1-1.5b", help="layout to check against (default unipic1-1.5b)")
    conv.add_argument("--save-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                      help="dtype of the saved weights (default bfloat16, as released)")
    conv.add_argument("--understanding-encoder", default="mar", choices=("mar", "siglip2"),
                      help="image-to-text features: 'mar' (the released code path) or 'siglip2' (the paper's)")
    conv.set_defaults(handler=cmd_convert)

    for module, function in (("unipic.eval.cli", "register_eval_commands"), ("unipic.eval.cli", "register_data_commands"),
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


def _quiet_library_progress_bars() -> None:
    """Hide the libraries' weight-loading bars; unipic's own progress bars stay."""
    import importlib

    for name in ("transformers.utils.logging", "diffusers.utils.logging", "huggingface_hub.utils"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        disable = getattr(module, "disable_progress_bar", None) or getattr(module, "disable_progress_bars", None)
        if disable is not None:
            disable()


def _version() -> str:
    from unipic import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `unipic` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
