"""`UniPicPipeline`: UniPic-1's three jobs behind the `unipic.api.UnifiedPipeline` interface.

Validates inputs (raising `UserError` with the fix), turns PIL images into tensors and back, seeds a
`torch.Generator` on the model's device, and batches prompts. The numerical work lives in
`unipic.sampling.{text_to_image, edit, image_to_text}`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from unipic.api import UserError, check_seeds, check_texts
from unipic.sampling.edit import edit_images
from unipic.sampling.image_to_text import answer_questions
from unipic.sampling.prompts import center_crop_resize, images_to_tensor, pad_to_square, tensor_to_images
from unipic.sampling.rng import GeneratorGroups
from unipic.sampling.text_to_image import generate_images

_T2I_OPTIONS = {"num_iter", "steps", "cfg", "cfg_schedule", "temperature", "head_steps", "batch_size"}
_I2T_OPTIONS = {"do_sample", "temperature", "top_p", "batch_size"}


def _check_options(options: dict, allowed: set[str], job: str) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"unknown {job} option(s) {unknown}; valid: {sorted(allowed)}")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded with `seed` (or from OS entropy when None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def _row_generators(seeds: list[int], owners: list[int], device: torch.device,
                    cache: dict[int, torch.Generator]) -> GeneratorGroups:
    """Groups for a slice of rows: consecutive rows of one prompt share that prompt's generator."""
    generators: list[torch.Generator] = []
    rows: list[int] = []
    for index, owner in enumerate(owners):
        if index and owner == owners[index - 1]:
            rows[-1] += 1
            continue
        if owner not in cache:
            cache[owner] = make_generator(seeds[owner], device)
        generators.append(cache[owner])
        rows.append(1)
    return GeneratorGroups(generators, rows)


