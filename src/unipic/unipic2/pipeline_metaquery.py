"""UniPic2-MetaQuery: a frozen Qwen2.5-VL reads the prompt (and image) and drives the Kontext DiT.

Upstream has no pipeline class for this (prompt wrapping, query appending and CFG batching live
in three scripts, spec §10.9); `UniPic2MetaQueryPipeline` collects them:

1. Chat-format each prompt without a system turn (spec §4.1): text-to-image prompts get the
   prefix "Generate an image: "; edit prompts are [image, instruction].
2. Tokenise, right-pad, append `num_queries` slots and overwrite their embeddings with the
   conditioner's learnable `meta_queries` (image tokens get the vision tower's features).
3. Run the Qwen decoder with explicit positions `cumsum(mask) - 1` on all three M-RoPE axes,
   which is what upstream got implicitly under transformers 4.55 (spec §4.6). Passing them
   explicitly keeps results independent of the transformers version and of padding.
4. The conditioner maps the slot states to `prompt_embeds` / `pooled_prompt_embeds`, which
   replace the CLIP+T5 embeddings of the Kontext sampler (shared `KontextSamplingMixin`).

`image_to_text` is plain Qwen2.5-VL generation (spec §4.7), decoding only the new tokens
(upstream decoded prompt + answer and kept a "user ... assistant" prefix, spec §10.13).

The tokenizer and the Qwen image processor are separate components rather than a
`Qwen2_5_VLProcessor`: the processor insists on a video processor (torchvision), which the
image-only MetaQuery path never uses. The image processor only supplies settings: pixel values
are computed with torch ops exactly as transformers' torchvision processor computes them, which
is what upstream ran (`qwen_pixels`; the PIL backend resizes differently).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from PIL import Image

from unipic.api import UserError
from unipic.inpainting import DEFAULT_FEATHER
from unipic.unipic2.conditioner import StableDiffusion3Conditioner
from unipic.unipic2.images import to_rgb
from unipic.unipic2.pipeline_kontext import (
    DEFAULT_GUIDANCE,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    KontextSamplingMixin,
    guidance_enabled,
)
from unipic.unipic2.qwen_pixels import qwen_pixel_values
from unipic.unipic2.transformer_sd3_kontext import SD3Transformer2DKontextModel

logger = logging.getLogger(__name__)

T2I_PREFIX = "Generate an image: "
DEFAULT_QUESTION = "Describe the image in detail."
IMAGE_TYPE_ID = 1  # mm_token_type_ids value of image tokens (0 = text)
MISSING_MLLM_HELP = (
    "UniPic2-MetaQuery needs its Qwen2.5-VL-7B-Instruct model, which lives in its own folder: pass "
    "qwen_path=<folder> to load_unipic2_pipeline, put (or symlink) the Qwen folder "
    "at <model folder>/mllm, or set \"_qwen_path\" in <model folder>/model_index.json"
)


def chat_prompt(text: str, with_image: bool = False) -> str:
    """Qwen chat format for one user turn and the generation prompt, with no system turn (spec §4.1)."""
    content = ("<|vision_start|><|image_pad|><|vision_end|>" if with_image else "") + text
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def query_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """M-RoPE positions (3, B, L) = cumsum(mask) - 1 on every axis; padding gets a dummy 1 (spec §4.6).

    Counting only real tokens makes a padded row see exactly the positions of the same row
    without padding, whichever side the padding is on.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    positions = positions.masked_fill(attention_mask == 0, 1)  # (B, L)
    return positions.unsqueeze(0).expand(3, -1, -1)


