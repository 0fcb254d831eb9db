"""UniPic-3 from the command line: multi-image edits, the options of the release folders, the batch
(resumable, with its files named per job), conversion, and the one-line mistakes (issue 38)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from unipic.cli import main
from unipic.io_utils import read_image_metadata


@pytest.fixture
def inputs(tmp_path, images_of):
    """Three input files of different sizes."""
    paths = []
    for index, image in enumerate(images_of([(96, 64), (64, 64), (48, 80)])):
        paths.append(tmp_path / f"in{index}.png")
        image.save(paths[-1])
    return paths


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert all(n in err[0] for n in needles), err[0]
    return err[0]


def test_edit_composes_several_images_and_records_them(tmp_path, inputs, capsys):
    out = tmp_path / "out.png"
    argv = ["edit", *map(str, inputs[:2]), "Put the second picture into the first.", "--model",
            "unipic3-tiny-random", "--variant", "dmd", "--seed", "3", "--quiet", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    record = read_image_metadata(out)
    assert json.loads(record["sources"]) == [str(p) for p in inputs[:2]]
    settings = json.loads(record["settings"])
    assert settings["variant"] == "dmd" and settings["num_inference_steps"] == 8 and settings["cfg"] == 4.0
    # The first input's budgeted size (tiny budget 128², 96x64 -> 128x96 after rounding to 32s), as pixels.
    assert Image.open(out).size == tuple(settings["output_sizes"][0])
    again = tmp_path / "again.png"
    assert main([*argv[:-1], str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()  # same seed, same picture
    sized = tmp_path / "sized.png"
    assert main([*argv[:-2], "--height", "64", "--width", "96", "-o", str(sized), "--negative-prompt", "blurry"]) == 0
    assert Image.open(sized).size == (96, 64)
    assert json.loads(read_image_metadata(sized)["settings"])["negative_prompt"] == "blurry"


@pytest.mark.parametrize("argv, needles", [
    (lambda p, t: ["edit", *[str(p[0])] * 7, "x", "--model", "unipic3-tiny-random"], ("7 images", "1 to 6")),
    (lambda p, t: ["edit", "Make it blue.", "--model", "unipic3-tiny-random"], ("at least one IMAGE",)),
    (lambda p, t: ["edit", str(t / "missing.png"), "x", "--model", "unipic3-tiny-random"], ("not found",)),
    (lambda p, t: ["edit", str(p[0]), str(p[1]), "x", "--model", "tiny-random"], ("UniPic-1", "2 were given")),
    (lambda p, t: ["generate", "a cat", "--model", "unipic3-tiny-random"], ("no text-to-image",)),
])
def test_mistakes_are_one_line_and_exit_2(tmp_path, inputs, capsys, argv, needles):
    assert main([*argv(inputs, tmp_path), "-o", str(tmp_path / "o.png")]) == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "o.png").exists()


def test_unreadable_image_is_one_line(tmp_path, inputs, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["edit", str(inputs[0]), str(broken), "x", "--model", "unipic3-tiny-random", "-o",
                 str(tmp_path / "o.png")]) == 2
    _one_line_error(capsys, "broken.png", "not a readable image")


def test_release_folders_from_the_command_line(tmp_path, layouts, inputs, capsys):
    out = tmp_path / "cm.png"
    assert main(["edit", str(inputs[0]), "x", "--model", str(layouts["cm"]), "-o", str(out)]) == 2
    _one_line_error(capsys, "--base")
    assert main(["edit", str(inputs[0]), "x", "--model", str(layouts["cm"]), "--base", str(layouts["base"]),
                 "--steps", "2", "--quiet", "-o", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(read_image_metadata(out)["settings"])["variant"] == "cm"
    assert main(["edit", str(inputs[0]), "x", "--model", "tiny-random", "--variant", "dmd", "-o",
                 str(tmp_path / "u1.png")]) == 2
    _one_line_error(capsys, "UniPic-3 models only")
    converted = tmp_path / "dmd-converted"
    assert main(["convert", "--unipic3", str(layouts["dmd"]), "--out", str(converted)]) == 0
    assert list((converted / "transformer").glob("*.safetensors")) and not list(converted.rglob("*.bin"))
    assert json.loads((converted / "unipic3.json").read_text())["variant"] == "dmd"
    plain = tmp_path / "converted.png"
    assert main(["edit", str(inputs[0]), "x", "--model", str(converted), "--steps", "2", "--quiet", "-o",
                 str(plain)]) == 0, capsys.readouterr().err  # no --variant, --base or --ema needed now


def test_batch_of_edits_resumes_and_refuses_another_request(tmp_path, inputs, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(row) for row in [
        {"images": [inputs[0].name, inputs[1].name], "instruction": "Put the second picture into the first."},
        {"image": str(inputs[2]), "instruction": "Make it darker."},
    ]) + "\n")
    out = tmp_path / "batch"
    argv = ["edit", "--prompt-file", str(jobs), "--model", "unipic3-tiny-random", "--variant", "dmd", "--steps", "2",
            "--quiet", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "wrote 2 job(s)" in capsys.readouterr().out
    first, second = out / "00000.png", out / "00001.png"
    assert json.loads(read_image_metadata(first)["sources"]) == [str(inputs[0]), str(inputs[1])]
    assert read_image_metadata(second)["source"] == str(inputs[2]) and read_image_metadata(second)["seed"] == "1"
    second.unlink()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 job(s)" in printed and "wrote 1 job(s)" in printed and second.is_file()
    assert main([*argv, "--cfg", "2"]) == 2
    _one_line_error(capsys, "different request", "cfg")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"images": [], "instruction": "x"}) + "\n")
    assert main(["edit", "--prompt-file", str(bad), "--model", "unipic3-tiny-random", "-o", str(tmp_path / "b")]) == 2
    _one_line_error(capsys, "entry 1", "1 to 6")


def test_quantize_int8_runs_on_the_cpu_through_optimum_quanto(tmp_path, tiny_folder, inputs, capsys):
    """--quantize int8 passes diffusers' and transformers' own QuantoConfig: the transformer's and the
    text encoder's linear layers become quanto QLinear, and the edit still runs. NF4 needs CUDA."""
    from unipic.loading import load_pipeline

    pipeline = load_pipeline(str(tiny_folder), device="cpu", variant="dmd", quantize="int8")
    kinds = {type(m).__name__ for part in (pipeline.pipeline.transformer, pipeline.pipeline.text_encoder)
             for m in part.modules()}
    assert "QLinear" in kinds
    out = tmp_path / "q.png"
    assert main(["edit", str(inputs[0]), "x", "--model", str(tiny_folder), "--variant", "dmd", "--quantize", "int8",
                 "--steps", "2", "--quiet", "-o", str(out)]) == 0, capsys.readouterr().err
    assert Image.open(out).size[0] > 0
    capsys.readouterr()  # a CUDA build of torch warns on stderr when quanto loads its kernels' builder
    assert main(["edit", str(inputs[0]), "x", "--model", str(tiny_folder), "--quantize", "nf4", "-o",
                 str(tmp_path / "n.png")]) == 2
    _one_line_error(capsys, "nf4", "CUDA")
