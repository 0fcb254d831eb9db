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


def _rotated_jpeg(path):
    """A 64x32 JPEG whose EXIF orientation (6: rotate 90° clockwise) displays it as 32x64."""
    from PIL import Image

    raw = Image.new("RGB", (64, 32), (128, 128, 128))
    raw.paste((220, 30, 30), (0, 0, 16, 32))  # left quarter red: the displayed top quarter
    exif = raw.getexif()
    exif[0x0112] = 6
    raw.save(path, exif=exif)
    return path


def test_photos_with_an_exif_orientation_are_used_as_displayed(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from unipic.images import open_image

    photo = _rotated_jpeg(tmp_path / "phone.jpg")
    shown = open_image(photo)
    assert shown.size == (32, 64)
    assert np.asarray(shown.convert("RGB"))[:8].mean(axis=(0, 1))[0] > 180  # red on top, as displayed
    mask = np.zeros((64, 32), dtype=np.uint8)
    mask[16:48, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")  # drawn on the displayed picture
    out = tmp_path / "filled.png"
    assert main(["inpaint", str(photo), str(tmp_path / "mask.png"), "a photo of a red circle", "--model",
                 "tiny-random", "--steps", "1", "--quiet", "-o", str(out)]) == 0, capsys.readouterr().err
    assert Image.open(out).size == (32, 64)
    # A mask of the stored (unrotated) size no longer fits: the message names the CLI's argument.
    raw_mask = np.zeros((32, 64), dtype=np.uint8)
    raw_mask[:, :16] = 255
    Image.fromarray(raw_mask).save(tmp_path / "raw.png")
    assert main(["inpaint", str(photo), str(tmp_path / "raw.png"), "a photo of a red circle", "--model",
                 "tiny-random", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mask" in err[0] and "32x64" in err[0]


def test_prompt_files_accept_a_byte_order_mark_and_name_non_string_prompts(tmp_path, capsys):
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a photo of a red circle"}\n')
    out = tmp_path / "out"
    assert main(["generate", "--prompt-file", str(with_bom), "--model", "shapes-oracle", "--quiet",
                 "-o", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2]")
    assert main(["generate", "--prompt-file", str(numbers), "--model", "shapes-oracle", "-o",
                 str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "entry 1's prompt is int 1, not a string" in err[0]


def test_a_full_disk_is_one_line_and_leaves_no_empty_output_folder(tmp_path, capsys, monkeypatch):
    import errno

    import unipic.io_utils as io_utils

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_utils.os, "fsync", no_space)
    out = tmp_path / "new" / "folder"
    code = main(["generate", "--prompt-file", str(_prompts(tmp_path)), "--model", "shapes-oracle", "--quiet",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no space left" in err[0]
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == [tmp_path / "prompts.json"]
    single = tmp_path / "one" / "image.png"
    assert main(["generate", "a photo of a red circle", "--model", "shapes-oracle", "-o", str(single)]) == 2
    assert "no space left" in capsys.readouterr().err and not (tmp_path / "one").exists()


def _prompts(folder):
    path = folder / "prompts.json"
    path.write_text('["a photo of a red circle", "a photo of two stars"]')
    return path


@pytest.mark.slow
def test_ctrl_c_at_any_moment_of_start_up_is_one_line(tmp_path):
    """SIGINT at several moments of `python -m unipic generate` (imports, loading, drawing): each run
    ends with exit 130 and one line, never a traceback."""
    import signal
    import subprocess
    import sys
    import time

    for delay in (0.05, 0.3, 0.8, 1.5):
        process = subprocess.Popen([sys.executable, "-m", "unipic", "generate", "a photo of a red circle", "--quiet",
                                    "-o", str(tmp_path / f"{delay}.png")], stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        if process.returncode == 0:  # finished before the signal: nothing to check
            continue
        assert process.returncode == 130, (delay, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (delay, err)


def test_outputs_record_device_dtype_and_the_inpainting_steps_really_taken(tmp_path, capsys):
    """Device and dtype change pixels, so every output records them; inpainting caps --steps at each
    image's masked-token count, and the record says how many steps it really took."""
    import json

    from PIL import Image

    from unipic.io_utils import read_image_metadata

    drawn = tmp_path / "drawn.png"
    assert main(["generate", "a photo of a red circle", "--seed", "0", "--quiet", "-o", str(drawn)]) == 0
    settings = json.loads(read_image_metadata(drawn)["settings"])
    assert settings["device"] == "cpu" and settings["dtype"] == "float32"
    filled = tmp_path / "filled.png"
    assert main(["inpaint", str(drawn), "a photo of a red circle", "--box", "56,56,72,72", "--grow", "0",
                 "--steps", "8", "--seed", "0", "--quiet", "-o", str(filled)]) == 0, capsys.readouterr().err
    settings = json.loads(read_image_metadata(filled)["settings"])
    assert settings["steps"] == 8 and settings["steps_used"] == [4]  # a 16x16 box on the 16-px grid: 4 tokens
    assert Image.open(filled).size == (128, 128)


def test_a_size_too_small_for_the_models_steps_names_the_size(tmp_path, capsys):
    assert main(["generate", "a photo of a red circle", "--size", "16", "-o", str(tmp_path / "o.png")]) == 2
    line = _one_line(capsys)
    assert line.startswith("unipic generate: error: size 16x16 is too small") and "--size 32" in line
    # An explicit --steps that the size cannot hold is the steps' fault: that message names steps.
    assert main(["generate", "a photo of a red circle", "--size", "32", "--steps", "9", "-o",
                 str(tmp_path / "o.png")]) == 2
    assert "steps" in _one_line(capsys)


def test_fast_takes_an_explicit_interval_as_given(tmp_path):
    import json

    from unipic.io_utils import read_image_metadata

    out = tmp_path / "f.png"
    assert main(["generate", "a photo of a red circle", "--fast", "--uncond-interval", "1", "--head-anneal", "0.5",
                 "--quiet", "--seed", "0", "-o", str(out)]) == 0
    settings = json.loads(read_image_metadata(out)["settings"])
    assert settings["fast"] is True and settings["uncond_interval"] == 1 and settings["head_anneal"] == 0.5


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
