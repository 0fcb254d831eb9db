"""Understanding, editing and DPG-Bench evaluation, and the `eval` / `data` subcommands."""

from __future__ import annotations

import argparse
import json
import re

import pytest
from PIL import Image

from unipic.api import UserError
from unipic.data.cli import register_data_commands
from unipic.eval.cli import register_eval_commands
from unipic.eval.dpg import generate_dpg, load_dpg_prompts
from unipic.eval.edit import run_edit_eval
from unipic.eval.i2t import run_i2t_eval
from unipic.world.oracle import ShapesOracle
from unipic.world.questions import QUESTION_KINDS
from unipic.world.spec import EDIT_KINDS


def test_i2t_oracle_and_corruptions(tmp_path):
    summary = run_i2t_eval(ShapesOracle(), tmp_path / "ok", n_per_kind=10, progress=False)
    assert {k: e["score"] for k, e in summary["kinds"].items()} == dict.fromkeys(QUESTION_KINDS, 1.0)
    assert summary["caption_strict"] == 1.0 and summary["overall"] == 1.0 and summary["held_out"]["n"] > 0
    rows = [json.loads(line) for line in (tmp_path / "ok" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and {"multiset", "strict"} <= set(rows[0])  # captions come first
    assert (tmp_path / "ok" / "contact_sheet.png").is_file()

    mirrored = run_i2t_eval(ShapesOracle(mirror_positions=True), tmp_path / "m", n_per_kind=10, progress=False)
    scores = {k: e["score"] for k, e in mirrored["kinds"].items()}
    assert scores["relation"] == 0.0 and scores["count"] == scores["color"] == scores["shape"] == 1.0
    assert mirrored["caption_multiset"] == 1.0 and mirrored["caption_strict"] < 1.0

    recolored = run_i2t_eval(ShapesOracle(wrong_colors=True), tmp_path / "c", n_per_kind=10, progress=False)
    scores = {k: e["score"] for k, e in recolored["kinds"].items()}
    assert scores["color"] == 0.0 and scores["caption"] == 0.0 and scores["count"] == scores["relation"] == 1.0


def test_edit_oracle_and_corruptions(tmp_path):
    summary = run_edit_eval(ShapesOracle(), tmp_path / "ok", n_per_kind=6, progress=False)
    assert {k: e["score"] for k, e in summary["kinds"].items()} == dict.fromkeys(EDIT_KINDS, 1.0)
    assert (tmp_path / "ok" / "images" / "00000_output.png").is_file()
    assert (tmp_path / "ok" / "contact_sheet.png").is_file()
    wrong = run_edit_eval(ShapesOracle(wrong_colors=True), tmp_path / "c", n_per_kind=6, progress=False)
    assert wrong["overall"] == 0.0
    dropped = run_edit_eval(ShapesOracle(drop_object=True), tmp_path / "d", n_per_kind=6, progress=False)
    assert dropped["overall"] == 0.0


def test_dpg_layout_is_resumable(tmp_path):
    prompts = load_dpg_prompts()
    assert len(prompts) == 1065 and prompts[0]["id"] == "0"
    first = generate_dpg(ShapesOracle(blank_unknown=True), tmp_path, size=128, limit=3, progress=False)
    assert first == {"generated": 3, "skipped": 0}
    grid = Image.open(tmp_path / "0.png")
    assert grid.size == (256, 256)
    assert generate_dpg(ShapesOracle(blank_unknown=True), tmp_path, size=128, limit=3, progress=False) == {"generated": 0, "skipped": 3}


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def parser():
    parser = argparse.ArgumentParser(prog="unipic")
    sub = parser.add_subparsers(dest="command")
    register_eval_commands(sub)
    register_data_commands(sub)
    return parser


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _actions(child)
        else:
            yield parser.prog, action


def test_every_option_has_help(parser):
    missing = [(prog, a.dest) for prog, a in _actions(parser) if not a.help and a.dest != "help"]
    assert not missing


def test_cli_handlers(parser, tmp_path, capsys):
    out = tmp_path / "t2i"
    args = parser.parse_args(["eval", "t2i", "--model", "shapes-oracle", "--out", str(out), "--n-per-category", "1",
                              "--images-per-prompt", "1", "--quiet"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"overall \(mean of 6\)\s+1\.000", printed)
    assert re.search(r"overall, no extra objects\s+1\.000", printed)
    args = parser.parse_args(["eval", "judge", str(out), "--quiet"])
    assert args.handler(args) == 0 and "position" in capsys.readouterr().out
    args = parser.parse_args(["data", "export", "--task", "i2t", "--n", "3", "--out", str(tmp_path / "d"), "--quiet"])
    assert args.handler(args) == 0 and (tmp_path / "d" / "data.jsonl").is_file()
    args = parser.parse_args(["data", "export", "--task", "i2t", "--n", "0", "--out", str(tmp_path / "e")])
    with pytest.raises(UserError, match="--n"):
        args.handler(args)
    args = parser.parse_args(["eval", "geneval", "--metadata", str(tmp_path / "missing.jsonl"), "--out",
                              str(tmp_path / "g"), "--model", "shapes-oracle"])
    with pytest.raises(UserError, match="not found"):
        args.handler(args)
