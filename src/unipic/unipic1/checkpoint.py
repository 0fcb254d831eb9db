"""Model folders, strict checkpoint loading and safe file reading.

Our model folder: `config.json` (a `UniPicConfig`), `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, and the tokenizer files.
Loading builds the model with meta parameters, then assigns the tensors read from the (memory-
mapped) files, so the weights are never held twice. Every load is strict: a missing, unexpected or
mis-shaped tensor is an error that names it. Pickled files are read with `weights_only=True` only.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from unipic.api import UserError
from unipic.io_utils import atomic_write_bytes, atomic_write_json
from unipic.unipic1.models.config import UniPicConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# With tied embeddings the output matrix is the input matrix; files may carry it or not.
TIED_ALIASES = {"llm.lm_head.weight": "llm.model.embed_tokens.weight"}


class CheckpointError(UserError):
    """A checkpoint does not match the model (names the offending tensors)."""


def build_model(config: UniPicConfig, *, empty: bool = False, seed: int | None = None, light_llm: bool = False):
    """Build a `UniPic`; `empty=True` gives meta parameters (instant, no memory) for loading into;
    `light_llm`: the transformers-free LLM for inference (`UniPic`)."""
    from unipic.unipic1.models.unipic import UniPic, init_empty_weights

    if empty:
        with init_empty_weights():
            return UniPic(config, light_llm=light_llm)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return UniPic(config, light_llm=light_llm)


def expected_tensors(config: UniPicConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor an official-layout checkpoint may hold (from a meta build)."""
    with torch.device("meta"):
        from unipic.unipic1.models.unipic import UniPic

        model = UniPic(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _tied(model) -> bool:
    return bool(getattr(model.config.llm, "tie_word_embeddings", False))


def check_state_dict(model, state: Mapping[str, torch.Tensor], *, ignore_missing_prefixes: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError if `state` does not match `model` exactly (names and shapes)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = set(TIED_ALIASES) if _tied(model) else set()
    missing = sorted(n for n in expected if n not in state and n not in optional
                     and not n.startswith(ignore_missing_prefixes))
    unexpected = sorted(n for n in state if n not in expected)
    mismatched = sorted(f"{n}: checkpoint {list(state[n].shape)} vs model {list(expected[n])}"
                        for n in state if n in expected and tuple(state[n].shape) != expected[n])
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_preview(mismatched)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model — " + "; ".join(problems))


def _preview(items: list[str], limit: int = 8) -> str:
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_state_dict_strict(model, state: Mapping[str, torch.Tensor], *, assign: bool = False,
                           ignore_missing_prefixes: tuple[str, ...] = ()) -> None:
    """Check `state` against `model`, then load it (tied output embedding re-tied afterwards)."""
    check_state_dict(model, state, ignore_missing_prefixes=ignore_missing_prefixes)
    state = dict(state)
    if _tied(model):
        for alias in TIED_ALIASES:
            state.pop(alias, None)
    model.load_state_dict(state, strict=False, assign=assign)
    if _tied(model):
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map a safetensors file; a damaged one is a one-line CheckpointError, not a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a safetensors file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({first[:160]}); "
                              "copy or download it again") from None


def read_tensor_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file (memory-mapped) or a pickled torch file with `weights_only=True`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; give the checkpoint file")
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"refusing to load {path.name}: it is not a plain tensor checkpoint and will not be "
                              f"unpickled ({first[:200]})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], Mapping) and not isinstance(obj[key], torch.Tensor):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} does not hold a flat name → tensor mapping")
    return dict(obj)


# ---------------------------------------------------------------------------------------------
# Our model folder
# ---------------------------------------------------------------------------------------------


def save_model_folder(model, tokenizer, folder: str | os.PathLike, *, max_shard_bytes: int = 2 * 1024**3,
                      dtype: torch.dtype | None = None) -> Path:
    """Write config.json, safetensors shards (+ index) and the tokenizer; each file atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if _tied(model):
        for alias in TIED_ALIASES:
            state.pop(alias, None)
    tensors = {name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().cpu().contiguous()
               for name, t in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in folder.glob("model*.safetensors*"):
        stale.unlink()
    if len(shards) == 1:
        atomic_write_bytes(folder / WEIGHTS_NAME, save(shards[0], metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write_bytes(folder / name, save(shard, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    tokenizer.save_pretrained(str(folder))
    # config.json last: its presence marks a complete folder.
    model.config.save(folder / CONFIG_NAME)
    return folder


def read_model_folder_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (single file or shards), memory-mapped."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{folder / INDEX_NAME} is not a safetensors index "
                                  f"({type(error).__name__}: {error})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder / INDEX_NAME} names {shard}, which is missing from {folder}")
            state.update(_load_safetensors(folder / shard))
        return state
    if (folder / WEIGHTS_NAME).exists():
        return _load_safetensors(folder / WEIGHTS_NAME)
    raise UserError(f"{folder} has no {WEIGHTS_NAME} or {INDEX_NAME}")


# Below this many LLM parameters the pipelines load the transformers-free decoder (issue 40: for the
# embedded model, importing transformers' Qwen2 cost more than drawing an image).
LIGHT_LLM_PARAMETERS = 50_000_000


def llm_parameters(config: UniPicConfig) -> int:
    """The LLM's parameter count from its config (embeddings, attention, MLP; norms and biases left out)."""
    llm = config.llm
    head_dim = llm.hidden_size // llm.num_attention_heads
    attention = llm.hidden_size * head_dim * (2 * llm.num_attention_heads + 2 * llm.num_key_value_heads)
    mlp = 3 * llm.hidden_size * llm.intermediate_size
    return llm.vocab_size * llm.hidden_size + llm.num_hidden_layers * (attention + mlp)


def load_model_folder(folder: str | os.PathLike, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None, inference: bool = False):
    """Load (model, tokenizer) from our model folder, strictly, without holding two copies.

    `inference=True` (the pipelines' loader): for a small LLM (under `LIGHT_LLM_PARAMETERS`, e.g. the
    embedded Shapes model), the transformers-free LLM and tokenizer (`unipic.unipic1.models.qwen2`,
    `tokenizer.load_inference_tokenizer`), which import transformers only if something beyond
    sampling asks for it (captioning's `generate`, a SigLIP tower). A real checkpoint (the 1.5B
    release) loads transformers' Qwen2 as upstream does: there the import is a small part of the
    load, and the library's own implementation is the reference.
    """
    from unipic.unipic1.tokenizer import load_tokenizer

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise UserError(f"{folder} is not a unipic model folder (no {CONFIG_NAME})")
    try:
        config = UniPicConfig.load(folder / CONFIG_NAME)
    except (ValueError, TypeError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise UserError(f"{folder / CONFIG_NAME}: {error}") from None
    light = inference and llm_parameters(config) < LIGHT_LLM_PARAMETERS
    # The tokenizer is checked before the weights are read, so a broken folder fails fast.
    if light:
        from unipic.unipic1.tokenizer import load_inference_tokenizer

        tokenizer = load_inference_tokenizer(folder, config.image_token)
    else:
        tokenizer = load_tokenizer(folder, config.image_token)
    model = build_model(config, empty=True, light_llm=light)
    load_state_dict_strict(model, read_model_folder_tensors(folder), assign=True)
    model.to(device=device, dtype=dtype)
    model.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    return model.eval(), tokenizer
