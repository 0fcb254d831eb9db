"""`python -m unipic generate/edit/caption --model <tiny UniPic-2 folder>` end to end, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import unipic
from unipic.unipic2.tiny import random_image

pytest.importorskip("unipic.cli")  # the lead's CLI; skipped only while it does not exist


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    # Import the code under test (cwd is a temporary folder, so a relative PYTHONPATH would miss it).
    source = str(Path(unipic.__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": source + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "unipic", *args, "--device", "cpu"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def source_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "source.png"
    random_image(96, 64, mode="RGBA", seed=1).save(path)
    return path


@pytest.mark.slow  # end to end in a subprocess; the default tier keeps in-process coverage
def test_generate_with_kontext(kontext_folder, tmp_path):
    out = tmp_path / "cat.png"
    result = _run("generate", "a cat", "--model", str(kontext_folder), "-o", str(out), "--steps", "2", "--size", "64",
                  "--seed", "0", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.size == (64, 64)
        assert json.loads(image.text["settings"])["num_inference_steps"] == 2


@pytest.mark.slow  # end to end in a subprocess; the default tier keeps in-process coverage
def test_edit_with_kontext(kontext_folder, source_png, tmp_path):
    out = tmp_path / "red.png"
    result = _run("edit", str(source_png), "make it red", "--model", str(kontext_folder), "-o", str(out),
                  "--steps", "2", "--size", "64", "--seed", "0", "--input-resize", "crop", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.size == (64, 64)
        assert '"input_resize": "crop"' in image.text["settings"]


@pytest.mark.slow  # end to end in a subprocess; the default tier keeps in-process coverage
def test_caption_with_metaquery(mq_folder, source_png, tmp_path):
    result = _run("caption", str(source_png), "--model", str(mq_folder), "--max-new-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")  # random weights: any text, printed alone


# The remaining checks call the same entry point in-process (a subprocess costs ~8 s of imports).


def test_generate_with_metaquery_in_process(mq_folder, tmp_path, capsys):
    from unipic.cli import main

    out = tmp_path / "mq.png"
    code = main(["generate", "a cat", "--model", str(mq_folder), "-o", str(out), "--steps", "2", "--height", "64",
                 "--width", "32", "--seed", "0", "--quiet", "--device", "cpu"])
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (32, 64)


def test_caption_with_kontext_is_a_clear_error_in_process(kontext_folder, source_png, capsys):
    from unipic.cli import main

    code = main(["caption", str(source_png), "--model", str(kontext_folder), "--device", "cpu"])
    assert code == 2
    assert "MetaQuery" in capsys.readouterr().err
