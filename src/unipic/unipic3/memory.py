"""Peak GPU memory of UniPic-3 inference, from parameter counts and activation estimates.

Run `python benchmarks/unipic3_memory.py` (or `python -m unipic.unipic3.memory`) for the table in
docs/unipic3.md. The component sizes are the published Qwen-Image-Edit configs (hard-coded
below); the transformer's parameter count is a closed formula (checked against instantiated
models in the tests), Qwen2.5-VL-7B's comes from `unipic.unipic2.memory`, and the VAE's is
counted on the meta device (nothing is allocated). The approach is UniPic-2's:

    weights(c)        = params(c) * bytes/param   (bf16 2; fp8 1; NF4 0.5 + 1 fp32 scale per 64 values,
                        on the transformer's and text encoder's linear layers; embeddings, LM head and the VAE stay bf16)
    act_dit           = L * D * 16 * 2    L = text tokens + target tokens + every input's tokens, D = 3072;
                        true CFG runs the two passes one after the other, so one sequence is live
    act_text_encoder  = T * (6 h + 3 f) * 2 for the LLM (T prompt tokens), and the vision tower on
                        its 14-px patches; the larger counts
    act_vae           = 8 * 192 * H * W * 2   the decoder's full-resolution stage with its causal-conv caches
    peak (no offload) = sum of weights + the largest activation
    peak (offload)    = max over stages of (that stage's model [+ the VAE while denoising] + its activation)

The shared pixel budget keeps the inputs' total area near 1024², so 1, 3 or 6 inputs change the
sequence length only through rounding and the vision tokens' per-image overhead. Attention is
assumed fused (flash / memory-efficient SDPA): no L² term. The CUDA context (~0.5-1 GiB) is not
included; `fits` leaves 1 GiB for it. These are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import json
import math

from unipic.unipic2.memory import GIB, QWEN25_VL_7B, linear, qwen2_5_vl_params
from unipic.unipic3 import sizes

# Published configs (Qwen/Qwen-Image-Edit transformer/config.json and vae/config.json).
TRANSFORMER = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584,
}
VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
       "temperal_downsample": [False, True, True]}
PROMPT_TEXT_TOKENS = 100  # chat text around the images + a typical instruction (upper estimate)
PRECISIONS = {"bf16": 2.0, "fp8": 1.0, "nf4": 0.5 + 4 / 64}  # bytes per quantized weight
CARDS_GB = (16, 24, 48, 80)
CONTEXT_GIB = 1.0  # CUDA context and allocator slack left free when judging whether a card fits


def transformer_params(cfg: dict) -> tuple[int, int]:
    """(total, in linear layers) parameters of diffusers' QwenImageTransformer2DModel."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    j, hd, p = cfg["joint_attention_dim"], cfg["attention_head_dim"], cfg["patch_size"]
    out = cfg.get("out_channels") or cfg["in_channels"]
    block_linear = 2 * linear(d, 6 * d) + 8 * linear(d, d) + 2 * (linear(d, 4 * d) + linear(4 * d, d))
    linear_total = (linear(cfg["in_channels"], d) + linear(j, d) + linear(256, d) + linear(d, d)
                    + cfg["num_layers"] * block_linear + linear(d, 2 * d) + linear(d, p * p * out))
    norms = j + cfg["num_layers"] * 4 * hd  # the text input RMSNorm; q/k RMSNorms of both streams
    return linear_total + norms, linear_total


