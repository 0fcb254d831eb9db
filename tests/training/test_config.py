"""Run files: every YAML opens with its command and loads; unknown keys and bad values are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from unipic.api import UserError
from unipic.training.config import STAGES, TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_FILES = sorted(CONFIGS.rglob("*.yaml"))


def test_there_is_a_run_file_per_stage():
    names = {p.relative_to(CONFIGS).as_posix() for p in RUN_FILES}
    for stage in ("vae", "pretrain", "align", "joint", "sft"):
        assert f"shapes/{stage}.yaml" in names
        assert f"unipic1/{stage}.yaml" in names


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_run_file_opens_with_its_command_and_loads(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# unipic train configs/{path.relative_to(CONFIGS).as_posix()}", first
    config = load_config(path)
    # A file named after a stage runs that stage; an extra step of the recipe (shapes/understand) names its own.
    assert config.stage == path.stem if path.stem in STAGES else config.stage in STAGES
    if config.stage != "vae":
        assert config.model.freeze_vae


def test_unknown_key_lists_the_valid_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: pretrain\noptim:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(UserError) as error:
        load_config(path)
    message = str(error.value)
    assert "learning_rate" in message and "config.optim" in message
    for valid in ("lr", "betas", "eps", "weight_decay", "ema_decay"):
        assert valid in message


def test_unknown_top_level_key_and_override(tmp_path):
    with pytest.raises(UserError, match=r"unknown key\(s\) \['epochs'\] in config; valid keys: \[.*'train'"):
        load_config(None, ["epochs=3"])
    with pytest.raises(UserError, match="unknown key"):
        load_config(None, ["train.max_step=3"])


def test_overrides_nested_with_dots_and_typed():
    config = load_config(CONFIGS / "shapes" / "joint.yaml",
                         ["optim.lr=1e-4", "data.tasks.edit=3", "optim.betas=[0.8, 0.9]", "train.max_steps=7",
                          "model.freeze_llm=true", "loss.weights.i2t=0.01", "log.sample_prompts=[a photo of a star]"])
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)  # YAML 1.1 reads '1e-4' as a string
    assert config.data.tasks == {"t2i": 2, "i2t": 1, "edit": 3}
    assert config.optim.betas == (0.8, 0.9)
    assert config.train.max_steps == 7 and config.model.freeze_llm is True
    assert config.loss.weights["i2t"] == 0.01
    assert config.log.sample_prompts == ["a photo of a star"]
    assert config.optim.eps == 1e-15  # from the file


def test_a_mapping_override_in_json_form_needs_no_spaces():
    """STAGE_ARGS_<stage> of scripts/train_shapes.sh splits on spaces, so a whole mapping goes as JSON."""
    config = load_config(CONFIGS / "shapes" / "understand.yaml", ['data.tasks={"t2i":2,"i2t":2,"edit":2}'])
    assert config.data.tasks == {"t2i": 2, "i2t": 2, "edit": 2}


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=abc", "must be a number"),
    ("train.max_steps=1.5", "must be an integer"),
    ("stage=finetune", "stage='finetune' must be one of"),
    ("data.tasks.video=1", "unknown task"),
    ("data.image_size=100", "multiple of 16"),
    ("model.freeze_vae=false", "only allowed in stage vae"),
    ("optim.ema_decay=1.0", "ema_decay"),
    ("data.source=folder", "data.folders.t2i"),
    ("data.source=folder data.folders.t2i=x data.i2t_questions=2", "data.i2t_questions=2 needs data.source=world"),
    ("data.source=folder data.folders.t2i=x loss.attend_named=1", "loss.attend_named=1.0 needs data.source=world"),
    ("data.source=folder data.folders.t2i=x loss.attend_edit=1", "loss.attend_edit=1.0 needs data.source=world"),
    ("data.source=folder data.folders.t2i=x loss.object_readout=1", "loss.object_readout=1.0 needs"),
    ("data.source=folder data.folders.t2i=x loss.relation_readout=1", "loss.relation_readout=1.0 needs"),
    ("data.i2t_kinds=[colour]", "data.i2t_kinds: unknown kind"),
    ("data.edit_kinds=[recolour]", "data.edit_kinds: unknown kind"),
    ("loss.attend_edit=-1", "loss.attend_edit must be >= 0"),
    ("loss.edit_region_readout=-0.5", "loss.edit_region_readout must be >= 0"),
    ("loss.edit_changed_weight=-4", "loss.edit_changed_weight must be >= 0"),
    ("loss.edit_keep=-1", "loss.edit_keep must be >= 0"),
    ("loss.edit_region_at=llm", "loss.edit_region_at must be 'decoder' or 'source'"),
    ("loss.object_readout_cells=all", "loss.object_readout_cells must be 'centre' or 'covered'"),
    ("data.source=folder data.folders.t2i=x data.edit_kinds=[add]", "data.edit_kinds=['add'] needs data.source=world"),
    ("noequals", "key=value"),
])
def test_bad_values_are_user_errors(override, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, ["stage=pretrain", *override.split()])


def test_defaults_are_the_paper_optimiser():
    config = TrainConfig()
    assert config.optim.betas == (0.9, 0.95) and config.optim.eps == 1e-15 and config.optim.grad_clip == 1.0
    assert config.loss.weights == {"t2i": 1.0, "i2t": 0.01, "edit": 1.0} and config.loss.grad_scale == 0.1


def test_yaml_dump_reloads_to_the_same_config(tmp_path):
    config = load_config(CONFIGS / "shapes" / "joint.yaml")
    path = tmp_path / "dump.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_architecture_overrides_change_the_preset():
    from unipic.api import UserError
    from unipic.training.build import preset_config

    assert (preset_config("shapes-embedded", None).vae.stride, preset_config("shapes-embedded", None).token_dim) == (8, 16)
    # Back to the released KL-16 layout (16 channels at stride 16, one latent per token).
    config = preset_config("shapes-embedded", None, {"vae": {"embed_dim": 16, "ch_mult": [2, 3, 4]},
                                                     "mar": {"patch_size": 1}})
    assert (config.vae.stride, config.token_dim, config.pixel_stride) == (16, 16, 16)
    with pytest.raises(UserError, match="unknown key 'depth'"):
        preset_config("shapes-embedded", None, {"vae": {"depth": 3}})
    with pytest.raises(UserError, match="unknown key 'vae_stride'"):
        preset_config("shapes-embedded", None, {"mar": {"vae_stride": 16}})  # the stride follows from the VAE


def test_the_saved_model_sampling_settings_are_explicit():
    """Training no longer overwrites the model's sampling settings behind the run's back."""
    config = load_config(None, ["stage=pretrain", "data.image_size=64", "model.sampling.num_iter=2"])
    assert config.model.sampling == {"image_size": 64, "understanding_image_size": 64, "num_iter": 2}
    assert "understanding_image_size: 64" in config.to_yaml()  # what --print-config shows and config.yaml keeps
    assert load_config(None, ["model.sampling.image_size=256"]).model.sampling["image_size"] == 256
    with pytest.raises(UserError, match="unknown key.*steps"):
        load_config(None, ["model.sampling.steps=3"])


def test_the_job_writes_the_run_sampling_settings_into_the_model():
    from tiny_overrides import TINY

    from unipic.training.jobs import UniPicJob

    config = load_config(None, [*TINY, "model.sampling.num_iter=2", "model.sampling.cfg=1.5"])
    sampling = UniPicJob(config, None).model.config.sampling
    assert (sampling.image_size, sampling.understanding_image_size, sampling.num_iter, sampling.cfg) == (64, 64, 2, 1.5)
    with pytest.raises(UserError, match="model.sampling.*multiple of 16"):
        UniPicJob(load_config(None, [*TINY, "model.sampling.image_size=72"]), None)
