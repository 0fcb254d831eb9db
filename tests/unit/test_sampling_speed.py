"""The exact sampler against the plain reference loop, and the fast mode's switches (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unipic.api import UserError
from unipic.cli import main
from unipic.unipic1.sampling.edit import edit_images
from unipic.unipic1.sampling.mar_decode import EXACT, SpeedOptions
from unipic.unipic1.sampling.reference import reference_edit_images, reference_generate_images
from unipic.unipic1.sampling.text_to_image import generate_images

TINY = ["--model", "tiny-random", "--steps", "2", "--head-steps", "3", "--quiet"]


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_exact_path_equals_the_reference_loop(tiny_model_and_tokenizer, cfg: float, schedule: str) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    settings = {"steps": 3, "cfg": cfg, "cfg_schedule": schedule, "head_steps": 6}
    prompts = ["a red circle", "two blue stars"]
    ours = generate_images(model, tokenizer, prompts, height=64, width=48, temperature=0.9,
                           generator=torch.Generator().manual_seed(3), **settings)
    plain = reference_generate_images(model, tokenizer, prompts, height=64, width=48, temperature=0.9,
                                      generator=torch.Generator().manual_seed(3), **settings)
    assert ours.shape == plain.shape == (2, 3, 64, 48)
    assert (ours - plain).abs().max().item() <= 1e-5

    source = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = edit_images(model, tokenizer, source, ["make it blue"], generator=torch.Generator().manual_seed(5),
                       **settings)
    plain = reference_edit_images(model, tokenizer, source, ["make it blue"],
                                  generator=torch.Generator().manual_seed(5), **settings)
    assert (ours - plain).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_one_mar_step_runs_prefix_and_image_rows_in_one_pass(tiny_model_and_tokenizer, cfg: float) -> None:
    """With a single MAR step there is no prefix cache (one LLM pass, issue 40); still the reference's pixels."""
    model, tokenizer = tiny_model_and_tokenizer
    settings = {"steps": 1, "cfg": cfg, "head_steps": 5, "height": 32, "width": 32, "temperature": 0.9}
    ours = generate_images(model, tokenizer, ["a red circle"], generator=torch.Generator().manual_seed(3), **settings)
    plain = reference_generate_images(model, tokenizer, ["a red circle"], generator=torch.Generator().manual_seed(3),
                                      **settings)
    assert (ours - plain).abs().max().item() <= 1e-5


def test_exact_path_is_reproducible_bit_for_bit(tiny_pipeline) -> None:
    a = tiny_pipeline.text_to_image(["a red circle"], height=32, width=32, seed=7, steps=2, head_steps=4)
    b = tiny_pipeline.text_to_image(["a red circle"], height=32, width=32, seed=7, steps=2, head_steps=4)
    assert np.array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))


def _pixels(pipeline, **options) -> np.ndarray:
    images = pipeline.text_to_image(["a red circle"], height=32, width=32, seed=11, head_steps=6, **options)
    return np.asarray(images[0][0])


def test_fast_mode_is_deterministic_and_each_option_switches_off_alone(tiny_pipeline) -> None:
    exact = _pixels(tiny_pipeline, steps=4)
    fast = _pixels(tiny_pipeline, fast=True, steps=4)
    assert np.array_equal(fast, _pixels(tiny_pipeline, fast=True, steps=4)), "one seed, one image"
    assert not np.array_equal(fast, exact)
    # Every shortcut off again gives the exact sampler, bit for bit.
    assert np.array_equal(_pixels(tiny_pipeline, fast=True, steps=4, head_solver="ddpm", head_anneal=1.0,
                                  guidance_interval=1, uncond_interval=1), exact)
    # Each on alone changes the result.
    assert not np.array_equal(_pixels(tiny_pipeline, steps=4, head_anneal=0.2), exact)
    assert not np.array_equal(_pixels(tiny_pipeline, steps=4, head_solver="dpm++2m"), exact)
    # (The tiny model's zero-initialised head makes guidance a no-op, so guidance caching is tested
    # on a randomised head: tests/unit/test_diffusion_head.py::test_lazy_guidance_reuses_the_residual.)
    assert tiny_pipeline.check_inputs("text_to_image", ["a"], guidance_interval=2).settings["guidance_interval"] == 2

    settings = tiny_pipeline.check_inputs("text_to_image", ["a"], fast=True).settings
    defaults = tiny_pipeline.check_inputs("text_to_image", ["a"]).settings
    assert settings["fast"] and not defaults["fast"]
    assert settings["steps"] == max(1, round(defaults["steps"] / 2))
    assert settings["head_solver"] == "dpm++2m" and defaults["head_solver"] == "ddpm"
    assert settings["head_steps"] == min(8, defaults["head_steps"])
    assert settings["head_anneal"] == 1.0  # annealing a few-step solver only removes the steps it needs
    ddpm = tiny_pipeline.check_inputs("text_to_image", ["a"], fast=True, head_solver="ddpm").settings
    assert ddpm["head_steps"] == max(1, round(defaults["head_steps"] / 2)) and ddpm["head_anneal"] == 0.2
    assert defaults["head_anneal"] == 1.0 and defaults["guidance_interval"] == 1
    assert settings["uncond_interval"] == min(2, settings["steps"]) and defaults["uncond_interval"] == 1
    assert tiny_pipeline.check_inputs("text_to_image", ["a"], fast=True, steps=1).settings["uncond_interval"] == 1
    off = tiny_pipeline.check_inputs("text_to_image", ["a"], fast=True, head_anneal=1.0).settings
    assert off["head_anneal"] == 1.0 and off["guidance_interval"] == settings["guidance_interval"]
    given = tiny_pipeline.check_inputs("text_to_image", ["a"], fast=True, steps=3, head_steps=7).settings
    assert given["steps"] == 3 and given["head_steps"] == 7


