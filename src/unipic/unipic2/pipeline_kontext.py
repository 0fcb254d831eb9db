"""Text-to-image and editing with UniPic2-SD3.5M-Kontext (SD3.5-Medium + reference-image tokens).

`StableDiffusion3KontextPipeline` is diffusers' `StableDiffusion3Pipeline` plus an `image`
argument. Prompt encoding (CLIP-L + CLIP-G + T5, spec §3), input checks and the scheduler are
reused from the parent; the sampling loop lives in `KontextSamplingMixin`, which the MetaQuery
pipeline shares. With `image=None` the pipeline performs exactly the parent's operations, so its
output equals `StableDiffusion3Pipeline`'s under the same generator.

Fixes relative to upstream (spec §10): the reference is VAE-encoded with the pipeline's
generator (edits are reproducible from a seed); RGBA/greyscale/palette inputs are converted to
RGB; size mismatches raise clear errors; skip-layer guidance keeps the reference tokens; no
IP-Adapter leftovers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from unipic.api import UserError
from unipic.inpainting import (
    DEFAULT_FEATHER,
    check_mask,
    composite,
    feather_alpha,
    grow_mask,
    token_grid_mask,
)
from unipic.interrupt import check_interrupt
from unipic.unipic2.images import check_size, to_rgb

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 512  # upstream __call__ default (not SD3's 1024)
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 3.5
REFERENCE_SAMPLE_MODES = ("sample", "argmax")


def guidance_enabled(cfg: float) -> bool:
    """UniPic-2 guides only above scale 1, as diffusers' SD3 pipelines do: at cfg <= 1 it samples the
    conditional prediction alone (docs/sampling.md has both families' rules). The one place the
    UniPic-2 pipelines decide it."""
    return cfg > 1


class KontextSamplingMixin:
    """Reference encoding, the flow-matching denoising loop and decoding for Kontext-style DiTs.

    Expects `transformer`, `scheduler`, `vae`, `image_processor` (a `VaeImageProcessor`),
    `vae_scale_factor` and `patch_size` on the pipeline.
    """

    # ------------------------------------------------------------------ input checks

    def max_image_side(self) -> int:
        """Largest height/width in pixels the transformer's positional table covers."""
        return self.transformer.config.pos_embed_max_size * self.patch_size * self.vae_scale_factor

    def check_size(self, height: int, width: int) -> None:
        """Raise `UserError` (a `ValueError`) unless the output size fits the model."""
        multiple = self.vae_scale_factor * self.patch_size
        check_size(height, width, multiple=multiple, max_side=self.max_image_side(), what="output")

    def check_reference_images(
        self, image: Image.Image | Sequence[Image.Image], batch_size: int, height: int, width: int
    ) -> list[Image.Image]:
        """Validate the reference image(s) and return one RGB PIL image per prompt.

        Raises:
            UserError: wrong type, wrong count, or a size different from (width, height).
        """
        images = [image] if isinstance(image, Image.Image) else list(image)
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise UserError("`image` must be a PIL image or a list of PIL images")
        if len(images) == 1 and batch_size > 1:
            images = images * batch_size
        if len(images) != batch_size:
            raise UserError(f"got {len(images)} reference images for {batch_size} prompts; pass one image per prompt")
        for index, im in enumerate(images):
            if im.size != (width, height):
                raise UserError(
                    f"reference image {index} is {im.size[0]}x{im.size[1]} (WxH) but the output is {width}x{height}; "
                    f"the Kontext model needs them equal: resize the image or pass height={im.size[1]}, width={im.size[0]}"
                )
        # Upstream fed RGBA/greyscale straight into ToTensor and crashed (spec §10.3).
        return [to_rgb(im) for im in images]

    def offload_resident_models(self) -> None:
        """Under model CPU offload, move every model back to the CPU.

        The offload hooks only evict a model's predecessor in `model_cpu_offload_seq`; the VAE
        encode of an edit runs out of that order (after the text encoders, before the DiT), so
        without this the 9 GB T5-XXL would stay on the GPU while the VAE encodes. No-op otherwise.
        """
        for hook in getattr(self, "_all_hooks", None) or []:
            hook.offload()

    # ------------------------------------------------------------------ latents

    def prepare_reference_latents(
        self,
        images: list[Image.Image],
        num_images_per_prompt: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        sample_mode: str = "sample",
    ) -> torch.Tensor:
        """VAE-encode the references into normalised latents, shape (B * num_images_per_prompt, C, h, w).

        The posterior is sampled with the pipeline's `generator` (upstream used the global RNG, so
        edits were not reproducible from a seed); `sample_mode="argmax"` takes its mean instead.
        """
        if sample_mode not in REFERENCE_SAMPLE_MODES:
            raise ValueError(f"reference_sample_mode must be one of {REFERENCE_SAMPLE_MODES}, got {sample_mode!r}")
        self.offload_resident_models()
        pixels = self.image_processor.preprocess(images, height=height, width=width)  # (B, 3, H, W) in [-1, 1]
        pixels = pixels.to(device=device, dtype=self.vae.dtype)
        if isinstance(generator, list):  # one generator per output image: use the first of each prompt's group
            generator = generator[::num_images_per_prompt]
            latents = torch.cat(
                [retrieve_latents(self.vae.encode(pixels[i : i + 1]), generator[i], sample_mode) for i in range(len(images))]
            )
        else:
            latents = retrieve_latents(self.vae.encode(pixels), generator, sample_mode)  # (B, C, h, w)
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        # Same order as the prompt embeddings: each prompt's images are consecutive.
        latents = latents.repeat_interleave(num_images_per_prompt, dim=0)
        return latents.to(dtype=dtype)

    def prepare_noise_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial Gaussian latents (B, C, H/8, W/8), drawn exactly as `StableDiffusion3Pipeline` draws them."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        shape = (
            batch_size,
            self.transformer.config.in_channels,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for an effective batch of {batch_size}")
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def prepare_timesteps(
        self,
        latents: torch.Tensor,
        num_inference_steps: int,
        device: torch.device,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Set the scheduler's timesteps; dynamic shifting (if the config enables it) uses the target length."""
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            _, _, lat_h, lat_w = latents.shape
            image_seq_len = (lat_h // self.patch_size) * (lat_w // self.patch_size)
            mu = calculate_shift(
                image_seq_len,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
        if mu is not None:
            scheduler_kwargs["mu"] = mu
        return retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs)

    # ------------------------------------------------------------------ inpainting

    def check_inpaint_inputs(
        self, image: Image.Image | Sequence[Image.Image], mask_image: object, batch_size: int, height: int,
        width: int, grow: int = 0,
    ) -> tuple[list[Image.Image], list[np.ndarray]]:
        """One RGB source and one grown bool (H, W) mask (True = regenerate) per prompt; `UserError` otherwise."""
        images = [image] if isinstance(image, Image.Image) else list(image)
        masks = [mask_image] if isinstance(mask_image, (Image.Image, np.ndarray, torch.Tensor)) else list(mask_image)
        if len(images) == 1 and batch_size > 1:
            images = images * batch_size
        if len(masks) == 1 and batch_size > 1:
            masks = masks * batch_size
        if len(images) != batch_size or len(masks) != batch_size:
            raise UserError(f"got {len(images)} inpaint images and {len(masks)} masks for {batch_size} prompts; "
                            "pass one of each per prompt")
        for index, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise UserError(f"inpaint_image {index} must be a PIL image, got {type(im).__name__}")
            if im.size != (width, height):
                raise UserError(f"inpaint_image {index} is {im.size[0]}x{im.size[1]} (WxH) but the output is "
                                f"{width}x{height}; inpainting keeps the size: pass height={im.size[1]}, "
                                f"width={im.size[0]}")
        grown = [grow_mask(check_mask(m, (width, height), f"mask_image {i}"), grow) for i, m in enumerate(masks)]
        return [to_rgb(im) for im in images], grown

    def prepare_inpaint_latents(
        self,
        images: list[Image.Image],
        masks: list[np.ndarray],
        num_images_per_prompt: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised source latents (B*n, C, h, w) and the latent mask (B*n, 1, h, w), 1 = regenerate.

        The source is encoded to its posterior mean (what is kept should not be resampled). A latent
        cell is regenerated when any of its pixels is masked.
        """
        self.offload_resident_models()
        pixels = self.image_processor.preprocess(images, height=height, width=width)  # (B, 3, H, W) in [-1, 1]
        latents = retrieve_latents(self.vae.encode(pixels.to(device=device, dtype=self.vae.dtype)),
                                   sample_mode="argmax")
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor  # (B, C, h, w)
        cells = np.stack([token_grid_mask(m, self.vae_scale_factor) for m in masks])  # (B, h, w)
        mask = torch.from_numpy(cells).to(device=device, dtype=dtype).unsqueeze(1)  # (B, 1, h, w)
        return (latents.to(dtype).repeat_interleave(num_images_per_prompt, dim=0),
                mask.repeat_interleave(num_images_per_prompt, dim=0))

    def composite_inpainted(self, images: list, sources: list[Image.Image], masks: list[np.ndarray],
                            num_images_per_prompt: int, feather: int) -> list:
        """Paste decoded PIL images into their sources with a `feather`-pixel fade inside the mask."""
        alphas = [feather_alpha(m, feather) for m in masks]
        n = num_images_per_prompt
        return [composite(image, sources[k // n], alphas[k // n]) for k, image in enumerate(images)]

    # ------------------------------------------------------------------ sampling

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        cfg: float,
        ref_latents: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
        inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the Euler flow-matching loop with classifier-free guidance; returns the final latents.

        The op order mirrors `StableDiffusion3Pipeline.__call__` (bit-identical without a reference).
        The reference latents go to both CFG halves, so guidance is text-only (spec §3), and also
        to the skip-layer-guidance pass, which upstream forgot (spec §10.2).

        `inpaint` = (source latents, mask, noise), mask 1 where latents are regenerated: after every
        step the kept latents are reset onto the source's own noising trajectory at the new noise
        level, sigma * noise + (1 - sigma) * source, which is the source itself after the last step
        (sigma = 0), as diffusers' inpainting pipelines do.
        """
        do_cfg = guidance_enabled(cfg)
        if do_cfg:
            cfg_prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)  # (2B, L, J)
            cfg_pooled = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)  # (2B, P)
        else:
            cfg_prompt_embeds, cfg_pooled = prompt_embeds, pooled_prompt_embeds
        ref_kwargs = {} if ref_latents is None else {"ref_latents": ref_latents}
        cfg_ref_kwargs = (
            {"ref_latents": torch.cat([ref_latents] * 2)} if ref_latents is not None and do_cfg else ref_kwargs
        )
        num_inference_steps = len(timesteps)

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                check_interrupt()  # a server may stop a batch nobody waits for
                latent_model_input = torch.cat([latents] * 2) if do_cfg else latents  # (2B, C, h, w)
                timestep = t.expand(latent_model_input.shape[0])
                noise_pred = self.transformer(
                    hidden_states=latent_model_input,
                    timestep=timestep,
                    encoder_hidden_states=cfg_prompt_embeds,
                    pooled_projections=cfg_pooled,
                    joint_attention_kwargs=joint_attention_kwargs,
                    return_dict=False,
                    **cfg_ref_kwargs,
                )[0]

                if do_cfg:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + cfg * (noise_pred_text - noise_pred_uncond)
                    use_slg = (
                        skip_guidance_layers is not None
                        and num_inference_steps * skip_layer_guidance_start < i < num_inference_steps * skip_layer_guidance_stop
                    )
                    if use_slg:
                        noise_pred_skip_layers = self.transformer(
                            hidden_states=latents,
                            timestep=t.expand(latents.shape[0]),
                            encoder_hidden_states=prompt_embeds,
                            pooled_projections=pooled_prompt_embeds,
                            joint_attention_kwargs=joint_attention_kwargs,
                            return_dict=False,
                            skip_layers=skip_guidance_layers,
                            **ref_kwargs,
                        )[0]
                        noise_pred = noise_pred + (noise_pred_text - noise_pred_skip_layers) * skip_layer_guidance_scale

                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)  # pytorch/pytorch#99272 on Apple MPS
                if inpaint is not None:
                    latents = self.keep_known_latents(latents, inpaint, i + 1)
                progress_bar.update()
        return latents

    def sample_and_decode(
        self,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        *,
        images: int,
        height: int,
        width: int,
        references: list[Image.Image] | None,
        num_images_per_prompt: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        reference_sample_mode: str,
        num_inference_steps: int,
        sigmas: list[float] | None,
        mu: float | None,
        cfg: float,
        output_type: str,
        return_dict: bool,
        inpaint_sources: list[Image.Image] | None = None,
        inpaint_masks: list[np.ndarray] | None = None,
        feather: int = 0,
        **denoise_options: Any,
    ):
        """The steps after the prompt encoding that both UniPic-2 pipelines share.

        Noise latents first (so an edit and a generation with one seed start from the same noise),
        then the reference latents from the same generator, the timesteps, the denoising loop
        (`denoise_options` go to `denoise`) and the decoding. `images` = prompts × images per prompt.
        With `inpaint_sources` and `inpaint_masks`, the kept cells follow the noised source and the
        output is pasted into the source outside the mask (feathered by `feather` pixels).
        """
        device = self._execution_device
        latents = self.prepare_noise_latents(images, height, width, prompt_embeds.dtype, device, generator, latents)
        ref_latents = None
        if references is not None:
            ref_latents = self.prepare_reference_latents(
                references, num_images_per_prompt, height, width, latents.dtype, device, generator,
                reference_sample_mode,
            )
        timesteps, num_inference_steps = self.prepare_timesteps(latents, num_inference_steps, device, sigmas, mu)
        self._num_timesteps = len(timesteps)
        inpainted = None
        if inpaint_sources is not None:
            latents, denoise_options["inpaint"] = self.start_inpaint(inpaint_sources, inpaint_masks,
                                                                     num_images_per_prompt, latents)
            inpainted = (inpaint_sources, inpaint_masks, num_images_per_prompt, feather)
        latents = self.denoise(
            latents,
            timesteps,
            prompt_embeds.to(device),
            pooled_prompt_embeds.to(device),
            None if negative_prompt_embeds is None else negative_prompt_embeds.to(device),
            None if negative_pooled_prompt_embeds is None else negative_pooled_prompt_embeds.to(device),
            cfg,
            ref_latents=ref_latents,
            **denoise_options,
        )
        return self.finish(latents, output_type, return_dict, inpainted)

    def keep_known_latents(self, latents: torch.Tensor, inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                           index: int) -> torch.Tensor:
        """`latents` with the unmasked cells replaced by the noised source at the scheduler's sigma[index]."""
        source, mask, noise = inpaint
        sigma = self.scheduler.sigmas[index].to(device=latents.device, dtype=torch.float32)
        known = (sigma * noise.float() + (1.0 - sigma) * source.float()).to(latents.dtype)
        return torch.where(mask > 0, latents, known)

    def start_inpaint(
        self, sources: list[Image.Image], masks: list[np.ndarray], num_images_per_prompt: int, latents: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Initial latents with the kept cells on the source trajectory, and `denoise`'s `inpaint` argument.

        Call after `prepare_timesteps` (it reads the scheduler's first sigma). `latents` is the
        initial noise, which the kept cells' trajectory reuses at every step.
        """
        _, _, lat_h, lat_w = latents.shape
        height, width = lat_h * self.vae_scale_factor, lat_w * self.vae_scale_factor
        source, mask = self.prepare_inpaint_latents(sources, masks, num_images_per_prompt, height, width,
                                                    latents.dtype, latents.device)
        inpaint = (source, mask, latents.clone())
        return self.keep_known_latents(latents, inpaint, 0), inpaint

    def finish(self, latents: torch.Tensor, output_type: str, return_dict: bool,
               inpainted: tuple[list[Image.Image], list[np.ndarray], int, int] | None = None):
        """Decode, release offloaded models and wrap the images as diffusers' SD3 pipelines do.

        `inpainted` = (sources, masks, images per prompt, feather): PIL outputs are pasted into their
        sources, so every pixel outside the mask is exactly the source's.
        """
        images = self.decode_latents(latents, output_type)
        if inpainted is not None and output_type == "pil":
            images = self.composite_inpainted(images, *inpainted)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return StableDiffusion3PipelineOutput(images=images)

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """Undo the SD3 latent normalisation and decode; `output_type="latent"` returns the latents."""
        if output_type == "latent":
            return latents
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)


class StableDiffusion3KontextPipeline(KontextSamplingMixin, StableDiffusion3Pipeline):
    """UniPic2-SD3.5M-Kontext: SD3.5-Medium text-to-image and instruction editing.

    Components are those of `StableDiffusion3Pipeline` (three text encoders); `transformer`
    should be a `SD3Transformer2DKontextModel` (a stock `SD3Transformer2DModel` works for
    text-to-image only).
    """

    def _get_clip_prompt_embeds(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        clip_skip: int | None = None,
        clip_model_index: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The parent's CLIP embeddings for one image per prompt, repeated per image here.

        diffusers <= 0.35.2 tiled the pooled rows in prompt order 0,1,0,1 (instead of 0,0,1,1)
        when several prompts each ask for several images (fixed in 0.36 by diffusers PR #12306),
        pairing images with another prompt's pooled vector. pyproject requires a fixed release;
        repeating here as well keeps the pairing right whatever the installed parent does, at no
        cost (the values equal the fixed parent's).
        """
        prompt_embeds, pooled_prompt_embeds = super()._get_clip_prompt_embeds(
            prompt, num_images_per_prompt=1, device=device, clip_skip=clip_skip, clip_model_index=clip_model_index
        )
        return (
            prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0),  # (B * n, 77, D)
            pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0),  # (B * n, P)
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        image: Image.Image | list[Image.Image] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        sigmas: list[float] | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        reference_sample_mode: str = "sample",
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        inpaint_image: Image.Image | list[Image.Image] | None = None,
        mask_image: Any = None,
        grow: int = 0,
        feather: int = DEFAULT_FEATHER,
    ) -> StableDiffusion3PipelineOutput | tuple:
        """Generate (`image=None`) or edit (`image` given) images, or inpaint (`inpaint_image` + `mask_image`).

        Arguments are those of `StableDiffusion3Pipeline.__call__` (minus IP-Adapter), with
        UniPic-2's defaults (50 steps, guidance 3.5, 512x512), plus:

        Args:
            image: reference image(s) to edit, one per prompt (or one for all), each exactly
                `width` x `height`; when height/width are omitted they default to the image size.
            reference_sample_mode: "sample" draws the VAE posterior with `generator` (upstream
                behaviour, made reproducible); "argmax" uses its mean.
            inpaint_image: source(s) to inpaint, one per prompt (or one for all), each `width` x
                `height` (the default size); the latents outside the mask follow the source's
                noising trajectory and end on it.
            mask_image: the mask(s), PIL (white = regenerate) or (H, W) bool arrays.
            grow: dilate the masks by this many pixels first.
            feather: PIL outputs fade into the source over this many pixels inside the mask;
                outside it every pixel is the source's.

        Returns:
            `StableDiffusion3PipelineOutput` with `images`, or a 1-tuple when `return_dict=False`.
        """
        for given in (inpaint_image, image):
            if given is not None and (height is None or width is None):
                first = given if isinstance(given, Image.Image) else given[0]
                width, height = (width or first.size[0]), (height or first.size[1])
        height = height or DEFAULT_SIZE
        width = width or DEFAULT_SIZE

        # 1. Check inputs
        self.check_size(height, width)
        if (inpaint_image is None) != (mask_image is None):
            raise UserError("inpainting needs both `inpaint_image` and `mask_image`")
        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        if num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        references = None if image is None else self.check_reference_images(image, batch_size, height, width)
        sources = masks = None
        if inpaint_image is not None:
            sources, masks = self.check_inpaint_inputs(inpaint_image, mask_image, batch_size, height, width, grow)
        return self.sample_checked(
            prompt, batch_size=batch_size, height=height, width=width, cfg=guidance_scale,
            num_inference_steps=num_inference_steps, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, generator=generator, references=references,
            inpaint_sources=sources, inpaint_masks=masks, feather=feather, prompt_2=prompt_2, prompt_3=prompt_3,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, latents=latents, sigmas=sigmas,
            reference_sample_mode=reference_sample_mode, output_type=output_type, return_dict=return_dict,
            joint_attention_kwargs=joint_attention_kwargs, clip_skip=clip_skip,
            max_sequence_length=max_sequence_length, skip_guidance_layers=skip_guidance_layers,
            skip_layer_guidance_scale=skip_layer_guidance_scale, skip_layer_guidance_stop=skip_layer_guidance_stop,
            skip_layer_guidance_start=skip_layer_guidance_start, mu=mu,
        )

    @torch.no_grad()
    def sample_checked(
        self,
        prompt: str | list[str] | None,
        *,
        height: int,
        width: int,
        cfg: float,
        num_inference_steps: int = DEFAULT_STEPS,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        references: list[Image.Image] | None = None,
        inpaint_sources: list[Image.Image] | None = None,
        inpaint_masks: list[np.ndarray] | None = None,
        feather: int = DEFAULT_FEATHER,
        batch_size: int | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        sigmas: list[float] | None = None,
        reference_sample_mode: str = "sample",
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        """Steps 2-7 of `__call__` on inputs already checked, by `__call__` or by the `UnifiedPipeline`
        adapter's `check_inputs`: nothing is checked again.

        `references` are RGB images of exactly `width` x `height`, one per prompt; `inpaint_sources`
        and `inpaint_masks` are RGB images of that size and grown bool (H, W) masks, one per prompt.
        """
        if batch_size is None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        self._guidance_scale = cfg
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Encode the prompt with CLIP-L, CLIP-G and T5 (inherited, spec §3)
        lora_scale = joint_attention_kwargs.get("scale", None) if joint_attention_kwargs is not None else None
        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=guidance_enabled(cfg),
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device,
            clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )

        # 3.-7. Noise and reference latents, timesteps, denoising, decoding
        return self.sample_and_decode(
            prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds,
            images=batch_size * num_images_per_prompt, height=height, width=width, references=references,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            reference_sample_mode=reference_sample_mode, num_inference_steps=num_inference_steps, sigmas=sigmas,
            mu=mu, cfg=cfg, output_type=output_type, return_dict=return_dict,
            joint_attention_kwargs=joint_attention_kwargs, skip_guidance_layers=skip_guidance_layers,
            skip_layer_guidance_scale=skip_layer_guidance_scale, skip_layer_guidance_start=skip_layer_guidance_start,
            skip_layer_guidance_stop=skip_layer_guidance_stop, inpaint_sources=inpaint_sources,
            inpaint_masks=inpaint_masks, feather=feather,
        )
