"""Inpainting and outpainting: the shared mask helpers, UniPic-1's masked MAR loop, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unipic.api import UserError
from unipic.cli import main
from unipic.inpainting import (
    box_mask,
    check_mask,
    composite,
    feather_alpha,
    grow_mask,
    outpaint_canvas,
    pad_to_multiple,
    parse_box,
    token_grid_mask,
)
from unipic.io_utils import read_image_metadata

FAST = {"steps": 2, "head_steps": 2}
TINY = ["--model", "tiny-random", "--steps", "2", "--head-steps", "2", "--quiet"]


def _noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _box(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Mask helpers
# ---------------------------------------------------------------------------------------------


def test_token_grid_reduction_on_a_non_square_image():
    mask = np.zeros((32, 80), dtype=bool)  # a 2 x 5 token grid of 16-pixel tokens
    mask[17, 33] = True  # one pixel: token (1, 2)
    mask[0:2, 78:80] = True  # the top-right corner: token (0, 4)
    grid = token_grid_mask(mask, 16)
    expected = np.zeros((2, 5), dtype=bool)
    expected[1, 2] = expected[0, 4] = True
    assert grid.shape == (2, 5) and (grid == expected).all()
    # Growing by 1 pixel pulls pixel (17, 33) into the neighbouring token (1, 1)? No: 32 is still token 2;
    # growing by 2 reaches column 31, which is token 1.
    assert not token_grid_mask(grow_mask(mask, 1), 16)[1, 1]
    assert token_grid_mask(grow_mask(mask, 2), 16)[1, 1]


def test_grow_is_a_square_dilation_clipped_at_the_border():
    mask = _box(10, 12, 4, 5, 0, 1)
    grown = grow_mask(mask, 2)
    assert (grown == _box(10, 12, 2, 7, 0, 3)).all()
    assert (grow_mask(mask, 0) == mask).all()


def test_feather_is_zero_outside_and_ramps_inside():
    mask = _box(20, 20, 5, 15, 0, 10)  # touches the left border
    alpha = feather_alpha(mask, 4)
    assert (alpha[~mask] == 0).all()
    assert alpha[5, 5] == pytest.approx(0.25) and alpha[6, 5] == pytest.approx(0.5)  # ramp from the top edge
    assert alpha[10, 0] == pytest.approx(1.0)  # the image border is not an edge
    assert alpha[10, 9] == pytest.approx(0.25)  # the right edge of the mask
    assert (feather_alpha(mask, 0) == mask).all()


def test_composite_keeps_every_unmasked_pixel():
    source, generated = _noise_image(24, 40, 1), _noise_image(24, 40, 2)
    mask = _box(24, 40, 3, 20, 5, 30)
    out = np.asarray(composite(generated, source, feather_alpha(mask, 3)))
    assert (out[~mask] == np.asarray(source)[~mask]).all()
    deep = feather_alpha(mask, 3) == 1
    assert (out[deep] == np.asarray(generated)[deep]).all()


def test_check_mask_accepts_images_and_arrays_and_refuses_bad_ones():
    array = _box(8, 12, 2, 4, 2, 4)
    image = Image.fromarray(np.where(array, 255, 0).astype(np.uint8))
    assert (check_mask(image, (12, 8)) == array).all()
    assert (check_mask(image.convert("RGB"), (12, 8)) == array).all()
    assert (check_mask(torch.from_numpy(array), (12, 8)) == array).all()
    with pytest.raises(UserError, match="12x8 but its image is 8x12"):
        check_mask(array, (8, 12))
    with pytest.raises(UserError, match="empty"):
        check_mask(np.zeros((8, 12), bool), (12, 8))
    with pytest.raises(UserError, match="whole image"):
        check_mask(np.ones((8, 12), bool), (12, 8))
    with pytest.raises(UserError, match="PIL image"):
        check_mask("mask.png", (12, 8))


def test_boxes_and_padding():
    assert parse_box("1, 2,3,4") == (1, 2, 3, 4)
    with pytest.raises(UserError, match="four integers"):
        parse_box("1,2,3")
    assert box_mask((10, 6), (2, 1, 5, 3)).sum() == 6
    with pytest.raises(UserError, match="x0 < x1"):
        box_mask((10, 6), (5, 1, 5, 3))
    image, mask = pad_to_multiple(_noise_image(20, 30), _box(20, 30, 0, 5, 0, 5), 16)
    assert image.size == (32, 32) and mask.shape == (32, 32) and mask.sum() == 25
    canvas, border = outpaint_canvas(_noise_image(16, 32), left=16, bottom=32)
    assert canvas.size == (48, 48) and border.sum() == 48 * 48 - 32 * 16 and not border[0:16, 16:48].any()
    with pytest.raises(UserError, match="multiple of 16; use 16"):
        outpaint_canvas(_noise_image(16, 16), left=10)
    with pytest.raises(UserError, match="nothing to outpaint"):
        outpaint_canvas(_noise_image(16, 16))


# ---------------------------------------------------------------------------------------------
# UniPic-1
# ---------------------------------------------------------------------------------------------


def test_unipic1_keeps_the_source_outside_the_grown_mask(tiny_pipeline):
    source = _noise_image(48, 80)  # non-square, 3 x 5 tokens
    mask = _box(48, 80, 10, 20, 20, 50)
    [out] = tiny_pipeline.inpaint([source], [mask], ["a red circle"], seed=0, grow=3, feather=2, **FAST)
    out, src = np.asarray(out), np.asarray(source)
    grown = grow_mask(mask, 3)
    assert out.shape == src.shape
    assert (out[~grown] == src[~grown]).all()
    assert np.abs(out[mask].astype(int) - src[mask]).mean() > 5  # the masked region was redrawn


def test_unipic1_same_seed_same_result_and_batch_equals_single(tiny_pipeline):
    source, other = _noise_image(32, 48, 3), _noise_image(32, 48, 4)
    masks = [_box(32, 48, 0, 10, 0, 10), _box(32, 48, 20, 32, 30, 48), _box(32, 48, 0, 10, 0, 10)]
    images, prompts, seeds = [source, other, other], ["a star", "a circle", "a cross"], [5, 6, 7]
    batch = tiny_pipeline.inpaint(images, masks, prompts, seed=seeds, **FAST)
    for image, mask, prompt, seed, batched in zip(images, masks, prompts, seeds, batch):
        [single] = tiny_pipeline.inpaint([image], [mask], [prompt], seed=seed, **FAST)
        [again] = tiny_pipeline.inpaint([image], [mask], [prompt], seed=seed, **FAST)
        assert np.array_equal(np.asarray(single), np.asarray(again))
        assert np.array_equal(np.asarray(single), np.asarray(batched))
    [changed] = tiny_pipeline.inpaint([source], [masks[0]], ["a star"], seed=99, **FAST)
    assert not np.array_equal(np.asarray(changed), np.asarray(batch[0]))


def test_exactly_the_one_hidden_token_is_sampled(tiny_model_and_tokenizer):
    from unipic.unipic1.sampling.mar_decode import mar_generate_tokens
    from unipic.unipic1.sampling.text_to_image import build_t2i_prefix

    model, tokenizer = tiny_model_and_tokenizer
    grid = (3, 4)
    known = torch.randn(1, 12, model.config.token_dim, generator=torch.Generator().manual_seed(0))
    hidden = torch.zeros(1, 12, dtype=torch.bool)
    hidden[0, 7] = True
    calls: list[int] = []
    # cond_embed runs once per head call, on that call's conditions (the sampled tokens' rows)
    hook = model.mar.diffloss.net.cond_embed.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        prefix, mask = build_t2i_prefix(model, tokenizer, ["a star"], cfg=3.0, device=model.device)
        tokens = mar_generate_tokens(model, prefix, mask, grid, **_steps_kw(1), cfg=3.0, head_steps=3,
                                     generator=torch.Generator().manual_seed(1), known_tokens=known, hidden=hidden)
    finally:
        hook.remove()
    changed = (tokens != known).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == [7]  # the known tokens come back untouched
    assert calls and set(calls) == {2}  # each head call: one token, conditional + unconditional rows


def test_an_all_hidden_grid_samples_exactly_as_text_to_image(tiny_model_and_tokenizer):
    """Known tokens only change where the loop starts: with none known, the draws and the result are
    text-to-image's (the orders come from the same uniform draw, the schedule runs over every token)."""
    from unipic.unipic1.sampling.mar_decode import mar_generate_tokens
    from unipic.unipic1.sampling.text_to_image import build_t2i_prefix

    model, tokenizer = tiny_model_and_tokenizer
    grid = (2, 3)
    prefix, mask = build_t2i_prefix(model, tokenizer, ["a star", "a cross"], cfg=2.0, device=model.device)
    common = dict(**_steps_kw(3), cfg=2.0, cfg_schedule="linear", head_steps=2)
    plain = mar_generate_tokens(model, prefix, mask, grid, generator=torch.Generator().manual_seed(4), **common)
    known = torch.randn(2, 6, model.config.token_dim)
    masked = mar_generate_tokens(model, prefix, mask, grid, generator=torch.Generator().manual_seed(4),
                                 known_tokens=known, hidden=torch.ones(2, 6, dtype=torch.bool), **common)
    assert torch.equal(plain, masked)
    with pytest.raises(ValueError, match="same, positive number"):
        mar_generate_tokens(model, prefix, mask, grid, known_tokens=known,
                            hidden=torch.tensor([[True] * 6, [True] * 5 + [False]]), **common)


