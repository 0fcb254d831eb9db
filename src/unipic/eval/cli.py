"""`unipic eval ...` subcommands (`unipic data ...` lives in `unipic.data.cli`).

`unipic.cli` calls `register_eval_commands(subparsers)`; each handler (set as the parser's `handler` default) takes the parsed arguments, calls one
library function and returns the exit code. User mistakes raise `UserError`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from unipic.api import UserError
from unipic.checks import check_int, check_seed, check_writable
from unipic.cli_common import add_model_options, loader_kwargs


def _add_common(parser: argparse.ArgumentParser, *, size_default: int | None, seed: bool = True) -> None:
    if size_default is None:
        parser.add_argument("--size", type=int, default=None,
                            help="square image side in pixels (default: the model's own; the Shapes judge "
                                 "needs >= 128)")
    else:
        parser.add_argument("--size", type=int, default=size_default,
                            help=f"square image side in pixels (default {size_default}; the Shapes judge needs >= 128)")
    if seed:
        parser.add_argument("--seed", type=int, default=0,
                            help="base seed: prompt set and sampling are reproducible from it (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_name(args: argparse.Namespace) -> str:
    return str(args.model or "default")


def _check_before_load(args: argparse.Namespace) -> None:
    """Reject bad numbers and an unusable --out before spending time on loading a model."""
    if getattr(args, "size", None) is not None:
        check_int(args.size, "--size", minimum=16)
    check_seed(getattr(args, "seed", None), "--seed")
    for flag in ("images_per_prompt", "n_per_category", "n_per_kind", "batch_size", "limit"):
        value = getattr(args, flag, None)
        if value is not None:
            check_int(value, "--" + flag.replace("_", "-"), minimum=1)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    check_writable(out, "--out", str(out))


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------


def cmd_eval_geneval(args: argparse.Namespace) -> int:
    from unipic.eval.t2i import generate_geneval, load_metadata
    from unipic.loading import load_pipeline

    _check_before_load(args)
    metadata = load_metadata(args.metadata)
    pipeline = load_pipeline(args.model, **loader_kwargs(args))
    result = generate_geneval(pipeline, metadata, args.out, args.images_per_prompt, args.size, args.seed,
                              _model_name(args), progress=not args.quiet)
    print(f"{args.out}: generated {result['generated']} prompts, {result['skipped']} already done "
          f"(of {len(metadata)}); score with `unipic eval judge {args.out}` (Shapes prompts) or GenEval's scorer")
    return 0


def cmd_eval_judge(args: argparse.Namespace) -> int:
    from unipic.eval.t2i import judge_folder, summary_table

    summary = judge_folder(args.dir, progress=not args.quiet)
    print(summary_table(summary))
    print(f"wrote {Path(args.dir) / 'results.jsonl'} and {Path(args.dir) / 'summary.json'}")
    return 0


def cmd_eval_t2i(args: argparse.Namespace) -> int:
    from unipic.eval.t2i import run_t2i_eval, summary_table
    from unipic.loading import load_pipeline

    _check_before_load(args)
    pipeline = load_pipeline(args.model, **loader_kwargs(args))
    summary = run_t2i_eval(pipeline, args.out, args.n_per_category, args.images_per_prompt, args.size, args.seed,
                           _model_name(args), progress=not args.quiet)
    if summary is not None:  # the main process judges; the others only generated
        print(summary_table(summary))
        print(f"wrote {args.out}/summary.json, results.jsonl and contact_sheet.png")
    return 0


def _run_per_kind_eval(args: argparse.Namespace, run: Callable[..., dict], table: Callable[[dict], str]) -> int:
    """The i2t, edit and inpaint evaluations: check, load, run `--n-per-kind` cases, print the table."""
    from unipic.loading import load_pipeline

    _check_before_load(args)
    pipeline = load_pipeline(args.model, **loader_kwargs(args))
    summary = run(pipeline, args.out, args.n_per_kind, args.size, args.seed, args.batch_size, progress=not args.quiet)
    print(table(summary))
    print(f"wrote {args.out}/summary.json, results.jsonl and contact_sheet.png")
    return 0


def cmd_eval_i2t(args: argparse.Namespace) -> int:
    from unipic.eval.i2t import i2t_table, run_i2t_eval

    return _run_per_kind_eval(args, run_i2t_eval, i2t_table)


def cmd_eval_edit(args: argparse.Namespace) -> int:
    from unipic.eval.edit import edit_table, run_edit_eval

    return _run_per_kind_eval(args, run_edit_eval, edit_table)


def cmd_eval_inpaint(args: argparse.Namespace) -> int:
    from unipic.eval.inpaint import inpaint_table, run_inpaint_eval

    return _run_per_kind_eval(args, run_inpaint_eval, inpaint_table)


def cmd_eval_dpg(args: argparse.Namespace) -> int:
    from unipic.eval.dpg import generate_dpg
    from unipic.loading import load_pipeline

    _check_before_load(args)
    pipeline = load_pipeline(args.model, **loader_kwargs(args))
    result = generate_dpg(pipeline, args.out, args.size, args.seed, args.limit, _model_name(args),
                          progress=not args.quiet)
    print(f"{args.out}: wrote {result['generated']} DPG-Bench grids, {result['skipped']} already there")
    return 0


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def register_eval_commands(subparsers) -> None:
    """Add `eval` with the subcommands geneval, judge, t2i, i2t, edit, inpaint and dpg."""
    ev = subparsers.add_parser("eval", help="evaluate a model (Shapes world, GenEval and DPG-Bench layouts)",
                               description="Evaluation: generate in GenEval's or DPG-Bench's layout, judge with the "
                                           "Shapes judge, or run the ShapesEval suites end to end.")
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", parser_class=type(ev))

    p = sub.add_parser("geneval", help="generate images in GenEval's folder layout",
                       description="Generate K images per prompt of a GenEval-style metadata file into "
                                   "DIR/<index:05d>/metadata.jsonl + samples/<k:04d>.png. Resumable (finished "
                                   "prompts are skipped) and split across processes under `accelerate launch`.")
    p.add_argument("--metadata", default=None,
                   help="GenEval-style metadata JSONL (tag, include, exclude, prompt; shape names as classes for "
                        "the Shapes judge) (default: GenEval's own 553 prompts)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default 4, as GenEval)")
    add_model_options(p)
    _add_common(p, size_default=None)
    p.set_defaults(handler=cmd_eval_geneval)

    p = sub.add_parser("judge", help="score a GenEval-layout folder with the Shapes judge",
                       description="Judge every image of DIR/<index>/samples/ against its metadata with the Shapes "
                                   "judge (no learned detector); write DIR/results.jsonl and DIR/summary.json "
                                   "and print the per-category table.")
    p.add_argument("dir", help="folder written by `unipic eval geneval` (or any GenEval-layout folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_eval_judge)

    p = sub.add_parser("t2i", help="ShapesEval text to image, end to end",
                       description="Build a ShapesEval prompt set (six GenEval categories), generate it in GenEval's "
                                   "layout, judge it and draw a contact sheet (DIR/contact_sheet.png).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-per-category", type=int, default=20, help="prompts per category (default 20)")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default 4)")
    add_model_options(p)
    _add_common(p, size_default=128)
    p.set_defaults(handler=cmd_eval_t2i)

    p = sub.add_parser("i2t", help="ShapesEval image to text",
                       description="Ask the model N questions of each kind (caption, count, color, shape, relation) "
                                   "about rendered scenes; report accuracy per kind and caption multiset/strict "
                                   "scores in DIR/summary.json.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-per-kind", type=int, default=50, help="questions per kind (default 50)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per model call (default 16)")
    add_model_options(p)
    _add_common(p, size_default=128)
    p.set_defaults(handler=cmd_eval_i2t)

    p = sub.add_parser("edit", help="ShapesEval editing",
                       description="Have the model perform N edits of each kind (recolor, remove, add, replace, move) "
                                   "and judge the outputs; success per kind in DIR/summary.json, a contact sheet of "
                                   "source | output | expected.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-per-kind", type=int, default=20, help="edits per kind (default 20)")
    p.add_argument("--batch-size", type=int, default=8, help="edits per model call (default 8)")
    add_model_options(p)
    _add_common(p, size_default=128)
    p.set_defaults(handler=cmd_eval_edit)

    p = sub.add_parser("inpaint", help="ShapesEval inpainting",
                       description="Remove one object from each of N rendered scenes per case kind, mask its box plus "
                                   "a margin and have the model inpaint it, prompted with the full scene caption "
                                   "('caption') or 'a photo of a {color} {shape}' ('object'). A case succeeds when the "
                                   "judge finds the original scene's objects, those outside the mask where they "
                                   "were. Success per kind and seconds per image in DIR/summary.json, a contact "
                                   "sheet of source | mask | output | expected.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-per-kind", type=int, default=50, help="cases per kind (default 50)")
    p.add_argument("--batch-size", type=int, default=8, help="cases per model call (default 8)")
    add_model_options(p)
    _add_common(p, size_default=128)
    p.set_defaults(handler=cmd_eval_inpaint)

    p = sub.add_parser("dpg", help="generate DPG-Bench 2x2 grids",
                       description="Generate four images per DPG-Bench prompt and save them as a 2x2 grid "
                                   "DIR/<prompt id>.png, the layout DPG-Bench's scorer reads. Resumable; split "
                                   "across processes under `accelerate launch`.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (default: all 1,065)")
    add_model_options(p)
    _add_common(p, size_default=None)
    p.set_defaults(handler=cmd_eval_dpg)
