"""Where one training step's time goes, per task, for the embedded preset (or a run's model).

    python research/experiments/profile_step.py --threads 2 --steps 6 --batch 16

Times (median over steps, after one warm-up) of: world rendering and batch building, the frozen
VAE encoding, the MAR encoder, the LLM, the MAR decoder, the diffusion head's loss (forward),
backward, and the AdamW step; prints examples/s per task.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections import defaultdict

import numpy as np
import torch

from unipic.training.build import init_model
from unipic.training.config import DataConfig, ModelConfig
from unipic.training.data import BatchBuilder, TaskData
from unipic.training.jobs import UniPicLoss

PARTS = ("data", "vae", "mar_encoder", "llm", "mar_decoder", "head", "backward", "optimizer")


def _timed(timings: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] += time.perf_counter() - start
        return out
    return wrapper


def profile(task: str, steps: int, batch: int, init_from: str, vae_from: str | None,
            architecture: dict | None = None) -> dict[str, float]:
    """Median seconds per part of one training step of `task` (forward parts are exclusive of nesting)."""
    model, tokenizer = init_model(ModelConfig(init_from=init_from, init_vae_from=vae_from, tokenizer="world"
                                              if init_from == "shapes-embedded" else "auto",
                                              architecture=architecture or {}), seed=0)
    model.train()
    timings: dict[str, float] = defaultdict(float)
    # Wrapped methods: the LLM's time is subtracted from the MAR encoder's caller below.
    model.encode_images = _timed(timings, "vae", model.encode_images)
    model.mar.forward_encoder = _timed(timings, "mar_encoder", model.mar.forward_encoder)
    model.llm.model.forward = _timed(timings, "llm", model.llm.model.forward)
    model.mar.forward_decoder = _timed(timings, "mar_decoder", model.mar.forward_decoder)
    model.mar.diffloss.forward = _timed(timings, "head", model.mar.diffloss.forward)
    loss_module = UniPicLoss(model, {"t2i": 1.0, "i2t": 1.0, "edit": 1.0})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    data_config = DataConfig(batch_size=batch, tasks={task: 1}, world_seed=0)
    data = TaskData(data_config, 0, 1)
    builder = BatchBuilder(model, tokenizer, data_config)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for step in range(steps + 1):
        timings.clear()
        start = time.perf_counter()
        examples = data.next_examples(task)
        b = builder(task, examples, rng)
        timings["data"] = time.perf_counter() - start
        out = loss_module(task, b, gen)
        t = time.perf_counter()
        out["loss"].backward()
        timings["backward"] = time.perf_counter() - t
        t = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings["optimizer"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        if step:  # the first step warms up allocators and kernels
            rows.append(dict(timings))
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in (*PARTS, "total")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per task")
    parser.add_argument("--batch", type=int, default=16, help="examples per step")
    parser.add_argument("--tasks", default="t2i,i2t,edit", help="comma-separated tasks")
    parser.add_argument("--init-from", default="shapes-embedded", help="preset or model folder")
    parser.add_argument("--vae-from", default=None, help="a vae.safetensors")
    parser.add_argument("--architecture", default="{}", help="JSON, as the run file's model.architecture")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for task in args.tasks.split(","):
        t = profile(task, args.steps, args.batch, args.init_from, args.vae_from, json.loads(args.architecture))
        # The LLM runs inside the MAR-encoder wrapper's caller only for t2i/edit (encode_with_llm);
        # forward_encoder itself does not include it, so the parts are disjoint.
        shares = " ".join(f"{k} {t[k] / t['total']:.0%}" for k in PARTS)
        print(f"{task}: {t['total']:.3f} s/step, {args.batch / t['total']:.1f} examples/s | {shares}")


if __name__ == "__main__":
    main()
