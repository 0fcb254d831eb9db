"""Text-to-image sampling benchmark: seconds per image, peak RSS, and where the time goes.

Compares unipic's sampler with a straightforward reference loop run in the same process, on the
same random-weight model and seed:

- `unipic`    : the package pipeline (prefix KV cache reused across steps, position tables resized
                once per grid and cached, only conditional rows VAE-decoded);
- `reference` : the plain algorithm as the upstream code writes it — the text prefix re-run through
                the LLM every step, position tables re-interpolated every step, every CFG row decoded.

Both produce the same tokens for the same seed (checked), so the ratio is the cost of the plain
algorithm. Peak RSS is measured in a fresh child process per variant (RSS peaks are per process).

    python benchmarks/sampling.py --preset unipic1-tiny --size 128 --num-iter 4 --head-steps 10
    python benchmarks/sampling.py --preset unipic1-medium --size 256 --num-iter 16 --head-steps 50 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import torch

from unipic.checkpoint import build_model
from unipic.models.presets import get_preset
from unipic.sampling import mar_decode
from unipic.sampling.diffusion import HeadScheduler
from unipic.sampling.text_to_image import build_t2i_prefix
from unipic.tokenizer import build_byte_tokenizer

PROMPTS = ["a photo of a red circle left of a blue star"]


class Timer:
    """Accumulates wall time per component by wrapping bound methods."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def wrap(self, obj, attribute: str, label: str):
        original = getattr(obj, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(obj, attribute, timed)
        try:
            yield
        finally:
            setattr(obj, attribute, original)


def load(preset: str):
    config = get_preset(preset)
    model = build_model(config, seed=0).eval()
    tokenizer = build_byte_tokenizer(config.image_token)
    model.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    return model, tokenizer


@torch.no_grad()
def run_unipic(model, tokenizer, size: int, num_iter: int, head_steps: int, cfg: float, seed: int) -> torch.Tensor:
    """The package's text-to-image path (returns decoded pixels)."""
    from unipic.sampling.text_to_image import generate_images

    generator = torch.Generator().manual_seed(seed)
    return generate_images(model, tokenizer, PROMPTS, height=size, width=size, steps=num_iter, cfg=cfg,
                           head_steps=head_steps, generator=generator)


@torch.no_grad()
def run_reference(model, tokenizer, size: int, num_iter: int, head_steps: int, cfg: float, seed: int) -> torch.Tensor:
    """The plain loop: no prefix cache, position tables re-interpolated every step, all rows decoded."""
    from unipic.sampling.schedules import cfg_at_step, mask_by_order, reveal_mask_len, sample_orders

    generator = torch.Generator().manual_seed(seed)
    grid = model.grid_for(size, size)
    prefix, attention = build_t2i_prefix(model, tokenizer, PROMPTS, cfg=cfg, device=model.device)
    rows, seq_len = prefix.shape[0], grid[0] * grid[1]
    n = rows // 2
    orders = sample_orders(n, seq_len, generator=generator)
    orders = torch.cat([orders, orders])
    tokens = torch.zeros(rows, seq_len, model.config.token_dim)
    mask = torch.ones(rows, seq_len, dtype=torch.bool)
    masked = seq_len
    for step in range(num_iter):
        model.mar._pos_cache.clear()  # upstream interpolates the tables on every call
        x_enc = model.encode_with_llm(tokens, mask.float(), grid, attention, prefix_embeds=prefix)
        model.mar._pos_cache.clear()
        z = model.mar.forward_decoder(x_enc, mask.float(), grid)
        mask_len = reveal_mask_len(step, num_iter, seq_len, masked)
        mask_next = mask_by_order(mask_len, orders)
        to_predict = mask if step == num_iter - 1 else mask & ~mask_next
        mask, masked = mask_next, mask_len
        scheduler = HeadScheduler(model.mar.diffloss.config, head_steps)
        sampled = mar_decode.denoise_tokens(model.mar.diffloss.net, scheduler, z[to_predict], guided=True,
                                            cfg=cfg_at_step(cfg, "constant", seq_len, mask_len), generator=generator)
        tokens = tokens.clone()
        tokens[:n][to_predict[:n]] = sampled
        tokens[n:] = tokens[:n]
    return model.decode_tokens(tokens, grid)[:n]  # every row decoded, half thrown away


def profile(model, tokenizer, variant: str, args) -> tuple[float, dict[str, float], torch.Tensor]:
    timer = Timer()
    run = run_unipic if variant == "unipic" else run_reference
    with contextlib.ExitStack() as stack:
        stack.enter_context(timer.wrap(model.llm.model, "forward", "llm"))
        stack.enter_context(timer.wrap(model.mar, "forward_encoder", "mar"))
        stack.enter_context(timer.wrap(model.mar, "forward_decoder", "mar"))
        stack.enter_context(timer.wrap(mar_decode, "denoise_tokens", "head"))
        stack.enter_context(timer.wrap(model.vae, "decode", "vae"))
        start = time.perf_counter()
        pixels = run(model, tokenizer, args.size, args.num_iter, args.head_steps, args.cfg, args.seed)
        total = time.perf_counter() - start
    return total, dict(timer.seconds), pixels


def child_peak_rss(args, variant: str) -> float:
    """Run one variant once in a fresh process; return its peak RSS in MiB."""
    command = [sys.executable, __file__, "--preset", args.preset, "--size", str(args.size), "--num-iter",
               str(args.num_iter), "--head-steps", str(args.head_steps), "--cfg", str(args.cfg), "--rss-only", variant]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="unipic1-tiny", help="model preset (random weights)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--num-iter", type=int, default=4, help="MAR steps")
    parser.add_argument("--head-steps", type=int, default=10, help="diffusion-head steps")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rss-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load(args.preset)
    if args.rss_only:
        profile(model, tokenizer, args.rss_only, args)
        print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return

    params = sum(p.numel() for p in model.parameters()) / 1e6
    # Warm-up both (allocator, first-call overheads), and check they agree.
    _, _, a = profile(model, tokenizer, "unipic", args)
    _, _, b = profile(model, tokenizer, "reference", args)
    max_diff = (a - b).abs().max().item()
    results = {}
    for variant in ("unipic", "reference"):
        results[variant] = {"times": [], "shares": defaultdict(list)}
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        for variant in ("unipic", "reference"):
            total, parts, _ = profile(model, tokenizer, variant, args)
            results[variant]["times"].append(total)
            for key, value in parts.items():
                results[variant]["shares"][key].append(value / total)
    rss = {variant: child_peak_rss(args, variant) for variant in ("unipic", "reference")}

    print(f"preset {args.preset} ({params:.1f}M params), {args.size}x{args.size}, num_iter {args.num_iter}, "
          f"head steps {args.head_steps}, cfg {args.cfg}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats; max |unipic - reference| pixel diff {max_diff:.2e}")
    print("| variant | s/image (median) | peak RSS MiB | LLM | MAR | head | VAE |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in ("unipic", "reference"):
        median = statistics.median(results[variant]["times"])
        shares = {k: statistics.median(v) for k, v in results[variant]["shares"].items()}
        print(f"| {variant} | {median:.3f} | {rss[variant]:.0f} | " + " | ".join(
            f"{100 * shares.get(k, 0):.0f}%" for k in ("llm", "mar", "head", "vae")) + " |")
    ratio = statistics.median(results["reference"]["times"]) / statistics.median(results["unipic"]["times"])
    print(f"speed-up of unipic over the reference loop: {ratio:.2f}x; RSS ratio {rss['unipic'] / rss['reference']:.2f}")


if __name__ == "__main__":
    main()
