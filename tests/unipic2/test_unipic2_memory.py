"""The peak-memory model: parameter formulas vs instantiated models, full sizes vs spec §1."""

from __future__ import annotations

import pytest
import torch

from unipic.unipic2 import memory
from unipic.unipic2.tiny import (
    TINY_CONFIG,
    build_tiny_conditioner,
    build_tiny_kontext_components,
    build_tiny_qwen,
)


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny_modules():
    parts = build_tiny_kontext_components(seed=0)
    qwen, _, _ = build_tiny_qwen(seed=0)
    return {**{k: v for k, v in parts.items() if isinstance(v, torch.nn.Module)}, "mllm": qwen,
            "conditioner": build_tiny_conditioner(seed=0)}


def test_formulas_count_the_tiny_models_exactly(tiny_modules):
    k, mq = TINY_CONFIG["sd35m_kontext"], TINY_CONFIG["metaquery"]
    expected = {
        "transformer": memory.sd3_transformer_params(k["transformer"]),
        "vae": memory.vae_params(k["vae"]),
        "text_encoder": memory.clip_text_params(k["text_encoder"]),
        "text_encoder_2": memory.clip_text_params(k["text_encoder_2"]),
        "text_encoder_3": memory.t5_encoder_params(k["text_encoder_3"]),
        "mllm": memory.qwen2_5_vl_params(mq["qwen2_5_vl"])[0],
        "conditioner": memory.conditioner_params(mq["conditioner"]),
    }
    for name, module in tiny_modules.items():
        assert expected[name] == _param_count(module), name
    assert memory.qwen2_5_vl_params(mq["qwen2_5_vl"])[1] == _param_count(tiny_modules["mllm"].model.visual)
    buffer = tiny_modules["transformer"].pos_embed.pos_embed
    assert memory.sd3_pos_embed_values(k["transformer"]) == buffer.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_equal_numel_times_itemsize(tiny_modules, dtype):
    b = torch.tensor([], dtype=dtype).element_size()
    for name in ("transformer", "conditioner"):
        module = tiny_modules[name]
        formula = (memory.sd3_transformer_params(TINY_CONFIG["sd35m_kontext"]["transformer"]) if name == "transformer"
                   else memory.conditioner_params(TINY_CONFIG["metaquery"]["conditioner"])) * b
        cast = {n: p.detach().to(dtype) for n, p in module.named_parameters()}
        assert formula == sum(t.numel() * t.element_size() for t in cast.values()), name
    assert memory.sd3_transformer_params(TINY_CONFIG["sd35m_kontext"]["transformer"]) * 4 == _param_bytes(
        tiny_modules["transformer"])


def test_full_size_counts_match_the_spec():
    assert memory.sd3_transformer_params(memory.SD35M_TRANSFORMER) == 2_243_171_520
    assert memory.sd3_pos_embed_values(memory.SD35M_TRANSFORMER) == 147456 * 1536  # 226.5 M values
    assert memory.vae_params(memory.SD3_VAE) == 83_819_683
    assert memory.conditioner_params(memory.METAQUERY_CONDITIONER) == 903_509_504
    assert memory.qwen2_5_vl_params(memory.QWEN25_VL_7B) == (8_292_166_656, 676_550_144)
    assert memory.clip_text_params(memory.CLIP_L) == 123_650_304
    assert memory.clip_text_params(memory.CLIP_G) == 694_659_840
    # Spec §1 says 4.894 B: that counts T5's tied input embedding twice (shared + encoder.embed_tokens).
    assert memory.t5_encoder_params(memory.T5_XXL) == 4_893_906_944 - 32128 * 4096


def test_peak_model_is_consistent():
    for model in ("kontext", "metaquery"):
        for edit in (False, True):
            sizes = [memory.peak_bytes(model, s, s, edit) for s in (512, 768, 1024)]
            assert sizes == sorted(sizes)  # larger images never need less
            full = memory.peak_bytes(model, 1024, 1024, edit)
            assert memory.peak_bytes(model, 1024, 1024, edit, cpu_offload=True) < full
            assert memory.peak_bytes(model, 1024, 1024, edit, tile=512) < full
    weights = sum(memory.kontext_weight_bytes(2).values())
    assert 15 * memory.GIB < weights < 16 * memory.GIB  # Kontext-2B with CLIP-L/G + T5-XXL in bf16


def test_table_command_prints_markdown(capsys):
    memory.main([])
    out = capsys.readouterr().out
    assert "| Kontext-2B | edit | 1024² |" in out and "| MetaQuery-9B | text-to-image | 512² |" in out
