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
