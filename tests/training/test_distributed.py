"""The same run under `accelerate launch` with 2 CPU processes (DDP over gloo): both replicas end
with identical weights, each process reads its own share of the data, and one checkpoint and one
final model are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two DDP processes under accelerate launch

HERE = Path(__file__).resolve().parent
LAUNCHER = Path(sys.executable).parent / "accelerate"


@pytest.mark.skipif(not LAUNCHER.exists(), reason="accelerate is a test dependency")
def test_two_processes_end_with_identical_replicas(tmp_path):
    from tiny_overrides import TINY

    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(LAUNCHER), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", str(HERE / "ddp_worker.py"), str(HERE.parents[1] / "configs" / "shapes" /
         "joint.yaml"), *TINY, f"out_dir={out}", "train.num_threads=1", "train.max_steps=3",
         "train.checkpoint_every=2", "data.tasks={t2i: 1, i2t: 1, edit: 1}", "optim.ema_decay=0.9"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    digests = [(out / f"digest-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert digests[0][0] == digests[1][0] == "3"
    assert digests[0][1] == digests[1][1], "the two replicas diverged"
    # Each process consumed its own examples (global index k * 2 + rank) and saved its position.
    checkpoint = out / "checkpoints" / "step-0000003"
    positions = [json.loads((checkpoint / f"data-rank{r}.json").read_text())["positions"] for r in (0, 1)]
    assert positions[0] == positions[1] == {"t2i": 2, "i2t": 2, "edit": 2}
    assert json.loads((checkpoint / "trainer.json").read_text())["world_size"] == 2
    assert (out / "checkpoints" / "step-0000002").is_dir() and (out / "final" / "model.safetensors").is_file()
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3  # one writer, not two
