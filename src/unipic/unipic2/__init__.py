"""UniPic-2: SD3.5M-Kontext (2B) and MetaQuery (Qwen2.5-VL-7B + connector) on diffusers/transformers.

Public API:
    is_unipic2_folder(path)                    -> bool (reads only JSON)
    load_unipic2_pipeline(path, device=, dtype=, cpu_offload=, vae_tiling=, qwen_path=) -> UnifiedPipeline
    SD3Transformer2DKontextModel               SD3 MMDiT + reference-image tokens
    StableDiffusion3KontextPipeline            text-to-image / editing with CLIP-L, CLIP-G, T5
    UniPic2MetaQueryPipeline                   text-to-image / editing / image-to-text with Qwen2.5-VL
    StableDiffusion3Conditioner                meta queries + connector + projections
    KontextUnifiedPipeline, MetaQueryUnifiedPipeline   UnifiedPipeline adapters

Heavy modules (torch models, diffusers, transformers) load on first attribute access, so
`is_unipic2_folder` stays cheap for the CLI's model dispatch. See docs/unipic2.md.
"""

from __future__ import annotations

import importlib

from unipic.unipic2.loading import detect_unipic2_family, is_unipic2_folder, load_unipic2_pipeline

_LAZY = {
    "SD3Transformer2DKontextModel": "unipic.unipic2.transformer_sd3_kontext",
    "StableDiffusion3KontextPipeline": "unipic.unipic2.pipeline_kontext",
    "KontextSamplingMixin": "unipic.unipic2.pipeline_kontext",
    "UniPic2MetaQueryPipeline": "unipic.unipic2.pipeline_metaquery",
    "StableDiffusion3Conditioner": "unipic.unipic2.conditioner",
    "KontextUnifiedPipeline": "unipic.unipic2.adapters",
    "MetaQueryUnifiedPipeline": "unipic.unipic2.adapters",
    "save_tiny_kontext": "unipic.unipic2.tiny",
    "save_tiny_metaquery": "unipic.unipic2.tiny",
}

__all__ = ["detect_unipic2_family", "is_unipic2_folder", "load_unipic2_pipeline", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