class UniPicPipeline:
    """Text-to-image, editing and image-to-text for a loaded `UniPic` model and its tokenizer."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config

    # --- shared -----------------------------------------------------------------------------

    def sampling_defaults(self) -> dict[str, object]:
        """The model's default sampling settings (from its config.json)."""
        s = self.config.sampling
        return {"size": s.image_size, "num_iter": s.num_iter, "cfg": s.cfg, "cfg_schedule": s.cfg_schedule,
                "temperature": s.temperature, "edit_cfg": s.edit_cfg, "edit_temperature": s.edit_temperature,
                "head_steps": s.head_steps or self.config.head.num_sampling_steps}

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.config.sampling.image_size
        height = default if height is None else int(height)
        width = default if width is None else int(width)
        stride = self.config.pixel_stride
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % stride:
                raise UserError(f"{name}={value} must be a positive multiple of {stride} (e.g. {default})")
        return height, width

    def _mar_options(self, options: dict, *, cfg_default: float, temperature_default: float) -> dict:
        s = self.config.sampling
        num_iter = int(options.get("num_iter", options.get("steps", s.num_iter)))
        cfg = float(options.get("cfg", cfg_default))
        schedule = options.get("cfg_schedule", s.cfg_schedule)
        temperature = float(options.get("temperature", temperature_default))
        head_steps = options.get("head_steps", s.head_steps)
        if num_iter < 1:
            raise UserError(f"steps={num_iter} must be at least 1")
        if schedule not in ("constant", "linear"):
            raise UserError(f"cfg_schedule={schedule!r} must be 'constant' or 'linear'")
        if temperature < 0:
            raise UserError(f"temperature={temperature} must be >= 0")
        if head_steps is not None and int(head_steps) < 1:
            raise UserError(f"head_steps={head_steps} must be at least 1")
        return {"num_iter": num_iter, "cfg": cfg, "cfg_schedule": schedule, "temperature": temperature,
                    "head_steps": None if head_steps is None else int(head_steps)}

    def _check_grid(self, height: int, width: int, num_iter: int) -> None:
        tokens = (height // self.config.pixel_stride) * (width // self.config.pixel_stride)
        if num_iter > tokens:
            raise UserError(f"steps={num_iter} exceeds the {tokens} image tokens of a {height}x{width} image")

    # --- text to image ----------------------------------------------------------------------

    def text_to_image(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
                      images_per_prompt: int = 1, seed: int | Sequence[int] | None = None, progress: bool = False,
                      **options: object) -> list[list[Image.Image]]:
        """Generate `images_per_prompt` images per prompt (one list per prompt).

        `seed` may be a list with one seed per prompt: each prompt's images then come from its own
        generator, so they equal the same prompt generated alone with that seed, whatever else
        shares the batch (up to floating-point rounding of the batched arithmetic).
        """
        _check_options(options, _T2I_OPTIONS, "text-to-image")
        prompts = check_texts(prompts, "prompts")
        seeds = check_seeds(seed, len(prompts), "prompt")
        if images_per_prompt < 1:
            raise UserError(f"images_per_prompt={images_per_prompt} must be at least 1")
        height, width = self._size(height, width)
        settings = self._mar_options(options, cfg_default=self.config.sampling.cfg,
                                     temperature_default=self.config.sampling.temperature)
        self._check_grid(height, width, settings["num_iter"])
        batch_size = int(options.get("batch_size", 8))
        expanded = [p for p in prompts for _ in range(images_per_prompt)]
        owners = [i for i in range(len(prompts)) for _ in range(images_per_prompt)]
        generator = None if seeds is not None else make_generator(seed, self.model.device)
        per_prompt: dict[int, torch.Generator] = {}
        images: list[Image.Image] = []
        batches = range(0, len(expanded), batch_size)
        for start in tqdm(batches, disable=not progress or len(batches) == 1, desc="batches"):
            if seeds is not None:
                generator = _row_generators(seeds, owners[start:start + batch_size], self.model.device, per_prompt)
            pixels = generate_images(self.model, self.tokenizer, expanded[start:start + batch_size], height=height,
                                     width=width, generator=generator, progress=progress, **settings)
            images.extend(tensor_to_images(pixels))
        return [images[i * images_per_prompt:(i + 1) * images_per_prompt] for i in range(len(prompts))]

    # --- editing ----------------------------------------------------------------------------

    def edit_image(self, images: Sequence[Image.Image], instructions: Sequence[str], *,
                   height: int | None = None, width: int | None = None, seed: int | Sequence[int] | None = None,
                   progress: bool = False, **options: object) -> list[Image.Image]:
        """Edit image i by instruction i; sources are centre-cropped to the output aspect and resized.

        `seed` may be a list with one seed per pair, which makes each edit independent of the others
        in the batch (see `text_to_image`).
        """
        _check_options(options, _T2I_OPTIONS, "edit")
        instructions = check_texts(instructions, "instructions")
        seeds = check_seeds(seed, len(instructions), "instruction")
        images = list(images)
        if len(images) != len(instructions):
            raise UserError(f"got {len(images)} images but {len(instructions)} instructions; give one each")
        height, width = self._size(height, width)
        s = self.config.sampling
        settings = self._mar_options(options, cfg_default=s.edit_cfg, temperature_default=s.edit_temperature)
        self._check_grid(height, width, settings["num_iter"])
        batch_size = int(options.get("batch_size", 8))
        generator = None if seeds is not None else make_generator(seed, self.model.device)
        per_pair: dict[int, torch.Generator] = {}
        outputs: list[Image.Image] = []
        for start in range(0, len(images), batch_size):
            if seeds is not None:
                owners = list(range(start, min(start + batch_size, len(images))))
                generator = _row_generators(seeds, owners, self.model.device, per_pair)
            sources = [center_crop_resize(im, height, width) for im in images[start:start + batch_size]]
            pixels = edit_images(self.model, self.tokenizer, images_to_tensor(sources, self.model.device),
                                 instructions[start:start + batch_size], generator=generator, progress=progress,
                                 **settings)
            outputs.extend(tensor_to_images(pixels))
        return outputs

    # --- image to text ----------------------------------------------------------------------

    def image_to_text(self, images: Sequence[Image.Image], questions: Sequence[str], *,
                      max_new_tokens: int | None = None, seed: int | None = None, **options: object) -> list[str]:
        """Answer question i about image i (greedy by default; `do_sample=True` samples)."""
        _check_options(options, _I2T_OPTIONS, "image-to-text")
        questions = check_texts(questions, "questions")
        images = list(images)
        if len(images) != len(questions):
            raise UserError(f"got {len(images)} images but {len(questions)} questions; give one each")
        max_new_tokens = int(max_new_tokens or self.config.sampling.max_new_tokens)
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} must be at least 1")
        size = self.config.sampling.understanding_image_size
        batch_size = int(options.pop("batch_size", 8))
        answers: list[str] = []
        # transformers' sampling draws from the global RNG; fork it so a seed does not leak out.
        with torch.random.fork_rng(devices=[self.model.device] if self.model.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(int(seed))
            for start in range(0, len(images), batch_size):
                batch = [pad_to_square(im).resize((size, size), Image.BICUBIC)
                         for im in images[start:start + batch_size]]
                answers.extend(answer_questions(self.model, self.tokenizer,
                                                images_to_tensor(batch, self.model.device),
                                                questions[start:start + batch_size],
                                                max_new_tokens=max_new_tokens, **options))
        return answers


