"""Shapes and invariants of the UniPic-1 parts on the tiny preset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unipic.unipic1.checkpoint import build_model
from unipic.unipic1.models.config import UniPicConfig
from unipic.unipic1.models.presets import get_preset, unipic1_tiny
from unipic.unipic1.sampling.schedules import (
    cfg_at_step,
    mask_by_order,
    random_masking,
    reveal_mask_len,
    sample_mask_ratio,
    sample_orders,
)


def test_config_round_trip_and_unknown_key():
    config = unipic1_tiny()
    again = UniPicConfig.from_dict(config.to_dict())
    assert again == config
    data = config.to_dict()
    data["mar"]["not_a_field"] = 1
    with pytest.raises(ValueError, match="not_a_field"):
        UniPicConfig.from_dict(data)


def test_presets_wire_widths():
    for name in ("unipic1-1.5b", "unipic1-medium", "unipic1-tiny"):
        config = get_preset(name)
        with torch.device("meta"):
            head = build_model(config).mar.diffloss
        # The head's widths are passed to it, derived from the VAE and the MAR decoder, not stored.
        assert head.net.cond_embed.in_features == config.mar.decoder_embed_dim
        assert head.net.input_proj.in_features == config.vae.embed_dim * config.mar.patch_size**2
        assert "token_dim" not in config.to_dict()["head"] and "cond_dim" not in config.to_dict()["head"]


def test_old_config_files_with_head_widths_still_load_and_disagreeing_ones_are_refused():
    data = unipic1_tiny().to_dict()
    data["head"].update(token_dim=unipic1_tiny().token_dim, cond_dim=data["mar"]["decoder_embed_dim"])
    assert UniPicConfig.from_dict(data) == unipic1_tiny()
    data["head"]["cond_dim"] += 1
    with pytest.raises(ValueError, match="head.cond_dim"):
        UniPicConfig.from_dict(data)


def test_medium_preset_is_about_100m_parameters():
    from unipic.unipic1.checkpoint import expected_tensors

    shapes = expected_tensors(get_preset("unipic1-medium"))
    # lm_head is tied to the embedding: count it once.
    total = sum(math.prod(s) for n, s in shapes.items() if n != "llm.lm_head.weight")
    assert 80e6 < total < 120e6, total


def test_mar_encoder_decoder_shapes(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    buf = model.config.mar.buffer_size
    grid = (8, 4)  # non-square, not the trained 4x4 grid
    tokens = torch.randn(2, 32, 16)
    orders = sample_orders(2, 32, generator=torch.Generator().manual_seed(0))
    mask = mask_by_order(20, orders).float()
    with torch.no_grad():
        x_enc = model.mar.forward_encoder(tokens, mask, grid)
        assert x_enc.shape == (2, buf + 12, 64)
        z = model.mar.forward_decoder(x_enc, mask, grid)
        assert z.shape == (2, 32, 64)
        x_con = model.mar.forward_encoder(tokens, None, grid)
        assert x_con.shape == (2, buf + 32, 64)
        z_edit = model.mar.forward_decoder(x_enc, mask, grid, x_con=x_con)
        assert z_edit.shape == z.shape and not torch.equal(z_edit, z)


def test_position_tables_resized_once_and_exact(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    mar = model.mar
    mar._pos_cache.clear()
    with torch.no_grad():
        first = mar.encoder_pos_embed((8, 8))
        second = mar.encoder_pos_embed((8, 8))
        assert first is second, "the resized table must come from the cache"
        table = mar.encoder_pos_embed_learned
        buf, g = mar.config.buffer_size, mar.grid_size
        image = table[:, buf:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        expected = F.interpolate(image, size=(8, 8), mode="bilinear", align_corners=False)
        expected = torch.cat([table[:, :buf], expected.permute(0, 2, 3, 1).reshape(1, 64, -1)], dim=1)
        torch.testing.assert_close(first, expected, rtol=0, atol=0)
        # The trained grid uses the raw table.
        assert torch.equal(mar.encoder_pos_embed((g, g)), table)
        # An in-place weight update invalidates the cached table.
        table.add_(1.0)
        third = mar.encoder_pos_embed((8, 8))
        table.sub_(1.0)
        assert not torch.equal(third, first)


def test_visual_feature_reorders_buffers_last(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    grid = (4, 4)
    with torch.no_grad():
        x_enc, z_enc = model.extract_visual_feature(torch.randn(1, 16, 16), None, grid)
        buf = model.config.mar.buffer_size
        torch.testing.assert_close(z_enc[:, -buf:], model.proj_in(x_enc[:, :buf]))
        torch.testing.assert_close(z_enc[:, :-buf], model.proj_in(x_enc[:, buf:]))


def test_vae_round_trip_shapes(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    pixels = torch.rand(1, 3, 64, 96) * 2 - 1
    tokens = model.encode_images(pixels)
    assert tokens.shape == (1, 4 * 6, 16)
    with torch.no_grad():
        assert model.decode_tokens(tokens, (4, 6)).shape == (1, 3, 64, 96)


def test_reveal_schedule_matches_spec_counts():
    # Spec §9: 64x64 tokens with num_iter 32 reveal 5, 15, 25, 34, 44, 54, ..., 198, 200, 201, 200.
    seq_len, masked, counts = 4096, 4096, []
    for step in range(32):
        mask_len = reveal_mask_len(step, 32, seq_len, masked)
        counts.append(masked - mask_len if step < 31 else masked)
        masked = mask_len
    assert counts[:6] == [5, 15, 25, 34, 44, 54]
    assert counts[-4:] == [198, 200, 201, 200]
    assert sum(counts) == seq_len


def test_masking_invariants():
    generator = torch.Generator().manual_seed(0)
    orders = sample_orders(3, 16, generator=generator)
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(3, 16))
    ratios = [sample_mask_ratio(0.7, generator=generator) for _ in range(200)]
    assert min(ratios) >= 0.7 and max(ratios) <= 1.0
    assert 0.84 < sum(ratios) / len(ratios) < 0.89  # truncated-normal mean ≈ 0.867
    # A wide spread reaches the low ratios that the last sampling steps see (near-uniform on [0, 1]).
    wide = [sample_mask_ratio(0.0, std=10.0, generator=generator) for _ in range(400)]
    assert min(wide) >= 0.0 and max(wide) <= 1.0
    assert 0.45 < sum(wide) / len(wide) < 0.55 and sum(r < 0.3 for r in wide) > 80
    mask = random_masking(orders, 0.7)
    assert torch.all(mask.sum(dim=1) == math.ceil(16 * 0.7))
    assert cfg_at_step(3.0, "linear", 100, 100) == 1.0 and cfg_at_step(3.0, "linear", 100, 0) == 3.0
    with pytest.raises(AssertionError):  # an inner invariant: check_inputs rejects bad schedules
        cfg_at_step(3.0, "cosine", 100, 0)