def _steps_kw(steps: int) -> dict:
    """The MAR-steps keyword of `mar_generate_tokens` (named `steps` or `num_iter`)."""
    import inspect

    from unipic.unipic1.sampling.mar_decode import mar_generate_tokens

    name = "steps" if "steps" in inspect.signature(mar_generate_tokens).parameters else "num_iter"
    return {name: steps}


def test_unipic1_outpaint_keeps_the_source_and_bad_inputs_are_user_errors(tiny_pipeline):
    source = _noise_image(32, 32, 5)
    [out] = tiny_pipeline.outpaint([source], ["a star"], left=16, bottom=32, seed=0, **FAST)
    assert out.size == (48, 64)
    assert np.array_equal(np.asarray(out)[0:32, 16:48], np.asarray(source))
    with pytest.raises(UserError, match="one mask per image"):
        tiny_pipeline.inpaint([source], [], ["x"], **FAST)
    with pytest.raises(UserError, match="grow"):
        tiny_pipeline.inpaint([source], [_box(32, 32, 0, 4, 0, 4)], ["x"], grow=-1, **FAST)
    with pytest.raises(UserError, match="unknown inpaint option"):
        tiny_pipeline.inpaint([source], [_box(32, 32, 0, 4, 0, 4)], ["x"], strength=0.5)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _files(tmp_path):
    source = tmp_path / "source.png"
    _noise_image(32, 48).save(source)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(_box(32, 48, 4, 12, 8, 24), 255, 0).astype(np.uint8)).save(mask)
    return source, mask


