"""Every user mistake is one clear line, never a wrong picture (CLI and Python API).

The CLI table runs `unipic.cli.main` in-process: each case must exit with code 2, print exactly one
line on stderr with no traceback, and leave the folder exactly as it was (no output file, nothing
changed). Cases marked "before load" point --model at a missing folder: had the model been
loaded first, the message would be about the model, so the expected message proves the order.
The API table checks that the same mistakes raise `UserError` naming the argument.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unipic
from unipic.api import UserError
from unipic.cli import main
from unipic.images import open_image, to_rgb
from unipic.io_utils import read_image_metadata

TINY = ["--model", "tiny-random", "--steps", "2", "--head-steps", "2", "--quiet"]
GREY = (128, 128, 128)


# ---------------------------------------------------------------------------------------------
# Inputs the cases need
# ---------------------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height pixels but holds no image data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _image(t: Path) -> str:
    path = t / "in" / "source.png"
    if not path.exists():
        Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return str(path)


def _file(t: Path, name: str = "a-file.txt") -> Path:
    path = t / "in" / name
    path.write_text("not a folder")
    return path


def _latin1_prompts(t: Path) -> str:
    path = t / "in" / "prompts.txt"
    path.write_bytes('[{"prompt": "a caf\xe9 with a red circle"}]'.encode("latin-1"))
    return str(path)


def _prompts(t: Path, *prompts: str) -> str:
    path = t / "in" / "prompts.json"
    path.write_text(json.dumps([{"prompt": p} for p in prompts]))
    return str(path)


def _broken_model(t: Path, tiny_folder: Path, how: str) -> str:
    folder = t / "in" / f"model-{how}"
    shutil.copytree(tiny_folder, folder)
    if how == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif how == "wrong-type":
        config = json.loads((folder / "config.json").read_text())
        config["llm"]["hidden_size"] = "64"
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    return str(folder)


def _existing_output(t: Path) -> str:
    out = t / "out" / "taken.png"
    out.parent.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    return str(out)


def _second_image_taken(t: Path) -> str:
    """-o out/x.png with -n 2 writes x-0.png and x-1.png; make x-1.png exist already."""
    taken = Path(_existing_output(t))
    taken.rename(taken.with_name("taken-1.png"))
    return str(taken)


def _missing_model(t: Path) -> list[str]:
    return ["--model", str(t / "in" / "no-such-model")]


# (id, argv builder taking (tmp_path, tiny model folder), expected fragment of the one stderr line)
CLI_CASES = [
    # wrong results with exit 0, before the fix
    ("cfg-nan", lambda t, m: ["generate", "a", "--cfg", "nan", "-o", str(t / "out" / "o.png"), *_missing_model(t)],
     "--cfg nan: must be a finite number"),
    ("cfg-inf", lambda t, m: ["generate", "a", "--cfg", "inf", "-o", str(t / "out" / "o.png"), *_missing_model(t)],
     "--cfg inf: must be a finite number"),
    ("cfg-huge", lambda t, m: ["generate", "a", "--cfg", "1e6", "-o", str(t / "out" / "o.png"), *_missing_model(t)],
     "--cfg 1000000.0: must be a finite number >= 0 and <= 100"),
    ("cfg-negative", lambda t, m: ["edit", _image(t), "x", "--cfg", "-1", "-o", str(t / "out" / "o.png"),
                                   *_missing_model(t)], "--cfg -1.0"),
    ("temperature-nan", lambda t, m: ["generate", "a", "--temperature", "nan", "-o", str(t / "out" / "o.png"),
                                      *_missing_model(t)], "--temperature nan"),
    ("edit-temperature-inf", lambda t, m: ["edit", _image(t), "x", "--temperature", "inf", "-o",
                                           str(t / "out" / "o.png"), *_missing_model(t)], "--temperature inf"),
    ("batch-size-negative", lambda t, m: ["generate", "a", "--batch-size", "-1", "-o", str(t / "out" / "o.png"),
                                          *_missing_model(t)], "--batch-size -1: must be an integer >= 1"),
    ("batch-size-zero", lambda t, m: ["generate", "a", "--batch-size", "0", "-o", str(t / "out" / "o.png"),
                                      *_missing_model(t)], "--batch-size 0"),
    ("batch-size-zero-prompt-file", lambda t, m: ["generate", "--prompt-file", _prompts(t, "a"), "--batch-size", "0",
                                                  "-o", str(t / "out"), *_missing_model(t)], "--batch-size 0"),
    ("max-new-tokens-zero", lambda t, m: ["caption", _image(t), "--max-new-tokens", "0", *_missing_model(t)],
     "--max-new-tokens 0: must be an integer >= 1"),
    ("images-per-prompt-zero", lambda t, m: ["generate", "a", "-n", "0", "-o", str(t / "out" / "o.png")],
     "--images-per-prompt 0"),
    ("existing-output", lambda t, m: ["generate", "a", "-o", _existing_output(t), *_missing_model(t)],
     "already exists; pass --overwrite"),
    ("existing-output-n2", lambda t, m: ["generate", "a", "-n", "2", "-o", _second_image_taken(t),
                                         *_missing_model(t)], "taken-1.png already exists"),
    ("edit-existing-output", lambda t, m: ["edit", _image(t), "x", "-o", _existing_output(t), *_missing_model(t)],
     "already exists"),
    # tracebacks before the fix
    ("decompression-bomb", lambda t, m: ["edit", str(_png_header_only(t / "in" / "bomb.png", 30000, 30000)), "x",
                                         "-o", str(t / "out" / "o.png"), *_missing_model(t)], "is too large"),
    ("decompression-bomb-warning-band", lambda t, m: ["caption", str(_png_header_only(t / "in" / "big.png", 12000,
                                                                                      12000)), *_missing_model(t)],
     "the limit is"),
    ("latin1-prompt-file", lambda t, m: ["generate", "--prompt-file", _latin1_prompts(t), "-o", str(t / "out"),
                                         *_missing_model(t)], "is not UTF-8 text"),
    ("seed-overflow", lambda t, m: ["generate", "a", "--seed", str(10**23), "-o", str(t / "out" / "o.png"),
                                    *_missing_model(t)], "--seed 100000000000000000000000: must be an integer from 0"),
    ("seed-negative", lambda t, m: ["generate", "a", "--seed", "-1", "-o", str(t / "out" / "o.png"),
                                    *_missing_model(t)], "--seed -1"),
    ("seed-float-syntax", lambda t, m: ["generate", "a", "--seed", "1e23", "-o", str(t / "out" / "o.png")],
     "invalid int value: '1e23'"),
    ("size-beyond-positions", lambda t, m: ["generate", "a", "--size", "100000", "-o", str(t / "out" / "o.png"), *TINY],
     "the largest square size it can draw is"),
    ("size-zero", lambda t, m: ["generate", "a", "--size", "0", "-o", str(t / "out" / "o.png"), *_missing_model(t)],
     "--size 0: must be an integer >= 16"),
    ("size-not-multiple", lambda t, m: ["generate", "a", "--size", "100", "-o", str(t / "out" / "o.png"),
                                        *_missing_model(t)], "use --size 96"),
    ("edit-input-resize-unknown", lambda t, m: ["edit", _image(t), "x", "--input-resize", "pad", "-o",
                                                str(t / "out" / "o.png"), *_missing_model(t)],
     "--input-resize 'pad': must be one of 'stretch', 'crop'"),
    ("steps-zero", lambda t, m: ["generate", "a", "--steps", "0", "-o", str(t / "out" / "o.png"), *_missing_model(t)],
     "--steps 0"),
    ("head-steps-beyond-training", lambda t, m: ["generate", "a", "-o", str(t / "out" / "o.png"), "--size", "32",
                                                 "--model", "tiny-random", "--head-steps", "5000"],
     "head_steps=5000: must be an integer from 1 to 1000"),
    ("output-under-a-file", lambda t, m: ["generate", "a", "-o", str(_file(t) / "o.png"), *_missing_model(t)],
     "is a file, so no folder can be made there"),
    ("edit-output-under-a-file", lambda t, m: ["edit", _image(t), "x", "-o", str(_file(t) / "sub" / "o.png"),
                                               *_missing_model(t)], "is a file"),
    ("output-wrong-suffix", lambda t, m: ["generate", "a", "-o", str(t / "out" / "o.txt")], "ending in .png"),
    ("batch-output-is-a-file", lambda t, m: ["generate", "--prompt-file", _prompts(t, "a"), "-o", str(_file(t)),
                                             *_missing_model(t)], "is a file; with --prompt-file, -o names a folder"),
    ("batch-output-under-a-file", lambda t, m: ["generate", "--prompt-file", _prompts(t, "a"), "-o",
                                                str(_file(t) / "outdir"), *_missing_model(t)], "is a file"),
    ("caption-sample-temperature-zero", lambda t, m: ["caption", _image(t), "--sample", "--temperature", "0",
                                                      *_missing_model(t)], "--temperature 0.0: must be a finite number > 0"),
    ("caption-sample-temperature-negative", lambda t, m: ["caption", _image(t), "--sample", "--temperature", "-1",
                                                          *_missing_model(t)], "--temperature -1.0"),
    ("caption-temperature-without-sample", lambda t, m: ["caption", _image(t), "--temperature", "0.5",
                                                         *_missing_model(t)], "applies only with --sample"),
    ("model-truncated-safetensors", lambda t, m: ["generate", "a", "-o", str(t / "out" / "o.png"), "--size", "32",
                                                  "--model", _broken_model(t, m, "truncated")], "is truncated"),
    ("model-config-wrong-type", lambda t, m: ["generate", "a", "-o", str(t / "out" / "o.png"), "--model",
                                              _broken_model(t, m, "wrong-type")], "hidden_size = '64' should be int"),
    ("model-no-tokenizer", lambda t, m: ["caption", _image(t), "--model", _broken_model(t, m, "no-tokenizer")],
     "has no tokenizer.json"),
    ("model-is-a-file", lambda t, m: ["generate", "a", "-o", str(t / "out" / "o.png"), "--model",
                                      str(Path(m) / "model.safetensors")], "is a file; give the model folder"),
    ("image-is-a-folder", lambda t, m: ["edit", str(t / "in"), "x", "-o", str(t / "out" / "o.png"),
                                        *_missing_model(t)], "is a folder; give an image file"),
    ("caption-image-is-a-folder", lambda t, m: ["caption", str(t / "in"), *_missing_model(t)], "is a folder"),
    ("prompt-file-is-a-folder", lambda t, m: ["generate", "--prompt-file", str(t / "in"), "-o", str(t / "out")],
     "--prompt-file"),
    ("metadata-is-a-folder", lambda t, m: ["eval", "geneval", "--metadata", str(t / "in"), "--out", str(t / "out"),
                                           "--model", "shapes-oracle"], "is a folder"),
    ("eval-size-zero", lambda t, m: ["eval", "t2i", "--size", "0", "--out", str(t / "out"), *_missing_model(t)],
     "--size 0"),
    ("eval-batch-size-zero", lambda t, m: ["eval", "i2t", "--batch-size", "0", "--out", str(t / "out"),
                                           *_missing_model(t)], "--batch-size 0"),
    ("eval-limit-zero", lambda t, m: ["eval", "dpg", "--limit", "0", "--out", str(t / "out"), *_missing_model(t)],
     "--limit 0"),
    ("eval-out-is-a-file", lambda t, m: ["eval", "edit", "--out", str(_file(t)), *_missing_model(t)],
     "is a file; give a folder"),
    ("eval-seed-negative", lambda t, m: ["eval", "geneval", "--seed", "-3", "--out", str(t / "out"),
                                         *_missing_model(t)], "--seed -3"),
    ("prompt-too-long", lambda t, m: ["generate", "a" * 5000, "-o", str(t / "out" / "o.png"), *TINY],
     "prompts[0] is too long"),
    ("batch-prompt-too-long", lambda t, m: ["generate", "--prompt-file", _prompts(t, "ok", "b" * 5000), "-o",
                                            str(t / "out"), "--size", "32", *TINY], "prompts[1] is too long"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("argv, message", [pytest.param(a, m, id=i) for i, a, m in CLI_CASES])
def test_cli_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, tiny_model_folder, argv, message):
    (tmp_path / "in").mkdir()
    args = argv(tmp_path, tiny_model_folder)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and message in lines[0], captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert _snapshot(tmp_path) == before, "a failed command must leave no file behind and change none"


# ---------------------------------------------------------------------------------------------
# API: the same mistakes raise UserError naming the argument
# ---------------------------------------------------------------------------------------------

RGB8 = Image.new("RGB", (8, 8))
API_CASES = [
    ("cfg-nan", lambda p: p.text_to_image(["a"], cfg=float("nan")), "cfg=nan"),
    ("cfg-inf", lambda p: p.text_to_image(["a"], cfg=float("inf")), "cfg=inf"),
    ("edit-cfg-negative", lambda p: p.edit_image([RGB8], ["x"], cfg=-2), "cfg=-2"),
    ("temperature-nan", lambda p: p.text_to_image(["a"], temperature=float("nan")), "temperature=nan"),
    ("temperature-string", lambda p: p.text_to_image(["a"], temperature="hot"), "temperature='hot'"),
    ("batch-size-zero", lambda p: p.text_to_image(["a"], batch_size=0), "batch_size=0"),
    ("batch-size-negative", lambda p: p.text_to_image(["a"], batch_size=-1), "batch_size=-1"),
    ("edit-batch-size-zero", lambda p: p.edit_image([RGB8], ["x"], batch_size=0), "batch_size=0"),
    ("caption-batch-size-zero", lambda p: p.image_to_text([RGB8], ["x"], batch_size=0), "batch_size=0"),
    ("images-per-prompt-zero", lambda p: p.text_to_image(["a"], images_per_prompt=0), "images_per_prompt=0"),
    ("seed-string", lambda p: p.text_to_image(["a"], seed="abc"), "seed='abc'"),
    ("seed-float", lambda p: p.text_to_image(["a"], seed=1.5), "seed=1.5"),
    ("seed-overflow", lambda p: p.text_to_image(["a"], seed=10**23), "seed=100000000000000000000000"),
    ("caption-seed-string", lambda p: p.image_to_text([RGB8], ["x"], seed="abc"), "seed='abc'"),
    ("image-path-string", lambda p: p.edit_image(["photo.png"], ["x"]), "images[0] has type str"),
    ("image-none", lambda p: p.edit_image([None], ["x"]), "images[0] has type NoneType"),
    ("image-numpy", lambda p: p.image_to_text([np.zeros((8, 8, 3), np.uint8)], ["x"]), "images[0] has type ndarray"),
    ("images-not-a-list", lambda p: p.edit_image(RGB8, ["x"]), "images must be a list of PIL images"),
    ("images-none", lambda p: p.image_to_text(None, ["x"]), "images must be a list"),
    ("max-new-tokens-zero", lambda p: p.image_to_text([RGB8], ["x"], max_new_tokens=0), "max_new_tokens=0"),
    ("max-new-tokens-beyond-positions", lambda p: p.image_to_text([RGB8], ["x"], max_new_tokens=10**6),
     "max_new_tokens=1000000"),
    ("sample-temperature-zero", lambda p: p.image_to_text([RGB8], ["x"], do_sample=True, temperature=0),
     "temperature=0"),
    ("temperature-without-sampling", lambda p: p.image_to_text([RGB8], ["x"], temperature=0.5),
     "temperature=0.5 applies only when sampling"),
    ("size-beyond-positions", lambda p: p.text_to_image(["a"], height=100000, width=100000), "height=100000"),
    ("size-zero", lambda p: p.text_to_image(["a"], width=0), "width=0"),
    ("steps-and-num-iter-differ", lambda p: p.text_to_image(["a"], steps=2, num_iter=3), "one setting"),
    ("prompt-too-long", lambda p: p.text_to_image(["a" * 5000]), "prompts[0] is too long"),
    ("instruction-too-long", lambda p: p.edit_image([RGB8], ["a" * 5000]), "instructions[0] is too long"),
    ("question-too-long", lambda p: p.image_to_text([RGB8], ["a" * 5000]), "questions[0] is too long"),
    ("cfg-schedule", lambda p: p.text_to_image(["a"], cfg_schedule="cosine"), "cfg_schedule='cosine'"),
]


@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=i) for i, c, m in API_CASES])
def test_api_mistake_raises_user_error_naming_the_argument(tiny_pipeline, call, message):
    with pytest.raises(UserError) as raised:
        call(tiny_pipeline)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("call, message", [
    (lambda p: p.text_to_image(["a"], seed="abc"), "seed='abc'"),
    (lambda p: p.edit_image(["photo.png"], ["x"]), "images[0] has type str"),
    (lambda p: p.image_to_text([None], ["x"]), "images[0] has type NoneType"),
    (lambda p: p.text_to_image(["a"], images_per_prompt=0), "images_per_prompt=0"),
])
def test_the_oracle_checks_the_same_way(call, message):
    from unipic.world.oracle import ShapesOracle

    with pytest.raises(UserError, match=re.escape(message)):
        call(ShapesOracle())


def test_non_finite_samples_are_an_error_not_a_black_image(tiny_pipeline, monkeypatch):
    import unipic.unipic1.pipeline as pipeline_module

    def poisoned(*args, **kwargs):
        import torch

        return torch.full((1, 3, 32, 32), float("nan"))

    monkeypatch.setattr(pipeline_module, "generate_images", poisoned)
    with pytest.raises(UserError, match="non-finite pixels"):
        tiny_pipeline.text_to_image(["a"], height=32, width=32)


def test_sizes_beyond_memory_are_refused_before_allocating(tiny_pipeline, monkeypatch):
    import unipic.unipic1.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "available_memory", lambda device: 4 * 1024**2)
    with pytest.raises(UserError, match=r"height=256, width=256: decoding 1 image\(s\) of 256x256 needs at least .* "
                                        r"4 MiB free; the largest square size that fits is about 128"):
        tiny_pipeline.text_to_image(["a"], height=256, width=256)


def test_settings_are_resolved_once_each(tiny_pipeline):
    request = tiny_pipeline.check_inputs("text_to_image", ["a red circle"], height=64, width=32, num_iter=2)
    assert request.settings == {"height": 64, "width": 32, "steps": 2, "cfg": 3.0, "cfg_schedule": "constant",
                                "temperature": 1.0, "head_steps": 10, "batch_size": 8, "fast": False,
                                "head_anneal": 1.0, "guidance_interval": 1, "uncond_interval": 1, "head_solver": "ddpm"}
    edit = tiny_pipeline.check_inputs("edit_image", ["Remove it."], [RGB8])
    assert edit.settings["temperature"] == tiny_pipeline.config.sampling.edit_temperature


# ---------------------------------------------------------------------------------------------
# Image modes: every one converted to the RGB it means
# ---------------------------------------------------------------------------------------------


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
    if transparent:
        image.info["transparency"] = 1
    return image


def _with_alpha(image: Image.Image, alpha: int) -> Image.Image:
    image.putalpha(Image.new("L", image.size, alpha))
    return image


def _sixteen_bit(mode: str, value: int) -> Image.Image:
    array = np.full((4, 4), value, dtype=">u2" if mode == "I;16B" else "<u2")
    return Image.frombytes(mode, (4, 4), array.tobytes())


MODE_CASES = [
    ("L", lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
    ("1", lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
    ("I;16", lambda: _sixteen_bit("I;16", 30000), (117, 117, 117)),
    ("I;16B", lambda: _sixteen_bit("I;16B", 65535), (255, 255, 255)),
    ("I-sixteen-bit-range", lambda: Image.new("I", (4, 4), 65535), (255, 255, 255)),
    ("I-eight-bit-range", lambda: Image.new("I", (4, 4), 100), (100, 100, 100)),
    ("F-unit-range", lambda: Image.new("F", (4, 4), 0.5), (128, 128, 128)),
    ("P", lambda: _palette(False), (200, 30, 30)),
    ("P-transparent", lambda: _palette(True), GREY),
    ("PA-transparent", lambda: _with_alpha(_palette(False).convert("PA"), 0), GREY),
    ("PA-opaque", lambda: _with_alpha(_palette(False).convert("PA"), 255), (200, 30, 30)),
    ("La-premultiplied", lambda: Image.new("LA", (4, 4), (90, 255)).convert("La"), (90, 90, 90)),
    ("LA-opaque", lambda: Image.new("LA", (4, 4), (90, 255)), (90, 90, 90)),
    ("LA-transparent", lambda: Image.new("LA", (4, 4), (90, 0)), GREY),
    ("RGBA-transparent", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), GREY),
    ("RGBA-half", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (192, 64, 64)),
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ("YCbCr", lambda: Image.new("YCbCr", (4, 4), (76, 85, 255)), (255, 0, 0)),
    ("HSV", lambda: Image.new("HSV", (4, 4), (0, 255, 255)), (255, 0, 0)),
    ("LAB", lambda: Image.new("LAB", (4, 4), (255, 128, 128)), (255, 255, 255)),
]


@pytest.mark.parametrize("make, expected", [pytest.param(f, e, id=i) for i, f, e in MODE_CASES])
def test_every_mode_becomes_the_rgb_it_means(make, expected):
    rgb = to_rgb(make(), GREY)
    assert rgb.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(rgb.getpixel((1, 1)), expected)), rgb.getpixel((1, 1))


def test_files_of_every_kind_open_as_the_rgb_they_mean(tmp_path, tiny_pipeline):
    # 16-bit greyscale PNG: was read as all white.
    sixteen = tmp_path / "grey16.png"
    Image.fromarray(np.full((6, 6), 30000, dtype=np.uint16)).save(sixteen)
    # Animated GIF: the first frame (red), whatever frame the file was left on.
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (6, 6), c) for c in ((220, 30, 30), (30, 70, 220))]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
    # EXIF orientation 6 (rotate 90°): a 6x4 photo is seen upright as 4x6.
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (6, 4), (30, 160, 50)).save(rotated, exif=exif.tobytes())
    [grey16, anim, upright] = tiny_pipeline.check_inputs(
        "image_to_text", ["a", "b", "c"], [open_image(sixteen), open_image(gif), open_image(rotated)]).images
    assert grey16.getpixel((0, 0)) == (117, 117, 117)
    assert anim.getpixel((0, 0)) == (220, 30, 30)
    assert upright.size == (4, 6)
    with Image.open(gif) as image:
        image.seek(1)
        assert to_rgb(image).getpixel((0, 0)) == (220, 30, 30)
        assert image.tell() == 1, "the caller's frame is restored"


# ---------------------------------------------------------------------------------------------
# Overwrite and resume: the files on disk are what the last request asked for
# ---------------------------------------------------------------------------------------------


def _record(path: Path) -> dict:
    found = read_image_metadata(path)
    return {**found, "settings": json.loads(found["settings"])}


def test_single_output_is_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(["generate", "a red circle", "-o", str(out), "--size", "32", "--seed", "1", *TINY]) == 0
    before = out.read_bytes()
    assert main(["generate", "a blue star", "-o", str(out), "--size", "32", "--seed", "2", *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["generate", "a blue star", "-o", str(out), "--size", "32", "--seed", "2", "--overwrite", *TINY]) == 0
    record = _record(out)
    assert record["prompt"] == "a blue star" and record["seed"] == "2"


def test_batch_resumes_only_the_same_request(tmp_path, capsys):
    out = tmp_path / "outdir"
    prompts = _prompts_file(tmp_path, "a red circle", "a blue star")

    def request(*extra: str, size: str = "32", prompt_file: str = prompts) -> list[str]:
        return ["generate", "--prompt-file", prompt_file, "-o", str(out), "--size", size, *TINY, *extra]

    assert main(request()) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000.png", "00001.png"]
    assert [_record(out / n)["seed"] for n in names] == ["0", "1"], "the default batch seed is 0 (as --help says)"
    stamps = _snapshot(out)
    capsys.readouterr()

    # The same request again: everything skipped, nothing rewritten.
    assert main(request()) == 0
    assert "skipped 2 prompt(s) already made by this request" in capsys.readouterr().out
    assert _snapshot(out) == stamps

    # A different request into the same folder: refused in one line, files untouched.
    for changed_request, difference in ((request("--cfg", "5"), "cfg 3.0 -> 5.0"), (request("--seed", "7"), "seed"),
                                        (request(size="48"), "height 32 -> 48")):
        assert main(changed_request) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "made by a different request" in err[0] and difference in err[0], err
        assert "--overwrite" in err[0]
        assert _snapshot(out) == stamps
    changed = _prompts_file(tmp_path, "a red circle", "a white cross")
    assert main(request(prompt_file=changed)) == 2
    assert "00001.png: prompt 'a blue star' -> 'a white cross'" in capsys.readouterr().err
    assert _snapshot(out) == stamps

    # With --overwrite only the changed prompt is redrawn; the files match the last request.
    assert main(request("--overwrite", prompt_file=changed)) == 0
    assert _snapshot(out)["00000.png"] == stamps["00000.png"]
    assert _record(out / "00001.png")["prompt"] == "a white cross"

    # A shorter prompt file, -n 2 and a new cfg: stale names are removed, the rest redrawn.
    shorter = _prompts_file(tmp_path, "a red circle")
    assert main(request("-n", "2", "--cfg", "2", "--overwrite", prompt_file=shorter)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000_0.png", "00000_1.png"]
    for k, name in enumerate(["00000_0.png", "00000_1.png"]):
        record = _record(out / name)
        assert record["prompt"] == "a red circle" and record["index"] == str(k)
        assert record["settings"]["cfg"] == 2.0 and record["settings"]["height"] == 32


def _prompts_file(tmp_path: Path, *prompts: str) -> str:
    path = tmp_path / f"prompts-{len(list(tmp_path.glob('prompts-*')))}.json"
    path.write_text(json.dumps([{"prompt": p} for p in prompts]))
    return str(path)


# ---------------------------------------------------------------------------------------------
# What outputs record, warnings, caption --quiet, eval's plan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_outputs_record_exactly_the_settings_used(tmp_path, suffix):
    out = tmp_path / f"o{suffix}"
    assert main(["generate", "a café", "-o", str(out), "--size", "32", "--cfg", "2.5", "--seed", "3", *TINY]) == 0
    found = read_image_metadata(out)
    settings = json.loads(found["settings"], parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert settings == {"height": 32, "width": 32, "steps": 2, "cfg": 2.5, "cfg_schedule": "constant",
                        "temperature": 1.0, "head_steps": 2, "batch_size": 8, "fast": False, "head_anneal": 1.0,
                        "guidance_interval": 1, "uncond_interval": 1, "head_solver": "ddpm",
                        "device": "cpu", "dtype": "float32"}
    assert found["prompt"] == "a café" and found["seed"] == "3" and found["model"] == "tiny-random"


def test_sampling_raises_no_warnings(tiny_pipeline):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' past_key_values FutureWarning included
        [[image]] = tiny_pipeline.text_to_image(["a red circle"], height=32, width=32, steps=2, head_steps=2, seed=0)
        tiny_pipeline.edit_image([image], ["Remove the circle."], height=32, width=32, steps=2, head_steps=2, seed=0)
        tiny_pipeline.image_to_text([image], ["What is it?"], max_new_tokens=2)


def test_caption_takes_quiet_and_help_states_the_policies(tmp_path, capsys):
    source = tmp_path / "s.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(source)
    assert main(["caption", str(source), "--model", "tiny-random", "--max-new-tokens", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside --prompt-file
    assert "0with--prompt-file" in text and "--overwrite" in text and "EXIF" in text


def test_eval_says_up_front_how_much_it_will_draw(tmp_path, capsys):
    from unipic.eval.t2i import generate_geneval, shapes_eval_metadata
    from unipic.world.oracle import ShapesOracle

    metadata = shapes_eval_metadata(1, 0)[:2]
    generate_geneval(ShapesOracle(), metadata, tmp_path, images_per_prompt=3, size=128)
    assert "6 images to draw" in capsys.readouterr().err
    generate_geneval(ShapesOracle(), metadata, tmp_path, images_per_prompt=3, size=128)
    assert "0 images to draw (2 already done, skipped)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real command line, in a subprocess (a few cases: each costs seconds of imports)
# ---------------------------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess:
    # Import the code under test, whatever unipic is installed in the environment.
    source = str(Path(unipic.__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=source + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "unipic", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_subprocess_mistake_is_one_line(tmp_path, tiny_model_folder):
    (tmp_path / "in").mkdir()
    # The model-loading path: library imports and loaders must add nothing to the one line.
    result = _run("generate", "a", "-o", str(tmp_path / "o.png"), "--size", "32",
                  "--model", _broken_model(tmp_path, tiny_model_folder, "truncated"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "is truncated" in result.stderr, result.stderr
    assert not (tmp_path / "o.png").exists()
