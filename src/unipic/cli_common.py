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
    group = parser.add_argument_group("UniPic-3 release folders")
    group.add_argument("--base", default=None, metavar="FOLDER",
                       help="UniPic-3 only: the Qwen-Image-Edit folder that supplies what a release folder lacks "
                            "(the Consistency-Model release has only its transformers)")
    group.add_argument("--variant", default=None, choices=("base", "cm", "dmd"),
                       help="UniPic-3 only: the sampler and defaults where the folder cannot tell: 'base' (50-step "
                            "Euler), 'cm' or 'dmd' (8-step consistency sampler); recorded by `unipic convert`")
    group.add_argument("--ema", default=None, action=argparse.BooleanOptionalAction,
                       help="UniPic-3 only: load ema_transformer/ (--ema) or transformer/ (--no-ema) where a release "
                            "has both (default: upstream's choice, the EMA one for CM and DMD)")
    group.add_argument("--device-map", default=None, choices=("balanced",),
                       help="UniPic-3 only: spread the transformer and the text encoder over every visible GPU "
                            "(diffusers' and transformers' device_map); excludes --cpu-offload")
    group.add_argument("--quantize", default=None, choices=("int8", "nf4"),
                       help="UniPic-3 only: quantize the transformer's and the text encoder's weights with the "
                            "libraries' own configs: bitsandbytes on CUDA (int8, or 4-bit NF4), optimum-quanto int8 "
                            "on the CPU (docs/unipic3.md has what fits which card)")
    parser.add_argument(
        "--qwen",
        default=None,
        metavar="PATH",
        help="UniPic-2 MetaQuery only: the Qwen2.5-VL-7B-Instruct folder, when the model folder has no mllm/ "
        "sub-folder or _qwen_path entry",
    )


def loader_kwargs(args: argparse.Namespace) -> dict:
    """`load_pipeline` keyword arguments from the parsed model options (absent options keep their defaults).

    The one mapping from the command line to the one loader, for every command that loads a model
    (generate, edit, inpaint, outpaint, caption, eval, serve): `load_pipeline(args.model, **loader_kwargs(args))`.
    """
    return {"device": args.device, "dtype": args.dtype, "qwen_path": getattr(args, "qwen", None),
            "cpu_offload": getattr(args, "cpu_offload", False), "vae_tiling": getattr(args, "vae_tiling", False),
            "base": getattr(args, "base", None), "ema": getattr(args, "ema", None),
            "variant": getattr(args, "variant", None), "device_map": getattr(args, "device_map", None),
            "quantize": getattr(args, "quantize", None)}
