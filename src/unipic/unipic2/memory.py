"""Peak GPU memory of UniPic-2 inference, computed from parameter counts and activation estimates.

Run `python -m unipic.unipic2.memory` for the table in docs/unipic2.md (`--dtype float16`,
`--tile 512`, `--json` are options). Nothing is instantiated: parameter counts come from closed
formulas over the component configs (checked against instantiated models in the tests, and
against the full-size counts of spec §1).

Model (all sizes in bytes, `b` = bytes per element of the compute dtype, bf16 -> 2):

    weights(c)   = params(c) * b            (+ the SD3 pos_embed table, pos_max^2 * D values)
    act_dit      = B_cfg * (L_txt + k_img * N) * D * 16 * b     N = (H/16)(W/16) target tokens,
                   k_img = 2 when editing (reference tokens), B_cfg = 2 with CFG, L_txt = 333 (CLIP+T5)
                   or 256 (MetaQuery queries), D = 1536; 16 ~ live (tokens x D) tensors in one block
    act_llm      = B * L * (6 h + 3 f) * b  for a decoder/encoder pass (h hidden, f MLP width)
    act_vae_dec  = 4 * c_1 * H * W * b      c_1 = block_out_channels[1] (256): the decoder's first
                   full-resolution tensors (upsampled input + conv output + GroupNorm/SiLU temps)
    act_vae_enc  = 4 * c_0 * H * W * b      c_0 = block_out_channels[0] (128)
    VAE tiling replaces H*W by min(H, T) * min(W, T) (T = 512-px tiles).

    peak (no offload)  = sum_c weights(c) + max_stage act(stage)
    peak (CPU offload) = max_stage [weights(stage's model) + act(stage)]   (one model on the GPU;
                         while editing, the VAE also stays resident during denoising)

Attention is assumed to run in a fused SDPA kernel (flash / memory-efficient on CUDA), so no
L^2 term appears; the CUDA context and allocator slack (~0.5-1 GB in `nvidia-smi`) are not
included. These are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

GIB = 1024**3

# ---------------------------------------------------------------------------- full-size configs

SD35M_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
}
SD3_VAE = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
}
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "max_position_embeddings": 77, "projection_dim": 768}
CLIP_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
          "max_position_embeddings": 77, "projection_dim": 1280}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"}
QWEN25_VL_7B = {
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": 3584,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
    "tie_word_embeddings": False,
}
METAQUERY_CONDITIONER = {
    "num_queries": 256, "llm_hidden_size": 3584, "pooled_projection_dim": 2048, "joint_attention_dim": 4096,
    "connector_config": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 24},
}
KONTEXT_TEXT_TOKENS = 77 + 256  # CLIP (77) + T5 (max_sequence_length 256), spec §3
T5_TOKENS = 256
QWEN_PROMPT_TOKENS = 64  # chat template + a typical prompt (upper estimate)

# ---------------------------------------------------------------------------- parameter formulas


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    """Parameters of nn.Linear."""
    return n_in * n_out + (n_out if bias else 0)


def sd3_transformer_params(config: dict) -> int:
    """Parameters of diffusers' SD3Transformer2DModel (== SD3Transformer2DKontextModel)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    hd, p = config["attention_head_dim"], config["patch_size"]
    out_ch = config.get("out_channels") or config["in_channels"]
    total = config["in_channels"] * d * p * p + d  # patch-embedding conv
    total += linear(256, d) + linear(d, d) + linear(config["pooled_projection_dim"], d) + linear(d, d)  # time + pooled
    total += linear(config["joint_attention_dim"], config["caption_projection_dim"])  # context_embedder
    for i in range(config["num_layers"]):
        dual, last = i in config.get("dual_attention_layers", ()), i == config["num_layers"] - 1
        total += linear(d, (9 if dual else 6) * d)  # AdaLayerNormZero(X) of the image stream
        total += linear(d, 2 * d) if last else linear(d, 6 * d)  # context norm (continuous in the last block)
        total += 7 * linear(d, d) + (0 if last else linear(d, d))  # q,k,v, added q,k,v, out, (added out)
        total += 4 * hd if config.get("qk_norm") == "rms_norm" else 0  # RMSNorm on q,k and added q,k
        if dual:  # image-only self-attention of SD3.5 (MMDiT-X)
            total += 4 * linear(d, d) + (2 * hd if config.get("qk_norm") == "rms_norm" else 0)
        total += (1 if last else 2) * (linear(d, 4 * d) + linear(4 * d, d))  # FF (+ context FF)
    total += linear(d, 2 * d) + linear(d, p * p * out_ch)  # norm_out + proj_out
    return total


