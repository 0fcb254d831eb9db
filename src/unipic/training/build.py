"""Building what a stage trains: the starting model and tokenizer, the VAE, and which parts are frozen.

`model.init_from` names a preset (random init from `seed`), a unipic model folder, or the
`out_dir` of a previous run (its `final/` folder). `model.init_vae_from` swaps in a VAE trained by
a `stage: vae` run: `vae.safetensors` carries its `VAEConfig` (including the re-estimated latent
scale) in the file's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from unipic.api import UserError
from unipic.training.config import ModelConfig
from unipic.training.presets import build_shapes_tokenizer
from unipic.unipic1.checkpoint import (
    CONFIG_NAME,
    build_model,
    load_model_folder,
    read_model_folder_tensors,
)
from unipic.unipic1.models.config import UniPicConfig
from unipic.unipic1.models.presets import PRESETS, SHAPES_EMBEDDED, WORLD_VOCAB_SIZE, shapes_embedded_config
from unipic.unipic1.models.vae import AutoencoderKL, VAEConfig

logger = logging.getLogger(__name__)

VAE_FILE = "vae.safetensors"
VAE_CONFIG_KEY = "unipic_vae_config"
MODEL_PRESETS = (*sorted(PRESETS), SHAPES_EMBEDDED)


# ---------------------------------------------------------------------------------------------
# Where weights come from
# ---------------------------------------------------------------------------------------------


def resolve_model_folder(path: str | Path) -> Path | None:
    """A model folder for `path`: the folder itself, or a run's `final/`; None if neither."""
    path = Path(path).expanduser()
    for candidate in (path, path / "final"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def preset_config(name: str, tokenizer, architecture: dict | None = None) -> UniPicConfig:
    """The UniPicConfig of a model preset (the embedded preset sizes its embedding from the tokenizer),
    with `architecture` (nested keys, as `model.architecture`) applied on top."""
    if name == SHAPES_EMBEDDED:
        config = shapes_embedded_config(len(tokenizer) if tokenizer is not None else WORLD_VOCAB_SIZE)
        if tokenizer is not None:
            config.llm.eos_token_id = tokenizer.eos_token_id
    else:
        config = PRESETS[name]()
    if not architecture:
        return config
    try:
        return UniPicConfig.from_dict(_merged(config.to_dict(), architecture, "model.architecture"))
    except (TypeError, ValueError) as error:
        raise UserError(f"model.architecture: {error}") from None


def _merged(base: dict, changes: dict, where: str) -> dict:
    """`base` with `changes` written over it, nested dicts merged key by key; unknown keys are an error."""
    out = dict(base)
    for key, value in changes.items():
        if key not in base:
            raise UserError(f"unknown key {key!r} in {where}; valid keys: {sorted(base)}")
        if isinstance(value, dict) and isinstance(base[key], dict):
            out[key] = _merged(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def build_tokenizer(choice: str, preset: str | None, world_vocab_size: int):
    """The tokenizer for a run started from a preset (`choice` auto/byte/world or a folder)."""
    from unipic.unipic1.tokenizer import build_byte_tokenizer, load_tokenizer

    if choice == "auto":
        choice = "world" if preset == SHAPES_EMBEDDED else "byte"
    if choice == "byte":
        return build_byte_tokenizer()
    if choice == "world":
        return build_shapes_tokenizer(world_vocab_size)
    return load_tokenizer(choice)


def init_model(config: ModelConfig, seed: int):
    """(model, tokenizer) as `config.init_from` / `config.init_vae_from` describe, on the CPU in float32.

    Raises:
        UserError: unknown preset or path, or a VAE that does not fit the model.
    """
    name = config.init_from
    if name in MODEL_PRESETS:
        tokenizer = build_tokenizer(config.tokenizer, name, config.world_vocab_size)
        model_config = preset_config(name, tokenizer, config.architecture)
        if len(tokenizer) > model_config.llm.vocab_size:
            raise UserError(f"the tokenizer has {len(tokenizer)} entries but preset {name} has only "
                            f"{model_config.llm.vocab_size} embedding rows; use model.tokenizer=byte or a bigger preset")
        model = build_model(model_config, seed=seed)
        model.image_token_id = tokenizer.convert_tokens_to_ids(model_config.image_token)
    else:
        folder = resolve_model_folder(name)
        if folder is None:
            raise UserError(f"model.init_from={name!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a "
                            f"unipic model folder or run out_dir with final/{CONFIG_NAME}")
        model, tokenizer = load_model_folder(folder)
        if config.tokenizer not in ("auto",):
            logger.warning("model.tokenizer=%s ignored: a model folder brings its own tokenizer", config.tokenizer)
    model.float()
    if config.init_vae_from:
        vae_config, state = load_vae_file(config.init_vae_from)
        swap_vae(model, vae_config, state)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# VAE files
# ---------------------------------------------------------------------------------------------


def resolve_vae_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / VAE_FILE
    if not path.is_file():
        raise UserError(f"VAE checkpoint not found: {path} (a `stage: vae` run writes OUT_DIR/{VAE_FILE})")
    return path


def load_vae_file(path: str | Path) -> tuple[VAEConfig, dict[str, torch.Tensor]]:
    """Read a `vae.safetensors` written by `save_vae_file`: (its VAEConfig, its tensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = resolve_vae_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if VAE_CONFIG_KEY not in metadata:
        raise UserError(f"{path} has no {VAE_CONFIG_KEY} metadata; it was not written by a `stage: vae` run")
    config = VAEConfig(**json.loads(metadata[VAE_CONFIG_KEY]))
    return config, load_file(str(path))


def save_vae_file(vae: AutoencoderKL, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the VAE's weights (or `state`) and its config (in the metadata) atomically."""
    from safetensors.torch import save

    from unipic.io_utils import atomic_write_bytes

    state = vae.state_dict() if state is None else state
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    config = json.dumps(dataclasses.asdict(vae.config))
    return atomic_write_bytes(path, save(tensors, metadata={"format": "pt", VAE_CONFIG_KEY: config}))


def swap_vae(model, vae_config: VAEConfig, state: dict[str, torch.Tensor]) -> None:
    """Load a trained VAE into `model` (same architecture required; its latent scale is adopted)."""
    mine = dataclasses.asdict(model.config.vae)
    theirs = dataclasses.asdict(vae_config)
    differ = sorted(k for k in mine if k != "scale" and mine[k] != theirs[k])
    if differ:
        raise UserError("model.init_vae_from: the VAE does not fit the model's VAE config (" +
                        ", ".join(f"{k}: file {theirs[k]} vs model {mine[k]}" for k in differ) + ")")
    model.config.vae.scale = vae_config.scale  # the VAE module shares this config object
    load_vae_state(model.vae, state)


def load_vae_state(vae: AutoencoderKL, state: dict[str, torch.Tensor]) -> None:
    """Strict load: a missing, unexpected or mis-shaped tensor is a UserError naming it."""
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"VAE weights do not match the VAE config: {str(error).strip()[:500]}") from None


def init_vae(config: ModelConfig, seed: int) -> AutoencoderKL:
    """The autoencoder a `stage: vae` run starts from: `init_vae_from`, else `init_from`'s VAE."""
    if config.init_vae_from:
        vae_config, state = load_vae_file(config.init_vae_from)
        vae = AutoencoderKL(vae_config)
        load_vae_state(vae, state)
        return vae.float()
    name = config.init_from
    if name in MODEL_PRESETS:
        vae_config = preset_config(name, None, config.architecture).vae
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(vae_config)
        if config.vae_init_logvar is not None:
            # A fresh VAE samples its latents with std exp(logvar / 2) ≈ 1, which drowns the small
            # initial posterior means: the decoder first learns an average image and the encoder
            # needs many steps to push the variance down (the KL weight barely resists). Starting
            # the log-variance low skips that phase; quant_conv's second half is the log-variance.
            with torch.no_grad():
                vae.quant_conv.bias[vae_config.embed_dim:].fill_(config.vae_init_logvar)
        return vae
    folder = resolve_model_folder(name)
    if folder is None:
        raise UserError(f"model.init_from={name!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a model folder")
    vae_config = UniPicConfig.load(folder / CONFIG_NAME).vae
    vae = AutoencoderKL(vae_config)
    state = {k[len("vae."):]: v for k, v in read_model_folder_tensors(folder).items() if k.startswith("vae.")}
    load_vae_state(vae, state)
    return vae.float()


# ---------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------

# The MAR decoder side as upstream's `freeze_mar_decoder` lists it (spec §12.1).
MAR_DECODER_PARTS = ("decoder_embed", "decoder_blocks", "decoder_norm", "mask_token",
                     "decoder_pos_embed_learned", "diffusion_pos_embed_learned")


def apply_freezing(model, config: ModelConfig) -> None:
    """Set requires_grad per the freeze flags. Parts no loss uses are frozen too, so that every
    trainable parameter receives a gradient: the MAR class table (an ImageNet leftover) and, when
    understanding goes through the MAR features, the SigLIP2 tower and its projector."""
    model.requires_grad_(True)
    model.vae.requires_grad_(False)  # model stages never train the VAE (validated in the config)
    model.mar.class_emb.requires_grad_(False)
    if model.config.understanding_encoder != "siglip2":
        for part in (model.siglip2, model.siglip2_proj):
            if part is not None:
                part.requires_grad_(False)
    if config.freeze_llm:
        model.llm.requires_grad_(False)
    if config.freeze_mar:
        model.mar.requires_grad_(False)
    if config.freeze_mar_decoder:
        for name in MAR_DECODER_PARTS:
            getattr(model.mar, name).requires_grad_(False)  # modules and bare parameters alike
    if config.grad_checkpointing:
        model.config.mar.grad_checkpointing = True
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def parameter_summary(module: torch.nn.Module) -> str:
    """`trainable/total` parameter counts per top-level child, for the run log."""
    parts = []
    for name, child in module.named_children():
        if child is None:
            continue
        total = sum(p.numel() for p in child.parameters())
        trainable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        if total:
            parts.append(f"{name} {trainable / 1e6:.2f}M/{total / 1e6:.2f}M")
    return "trainable/total: " + ", ".join(parts)
