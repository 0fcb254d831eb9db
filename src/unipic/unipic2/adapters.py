"""`unipic.api.UnifiedPipeline` adapters over the UniPic-2 diffusers pipelines.

The diffusers-style pipelines are the implementation; these thin wrappers only translate the
family-independent interface (prompt lists, seeds, keyword sampling options, `UserError`s) and
apply the defaults of the upstream scripts:

- text-to-image: 512x512 (the pipeline class's default; the scripts use 512 high, 384 wide), 50
  steps, CFG 3.5, negative prompt "" (spec §3);
- editing: the output's longer edge is 512 (multiples of 32) unless height/width are given; the
  input is resized straight to it (a slight stretch when rounding changes the aspect ratio, as in
  the scripts) or, with `input_resize="crop"`, centre-cropped first; the negative prompt is the
  long quality-defect list of the editing scripts (spec §3, §4.5);
- captioning (MetaQuery only): Qwen2.5-VL generation with the checkpoint's decoding settings.

Sampling options: `num_inference_steps` (alias `steps`), `cfg` (alias `guidance_scale`),
`negative_prompt`, `batch_size` (images per forward pass, text-to-image), and for edits
`image_size` (the longer edge) and `input_resize` ("stretch" or "crop"). A value of None means
"default"; anything else is a `UserError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from PIL import Image

from unipic.api import CheckedInputs, Job, UnsupportedTaskError, UserError, check_texts
from unipic.checks import (
    MAX_TEMPERATURE,
    check_choice,
    check_image_list,
    check_int,
    check_number,
    check_seed,
    check_seeds,
    parse_diffusion_options,
)
from unipic.inpainting import (
    DEFAULT_FEATHER,
    DEFAULT_GROW,
    check_inpaint_request,
    outpaint_with,
    pad_to_multiple,
    rgb_request,
)
from unipic.unipic2.images import (
    EDIT_NEGATIVE_PROMPT,
    INPUT_RESIZE_MODES,
    check_size,
    longer_edge_size,
    resize_input,
    round_to_multiple,
    to_rgb,
)
from unipic.unipic2.pipeline_kontext import DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS

EDIT_IMAGE_SIZE = 512  # longer edge of edited images (scripts; the upstream Gradio app used 1024)
EDIT_MULTIPLE = 32  # the longer-edge rule rounds to multiples of 32
_ALIASES = {"steps": "num_inference_steps", "guidance_scale": "cfg"}
_GENERATION_OPTIONS = ("num_inference_steps", "steps", "cfg", "guidance_scale", "negative_prompt", "batch_size")
_EDIT_OPTIONS = _GENERATION_OPTIONS + ("image_size", "input_resize")
_INPAINT_OPTIONS = ("num_inference_steps", "steps", "cfg", "guidance_scale", "negative_prompt")
EDIT_INPUT_RESIZE = "stretch"  # upstream's editing scripts resize straight to the rounded size
_CAPTION_OPTIONS = ("do_sample", "temperature", "top_p", "top_k")
DEFAULT_MAX_NEW_TOKENS = 512  # upstream i2t script


def _parse_options(options: dict, allowed: Sequence[str], task: str) -> dict:
    """Canonical option names -> values; None means default; unknown names raise `UserError`."""
    parsed = parse_diffusion_options(options, allowed, _ALIASES, family="UniPic-2", task=task)
    if "input_resize" in parsed:
        parsed["input_resize"] = check_choice(parsed["input_resize"], "input_resize", INPUT_RESIZE_MODES)
    for name, minimum in (("image_size", EDIT_MULTIPLE), ("batch_size", 1)):
        if name in parsed:
            parsed[name] = check_int(parsed[name], name, minimum=minimum)
    return parsed


def _check_images(images: Sequence[Image.Image], count: int, what: str) -> list[Image.Image]:
    return [to_rgb(im, name=f"images[{i}]") for i, im in enumerate(check_image_list(images, "images", count, what))]


class _UniPic2Adapter:
    """Shared text-to-image and editing logic of the two UniPic-2 adapters."""

    family = "unipic2"
    edit_size_multiple = 16  # explicit edit sizes: VAE factor x patch size
    alpha_background = (255, 255, 255)  # transparent input pixels are composited onto white (upstream)

    def __init__(self, pipeline, name: str | None = None):
        self.pipeline = pipeline
        self.name = name or self.family

    def _generator(self, seed: int | None) -> torch.Generator | None:
        """A generator on the pipeline's execution device (the GPU under CPU offload)."""
        if seed is None:
            return None
        return torch.Generator(device=self.pipeline._execution_device).manual_seed(seed)

    def _generators(self, seed: int | list[int] | None, count: int) -> list[torch.Generator | None]:
        """One generator per prompt/pair of a checked request: a seed list gives each its own,
        otherwise all share one (the same object, advancing from one to the next)."""
        if isinstance(seed, list):
            return [self._generator(s) for s in seed]
        return [self._generator(seed)] * count

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
            "edit_input_resize": EDIT_INPUT_RESIZE,
            "scheduler": type(self.pipeline.scheduler).__name__,
            "scheduler_shift": self.pipeline.scheduler.config.get("shift"),
        }

    def check_inputs(
        self,
        job: Job,
        texts: Sequence[str],
        images: Sequence[Image.Image] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        max_new_tokens: int | None = None,
        **options: object,
    ) -> CheckedInputs:
        """Validate a request and resolve its settings (`UserError` naming the argument and the fix).

        An edit's output size depends on each source image, so for edits without an explicit
        size the settings carry the longer-edge rule (`image_size`) instead of height/width.
        Generation and editing take a seed list too, one seed per prompt or pair.
        """
        if job == "image_to_text":
            return self._check_caption(texts, images, check_seed(seed), max_new_tokens, options)
        if job == "text_to_image":
            texts = check_texts(texts, "prompts", allow_blank=True)
            seed = check_seeds(seed, len(texts), "prompt")
            opts = _parse_options(options, _GENERATION_OPTIONS, "text-to-image")
            images_per_prompt = check_int(images_per_prompt, "images_per_prompt", minimum=1)
            height = height or width or DEFAULT_SIZE
            width = width or height
            self._check_output_size(height, width)
            settings = {"height": height, "width": width, "negative_prompt": opts.get("negative_prompt", ""),
                        "batch_size": opts.get("batch_size", len(texts) * images_per_prompt)}
            rgb = None
        elif job == "edit_image":
            texts = check_texts(texts, "instructions")
            seed = check_seeds(seed, len(texts), "instruction")
            rgb = _check_images(images, len(texts), "instructions")
            opts = _parse_options(options, _EDIT_OPTIONS, "edit")
            settings = {"negative_prompt": opts.get("negative_prompt", EDIT_NEGATIVE_PROMPT),
                        "input_resize": opts.get("input_resize", EDIT_INPUT_RESIZE)}
            if height or width:
                settings.update(height=height, width=width)
            else:
                settings["image_size"] = opts.get("image_size", EDIT_IMAGE_SIZE)
            sizes = []
            for i, image in enumerate(rgb):
                out_w, out_h = self._edit_size(image.size, height, width, opts.get("image_size", EDIT_IMAGE_SIZE))
                check_size(out_h, out_w, multiple=self.edit_size_multiple, max_side=self.pipeline.max_image_side(),
                           what=f"edit output of images[{i}]")
                sizes.append((out_h, out_w))
        else:
            raise UserError(f"job={job!r}: must be 'text_to_image', 'edit_image' or 'image_to_text'")
        settings.update(num_inference_steps=opts.get("num_inference_steps", DEFAULT_STEPS),
                        cfg=opts.get("cfg", DEFAULT_GUIDANCE))
        return CheckedInputs(job, texts, rgb, seed, images_per_prompt, settings,
                             sizes=sizes if job == "edit_image" else None)

    def _image_to_text(self, request: CheckedInputs, progress: bool = False) -> list[str]:
        return self._check_caption(request.texts, request.images, request.seed, None, {})  # raises

    def _check_caption(self, texts, images, seed, max_new_tokens, options) -> CheckedInputs:
        raise UnsupportedTaskError(
            "UniPic2-SD3.5M-Kontext only generates and edits images; for captions use a UniPic2-MetaQuery "
            "folder (Qwen2.5-VL) or a UniPic-1 model"
        )

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
        return self.run(self.check_inputs("text_to_image", prompts, height=height, width=width,
                                          images_per_prompt=images_per_prompt, seed=seed, **options),
                        progress=progress)

    def run(self, request: CheckedInputs, *, progress: bool = False) -> list:
        """Sample a checked request (`check_inputs` or `check_inpaint`): the diffusers pipeline's
        `sample_checked` gets its checked values, so nothing is checked again."""
        job = {"text_to_image": self._text_to_image, "edit_image": self._edit_image, "inpaint": self._inpaint,
               "image_to_text": self._image_to_text}.get(request.job)
        if job is None:
            raise ValueError(f"unknown job {request.job!r} in a checked request")
        return job(request, progress)

    def _text_to_image(self, request: CheckedInputs, progress: bool) -> list[list[Image.Image]]:
        prompts, settings, images_per_prompt = request.texts, request.settings, request.images_per_prompt
        shared = not isinstance(request.seed, list)
        generators = self._generators(request.seed, len(prompts))
        self.pipeline.set_progress_bar_config(disable=not progress)
        # batch_size caps the images per forward pass: whole prompts are grouped (at least one).
        per_call = max(1, settings["batch_size"] // images_per_prompt)
        results: list[list[Image.Image]] = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            # A seed list: diffusers draws image j from generator j, so each prompt's images come
            # from its own generator (repeated, it advances from one image to the next).
            generator = generators[0] if shared else [g for g in generators[start : start + per_call]
                                                      for _ in range(images_per_prompt)]
            images = self.pipeline.sample_checked(
                chunk,
                height=settings["height"],
                width=settings["width"],
                num_inference_steps=settings["num_inference_steps"],
                cfg=settings["cfg"],
                negative_prompt=settings["negative_prompt"],
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
        (`batch_size` has no effect), so results depend only on the inputs and the seed. Images of
        any mode are converted to RGB (transparency composited on white). The source is resized
        straight to the output size (upstream's behaviour); `input_resize="crop"` centre-crops it to
        the output's aspect ratio first, which avoids distortion when a forced size has another
        aspect ratio.
        """
        return self.run(self.check_inputs("edit_image", instructions, images, height=height, width=width,
                                          seed=seed, **options), progress=progress)

    def _edit_image(self, request: CheckedInputs, progress: bool) -> list[Image.Image]:
        settings = request.settings
        generators = self._generators(request.seed, len(request.texts))
        self.pipeline.set_progress_bar_config(disable=not progress)
        edited = []
        for image, instruction, generator, (out_h, out_w) in zip(request.images, request.texts, generators,
                                                                 request.sizes):
            result = self.pipeline.sample_checked(
                instruction,
                references=[resize_input(image, out_w, out_h, settings["input_resize"])],
                height=out_h,
                width=out_w,
                num_inference_steps=settings["num_inference_steps"],
                cfg=settings["cfg"],
                negative_prompt=settings["negative_prompt"],
                generator=generator,
            ).images[0]
            edited.append(result)
        return edited

    # ------------------------------------------------------------------ inpainting

    def check_inpaint(
        self,
        images: Sequence[Image.Image],
        masks: Sequence[object],
        prompts: Sequence[str],
        *,
        seed: int | Sequence[int] | None = None,
        grow: int = DEFAULT_GROW,
        feather: int = DEFAULT_FEATHER,
        **options: object,
    ) -> CheckedInputs:
        """Validate an inpainting request (`UserError` naming the argument); settings are what sampling uses."""
        return self.inpaint_settings(check_inpaint_request(images, masks, prompts, seed=seed, grow=grow,
                                                           feather=feather), **options)

    def inpaint_settings(self, request: CheckedInputs, **options: object) -> CheckedInputs:
        """Complete a model-free `check_inpaint_request`: RGB images and the sampling settings."""
        request = rgb_request(request, self.alpha_background)
        opts = _parse_options(options, _INPAINT_OPTIONS, "inpaint")
        multiple = self.pipeline.vae_scale_factor * self.pipeline.patch_size
        for i, image in enumerate(request.images):
            padded = [-(-side // multiple) * multiple for side in image.size]
            check_size(padded[1], padded[0], multiple=multiple, max_side=self.pipeline.max_image_side(),
                       what=f"images[{i}]")
        request.settings.update(num_inference_steps=opts.get("num_inference_steps", DEFAULT_STEPS),
                                cfg=opts.get("cfg", DEFAULT_GUIDANCE), negative_prompt=opts.get("negative_prompt", ""))
        return request

    def inpaint(
        self,
        images: Sequence[Image.Image],
        masks: Sequence[object],
        prompts: Sequence[str],
        *,
        seed: int | Sequence[int] | None = None,
        grow: int = DEFAULT_GROW,
        feather: int = DEFAULT_FEATHER,
        progress: bool = False,
        **options: object,
    ) -> list[Image.Image]:
        """Regenerate the masked pixels of image i (white = regenerate) from prompt i; returns same-size images.

        Text-to-image conditioning (the prompt describes the whole picture; no reference image).
        The latents outside the (grown) mask follow the source's noising trajectory at every step
        and end on it; the decoded image is pasted into the source with a `feather`-pixel fade
        inside the mask, so every pixel outside it is exactly the source's. Sizes that are not
        multiples of 16 are padded (edge pixels repeated) and cropped back.
        """
        return self.run(self.check_inpaint(images, masks, prompts, seed=seed, grow=grow, feather=feather, **options),
                        progress=progress)

    def _inpaint(self, request: CheckedInputs, progress: bool) -> list[Image.Image]:
        settings = request.settings
        generators = self._generators(request.seed, len(request.texts))
        self.pipeline.set_progress_bar_config(disable=not progress)
        multiple = self.pipeline.vae_scale_factor * self.pipeline.patch_size
        out = []
        for image, mask, prompt, generator in zip(request.images, request.masks, request.texts, generators):
            canvas, canvas_mask = pad_to_multiple(image, mask, multiple)
            result = self.pipeline.sample_checked(
                prompt,
                inpaint_sources=[canvas],
                inpaint_masks=[canvas_mask],
                height=canvas.height,
                width=canvas.width,
                num_inference_steps=settings["num_inference_steps"],
                cfg=settings["cfg"],
                negative_prompt=settings["negative_prompt"],
                generator=generator,
                feather=settings["feather"],
            ).images[0]
            out.append(result.crop((0, 0, image.width, image.height)))
        return out

    def outpaint(self, images: Sequence[Image.Image], prompts: Sequence[str], *, left: int = 0, right: int = 0,
                 top: int = 0, bottom: int = 0, **kwargs: object) -> list[Image.Image]:
        """Extend each image by the given pixels (multiples of 16) on each side, drawn from its prompt."""
        return outpaint_with(self, images, prompts, left=left, right=right, top=top, bottom=bottom, **kwargs)


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
        return self._check_caption(questions, images, seed, max_new_tokens, options)  # raises


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
        max_new_tokens: int | None = None,
        seed: int | None = None,
        **options: object,
    ) -> list[str]:
        """Answer question i about image i with Qwen2.5-VL; an empty question asks for a detailed description.

        Options: `do_sample`, `temperature` (0 = greedy), `top_p`, `top_k`; otherwise the
        checkpoint's generation config decides. `max_new_tokens=None` (the default) means 512,
        upstream's i2t default. `seed` makes sampling reproducible.
        """
        return self.run(self.check_inputs("image_to_text", questions, images, seed=seed,
                                          max_new_tokens=max_new_tokens, **options))

    def _image_to_text(self, request: CheckedInputs, progress: bool = False) -> list[str]:
        generate_kwargs = dict(request.settings)
        max_new_tokens = generate_kwargs.pop("max_new_tokens")
        device = torch.device(self.pipeline._execution_device)
        with contextlib.ExitStack() as stack:
            if request.seed is not None:  # generate() samples with the global RNG: seed it inside a fork
                devices = [device.index or 0] if device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(request.seed)
            return self.pipeline.image_to_text(request.images, request.texts, max_new_tokens=max_new_tokens,
                                               **generate_kwargs)

    def _check_caption(self, texts, images, seed, max_new_tokens, options) -> CheckedInputs:
        from unipic.unipic2.pipeline_metaquery import DEFAULT_QUESTION

        texts = check_texts(texts, "questions", allow_blank=True)  # "" = the default question
        rgb = _check_images(images, len(texts), "questions")
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        settings: dict = {"max_new_tokens": check_int(max_new_tokens, "max_new_tokens", minimum=1)}
        for key, value in options.items():
            if key not in _CAPTION_OPTIONS:
                raise UserError(f"unknown caption option {key!r} for UniPic-2; valid options: {', '.join(_CAPTION_OPTIONS)}")
            if value is not None:
                settings[key] = value
        if "temperature" in settings:
            temperature = check_number(settings["temperature"], "temperature", minimum=0.0, maximum=MAX_TEMPERATURE,
                                       hint=" (0 = greedy)")
            if temperature == 0:  # greedy decoding
                settings.pop("temperature")
                settings.update(do_sample=False, top_p=None, top_k=None)
            else:
                settings.update(temperature=temperature, do_sample=True)
        texts = [q.strip() or DEFAULT_QUESTION for q in texts]
        return CheckedInputs("image_to_text", texts, rgb, seed, 1, settings)
