"""`load_pipeline`: turn a `--model` value into a ready `UnifiedPipeline`.

Accepted values: a UniPic-1 model folder (`config.json`), a UniPic-2 diffusers folder
(`model_index.json`, or a release's subfolders without it), a UniPic-3 folder (Qwen-Image-Edit
layout; base, CM or DMD release), a Hugging Face hub id (downloaded when online), or a built-in
name: `default` (the embedded Shapes-world model), `tiny-random` (an untrained tiny preset, for
smoke tests), `unipic3-tiny-random` (a tiny random UniPic-3) and `shapes-oracle` (renders
template prompts exactly; checks the evaluators).
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

import torch

from unipic.api import UnifiedPipeline, UserError

BUILTIN_MODELS = ("default", "tiny-random", "unipic3-tiny-random", "shapes-oracle")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_device(device: str | None) -> torch.device:
    """'auto' → cuda, then mps, then cpu; an explicit but unavailable device is a UserError."""
    device = device or "auto"
    if device in ("auto", "cuda") and torch.cuda.is_available():
        # Under `accelerate launch`/torchrun each process takes the GPU of its local rank.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if device == "auto":
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError("--device mps: MPS is not available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a valid device; use cpu, cuda or mps") from None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' → bfloat16 on CUDA, float32 elsewhere; names map to torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
    return table[dtype]


def default_model_folder() -> Path | None:
    """The embedded Shapes-world model shipped inside the package, if present."""
    folder = Path(str(resources.files("unipic") / "assets" / "default_model"))
    return folder if (folder / "config.json").is_file() else None


def tiny_random_model(seed: int = 0):
    """An untrained model of the tiny preset with the toy byte tokenizer (deterministic weights)."""
    from unipic.unipic1.checkpoint import build_model
    from unipic.unipic1.models.presets import unipic1_tiny
    from unipic.unipic1.tokenizer import build_byte_tokenizer

    config = unipic1_tiny()
    model = build_model(config, seed=seed)
    tokenizer = build_byte_tokenizer(config.image_token)
    model.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    return model.eval(), tokenizer


def _download_from_hub(repo_id: str) -> Path:
    """Fetch a hub repo (cache first); offline, fail with one line saying how to pass a local folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise UserError(f"--model {repo_id}: huggingface_hub is not installed; pass a local folder") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:
        kind = type(error).__name__
        raise UserError(f"--model {repo_id}: the Hugging Face hub is unreachable or the repo is unavailable ({kind}); "
                        f"download it elsewhere and pass the local folder with --model PATH") from None


