"""What each kind of stage trains: the UniPic model (pretrain/align/joint/sft) or the VAE (vae).

A job owns the trainable `module` (an `nn.Module` whose `forward` returns the loss, so that DDP
sees every parameter use inside one forward call), turns examples into batches, writes its
weights into checkpoints and the final output, and draws samples / quick scores for monitoring.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unipic.api import UserError
from unipic.training.build import (
    MODEL_PRESETS,
    VAE_FILE,
    apply_freezing,
    init_model,
    init_vae,
    load_vae_file,
    load_vae_state,
    parameter_summary,
    resolve_model_folder,
    save_vae_file,
)
from unipic.training.config import LossConfig, TrainConfig
from unipic.training.data import BatchBuilder, vae_pixels
from unipic.training.losses import TokenProbe, edit_loss, image_to_text_loss, text_to_image_loss
from unipic.training.monitor import quick_eval, save_samples, unipic_samples, vae_eval
from unipic.training.world_aux import WorldAuxiliaryLosses, metric_names, wanted_targets
from unipic.unipic1.settings import SamplingConfig, from_dict

logger = logging.getLogger(__name__)

MODEL_DIR = "model"  # a checkpoint's model folder (loadable with `unipic generate --model`)
FINAL_DIR = "final"
PROBE_FILE = "token_probe.safetensors"  # a checkpoint's training-only token probe (loss.token_probe)
READOUT_FILE = "object_readout.safetensors"  # a checkpoint's training-only object read-outs (loss.object_readout)
RELATION_FILE = "relation_readout.safetensors"  # a checkpoint's training-only relation read-out (loss.relation_readout)
REGION_FILE = "edit_region_readout.safetensors"  # a checkpoint's training-only edit-region read-out (loss.edit_region_readout)
DRAWN_FILE = "edit_target_readout.safetensors"  # a checkpoint's training-only edit-target read-out (loss.edit_target_readout)
TRAINING_ONLY_FILES = (PROBE_FILE, READOUT_FILE, RELATION_FILE, REGION_FILE, DRAWN_FILE)  # also in a run's final/; never part of a shipped model


# ---------------------------------------------------------------------------------------------
# UniPic model stages
# ---------------------------------------------------------------------------------------------


class UniPicLoss(nn.Module):
    """Weighted loss of one task's batch; returns {"loss": weighted, "loss_<task>": raw (detached)}.

    Built from the run's `LossConfig` alone. The generic terms (task weights, the visual gradient
    scale, object and changed-token weights, the token probe) live here; the Shapes world's
    read-outs and attention supervision come from `world_aux.WorldAuxiliaryLosses` through its
    `before` / `capturing` / `after` hooks.
    """

    def __init__(self, model, loss: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.weights = dict(loss.weights)
        self.grad_scale = loss.grad_scale
        self.object_weight = loss.object_weight
        self.edit_changed_weight = loss.edit_changed_weight
        config = model.config
        self.probe = TokenProbe(config.mar.decoder_embed_dim, config.token_dim, loss.token_probe) \
            if loss.token_probe > 0 else None
        self.world = WorldAuxiliaryLosses(model, loss)

    def forward(self, task: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
        m = self.model
        # Cached VAE tokens (finite data) stand in for encoding the pixels again.
        if task == "t2i":
            extra: dict[str, tuple[float, torch.Tensor]] = {}
            raw = text_to_image_loss(m, batch["pixels"], batch["input_ids"], batch["attention_mask"],
                                     generator=generator, tokens=batch.get("pixels_tokens"), probe=self.probe,
                                     object_weight=self.object_weight)
        elif task == "i2t":
            features = m.understanding_features(batch["pixels"], tokens=batch.get("pixels_tokens"))
            extra = self.world.before(task, batch, features)
            output: dict = {}
            with self.world.capturing(task, batch) as captured:
                raw = image_to_text_loss(m, batch["pixels"], batch["input_ids"], batch["attention_mask"],
                                         batch["labels"], grad_scale=self.grad_scale, features=features,
                                         hidden_out=output)
            extra.update(self.world.after(task, batch, captured, hidden=output["hidden"]))
        elif task == "edit":
            keep = batch.get("edit_keep") if m.edit_keep is not None else None
            decoder: dict = {}
            with self.world.capturing(task, batch) as captured:
                raw = edit_loss(m, batch["source"], batch["target"], batch["input_ids"], batch["attention_mask"],
                                generator=generator, source_tokens=batch.get("source_tokens"),
                                target_tokens=batch.get("target_tokens"), probe=self.probe,
                                grad_scale=self.grad_scale, object_weight=self.object_weight,
                                changed_weight=self.edit_changed_weight,
                                decoder_out=decoder if self.world.wants_decoder(batch) or keep is not None else None,
                                keep=keep)
            extra = self.world.after(task, batch, captured, decoder=decoder)
        else:
            raise ValueError(f"unknown task {task!r}")
        out = {"loss": raw * self.weights[task], f"loss_{task}": raw.detach().float()}
        for name, (weight, value) in extra.items():
            out["loss"] = out["loss"] + weight * value
            out[f"loss_{name}"] = value.detach().float()
        return out


def _sampling_for_run(current: SamplingConfig, changes: dict) -> SamplingConfig:
    """The model's sampling defaults with the run's `changes` applied (UserError naming a bad value)."""
    try:
        return from_dict(SamplingConfig, {**dataclasses.asdict(current), **changes}, "model.sampling")
    except (TypeError, ValueError) as error:
        raise UserError(str(error)) from None


class UniPicJob:
    """Trains a UniPic model with a frozen VAE on the tasks of `data.tasks`."""

    def __init__(self, config: TrainConfig, resume_dir: Path | None) -> None:
        from unipic.unipic1.checkpoint import load_model_folder

        self.config = config
        if resume_dir is not None:
            model, tokenizer = load_model_folder(resume_dir / MODEL_DIR)
            model.float()
        else:
            model, tokenizer = init_model(config.model, config.seed)
        # The run's settings travel with the model: the saved folder samples at the trained size, or
        # with what model.sampling says (TrainConfig.model_sampling, recorded in the run's config.yaml).
        model.config.sampling = _sampling_for_run(model.config.sampling, config.model_sampling())
        if config.model.edit_source_through_llm is not None:
            model.config.edit_source_through_llm = config.model.edit_source_through_llm
        if config.model.edit_keep_mask is not None:
            if config.model.edit_keep_mask:
                with torch.random.fork_rng():
                    torch.manual_seed(config.seed)  # a new head's start depends on the run's seed alone
                    model.add_edit_keep_head()
            else:
                model.edit_keep, model.config.edit_keep_mask = None, False
        try:
            model.config.validate()
        except ValueError as error:
            # Each message starts with the model setting's key, which the run option prefixes with "model.".
            raise UserError(f"model.{error}") from None
        if model.config.edit_keep_mask and config.loss.edit_keep == 0 and "edit" in config.active_tasks:
            raise UserError("loss.edit_keep=0 leaves the keep head untrained while its cells shape every edit; "
                            "give it a positive weight or set model.edit_keep_mask=false")
        if model.config.edit_keep_mask and config.data.source == "folder" and "edit" in config.active_tasks:
            raise UserError("a model with edit_keep_mask trains edits on world data (the kept cells come from "
                            "the scene); use data.source=world or model.edit_keep_mask=false")
        apply_freezing(model, config.model)
        layers = model.config.llm.num_hidden_layers
        if not 0 <= config.loss.attend_layer < layers:
            raise UserError(f"loss.attend_layer must be in 0..{layers - 1}, got {config.loss.attend_layer}")
        if not -1 <= config.loss.relation_layer < layers:
            raise UserError(f"loss.relation_layer must be -1 (the final output) or in 0..{layers - 1}, "
                            f"got {config.loss.relation_layer}")
        if config.loss.attend_relation > 0 and model.config.llm.num_attention_heads < 2:
            raise UserError("loss.attend_relation supervises two heads; this LLM has one")
        self.model, self.tokenizer = model.train(), tokenizer
        # The loss's own parts (probe, read-outs) are initialised from the run's seed, not from
        # whatever the global RNG holds, so that two runs of one config are identical.
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            self.module = UniPicLoss(model, config.loss)
        # Resuming restores the loss's own parts from the checkpoint; a stage that starts from the
        # previous stage's result continues with that run's probe and read-outs when it saved them
        # (a fresh probe would first pull z towards its random read-out).
        start = resume_dir
        if start is None and config.model.init_from not in MODEL_PRESETS:
            start = resolve_model_folder(config.model.init_from)
        if start is not None:
            from safetensors.torch import load_file

            for part, name in self._training_only_parts():
                if (start / name).is_file():
                    part.load_state_dict(load_file(str(start / name)))
                    logger.info("loss part %s continues from %s", name, start)
        self.builder = BatchBuilder(model, tokenizer, config.data,
                                    wanted_targets(config.loss, model.config.edit_keep_mask))
        self.metric_names = [f"loss_{t}" for t in config.active_tasks]
        self.metric_names += metric_names(config.loss, model.config.edit_keep_mask, config.active_tasks,
                                          self.module.world.readout is not None)
        self.eval_names = [f"eval_{t}" for t in config.active_tasks]
        logger.info("model: %s", parameter_summary(model))

    def describe(self) -> str:
        return parameter_summary(self.model)

    def make_batch(self, task: str, examples: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return self.builder(task, examples, rng)

    def _plain(self, state: dict[str, torch.Tensor] | None):
        """The model itself, or (sharded training) a CPU model built from the gathered `state`."""
        if state is None:
            return self.model
        from unipic.unipic1.checkpoint import build_model, load_state_dict_strict

        copy = build_model(self.model.config, empty=True)
        load_state_dict_strict(copy, _strip(state, "model."), assign=True)
        return copy

    def save_weights(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        from unipic.unipic1.checkpoint import save_model_folder

        save_model_folder(self._plain(state), self.tokenizer, folder / MODEL_DIR)
        self._save_training_only_parts(folder)  # kept beside the model for --resume

    def _save_training_only_parts(self, folder: Path) -> None:
        from safetensors.torch import save

        from unipic.io_utils import atomic_write_bytes

        for part, name in self._training_only_parts():
            weights = {k: v.detach().float().cpu().contiguous() for k, v in part.state_dict().items()}
            atomic_write_bytes(folder / name, save(weights))

    def _training_only_parts(self) -> list[tuple[nn.Module, str]]:
        """The loss's own trained modules (not part of the model) and their checkpoint file names."""
        world = dict(self.module.world.parts())
        parts = [(self.module.probe, PROBE_FILE), (world["object_readout"], READOUT_FILE),
                 (world["relation_readout"], RELATION_FILE), (world["edit_region_readout"], REGION_FILE),
                 (world["edit_target_readout"], DRAWN_FILE)]
        return [(part, name) for part, name in parts if part is not None]

    def export_final(self, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """`out_dir/final`: a unipic model folder (weights as they are now; the trainer swaps EMA in)."""
        from unipic.unipic1.checkpoint import save_model_folder

        folder = save_model_folder(self._plain(state), self.tokenizer, out_dir / FINAL_DIR)
        self._save_training_only_parts(folder)  # the next stage starts from them (see __init__)
        return folder

    def _pipeline(self):
        from unipic.unipic1.pipeline import UniPicPipeline

        return UniPicPipeline(self.model, self.tokenizer)  # switches the model to eval mode

    def sample(self, path: Path) -> None:
        log = self.config.log
        try:
            rows, captions = unipic_samples(self._pipeline(), log.sample_prompts, self.config.active_tasks,
                                            self.config.data.image_size, num_iter=log.sample_steps,
                                            head_steps=log.sample_head_steps, cfg=log.sample_cfg, seed=self.config.seed)
        finally:
            self.model.train()
        save_samples(path, rows, captions)

    def evaluate(self) -> dict[str, float]:
        log = self.config.log
        try:
            return quick_eval(self._pipeline(), self.config.active_tasks, self.config.data.image_size,
                              log.eval_per_kind, num_iter=log.sample_steps, head_steps=log.sample_head_steps,
                              cfg=log.sample_cfg)
        finally:
            self.model.train()


# ---------------------------------------------------------------------------------------------
# VAE stage
# ---------------------------------------------------------------------------------------------


class VAELoss(nn.Module):
    """Reconstruction (L1 + L2 per pixel) of a posterior sample plus a small KL term.

    The KL is summed over latent elements and divided by the number of pixel values, the same
    balance as LDM's (per-image sums with weight 1e-6), expressed per pixel like the L1/L2 terms.
    No perceptual or adversarial loss: flat-colour worlds do not need one, and neither has a
    pretrained network to lean on here.
    """

    def __init__(self, vae, l1: float, l2: float, kl: float, foreground: float = 0.0, palette: float = 0.0,
                 latent_noise: float = 0.0) -> None:
        super().__init__()
        self.vae = vae
        self.l1, self.l2, self.kl, self.foreground = l1, l2, kl, foreground
        self.palette, self.latent_noise = palette, latent_noise
        if palette > 0:
            from unipic.world.spec import BACKGROUND, COLORS

            colors = torch.tensor([BACKGROUND, *COLORS.values()], dtype=torch.float32) / 127.5 - 1.0
            self.register_buffer("colors", colors, persistent=False)  # (11, 3) in [-1, 1]

    def forward(self, task: str, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
        pixels = batch["pixels"]
        mean, logvar = self.vae.encode_moments(pixels)  # unscaled posterior
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        if self.latent_noise > 0:
            # A generator's latents carry errors the posterior noise (exp(-3) at init) never shows
            # the decoder; noise relative to the latents' spread teaches it to decode them cleanly.
            extra = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = z + self.latent_noise * mean.detach().std() * extra
        recon = self.vae.decoder(self.vae.post_quant_conv(z)).float()
        target = pixels.float()
        weight = 1.0
        if self.foreground > 0:
            # Sparse images (a few shapes on a flat background) first settle on "background
            # everywhere", which is already a low loss; extra weight on pixels unlike the image's
            # median colour makes the objects matter from the start. Mean weight 1 per batch.
            median = target.flatten(2).median(dim=2).values[:, :, None, None]
            away = ((target - median).abs().sum(dim=1, keepdim=True) > 0.1).float()
            weight = 1.0 + self.foreground * away
            weight = weight / weight.mean()
        l1 = ((recon - target).abs() * weight).mean()
        l2 = (((recon - target) ** 2) * weight).mean()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).sum() / target.numel()
        loss = self.l1 * l1 + self.l2 * l2 + self.kl * kl
        out = {"loss_l1": l1.detach(), "loss_l2": l2.detach(), "loss_kl": kl.detach()}
        if self.palette > 0:
            palette = self.palette_loss(recon, target)
            loss = loss + self.palette * palette
            out["loss_palette"] = palette.detach()
        out["loss"] = loss
        return out

    def palette_loss(self, recon: torch.Tensor, target: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
        """Cross-entropy of each pixel's nearest world colour (background + palette), read softly from
        the reconstruction, against the one the target's pixel is nearest to: the judge reads colours
        this way, so a pixel that is close in L1/L2 but nearer to the wrong colour costs much more."""
        # (B, 3, H, W) and (K, 3) → (B, K, H, W) squared distances
        recon_d2 = ((recon[:, None] - self.colors[None, :, :, None, None]) ** 2).sum(dim=2)
        target_d2 = ((target[:, None] - self.colors[None, :, :, None, None]) ** 2).sum(dim=2)
        return torch.nn.functional.cross_entropy(-recon_d2 / temperature, target_d2.argmin(dim=1))


class VAEJob:
    """Trains the KL autoencoder on the data's images; the output is `out_dir/vae.safetensors`."""

    def __init__(self, config: TrainConfig, resume_dir: Path | None) -> None:
        self.config = config
        if resume_dir is not None:
            from unipic.unipic1.models.vae import AutoencoderKL

            vae_config, state = load_vae_file(resume_dir / VAE_FILE)
            vae = AutoencoderKL(vae_config)
            load_vae_state(vae, state)
        else:
            vae = init_vae(config.model, config.seed)
        self.vae = vae.float().train().requires_grad_(True)
        loss = config.loss
        self.module = VAELoss(self.vae, loss.vae_l1, loss.vae_l2, loss.vae_kl, loss.vae_foreground,
                              loss.vae_palette, loss.vae_latent_noise)
        self.metric_names = ["loss_l1", "loss_l2", "loss_kl"] + (["loss_palette"] if loss.vae_palette > 0 else [])
        self.eval_names = ["eval_psnr", "eval_judge"]

    def describe(self) -> str:
        total = sum(p.numel() for p in self.vae.parameters())
        return f"VAE {total / 1e6:.2f}M parameters, all trained"

    def make_batch(self, task: str, examples: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        data = self.config.data
        return {"pixels": vae_pixels(examples, task, data.image_size, data.vae_crop, rng)}

    def save_weights(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        save_vae_file(self.vae, folder / VAE_FILE, None if state is None else _strip(state, "vae."))

    @torch.no_grad()
    def export_final(self, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """`out_dir/vae.safetensors` with the latent scale re-estimated (1 / std of posterior means),
        so that the MAR's diffusion targets have unit variance as the released 0.2325 intends."""
        from unipic.training.data import TaskData

        vae = self.vae
        if state is not None:  # sharded training: a CPU copy from the gathered weights
            from unipic.unipic1.models.vae import AutoencoderKL

            vae = AutoencoderKL(self.vae.config)
            load_vae_state(vae, _strip(state, "vae."))
        vae.eval()
        # Images of the run's own data (whole, not cropped), from a separate reader.
        data = TaskData(dataclasses.replace(self.config.data, batch_size=64, vae_crop=0), 0, 1)
        task = self.config.active_tasks[0]
        pixels = vae_pixels(data.next_examples(task), task, self.config.data.image_size)
        device = next(vae.parameters()).device
        means = torch.cat([vae.encode_moments(pixels[i:i + 16].to(device))[0].float()
                           for i in range(0, len(pixels), 16)])
        vae.config.scale = float(1.0 / means.std().clamp_min(1e-6))  # shared with self.vae's config
        logger.info("VAE latent scale re-estimated: %.4f", vae.config.scale)
        self.vae.train()
        return save_vae_file(vae, out_dir / VAE_FILE)

    def sample(self, path: Path) -> None:
        self.vae.eval()
        try:
            _, rows = vae_eval(self.vae, self.config.data.image_size, 8, seed=self.config.seed)
        finally:
            self.vae.train()
        save_samples(path, rows, {"row 1": "originals", "row 2": "reconstructions"})

    def evaluate(self) -> dict[str, float]:
        self.vae.eval()
        try:
            scores, _ = vae_eval(self.vae, self.config.data.image_size, 8 * self.config.log.eval_per_kind)
        finally:
            self.vae.train()
        return scores


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A gathered state dict of the loss module without its `model.` / `vae.` prefix, on the CPU."""
    return {k[len(prefix):]: v.detach().cpu() for k, v in state.items() if k.startswith(prefix)}


def make_job(config: TrainConfig, resume_dir: Path | None):
    """The job for the config's stage."""
    return VAEJob(config, resume_dir) if config.stage == "vae" else UniPicJob(config, resume_dir)
