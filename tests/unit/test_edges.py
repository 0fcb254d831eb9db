"""The edges of the command line and the Python API where a wrong result once came back with exit 0
(issue 41, items 9-12): each mistake is one line and exit 2, each odd-but-valid input does what it says."""

from __future__ import annotations

import pytest

from unipic.api import UserError
from unipic.cli import main
from unipic.world.judge import judge


def test_a_run_file_that_sets_nothing_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert main(["train", str(empty), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sets no keys" in err[0] and "configs/shapes" in err[0]
    assert not (tmp_path / "runs").exists()
    # Overrides on the command line count as settings: then the run is what they say.
    assert main(["train", str(empty), "stage=vae", f"out_dir={tmp_path / 'run'}", "--print-config"]) == 0
    assert f"out_dir: {tmp_path / 'run'}" in capsys.readouterr().out


def test_resume_may_stand_anywhere_among_the_overrides(tmp_path, capsys):
    run_file = "configs/shapes/vae.yaml"
    for argv in (["train", run_file, "--resume", f"out_dir={tmp_path}", "train.max_steps=7", "--print-config"],
                 ["train", run_file, f"out_dir={tmp_path}", "--resume", "train.max_steps=7", "--print-config"]):
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert f"out_dir: {tmp_path}" in printed and "max_steps: 7" in printed


def test_an_unknown_option_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "a photo of a red circle", "--no-such-option", "-o", "x.png"])
    assert stop.value.code == 2 and "--no-such-option" in capsys.readouterr().err


def test_the_oracle_draws_the_readmes_prompt(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "out.png"
    assert main(["generate", "a photo of a red circle left of a blue star", "--model", "shapes-oracle",
                 "-o", str(out)]) == 0
    found = judge(Image.open(out))
    assert [d.pair for d in found] == [("red", "circle"), ("blue", "star")]  # left to right
    assert found[0].cx < found[1].cx


def test_the_oracle_says_what_it_cannot_draw_or_answer(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["generate", "a photo of a cat", "--model", "shapes-oracle", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot draw" in err[0] and not out.exists()

    from unipic.loading import load_pipeline

    oracle = load_pipeline("shapes-oracle")
    [[image]] = oracle.text_to_image(["a photo of a red circle left of a blue star"], seed=0)
    with pytest.raises(UserError, match="question forms"):
        oracle.image_to_text([image], ["What is this?"])
    answers = oracle.image_to_text([image, image], ["Describe the image.", "What color is the cross?"])
    assert answers[0] == "a red circle and a blue star"
    assert answers[1] and "does not apply" in answers[1]
