"""Batch generation under `accelerate launch` with 2 CPU processes covers every prompt exactly once.

accelerate spells a multi-process launch `--multi_gpu`; on a machine without GPUs it starts CPU processes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # two processes under accelerate launch


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate is a test dependency")
def test_two_process_batch_generation_covers_every_prompt_once(tmp_path):
    prompts = [{"prompt": f"a photo of {n} circles"} for n in ("two", "three", "four", "five", "six")]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "unipic", "generate", "--prompt-file", str(tmp_path / "prompts.json"),
         "-o", str(tmp_path / "out"), "--model", "tiny-random", "--size", "32", "--steps", "2", "--head-steps", "2",
         "--seed", "10", "--quiet"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [int(n) for n in re.findall(r"process \d/2: wrote (\d+) prompt", result.stdout)]
    assert sorted(counts) == [2, 3], result.stdout  # each process wrote its own share
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
    for index, file in enumerate(files):
        with Image.open(file) as image:
            assert image.text["prompt"] == prompts[index]["prompt"]
            assert image.text["seed"] == str(10 + index)


def test_the_readmes_sharded_command_shards_on_a_cpu_machine(tmp_path):
    """The README's `accelerate launch ... -m unipic generate` line, run as written (with the oracle as
    the model): two processes, each writing its share."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [line] = [ln for ln in readme.splitlines() if ln.startswith("accelerate launch") and "unipic generate" in ln]
    argv = shlex.split(line.split("#")[0])
    assert argv[:2] == ["accelerate", "launch"]
    argv[0] = os.path.join(os.path.dirname(sys.executable), "accelerate")
    (tmp_path / "prompts.json").write_text(json.dumps([f"a photo of {n} stars" for n in ("two", "three", "four")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([*argv, "--model", "shapes-oracle", "--quiet"], cwd=tmp_path, capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(re.findall(r"process (\d)/2: wrote", result.stdout)) == ["1", "2"], result.stdout
    assert len(list((tmp_path / "outdir").glob("*.png"))) == 3


def test_two_process_edit_batch_covers_every_job_once(tmp_path):
    """`unipic edit --prompt-file` under `accelerate launch`: each process edits its share of the jobs
    (UniPic-3's several images per job), and every job is written once with its own seed."""
    for index, size in enumerate([(64, 48), (48, 64), (64, 64)]):
        Image.new("RGB", size, (60 * index, 120, 200)).save(tmp_path / f"in{index}.png")
    jobs = [{"images": ["in0.png", "in1.png"], "instruction": "Put the second into the first."},
            {"image": "in2.png", "instruction": "Make it darker."},
            {"images": ["in1.png"], "instruction": "Make it brighter."}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "unipic", "edit", "--prompt-file", str(tmp_path / "jobs.jsonl"),
         "-o", str(tmp_path / "out"), "--model", "unipic3-tiny-random", "--variant", "dmd", "--steps", "2",
         "--seed", "10", "--quiet"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [int(n) for n in re.findall(r"process \d/2: wrote (\d+) job", result.stdout)]
    assert sorted(counts) == [1, 2], result.stdout
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
    for index, file in enumerate(files):
        with Image.open(file) as image:
            assert image.text["instruction"] == jobs[index]["instruction"]
            assert image.text["seed"] == str(10 + index)
