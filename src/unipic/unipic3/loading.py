"""Recognise, load and convert UniPic-3 folders (offline; the family is told by the folder itself).

Layouts (only the transformer differs between releases; the rest is Qwen-Image-Edit's):

    base (Skywork/Unipic3)        DMD (Skywork/Unipic3-DMD)       CM (Skywork/Unipic3-Consistency-Model)
    model_index.json              transformer/                    transformer/
    transformer/                  ema_transformer/  (pickled .bin) ema_transformer/
    vae/ text_encoder/            vae/ text_encoder/              (nothing else: the VAE, text encoder,
    tokenizer/ processor/         tokenizer/ processor/            processor and scheduler come from a
    scheduler/                    [scheduler/]                     Qwen-Image-Edit folder given as base=)

A folder is UniPic-3 when its model_index.json names a Qwen-Image-Edit pipeline (or ours), or
when transformer/ or ema_transformer/ holds a `QwenImageTransformer2DModel` config. Each
component is read from the folder when its subfolder is there, else from `base`; a missing
scheduler falls back to Qwen-Image-Edit's published config. Our own settings live in
`unipic3.json` (variant, EMA choice, base folder, pixel budget) so a converted folder is
described once and never asks again.

Pickled weights are read only with `torch.load(..., weights_only=True)` and must hold nothing
but tensors; anything else is refused with a `UserError`. `convert_ema_to_safetensors` turns
such a file into safetensors once.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unipic.api import UnifiedPipeline, UserError
from unipic.io_utils import read_json_object

logger = logging.getLogger(__name__)

SETTINGS_FILE = "unipic3.json"
VARIANTS = ("base", "cm", "dmd")
TRANSFORMER_CLASS = "QwenImageTransformer2DModel"
EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "UniPic3Pipeline")
SHARED_COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "processor")
TRANSFORMER_FOLDERS = ("transformer", "ema_transformer")
QUANTIZABLE = ("transformer", "text_encoder")
OFFLOAD_MODES = ("model", "sequential")
# Qwen-Image-Edit's scheduler/scheduler_config.json (hub revision of Aug 2025): used only when
# neither the folder nor `base` has a scheduler/ (its only role here is the resolution shift).
QWEN_IMAGE_EDIT_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
BASE_HELP = ("pass the Qwen-Image-Edit folder they come from: base='models/Qwen-Image-Edit' "
             "(CLI: --base FOLDER)")


@dataclass
class Layout:
    """What a UniPic-3 folder holds, read from small JSON files only."""

    folder: Path
    has_index: bool
    transformers: dict[str, Path]  # "transformer" / "ema_transformer" -> subfolder
    components: dict[str, Path]  # shared components present in the folder itself
    settings: dict = field(default_factory=dict)  # unipic3.json

    def detected_variant(self) -> str | None:
        """The variant the files imply: unipic3.json, else ema_transformer/ (+ components: DMD; alone: CM), else base."""
        if self.settings.get("variant") in VARIANTS:
            return self.settings["variant"]
        if "ema_transformer" in self.transformers:
            return "dmd" if {"vae", "text_encoder"} & set(self.components) else "cm"
        if self.has_index:
            return "base"
        return None  # a bare transformer/ folder: any of the three


def inspect_folder(path: str | Path) -> Layout | None:
    """The layout of a UniPic-3 folder, or None when `path` is not one (reads only JSON)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    index = read_json_object(folder / "model_index.json")
    transformers = {name: folder / name for name in TRANSFORMER_FOLDERS
                    if (read_json_object(folder / name / "config.json") or {}).get("_class_name") == TRANSFORMER_CLASS}
    if index is not None:
        entry = index.get("transformer")
        names_transformer = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] == TRANSFORMER_CLASS
        # Qwen-Image (text-to-image) shares the transformer class but has no processor: not ours.
        if not (index.get("_class_name") in EDIT_PIPELINES or (names_transformer and index.get("processor"))):
            return None
    elif not transformers:
        return None
    components = {name: folder / name for name in SHARED_COMPONENTS if (folder / name).is_dir()}
    settings = read_json_object(folder / SETTINGS_FILE) or {}
    return Layout(folder, index is not None, transformers, components, settings)