def load_pipeline(model: str | os.PathLike | None = None, *, device: str | None = "auto",
                  dtype: str | torch.dtype | None = "auto", cpu_offload: bool = False,
                  vae_tiling: bool = False, qwen_path: str | None = None, base: str | None = None,
                  ema: bool | None = None, variant: str | None = None,
                  device_map: str | None = None, quantize: str | None = None) -> UnifiedPipeline:
    """Load the pipeline for a `--model` value (see the module docstring) on a device and dtype.

    `base`, `ema`, `variant`, `device_map` and `quantize` apply to UniPic-3 folders (see
    `unipic.unipic3.load_unipic3_pipeline`).
    """
    name = "default" if model in (None, "") else str(model)
    unipic3_options = base or ema is not None or variant or device_map or quantize
    if unipic3_options and name in ("shapes-oracle", "tiny-random", "default"):
        raise UserError("--base, --ema, --variant, --device-map and --quantize apply to UniPic-3 models only")
    if name == "shapes-oracle":
        from unipic.world.oracle import ShapesOracle

        return ShapesOracle()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if name == "default" and default_model_folder() is None:
        raise UserError("the embedded default model is missing from this installation (unipic/assets/default_model); "
                        "reinstall unipic, or pass --model PATH")
    if name == "tiny-random":
        net, tokenizer = tiny_random_model()
        return _unipic1_pipeline(net.to(device=torch_device, dtype=torch_dtype), tokenizer)
    if name == "unipic3-tiny-random":
        from unipic.unipic3.tiny import tiny_unipic3_unified

        if base or ema is not None or device_map or quantize or cpu_offload:
            raise UserError("the built-in unipic3-tiny-random takes --variant only; for --base, --ema, --device-map, "
                            "--quantize or --cpu-offload save it as a folder (unipic.unipic3.tiny.save_tiny_unipic3)")
        return tiny_unipic3_unified(device=str(torch_device), dtype=torch_dtype, variant=variant or "base")
    folder = default_model_folder() if name == "default" else Path(name).expanduser()
    if not folder.exists():
        if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
            folder = _download_from_hub(name)
        else:
            raise UserError(f"--model {name}: no such folder, and not a built-in name ({', '.join(BUILTIN_MODELS)}) "
                            f"or a hub id (org/name)")
    if not folder.is_dir():
        raise UserError(f"--model {name} is a file; give the model folder that holds it (UniPic-1: config.json, "
                        "weights and tokenizer files; UniPic-2: the component subfolders)")
    from unipic.unipic3 import is_unipic3_folder, load_unipic3_pipeline  # detection reads JSON only

    if is_unipic3_folder(folder):
        if qwen_path:
            raise UserError("--qwen applies to UniPic2-MetaQuery only; a UniPic-3 folder takes --base for missing parts")
        return load_unipic3_pipeline(folder, device=str(torch_device), dtype=torch_dtype, cpu_offload=cpu_offload,
                                     vae_tiling=vae_tiling, base=base, ema=ema, variant=variant,
                                     device_map=device_map, quantize=quantize)
    if unipic3_options:
        raise UserError("--base, --ema, --variant, --device-map and --quantize apply to UniPic-3 models only")
    has_index = (folder / "model_index.json").is_file()
    # UniPic-2 release folders may lack model_index.json; their subfolder configs identify them.
    if has_index or not (folder / "config.json").is_file():
        from unipic.unipic2 import is_unipic2_folder, load_unipic2_pipeline  # detection reads JSON only

        if is_unipic2_folder(folder):
            return load_unipic2_pipeline(folder, device=str(torch_device), dtype=torch_dtype,
                                         cpu_offload=cpu_offload, vae_tiling=vae_tiling, qwen_path=qwen_path)
        if has_index:
            raise UserError(f"--model {name}: model_index.json does not describe a UniPic-2 model")
    if (folder / "config.json").is_file():
        from unipic.unipic1.checkpoint import load_model_folder

        if cpu_offload or vae_tiling or qwen_path:
            raise UserError("--cpu-offload, --vae-tiling and --qwen apply to UniPic-2 models only")
        net, tokenizer = load_model_folder(folder, device=torch_device, dtype=torch_dtype, inference=True)
        return _unipic1_pipeline(net, tokenizer)
    raise UserError(f"--model {name}: the folder has neither config.json (UniPic-1) nor model_index.json or the "
                    "component subfolders of a UniPic-2 release")


def _unipic1_pipeline(model, tokenizer) -> UnifiedPipeline:
    from unipic.unipic1.pipeline import UniPicPipeline

    return UniPicPipeline(model, tokenizer)


# Below this many parameters a model's ops on CPU are too small to split across threads: on the
# project's two-core machine the embedded model (8.6M) drew an image in 0.19 s with one thread and
# 0.5-11 s with two when the second core was busy (docs/sampling.md, "Issue 40").
SMALL_MODEL_PARAMETERS = 50_000_000


def cpu_threads_for(pipeline) -> int:
    """One intra-op thread for a small model on CPU (unless OMP_NUM_THREADS is set); returns the count in use.

    The command line calls this after loading; the library leaves torch's setting alone.
    """
    model = getattr(pipeline, "model", None)
    if (isinstance(model, torch.nn.Module) and "OMP_NUM_THREADS" not in os.environ
            and next(model.parameters()).device.type == "cpu"
            and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS):
        torch.set_num_threads(1)
    return torch.get_num_threads()
