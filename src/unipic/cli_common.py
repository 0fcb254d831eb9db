"""Argument helpers shared by every `unipic` subcommand that loads a model."""

from __future__ import annotations

import argparse

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add --model, --device and --dtype (the options every model-loading command shares)."""
    parser.add_argument(
        "--model",
        default=None,
        help="model to load: a local model folder (UniPic-1 `config.json` or UniPic-2 diffusers "
        "`model_index.json`), a Hugging Face hub id (needs network), or a built-in name "
        "('default' = the embedded Shapes-world model, 'tiny-random' = untrained tiny preset, "
        "'shapes-oracle' = exact renderer for checking the evaluators). Default: the embedded model.",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="where to run: 'auto' picks cuda, then mps, then cpu (default: auto)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="compute precision: 'auto' = bfloat16 on cuda, float32 elsewhere (default: auto)",
    )
    parser.add_argument(
        "--qwen",
        default=None,
        metavar="PATH",
        help="UniPic-2 MetaQuery only: the Qwen2.5-VL-7B-Instruct folder, when the model folder has no mllm/ "
        "sub-folder or _qwen_path entry",
    )


def load_options(args: argparse.Namespace) -> dict[str, object]:
    """The `unipic.loading.load_pipeline` keyword arguments for parsed model options.

    The one mapping from the command line to the one loader, for every command that loads a model
    (generate, edit, inpaint, outpaint, caption, eval, serve): `load_pipeline(**load_options(args))`.
    Options a command does not offer take the loader's defaults.
    """
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "qwen_path": getattr(args, "qwen", None),
            "cpu_offload": getattr(args, "cpu_offload", False), "vae_tiling": getattr(args, "vae_tiling", False)}