def sd3_pos_embed_values(config: dict) -> int:
    """Values of the persistent sin-cos table `pos_embed.pos_embed` (a buffer, not a parameter)."""
    return config["pos_embed_max_size"] ** 2 * config["num_attention_heads"] * config["attention_head_dim"]


def _resnet(c_in: int, c_out: int) -> int:
    shortcut = c_in * c_out + c_out if c_in != c_out else 0
    return 2 * c_in + c_in * c_out * 9 + c_out + 2 * c_out + c_out * c_out * 9 + c_out + shortcut


def _mid_block(c: int) -> int:
    return 2 * _resnet(c, c) + 2 * c + 4 * linear(c, c)  # two resnets + single-head attention


def vae_params(config: dict) -> int:
    """Parameters of diffusers' AutoencoderKL with DownEncoderBlock2D / UpDecoderBlock2D blocks."""
    ch, lpb, lat = config["block_out_channels"], config["layers_per_block"], config["latent_channels"]
    conv3 = lambda c_in, c_out: c_in * c_out * 9 + c_out  # noqa: E731
    # Encoder
    total, prev = conv3(config["in_channels"], ch[0]), ch[0]
    for i, c in enumerate(ch):
        for j in range(lpb):
            total += _resnet(prev if j == 0 else c, c)
        prev = c
        total += conv3(c, c) if i < len(ch) - 1 else 0  # downsampler
    total += _mid_block(ch[-1]) + 2 * ch[-1] + conv3(ch[-1], 2 * lat)
    total += linear(2 * lat, 2 * lat) if config.get("use_quant_conv", True) else 0
    # Decoder
    total += conv3(lat, ch[-1]) + _mid_block(ch[-1])
    prev = ch[-1]
    for i, c in enumerate(reversed(ch)):
        for j in range(lpb + 1):
            total += _resnet(prev if j == 0 else c, c)
        prev = c
        total += conv3(c, c) if i < len(ch) - 1 else 0  # upsampler
    total += 2 * ch[0] + conv3(ch[0], config["out_channels"])
    total += linear(lat, lat) if config.get("use_post_quant_conv", True) else 0
    return total


def clip_text_params(config: dict) -> int:
    """Parameters of transformers' CLIPTextModelWithProjection."""
    d, f = config["hidden_size"], config["intermediate_size"]
    layer = 4 * linear(d, d) + 4 * d + linear(d, f) + linear(f, d)
    return config["vocab_size"] * d + config["max_position_embeddings"] * d + config["num_hidden_layers"] * layer + 2 * d + d * config["projection_dim"]


def t5_encoder_params(config: dict) -> int:
    """Parameters of transformers' T5EncoderModel (the tied input embedding counted once)."""
    d, f, inner = config["d_model"], config["d_ff"], config["num_heads"] * config["d_kv"]
    ff = 3 * d * f if config.get("feed_forward_proj", "relu").startswith("gated") else 2 * d * f
    layer = 4 * d * inner + ff + 2 * d
    rel_bias = config["relative_attention_num_buckets"] * config["num_heads"]
    return config["vocab_size"] * d + config["num_layers"] * layer + rel_bias + d


