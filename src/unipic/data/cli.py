"""`unipic data ...` subcommands (today: `export`).

`unipic.cli` calls `register_data_commands(subparsers)`; the handler takes the parsed arguments,
calls one library function of `unipic.data` and returns the exit code.
"""

from __future__ import annotations

import argparse


def cmd_data_export(args: argparse.Namespace) -> int:
    """Handler of `unipic data export`: write N examples of one task to a folder."""
    from unipic.data.disk import export

    out = export(args.task, args.n, args.out, seed=args.seed, size=args.size, train=args.split == "train",
                 progress=not args.quiet)
    print(f"{out}: {args.n} {args.task} examples ({args.split} split) in data.jsonl + images/")
    return 0


def register_data_commands(subparsers) -> None:
    """Add `data` with the subcommand export."""
    data = subparsers.add_parser("data", help="export Shapes-world datasets",
                                 description="Write generated Shapes-world data in the on-disk layout the training "
                                             "pipeline reads (see src/unipic/data/README.md).")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", parser_class=type(data))
    p = sub.add_parser("export", help="write N examples of a task to a folder",
                       description="Write DIR/data.jsonl + DIR/images/: t2i rows {image, text}, i2t rows "
                                   "{image, question, answer}, edit rows {source, instruction, target}. Example i is "
                                   "a pure function of (seed, i); rerunning resumes (finished images are skipped).")
    p.add_argument("--task", required=True, choices=("t2i", "i2t", "edit"), help="which task's examples")
    p.add_argument("--n", type=int, required=True, help="number of examples")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", choices=("train", "eval"), default="train",
                   help="'train' never shows a held-out color-shape pair; 'eval' draws from all 60 (default train)")
    p.add_argument("--size", type=int, default=128,
                   help="square image side in pixels (default 128; the Shapes judge needs >= 128)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed: prompt set and sampling are reproducible from it (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_data_export)
