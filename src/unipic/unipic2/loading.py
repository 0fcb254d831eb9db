"""Recognise, load and save UniPic-2 model folders (diffusers layout, `model_index.json` optional).

Layouts (spec §1):

    Kontext-2B folder                         MetaQuery folder
    model_index.json                          model_index.json   (optional upstream)
    transformer/  vae/  scheduler/            transformer/  vae/  scheduler/  conditioner/
    text_encoder/    tokenizer/   (CLIP-L)    mllm/ mllm_tokenizer/ mllm_image_processor/  (optional:
    text_encoder_2/  tokenizer_2/ (CLIP-G)         Qwen2.5-VL saved inside; otherwise pass qwen_path
    text_encoder_3/  tokenizer_3/ (T5-XXL)         or set "_qwen_path" in model_index.json)

Components are loaded by slot name with our classes, not through the library names written in
`model_index.json`: upstream folders may name upstream modules there (e.g. the upstream
`SD3Transformer2DKontextModel` module), which we must not import. Folders written by
`save_pretrained` of our pipelines also load with `<Pipeline>.from_pretrained` once
`unipic.unipic2` is imported.

Nothing here downloads: a hub id or a missing folder raises `UserError` saying what to do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from unipic.api import UnifiedPipeline, UserError
from unipic.io_utils import read_json_object

logger = logging.getLogger(__name__)

KONTEXT = "kontext"
METAQUERY = "metaquery"
KONTEXT_PIPELINES = ("StableDiffusion3KontextPipeline", "StableDiffusion3Pipeline")
METAQUERY_PIPELINES = ("UniPic2MetaQueryPipeline",)
SD3_TRANSFORMERS = ("SD3Transformer2DKontextModel", "SD3Transformer2DModel")
KONTEXT_COMPONENTS = (
    "transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
    "text_encoder_3", "tokenizer_3",
)
METAQUERY_COMPONENTS = ("transformer", "vae", "scheduler", "conditioner")
MLLM_COMPONENTS = ("mllm", "mllm_tokenizer", "mllm_image_processor")
# Optional model_index.json key naming the Qwen2.5-VL folder (relative to the model folder unless
# absolute). The leading underscore makes diffusers' from_pretrained ignore it silently; the
# spelling without it is accepted too.
QWEN_PATH_KEY = "_qwen_path"
QWEN_PATH_KEYS = (QWEN_PATH_KEY, "qwen_path")
VAE_TILE_SIZE = 512  # pixels; the SD3 VAE's own tile (config.sample_size = 1024) never triggers at <= 1024 px


def _component_class(index: dict, name: str) -> str | None:
    """Class name recorded for component `name` in model_index.json (None when absent or null)."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return entry[1]
    return None


