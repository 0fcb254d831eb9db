"""Checkpoints: a run stopped at step k and resumed ends with exactly the weights of an
uninterrupted run (optimizer, EMA, LR schedule, RNG and data positions all restored), and
SIGTERM writes a checkpoint before the process exits."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unipic.api import UserError
from unipic.training.trainer import latest_checkpoint, train

# Mixed tasks, accumulation, EMA and a decaying LR: everything a resume must restore.
RUN = ["stage=joint", "data.tasks={t2i: 1, i2t: 1, edit: 1}", "train.grad_accum=2", "optim.ema_decay=0.9",
       "optim.schedule=cosine", "optim.warmup_ratio=0.2", "train.max_steps=5", "log.every=1",
       "loss.token_probe=1", "loss.object_readout=1", "loss.relation_readout=1"]  # the loss's own trained parts must resume too


def _all_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    final = load_file(str(out_dir / "final" / "model.safetensors"))  # EMA weights
    checkpoint = latest_checkpoint(out_dir)
    raw = load_file(str(checkpoint / "model" / "model.safetensors"))
    ema = load_file(str(checkpoint / "ema.safetensors"))
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    moments = {f"opt.{i}.{k}": v for i, s in optimizer["state"].items() for k, v in s.items()}
    return {**{f"final.{k}": v for k, v in final.items()}, **{f"raw.{k}": v for k, v in raw.items()},
            **{f"ema.{k}": v for k, v in ema.items()}, **moments}


def test_stop_and_resume_equals_an_uninterrupted_run(tiny):
    straight = train(tiny(None, *RUN, out="straight"))
    first = train(tiny(None, *RUN, out="resumed"), stop_at=2)
    assert not first.finished and first.stopped_by == "stop_at" and first.checkpoint.name == "step-0000002"
    with pytest.raises(UserError, match="--resume"):
        train(tiny(None, *RUN, out="resumed"))  # an existing run is never silently overwritten
    second = train(tiny(None, *RUN, out="resumed"), resume=True)
    assert second.finished and second.step == straight.step == 5
    assert second.weights_digest == straight.weights_digest
    for name in ("token_probe.safetensors", "object_readout.safetensors", "relation_readout.safetensors"):
        a, b = (load_file(str(latest_checkpoint(r.out_dir) / name)) for r in (straight, second))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = _all_weights(straight.out_dir), _all_weights(second.out_dir)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # metrics.csv reads as one run: every step once.
    with open(second.out_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(float(r["loss_readout"]) > 0 for r in rows if r["loss_readout"])
    assert any(r["loss_readout"] for r in rows)


def test_resume_without_checkpoint_starts_fresh_and_finished_run_is_a_no_op(tiny):
    config = tiny(None, "stage=pretrain", "train.max_steps=2", out="fresh")
    result = train(config, resume=True)
    assert result.finished and result.step == 2
    again = train(config, resume=True)
    assert again.finished and again.step == 2 and again.weights_digest == result.weights_digest


@pytest.mark.slow  # end to end in a subprocess; the default tier keeps in-process coverage
def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tmp_path):
    from tiny_overrides import TINY

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "unipic", "train", "-", *TINY, f"out_dir={out}", "stage=pretrain",
               "train.max_steps=100000", "train.checkpoint_every=0"]
    command[4] = str(Path(__file__).resolve().parents[2] / "configs" / "shapes" / "pretrain.yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 600  # generous: a loaded CI machine starts slowly
        while time.time() < deadline:  # wait until a few steps are logged
            metrics = out / "metrics.csv"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            if process.poll() is not None:
                pytest.fail(f"training exited early: {process.communicate()[1][-2000:]}")
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-2000:]
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None, stderr[-2000:]
    step = int(checkpoint.name.split("-")[1])
    assert step >= 2
    assert {p.name for p in checkpoint.iterdir()} >= {"model", "optimizer.pt", "ema.safetensors", "trainer.json",
                                                       "rng-rank0.pt", "data-rank0.json", "config.yaml"}
    assert not list(checkpoint.parent.glob(".tmp-*")), "no half-written checkpoint is left behind"
    # Resume it to a nearby end (the remaining steps are not the point here).
    from unipic.training.config import load_config

    config = load_config(command[4], [*TINY, f"out_dir={out}", "stage=pretrain", f"train.max_steps={step + 1}"])
    result = train(config, resume=True)
    assert result.finished and result.step == step + 1


def test_next_stage_continues_with_the_previous_stages_probe(tiny):
    from unipic.training.jobs import PROBE_FILE, UniPicJob

    first = train(tiny(None, "stage=pretrain", "train.max_steps=2", "loss.token_probe=1", out="first"))
    saved = load_file(str(first.out_dir / "final" / PROBE_FILE))
    # The next stage starts from the run's final/ folder and its probe, not from a fresh one.
    job = UniPicJob(tiny(None, "stage=joint", f"model.init_from={first.out_dir}", "loss.token_probe=1",
                         "train.max_steps=1", out="second"), None)
    assert all(torch.equal(job.module.probe.state_dict()[k], v) for k, v in saved.items())
    fresh = UniPicJob(tiny(None, "stage=pretrain", "loss.token_probe=1", out="third"), None)
    assert not torch.equal(fresh.module.probe.linear.weight, saved["linear.weight"])
