"""`unipic.api.UnifiedPipeline` adapters over the UniPic-2 diffusers pipelines.

The diffusers-style pipelines are the implementation; these thin wrappers only translate the
family-independent interface (prompt lists, seeds, keyword sampling options, `UserError`s) and
apply the defaults of the upstream scripts:

- text-to-image: 512x512, 50 steps, CFG 3.5, negative prompt "" (spec §3);
- editing: the input is resized so its longer edge is 512 (multiples of 32) unless height/width
  are given, with the long quality-defect negative prompt of the editing scripts (spec §3, §4.5);
- captioning (MetaQuery only): Qwen2.5-VL generation with the checkpoint's decoding settings.

Sampling options: `num_inference_steps` (alias `steps`), `cfg` (alias `guidance_scale`),
`negative_prompt`, `batch_size` (images per forward pass, text-to-image), and for edits
`image_size` (the longer edge). A value of None means "default"; anything else is a `UserError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from PIL import Image

from unipic.api import UnsupportedTaskError, UserError, check_seeds, check_texts
from unipic.unipic2.images import (
    EDIT_NEGATIVE_PROMPT,
    check_size,
    fit,
    longer_edge_size,
    round_to_multiple,
    to_rgb,
)
from unipic.unipic2.pipeline_kontext import DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS

EDIT_IMAGE_SIZE = 512  # longer edge of edited images (scripts; the upstream Gradio app used 1024)
EDIT_MULTIPLE = 32  # the longer-edge rule rounds to multiples of 32
_ALIASES = {"steps": "num_inference_steps", "guidance_scale": "cfg"}
_GENERATION_OPTIONS = ("num_inference_steps", "steps", "cfg", "guidance_scale", "negative_prompt", "batch_size")
_EDIT_OPTIONS = _GENERATION_OPTIONS + ("image_size",)
_CAPTION_OPTIONS = ("do_sample", "temperature", "top_p", "top_k")
DEFAULT_MAX_NEW_TOKENS = 512  # upstream i2t script


def _parse_options(options: dict, allowed: Sequence[str], task: str) -> dict:
    """Canonical option names -> values; None means default; unknown names raise `UserError`."""
    parsed: dict = {}
    for key, value in options.items():
        if key not in allowed:
            raise UserError(f"unknown {task} option {key!r} for UniPic-2; valid options: {', '.join(allowed)}")
        if value is None:
            continue
        name = _ALIASES.get(key, key)
        if name in parsed and parsed[name] != value:
            raise UserError(f"option {key!r} conflicts with another spelling of {name!r}; pass it once")
        parsed[name] = value
    if "num_inference_steps" in parsed:
        steps = parsed["num_inference_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"num_inference_steps must be a positive integer, got {steps!r}")
    if "cfg" in parsed:
        cfg = parsed["cfg"]
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or cfg < 0:
            raise UserError(f"cfg must be a number >= 0 (<= 1 disables guidance), got {cfg!r}")
        parsed["cfg"] = float(cfg)
    if "negative_prompt" in parsed and not isinstance(parsed["negative_prompt"], str):
        raise UserError(f"negative_prompt must be a string, got {type(parsed['negative_prompt']).__name__}")
    for name, minimum in (("image_size", EDIT_MULTIPLE), ("batch_size", 1)):
        value = parsed.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return parsed


def _check_images(images: Sequence[Image.Image], count: int, what: str) -> list[Image.Image]:
    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise UserError("images must be a list of PIL images; wrap a single one in a list")
    if len(images) != count:
        raise UserError(f"got {len(images)} images and {count} {what}; pass one {what[:-1]} per image")
    return [to_rgb(im) for im in images]


def _check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"seed must be an integer or None, got {seed!r}")


class _UniPic2Adapter:
    """Shared text-to-image and editing logic of the two UniPic-2 adapters."""

    family = "unipic2"
    edit_size_multiple = 16  # explicit edit sizes: VAE factor x patch size

    def __init__(self, pipeline, name: str | None = None):
        self.pipeline = pipeline
        self.name = name or self.family

    def _generator(self, seed: int | None) -> torch.Generator | None:
        """A generator on the pipeline's execution device (the GPU under CPU offload)."""
        _check_seed(seed)
        if seed is None:
            return None
        return torch.Generator(device=self.pipeline._execution_device).manual_seed(seed)

    def _generators(self, seed: int | Sequence[int] | None, count: int, what: str) -> list:
        """One generator per prompt/pair: a seed list gives each its own, otherwise all share one."""
        seeds = check_seeds(seed, count, what)
        if seeds is None:
            return [self._generator(seed)] * count
        return [self._generator(s) for s in seeds]

    def _check_output_size(self, height: int, width: int) -> None:
        check_size(height, width, multiple=self.pipeline.vae_scale_factor * self.pipeline.patch_size,
                   max_side=self.pipeline.max_image_side(), what="output")

    def sampling_defaults(self) -> dict[str, object]:
        """Defaults written into PNG metadata."""
        return {
            "model_family": self.family,
            "model": self.name,
            "num_inference_steps": DEFAULT_STEPS,
            "cfg": DEFAULT_GUIDANCE,
            "height": DEFAULT_SIZE,
            "width": DEFAULT_SIZE,
            "negative_prompt": "",
            "edit_negative_prompt": EDIT_NEGATIVE_PROMPT,
            "edit_image_size": EDIT_IMAGE_SIZE,
            "scheduler": type(self.pipeline.scheduler).__name__,
            "scheduler_shift": self.pipeline.scheduler.config.get("shift"),
        }

    def text_to_image(
        self,
        prompts: Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        progress: bool = False,
        **options: object,
    ) -> list[list[Image.Image]]:
        """Generate `images_per_prompt` images per prompt (default 512x512; one given side makes a square)."""
        prompts = check_texts(prompts, "prompts", allow_blank=True)
        opts = _parse_options(options, _GENERATION_OPTIONS, "text-to-image")
        if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
            raise UserError(f"images_per_prompt must be a positive integer, got {images_per_prompt!r}")
        height = height or width or DEFAULT_SIZE
        width = width or height
        self._check_output_size(height, width)
        shared = check_seeds(seed, len(prompts), "prompt") is None
        generators = self._generators(seed, len(prompts), "prompt")
        self.pipeline.set_progress_bar_config(disable=not progress)
        # batch_size caps the images per forward pass: whole prompts are grouped (at least one).
        per_call = max(1, opts.get("batch_size", len(prompts) * images_per_prompt) // images_per_prompt)
        results: list[list[Image.Image]] = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            # A seed list: diffusers draws image j from generator j, so each prompt's images come
            # from its own generator (repeated, it advances from one image to the next).
            generator = generators[0] if shared else [g for g in generators[start : start + per_call]
                                                      for _ in range(images_per_prompt)]
            images = self.pipeline(
                prompt=chunk,
                height=height,
                width=width,
                num_inference_steps=opts.get("num_inference_steps", DEFAULT_STEPS),
                guidance_scale=opts.get("cfg", DEFAULT_GUIDANCE),
                negative_prompt=opts.get("negative_prompt", ""),
                num_images_per_prompt=images_per_prompt,
                generator=generator,
            ).images
            n = images_per_prompt
            results += [images[i * n : (i + 1) * n] for i in range(len(chunk))]
        return results

    def _edit_size(self, size: tuple[int, int], height: int | None, width: int | None, image_size: int) -> tuple[int, int]:
        """Output (width, height): both given -> as given; one -> keep the aspect; none -> longer-edge rule."""
        in_w, in_h = size
        if height and width:
            return width, height
        if height or width:
            multiple = self.edit_size_multiple
            if height:
                return round_to_multiple(in_w * height / in_h, multiple), height
            return width, round_to_multiple(in_h * width / in_w, multiple)
        return longer_edge_size(in_w, in_h, image_size, EDIT_MULTIPLE)

    def edit_image(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] | None = None,
        progress: bool = False,
        **options: object,
    ) -> list[Image.Image]:
        """Apply instruction i to image i; outputs have the (resized) input size.

        Pairs run one after another with one generator, or with a seed list one generator each
        (`batch_size` has no effect), so results depend only on the inputs and the seed. Images of any mode are converted to RGB
        (transparency composited on white); a forced output size centre-crops to its aspect ratio.
        """
        instructions = check_texts(instructions, "instructions")
        images = _check_images(images, len(instructions), "instructions")
        opts = _parse_options(options, _EDIT_OPTIONS, "edit")
        generators = self._generators(seed, len(instructions), "instruction")
        self.pipeline.set_progress_bar_config(disable=not progress)
        edited = []
        for image, instruction, generator in zip(images, instructions, generators):
            out_w, out_h = self._edit_size(image.size, height, width, opts.get("image_size", EDIT_IMAGE_SIZE))
            check_size(out_h, out_w, multiple=self.edit_size_multiple, max_side=self.pipeline.max_image_side(),
                       what="edit output")
            result = self.pipeline(
                prompt=instruction,
                image=fit(image, out_w, out_h),
                height=out_h,
                width=out_w,
                num_inference_steps=opts.get("num_inference_steps", DEFAULT_STEPS),
                guidance_scale=opts.get("cfg", DEFAULT_GUIDANCE),
                negative_prompt=opts.get("negative_prompt", EDIT_NEGATIVE_PROMPT),
                generator=generator,
            ).images[0]
            edited.append(result)
        return edited