def detect_unipic2_family(path: str | Path) -> str | None:
    """Return "kontext", "metaquery" or None for a folder (reads only small JSON files).

    Recognised: a `model_index.json` of our pipelines or upstream's; any SD3 pipeline layout with
    all three text encoders (a stock SD3.5 folder runs as text-to-image); and, without
    `model_index.json`, the release layouts by their component configs: MetaQuery by transformer/
    + conditioner/, Kontext by transformer/ + vae/ + scheduler/ + the three text encoders
    (`load_kontext_pipeline` reads components by subfolder, so it never needed the index).
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    index = read_json_object(folder / "model_index.json")
    if index is not None:
        pipeline_class = index.get("_class_name")
        if pipeline_class in METAQUERY_PIPELINES or _component_class(index, "conditioner"):
            return METAQUERY
        has_text_encoders = all(_component_class(index, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
        if _component_class(index, "transformer") in SD3_TRANSFORMERS and (
            pipeline_class in KONTEXT_PIPELINES or has_text_encoders
        ):
            return KONTEXT
        return None
    conditioner = read_json_object(folder / "conditioner" / "config.json") or {}
    transformer = read_json_object(folder / "transformer" / "config.json") or {}
    if transformer.get("_class_name") not in SD3_TRANSFORMERS:
        return None
    if conditioner.get("_class_name") == "StableDiffusion3Conditioner":
        return METAQUERY
    if _has_kontext_components(folder):
        return KONTEXT
    return None


def _has_kontext_components(folder: Path) -> bool:
    """True when the Kontext subfolders other than transformer/ carry the configs their loaders read."""
    vae = read_json_object(folder / "vae" / "config.json") or {}
    if vae.get("_class_name") != "AutoencoderKL" or not (folder / "scheduler" / "scheduler_config.json").is_file():
        return False
    encoders = [read_json_object(folder / name / "config.json") or {} for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    model_types = [encoder.get("model_type") for encoder in encoders]
    # CLIP text towers save "clip_text_model" (transformers 4 and 5); T5's encoder saves "t5".
    return model_types[0] == model_types[1] == "clip_text_model" and model_types[2] == "t5"


def is_unipic2_folder(path: str | Path) -> bool:
    """True when `path` is a UniPic-2 (SD3.5M-Kontext or MetaQuery) model folder."""
    return detect_unipic2_family(path) is not None


# ---------------------------------------------------------------------------- components


def _subfolder(folder: Path, name: str, family: str) -> Path:
    sub = folder / name
    if not sub.is_dir():
        raise UserError(
            f"{folder} has no {name}/ folder; a UniPic2-{family} folder needs "
            f"{', '.join(n + '/' for n in (KONTEXT_COMPONENTS if family == 'SD3.5M-Kontext' else METAQUERY_COMPONENTS))}"
        )
    return sub


def _load_dit_parts(folder: Path, dtype: torch.dtype, family: str) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from unipic.unipic2.transformer_sd3_kontext import SD3Transformer2DKontextModel

    return {
        "transformer": SD3Transformer2DKontextModel.from_pretrained(
            _subfolder(folder, "transformer", family), torch_dtype=dtype
        ),
        "vae": AutoencoderKL.from_pretrained(_subfolder(folder, "vae", family), torch_dtype=dtype),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(_subfolder(folder, "scheduler", family)),
    }


def load_kontext_pipeline(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a `StableDiffusion3KontextPipeline` from a Kontext-2B folder (on the CPU)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    from unipic.unipic2.pipeline_kontext import StableDiffusion3KontextPipeline

    folder, family = Path(path), "SD3.5M-Kontext"
    parts = _load_dit_parts(folder, dtype, family)
    for name in ("text_encoder", "text_encoder_2"):
        parts[name] = CLIPTextModelWithProjection.from_pretrained(_subfolder(folder, name, family), dtype=dtype)
    parts["text_encoder_3"] = T5EncoderModel.from_pretrained(_subfolder(folder, "text_encoder_3", family), dtype=dtype)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        parts[name] = AutoTokenizer.from_pretrained(_subfolder(folder, name, family))
    return StableDiffusion3KontextPipeline(**parts)


def resolve_qwen_folders(path: str | Path, qwen_path: str | Path | None = None) -> tuple[Path, Path, Path]:
    """Folders of (Qwen model, tokenizer, image processor) for a MetaQuery folder.

    Order: the `qwen_path` argument; `<folder>/mllm` (+ `mllm_tokenizer/`, `mllm_image_processor/`
    when present, else the model folder); the `_qwen_path` key of model_index.json (relative to
    the model folder unless absolute; "qwen_path" is accepted too).

    Raises:
        UserError: when none is found, saying how to provide it.
    """
    from unipic.unipic2.pipeline_metaquery import MISSING_MLLM_HELP

    folder = Path(path)
    if qwen_path is not None:
        qwen = Path(qwen_path).expanduser()
        if not (qwen / "config.json").is_file():
            raise UserError(f"qwen_path {str(qwen)!r} is not a Qwen2.5-VL model folder (no config.json)")
        return qwen, qwen, qwen
    if (folder / "mllm" / "config.json").is_file():
        model = folder / "mllm"
        tokenizer = folder / "mllm_tokenizer" if (folder / "mllm_tokenizer").is_dir() else model
        processor = folder / "mllm_image_processor" if (folder / "mllm_image_processor").is_dir() else model
        return model, tokenizer, processor
    index = read_json_object(folder / "model_index.json") or {}
    for key in QWEN_PATH_KEYS:
        if index.get(key):
            qwen = Path(index[key]).expanduser()
            qwen = qwen if qwen.is_absolute() else folder / qwen
            if not (qwen / "config.json").is_file():
                raise UserError(f"model_index.json sets {key}={index[key]!r}, but {qwen} has no config.json")
            return qwen, qwen, qwen
    raise UserError(MISSING_MLLM_HELP)


def load_qwen(model_dir: Path, tokenizer_dir: Path, processor_dir: Path, dtype: torch.dtype):
    """(model, tokenizer, image processor) of a Qwen2.5-VL folder."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(tokenizer_dir), AutoImageProcessor.from_pretrained(processor_dir)


def load_metaquery_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, qwen_path: str | Path | None = None):
    """Load a `UniPic2MetaQueryPipeline` (with its Qwen2.5-VL) from a MetaQuery folder (on the CPU)."""
    from unipic.unipic2.conditioner import StableDiffusion3Conditioner
    from unipic.unipic2.pipeline_metaquery import UniPic2MetaQueryPipeline

    folder, family = Path(path), "MetaQuery"
    qwen_dirs = resolve_qwen_folders(folder, qwen_path)  # fail before loading anything large
    parts = _load_dit_parts(folder, dtype, family)
    parts["conditioner"] = StableDiffusion3Conditioner.from_pretrained(
        _subfolder(folder, "conditioner", family), torch_dtype=dtype
    )
    parts["mllm"], parts["mllm_tokenizer"], parts["mllm_image_processor"] = load_qwen(*qwen_dirs, dtype)
    return UniPic2MetaQueryPipeline(**parts)


