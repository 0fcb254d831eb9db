"""Every stage runs a few steps on the tiny preset: finite losses, frozen parts unchanged, trained
parts changed, and each stage starts from the previous one's output (VAE → pretrain → align →
joint → understand → sft → answers → remix), as in configs/shapes/."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unipic.training.build import init_model, load_vae_file
from unipic.training.trainer import latest_checkpoint, train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "shapes"


def _checkpoint_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    """Raw (non-EMA) weights of the newest checkpoint."""
    return load_file(str(latest_checkpoint(out_dir) / "model" / "model.safetensors"))


def _final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "final" / "model.safetensors"))


def _changed(before: dict, after: dict, prefix: str) -> tuple[bool, bool]:
    """(any tensor under prefix changed, every tensor under prefix equal)."""
    names = [n for n in before if n.startswith(prefix)]
    assert names, prefix
    equal = [torch.equal(before[n], after[n]) for n in names]
    return not all(equal), all(equal)


def _losses_finite(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    for row in rows:
        for key, value in row.items():
            if key.startswith("loss") and value:
                assert math.isfinite(float(value)), (key, value)
    return rows


def _assert_generates(model_dir: Path, tmp_path: Path) -> None:
    """`unipic generate` loads the stage's output and writes an image."""
    from unipic.cli import main

    assert main(["generate", "a photo of a star", "--model", str(model_dir), "--size", "64", "--steps", "2",
                 "--head-steps", "2", "--seed", "0", "-o", str(tmp_path / "star.png"), "--quiet"]) == 0
    assert (tmp_path / "star.png").is_file()


def _initial(config) -> dict[str, torch.Tensor]:
    model, _ = init_model(config.model, config.seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


def _config(runs: Path, name: str, *overrides: str):
    from tiny_overrides import TINY

    from unipic.training.config import load_config

    return load_config(CONFIGS / f"{name}.yaml", [*TINY, f"out_dir={runs / name}", *overrides])


def test_vae_stage_trains_the_autoencoder_and_rescales_latents(runs):
    from unipic.training.build import init_vae

    config = _config(runs, "vae", "optim.ema_decay=0", "data.tasks={t2i: 1, edit: 1}", "train.max_steps=2",
                     "data.vae_crop=32", "loss.vae_foreground=10")
    before = {k: v.clone() for k, v in init_vae(config.model, config.seed).state_dict().items()}
    result = train(config)
    assert result.finished and result.output == runs / "vae" / "vae.safetensors"
    vae_config, after = load_vae_file(result.output)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert math.isfinite(vae_config.scale) and vae_config.scale > 0 and vae_config.scale != 0.2325
    rows = _losses_finite(runs / "vae")
    assert {"loss_l1", "loss_l2", "loss_kl"} <= set(rows[0])


def test_pretrain_stage_trains_generation_with_the_new_vae(runs):
    config = _config(runs, "pretrain", f"model.init_vae_from={runs / 'vae'}")
    before = _initial(config)
    result = train(config)
    assert result.finished
    after = _checkpoint_weights(runs / "pretrain")
    assert _changed(before, after, "vae.")[1], "the VAE is frozen"
    for prefix in ("llm.model.layers", "mar.encoder_blocks", "mar.decoder_blocks", "mar.diffloss", "proj_in",
                   "proj_out"):
        assert _changed(before, after, prefix)[0], prefix
    vae_config, vae_state = load_vae_file(runs / "vae")
    assert all(torch.equal(after[f"vae.{k}"], v) for k, v in vae_state.items())
    from unipic.unipic1.models.config import UniPicConfig

    saved = UniPicConfig.load(runs / "pretrain" / "final" / "config.json")
    assert saved.vae.scale == vae_config.scale  # the VAE's latent scale travels with the model
    rows = _losses_finite(runs / "pretrain")
    assert [c for c in rows[0] if c.startswith("loss_")] == ["loss_t2i"]


def test_align_stage_keeps_the_llm_frozen(runs):
    config = _config(runs, "align", f"model.init_from={runs / 'pretrain'}")
    before = _final_weights(runs / "pretrain")
    result = train(config)
    assert result.finished
    after = _checkpoint_weights(runs / "align")
    assert _changed(before, after, "llm.")[1], "the LLM is frozen in alignment"
    assert _changed(before, after, "vae.")[1]
    for prefix in ("mar.encoder_blocks", "proj_in", "proj_out"):
        assert _changed(before, after, prefix)[0], prefix
    _losses_finite(runs / "align")


def test_joint_stage_trains_all_tasks_with_samples_and_scores(runs):
    config = _config(runs, "joint", f"model.init_from={runs / 'align'}", "train.max_steps=4", "log.sample_every=4",
                     "log.eval_every=4", "log.eval_per_kind=1", "log.sample_steps=2", "log.sample_head_steps=2",
                     "log.sample_prompts=[a photo of a circle, a photo of a red square]", "log.plot_every=4")
    # stage 5's editing levers, questions and losses start here (twentieth session)
    assert config.model.edit_source_through_llm and config.model.edit_keep_mask
    assert config.data.i2t_questions == 8 and config.data.edit_placement == "fixed"
    assert config.loss.attend_named > 0 and config.loss.edit_region_at == "source"
    before = _final_weights(runs / "align")
    result = train(config)
    assert result.finished
    after = _checkpoint_weights(runs / "joint")
    assert _changed(before, after, "vae.")[1]
    for prefix in ("llm.model.layers", "mar.encoder_blocks", "mar.decoder_blocks", "proj_in", "proj_out"):
        assert _changed(before, after, prefix)[0], prefix
    rows = _losses_finite(runs / "joint")
    seen = {k for r in rows for k, v in r.items() if k.startswith("loss_") and v}
    # round robin t2i, t2i, i2t, edit, with the run file's read-outs, attention loss and keep head
    assert seen == {"loss_t2i", "loss_i2t", "loss_edit", "loss_readout", "loss_attend", "loss_edit_region",
                    "loss_edit_keep"}
    scores = [r for r in rows if r["eval_t2i"]]
    assert scores and all(0.0 <= float(scores[-1][f"eval_{t}"]) <= 1.0 for t in ("t2i", "i2t", "edit"))
    out = runs / "joint"
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "samples" / "step-0000004.png").is_file() and (out / "samples" / "step-0000004.json").is_file()