def test_shortcuts_change_a_trained_like_head_and_switch_off(tiny_model_and_tokenizer) -> None:
    import copy

    model, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    with torch.no_grad():  # the tiny model's head is zero-initialised, which makes guidance a no-op
        for p in model.mar.diffloss.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def draw(speed: SpeedOptions) -> torch.Tensor:
        return generate_images(model, tokenizer, ["a red circle"], height=32, width=32, steps=4, cfg=3.0, head_steps=6,
                               generator=torch.Generator().manual_seed(2), speed=speed)

    exact = draw(EXACT)
    assert torch.equal(draw(SpeedOptions(head_anneal=1.0, guidance_interval=1, uncond_interval=1)), exact)
    for speed in (SpeedOptions(head_anneal=0.3), SpeedOptions(guidance_interval=2), SpeedOptions(uncond_interval=2)):
        approx = draw(speed)
        assert torch.equal(approx, draw(speed)), f"{speed} is deterministic"
        assert not torch.equal(approx, exact), f"{speed} changes the sample"


def test_head_step_annealing_schedule() -> None:
    assert [EXACT.head_steps_at(k, 4, 50) for k in range(4)] == [50] * 4
    annealed = [SpeedOptions(head_anneal=0.2).head_steps_at(k, 5, 50) for k in range(5)]
    assert annealed == [50, 40, 30, 20, 10]
    assert SpeedOptions(head_anneal=0.01).head_steps_at(3, 4, 10) == 1  # never below one step
    assert SpeedOptions(head_anneal=0.2).head_steps_at(0, 1, 50) == 50


@pytest.mark.parametrize("options, message", [
    ({"fast": "yes"}, "fast='yes'"),
    ({"head_anneal": 0.0}, "head_anneal=0"),
    ({"head_anneal": 1.5}, "head_anneal=1.5"),
    ({"guidance_interval": 0}, "guidance_interval=0"),
    ({"uncond_interval": 0}, "uncond_interval=0"),
    ({"head_solver": "euler"}, "head_solver"),
])
def test_fast_options_errors_name_the_argument(tiny_pipeline, options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        tiny_pipeline.text_to_image(["a"], height=32, width=32, **options)


def test_cli_fast_flags(tmp_path, capsys) -> None:
    out = tmp_path / "fast.png"
    assert main(["generate", "a star", "-o", str(out), "--size", "32", "--seed", "2", "--fast", *TINY]) == 0
    with Image.open(out) as image:
        settings = json.loads(image.text["settings"])
    assert settings["fast"] is True and settings["head_solver"] == "dpm++2m" and settings["steps"] == 2
    out = tmp_path / "exact.png"
    assert main(["generate", "a star", "-o", str(out), "--size", "32", "--exact", "--head-anneal", "0.5", *TINY]) == 0
    with Image.open(out) as image:
        settings = json.loads(image.text["settings"])
    assert settings["fast"] is False and settings["head_anneal"] == 0.5 and settings["guidance_interval"] == 1
    capsys.readouterr()
    assert main(["generate", "a star", "-o", str(tmp_path / "x.png"), "--head-anneal", "0", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--head-anneal 0" in err and err.count("\n") == 1
    assert main(["generate", "a star", "-o", str(tmp_path / "x.png"), "--guidance-interval", "0", *TINY]) == 2
    assert "--guidance-interval 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: --fast and --exact exclude each other
        main(["generate", "a star", "-o", str(tmp_path / "x.png"), "--fast", "--exact", *TINY])
    assert exit_info.value.code == 2
