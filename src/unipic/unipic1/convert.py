"""Convert the official Skywork-UniPic-1.5B release into a unipic model folder.

Release layout (spec §2): a combined `pytorch_model.bin` (all model tensors, usually without
`vae.*`, which the training class drops), the `Qwen2.5-1.5B-Instruct` folder (LLM config and
tokenizer) and MAR's `kl16.ckpt` (`{"model": vae_state_dict}`). Every tensor is checked by name and
shape; nothing is unpickled beyond plain tensors (`weights_only=True`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from unipic.api import UserError
from unipic.unipic1.checkpoint import (
    CheckpointError,
    build_model,
    load_state_dict_strict,
    read_tensor_file,
    save_model_folder,
)
from unipic.unipic1.models.presets import get_preset

logger = logging.getLogger(__name__)

# Keys a KL-VAE training checkpoint may carry besides the autoencoder (LDM's discriminator/loss).
_VAE_IGNORED_PREFIXES = ("loss.",)
_LLM_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_release_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the combined checkpoint: one .bin/.safetensors file, or a sharded `*.index.json`."""
    path = Path(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"checkpoint index not found: {path}")
        weight_map = json.loads(path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{path} has no weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_tensor_file(path.parent / shard))
        return state
    return read_tensor_file(path)


def _normalise_siglip_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A checkpoint saved with transformers ≥ 5 flattens SigLIP to `siglip2.embeddings.*`.
    renamed = {}
    for name, tensor in state.items():
        if name.startswith("siglip2.") and not name.startswith("siglip2.vision_model."):
            name = "siglip2.vision_model." + name[len("siglip2."):]
        renamed[name] = tensor
    return renamed


def _check_llm_config(config, llm_folder: Path) -> None:
    file = llm_folder / "config.json"
    if not file.is_file():
        raise UserError(f"--llm {llm_folder}: no config.json (expected the Qwen2.5-1.5B-Instruct folder)")
    hf = json.loads(file.read_text())
    mismatched = [f"{k}: folder {hf.get(k)!r} vs preset {getattr(config.llm, k)!r}" for k in _LLM_KEYS
                  if k in hf and hf[k] != getattr(config.llm, k)]
    if mismatched:
        raise CheckpointError(f"--llm config does not match the preset: {'; '.join(mismatched)}")
    config.llm.bos_token_id = hf.get("bos_token_id", config.llm.bos_token_id)
    eos = hf.get("eos_token_id", config.llm.eos_token_id)
    config.llm.eos_token_id = eos[0] if isinstance(eos, list) else eos


def convert_official(*, checkpoint: str | Path, llm_folder: str | Path, vae_checkpoint: str | Path | None,
                     out: str | Path, preset: str = "unipic1-1.5b", dtype: str = "bfloat16",
                     understanding_encoder: str = "mar") -> Path:
    """Check and convert the release files; returns the written model folder."""
    from unipic.unipic1.tokenizer import load_tokenizer

    try:
        config = get_preset(preset)
    except ValueError as error:
        raise UserError(str(error)) from None
    llm_folder = Path(llm_folder)
    _check_llm_config(config, llm_folder)
    state = _normalise_siglip_names(read_release_checkpoint(checkpoint))

    if not any(name.startswith("vae.") for name in state):
        if vae_checkpoint is None:
            raise UserError("the checkpoint has no vae.* tensors; pass the VAE weights with --vae kl16.ckpt")
        vae_state = read_tensor_file(vae_checkpoint)
        ignored = [k for k in vae_state if k.startswith(_VAE_IGNORED_PREFIXES)]
        if ignored:
            logger.info("ignoring %d non-autoencoder tensors in %s", len(ignored), vae_checkpoint)
        state.update({f"vae.{k}": v for k, v in vae_state.items() if not k.startswith(_VAE_IGNORED_PREFIXES)})

    if not any(name.startswith("siglip2.") for name in state):
        # The release may omit the (unused) SigLIP2 tower; then build without it.
        if understanding_encoder == "siglip2":
            raise UserError("--understanding-encoder siglip2 needs siglip2.* tensors, which the checkpoint lacks")
        logger.warning("checkpoint has no siglip2.* tensors; converting without the SigLIP2 tower")
        config.siglip = None
    config.understanding_encoder = understanding_encoder

    tokenizer = load_tokenizer(llm_folder, config.image_token)
    model = build_model(config, empty=True)
    load_state_dict_strict(model, state, assign=True)
    if len(tokenizer) > config.llm.vocab_size:
        raise CheckpointError(f"tokenizer has {len(tokenizer)} ids but the embedding only {config.llm.vocab_size} rows")
    model.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    if dtype not in _DTYPES:
        raise UserError(f"--save-dtype {dtype!r}: use float32, bfloat16 or float16")
    return save_model_folder(model, tokenizer, out, dtype=_DTYPES[dtype])
