"""UniPic-2 inpainting and outpainting on the tiny random pipelines: the kept latents follow the
source's noising trajectory, the kept pixels are the source's, and the CLI works and fails cleanly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unipic.api import UserError
from unipic.cli import main
from unipic.unipic2.adapters import KontextUnifiedPipeline, MetaQueryUnifiedPipeline
from unipic.unipic2.tiny import random_image


def _mask(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_kept_latents_follow_the_source_trajectory(kontext_pipe, monkeypatch):
    source = random_image(48, 32, seed=3)  # 48 wide, 32 high
    mask = _mask(32, 48, 8, 24, 16, 40)
    captured: dict = {}
    seen: list[torch.Tensor] = []
    denoise, step = kontext_pipe.denoise, kontext_pipe.scheduler.step

    def spy_denoise(*args, **kwargs):
        captured["inpaint"] = kwargs["inpaint"]
        return denoise(*args, **kwargs)

    def spy_step(model_output, timestep, sample, **kwargs):
        seen.append(sample.clone())
        return step(model_output, timestep, sample, **kwargs)

    monkeypatch.setattr(kontext_pipe, "denoise", spy_denoise)
    monkeypatch.setattr(kontext_pipe.scheduler, "step", spy_step)
    latents = kontext_pipe(prompt="a cat", inpaint_image=source, mask_image=mask, num_inference_steps=3,
                           generator=torch.Generator().manual_seed(0), output_type="latent").images
    source_latents, latent_mask, noise = captured["inpaint"]
    kept = (latent_mask == 0).expand_as(latents)
    assert latent_mask.shape[-2:] == (4, 6) and int(latent_mask.sum()) == 2 * 3  # 8-pixel cells of the mask
    sigmas = kontext_pipe.scheduler.sigmas
    assert len(seen) == 3
    for index, sample in enumerate(seen):  # the latents entering step i sit at noise level sigma_i
        expected = sigmas[index] * noise + (1 - sigmas[index]) * source_latents
        torch.testing.assert_close(sample[kept], expected[kept])
    assert torch.equal(latents[kept], source_latents[kept])  # and they end on the source itself
    assert not torch.allclose(latents[~kept], source_latents[~kept])


@pytest.mark.parametrize("family", ["kontext", "metaquery"])
def test_adapters_inpaint_and_outpaint_keep_the_source(family, kontext_pipe, mq_pipe):
    adapter = KontextUnifiedPipeline(kontext_pipe) if family == "kontext" else MetaQueryUnifiedPipeline(mq_pipe)
    source = random_image(40, 24, seed=4)  # not multiples of 16: padded and cropped back
    mask = _mask(24, 40, 4, 12, 8, 30)
    [out] = adapter.inpaint([source], [mask], ["a red circle"], seed=0, steps=2, grow=2)
    grown = np.zeros_like(mask)
    grown[2:14, 6:32] = True
    src, got = np.asarray(source), np.asarray(out)
    assert out.size == source.size and np.array_equal(got[~grown], src[~grown])
    assert np.abs(got[mask].astype(int) - src[mask]).mean() > 1
    [again] = adapter.inpaint([source], [mask], ["a red circle"], seed=0, steps=2, grow=2)
    assert np.array_equal(np.asarray(again), got)
    [wide] = adapter.outpaint([source], ["a red circle"], left=16, top=16, seed=0, steps=2)
    assert wide.size == (56, 40) and np.array_equal(np.asarray(wide)[16:, 16:], src)
    with pytest.raises(UserError, match="unknown inpaint option"):
        adapter.inpaint([source], [mask], ["x"], temperature=0.5)
    with pytest.raises(UserError, match="covers the whole image"):
        adapter.inpaint([source], [np.ones((24, 40), bool)], ["x"])


def test_both_families_implement_the_inpainting_protocol(kontext_pipe, mq_pipe):
    from unipic.api import InpaintingPipeline

    assert isinstance(KontextUnifiedPipeline(kontext_pipe), InpaintingPipeline)
    assert isinstance(MetaQueryUnifiedPipeline(mq_pipe), InpaintingPipeline)


def test_cli_inpaint_with_kontext(kontext_folder, tmp_path, capsys):
    source = tmp_path / "source.png"
    random_image(48, 32, seed=5).save(source)
    out = tmp_path / "out.png"
    common = ["--model", str(kontext_folder), "--device", "cpu", "--steps", "2", "--seed", "0", "--quiet"]
    assert main(["inpaint", str(source), "a cat", "--box", "8,8,40,24", "-o", str(out), *common]) == 0
    with Image.open(out) as image, Image.open(source) as src:
        assert image.size == (48, 32)
        assert '"num_inference_steps": 2' in image.text["settings"]
        kept = ~_mask(32, 48, 8, 24, 8, 40)
        assert np.array_equal(np.asarray(image)[kept], np.asarray(src.convert("RGB"))[kept])
    capsys.readouterr()
    assert main(["outpaint", str(source), "a cat", "--bottom", "16", "-o", str(tmp_path / "o.png"), *common,
                 "--temperature", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "temperature" in err