def save_metaquery_pipeline(pipe, folder: str | Path, include_mllm: bool = True, qwen_path: str | None = None) -> Path:
    """Save a MetaQuery pipeline; without `include_mllm` the Qwen components are written as null.

    Args:
        pipe: a `UniPic2MetaQueryPipeline`.
        folder: destination folder.
        include_mllm: save Qwen2.5-VL inside the folder (mllm/, mllm_tokenizer/, mllm_image_processor/).
        qwen_path: recorded as "_qwen_path" in model_index.json so loading finds Qwen without arguments
            (relative paths are relative to `folder`).
    """
    from unipic.unipic2.pipeline_metaquery import UniPic2MetaQueryPipeline

    folder = Path(folder)
    if include_mllm:
        pipe.save_pretrained(folder)
    else:
        UniPic2MetaQueryPipeline(
            transformer=pipe.transformer, scheduler=pipe.scheduler, vae=pipe.vae, conditioner=pipe.conditioner
        ).save_pretrained(folder)
    if qwen_path is not None:
        index = json.loads((folder / "model_index.json").read_text())
        index[QWEN_PATH_KEY] = str(qwen_path)
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


# ---------------------------------------------------------------------------- placement


def enable_vae_tiling(vae, tile_size: int = VAE_TILE_SIZE) -> None:
    """diffusers' VAE tiling, with tiles of at most `tile_size` pixels (25 % overlap, blended)."""
    vae.enable_tiling()
    tile = min(tile_size, vae.tile_sample_min_size)
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)


def place_pipeline(pipe, device: str, cpu_offload: bool = False) -> None:
    """Move the pipeline to `device`, or enable diffusers' model CPU offload onto it."""
    if cpu_offload:
        if device not in ("cuda", "mps"):
            raise UserError(
                f"CPU offload keeps weights in RAM and moves each model to the GPU when it runs; it needs "
                f"device 'cuda' or 'mps', not {device!r}. Drop the CPU-offload option on this machine."
            )
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)


def load_unipic2_pipeline(
    path: str | Path,
    *,
    device: str,
    dtype: torch.dtype,
    cpu_offload: bool = False,
    vae_tiling: bool = False,
    qwen_path: str | None = None,
) -> UnifiedPipeline:
    """Load a UniPic-2 folder as a `UnifiedPipeline` (the CLI entry point).

    Args:
        path: a UniPic2-SD3.5M-Kontext or UniPic2-MetaQuery folder (see module docstring).
        device: "cpu", "cuda" or "mps" (already resolved).
        dtype: compute dtype of every component.
        cpu_offload: diffusers' model CPU offload (one model on the GPU at a time).
        vae_tiling: decode/encode in 512-px tiles (diffusers' tiling).
        qwen_path: the Qwen2.5-VL-7B-Instruct folder (MetaQuery only).

    Raises:
        UserError: not a UniPic-2 folder, missing parts, Qwen missing, offload without a GPU.
    """
    from unipic.unipic2.adapters import KontextUnifiedPipeline, MetaQueryUnifiedPipeline

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"model folder {str(path)!r} does not exist; download it first, e.g. "
            "`huggingface-cli download Skywork/UniPic2-SD3.5M-Kontext-2B --local-dir models/kontext`"
        )
    family = detect_unipic2_family(folder)
    if family is None:
        raise UserError(
            f"{folder} is not a UniPic-2 folder: expected a diffusers model_index.json of "
            "StableDiffusion3KontextPipeline / UniPic2MetaQueryPipeline, or the release's subfolders "
            "(transformer/ + conditioner/ for MetaQuery; transformer/, vae/, scheduler/, text_encoder{,_2,_3}/ "
            "and tokenizer{,_2,_3}/ for Kontext)"
        )
    if family == KONTEXT:
        if qwen_path is not None:
            logger.warning("qwen_path is ignored: %s is an SD3.5M-Kontext folder, not MetaQuery", folder)
        pipe, adapter = load_kontext_pipeline(folder, dtype), KontextUnifiedPipeline
    else:
        pipe, adapter = load_metaquery_pipeline(folder, dtype, qwen_path), MetaQueryUnifiedPipeline
    place_pipeline(pipe, device, cpu_offload)
    if vae_tiling:
        enable_vae_tiling(pipe.vae)
    return adapter(pipe, name=folder.name)