def test_understand_stage_weights_answers_and_edits(runs):
    config = _config(runs, "understand", f"model.init_from={runs / 'joint'}", "train.max_steps=6")
    assert config.data.tasks == {"t2i": 2, "i2t": 2, "edit": 2}  # edits get a third, as answers do
    assert config.model.freeze_llm is False and config.loss.object_readout > 0
    assert config.model.edit_source_through_llm and config.model.edit_keep_mask
    assert config.data.edit_placement == "fixed" and config.loss.edit_region_at == "source"
    before = _final_weights(runs / "joint")
    result = train(config)
    assert result.finished
    after = _checkpoint_weights(runs / "understand")
    assert _changed(before, after, "vae.")[1]
    assert _changed(before, after, "llm.model.layers")[0]
    rows = _losses_finite(runs / "understand")
    assert any(r.get("loss_i2t") for r in rows) and any(r.get("loss_edit_keep") for r in rows)


def test_sft_stage_output_loads_for_generation(runs, tmp_path):
    config = _config(runs, "sft", f"model.init_from={runs / 'understand'}", "train.max_steps=2")
    result = train(config)
    assert result.finished
    _assert_generates(runs / "sft" / "final", tmp_path)


def test_answers_stage_trains_answers_alone(runs):
    config = _config(runs, "answers", f"model.init_from={runs / 'sft'}", "train.max_steps=2")
    assert config.data.tasks == {"i2t": 1}  # the burst (twenty-first session)
    assert config.optim.schedule == "constant" and config.optim.ema_decay == 0
    before = _final_weights(runs / "sft")
    assert train(config).finished
    after = _final_weights(runs / "answers")
    assert _changed(before, after, "vae.")[1]
    assert _changed(before, after, "llm.model.layers")[0]
    rows = _losses_finite(runs / "answers")
    assert any(r.get("loss_i2t") for r in rows) and not any(r.get("loss_t2i") for r in rows)


def test_remix_stage_output_loads_for_generation(runs, tmp_path):
    config = _config(runs, "remix", f"model.init_from={runs / 'answers'}", "train.max_steps=5")
    assert config.data.tasks == {"t2i": 2, "i2t": 1, "edit": 2}
    before = _final_weights(runs / "answers")
    assert train(config).finished
    assert _changed(before, _final_weights(runs / "remix"), "mar.diffloss")[0]  # drawing trains again
    rows = _losses_finite(runs / "remix")
    assert all(any(r.get(f"loss_{task}") for r in rows) for task in ("t2i", "i2t", "edit"))
    _assert_generates(runs / "remix" / "final", tmp_path)


def test_freeze_mar_decoder_and_freeze_mar(tmp_path):
    from tiny_overrides import TINY

    from unipic.training.build import MAR_DECODER_PARTS
    from unipic.training.config import load_config

    config = load_config(CONFIGS / "joint.yaml", [*TINY, f"out_dir={tmp_path / 'a'}", "model.freeze_mar_decoder=true",
                                                 "data.tasks={t2i: 1}"])
    before = _initial(config)
    train(config)
    after = _checkpoint_weights(tmp_path / "a")
    for part in MAR_DECODER_PARTS:
        assert _changed(before, after, f"mar.{part}")[1], part
    assert _changed(before, after, "mar.encoder_blocks")[0]
    assert _changed(before, after, "mar.diffloss")[0], "the head is not part of the decoder freeze"

    config = load_config(CONFIGS / "joint.yaml", [*TINY, f"out_dir={tmp_path / 'b'}", "model.freeze_mar=true",
                                                 "data.tasks={i2t: 1}"])
    before = _initial(config)
    train(config)
    after = _checkpoint_weights(tmp_path / "b")
    assert _changed(before, after, "mar.")[1]
    assert _changed(before, after, "llm.model.layers")[0] and _changed(before, after, "proj_in")[0]


def test_bf16_mixed_precision_and_accumulation(tmp_path):
    from tiny_overrides import TINY

    from unipic.training.config import load_config

    config = load_config(CONFIGS / "joint.yaml", [*TINY, f"out_dir={tmp_path}", "train.mixed_precision=bf16",
                                                 "train.grad_accum=2", "train.max_steps=2"])
    result = train(config)
    assert result.finished
    rows = _losses_finite(tmp_path)
    assert float(rows[-1]["examples_per_s"]) > 0
    assert all(v.dtype == torch.float32 for v in _final_weights(tmp_path).values())  # weights stay float32