def vae_params(cfg: dict = VAE) -> int:
    """Parameters of diffusers' AutoencoderKLQwenImage, counted on the meta device."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKLQwenImage(**cfg).parameters())


def weight_bytes(precision: str) -> dict[str, float]:
    """Resident bytes per component at `precision` (bf16, fp8 or nf4)."""
    q = PRECISIONS[precision]
    total, lin = transformer_params(TRANSFORMER)
    text_total, _ = qwen2_5_vl_params(QWEN25_VL_7B)
    t = QWEN25_VL_7B["text_config"]
    embeddings = 2 * t["vocab_size"] * t["hidden_size"]  # embed_tokens + lm_head stay bf16
    return {
        "transformer": lin * q + (total - lin) * 2,
        "text_encoder": (text_total - embeddings) * q + embeddings * 2,
        "vae": vae_params() * 2,
    }


def sequence(inputs: int, side: int = 1024) -> dict[str, int]:
    """Token counts for `inputs` square inputs and a side x side output under the 1024² budget."""
    budgeted = sizes.budget_sizes([(side, side)] * inputs)
    vision = sum((w // 32) * (h // 32) + 2 for w, h in budgeted)  # merged patches + vision start/end
    image_tokens = sum((w // 16) * (h // 16) for w, h in budgeted)
    text = vision + PROMPT_TEXT_TOKENS  # the encoder sees all of it; the DiT gets it minus the first 64
    patches = sum((w * 7 // 8 // 14) * (h * 7 // 8 // 14) for w, h in budgeted)
    return {"text_encoder": text, "dit_text": text - 64, "target": (side // 16) ** 2, "inputs": image_tokens,
            "vision_patches": patches}


def activations(inputs: int, side: int = 1024) -> dict[str, float]:
    """Activation bytes of each stage (bf16 compute)."""
    seq = sequence(inputs, side)
    t, v = QWEN25_VL_7B["text_config"], QWEN25_VL_7B["vision_config"]
    d = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    llm = seq["text_encoder"] * (6 * t["hidden_size"] + 3 * t["intermediate_size"]) * 2
    tower = seq["vision_patches"] * (6 * v["hidden_size"] + 3 * v["intermediate_size"]) * 2
    dit_tokens = seq["dit_text"] + seq["target"] + seq["inputs"]
    return {
        "text_encoder": max(llm, tower),
        "vae_encode": 8 * 96 * max(side * side, 1) * 2 / max(inputs, 1),  # the largest input's full-res stage
        "transformer": dit_tokens * d * 16 * 2,
        "vae_decode": 8 * 192 * side * side * 2,
    }


def peak_bytes(precision: str, inputs: int, cpu_offload: bool, side: int = 1024) -> float:
    """Estimated peak allocated GPU bytes (see the module docstring)."""
    weights, act = weight_bytes(precision), activations(inputs, side)
    if not cpu_offload:
        return sum(weights.values()) + max(act.values())
    return max(weights["text_encoder"] + act["text_encoder"], weights["vae"] + act["vae_encode"],
               weights["transformer"] + weights["vae"] + act["transformer"], weights["vae"] + act["vae_decode"])


def fits(peak: float) -> list[int]:
    """The cards (GB = 10^9 bytes, as sold) whose memory holds `peak` plus the CUDA context."""
    return [gb for gb in CARDS_GB if peak + CONTEXT_GIB * GIB <= gb * 1e9]


def memory_table(side: int = 1024) -> list[dict]:
    """Rows of the docs table: precision x input count, GiB without and with model CPU offload."""
    rows = []
    for precision in PRECISIONS:
        for inputs in (1, 3, 6):
            row = {"precision": precision, "inputs": inputs, "tokens": sum(
                sequence(inputs, side)[k] for k in ("dit_text", "target", "inputs"))}
            for label, offload in (("none", False), ("cpu_offload", True)):
                peak = peak_bytes(precision, inputs, offload, side)
                row[label] = peak / GIB
                row[label + "_fits"] = fits(peak)
            rows.append(row)
    return rows


def _cards(gbs: list[int]) -> str:
    return ", ".join(f"{gb}" for gb in gbs) if gbs else "none of 16-80"


def main(argv: list[str] | None = None) -> None:
    """Print the weights, then the peak-memory table (markdown, or JSON with --json)."""
    parser = argparse.ArgumentParser(description="Estimated peak GPU memory of UniPic-3 inference (1024² output)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of markdown")
    args = parser.parse_args(argv)
    rows = memory_table()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for precision in PRECISIONS:
        parts = weight_bytes(precision)
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items())
        print(f"weights {precision}: {sum(parts.values()) / GIB:.1f} GiB = {detail}")
    total, _ = transformer_params(TRANSFORMER)
    print(f"parameters: transformer {total / 1e9:.2f} B, text encoder {qwen2_5_vl_params(QWEN25_VL_7B)[0] / 1e9:.2f} B, "
          f"VAE {vae_params() / 1e6:.1f} M\n")
    print("| weights | inputs | DiT tokens | no offload (GiB) | fits (GB cards) | model CPU offload (GiB) | fits (GB cards) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['inputs']} | {r['tokens']} | {r['none']:.1f} | {_cards(r['none_fits'])} | "
              f"{r['cpu_offload']:.1f} | {_cards(r['cpu_offload_fits'])} |")
    assert math.isfinite(rows[0]["none"]), "the table must be finite"


if __name__ == "__main__":
    main()
