"""Is the diffusion head the ceiling? Train it alone on exact conditions (issue 9).

Takes a memorisation model whose MAR decoder conditions `z` already hold its 32 scenes (the
all-hidden view, as in `z_readout.py`), and samples the model's own head on those `z` in one go:
every token from the same first-step condition, no MAR iteration. It then trains a copy of the
head alone on the fixed (z, token) pairs and judges its samples every `--every` steps. If the
copy becomes exact, the head only lacks training; if it does not, its parametrisation is the limit.

    python research/experiments/head_alone.py runs/exp/s9/mem-probe/final --steps 3000 --every 500
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

# A sibling script: Python puts the running script's own folder first on sys.path.
from z_readout import conditions, decoded_scenes

from unipic.unipic1.checkpoint import load_model_folder
from unipic.unipic1.sampling.diffusion import HeadScheduler
from unipic.unipic1.sampling.reference import reference_denoise_tokens


def sample_head(head, z: torch.Tensor, temperature: float, seed: int, steps: int | None) -> torch.Tensor:
    """One head sample per row of z (n, L, D) → tokens (n, L, C)."""
    scheduler = HeadScheduler(head.config, steps)
    rows = z.reshape(-1, z.shape[-1])
    out = reference_denoise_tokens(head.net, scheduler, rows, temperature=temperature,
                                   generator=torch.Generator().manual_seed(seed), channels=head.token_dim)
    return out.reshape(*z.shape[:2], -1)


def report(label: str, model, head, z, tokens, expected, grid, temperatures, head_steps) -> None:
    """Print token error and judged scenes (against the true tokens' multisets `expected`) per temperature."""
    with torch.no_grad():
        for temperature in temperatures:
            sampled = sample_head(head, z, temperature, 0, head_steps)
            err = ((sampled - tokens) ** 2).mean(-1)  # (n, L)
            right = sum(a == b for a, b in zip(decoded_scenes(model, sampled, grid)[1], expected))
            print(f"{label} T={temperature}: token mse {float(err.mean()):.4f}, tokens off by >1: "
                  f"{float((err > 1).float().mean()):.4f}, judged right {right}"
                  f"/{tokens.shape[0]}", flush=True)


def main() -> None:
    """Sample the model's head on exact conditions, then train a copy alone and sample again."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="unipic model folder (a memorisation model)")
    parser.add_argument("--n", type=int, default=32, help="scenes (default 32)")
    parser.add_argument("--seed", type=int, default=7, help="world seed of the scenes (default 7)")
    parser.add_argument("--steps", type=int, default=2000, help="head-only training steps (default 2000)")
    parser.add_argument("--every", type=int, default=500, help="judge every this many steps (default 500)")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    parser.add_argument("--mul", type=int, default=4, help="noise draws per token per step (default 4)")
    parser.add_argument("--temperatures", default="1.0,0.7", help="comma-separated sampling temperatures")
    parser.add_argument("--head-steps", type=int, default=None, help="head sampling steps (default: the model's)")
    args = parser.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    model, tokenizer = load_model_folder(args.model)
    model.eval()
    with torch.no_grad():
        tokens, z, grid, _ = conditions(model, tokenizer, args.seed, args.n)
        expected = decoded_scenes(model, tokens, grid)[1]  # the true tokens are judged once
    head = model.mar.diffloss
    report("own head", model, head, z, tokens, expected, grid, temperatures, args.head_steps)
    trained = copy.deepcopy(head)
    trained.config.diffusion_batch_mul = args.mul
    trained.train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=0.0)
    rows_z = z.reshape(-1, z.shape[-1]).detach()  # (n·L, D)
    rows_x = tokens.reshape(-1, tokens.shape[-1]).detach()  # (n·L, C)
    start = time.time()
    for step in range(1, args.steps + 1):
        loss = trained(rows_x, rows_z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            trained.eval()
            print(f"step {step} loss {float(loss):.4f} ({time.time() - start:.0f} s)", flush=True)
            report(f"head alone @{step}", model, trained, z, tokens, expected, grid, temperatures, args.head_steps)
            trained.train()


if __name__ == "__main__":
    main()
