"""SD3Transformer2DKontextModel: parity with diffusers' SD3 without a reference, key-exact weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from unipic.unipic2.tiny import TINY_CONFIG
from unipic.unipic2.transformer_sd3_kontext import SD3Transformer2DKontextModel

CFG = TINY_CONFIG["sd35m_kontext"]["transformer"]


def _inputs(batch: int = 2, height: int = 8, width: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, CFG["in_channels"], height, width, generator=g),  # latents (B, C, H, W)
        "encoder_hidden_states": torch.randn(batch, 11, CFG["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(batch, CFG["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([250.0, 750.0][:batch]),
    }


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = SD3Transformer2DKontextModel(**CFG).eval()
    stock = SD3Transformer2DModel(**CFG).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    return ours, stock


@pytest.mark.parametrize("skip_layers", [None, [1]])
def test_without_reference_equals_sd3_bit_for_bit(models, skip_layers):
    ours, stock = models
    x = _inputs()
    with torch.no_grad():
        a = ours(**x, skip_layers=skip_layers).sample
        b = stock(**x, skip_layers=skip_layers).sample
    diff = (a - b).abs().max().item()
    assert torch.equal(a, b), f"max abs diff {diff}"


def test_positional_call_order_is_sd3s(models):
    """`ref_latents` is keyword-only, so SD3's positional order still works (upstream broke it)."""
    ours, stock = models
    x = _inputs(batch=1)
    args = (x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], x["timestep"])
    with torch.no_grad():
        assert torch.equal(ours(*args).sample, stock(*args).sample)
    with pytest.raises(TypeError):
        ours(*args, None, None, True, None, torch.zeros(1))  # a 9th positional argument is rejected


def test_reference_changes_target_prediction_only_in_value(models):
    ours, _ = models
    x = _inputs()
    ref = torch.randn_like(x["hidden_states"])
    with torch.no_grad():
        plain = ours(**x).sample
        edited = ours(**x, ref_latents=ref).sample
        edited_other = ours(**x, ref_latents=ref + 1).sample
    assert edited.shape == plain.shape == x["hidden_states"].shape
    assert not torch.allclose(edited, plain)
    assert not torch.allclose(edited, edited_other)


def test_reference_forward_follows_the_spec(models):
    """Spec §2 read straight, with the stock SD3 modules: patch-embed both latents with the same
    pos_embed (identical positions), image stream = [reference ; target], run the blocks, keep
    the last N tokens, norm_out + proj_out, unpatchify."""
    ours, stock = models
    x = _inputs(batch=1)
    ref = torch.randn_like(x["hidden_states"])
    with torch.no_grad():
        target = stock.pos_embed(x["hidden_states"])  # (1, N, D)
        tokens = torch.cat([stock.pos_embed(ref), target], dim=1)  # (1, 2N, D)
        temb = stock.time_text_embed(x["timestep"][:1], x["pooled_projections"])
        context = stock.context_embedder(x["encoder_hidden_states"])
        for block in stock.transformer_blocks:
            context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
        out = stock.proj_out(stock.norm_out(tokens[:, -target.shape[1]:], temb))  # (1, N, p*p*C)
        h, w, p, c = 8 // 2, 6 // 2, 2, CFG["out_channels"]
        expected = out.reshape(1, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(1, c, h * p, w * p)
        got = ours(**x, ref_latents=ref).sample
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff}"


def test_reference_shape_errors_are_clear(models):
    ours, _ = models
    x = _inputs()
    with pytest.raises(ValueError, match="must have the shape of the noisy latents"):
        ours(**x, ref_latents=torch.randn(2, CFG["in_channels"], 8, 8))
    with pytest.raises(ValueError, match="must have the shape"):
        ours(**x, ref_latents=torch.randn(1, CFG["in_channels"], 8, 6))


def test_gradient_checkpointing_with_reference_matches(models):
    ours, _ = models
    x = _inputs(batch=1)
    ref = torch.randn_like(x["hidden_states"])
    plain = ours(**x, ref_latents=ref).sample
    ours.enable_gradient_checkpointing()
    try:
        checkpointed = ours(**x, ref_latents=ref).sample
        checkpointed.square().mean().backward()
    finally:
        ours.disable_gradient_checkpointing()
        ours.zero_grad(set_to_none=True)
    assert torch.allclose(plain, checkpointed, atol=1e-6)


def test_weights_load_key_for_key_both_ways(tmp_path, models):
    ours, stock = models
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert "pos_embed.pos_embed" in ours.state_dict()  # the persistent sin-cos buffer is part of the folder
    ours.save_pretrained(tmp_path / "ours")
    stock.save_pretrained(tmp_path / "stock")
    into_stock = SD3Transformer2DModel.from_pretrained(tmp_path / "ours")
    into_ours = SD3Transformer2DKontextModel.from_pretrained(tmp_path / "stock")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(into_stock.state_dict()[name], tensor), name
        assert torch.equal(into_ours.state_dict()[name], tensor), name
    assert type(into_ours) is SD3Transformer2DKontextModel


def test_full_size_layout_is_sd35_medium():
    """Full-size config on the meta device: 909 tensors incl. the (1, 147456, 1536) pos_embed buffer (spec §2)."""
    from unipic.unipic2.memory import SD35M_TRANSFORMER

    with torch.device("meta"):
        model = SD3Transformer2DKontextModel(**SD35M_TRANSFORMER)
    state = model.state_dict()
    assert len(state) == 909
    assert tuple(state["pos_embed.pos_embed"].shape) == (1, 147456, 1536)
    assert sum(p.numel() for p in model.parameters()) == 2_243_171_520
