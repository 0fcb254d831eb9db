"""Each request is checked once (docs/sampling.md): the checked request (`CheckedInputs`) travels down
to the sampler, and nothing below `check_inputs` / `check_inpaint` checks or derives it again.

The tests count calls of the check functions per request, through the Python API and the CLI, for
generation, editing and inpainting; and they pin each family's guidance rule and the edit size
rule the CLI and the server share.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import unipic.inpainting as inpainting
import unipic.unipic1.pipeline as unipic1_pipeline
from unipic.cli import main
from unipic.images import aspect_size
from unipic.unipic1.pipeline import UniPicPipeline

TINY = ["--model", "tiny-random", "--steps", "1", "--head-steps", "2", "--quiet", "--size", "32"]
FAST = {"steps": 1, "head_steps": 2}


class Counter:
    """Wraps functions of a module (monkeypatched) and counts their calls, by the argument name they check."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.calls: dict[str, int] = {}

    def wrap(self, module, name: str, key=None) -> None:
        original = getattr(module, name)

        def counted(*args, **kwargs):
            label = key(*args, **kwargs) if key is not None else name
            if label is not None:
                self.calls[label] = self.calls.get(label, 0) + 1
            return original(*args, **kwargs)

        self.monkeypatch.setattr(module, name, counted)

    def method(self, cls, name: str) -> None:
        original = getattr(cls, name)

        def counted(self_, *args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return original(self_, *args, **kwargs)

        self.monkeypatch.setattr(cls, name, counted)


def _named(value, name, *args, **kwargs):
    return name


@pytest.fixture
def counter(monkeypatch):
    counts = Counter(monkeypatch)
    # The UniPic-1 pipeline's own checks (cfg is a check_number, height/width a check_size) ...
    counts.wrap(unipic1_pipeline, "check_number", key=lambda value, name, **kw: name if name == "cfg" else None)
    counts.wrap(unipic1_pipeline, "check_size", key=_named)
    counts.wrap(unipic1_pipeline, "check_seeds", key=lambda *a, **kw: "seed")
    # ... the pipeline's request checks, and the masks (checked, then grown).
    for method in ("check_inputs", "check_inpaint", "inpaint_settings"):
        counts.method(UniPicPipeline, method)
    counts.wrap(inpainting, "check_mask")
    counts.wrap(inpainting, "grow_mask")
    return counts


def _source(size=(48, 32)) -> Image.Image:
    return Image.new("RGB", size, (200, 60, 60))


def _mask(size=(48, 32)) -> np.ndarray:
    mask = np.zeros(size[::-1], dtype=bool)
    mask[8:24, 8:24] = True
    return mask


# ---------------------------------------------------------------------------------------------
# One check per request: Python API
# ---------------------------------------------------------------------------------------------


def test_generate_checks_cfg_and_size_once(tiny_pipeline, counter):
    tiny_pipeline.text_to_image(["a red circle"], height=32, width=32, seed=1, cfg=2.0, **FAST)
    assert counter.calls == {"check_inputs": 1, "cfg": 1, "height": 1, "width": 1, "seed": 1}


def test_edit_checks_cfg_and_size_once(tiny_pipeline, counter):
    tiny_pipeline.edit_image([_source()], ["make it blue"], height=32, width=48, seed=1, cfg=2.0, **FAST)
    assert counter.calls == {"check_inputs": 1, "cfg": 1, "height": 1, "width": 1, "seed": 1}


def test_inpaint_checks_cfg_size_and_mask_once_and_grows_it_once(tiny_pipeline, counter):
    [out] = tiny_pipeline.inpaint([_source()], [_mask()], ["a star"], seed=1, grow=2, cfg=2.0, **FAST)
    assert out.size == (48, 32)
    assert counter.calls == {"check_inpaint": 1, "inpaint_settings": 1, "check_mask": 1, "grow_mask": 1,
                             "cfg": 1, "height": 1, "width": 1}


def test_outpaint_checks_its_border_mask_once(tiny_pipeline, counter):
    [out] = tiny_pipeline.outpaint([_source()], ["a star"], right=16, seed=1, **FAST)
    assert out.size == (64, 32)
    assert counter.calls["check_mask"] == counter.calls["grow_mask"] == counter.calls["check_inpaint"] == 1


def test_run_samples_the_checked_request_without_checking_again(tiny_pipeline, counter):
    request = tiny_pipeline.check_inputs("text_to_image", ["a", "b"], height=32, width=32, seed=[3, 4], **FAST)
    together = tiny_pipeline.run(request)
    alone = tiny_pipeline.run(request.select([1]))  # one prompt of a checked batch, as `generate --prompt-file`
    assert counter.calls["check_inputs"] == 1 and counter.calls["cfg"] == 1
    assert np.allclose(np.asarray(together[1][0], dtype=float), np.asarray(alone[0][0], dtype=float), atol=2)


# ---------------------------------------------------------------------------------------------
# One check per request: command line (the model-free checks before loading stay; after the load
# the pipeline checks once, and a mask is checked and grown once in all)
# ---------------------------------------------------------------------------------------------


def test_cli_generate_checks_once_after_loading(tmp_path, counter):
    assert main(["generate", "a red circle", "-o", str(tmp_path / "a.png"), "--cfg", "2", "--seed", "1", *TINY]) == 0
    assert counter.calls == {"check_inputs": 1, "cfg": 1, "height": 1, "width": 1, "seed": 1}


def test_cli_generate_batch_checks_every_prompt_once(tmp_path, counter):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"}\n{"prompt": "a green star"}\n')
    assert main(["generate", "--prompt-file", str(prompts), "-o", str(tmp_path / "out"), *TINY]) == 0
    assert counter.calls == {"check_inputs": 1, "cfg": 1, "height": 1, "width": 1, "seed": 1}


def test_cli_edit_checks_once_after_loading(tmp_path, counter):
    _source((100, 60)).save(tmp_path / "src.png")
    argv = ["edit", str(tmp_path / "src.png"), "make it blue", "-o", str(tmp_path / "e.png"), "--cfg", "2", *TINY]
    assert main(argv) == 0
    assert counter.calls == {"check_inputs": 1, "cfg": 1, "height": 1, "width": 1, "seed": 1}


def test_cli_inpaint_checks_and_grows_the_mask_once(tmp_path, counter):
    _source().save(tmp_path / "src.png")
    Image.fromarray(_mask() * np.uint8(255)).save(tmp_path / "mask.png")
    tiny = [arg for arg in TINY if arg not in ("--size", "32")]
    argv = ["inpaint", str(tmp_path / "src.png"), str(tmp_path / "mask.png"), "a star", "-o", str(tmp_path / "i.png"),
            "--grow", "2", "--cfg", "2", *tiny]
    assert main(argv) == 0
    # The mask is read, checked and grown before loading (a bad one costs no load time), once.
    assert counter.calls == {"inpaint_settings": 1, "check_mask": 1, "grow_mask": 1, "cfg": 1, "height": 1,
                             "width": 1}


def test_cli_outpaint_checks_its_request_once(tmp_path, counter):
    _source().save(tmp_path / "src.png")
    tiny = [arg for arg in TINY if arg not in ("--size", "32")]
    assert main(["outpaint", str(tmp_path / "src.png"), "a star", "--left", "16", "-o", str(tmp_path / "o.png"),
                 *tiny]) == 0
    assert counter.calls["check_inpaint"] == counter.calls["check_mask"] == counter.calls["cfg"] == 1


# ---------------------------------------------------------------------------------------------
# Guidance: one rule per family (docs/sampling.md, "Guidance")
# ---------------------------------------------------------------------------------------------


def test_unipic1_guides_at_every_scale_but_one():
    from unipic.unipic1.sampling.mar_decode import guidance_enabled

    assert [guidance_enabled(c) for c in (0.0, 0.5, 1.0, 1.5, 3.0)] == [True, True, False, True, True]


def test_unipic1_cfg_zero_is_unconditional_and_differs_from_cfg_one():
    from unipic.loading import load_pipeline

    pipeline = load_pipeline("default", device="cpu", dtype="float32")  # trained: its prompts matter

    def draw(prompt, cfg):
        [[image]] = pipeline.text_to_image([prompt], height=64, width=64, seed=7, cfg=cfg, steps=4, head_steps=8)
        return np.asarray(image, dtype=float)

    # cfg=0 samples the unconditional prediction alone, so the prompt does not matter (up to the
    # rounding of the batched arithmetic: two prompts of 4 tokens each); cfg=1 samples the
    # conditional prediction alone, so it does; and the two differ.
    assert np.abs(draw("A red circle.", 0.0) - draw("A blue square.", 0.0)).mean() < 1
    assert np.abs(draw("A red circle.", 1.0) - draw("A blue square.", 1.0)).mean() > 5
    assert np.abs(draw("A red circle.", 0.0) - draw("A red circle.", 1.0)).mean() > 5


def test_unipic2_guides_only_above_one():
    pytest.importorskip("diffusers")
    from unipic.unipic2.pipeline_kontext import guidance_enabled

    assert [guidance_enabled(c) for c in (0.0, 0.5, 1.0, 1.01, 3.5)] == [False, False, False, True, True]


# ---------------------------------------------------------------------------------------------
# Edit size: one rule (`unipic.images.aspect_size`), in the pipeline, per source
# ---------------------------------------------------------------------------------------------


def test_edit_size_is_decided_once_in_check_inputs(tiny_pipeline):
    sources = [_source((100, 60)), _source((60, 100)), _source((100, 60))]
    request = tiny_pipeline.check_inputs("edit_image", ["a", "b", "c"], sources, seed=[1, 2, 3], **FAST)
    assert request.sizes == [(96, 160), (160, 96), (96, 160)]
    assert "height" not in request.settings  # two sizes: each output records its own
    outputs = tiny_pipeline.run(request)
    assert [image.size for image in outputs] == [(160, 96), (96, 160), (160, 96)]
    # Batched with differently shaped sources, an edit equals the same edit alone (its own seed).
    alone = tiny_pipeline.edit_image([sources[2]], ["c"], seed=[3], **FAST)[0]
    assert np.allclose(np.asarray(outputs[2], dtype=float), np.asarray(alone, dtype=float), atol=2)


def test_cli_edit_output_size_is_the_pipelines_rule(tmp_path):
    _source((100, 60)).save(tmp_path / "src.png")
    tiny = [arg for arg in TINY if arg not in ("--size", "32")]
    assert main(["edit", str(tmp_path / "src.png"), "make it blue", "-o", str(tmp_path / "e.png"), *tiny]) == 0
    height, width = aspect_size(100, 60, 128, 16)
    assert Image.open(tmp_path / "e.png").size == (width, height) == (160, 96)
