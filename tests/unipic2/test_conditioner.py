"""StableDiffusion3Conditioner: upstream tensor list loads strictly; connector == SiglipEncoder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from unipic.unipic2.conditioner import StableDiffusion3Conditioner
from unipic.unipic2.memory import METAQUERY_CONDITIONER
from unipic.unipic2.tiny import TINY_CONFIG, build_tiny_conditioner

TSV = Path(__file__).parent / "data" / "unipic2_conditioner_state_dict.tsv"


def _upstream_tensor_list() -> list[tuple[str, tuple[int, ...]]]:
    rows = TSV.read_text().strip().splitlines()[1:]  # header: name<TAB>shape
    return [(name, tuple(int(d) for d in shape.strip("()").split(",") if d.strip())) for name, shape in
            (row.split("\t") for row in rows)]


def test_full_size_tensor_list_matches_upstream_exactly():
    """Built on the meta device from upstream's config (incl. its flash_attention_2 setting)."""
    config = copy.deepcopy(METAQUERY_CONDITIONER)
    config["connector_config"].update(
        num_attention_heads=24, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        _attn_implementation="flash_attention_2",
    )
    with torch.device("meta"):
        model = StableDiffusion3Conditioner(**config)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    upstream = dict(_upstream_tensor_list())
    assert len(upstream) == 391
    assert sorted(set(ours) - set(upstream)) == [] and sorted(set(upstream) - set(ours)) == []
    assert ours == upstream  # same names and shapes (order within a layer is transformers')
    assert sum(p.numel() for p in model.parameters()) == 903_509_504
    assert sum(p.numel() for p in model.connector.parameters()) == 887_642_112


def test_strict_load_and_save_round_trip(tmp_path):
    model = build_tiny_conditioner(seed=3)
    model.save_pretrained(tmp_path)
    loaded = StableDiffusion3Conditioner.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.config["connector_config"] == model.config["connector_config"]
    # Strict: an unexpected or a missing key fails instead of being silently ignored (upstream used strict=False).
    state = dict(model.state_dict())
    state["connector.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        loaded.load_state_dict(state, strict=True)
    state.pop("connector.extra.weight")
    state.pop("projector_3.bias")
    with pytest.raises(RuntimeError, match="Missing key"):
        loaded.load_state_dict(state, strict=True)


def test_connector_is_a_siglip_encoder_and_outputs_follow_the_spec():
    model = build_tiny_conditioner(seed=1)
    cfg = TINY_CONFIG["metaquery"]["conditioner"]
    siglip_config = SiglipVisionConfig(**cfg["connector_config"])
    siglip_config._attn_implementation = "eager"
    encoder = SiglipEncoder(siglip_config).eval()
    encoder.load_state_dict({k[len("connector."):]: v for k, v in model.state_dict().items() if k.startswith("connector.")},
                            strict=True)
    states = torch.randn(2, cfg["num_queries"], cfg["llm_hidden_size"])
    with torch.no_grad():
        prompt_embeds, pooled = model(states)
        x = encoder(inputs_embeds=model.projector_1(states)).last_hidden_state  # no mask, no final LayerNorm
        expected_seq, expected_pooled = model.projector_3(x), model.projector_2(x.mean(dim=1))
    assert prompt_embeds.shape == (2, cfg["num_queries"], cfg["joint_attention_dim"])
    assert pooled.shape == (2, cfg["pooled_projection_dim"])
    assert (prompt_embeds - expected_seq).abs().max() < 1e-5
    assert (pooled - expected_pooled).abs().max() < 1e-5


def test_upstream_flash_attention_setting_is_overridden_on_cpu():
    cfg = copy.deepcopy(TINY_CONFIG["metaquery"]["conditioner"])
    cfg["connector_config"]["_attn_implementation"] = "flash_attention_2"  # what upstream's conversion writes
    torch.manual_seed(0)
    model = StableDiffusion3Conditioner(**cfg).eval()
    states = torch.randn(1, cfg["num_queries"], cfg["llm_hidden_size"])
    with torch.no_grad():
        sdpa = model(states)[0]
        model.set_attn_implementation("eager")
        eager = model(states)[0]
    assert torch.allclose(sdpa, eager, atol=1e-5)
    assert model.config["connector_config"]["_attn_implementation"] == "flash_attention_2"  # config kept as saved
    with pytest.raises(ValueError, match="attn_implementation"):
        model.set_attn_implementation("flash_attention_2")
