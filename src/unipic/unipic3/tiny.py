"""A tiny random UniPic-3, built offline in about a second, for tests and smoke runs.

Every class is the real library class (`QwenImageTransformer2DModel`, `AutoencoderKLQwenImage`,
`FlowMatchEulerDiscreteScheduler`, `Qwen2_5_VLForConditionalGeneration`, `Qwen2VLProcessor`)
with toy widths and the real dimensional relations: 16 latent channels packed 2x2 into 64, an
8x VAE, 14-px vision patches merged 2x2 (so the 28/32 encoder sizes tile exactly), and a text
hidden size equal to the transformer's joint attention dim. The Qwen tokenizer is the one
UniPic-2's tiny model learns from a small corpus (`unipic.unipic2.tiny`); the processor gets a
Qwen2-VL-style chat template of ours, since none can be downloaded.

The tiny folder records `budget_area` = 128² in unipic3.json, so the built-in
`unipic3-tiny-random` works on 128-px budgets and a call takes well under a second on a CPU.

Usage:
    save_tiny_unipic3("/tmp/unipic3-tiny")
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

TINY_BUDGET_AREA = 128**2

TINY_CONFIG: dict = {
    "transformer": {
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": (4, 6, 6),
    },
    "vae": {
        "base_dim": 4, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_scales": [],
        "temperal_downsample": [False, True, True],
    },
    # Qwen-Image-Edit's published scheduler config, so mu and the terminal stretch behave as in the release.
    "scheduler": {
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
        "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential",
        "use_dynamic_shifting": True,
    },
}

# A Qwen2-VL-style chat template (ours): images become <|vision_start|><|image_pad|><|vision_end|>,
# each turn is wrapped in <|im_start|>role ... <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_processor():
    """The tiny Qwen tokenizer + image processor + our chat template (`Qwen2VLProcessor` or its stand-in)."""
    from unipic.unipic2.tiny import tiny_qwen_image_processor, tiny_qwen_tokenizer
    from unipic.unipic3.processor import build_processor

    return build_processor(tiny_qwen_tokenizer(), tiny_qwen_image_processor(), CHAT_TEMPLATE)


def build_tiny_unipic3_components(seed: int = 0) -> dict:
    """Random tiny components of `UniPic3Pipeline` (a dict of its constructor arguments), float32, CPU."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from unipic.unipic2.tiny import _seeded, build_tiny_qwen, tiny_qwen_tokenizer

    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(**copy.deepcopy(TINY_CONFIG["transformer"])).eval()
        vae = AutoencoderKLQwenImage(**copy.deepcopy(TINY_CONFIG["vae"])).eval()
    text_encoder, _, _ = build_tiny_qwen(seed + 1)  # hidden size 64 = the transformer's joint attention dim
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**TINY_CONFIG["scheduler"]),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_qwen_tokenizer(),
        "processor": tiny_processor(),
        "transformer": transformer,
    }


def build_tiny_unipic3_pipeline(seed: int = 0):
    """A random tiny `UniPic3Pipeline` (float32, CPU, progress bar off)."""
    from unipic.unipic3.pipeline import UniPic3Pipeline

    pipe = UniPic3Pipeline(**build_tiny_unipic3_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_unipic3(folder: str | Path, seed: int = 0, variant: str = "base") -> Path:
    """Write a tiny UniPic-3 folder: the diffusers layout (model_index.json + subfolders) and unipic3.json."""
    from unipic.unipic3.loading import SETTINGS_FILE

    folder = Path(folder)
    build_tiny_unipic3_pipeline(seed).save_pretrained(folder)
    settings = {"variant": variant, "budget_area": TINY_BUDGET_AREA}
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def tiny_unipic3_unified(device: str = "cpu", dtype=None, variant: str = "base", seed: int = 0):
    """The built-in `unipic3-tiny-random`: a tiny random UniPic-3 behind `UnifiedPipeline` (128² budget)."""
    import torch

    from unipic.unipic3.adapter import UniPic3UnifiedPipeline

    pipe = build_tiny_unipic3_pipeline(seed)
    pipe.to(device)
    if dtype not in (None, torch.float32):  # built in float32; only cast when asked to
        pipe.to(dtype=dtype)
    return UniPic3UnifiedPipeline(pipe, variant=variant, name="unipic3-tiny-random", budget_area=TINY_BUDGET_AREA)