def test_cli_inpaint_with_a_mask_or_a_box_and_outpaint(tmp_path):
    source, mask = _files(tmp_path)
    out = tmp_path / "a.png"
    assert main(["inpaint", str(source), str(mask), "a star", "-o", str(out), "--seed", "3", *TINY]) == 0
    out_box = tmp_path / "b.png"
    assert main(["inpaint", str(source), "a star", "--box", "8,4,24,12", "-o", str(out_box), "--seed", "3", *TINY]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(out_box)))
    record = read_image_metadata(out)
    assert record["prompt"] == "a star" and record["seed"] == "3" and record["mask"] == str(mask)
    assert '"feather": 4' in record["settings"] and read_image_metadata(out_box)["box"] == "8,4,24,12"
    wide = tmp_path / "c.png"
    assert main(["outpaint", str(source), "a star", "--right", "16", "--top", "16", "-o", str(wide), *TINY]) == 0
    assert Image.open(wide).size == (64, 48)
    assert list(tmp_path.glob(".*.tmp")) == []  # atomic writes leave no temporary files


@pytest.mark.parametrize(("argv", "message"), [
    (lambda s, m, t: ["inpaint", s, str(t / "small.png"), "x"], "is 16x16 but its image is 48x32"),
    (lambda s, m, t: ["inpaint", s, str(t / "empty.png"), "x"], "is empty"),
    (lambda s, m, t: ["inpaint", s, str(t / "full.png"), "x"], "covers the whole image"),
    (lambda s, m, t: ["inpaint", s, "x", "--box", "0,0,48,32"], "covers the whole image"),
    (lambda s, m, t: ["inpaint", str(t / "text.png"), m, "x"], "is not a readable image"),
    (lambda s, m, t: ["inpaint", s, str(t / "text.png"), "x"], "mask .* is not a readable image"),
    (lambda s, m, t: ["inpaint", s, "x", "--box", "1,2"], "four integers"),
    (lambda s, m, t: ["inpaint", s, m, "x", "--box", "1,2,3,4"], "with --box give IMAGE PROMPT only"),
    (lambda s, m, t: ["inpaint", s, "x"], "give IMAGE MASK PROMPT"),
    (lambda s, m, t: ["inpaint", s, m, " "], "the prompt is empty"),
    (lambda s, m, t: ["inpaint", s, m, "x", "--grow", "-2"], "--grow -2"),
    (lambda s, m, t: ["outpaint", s, "x", "--left", "24"], "--left 24: must be a multiple of 16; use 32"),
    (lambda s, m, t: ["outpaint", s, "x"], "nothing to outpaint"),
])
def test_cli_inpaint_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, message):
    import re

    source, mask = _files(tmp_path)
    Image.new("L", (16, 16), 255).save(tmp_path / "small.png")
    Image.new("L", (48, 32), 0).save(tmp_path / "empty.png")
    Image.new("L", (48, 32), 255).save(tmp_path / "full.png")
    (tmp_path / "text.png").write_text("not an image")
    before = sorted(p.name for p in tmp_path.iterdir())
    # A model folder that does not exist: the error must come before any loading.
    code = main([*argv(str(source), str(mask), tmp_path), "-o", str(tmp_path / "out.png"), "--model",
                 str(tmp_path / "no-model")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_inpaint_commands_have_help(capsys):
    for command in ("inpaint", "outpaint"):
        with pytest.raises(SystemExit) as raised:
            main([command, "--help"])
        assert raised.value.code == 0
        text = capsys.readouterr().out
        assert "--grow" in text and "--feather" in text and "--seed" in text


def test_every_family_implements_the_inpainting_protocol(tiny_pipeline):
    from unipic.api import InpaintingPipeline
    from unipic.world.oracle import ShapesOracle

    assert isinstance(tiny_pipeline, InpaintingPipeline) and isinstance(ShapesOracle(), InpaintingPipeline)
