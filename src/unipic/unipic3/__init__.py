"""UniPic-3: multi-image editing and composition on Qwen-Image-Edit's components (base, CM, DMD).

Public API:
    is_unipic3_folder(path)                      -> bool (reads only JSON)
    load_unipic3_pipeline(path, device=, dtype=, cpu_offload=, vae_tiling=, base=, ema=, variant=,
                          quantization_config=, device_map=)    -> UniPic3UnifiedPipeline
    UniPic3Pipeline                              the diffusers pipeline (one instruction + 1-6 images)
    UniPic3UnifiedPipeline                       the `unipic.api.UnifiedPipeline` adapter
    convert_ema_to_safetensors, convert_release, write_settings    folder tools
    save_tiny_unipic3, build_tiny_unipic3_pipeline                 tiny random model (tests, smoke runs)

Heavy modules load on first attribute access, so `is_unipic3_folder` stays cheap for the CLI's
model dispatch. See docs/unipic3.md.
"""

from __future__ import annotations

import importlib

from unipic.unipic3.loading import (
    convert_ema_to_safetensors,
    convert_release,
    inspect_folder,
    is_unipic3_folder,
    load_unipic3_pipeline,
    write_settings,
)

_LAZY = {
    "UniPic3Pipeline": "unipic.unipic3.pipeline",
    "UniPic3UnifiedPipeline": "unipic.unipic3.adapter",
    "QwenVLChatProcessor": "unipic.unipic3.processor",
    "save_tiny_unipic3": "unipic.unipic3.tiny",
    "build_tiny_unipic3_pipeline": "unipic.unipic3.tiny",
}

__all__ = ["convert_ema_to_safetensors", "convert_release", "inspect_folder", "is_unipic3_folder",
           "load_unipic3_pipeline", "write_settings", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
