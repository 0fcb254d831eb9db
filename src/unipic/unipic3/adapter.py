"""`unipic.api.UnifiedPipeline` over `UniPic3Pipeline`: checks, defaults, seeds, one call per instruction.

UniPic-3 only edits: each instruction comes with 1-6 input images (one PIL image or a list).
It has no text-to-image mode (upstream's pipeline divides by the input pixel count, so it cannot
run without an input) and no captioning; both raise `UnsupportedTaskError`.

Defaults are those of upstream's scripts: true CFG 4.0 with the negative prompt ' '; 50 Euler
steps for the base model, 8 consistency steps for CM and DMD; the output takes the first input's
budgeted size. Options: `num_inference_steps` (alias `steps`), `cfg` (alias `true_cfg_scale`;
<= 1 disables guidance), `negative_prompt`, `budget_area` (the pixel area all inputs of one
instruction share; 1024² upstream).

Seeds: an int seed gives one pair of generators that all instructions share (advancing from one
to the next, as in UniPic-2); a list gives each instruction its own. The initial noise is drawn
from a CPU generator, as upstream's `torch.manual_seed(seed)` does, and the consistency
sampler's fresh noise from a generator on the execution device seeded alike (on the CPU the
same generator), so seed s reproduces upstream's numbers without touching the global RNG.
Upstream's batch script re-seeds every item: `seed=[s] * n` does the same here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from unipic.api import CheckedInputs, Job, UnsupportedTaskError, UserError, check_texts
from unipic.checks import check_int, check_seeds, check_size, parse_diffusion_options
from unipic.images import to_rgb
from unipic.unipic3 import sizes
from unipic.unipic3.pipeline import DEFAULT_CFG, DEFAULT_NEGATIVE_PROMPT, MAX_INPUT_IMAGES

VARIANT_DEFAULTS = {  # sampler and steps of upstream's scripts and README
    "base": {"sampler": "euler", "num_inference_steps": 50},
    "cm": {"sampler": "consistency", "num_inference_steps": 8},
    "dmd": {"sampler": "consistency", "num_inference_steps": 8},
}
EDIT_OPTIONS = ("num_inference_steps", "steps", "cfg", "true_cfg_scale", "negative_prompt", "budget_area")
_ALIASES = {"steps": "num_inference_steps", "true_cfg_scale": "cfg"}
MIN_BUDGET_AREA = 32 * 32  # one 32-px cell: below it every side would snap up to 32 anyway
NO_TEXT_TO_IMAGE = ("UniPic-3 edits and composes 1 to 6 input images; it has no text-to-image mode. "
                    "Use a UniPic-1 or UniPic-2 model to generate from text")
NO_CAPTIONS = ("UniPic-3 only edits images; for captions use a UniPic2-MetaQuery folder or a UniPic-1 model")


def _parse_options(options: dict) -> dict:
    """Canonical option names -> checked values; None means default; unknown names raise `UserError`."""
    parsed = parse_diffusion_options(options, EDIT_OPTIONS, _ALIASES, family="UniPic-3", task="edit")
    if "budget_area" in parsed:
        parsed["budget_area"] = check_int(parsed["budget_area"], "budget_area", minimum=MIN_BUDGET_AREA)
    return parsed


def check_image_groups(images: object, count: int) -> list[list[Image.Image]]:
    """One list of 1-6 RGB images per instruction (an entry may be a single image); `UserError` otherwise."""
    if isinstance(images, (Image.Image, str, bytes)) or not isinstance(images, Sequence):
        raise UserError(f"images must be a list with one entry per instruction (a PIL image or a list of 1 to "
                        f"{MAX_INPUT_IMAGES}), got a {type(images).__name__}")
    images = list(images)
    if len(images) != count:
        raise UserError(f"got {len(images)} image entries for {count} instructions; give one entry per instruction "
                        f"(several images for one instruction go in a nested list: images=[[a, b]])")
    groups = []
    for i, entry in enumerate(images):
        group = [entry] if isinstance(entry, Image.Image) else entry
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise UserError(f"images[{i}] must be a PIL image or a list of PIL images, got {type(entry).__name__}")
        if not 1 <= len(group) <= MAX_INPUT_IMAGES:
            raise UserError(f"images[{i}] has {len(group)} images; UniPic-3 takes 1 to {MAX_INPUT_IMAGES} input "
                            f"images per instruction")
        groups.append([to_rgb(im, name=f"images[{i}][{j}]") for j, im in enumerate(group)])
    return groups


class UniPic3UnifiedPipeline:
    """UniPic-3 (base, CM or DMD) behind `UnifiedPipeline`: multi-image editing only.

    Args:
        pipeline: a `UniPic3Pipeline`.
        variant: "base", "cm" or "dmd": picks the sampler and the default step count.
        name: shown in the settings (the folder name).
        budget_area: default pixel budget of one instruction's inputs (None: 1024²).
    """

    family = "unipic3"

    def __init__(self, pipeline, variant: str = "base", name: str | None = None, budget_area: int | None = None):
        if variant not in VARIANT_DEFAULTS:
            raise UserError(f"variant={variant!r}: must be one of {', '.join(VARIANT_DEFAULTS)}")
        self.pipeline = pipeline
        self.variant = variant
        self.name = name or f"{self.family}-{variant}"
        self.budget_area = budget_area or sizes.BUDGET_AREA

    def sampling_defaults(self) -> dict[str, object]:
        """Defaults written into output metadata."""
        return {
            "model_family": self.family,
            "model": self.name,
            "variant": self.variant,
            **VARIANT_DEFAULTS[self.variant],
            "cfg": DEFAULT_CFG,
            "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
            "budget_area": self.budget_area,
            "max_input_images": MAX_INPUT_IMAGES,
            "output_size": "first input after the pixel budget, floored to multiples of 16",
            "scheduler": type(self.pipeline.scheduler).__name__,
        }

    def check_inputs(
        self,
        job: Job,
        texts: Sequence[str],
        images: Sequence[Image.Image | Sequence[Image.Image]] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        max_new_tokens: int | None = None,
        **options: object,
    ) -> CheckedInputs:
        """Validate an edit request and resolve its settings (`UserError` naming the argument and the fix).

        `CheckedInputs.images` holds one list of RGB images per instruction; the settings record
        each output's (width, height) under "output_sizes".
        """
        if job == "text_to_image":
            raise UnsupportedTaskError(NO_TEXT_TO_IMAGE)
        if job == "image_to_text":
            raise UnsupportedTaskError(NO_CAPTIONS)
        if job != "edit_image":
            raise UserError(f"job={job!r}: must be 'text_to_image', 'edit_image' or 'image_to_text'")
        texts = check_texts(texts, "instructions")
        seed = check_seeds(seed, len(texts), "instruction")
        if check_int(images_per_prompt, "images_per_prompt", minimum=1) != 1:
            raise UserError(f"images_per_prompt={images_per_prompt}: UniPic-3 makes one image per instruction; "
                            "repeat the instruction with other seeds for more")
        groups = check_image_groups(images, len(texts))
        opts = _parse_options(options)
        if (height is None) != (width is None):
            raise UserError("give both height and width, or neither (the output then takes the first input's size)")
        if height is not None:
            check_size(height, "height")
            check_size(width, "width")
        sampler = VARIANT_DEFAULTS[self.variant]["sampler"]
        steps = opts.get("num_inference_steps", VARIANT_DEFAULTS[self.variant]["num_inference_steps"])
        if sampler == "euler" and steps < 2 and self.pipeline.scheduler.config.get("shift_terminal"):
            # One sigma equals the terminal one, and the stretch to shift_terminal divides by zero (NaN).
            raise UserError(f"num_inference_steps={steps}: the base model's schedule needs at least 2 steps")
        budget_area = opts.get("budget_area", self.budget_area)
        output_sizes = [list(sizes.output_size(sizes.budget_sizes([im.size for im in group], budget_area),
                                               height, width)) for group in groups]
        settings = {
            "variant": self.variant,
            "sampler": sampler,
            "num_inference_steps": steps,
            "cfg": opts.get("cfg", DEFAULT_CFG),
            "negative_prompt": opts.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT),
            "budget_area": budget_area,
            "output_sizes": output_sizes,
        }
        if height is not None:
            settings.update(height=height, width=width)
        return CheckedInputs("edit_image", texts, groups, seed, 1, settings)

    def _generators(self, seed: int | list[int] | None,
                    count: int) -> list[tuple[torch.Generator | None, torch.Generator | None]]:
        """(noise, step-noise) generators per instruction; an int seed shares one pair across all."""
        def pair(value: int | None) -> tuple[torch.Generator | None, torch.Generator | None]:
            if value is None:
                return None, None
            noise = torch.Generator("cpu").manual_seed(value)  # upstream: torch.manual_seed(seed), a CPU generator
            device = torch.device(self.pipeline._execution_device)
            # Upstream's step noise comes from the global RNG of the latents' device, seeded by the same call.
            step = noise if device.type == "cpu" else torch.Generator(device).manual_seed(value)
            return noise, step

        if isinstance(seed, list):
            return [pair(s) for s in seed]
        return [pair(seed)] * count

    def edit_image(
        self,
        images: Sequence[Image.Image | Sequence[Image.Image]],
        instructions: Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] | None = None,
        progress: bool = False,
        **options: object,
    ) -> list[Image.Image]:
        """Apply instruction i to its 1-6 input images (`images[i]`: one image or a list); one output each.

        Instructions run one after another (their inputs differ in number and size). Inputs of any
        mode are converted to RGB (transparency composited on white).
        """
        return self.run(self.check_inputs("edit_image", instructions, images, height=height, width=width,
                                          seed=seed, **options), progress=progress)

    def run(self, request: CheckedInputs, *, progress: bool = False) -> list[Image.Image]:
        """Sample a checked edit request (`check_inputs`) without checking it again."""
        if request.job != "edit_image":
            raise UnsupportedTaskError(NO_CAPTIONS if request.job == "image_to_text" else NO_TEXT_TO_IMAGE)
        settings = request.settings
        height, width = settings.get("height"), settings.get("width")
        self.pipeline.set_progress_bar_config(disable=not progress)
        edited = []
        for group, instruction, (noise, step) in zip(request.images, request.texts,
                                                     self._generators(request.seed, len(request.texts))):
            result = self.pipeline(
                group,
                instruction,
                negative_prompt=settings["negative_prompt"],
                true_cfg_scale=settings["cfg"],
                height=height,
                width=width,
                num_inference_steps=settings["num_inference_steps"],
                sampler=settings["sampler"],
                generator=noise,
                step_generator=step,
                budget_area=settings["budget_area"],
            ).images[0]
            edited.append(result)
        return edited

    def text_to_image(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
                      images_per_prompt: int = 1, seed: int | Sequence[int] | None = None, progress: bool = False,
                      **options: object) -> list[list[Image.Image]]:
        """Not available: UniPic-3 needs at least one input image."""
        raise UnsupportedTaskError(NO_TEXT_TO_IMAGE)

    def image_to_text(self, images: Sequence[Image.Image], questions: Sequence[str], *, max_new_tokens: int = 256,
                      seed: int | None = None, **options: object) -> list[str]:
        """Not available: UniPic-3 does not caption."""
        raise UnsupportedTaskError(NO_CAPTIONS)
