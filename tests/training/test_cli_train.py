"""`unipic train`: one-line errors with exit code 2, --print-config, and a short run end to end."""

from __future__ import annotations

from pathlib import Path

import yaml

from unipic.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_unknown_key_is_a_one_line_error(capsys, tmp_path):
    assert main(["train", str(CONFIGS / "shapes" / "pretrain.yaml"), "optim.learning_rate=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("unipic train: error: unknown key(s) ['learning_rate'] in config.optim; valid keys:")
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_print_config_applies_overrides(capsys):
    assert main(["train", str(CONFIGS / "shapes" / "sft.yaml"), "optim.lr=2e-5", "data.tasks.edit=0",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["stage"] == "sft" and printed["optim"]["lr"] == 2e-5
    assert printed["data"]["tasks"] == {"t2i": 2, "i2t": 1, "edit": 0}


def test_train_command_runs_a_stage(tmp_path, capsys):
    from tiny_overrides import TINY

    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / "shapes" / "pretrain.yaml"), *TINY, f"out_dir={out}",
                 "train.max_steps=2"]) == 0
    assert (out / "final" / "config.json").is_file() and (out / "metrics.csv").is_file()
    assert main(["train", str(CONFIGS / "shapes" / "pretrain.yaml"), *TINY, f"out_dir={out}"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_a_run_can_switch_on_the_edit_extension_and_the_saved_model_keeps_it(tmp_path):
    import json

    from tiny_overrides import TINY

    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / "shapes" / "sft.yaml"), *TINY, f"out_dir={out}", "train.max_steps=1",
                 "data.tasks={edit: 1}", "model.edit_source_through_llm=true"]) == 0
    assert json.loads((out / "final" / "config.json").read_text())["edit_source_through_llm"] is True
    # null (the default) keeps the starting model's setting: a continuation stays switched on.
    assert main(["train", str(CONFIGS / "shapes" / "sft.yaml"), *TINY, f"out_dir={tmp_path / 'next'}",
                 f"model.init_from={out}", "train.max_steps=1", "data.tasks={edit: 1}"]) == 0
    assert json.loads((tmp_path / "next" / "final" / "config.json").read_text())["edit_source_through_llm"] is True


def test_train_shapes_script_passes_shared_and_per_stage_overrides(tmp_path) -> None:
    """scripts/train_shapes.sh: shared overrides reach every stage, STAGE_ARGS_<stage> only its own,
    and finished stages are skipped."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(Path(__file__).parents[2] / "scripts" / "train_shapes.sh", root / "scripts")
    (root / "runs" / "shapes" / "vae").mkdir(parents=True)
    (root / "runs" / "shapes" / "vae" / "vae.safetensors").write_bytes(b"")
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "STAGE_ARGS_understand": "loss.a=1  loss.b=2"}
    done = subprocess.run(["bash", str(root / "scripts" / "train_shapes.sh"), "--resume", "train.num_threads=2"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    assert [line.split()[4] for line in lines] == [f"configs/shapes/{s}.yaml" for s in
                                                  ("pretrain", "align", "joint", "understand", "sft", "answers", "remix")]
    for line in lines:
        assert line.startswith("-m unipic train --resume ") and "log.progress=false train.num_threads=2" in line
        assert line.endswith("train.num_threads=2 loss.a=1 loss.b=2") == ("understand" in line)
