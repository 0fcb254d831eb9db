"""UniPic-3: multi-image editing and composition on Qwen-Image-Edit's components (arXiv 2601.15664).

`UniPic3Pipeline` is a diffusers `DiffusionPipeline` over the Qwen-Image-Edit components
(`QwenImageTransformer2DModel`, `AutoencoderKLQwenImage`, `FlowMatchEulerDiscreteScheduler`,
Qwen2.5-VL with `Qwen2VLProcessor`), so model/sequential CPU offload, VAE tiling and
`save_pretrained` come from diffusers. One call edits one sample: one instruction with its 1-6
input images. The steps follow upstream `UniPic-3/qwen_image_edit{,_fast}/pipeline_qwenimage_edit.py`
(docs/unipic3.md lists the line of each); the two samplers live in `unipic.unipic3.sampling`.

Differences from upstream (all listed in docs/unipic3.md):
- the consistency sampler's fresh noise comes from `step_generator`, not the global torch RNG;
- the timestep multiplies the velocity per sample, so a batch > 1 would be right (upstream
  broadcast a (B,) vector against the channel axis);
- degenerate image sizes never round to 0 (see `unipic.unipic3.sizes`);
- the text encoder runs without its LM head (only hidden states are used);
- under model CPU offload the text encoder leaves the GPU before the VAE encodes the inputs.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.qwenimage.pipeline_qwenimage import (
    QwenImagePipeline,
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from unipic.unipic3 import sizes
from unipic.unipic3.sampling import (
    SAMPLERS,
    base_sigmas,
    consistency_step,
    consistency_times,
    guided_velocity,
)

logger = logging.getLogger(__name__)

# Upstream's system message (pipeline_qwenimage_edit.py:226, both folders): the text encoder was
# trained with it, so it is part of the model, not prose of ours.
SYSTEM_MESSAGE = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
# Hidden states before this position are dropped (upstream :228, :311): a fixed index that equals
# the length of the system turn plus "<|im_start|>user\n" under the real Qwen2.5 tokenizer.
PROMPT_DROP_INDEX = 64
MAX_INPUT_IMAGES = 6  # upstream README: 1-6 input images
DEFAULT_CFG = 4.0  # true CFG scale of every upstream script
DEFAULT_NEGATIVE_PROMPT = " "  # upstream scripts pass ' ', which switches true CFG on


def _takes_mm_token_types(text_encoder) -> bool:
    """True for transformers versions whose Qwen2.5-VL forward takes `mm_token_type_ids` (5.x)."""
    return "mm_token_type_ids" in inspect.signature(type(text_encoder).forward).parameters


class UniPic3Pipeline(DiffusionPipeline):
    """Multi-image editing with a Qwen-Image-Edit-architecture transformer (UniPic-3 base, CM or DMD).

    Args:
        scheduler: flow-matching scheduler; its config supplies the shift parameters.
        vae: the Qwen-Image VAE (8x spatial, 16 channels, per-channel latents_mean/std).
        text_encoder: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`); only its hidden states are used.
        tokenizer: the Qwen2 tokenizer of the release folder (unused: the processor tokenizes).
        processor: `Qwen2VLProcessor` with the Qwen2-VL chat template.
        transformer: `QwenImageTransformer2DModel`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer"]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, processor, transformer):
        super().__init__()
        self.register_modules(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              processor=processor, transformer=transformer)
        self.vae_scale_factor = 2 ** len(self.vae.temperal_downsample) if getattr(self, "vae", None) else 8
        # 2x2 latent patches per token: images are handled at multiples of 16 pixels.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' save; a `QwenVLChatProcessor` (which diffusers cannot save) is written as a Qwen2VLProcessor folder."""
        from transformers import ProcessorMixin

        processor = self.processor
        if processor is None or isinstance(processor, ProcessorMixin):
            return super().save_pretrained(save_directory, **kwargs)
        self.register_modules(processor=None)
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.register_modules(processor=processor)
        processor.save_pretrained(Path(save_directory) / "processor")
        index_file = Path(save_directory) / "model_index.json"
        index = json.loads(index_file.read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]  # the folder is a real Qwen2VLProcessor's
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ prompt

    def encode_prompt(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]],
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2.5-VL hidden states of each (instruction, images) chat, padded, with their mask.

        Args:
            prompts: one instruction per sample.
            images: per sample, its images at the encoder size (`sizes.encoder_images`).
            device: where to run; defaults to the execution device.

        Returns:
            embeds (B, L, D) in the text encoder's dtype, zero-padded; mask (B, L), 1 = real token.
        """
        device = device or self._execution_device
        chats = []
        for prompt, sample_images in zip(prompts, images):
            # One user turn: every image, then the instruction (upstream :261-277).
            user = [{"type": "image", "image": image} for image in sample_images] + [{"type": "text", "text": prompt}]
            messages = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}]
            chats.append(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        # The images already have the sizes the vision encoder needs, so no resizing here.
        inputs = self.processor(text=chats, images=[list(s) for s in images], do_resize=False, padding=True,
                                return_tensors="pt").to(device)
        extra = {}
        if "mm_token_type_ids" in inputs and _takes_mm_token_types(self.text_encoder):
            # transformers 5 gives image tokens 3-D rotary positions only when told which they are.
            extra["mm_token_type_ids"] = inputs.mm_token_type_ids
        # Through forward (so offload hooks fire); logits_to_keep=1 skips the LM head over the prompt.
        hidden = self.text_encoder(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values,
            image_grid_thw=inputs.image_grid_thw,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
            **extra,
        ).hidden_states[-1]  # (B, T, D): the last layer after the final norm
        mask = inputs.attention_mask.bool()
        per_sample = [h[m][PROMPT_DROP_INDEX:] for h, m in zip(hidden, mask)]  # each (L_i, D)
        length = max(h.shape[0] for h in per_sample)
        embeds = torch.stack([torch.cat([h, h.new_zeros(length - h.shape[0], h.shape[1])]) for h in per_sample])
        embeds_mask = torch.stack([
            torch.cat([torch.ones(h.shape[0], dtype=torch.long), torch.zeros(length - h.shape[0], dtype=torch.long)])
            for h in per_sample
        ]).to(device)
        return embeds.to(dtype=self.text_encoder.dtype, device=device), embeds_mask  # (B, L, D), (B, L)

    # ------------------------------------------------------------------ latents

    def offload_resident_models(self) -> None:
        """Under model CPU offload, move every model back to the CPU (no-op otherwise).

        The offload hooks only evict a model's predecessor in `model_cpu_offload_seq`; the VAE
        encode runs out of that order, so without this the 16 GB text encoder would stay on the GPU.
        """
        for hook in getattr(self, "_all_hooks", None) or []:
            hook.offload()

    def encode_images(self, images: Sequence[Image.Image], dtype: torch.dtype,
                      device: torch.device) -> list[torch.Tensor]:
        """Normalised, packed VAE latents of each input image: a list of (1, h/16 * w/16, 64)."""
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1)
        packed = []
        for image in images:
            pixels = self.image_processor.preprocess(image, image.height, image.width)  # (1, 3, H, W) in [-1, 1]
            pixels = pixels.unsqueeze(2).to(device=device, dtype=dtype)  # (1, 3, 1, H, W): one video frame
            # The posterior's mode, not a sample (upstream :450-455, sample_mode="argmax").
            latents = self.vae.encode(pixels).latent_dist.mode()  # (1, 16, 1, H/8, W/8)
            latents = (latents - mean.to(latents)) / std.to(latents)
            _, channels, _, lat_h, lat_w = latents.shape
            packed.append(QwenImagePipeline._pack_latents(latents, 1, channels, lat_h, lat_w))  # (1, N_i, 64)
        return packed

    def prepare_noise(self, height: int, width: int, dtype: torch.dtype, device: torch.device,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Packed Gaussian noise for a (height, width) output: (1, H/16 * W/16, 64)."""
        channels = self.transformer.config.in_channels // 4
        lat_h, lat_w = 2 * (height // (self.vae_scale_factor * 2)), 2 * (width // (self.vae_scale_factor * 2))
        # Drawn in upstream's shape (B, frames, C, h, w) so a seed gives the same numbers.
        noise = randn_tensor((1, 1, channels, lat_h, lat_w), generator=generator, device=device, dtype=dtype)
        return QwenImagePipeline._pack_latents(noise, 1, channels, lat_h, lat_w)  # (1, N, 64)

    # ------------------------------------------------------------------ sampling

    def predict(self, latents: torch.Tensor, image_latents: list[torch.Tensor], timestep: torch.Tensor,
                embeds: torch.Tensor, mask: torch.Tensor, negative: tuple[torch.Tensor, torch.Tensor] | None,
                img_shapes: list[tuple[int, int, int]], true_cfg_scale: float,
                attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        """The (guided) velocity of the target tokens at one timestep, (1, N, 64)."""
        # Target tokens first, then every input image's tokens (base :823, fast :826).
        hidden = torch.cat([latents] + image_latents, dim=1)  # (1, N + sum N_i, 64)
        common = {"hidden_states": hidden, "timestep": timestep, "img_shapes": [img_shapes],
                      "attention_kwargs": attention_kwargs, "return_dict": False}
        with self.transformer.cache_context("cond"):
            velocity = self.transformer(encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, **common)[0]
        velocity = velocity[:, : latents.shape[1]]  # only the target's tokens are denoised
        if negative is None:
            return velocity
        with self.transformer.cache_context("uncond"):
            uncond = self.transformer(encoder_hidden_states=negative[0], encoder_hidden_states_mask=negative[1],
                                      **common)[0]
        return guided_velocity(velocity, uncond[:, : latents.shape[1]], true_cfg_scale)

    def decode(self, latents: torch.Tensor, height: int, width: int, output_type: str = "pil"):
        """Unpack, undo the latent normalisation and decode frame 0; "latent" returns `latents`."""
        if output_type == "latent":
            return latents
        latents = QwenImagePipeline._unpack_latents(latents, height, width, self.vae_scale_factor)  # (1, 16, 1, h, w)
        latents = latents.to(self.vae.dtype)
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        latents = latents / inv_std + mean  # upstream divides by 1/std (base :896-900); kept for equal bits
        image = self.vae.decode(latents, return_dict=False)[0][:, :, 0]  # (1, 3, H, W): frame 0
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[Image.Image],
        prompt: str,
        *,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        true_cfg_scale: float = DEFAULT_CFG,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sampler: str = "euler",
        generator: torch.Generator | None = None,
        step_generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        budget_area: int = sizes.BUDGET_AREA,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> QwenImagePipelineOutput | tuple:
        """Edit or compose: one instruction applied to its 1-6 RGB input images; one output image.

        Args:
            images: the sample's input images (RGB PIL), 1 to 6.
            prompt: the instruction.
            negative_prompt: with `true_cfg_scale > 1`, guidance against this text (upstream: ' ');
                None disables guidance.
            true_cfg_scale: the true-CFG scale (guidance on when > 1 and a negative prompt is given).
            height, width: output size (both or neither; floored to multiples of 16); default:
                the first input's budgeted size.
            num_inference_steps: sampler steps (base 50, CM/DMD 8 upstream).
            sampler: "euler" (base model: the scheduler's Euler step) or "consistency" (CM, DMD).
            generator: draws the initial noise (upstream: `torch.manual_seed(seed)`, a CPU generator).
            step_generator: draws the consistency sampler's fresh noise; defaults to `generator`.
            latents: initial packed noise (1, H/16 * W/16, 64) instead of drawing it.
            budget_area: the pixel area all inputs share (1024² upstream).
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return a `QwenImagePipelineOutput` rather than a 1-tuple.
            attention_kwargs: passed to the transformer's attention processors.

        Returns:
            `QwenImagePipelineOutput` with `images` (one image), or a 1-tuple.
        """
        # 1. Check inputs (user-facing checks happen earlier, in the UnifiedPipeline adapter)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 1 <= len(images) <= MAX_INPUT_IMAGES:
            raise ValueError(f"got {len(images)} input images; UniPic-3 takes 1 to {MAX_INPUT_IMAGES}")
        if (height is None) != (width is None):
            raise ValueError("pass both height and width, or neither")
        device = self._execution_device

        # 2. Shared pixel budget, output size, vision-encoder images (upstream, both files, :684-694, :726)
        budgeted = sizes.budget_images(images, budget_area)
        width, height = sizes.output_size([im.size for im in budgeted], height, width)
        shapes = sizes.img_shapes((width, height), [im.size for im in budgeted], self.vae_scale_factor)

        # 3. Prompt and negative prompt, each with all images (both files :730-752, encoding :240-323)
        prompt_images = [sizes.encoder_images(budgeted)]
        embeds, mask = self.encode_prompt([prompt], prompt_images, device)
        negative = None
        if true_cfg_scale > 1 and negative_prompt is not None:
            negative = self.encode_prompt([negative_prompt], prompt_images, device)

        # 4. Noise, then the inputs' latents (both files :754-775, :447-468, :548-549; VAE mode: no randomness)
        dtype = embeds.dtype
        if latents is None:
            latents = self.prepare_noise(height, width, dtype, device, generator)
        else:
            latents = latents.to(device=device, dtype=dtype)
        self.offload_resident_models()
        image_latents = self.encode_images(budgeted, dtype, device)

        # 5. Timesteps: mu from the target's token count (base :779-796 via the scheduler; fast :779-796)
        config = self.scheduler.config
        mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if sampler == "euler":
            timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler, num_inference_steps, device, sigmas=base_sigmas(num_inference_steps), mu=mu)
            self.scheduler.set_begin_index(0)
        else:
            timesteps = consistency_times(num_inference_steps, mu, config.get("time_shift_type", "exponential"),
                                          device)
        step_generator = generator if step_generator is None else step_generator
        self._num_timesteps = num_inference_steps

        # 6. Denoising loop (base :814-885, Euler step :863; fast :817-888, consistency step :866-867)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i in range(num_inference_steps):
                t = timesteps[i]
                # The transformer takes t in [0, 1] at the latents' precision.
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                if sampler == "euler":
                    timestep = timestep / 1000  # the scheduler counts in [0, 1000]
                velocity = self.predict(latents, image_latents, timestep, embeds, mask, negative, shapes,
                                        true_cfg_scale, attention_kwargs)
                if sampler == "euler":
                    latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                else:
                    noise = randn_tensor(latents.shape, generator=step_generator, device=latents.device,
                                         dtype=latents.dtype)
                    _, latents = consistency_step(latents, velocity, t, timesteps[i + 1], noise)
                progress_bar.update()

        # 7. Decode (base :887-902; fast :890-905)
        image = self.decode(latents, height, width, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return QwenImagePipelineOutput(images=image)
