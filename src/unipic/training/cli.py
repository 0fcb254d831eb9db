"""`unipic train CONFIG.yaml [key=value ...] [--resume]`: run one training stage.

Under `accelerate launch` the same command trains with one process per device (DDP, or FSDP
through accelerate's config), e.g. two CPU processes:

    accelerate launch --multi_gpu --num_processes 2 -m unipic train configs/shapes/pretrain.yaml
"""

from __future__ import annotations

import argparse


def register_train_commands(subparsers) -> None:
    """Add the `train` subcommand to the `unipic` parser."""
    parser = subparsers.add_parser(
        "train", help="train a stage (vae / pretrain / align / joint / sft) from a YAML run file",
        description="Train one stage from a YAML run file (see configs/ and docs/training.md). Each "
                    "key=value after the file overrides a config key; nested keys use dots "
                    "(optim.lr=3e-4 data.tasks.i2t=2). Ctrl-C or SIGTERM stops after the current step "
                    "and writes a checkpoint; run again with --resume to continue. Under `accelerate "
                    "launch` every process trains a replica (DDP).")
    parser.add_argument("config", help="run file, e.g. configs/shapes/pretrain.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in out_dir (starts fresh if there is none)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without training")
    parser.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """Handler: parse the config, train, report where the result is."""
    from unipic.training.config import load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from unipic.training.trainer import train

    result = train(config, resume=args.resume)
    if result.finished:
        return 0
    # Interrupted by a signal: the conventional 128 + signal number, after a clean checkpoint.
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.stopped_by or "", 1)
