"""Sampling benchmark: seconds per image of the reference loop, the exact path and the fast mode.

Three ways to draw the same text-to-image sample, run interleaved in one process on one model:

- `reference`: the plain algorithm as the upstream code writes it (`unipic.unipic1.sampling.reference`):
               the text prefix re-run through the LLM every MAR step, position tables
               re-interpolated every step, the head called as net(x, t, c) at every head step,
               every CFG row decoded;
- `exact`    : the package's default sampler: prefix KV cache, cached tables, the head's adaLN
               modulations precomputed per MAR step, the MAR encoder run once per guidance pair,
               only conditional rows decoded. Same pixels as the reference up to float32
               rounding (the max difference is printed);
- `fast`     : `fast=True` (`--fast`): training-free shortcuts (see `unipic.unipic1.pipeline`).

Reports the median of `--repeats` timed runs, peak RSS (a fresh child process per variant) and
the share of time per part (LLM, MAR encoder/decoder, diffusion head, VAE). The last line reads
`speedup exact X.XX fast Y.YY` (both against the reference). Timings are ratios within one
process: on a shared machine only the ratios mean anything.

    python benchmarks/sampling.py --model default                  # embedded model, its defaults
    python benchmarks/sampling.py --preset unipic1-medium --size 256 --repeats 3
    python benchmarks/sampling.py --model default --quality-gate --per-category 50 --edit-per-kind 50
    python benchmarks/sampling.py --flops                          # 1.5B preset FLOPs / memory (GPU planning)

`--quality-gate` scores ShapesEval (six categories) and the editing eval with the exact path and
the fast mode on the same prompts and seeds, prints the comparison per group and overall, and exits
1 when fast mode's overall ShapesEval score or edit success rate is more than `--tolerance` (0.02)
below the exact path's.
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
from pathlib import Path

import torch

from unipic.unipic1.sampling import mar_decode, reference
from unipic.unipic1.sampling.mar_decode import SpeedOptions
from unipic.unipic1.sampling.reference import reference_generate_images
from unipic.unipic1.sampling.text_to_image import generate_images

PROMPTS = ["a photo of a red circle left of a blue star"]
VARIANTS = ("reference", "exact", "fast")
PARTS = ("llm", "mar", "head", "vae")


class Timer:
    """Accumulates wall time per component by wrapping attributes (methods or module functions)."""

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


def load(args):
    """(pipeline, model, tokenizer): the named model, or a random-weight preset."""
    from unipic.unipic1.pipeline import UniPicPipeline

    if args.preset:
        from unipic.unipic1.checkpoint import build_model
        from unipic.unipic1.models.presets import get_preset
        from unipic.unipic1.tokenizer import build_byte_tokenizer

        config = get_preset(args.preset)
        model = build_model(config, seed=0).eval()
        tokenizer = build_byte_tokenizer(config.image_token)
        model.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        pipeline = UniPicPipeline(model, tokenizer)
    else:
        from unipic.loading import load_pipeline

        pipeline = load_pipeline(args.model, device="cpu")
    return pipeline, pipeline.model, pipeline.tokenizer


def settings_for(pipeline, args, fast: bool) -> dict:
    """The sampler settings the pipeline resolves (model defaults unless given on the command line)."""
    options = {k: v for k, v in (("steps", args.num_iter), ("head_steps", args.head_steps), ("cfg", args.cfg))
               if v is not None}
    if fast:
        options.update({k: v for k, v in (("head_anneal", args.head_anneal), ("guidance_interval", args.guidance_interval),
                                          ("uncond_interval", args.uncond_interval), ("head_solver", args.head_solver),
                                          ("head_steps", args.fast_head_steps)) if v is not None})
    size = args.size
    request = pipeline.check_inputs("text_to_image", PROMPTS, height=size, width=size, fast=fast, **options)
    return request.settings


@torch.no_grad()
def run_variant(variant: str, model, tokenizer, settings: dict[str, dict], seed: int) -> torch.Tensor:
    """One image (pixels) with `variant`."""
    s = settings["fast" if variant == "fast" else "exact"]
    generator = torch.Generator().manual_seed(seed)
    common = {"height": s["height"], "width": s["width"], "steps": s["steps"], "cfg": s["cfg"],
              "cfg_schedule": s["cfg_schedule"], "temperature": s["temperature"], "head_steps": s["head_steps"],
              "generator": generator}
    if variant == "reference":
        return reference_generate_images(model, tokenizer, PROMPTS, **common)
    speed = SpeedOptions(head_anneal=s["head_anneal"], guidance_interval=s["guidance_interval"],
                         uncond_interval=s["uncond_interval"], head_solver=s["head_solver"])
    return generate_images(model, tokenizer, PROMPTS, speed=speed, **common)


def profile(model, tokenizer, variant: str, settings: dict, seed: int) -> tuple[float, dict[str, float], torch.Tensor]:
    """Wall time, seconds per part and pixels of one image."""
    timer = Timer()
    with contextlib.ExitStack() as stack:
        stack.enter_context(timer.wrap(model.llm.model, "forward", "llm"))
        stack.enter_context(timer.wrap(model.mar, "forward_encoder", "mar"))
        stack.enter_context(timer.wrap(model.mar, "forward_decoder", "mar"))
        stack.enter_context(timer.wrap(mar_decode, "denoise_tokens", "head"))
        stack.enter_context(timer.wrap(reference, "reference_denoise_tokens", "head"))
        stack.enter_context(timer.wrap(model.vae, "decode", "vae"))
        start = time.perf_counter()
        pixels = run_variant(variant, model, tokenizer, settings, seed)
        total = time.perf_counter() - start
    return total, dict(timer.seconds), pixels


def child_peak_rss(argv: list[str], variant: str) -> float:
    """Run one variant once in a fresh process; return its peak RSS in MiB."""
    out = subprocess.run([sys.executable, __file__, *argv, "--rss-only", variant], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]


def speed_benchmark(args, argv: list[str]) -> None:
    pipeline, model, tokenizer = load(args)
    if not args.threads:
        from unipic.loading import cpu_threads_for

        cpu_threads_for(pipeline)
    settings = {"exact": settings_for(pipeline, args, False), "fast": settings_for(pipeline, args, True)}
    if args.rss_only:
        profile(model, tokenizer, args.rss_only, settings, args.seed)
        print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    params = sum(p.numel() for p in model.parameters()) / 1e6
    pixels = {v: profile(model, tokenizer, v, settings, args.seed)[2] for v in VARIANTS}  # warm-up
    max_diff = (pixels["exact"] - pixels["reference"]).abs().max().item()
    times: dict[str, list[float]] = defaultdict(list)
    shares: dict[str, dict[str, list[float]]] = {v: defaultdict(list) for v in VARIANTS}
    for _ in range(args.repeats):  # interleaved, so drift affects every variant alike
        for variant in VARIANTS:
            total, parts, _ = profile(model, tokenizer, variant, settings, args.seed)
            times[variant].append(total)
            for key in PARTS:
                shares[variant][key].append(parts.get(key, 0.0) / total)
    rss = {v: child_peak_rss(argv, v) for v in VARIANTS} if not args.no_rss else {}
    e, f = settings["exact"], settings["fast"]
    name = args.preset or args.model
    print(f"model {name} ({params:.1f}M params), {e['height']}x{e['width']}, cfg {e['cfg']}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats interleaved")
    print(f"exact/reference: {e['steps']} MAR steps x {e['head_steps']} head steps; fast: {f['steps']} MAR steps, "
          f"{f['head_steps']} head steps ({f['head_solver']}), head_anneal {f['head_anneal']}, guidance_interval {f['guidance_interval']}, "
          f"uncond_interval {f['uncond_interval']}")
    print(f"max |exact - reference| pixel difference: {max_diff:.2e}")
    print("| variant | s/image (median) | peak RSS MiB | LLM | MAR | head | VAE | other |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    median = {v: statistics.median(times[v]) for v in VARIANTS}
    for variant in VARIANTS:
        share = {k: statistics.median(shares[variant][k]) for k in PARTS}
        other = max(0.0, 1.0 - sum(share.values()))
        rss_text = f"{rss[variant]:.0f}" if rss else "-"
        print(f"| {variant} | {median[variant]:.3f} | {rss_text} | "
              + " | ".join(f"{100 * share[k]:.0f}%" for k in PARTS) + f" | {100 * other:.0f}% |")
    print(f"speedup exact {median['reference'] / median['exact']:.2f} fast {median['reference'] / median['fast']:.2f}")


# ------------------------------------------------------------------------------------------------
# Quality gate
# ------------------------------------------------------------------------------------------------


def quality_gate(args) -> int:
    """ShapesEval + editing with exact and fast, same prompts and seeds; 0 when fast holds the gate."""
    from unipic.world.edits import edit_succeeded
    from unipic.world.examples import edit_eval_set
    from unipic.world.geneval import evaluate_record, shapes_eval_metadata
    from unipic.world.judge import judge
    from unipic.world.render import render

    pipeline, _, _ = load(args)
    size = args.size or pipeline.sampling_defaults()["size"]
    records = shapes_eval_metadata(args.per_category, args.seed) if args.per_category else []
    edits = edit_eval_set(args.edit_per_kind, args.seed) if args.edit_per_kind else []
    sources = [render(e.source, size) for e in edits]
    scores: dict[str, dict[str, list[bool]]] = {}
    seconds: dict[str, float] = {}
    for mode in ("exact", "fast"):
        options = {"fast": mode == "fast"}
        if mode == "fast":
            options.update({k: v for k, v in (("head_anneal", args.head_anneal),
                                              ("guidance_interval", args.guidance_interval),
                                              ("uncond_interval", args.uncond_interval),
                                              ("head_solver", args.head_solver),
                                              ("head_steps", args.fast_head_steps)) if v is not None})
        by_group: dict[str, list[bool]] = defaultdict(list)
        start = time.perf_counter()
        for i in range(0, len(records), args.batch_size):
            batch = records[i:i + args.batch_size]
            images = pipeline.text_to_image([r["prompt"] for r in batch], height=size, width=size,
                                            seed=[args.seed + i + k for k in range(len(batch))], **options)
            for record, (image,) in zip(batch, images):
                by_group[f"t2i/{record['tag']}"].append(bool(evaluate_record(record, judge(image))[0]))
        for i in range(0, len(edits), args.batch_size):
            batch = edits[i:i + args.batch_size]
            outputs = pipeline.edit_image(sources[i:i + args.batch_size], [e.instruction for e in batch],
                                          height=size, width=size,
                                          seed=[args.seed + i + k for k in range(len(batch))], **options)
            for edit, output in zip(batch, outputs):
                by_group[f"edit/{edit.kind}"].append(bool(edit_succeeded(edit, judge(output.convert('RGB')))[0]))
        seconds[mode] = time.perf_counter() - start
        scores[mode] = dict(by_group)

    def mean(values: list[bool]) -> float:
        return sum(values) / len(values) if values else float("nan")

    rows = []
    for group in sorted(scores["exact"]):
        rows.append((group, len(scores["exact"][group]), mean(scores["exact"][group]), mean(scores["fast"][group])))
    for task in ("t2i", "edit"):
        exact = [v for g, vs in scores["exact"].items() if g.startswith(task) for v in vs]
        fast = [v for g, vs in scores["fast"].items() if g.startswith(task) for v in vs]
        if exact:
            rows.append((f"{task} overall", len(exact), mean(exact), mean(fast)))
    # The gate is on the overall scores (ShapesEval's mean over its six categories, the edit success
    # rate); per-group rows are shown too, but at 50 items a group's binomial standard error is
    # ~0.04, twice the tolerance, so a group alone cannot decide it.
    failed = [r for r in rows if r[0].endswith("overall") and r[3] < r[2] - args.tolerance]
    print(f"quality gate: model {args.preset or args.model}, {size}px, {args.per_category} prompts per ShapesEval "
          f"category, {args.edit_per_kind} edits per kind, seeds from {args.seed}; tolerance {args.tolerance}")
    print(f"wall time for the whole set (not a benchmark: other load shares the machine): exact "
          f"{seconds['exact']:.0f} s, fast {seconds['fast']:.0f} s")
    print("| group | n | exact | fast | fast - exact |")
    print("|---|---:|---:|---:|---:|")
    for group, n, e, f in rows:
        print(f"| {group} | {n} | {e:.3f} | {f:.3f} | {f - e:+.3f} |")
    verdict = "HELD" if not failed else "FAILED: " + ", ".join(r[0] for r in failed)
    print(f"quality gate {verdict}")
    if args.out:
        from unipic.io_utils import atomic_write_json

        atomic_write_json(Path(args.out), {"rows": [dict(zip(("group", "n", "exact", "fast"), r)) for r in rows],
                                           "seconds": seconds, "held": not failed, "tolerance": args.tolerance})
    return 0 if not failed else 1


# ------------------------------------------------------------------------------------------------
# FLOPs and memory for GPU planning
# ------------------------------------------------------------------------------------------------


def flops_report(preset: str = "unipic1-1.5b", mar_steps: int = 32, head_steps: int = 100, prefix: int = 64) -> None:
    """FLOPs per image and peak memory of the exact sampler on a GPU: bfloat16, CFG (2 rows per image).

    Counted from the parameter counts of the model built on the meta device (2 FLOPs per
    multiply-add) plus attention (4·n·context·width per layer); the VAE decode is counted once.
    """
    import math

    from unipic.unipic1.models.presets import get_preset
    from unipic.unipic1.models.unipic import UniPic, init_empty_weights

    c = get_preset(preset)
    with init_empty_weights():
        model = UniPic(c)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    llm_layers = count(model.llm.model.layers)
    enc_blocks, dec_blocks = count(model.mar.encoder_blocks), count(model.mar.decoder_blocks)
    net = model.mar.diffloss.net
    head_step = count(net) - count(net.time_embed) - count(net.cond_embed)  # per row per head step
    hid, layers = c.llm.hidden_size, c.llm.num_hidden_layers
    enc, dec, buf, rows = c.mar.encoder_embed_dim, c.mar.decoder_embed_dim, c.mar.buffer_size, 2
    weights_bytes = 2 * (count(model) - count(model.siglip2 or torch.nn.Module()))
    print(f"{preset} ({count(model) / 1e9:.2f}B parameters): bfloat16, CFG (2 rows per image), {mar_steps} MAR "
          f"steps, {head_steps} head steps, {prefix}-token prompt; 2 FLOPs per multiply-add")
    print("| size | tokens | LLM TFLOP | MAR TFLOP | head TFLOP | VAE TFLOP | total TFLOP | weights GiB | "
          "peak activations GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in (512, 1024):
        L = (size // c.pixel_stride) ** 2
        llm = mar = head = 0.0
        peak = 0.0
        masked = L
        for step in range(mar_steps):
            mask_len = max(1, min(masked - 1, math.floor(L * math.cos(math.pi / 2 * (step + 1) / mar_steps))))
            new = masked if step == mar_steps - 1 else masked - mask_len
            vis = L - masked
            n = vis + buf  # rows through the MAR encoder and the LLM
            llm += rows * n * (2 * llm_layers + layers * 4 * (prefix + n) * hid)
            # The MAR encoder and proj_in run once per guidance pair; the decoder and proj_out on both rows.
            mar += (n * (2 * enc_blocks + c.mar.encoder_depth * 4 * n * enc) + n * 2 * count(model.proj_in)
                    + rows * ((L + buf) * (2 * dec_blocks + c.mar.decoder_depth * 4 * (L + buf) * dec)
                              + n * 2 * count(model.proj_out)))
            head += rows * new * (head_steps * 2 * head_step + 2 * count(net.cond_embed))
            kv_cache = rows * layers * 2 * (prefix + n) * c.llm.num_key_value_heads * (hid // c.llm.num_attention_heads) * 2
            decoder = rows * (L + buf) * (4 * dec + 3 * dec) * 2  # MLP hidden + q/k/v of one block, bf16
            modulations = min(mar_decode.MODULATION_BUDGET, rows * new * net.modulation_width * 2 * head_steps)
            peak = max(peak, kv_cache + decoder + modulations)
            masked = mask_len
        # VAE decoder: ~ 2 · params · pixels / (stride² / 4) is a poor model; count its convs instead.
        vae = 0.0
        for module in model.vae.decoder.modules():
            if isinstance(module, torch.nn.Conv2d):
                vae += 2 * module.weight.numel()  # per output pixel, scaled below
        vae_flops = vae * (size * size) / 4  # most decoder convs run at half resolution or below (rough)
        # VAE decode peak: ~4 full-resolution activations of ch·ch_mult[0] channels alive at once.
        vae_peak = 4 * size * size * c.vae.ch * c.vae.ch_mult[0] * 2
        peak = max(peak, vae_peak)
        total = llm + mar + head + vae_flops
        print(f"| {size}² | {L} | {llm / 1e12:.2f} | {mar / 1e12:.2f} | {head / 1e12:.2f} | {vae_flops / 1e12:.2f} "
              f"| {total / 1e12:.2f} | {weights_bytes / 2**30:.2f} | {peak / 2**30:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="default", help="model to load (default: the embedded model)")
    source.add_argument("--preset", default=None, help="a config preset with random weights, e.g. unipic1-medium")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--num-iter", type=int, default=None, help="MAR steps (default: the model's)")
    parser.add_argument("--head-steps", type=int, default=None, help="diffusion-head steps (default: the model's)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--head-anneal", type=float, default=None, help="fast mode's head_anneal (default: --fast's)")
    parser.add_argument("--guidance-interval", type=int, default=None,
                        help="fast mode's guidance_interval (default: --fast's)")
    parser.add_argument("--uncond-interval", type=int, default=None,
                        help="fast mode's uncond_interval (default: --fast's)")
    parser.add_argument("--head-solver", default=None, help="fast mode's head_solver (default: --fast's)")
    parser.add_argument("--fast-head-steps", type=int, default=None, help="fast mode's head_steps (default: --fast's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the command line's choice, `unipic.loading.cpu_threads_for`: "
                             "one for a small model on CPU, else torch's)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--quality-gate", action="store_true", help="ShapesEval + editing, exact vs fast")
    parser.add_argument("--per-category", type=int, default=50, help="quality gate: prompts per ShapesEval category")
    parser.add_argument("--edit-per-kind", type=int, default=50, help="quality gate: edits per edit kind")
    parser.add_argument("--batch-size", type=int, default=8, help="quality gate: images per batch")
    parser.add_argument("--tolerance", type=float, default=0.02, help="quality gate: allowed drop of fast mode")
    parser.add_argument("--out", default=None, help="quality gate: also write the table as JSON here")
    parser.add_argument("--flops", action="store_true", help="FLOPs and memory of the 1.5B preset (no model run)")
    parser.add_argument("--rss-only", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flops:
        flops_report()
        return
    if args.quality_gate:
        sys.exit(quality_gate(args))
    speed_benchmark(args, [a for a in argv if a != "--no-rss"])


if __name__ == "__main__":
    main()