def is_unipic3_folder(path: str | Path) -> bool:
    """True when `path` is a UniPic-3 (or Qwen-Image-Edit) model folder."""
    return inspect_folder(path) is not None


def write_settings(folder: str | Path, **settings: object) -> Path:
    """Merge `settings` into the folder's unipic3.json (created if missing); returns its path."""
    path = Path(folder) / SETTINGS_FILE
    merged = {**(read_json_object(path) or {}), **{k: v for k, v in settings.items() if v is not None}}
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------- choices


def resolve_variant(layout: Layout, variant: str | None) -> str:
    """The sampler family: the argument, else what the folder implies; a UserError when neither tells."""
    if variant is not None:
        if variant not in VARIANTS:
            raise UserError(f"variant={variant!r}: must be one of {', '.join(VARIANTS)}")
        return variant
    detected = layout.detected_variant()
    if detected is None:
        raise UserError(f"{layout.folder} holds only transformer/, which does not say whether it is the base, CM or DMD "
                        f"model; pass variant='base', 'cm' or 'dmd' (CLI: --variant), or record it with "
                        f"unipic.unipic3.write_settings(folder, variant=...)")
    return detected


def resolve_ema(layout: Layout, variant: str, ema: bool | None) -> bool:
    """Whether to load ema_transformer/: the argument, else unipic3.json, else upstream's choice (CM/DMD yes)."""
    if ema is None:
        ema = layout.settings.get("ema")
    if ema is None:
        ema = variant in ("cm", "dmd") and "ema_transformer" in layout.transformers
    name = "ema_transformer" if ema else "transformer"
    if name not in layout.transformers:
        other = "ema=False" if ema else "ema=True"
        raise UserError(f"{layout.folder} has no {name}/ with a {TRANSFORMER_CLASS} config; "
                        f"{'use ' + other if layout.transformers else 'this is not a UniPic-3 transformer folder'}")
    return bool(ema)


def resolve_components(layout: Layout, base: str | Path | None) -> dict[str, Path | None]:
    """Folder of each shared component: the model folder's own, else base's (argument, then unipic3.json)."""
    base_dir = None
    if base is None and layout.settings.get("base"):
        base = layout.settings["base"]
        base = base if Path(base).is_absolute() else layout.folder / base
    if base is not None:
        base_dir = Path(base).expanduser()
        if not base_dir.is_dir():
            raise UserError(f"base={str(base)!r}: no such folder; give a Qwen-Image-Edit folder (vae/, text_encoder/, "
                            f"processor/, scheduler/)")
    found: dict[str, Path | None] = {}
    for name in SHARED_COMPONENTS:
        own = layout.components.get(name)
        found[name] = own or (base_dir / name if base_dir is not None and (base_dir / name).is_dir() else None)
    missing = [name for name in ("vae", "text_encoder", "processor") if found[name] is None]
    if missing:
        where = f"{layout.folder} or base {base_dir}" if base_dir is not None else str(layout.folder)
        raise UserError(f"{where} has no {', '.join(n + '/' for n in missing)} (a UniPic-3 CM release holds only the "
                        f"transformer); {BASE_HELP}")
    return found


# ---------------------------------------------------------------------------- pickled weights


def load_tensor_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a pickled .bin, unpickled only by `torch.load(weights_only=True)`; tensors only.

    Raises:
        UserError: the file holds anything but a dict of str -> tensor (the unpickler refuses
            arbitrary objects; plain containers and numbers are refused here).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise UserError(f"{path}: not a readable PyTorch weights file ({_first_line(error)})") from None
        state = _load_without_mmap(path)  # files in the legacy (pre-zip) format cannot be memory-mapped
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as error:
        raise UserError(f"{path}: refused to unpickle; it holds objects other than tensors "
                        f"({_first_line(error)}); only plain tensor state dicts are loaded") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; refused")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path} holds a {type(value).__name__} at key {key!r}, not only tensors; refused")
    return state