def qwen2_5_vl_params(config: dict) -> tuple[int, int]:
    """(total, vision) parameters of transformers' Qwen2_5_VLForConditionalGeneration."""
    t, v = config["text_config"], config["vision_config"]
    h, f = t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * (h // t["num_attention_heads"])
    layer = linear(h, h) + 2 * linear(h, kv) + linear(h, h, bias=False) + 3 * h * f + 2 * h
    tied = config.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    text = t["vocab_size"] * h * (1 if tied else 2) + t["num_hidden_layers"] * layer + h
    vh, vf, m = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"]
    block = 2 * vh + linear(vh, 3 * vh) + linear(vh, vh) + 2 * linear(vh, vf) + linear(vf, vh)
    merger = vh + linear(vh * m * m, vh * m * m) + linear(vh * m * m, v["out_hidden_size"])
    patch = v.get("in_chans", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2 * vh
    vision = patch + v["depth"] * block + merger
    return text + vision, vision


def conditioner_params(config: dict) -> int:
    """Parameters of StableDiffusion3Conditioner (queries, connector, three projections)."""
    c = config["connector_config"]
    hidden, ff, llm = c["hidden_size"], c["intermediate_size"], config["llm_hidden_size"]
    layer = 4 * linear(hidden, hidden) + 4 * hidden + linear(hidden, ff) + linear(ff, hidden)
    return (
        config["num_queries"] * llm
        + linear(llm, hidden)
        + c["num_hidden_layers"] * layer
        + linear(hidden, config["pooled_projection_dim"])
        + linear(hidden, config["joint_attention_dim"])
    )


# ---------------------------------------------------------------------------- peak memory


@dataclass(frozen=True)
class Stage:
    """One step of inference: which component must be resident and how much activation it adds."""

    component: str
    activation_bytes: int
    label: str = ""  # what runs, when it is not obvious from the component (VAE encode/decode)
    also_resident: tuple[str, ...] = ()  # other models still on the GPU under CPU offload


def kontext_weight_bytes(b: int) -> dict[str, int]:
    """Resident bytes per component of UniPic2-SD3.5M-Kontext-2B at `b` bytes per value."""
    return {
        "text_encoder (CLIP-L)": clip_text_params(CLIP_L) * b,
        "text_encoder_2 (CLIP-G)": clip_text_params(CLIP_G) * b,
        "text_encoder_3 (T5-XXL)": t5_encoder_params(T5_XXL) * b,
        "transformer": (sd3_transformer_params(SD35M_TRANSFORMER) + sd3_pos_embed_values(SD35M_TRANSFORMER)) * b,
        "vae": vae_params(SD3_VAE) * b,
    }


def metaquery_weight_bytes(b: int) -> dict[str, int]:
    """Resident bytes per component of UniPic2-MetaQuery-9B (+ Qwen2.5-VL-7B) at `b` bytes per value."""
    return {
        "mllm (Qwen2.5-VL-7B)": qwen2_5_vl_params(QWEN25_VL_7B)[0] * b,
        "conditioner": conditioner_params(METAQUERY_CONDITIONER) * b,
        "transformer": (sd3_transformer_params(SD35M_TRANSFORMER) + sd3_pos_embed_values(SD35M_TRANSFORMER)) * b,
        "vae": vae_params(SD3_VAE) * b,
    }


def _dit_act(height: int, width: int, text_tokens: int, edit: bool, b: int, guided: bool = True) -> int:
    n = (height // 16) * (width // 16)
    return (2 if guided else 1) * (text_tokens + (2 if edit else 1) * n) * SD35M_TRANSFORMER["caption_projection_dim"] * 16 * b


def _llm_act(batch: int, tokens: int, hidden: int, ff: int, b: int) -> int:
    return batch * tokens * (6 * hidden + 3 * ff) * b


def _vae_act(height: int, width: int, channels: int, b: int, tile: int | None) -> int:
    if tile is not None:
        height, width = min(height, tile), min(width, tile)
    return 4 * channels * height * width * b


def stages(model: str, height: int, width: int, edit: bool, b: int, tile: int | None) -> list[Stage]:
    """Inference stages of `model` ("kontext" or "metaquery") at one resolution."""
    ch = SD3_VAE["block_out_channels"]
    vae_stages = [Stage("vae", _vae_act(height, width, ch[1], b, tile), "vae decode")]
    if edit:  # the reference image is encoded once, before sampling
        vae_stages.insert(0, Stage("vae", _vae_act(height, width, ch[0], b, tile), "vae encode"))
    if model == "kontext":
        text = [
            Stage("text_encoder (CLIP-L)", _llm_act(2, 77, 768, 3072, b)),
            Stage("text_encoder_2 (CLIP-G)", _llm_act(2, 77, 1280, 5120, b)),
            Stage("text_encoder_3 (T5-XXL)", _llm_act(2, T5_TOKENS, 4096, 10240, b)),
        ]
        # After the reference encode the VAE stays on the GPU (the DiT's hook evicts only its predecessor).
        dit = Stage("transformer", _dit_act(height, width, KONTEXT_TEXT_TOKENS, edit, b), also_resident=("vae",) if edit else ())
        return text + vae_stages[:-1] + [dit] + vae_stages[-1:]
    t = QWEN25_VL_7B["text_config"]
    image_tokens = (height // 32) * (width // 32) if edit else 0
    llm_tokens = QWEN_PROMPT_TOKENS + image_tokens + METAQUERY_CONDITIONER["num_queries"]
    llm = _llm_act(2, llm_tokens, t["hidden_size"], t["intermediate_size"], b)
    if edit:  # vision tower on (H*7/8) x (W*7/8): (H/16)(W/16) patches of width 1280
        v = QWEN25_VL_7B["vision_config"]
        llm = max(llm, _llm_act(1, (height // 16) * (width // 16), v["hidden_size"], v["intermediate_size"], b))
    c = METAQUERY_CONDITIONER["connector_config"]
    return [
        Stage("mllm (Qwen2.5-VL-7B)", llm),
        Stage("conditioner", _llm_act(2, METAQUERY_CONDITIONER["num_queries"], c["hidden_size"], c["intermediate_size"], b)),
        *vae_stages[:-1],
        Stage("transformer", _dit_act(height, width, METAQUERY_CONDITIONER["num_queries"], edit, b),
              also_resident=("vae",) if edit else ()),
        vae_stages[-1],
    ]


def peak_bytes(model: str, height: int, width: int, edit: bool, *, b: int = 2, cpu_offload: bool = False,
               tile: int | None = None) -> int:
    """Estimated peak allocated GPU bytes (see the module docstring for the formula)."""
    weights = kontext_weight_bytes(b) if model == "kontext" else metaquery_weight_bytes(b)
    plan = stages(model, height, width, edit, b, tile)
    if cpu_offload:
        return max(_resident(weights, s) + s.activation_bytes for s in plan)
    return sum(weights.values()) + max(s.activation_bytes for s in plan)


def _resident(weights: dict[str, int], stage: Stage) -> int:
    return weights[stage.component] + sum(weights[name] for name in stage.also_resident)


def stage_peaks(model: str, height: int, width: int, edit: bool, *, b: int = 2, tile: int | None = None) -> list[tuple[str, int]]:
    """(component, weights + activations) per stage: the GPU footprint of each stage under CPU offload."""
    weights = kontext_weight_bytes(b) if model == "kontext" else metaquery_weight_bytes(b)
    return [(s.label or s.component, _resident(weights, s) + s.activation_bytes)
            for s in stages(model, height, width, edit, b, tile)]


def memory_table(b: int = 2, tile: int = 512, resolutions: tuple[int, ...] = (512, 768, 1024)) -> list[dict]:
    """Rows of the docs table: one per (model, task, resolution), GiB for the four memory settings."""
    rows = []
    for model in ("kontext", "metaquery"):
        for edit in (False, True):
            for res in resolutions:
                row = {"model": model, "task": "edit" if edit else "text-to-image", "resolution": res}
                for label, offload, tiling in (
                    ("none", False, None), ("vae_tiling", False, tile), ("cpu_offload", True, None),
                    ("cpu_offload+vae_tiling", True, tile),
                ):
                    row[label] = peak_bytes(model, res, res, edit, b=b, cpu_offload=offload, tile=tiling) / GIB
                rows.append(row)
    return rows


def _markdown(rows: list[dict]) -> str:
    names = {"kontext": "Kontext-2B", "metaquery": "MetaQuery-9B"}
    lines = [
        "| model | task | size | none | VAE tiling | CPU offload | offload + tiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {names[r['model']]} | {r['task']} | {r['resolution']}² | {r['none']:.1f} | {r['vae_tiling']:.1f} | "
            f"{r['cpu_offload']:.1f} | {r['cpu_offload+vae_tiling']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the peak-memory table (markdown, or JSON with --json)."""
    parser = argparse.ArgumentParser(description="Estimated peak GPU memory of UniPic-2 inference")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--tile", type=int, default=512, help="VAE tile size in pixels (default 512)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of markdown")
    args = parser.parse_args(argv)
    b = 4 if args.dtype == "float32" else 2
    rows = memory_table(b=b, tile=args.tile)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    weights = {"Kontext-2B": kontext_weight_bytes(b), "MetaQuery-9B": metaquery_weight_bytes(b)}
    for name, parts in weights.items():
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items())
        print(f"{name} weights ({args.dtype}): {sum(parts.values()) / GIB:.2f} GiB = {detail}")
    print()
    print(_markdown(rows))
    for model, name in (("kontext", "Kontext-2B"), ("metaquery", "MetaQuery-9B")):
        peaks = stage_peaks(model, 1024, 1024, True, b=b)
        detail = ", ".join(f"{component} {value / GIB:.2f}" for component, value in peaks)
        print(f"\n{name}, 1024² edit, per stage under CPU offload (GiB): {detail}")


if __name__ == "__main__":
    main()
