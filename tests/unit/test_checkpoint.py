"""Exact checkpoint compatibility: manifest equality, strict loading, safe unpickling, conversion."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import unipic
from unipic.cli import main
from unipic.unipic1.checkpoint import (
    CheckpointError,
    build_model,
    load_model_folder,
    load_state_dict_strict,
    read_model_folder_tensors,
    read_tensor_file,
    save_model_folder,
)
from unipic.unipic1.models.presets import get_preset, unipic1_tiny

DATA = Path(__file__).parent / "data"


def test_state_dict_command_equals_official_manifest(capsys):
    assert main(["state-dict", "--preset", "unipic1-1.5b"]) == 0
    printed = capsys.readouterr().out.splitlines()
    manifest = (DATA / "unipic1_state_dict.tsv").read_text().splitlines()
    assert len(printed) == len(manifest) == 1715
    assert set(printed) == set(manifest)


def _outputs(pipeline):
    [[image]] = pipeline.text_to_image(["a red circle"], seed=7)
    [answer] = pipeline.image_to_text([image], ["Describe the image."], max_new_tokens=4)
    return np.asarray(image), answer


def test_save_then_load_is_bit_exact(tiny_pipeline, tiny_model_folder):
    from unipic.unipic1.pipeline import UniPicPipeline

    model, tokenizer = load_model_folder(tiny_model_folder)
    reloaded = UniPicPipeline(model, tokenizer)
    image_a, answer_a = _outputs(tiny_pipeline)
    image_b, answer_b = _outputs(reloaded)
    assert np.array_equal(image_a, image_b)
    assert answer_a == answer_b
    for name, tensor in tiny_pipeline.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight, "embeddings must stay tied"


def test_sharded_save_round_trips(tmp_path, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    save_model_folder(model, tokenizer, tmp_path, max_shard_bytes=4 * 1024**2)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    loaded, _ = load_model_folder(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_mis_shaped_and_missing_tensors_are_named(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    state = dict(model.state_dict())
    state["mar.z_proj.weight"] = torch.zeros(3, 3)
    target = build_model(unipic1_tiny(), empty=True)
    with pytest.raises(CheckpointError, match=r"mar\.z_proj\.weight: checkpoint \[3, 3\]"):
        load_state_dict_strict(target, state, assign=True)
    state = dict(model.state_dict())
    del state["proj_out.2.bias"]
    state["mar.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): proj_out\.2\.bias.*unexpected tensor\(s\): mar\.extra"):
        load_state_dict_strict(target, state, assign=True)


class _Payload:
    """Unpickling this object would run a shell command."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_payload_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="refusing to load evil.bin"):
        read_tensor_file(path)
    torch.save({"weight": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing"):
        read_tensor_file(tmp_path / "evil.pt")


def test_plain_tensor_pickle_loads(tmp_path):
    torch.save({"model": {"a": torch.ones(2)}}, tmp_path / "ok.ckpt")
    assert torch.equal(read_tensor_file(tmp_path / "ok.ckpt")["a"], torch.ones(2))


def _fake_release(tmp_path, model, tokenizer):
    """Files shaped like the official release, for the tiny layout."""
    from transformers import Qwen2Config

    state = {k: v.clone() for k, v in model.state_dict().items()}
    vae = {k[len("vae."):]: state.pop(k) for k in list(state) if k.startswith("vae.")}
    vae["loss.discriminator.weight"] = torch.zeros(1)  # LDM training leftovers are ignored
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch.save({"model": vae}, tmp_path / "kl16.ckpt")
    llm = tmp_path / "Qwen-tiny"
    Qwen2Config(**{k: getattr(model.config.llm, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps")}).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    return tmp_path / "pytorch_model.bin", tmp_path / "kl16.ckpt", llm


def test_convert_official_layout(tmp_path, tiny_pipeline, capsys):
    from unipic.unipic1.pipeline import UniPicPipeline

    model, tokenizer = tiny_pipeline.model, tiny_pipeline.tokenizer
    checkpoint, vae, llm = _fake_release(tmp_path, model, tokenizer)
    out = tmp_path / "converted"
    code = main(["convert", "--checkpoint", str(checkpoint), "--llm", str(llm), "--vae", str(vae), "--out", str(out),
                 "--preset", "unipic1-tiny", "--save-dtype", "float32"])
    assert code == 0
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "unipic1"
    assert written["sampling"] == get_preset("unipic1-tiny").to_dict()["sampling"]  # the preset's defaults
    converted, converted_tok = load_model_folder(out)
    assert np.array_equal(_outputs(tiny_pipeline)[0], _outputs(UniPicPipeline(converted, converted_tok))[0])
    # Without the VAE file the converter says what to pass.
    assert main(["convert", "--checkpoint", str(checkpoint), "--llm", str(llm), "--out", str(tmp_path / "x"),
                 "--preset", "unipic1-tiny"]) == 2
    assert "--vae" in capsys.readouterr().err


def test_official_preset_carries_upstream_defaults():
    # Upstream's scripts answer at 1024 px with up to 1024 new tokens; `unipic convert` writes the
    # preset's sampling block (checked above), so converted official folders carry these too.
    sampling = get_preset("unipic1-1.5b").sampling
    assert (sampling.understanding_image_size, sampling.max_new_tokens) == (1024, 1024)
    assert (sampling.image_size, sampling.num_iter, sampling.cfg) == (1024, 32, 3.0)
    # The embedded model keeps its own settings.
    embedded = json.loads((Path(unipic.__file__).parent / "assets/default_model/config.json").read_text())
    assert (embedded["sampling"]["understanding_image_size"], embedded["sampling"]["max_new_tokens"]) == (128, 48)


def test_folder_files_are_safetensors_only(tiny_model_folder):
    names = sorted(p.name for p in Path(tiny_model_folder).iterdir())
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".ckpt")) for n in names)
    assert "llm.lm_head.weight" not in read_model_folder_tensors(tiny_model_folder), "tied weight stored once"
