"""End-to-end smoke tests: tiny folders -> load_unipic2_pipeline -> the UnifiedPipeline methods."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from unipic.api import UnifiedPipeline, UnsupportedTaskError, UserError
from unipic.unipic2 import load_unipic2_pipeline
from unipic.unipic2.adapters import KontextUnifiedPipeline
from unipic.unipic2.images import fit
from unipic.unipic2.tiny import random_image

FAST = {"steps": 2}


@pytest.fixture(scope="module")
def kontext(kontext_folder):
    return load_unipic2_pipeline(kontext_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def metaquery(mq_folder):
    return load_unipic2_pipeline(mq_folder, device="cpu", dtype=torch.float32)


def test_adapters_implement_the_protocol(kontext, metaquery):
    for pipe in (kontext, metaquery):
        assert isinstance(pipe, UnifiedPipeline)
        defaults = pipe.sampling_defaults()
        assert defaults["num_inference_steps"] == 50 and defaults["cfg"] == 3.5 and defaults["height"] == 512
    assert kontext.sampling_defaults()["model_family"] == "unipic2-sd35m-kontext"
    assert metaquery.sampling_defaults()["model_family"] == "unipic2-metaquery"


@pytest.mark.parametrize("which", ["kontext", "metaquery"])
def test_text_to_image(which, request):
    pipe = request.getfixturevalue(which)
    out = pipe.text_to_image(["a cat", "a dog"], height=64, width=32, images_per_prompt=2, seed=0, **FAST)
    assert [len(images) for images in out] == [2, 2]
    assert all(im.size == (32, 64) and im.mode == "RGB" for images in out for im in images)
    again = pipe.text_to_image(["a cat", "a dog"], height=64, width=32, images_per_prompt=2, seed=0, **FAST)
    assert out[1][1].tobytes() == again[1][1].tobytes()
    square = pipe.text_to_image(["a cat"], height=64, seed=1, steps=1, cfg=1.0, negative_prompt="ugly")
    assert square[0][0].size == (64, 64)
    chunked = pipe.text_to_image(["a", "b", "c"], height=32, seed=1, steps=1, batch_size=1)
    assert [len(images) for images in chunked] == [1, 1, 1]


@pytest.mark.parametrize("which", ["kontext", "metaquery"])
def test_edit_image_sizes_and_reproducibility(which, request):
    pipe = request.getfixturevalue(which)
    source = random_image(96, 48, mode="RGBA", seed=5)  # RGBA, 2:1
    # No size: the longer edge becomes image_size (multiples of 32), aspect kept.
    [edited] = pipe.edit_image([source], ["make it red"], seed=3, image_size=64, **FAST)
    assert edited.size == (64, 32) and edited.mode == "RGB"
    [again] = pipe.edit_image([source], ["make it red"], seed=3, image_size=64, **FAST)
    assert edited.tobytes() == again.tobytes()
    # Both sides given: the source is resized to them.
    [forced] = pipe.edit_image([source], ["make it red"], height=64, width=64, seed=3, **FAST)
    assert forced.size == (64, 64)
    two = pipe.edit_image([source, random_image(64, 64)], ["a", "b"], height=64, width=64, seed=0, steps=1)
    assert len(two) == 2


class _RecordingPipeline:
    """Stands in for a diffusers pipeline: records the reference image and returns it unchanged."""

    def __init__(self, pipeline):
        self._pipeline, self.references = pipeline, []

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def sample_checked(self, prompt, *, references, **kwargs):  # what the adapter samples a checked edit with
        [image] = references
        self.references.append(image)
        return SimpleNamespace(images=[image])


def test_edit_input_resize_defaults_to_upstream_stretch(kontext):
    # 500x333 rounds to 512x352 (longer edge 512, multiples of 32): upstream's scripts resize
    # straight to it with PIL's default bicubic filter, without cropping.
    recorder = _RecordingPipeline(kontext.pipeline)
    adapter = KontextUnifiedPipeline(recorder)
    source = random_image(500, 333, seed=4)
    [stretched] = adapter.edit_image([source], ["make it red"], seed=0)
    assert stretched.size == (512, 352)
    assert stretched.tobytes() == source.resize((512, 352), Image.Resampling.BICUBIC).tobytes()
    # Cropping stays available: it cuts the 16 px (3 %) of width the rounded aspect ratio drops.
    [cropped] = adapter.edit_image([source], ["make it red"], seed=0, input_resize="crop")
    assert cropped.tobytes() == fit(source, 512, 352).tobytes() != stretched.tobytes()
    assert adapter.sampling_defaults()["edit_input_resize"] == "stretch"
    with pytest.raises(UserError, match="input_resize='pad': must be one of 'stretch', 'crop'"):
        adapter.edit_image([source], ["make it red"], input_resize="pad")
    # The resolved mode is part of the request's settings (what the CLI records in the output).
    assert adapter.check_inputs("edit_image", ["x"], [source]).settings["input_resize"] == "stretch"
    assert adapter.check_inputs("edit_image", ["x"], [source], input_resize="crop").settings["input_resize"] == "crop"


def test_captioning(kontext, metaquery):
    image = random_image(64, 64, seed=2)
    with pytest.raises(UnsupportedTaskError, match="MetaQuery"):
        kontext.image_to_text([image], ["Describe the image."])
    [greedy] = metaquery.image_to_text([image], ["Describe the image."], max_new_tokens=5)
    assert isinstance(greedy, str)
    assert metaquery.image_to_text([image], [""], max_new_tokens=None)  # defaults: question and 512 tokens
    sampled = [metaquery.image_to_text([image], ["?"], max_new_tokens=5, seed=9, do_sample=True, temperature=1.0)
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_user_errors(kontext, metaquery):
    image = random_image(64, 64)
    cases = [
        (lambda: kontext.text_to_image("a cat"), "list of strings"),
        (lambda: kontext.text_to_image(["a cat"], height=50), "multiple of 16"),
        (lambda: kontext.text_to_image(["a cat"], height=64, head_steps=3), "unknown text-to-image option 'head_steps'"),
        (lambda: kontext.text_to_image(["a cat"], height=64, steps=0), "num_inference_steps"),
        (lambda: kontext.text_to_image(["a cat"], height=64, cfg=-1.0), "cfg"),
        (lambda: kontext.text_to_image(["a cat"], height=64, steps=2, num_inference_steps=3), "conflicts"),
        (lambda: kontext.text_to_image(["a cat"], height=64, seed=1.5), "seed"),
        (lambda: kontext.edit_image([image], ["a", "b"]), "2 instructions"),
        (lambda: kontext.edit_image(["not an image"], ["a"]), "PIL"),
        (lambda: metaquery.edit_image([image], ["a"], height=48, width=48), "multiple of 32"),
        (lambda: metaquery.image_to_text([image], ["?"], top_q=1), "unknown caption option"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()


def test_missing_folder_and_qwen_errors(mq_split_folders, tmp_path):
    folder, qwen = mq_split_folders
    with pytest.raises(UserError, match="qwen_path"):
        load_unipic2_pipeline(folder, device="cpu", dtype=torch.float32)
    pipe = load_unipic2_pipeline(folder, device="cpu", dtype=torch.float32, qwen_path=str(qwen))
    assert isinstance(pipe.image_to_text([random_image(64, 64)], ["?"], max_new_tokens=2)[0], str)
    with pytest.raises(UserError, match="does not exist"):
        load_unipic2_pipeline(tmp_path / "nope", device="cpu", dtype=torch.float32)
    with pytest.raises(UserError, match="not a UniPic-2 folder"):
        load_unipic2_pipeline(tmp_path, device="cpu", dtype=torch.float32)


def test_memory_options(kontext_folder):
    with pytest.raises(UserError, match="needs device 'cuda' or 'mps'"):
        load_unipic2_pipeline(kontext_folder, device="cpu", dtype=torch.float32, cpu_offload=True)
    tiled = load_unipic2_pipeline(kontext_folder, device="cpu", dtype=torch.float32, vae_tiling=True)
    vae = tiled.pipeline.vae
    assert vae.use_tiling and vae.tile_sample_min_size == 64 and vae.tile_latent_min_size == 8  # tiny VAE: 64-px tiles
    [[image]] = tiled.text_to_image(["a cat"], height=128, width=96, seed=0, steps=1)  # decoded in 2x2 tiles
    assert image.size == (96, 128)
    [edited] = tiled.edit_image([random_image(128, 128)], ["x"], seed=0, steps=1, image_size=128)  # tiled encode
    assert isinstance(edited, Image.Image) and edited.size == (128, 128)


def test_bfloat16_runs(kontext_folder):
    pipe = load_unipic2_pipeline(kontext_folder, device="cpu", dtype=torch.bfloat16)
    assert pipe.pipeline.transformer.dtype == torch.bfloat16
    [[image]] = pipe.text_to_image(["a cat"], height=32, seed=0, steps=1)
    assert image.size == (32, 32)
