"""CLI smoke tests for every subcommand and every user error (one line on stderr, exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import unipic
from unipic.cli import main

TINY = ["--model", "tiny-random", "--steps", "2", "--head-steps", "3", "--quiet"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # The subprocess imports the code under test, whatever unipic the environment has installed.
    source = str(Path(unipic.__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=source + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "unipic", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.mark.slow  # end to end in a subprocess; the default tier keeps in-process coverage
def test_generate_subprocess_writes_png_with_metadata(tmp_path):
    out = tmp_path / "out.png"
    result = _run("generate", "a photo of a red circle", "-o", str(out), "--seed", "4", "--size", "64", *TINY)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "no warnings (e.g. transformers' past_key_values FutureWarning)"
    assert result.stdout.strip() == str(out)
    with Image.open(out) as image:
        assert image.size == (64, 64)
        assert image.text["prompt"] == "a photo of a red circle"
        assert image.text["seed"] == "4"
        settings = json.loads(image.text["settings"])
        assert "num_iter" not in settings and settings["steps"] == 2 and settings["height"] == 64
    assert not list(tmp_path.glob(".*tmp")), "no temporary files left behind"


def test_generate_several_images_and_non_square(tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "a star", "-o", str(out), "-n", "2", "--height", "32", "--width", "64", *TINY]) == 0
    for k in range(2):
        with Image.open(tmp_path / f"x-{k}.png") as image:
            assert image.size == (64, 32)


def test_edit_and_caption(tmp_path, capsys):
    source = tmp_path / "src.png"
    Image.new("LA", (100, 60), (90, 255)).save(source)
    out = tmp_path / "edited.png"
    assert main(["edit", str(source), "Remove the star.", "-o", str(out), "--seed", "1", *TINY]) == 0
    with Image.open(out) as image:
        assert image.size == (160, 96) and image.text["instruction"] == "Remove the star."
    capsys.readouterr()
    assert main(["caption", str(out), "--prompt", "How many stars are there?", "--model", "tiny-random",
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and printed.count("\n") == 1, "the answer alone on one line"


def test_batch_generation_from_json_and_jsonl_is_resumable(tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "a red circle"}, {"prompt": "a blue star"}]))
    out = tmp_path / "outdir"
    assert main(["generate", "--prompt-file", str(prompts), "-o", str(out), "--size", "32", *TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png"]
    stamp = (out / "00000.png").stat().st_mtime_ns
    assert main(["generate", "--prompt-file", str(prompts), "-o", str(out), "--size", "32", *TINY]) == 0
    assert (out / "00000.png").stat().st_mtime_ns == stamp, "finished prompts are skipped"
    assert "already made by this request" in capsys.readouterr().out
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a square"}\n\n{"prompt": "a cross"}\n')
    assert main(["generate", "--prompt-file", str(jsonl), "-o", str(tmp_path / "o2"), "--size", "32", *TINY]) == 0
    assert len(list((tmp_path / "o2").glob("*.png"))) == 2


def _not_an_image(tmp_path: Path) -> str:
    path = tmp_path / "fake.png"
    path.write_text("hello")
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (lambda t: ["edit", str(t / "missing.png"), "x", "-o", str(t / "o.png")], "image not found"),
        (lambda t: ["edit", _not_an_image(t), "x", "-o", str(t / "o.png")], "not a readable image"),
        (lambda t: ["caption", _not_an_image(t)], "not a readable image"),
        (lambda t: ["generate", "  ", "-o", str(t / "o.png")], "prompt is empty"),
        (lambda t: ["generate", "a cat", "--size", "100", "-o", str(t / "o.png"), "--model", "tiny-random"],
         "multiple of 16"),
        (lambda t: ["generate", "a cat", "--model", str(t / "nope"), "-o", str(t / "o.png")], "no such folder"),
        (lambda t: ["generate", "a cat", "--model", "someone/some-model", "-o", str(t / "o.png")], "unreachable"),
        (lambda t: ["generate", "a cat", "-o", str(t / "o.txt")], "end"),
        (lambda t: ["generate", "--prompt-file", str(t / "none.json"), "-o", str(t)], "none.json: file not found"),
        (lambda t: ["state-dict", "--preset", "huge"], "unknown preset"),
        (lambda t: ["generate", "a cat", "--steps", "x"], "invalid int value"),
        (lambda t: ["edit", str(t / "missing.png"), " ", "-o", str(t / "o.png")], "instruction is empty"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if "invalid int" in message else _nullcontext() as raised:
        code = main(argv(tmp_path))
    if raised is not None and hasattr(raised, "value"):
        code = raised.value.code
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert "Traceback" not in captured.err


class _nullcontext:
    value = None

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.slow  # end to end in a subprocess; the default tier keeps in-process coverage
def test_unknown_model_subprocess_has_no_traceback(tmp_path):
    result = _run("generate", "a cat", "--model", "not/a-real-model", "-o", str(tmp_path / "o.png"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_every_subcommand_has_help(capsys):
    for command in ("generate", "edit", "caption", "state-dict", "convert"):
        with pytest.raises(SystemExit) as raised:
            main([command, "--help"])
        assert raised.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_outputs_get_ordinary_file_permissions(tmp_path):
    import stat

    from unipic.io_utils import atomic_write_text

    path = atomic_write_text(tmp_path / "x.txt", "hi")
    mode = stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