def _load_without_mmap(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: refused to unpickle; it holds objects other than tensors "
                        f"({_first_line(error)}); only plain tensor state dicts are loaded") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _bin_files(folder: Path) -> list[Path]:
    """The .bin weight files of a model subfolder: the shards of an index, else every *.bin."""
    for index_file in sorted(folder.glob("*.bin.index.json")):
        weight_map = (read_json_object(index_file) or {}).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.bin"))


def _bin_state(folder: Path, missing: str) -> dict[str, torch.Tensor]:
    """Every tensor of a subfolder's pickled `.bin` files (shards merged), read with weights_only=True."""
    files = _bin_files(folder)
    if not files:
        raise UserError(missing)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_tensor_pickle(file))
    return state


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def load_bin_transformer(folder: Path, dtype: torch.dtype):
    """A `QwenImageTransformer2DModel` from config.json + pickled .bin weights (tensors only)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    state = _bin_state(folder, f"{folder} has config.json but no .safetensors or .bin weights")
    config = QwenImageTransformer2DModel.load_config(folder)
    with init_empty_weights():  # parameters on the meta device: the state dict supplies them
        model = QwenImageTransformer2DModel.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not fit {TRANSFORMER_CLASS}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]} ({len(missing)} and {len(unexpected)} keys)")
    for key, tensor in state.items():
        if tensor.shape != model.state_dict()[key].shape:
            raise UserError(f"{folder}: {key} has shape {tuple(tensor.shape)}, the config needs "
                            f"{tuple(model.state_dict()[key].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return model.eval()


def load_transformer(folder: Path, dtype: torch.dtype, quantization_config: Any = None,
                     device_map: str | None = None):
    """The transformer of a subfolder: safetensors through diffusers, pickled .bin through `load_bin_transformer`."""
    from diffusers import QwenImageTransformer2DModel

    if _has_safetensors(folder):
        kwargs = {k: v for k, v in (("quantization_config", quantization_config), ("device_map", device_map))
                  if v is not None}
        return QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, **kwargs)
    if quantization_config is not None or device_map is not None:
        raise UserError(f"{folder} holds pickled .bin weights; convert them first with "
                        "unipic.unipic3.convert_ema_to_safetensors, then quantize or spread the converted folder")
    return load_bin_transformer(folder, dtype)


def convert_ema_to_safetensors(source: str | Path, destination: str | Path, max_shard_size: str = "5GB") -> Path:
    """Rewrite a transformer subfolder with pickled .bin weights (e.g. ema_transformer/) as safetensors.

    Args:
        source: the subfolder (config.json + .bin files).
        destination: the new subfolder (config.json + diffusion_pytorch_model*.safetensors [+ index]).
        max_shard_size: largest shard, as huggingface_hub understands it ("5GB").

    Returns:
        `destination`.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    source, destination = Path(source), Path(destination)
    if not (source / "config.json").is_file():
        raise UserError(f"{source} has no config.json; give the transformer subfolder (e.g. ema_transformer/)")
    state = _bin_state(source, f"{source} holds no .bin weights to convert")
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "config.json", destination / "config.json")
    split = split_torch_state_dict_into_shards(state, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, destination / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (destination / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return destination


def convert_release(folder: str | Path, output: str | Path, *, base: str | Path | None = None,
                    variant: str | None = None, ema: bool | None = None) -> Path:
    """Write `output` = the chosen transformer as safetensors + unipic3.json (variant, base folder).

    The shared components are not copied: unipic3.json points at the folder that has them
    (the release itself, or `base`), so loading `output` needs no further arguments.
    """
    layout = inspect_folder(folder)
    if layout is None:
        raise UserError(f"{folder} is not a UniPic-3 folder")
    variant = resolve_variant(layout, variant)
    use_ema = resolve_ema(layout, variant, ema)
    components = resolve_components(layout, base)
    source = layout.transformers["ema_transformer" if use_ema else "transformer"]
    output = Path(output)
    if _has_safetensors(source):
        shutil.copytree(source, output / "transformer", dirs_exist_ok=True)
    else:
        convert_ema_to_safetensors(source, output / "transformer")
    shared_home = components["vae"].parent.resolve()
    write_settings(output, variant=variant, ema=False, base=str(shared_home), converted_from=str(Path(folder).resolve()),
                   converted_transformer=source.name, budget_area=layout.settings.get("budget_area"))
    return output


# ---------------------------------------------------------------------------- loading


QUANTIZE_CHOICES = ("int8", "nf4")


def quantization_configs(quantize: str, device: str) -> dict[str, Any]:
    """The libraries' own quantization configs for `quantize` ("int8" or "nf4"): bitsandbytes on CUDA
    (8-bit, or 4-bit NF4 with bfloat16 compute), optimum-quanto int8 weights elsewhere (CPU, MPS).

    Returns {"transformer": diffusers config, "text_encoder": transformers config}, for
    `load_unipic3_pipeline(quantization_config=...)`.
    """
    import importlib.util

    import diffusers
    import transformers

    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if str(device).startswith("cuda"):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"--quantize {quantize} on CUDA uses bitsandbytes, which is not installed: "
                            "pip install bitsandbytes")
        if quantize == "nf4":
            options = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
        else:
            options = {"load_in_8bit": True}
        return {"transformer": diffusers.BitsAndBytesConfig(**options),
                "text_encoder": transformers.BitsAndBytesConfig(**options)}
    if quantize == "nf4":
        raise UserError("--quantize nf4 needs a CUDA GPU (bitsandbytes); on this device use --quantize int8 "
                        "(optimum-quanto's int8 weights)")
    if importlib.util.find_spec("optimum.quanto") is None:
        raise UserError("--quantize int8 off CUDA uses optimum-quanto, which is not installed: pip install optimum-quanto")
    return {"transformer": diffusers.QuantoConfig(weights_dtype="int8"),
            "text_encoder": transformers.QuantoConfig(weights="int8")}


def load_components(path: str | Path, *, dtype: torch.dtype = torch.float32, base: str | Path | None = None,
                    ema: bool | None = None, variant: str | None = None,
                    quantization_config: dict[str, Any] | None = None, device_map: str | None = None):
    """(`UniPic3Pipeline` on the CPU or per `device_map`, resolved settings) for a UniPic-3 folder."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from unipic.unipic3.pipeline import UniPic3Pipeline
    from unipic.unipic3.processor import load_processor

    layout = inspect_folder(path)
    if layout is None:
        raise UserError(f"{path} is not a UniPic-3 folder: expected a Qwen-Image-Edit model_index.json, or "
                        f"transformer/ or ema_transformer/ with a {TRANSFORMER_CLASS} config")
    quantization_config = dict(quantization_config or {})
    unknown = sorted(set(quantization_config) - set(QUANTIZABLE))
    if unknown:
        raise UserError(f"quantization_config keys {unknown}: only {', '.join(QUANTIZABLE)} can be quantized")
    if device_map is not None and not torch.cuda.is_available():
        raise UserError(f"device_map={device_map!r} spreads the models over CUDA GPUs; none is available here")
    variant = resolve_variant(layout, variant)
    use_ema = resolve_ema(layout, variant, ema)
    found = resolve_components(layout, base)  # fail before loading anything large

    if found["scheduler"] is not None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(found["scheduler"])
    else:
        logger.info("no scheduler/ in %s or base; using Qwen-Image-Edit's published scheduler config", layout.folder)
        scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_EDIT_SCHEDULER)
    text_kwargs = {k: v for k, v in (("quantization_config", quantization_config.get("text_encoder")),
                                     ("device_map", device_map)) if v is not None}
    pipe = UniPic3Pipeline(
        scheduler=scheduler,
        vae=AutoencoderKLQwenImage.from_pretrained(found["vae"], torch_dtype=dtype),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(found["text_encoder"], dtype=dtype,
                                                                         **text_kwargs).eval(),
        tokenizer=AutoTokenizer.from_pretrained(found["tokenizer"]) if found["tokenizer"] is not None else None,
        processor=load_processor(found["processor"]),
        transformer=load_transformer(layout.transformers["ema_transformer" if use_ema else "transformer"], dtype,
                                     quantization_config.get("transformer"), device_map),
    )
    settings = {"variant": variant, "ema": use_ema, "budget_area": layout.settings.get("budget_area")}
    return pipe, settings


def place_pipeline(pipe, device: str, cpu_offload: bool | str = False, device_map: str | None = None) -> None:
    """Move `pipe` to `device`, or enable diffusers' model / sequential CPU offload onto it."""
    mode = "model" if cpu_offload is True else (None if cpu_offload in (False, None) else cpu_offload)
    if mode is not None and mode not in OFFLOAD_MODES:
        raise UserError(f"cpu_offload={cpu_offload!r}: use True/'model' or 'sequential'")
    if device_map is not None:
        if mode is not None:
            raise UserError("device_map and cpu_offload exclude each other; pick one")
        # The big models are already spread; the VAE joins the transformer's first device.
        pipe.vae.to(pipe.transformer.device)
        return
    if mode is None:
        pipe.to(device)
        return
    if not str(device).startswith(("cuda", "mps")):
        raise UserError(f"CPU offload keeps weights in RAM and moves them to the GPU when they run; it needs device "
                        f"'cuda' or 'mps', not {device!r}. Drop the CPU-offload option on this machine.")
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def load_unipic3_pipeline(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cpu_offload: bool | str = False,
    vae_tiling: bool = False,
    base: str | Path | None = None,
    ema: bool | None = None,
    variant: str | None = None,
    quantization_config: dict[str, Any] | None = None,
    device_map: str | None = None,
    quantize: str | None = None,
) -> UnifiedPipeline:
    """Load a UniPic-3 folder as a `UnifiedPipeline` (the entry point of `unipic.loading.load_pipeline`).

    Args:
        path: a base, CM or DMD release folder, or one we converted (see the module docstring).
        device: "cpu", "cuda", "cuda:1" or "mps" (already resolved).
        dtype: compute dtype of every component.
        cpu_offload: True or "model" (diffusers' model offload), "sequential" (layer by layer).
        vae_tiling: encode/decode in tiles (diffusers' tiling of the Qwen-Image VAE).
        base: the Qwen-Image-Edit folder supplying what the release lacks (CM: everything but the transformer).
        ema: load ema_transformer/ (True), transformer/ (False) or upstream's choice (None: EMA for CM/DMD).
        variant: "base" (50-step Euler), "cm" or "dmd" (8-step consistency sampler); None = from the folder.
        quantization_config: {"transformer": diffusers config, "text_encoder": transformers config}.
        device_map: e.g. "balanced": spread the transformer and the text encoder over the GPUs.
        quantize: "int8" or "nf4": the transformer's and text encoder's weights through
            `quantization_configs` (excludes `quantization_config`).

    Raises:
        UserError: not a UniPic-3 folder, missing components without `base`, a non-tensor pickle,
            offload without a GPU.
    """
    from unipic.unipic3.adapter import UniPic3UnifiedPipeline

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"model folder {str(path)!r} does not exist; download it first, e.g. "
                        "`huggingface-cli download Skywork/Unipic3-DMD --local-dir models/unipic3-dmd`")
    if quantize is not None:
        if quantization_config is not None:
            raise UserError("give quantize or quantization_config, not both")
        quantization_config = quantization_configs(quantize, device)
    pipe, settings = load_components(folder, dtype=dtype, base=base, ema=ema, variant=variant,
                                     quantization_config=quantization_config, device_map=device_map)
    place_pipeline(pipe, device, cpu_offload, device_map)
    if vae_tiling:
        pipe.vae.enable_tiling()
    return UniPic3UnifiedPipeline(pipe, variant=settings["variant"], name=folder.name,
                                  budget_area=settings["budget_area"])
