"""Start-up (issue 40): help and usage errors import no torch; drawing with the default model imports no
transformers, scipy or torch._dynamo. Checked on `sys.modules` of fresh processes, never on timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
PROBE = """
import json, sys
sys.argv = ["unipic"] + sys.argv[1:]
try:
    from unipic.cli import main
    rc = main()
except SystemExit as exit_:
    rc = exit_.code
heavy = ("torch", "transformers", "diffusers", "scipy", "torch._dynamo")
print(json.dumps({"rc": rc, "loaded": [m for m in heavy if m in sys.modules]}), file=sys.stderr)
"""


def _modules_after(*argv: str, cwd: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
    return json.loads(done.stderr.strip().splitlines()[-1])


COMMANDS = ("generate", "edit", "inpaint", "outpaint", "caption", "state-dict", "convert", "eval", "data", "train",
            "serve")


@pytest.mark.parametrize("argv", [("--help",), *((c, "--help") for c in COMMANDS)])
def test_help_imports_no_torch(argv: tuple[str, ...]) -> None:
    result = _modules_after(*argv)
    assert result["rc"] == 0 and result["loaded"] == [], result


@pytest.mark.parametrize("argv", [("generate",), ("generate", "a star", "--size", "17"),
                                  ("generate", "a star", "--steps", "0"), ("edit", "no-such-file.png", "make it red"),
                                  ("generate", "a star", "--seed", "-1")])
def test_usage_errors_are_caught_before_torch(argv: tuple[str, ...]) -> None:
    result = _modules_after(*argv)
    assert result["rc"] == 2 and result["loaded"] == [], result


def test_drawing_with_the_default_model_imports_no_transformers(tmp_path: Path) -> None:
    result = _modules_after("generate", "a red circle", "-o", str(tmp_path / "out.png"), "--seed", "0", "--quiet")
    assert result["rc"] == 0 and (tmp_path / "out.png").is_file()
    assert result["loaded"] == ["torch"], result


def test_library_progress_bars_are_hidden_when_the_libraries_load_later() -> None:
    code = ("from unipic.cli import _quiet_library_progress_bars\n_quiet_library_progress_bars()\n"
            "import transformers.utils.logging as t, huggingface_hub.utils as h\n"
            "print(t._tqdm_active, h.are_progress_bars_disabled())")
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "True"]
