"""Every release layout loads offline (built from the tiny model), pickles are safe, conversion round-trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from unipic.api import UserError
from unipic.unipic3 import (
    convert_ema_to_safetensors,
    convert_release,
    inspect_folder,
    is_unipic3_folder,
    load_unipic3_pipeline,
)
from unipic.unipic3.loading import load_tensor_pickle

SHARED = ("scheduler", "vae", "text_encoder", "tokenizer", "processor")


def test_layouts_are_recognised_from_json_alone(layouts):
    assert inspect_folder(layouts["base"]).detected_variant() == "base"
    assert inspect_folder(layouts["dmd"]).detected_variant() == "dmd"
    assert inspect_folder(layouts["cm"]).detected_variant() == "cm"
    assert not is_unipic3_folder(layouts["root"])


@pytest.mark.parametrize("name", ["base", "dmd", "cm"])
def test_every_release_layout_loads_and_edits(layouts, tiny_folder, tiny_transformer_state, images_of, name):
    base = layouts["base"] if name == "cm" else None
    pipe = load_unipic3_pipeline(layouts[name], base=base)
    assert pipe.variant == name
    expected = tiny_transformer_state
    shift = {"base": 0.0, "dmd": 0.5, "cm": 0.25}[name]  # CM/DMD load the EMA weights by default (upstream)
    loaded = pipe.pipeline.transformer.state_dict()
    assert all(torch.allclose(loaded[k], v + shift) for k, v in expected.items())
    [out] = pipe.edit_image([images_of([(64, 64)])], ["make it red"], seed=0, steps=2, budget_area=64**2)
    assert out.size == (64, 64)


def test_ema_option_picks_the_transformer(layouts, tiny_folder, tiny_transformer_state):
    plain = load_unipic3_pipeline(layouts["dmd"], ema=False)
    key, value = next(iter(tiny_transformer_state.items()))
    assert torch.equal(plain.pipeline.transformer.state_dict()[key], value)
    with pytest.raises(UserError, match="no ema_transformer/"):
        load_unipic3_pipeline(layouts["base"], ema=True)


def test_cm_without_base_names_what_is_missing_in_one_line(layouts):
    with pytest.raises(UserError) as error:
        load_unipic3_pipeline(layouts["cm"])
    message = str(error.value)
    assert "\n" not in message and "vae/" in message and "text_encoder/" in message and "--base" in message


def test_bare_transformer_folder_asks_for_the_variant(layouts, tmp_path):
    shutil.copytree(layouts["cm"] / "transformer", tmp_path / "transformer")
    with pytest.raises(UserError, match="variant="):
        load_unipic3_pipeline(tmp_path, base=layouts["base"])
    assert load_unipic3_pipeline(tmp_path, base=layouts["base"], variant="dmd").variant == "dmd"


def test_pickle_holding_a_non_tensor_is_refused(tmp_path):
    class Payload:  # an arbitrary object: weights_only refuses to build it
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"weight": torch.zeros(2), "extra": Payload()}, tmp_path / "evil.bin")
    with pytest.raises(UserError, match="refused") as error:
        load_tensor_pickle(tmp_path / "evil.bin")
    assert "\n" not in str(error.value)
    torch.save({"weight": torch.zeros(2), "step": 3}, tmp_path / "mixed.bin")  # allowed by the unpickler, not by us
    with pytest.raises(UserError, match="holds a int at key 'step'"):
        load_tensor_pickle(tmp_path / "mixed.bin")
    assert set(load_tensor_pickle(_save(tmp_path / "ok.bin", {"w": torch.ones(1)}))) == {"w"}


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_ema_bin_converts_to_safetensors_and_the_release_to_a_described_folder(layouts, tmp_path):
    out = convert_ema_to_safetensors(layouts["dmd"] / "ema_transformer", tmp_path / "ema_st", max_shard_size="20KB")
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded at 20 KB
    converted = convert_release(layouts["cm"], tmp_path / "cm-converted", base=layouts["base"])
    settings = json.loads((converted / "unipic3.json").read_text())
    assert settings["variant"] == "cm" and settings["ema"] is False and Path(settings["base"]).is_dir()
    pipe = load_unipic3_pipeline(converted)  # no base, no variant: unipic3.json says both
    assert pipe.variant == "cm"
    reference = load_unipic3_pipeline(layouts["cm"], base=layouts["base"])
    for key, value in reference.pipeline.transformer.state_dict().items():
        assert torch.equal(pipe.pipeline.transformer.state_dict()[key], value), key


def test_load_pipeline_hook_and_builtin(layouts):
    from unipic.loading import BUILTIN_MODELS, load_pipeline

    assert "unipic3-tiny-random" in BUILTIN_MODELS
    assert load_pipeline("unipic3-tiny-random", device="cpu").family == "unipic3"
    assert load_pipeline(str(layouts["cm"]), device="cpu", base=str(layouts["base"]), variant="cm").variant == "cm"
    with pytest.raises(UserError, match="UniPic-3 models only"):
        load_pipeline(str(layouts["root"]), device="cpu", variant="cm")


def test_memory_options_refused_without_a_gpu(layouts):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only messages")
    with pytest.raises(UserError, match="needs device 'cuda'"):
        load_unipic3_pipeline(layouts["base"], cpu_offload="sequential")
    with pytest.raises(UserError, match="device_map='balanced'"):
        load_unipic3_pipeline(layouts["base"], device_map="balanced")
    with pytest.raises(UserError, match="only transformer, text_encoder"):
        load_unipic3_pipeline(layouts["base"], quantization_config={"vae": object()})
