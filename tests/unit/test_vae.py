"""Tests for the KL-f16 autoencoder (spec §3)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from unipic.unipic1.models.vae import AttnBlock, AutoencoderKL, Downsample, VAEConfig

DATA = Path(__file__).parent / "data"
TINY = VAEConfig(ch=32)  # = unipic1_tiny_config.json "vae" (same key layout, ch 128 -> 32)


def _manifest(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        rows.append((name, tuple(json.loads(shape))))
    return rows


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(TINY).eval()


def test_state_dict_matches_official_manifest_on_meta() -> None:
    expected = _manifest(DATA / "vae_keys.tsv")
    assert len(expected) == 312
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    got = [("vae." + k, tuple(v.shape)) for k, v in vae.state_dict().items()]
    missing = sorted(set(expected) - set(got), key=str)[:5]
    extra = sorted(set(got) - set(expected), key=str)[:5]
    assert got == expected, f"missing {missing}, unexpected {extra}"
    assert all(p.device.type == "meta" for p in vae.parameters())
    # spec §1.1 parameter count
    assert sum(p.numel() for p in vae.parameters()) == 66_456_019


def test_config_round_trip_and_list_fields() -> None:
    cfg = VAEConfig(ch=32, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16])
    assert cfg.ch_mult == (1, 1, 2, 2, 4) and cfg.attn_resolutions == (16,)
    d = dataclasses.asdict(cfg)
    assert VAEConfig(**d) == cfg
    assert VAEConfig(**json.loads(json.dumps(d))) == cfg
    assert cfg.stride == 16
    with pytest.raises(ValueError, match="GroupNorm"):
        VAEConfig(ch=48)


@pytest.mark.parametrize("hw", [(64, 64), (128, 128), (128, 64)])
def test_tiny_encode_decode_shapes(tiny_vae: AutoencoderKL, hw: tuple[int, int]) -> None:
    h, w = hw
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = tiny_vae.encode(x)
        mean, logvar = tiny_vae.encode_moments(x)
        y = tiny_vae.decode(z)
    assert z.shape == (1, 16, h // 16, w // 16)
    assert y.shape == (1, 3, h, w)
    assert torch.isfinite(z).all() and torch.isfinite(y).all()
    torch.testing.assert_close(z, mean * 0.2325)
    assert logvar.min() >= -30 and logvar.max() <= 20


def test_decode_does_not_modify_input(tiny_vae: AutoencoderKL) -> None:
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    before = z.clone()
    with torch.no_grad():
        tiny_vae.decode(z)
        tiny_vae(torch.zeros(1, 3, 32, 32))
    assert torch.equal(z, before)


def test_posterior_sample_uses_generator(tiny_vae: AutoencoderKL) -> None:
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        mode = tiny_vae.encode(x)
        s1 = tiny_vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        s2 = tiny_vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        s3 = tiny_vae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)
    assert not torch.equal(s1, mode)


@pytest.mark.parametrize(
    "shape, method",
    [
        ((1, 3, 40, 32), "encode"),  # H not divisible by 16
        ((1, 3, 32, 24), "encode"),  # W not divisible by 16
        ((1, 4, 32, 32), "encode"),  # wrong channel count
        ((3, 32, 32), "encode"),  # missing batch dim
        ((1, 8, 2, 2), "decode"),  # wrong latent channels
        ((16, 2, 2), "decode"),
    ],
)
def test_bad_shapes_raise(tiny_vae: AutoencoderKL, shape: tuple[int, ...], method: str) -> None:
    with pytest.raises(ValueError, match=str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        getattr(tiny_vae, method)(torch.zeros(shape))


def test_meta_build_then_materialise() -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(TINY)
    vae = vae.to_empty(device="cpu")
    vae.init_weights()
    with torch.no_grad():
        y = vae(torch.zeros(1, 3, 32, 32))
    assert torch.isfinite(y).all()


def test_weight_dtype_is_followed(tiny_vae: AutoencoderKL) -> None:
    vae = AutoencoderKL(TINY).to(torch.bfloat16)
    vae.load_state_dict(tiny_vae.state_dict())
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 32))  # float32 input, bf16 weights
    assert z.dtype == torch.bfloat16 and z.shape == (1, 16, 2, 2)


def test_attention_block_matches_explicit_softmax() -> None:
    torch.manual_seed(4)
    blk = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    with torch.no_grad():
        h = blk.norm(x)
        q, k, v = (m(h).flatten(2) for m in (blk.q, blk.k, blk.v))  # (B, C, HW)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 32**-0.5, dim=-1)
        out = torch.einsum("bij,bcj->bci", w, v).reshape(x.shape)
        expected = x + blk.proj_out(out)
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_bottom() -> None:
    ds = Downsample(1)
    with torch.no_grad():
        ds.conv.weight.zero_()
        ds.conv.bias.zero_()
        ds.conv.weight[0, 0, 2, 2] = 1.0  # picks the bottom-right tap of each 3x3 window
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = ds(x)
    # windows start at 0 and 2; bottom-right tap of the last window falls in the zero padding
    assert y.shape == (1, 1, 2, 2)
    assert y[0, 0].tolist() == [[10.0, 0.0], [0.0, 0.0]]


def test_patch_size_folds_pixels_into_channels() -> None:
    """patch_size=4 with three levels keeps stride 16 and any multiple-of-16 size round-trips in shape."""
    cfg = VAEConfig(ch=32, ch_mult=(2, 3, 4), num_res_blocks=1, patch_size=4)
    assert cfg.stride == 16
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).eval()
    assert vae.encoder.conv_in.in_channels == 3 * 16 and vae.decoder.conv_out.out_channels == 3 * 16
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        y = vae.decode(z)
    assert z.shape == (2, 16, 4, 6) and y.shape == (2, 3, 64, 96)
    # The released layout is untouched by the option's default.
    assert VAEConfig().patch_size == 1 and VAEConfig().stride == 16
    with pytest.raises(ValueError, match="patch_size"):
        VAEConfig(patch_size=0)


def test_patch_size_decoder_output_is_pixel_shuffled() -> None:
    """Output channel c·p² + (i·p + j) of the last conv lands on pixel (i, j) of its p×p patch."""
    cfg = VAEConfig(ch=32, ch_mult=(2, 3, 4), num_res_blocks=1, patch_size=4)
    vae = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.zero_()
        vae.decoder.conv_out.bias[1 * 16 + 2 * 4 + 3] = 1.0  # green, row 2, column 3 of every patch
        y = vae.decode(torch.zeros(1, 16, 2, 2))
    expected = torch.zeros(1, 3, 32, 32)
    expected[0, 1, 2::4, 3::4] = 1.0
    torch.testing.assert_close(y, expected)


def test_model_config_refuses_a_vae_stride_the_mar_does_not_expect() -> None:
    from unipic.unipic1.models.config import UniPicConfig
    from unipic.unipic1.models.presets import get_preset

    # The stride is stored once (the VAE's); config.json files of earlier versions also carry
    # mar.vae_stride and mar.token_dim: they load when those agree, and a disagreeing stride is refused.
    data = get_preset("unipic1-tiny").to_dict()
    assert "vae_stride" not in data["mar"] and "token_dim" not in data["mar"]
    data["mar"].update(vae_stride=16, token_dim=16)
    assert UniPicConfig.from_dict(data) == get_preset("unipic1-tiny")
    data["vae"]["patch_size"] = 2  # stride 32 with five levels
    with pytest.raises(ValueError, match="stride"):
        UniPicConfig.from_dict(data)