def _onload(module: torch.nn.Module) -> None:
    """Move a model-CPU-offloaded module to the accelerator before calling its submodules directly.

    diffusers' model offload hooks fire on the top-level `forward` only; the query encoder calls
    `mllm.model.language_model` and the vision tower directly, so it triggers the hook itself
    (as diffusers' `apply_forward_hook` does for `AutoencoderKL.encode`/`decode`).
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


class UniPic2MetaQueryPipeline(KontextSamplingMixin, DiffusionPipeline):
    """UniPic2-MetaQuery text-to-image, editing and image-to-text.

    Args:
        transformer: the MetaQuery-fine-tuned Kontext DiT.
        scheduler: flow-matching Euler scheduler.
        vae: SD3 16-channel VAE.
        conditioner: meta queries + connector + projections.
        mllm: `Qwen2_5_VLForConditionalGeneration` (frozen); optional so the generation parts can
            be saved and loaded without the 8 B-parameter model.
        mllm_tokenizer: the Qwen2 tokenizer.
        mllm_image_processor: the Qwen2-VL image processor.
    """

    model_cpu_offload_seq = "mllm->conditioner->transformer->vae"
    _optional_components = ["mllm", "mllm_tokenizer", "mllm_image_processor"]

    def __init__(
        self,
        transformer: SD3Transformer2DKontextModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        conditioner: StableDiffusion3Conditioner,
        mllm: Any = None,
        mllm_tokenizer: Any = None,
        mllm_image_processor: Any = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            conditioner=conditioner,
            mllm=mllm,
            mllm_tokenizer=mllm_tokenizer,
            mllm_image_processor=mllm_image_processor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.patch_size = self.transformer.config.patch_size

    # ------------------------------------------------------------------ MLLM inputs

    def _require_mllm(self) -> None:
        if self.mllm is None or self.mllm_tokenizer is None or self.mllm_image_processor is None:
            raise UserError(MISSING_MLLM_HELP)

    def _vision_inputs(self, images: list[Image.Image], pixels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen pixel patches and (t, h, w) grids; `pixels` pins the resized area (min = max).

        Computed as transformers' torchvision processor does (upstream's), whatever backend the
        loaded processor is: only its settings are used (see `qwen_pixels`).
        """
        return qwen_pixel_values(images, self.mllm_image_processor, pixels)

    def _image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Merged vision-tower features, one (n_i, hidden) tensor per image."""
        device = self._execution_device
        out = self.mllm.model.get_image_features(pixel_values.to(device), grid_thw.to(device))
        features = getattr(out, "pooler_output", out)  # transformers 5 returns an output object
        if isinstance(features, torch.Tensor):
            sizes = (grid_thw.prod(-1) // self.mllm.config.vision_config.spatial_merge_size**2).tolist()
            features = torch.split(features, sizes)
        return list(features)

    def _tokenize(self, texts: list[str], image_tokens: list[int] | None) -> list[list[int]]:
        """Token ids per text, with each `<|image_pad|>` expanded to its image's token count."""
        image_pad = self.mllm_tokenizer.convert_ids_to_tokens(self.mllm.config.image_token_id)
        rows = []
        for index, text in enumerate(texts):
            if image_tokens is not None:
                text = text.replace(image_pad, image_pad * image_tokens[index])
            rows.append(self.mllm_tokenizer(text, add_special_tokens=False)["input_ids"])
        return rows

    def _pad_right(self, rows: list[list[int]], extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token rows into (ids, mask) of shape (B, max_len + extra); the extra slots are unmasked."""
        pad_id = self.mllm_tokenizer.pad_token_id if self.mllm_tokenizer.pad_token_id is not None else 0
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length + extra), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length + extra), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = 1
        mask[:, length:] = 1  # query slots (or nothing when extra == 0)
        return ids, mask

    def encode_query_states(
        self, texts: list[str], image_features: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Last-layer Qwen states at the appended query slots, shape (B, num_queries, llm_hidden).

        Args:
            texts: chat-formatted prompts, one per row.
            image_features: per-row vision features (row i replaces row i's `<|image_pad|>` tokens).
        """
        self._require_mllm()
        _onload(self.mllm)
        device = self._execution_device
        num_queries = self.conditioner.config.num_queries
        image_tokens = None if image_features is None else [f.shape[0] for f in image_features]
        ids, mask = self._pad_right(self._tokenize(texts, image_tokens), extra=num_queries)
        ids, mask = ids.to(device), mask.to(device)  # (B, L + Q)

        embeds = self.mllm.get_input_embeddings()(ids)  # (B, L + Q, hidden)
        if image_features is not None:
            image_mask = ids == self.mllm.config.image_token_id
            image_mask[:, -num_queries:] = False
            embeds[image_mask] = torch.cat(image_features).to(device=device, dtype=embeds.dtype)
        queries = self.conditioner.meta_queries.to(device=device, dtype=embeds.dtype)  # (Q, hidden)
        embeds[:, -num_queries:] = queries.unsqueeze(0).expand(embeds.shape[0], -1, -1)

        out = self.mllm.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=query_position_ids(mask),  # (3, B, L + Q), spec §4.6
            use_cache=False,
        )
        return out.last_hidden_state[:, -num_queries:]  # (B, Q, hidden)

    @staticmethod
    def qwen_pixels(height: int, width: int) -> int:
        """Pixel budget that makes Qwen's merged grid (H/32) x (W/32), half the DiT grid (spec §4.5)."""
        return round(height * 28 / 32) * round(width * 28 / 32)

    def encode_prompt(
        self,
        prompt: str | list[str],
        image: list[Image.Image] | None = None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Conditioning for the DiT from Qwen + conditioner.

        Returns:
            `(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)`,
            shapes (B*n, Q, J) and (B*n, P); negatives are None without guidance.
        """
        self._require_mllm()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompts)
        negative_prompt = negative_prompt or ""
        negatives = batch_size * [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != batch_size:
            raise UserError(f"got {len(negatives)} negative prompts for {batch_size} prompts")

        if image is None:  # text-to-image: "Generate an image: " prefix on both halves (spec §4.4)
            texts = [chat_prompt(T2I_PREFIX + p) for p in prompts]
            neg_texts = [chat_prompt(T2I_PREFIX + n) for n in negatives]
            features = None
        else:  # editing: [image, instruction]; the negative sees the same image (spec §4.5)
            texts = [chat_prompt(p, with_image=True) for p in prompts]
            neg_texts = [chat_prompt(n, with_image=True) for n in negatives]
            width, height = (width or image[0].size[0]), (height or image[0].size[1])
            _onload(self.mllm)
            pixel_values, grid = self._vision_inputs(image, self.qwen_pixels(height, width))
            features = self._image_features(pixel_values, grid)  # computed once, reused for the negatives

        if do_classifier_free_guidance:
            rows = neg_texts + texts
            row_features = None if features is None else features + features
        else:
            rows, row_features = texts, features
        states = self.encode_query_states(rows, row_features)  # (B or 2B, Q, hidden)
        embeds, pooled = self.conditioner(states)  # (., Q, J), (., P)
        dtype = self.transformer.dtype
        embeds = embeds.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        pooled = pooled.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return embeds, None, pooled, None
        n = batch_size * num_images_per_prompt
        return embeds[n:], embeds[:n], pooled[n:], pooled[:n]

    # ------------------------------------------------------------------ generation / editing

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Image.Image | list[Image.Image] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        sigmas: list[float] | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        negative_prompt: str | list[str] | None = None,
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
        """Generate (`image=None`) or edit (`image` given) with MetaQuery conditioning, or inpaint
        (`inpaint_image` + `mask_image`, text-to-image conditioning; see the Kontext pipeline).

        Args mirror `StableDiffusion3KontextPipeline.__call__`. Precomputed `prompt_embeds` etc.
        (already repeated per image) skip the Qwen + conditioner step.
        """
        for given in (inpaint_image, image):
            if given is not None and (height is None or width is None):
                first = given if isinstance(given, Image.Image) else given[0]
                width, height = (width or first.size[0]), (height or first.size[1])
        height = height or DEFAULT_SIZE
        width = width or DEFAULT_SIZE
        do_cfg = guidance_enabled(guidance_scale)

        # 1. Check inputs
        self.check_size(height, width)
        if (prompt is None) == (prompt_embeds is None):
            raise UserError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt_embeds is not None and (pooled_prompt_embeds is None or (do_cfg and negative_prompt_embeds is None)):
            raise UserError("with `prompt_embeds`, also pass the pooled and (with guidance) the negative embeddings")
        if num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0] // num_images_per_prompt
        references = None if image is None else self.check_reference_images(image, batch_size, height, width)
        if (inpaint_image is None) != (mask_image is None):
            raise UserError("inpainting needs both `inpaint_image` and `mask_image`")
        sources = masks = None
        if inpaint_image is not None:
            sources, masks = self.check_inpaint_inputs(inpaint_image, mask_image, batch_size, height, width, grow)

        return self.sample_checked(
            prompt, batch_size=batch_size, height=height, width=width, cfg=guidance_scale,
            num_inference_steps=num_inference_steps, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, generator=generator, references=references,
            inpaint_sources=sources, inpaint_masks=masks, feather=feather, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, latents=latents, sigmas=sigmas,
            reference_sample_mode=reference_sample_mode, output_type=output_type, return_dict=return_dict,
            joint_attention_kwargs=joint_attention_kwargs, skip_guidance_layers=skip_guidance_layers,
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
        inpaint_masks: list | None = None,
        feather: int = DEFAULT_FEATHER,
        batch_size: int | None = None,
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
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        """Steps 2-7 of `__call__` on inputs already checked (by `__call__` or the adapter's
        `check_inputs`); nothing is checked again. Inputs as for the Kontext pipeline's `sample_checked`."""
        if batch_size is None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)

        # 2. Qwen2.5-VL + conditioner replace the three text encoders (spec §4.3)
        if prompt_embeds is None:
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
                self.encode_prompt(
                    prompt, references, negative_prompt, guidance_enabled(cfg), num_images_per_prompt, height, width
                )
            )

        # 3.-7. Noise and reference latents, timesteps, denoising, decoding (shared with Kontext)
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

    # ------------------------------------------------------------------ understanding

    @torch.no_grad()
    def image_to_text(
        self,
        image: Image.Image | Sequence[Image.Image],
        question: str | Sequence[str] = DEFAULT_QUESTION,
        max_new_tokens: int = 512,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Answer `question` about each image with Qwen2.5-VL (plain generation, spec §4.7).

        Decoding settings come from the checkpoint's generation config unless overridden by
        `generate_kwargs` (e.g. `do_sample`, `temperature`, `top_p`). Only the new tokens are
        decoded. Images are processed one at a time (no padding inside `generate`).

        Returns:
            One answer string per image.
        """
        self._require_mllm()
        images = [image] if isinstance(image, Image.Image) else list(image)
        questions = [question] * len(images) if isinstance(question, str) else list(question)
        if len(questions) != len(images):
            raise UserError(f"got {len(questions)} questions for {len(images)} images; pass one per image")
        _onload(self.mllm)
        device = self._execution_device
        accepts_types = "mm_token_type_ids" in inspect.signature(self.mllm.forward).parameters
        answers = []
        for im, q in zip(images, questions):
            pixel_values, grid = self._vision_inputs([to_rgb(im)], pixels=None)
            merge = self.mllm.config.vision_config.spatial_merge_size
            rows = self._tokenize([chat_prompt(q, with_image=True)], [int(grid[0].prod()) // merge**2])
            ids, mask = self._pad_right(rows)
            inputs = {
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
                "pixel_values": pixel_values.to(device),
                "image_grid_thw": grid.to(device),
            }
            if accepts_types:  # transformers 5 needs it to build the 3-D M-RoPE positions
                inputs["mm_token_type_ids"] = (ids == self.mllm.config.image_token_id).long().mul(IMAGE_TYPE_ID).to(device)
            output = self.mllm.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
            new_tokens = output[0, ids.shape[1] :]  # slice off the prompt (spec §10.13)
            answers.append(self.mllm_tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
        self.maybe_free_model_hooks()
        return answers