class KontextUnifiedPipeline(_UniPic2Adapter):
    """UniPic2-SD3.5M-Kontext behind `UnifiedPipeline`: generation and editing, no captioning."""

    family = "unipic2-sd35m-kontext"

    def image_to_text(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        *,
        max_new_tokens: int = 256,
        seed: int | None = None,
        **options: object,
    ) -> list[str]:
        """Not available: the Kontext model has no language model."""
        raise UnsupportedTaskError(
            "UniPic2-SD3.5M-Kontext only generates and edits images; for captions use a UniPic2-MetaQuery "
            "folder (Qwen2.5-VL) or a UniPic-1 model"
        )


class MetaQueryUnifiedPipeline(_UniPic2Adapter):
    """UniPic2-MetaQuery behind `UnifiedPipeline`: generation, editing and captioning."""

    family = "unipic2-metaquery"
    edit_size_multiple = 32  # Qwen's vision grid is exactly (H/32) x (W/32) only for multiples of 32

    def sampling_defaults(self) -> dict[str, object]:
        defaults = super().sampling_defaults()
        defaults["caption_question"] = "Describe the image in detail."
        defaults["caption_max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        return defaults

    def image_to_text(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        *,
        max_new_tokens: int | None = 256,
        seed: int | None = None,
        **options: object,
    ) -> list[str]:
        """Answer question i about image i with Qwen2.5-VL; an empty question asks for a detailed description.

        Options: `do_sample`, `temperature` (0 = greedy), `top_p`, `top_k`; otherwise the
        checkpoint's generation config decides. `max_new_tokens=None` means 512 (upstream's
        default). `seed` makes sampling reproducible.
        """
        from unipic.unipic2.pipeline_metaquery import DEFAULT_QUESTION

        questions = check_texts(questions, "questions", allow_blank=True)  # "" = the default question
        images = _check_images(images, len(questions), "questions")
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        _check_seed(seed)
        generate_kwargs: dict = {}
        for key, value in options.items():
            if key not in _CAPTION_OPTIONS:
                raise UserError(f"unknown caption option {key!r} for UniPic-2; valid options: {', '.join(_CAPTION_OPTIONS)}")
            if value is not None:
                generate_kwargs[key] = value
        temperature = generate_kwargs.get("temperature")
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
                raise UserError(f"temperature must be a number >= 0, got {temperature!r}")
            if temperature == 0:  # greedy decoding
                generate_kwargs.pop("temperature")
                generate_kwargs.update(do_sample=False, top_p=None, top_k=None)
            else:
                generate_kwargs["do_sample"] = True
        questions = [q.strip() or DEFAULT_QUESTION for q in questions]
        device = torch.device(self.pipeline._execution_device)
        with contextlib.ExitStack() as stack:
            if seed is not None:  # generate() samples with the global RNG: seed it inside a fork
                devices = [device.index or 0] if device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(seed)
            return self.pipeline.image_to_text(images, questions, max_new_tokens=max_new_tokens, **generate_kwargs)
