"""`UniPicPipeline`: UniPic-1's three jobs behind the `unipic.api.UnifiedPipeline` interface, plus
inpainting and outpainting.

Validates inputs (raising `UserError` with the fix), turns PIL images into tensors and back, seeds a
`torch.Generator` on the model's device (one per prompt for a seed list), and batches prompts. The numerical work lives in
`unipic.unipic1.sampling.{text_to_image, edit, inpaint, image_to_text}`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from unipic.api import CheckedInputs, Job, UserError, check_texts
from unipic.checks import (
    MAX_CFG,
    MAX_TEMPERATURE,
    available_memory,
    check_choice,
    check_image_list,
    check_int,
    check_number,
    check_seed,
    check_seeds,
    check_size,
    gib,
)
from unipic.images import aspect_size, to_rgb
from unipic.inpainting import (
    DEFAULT_FEATHER,
    DEFAULT_GROW,
    check_inpaint_request,
    composite,
    feather_alpha,
    outpaint_with,
    pad_to_multiple,
    rgb_request,
    token_grid_mask,
)
from unipic.unipic1.sampling.diffusion import HEAD_SOLVERS
from unipic.unipic1.sampling.edit import edit_images
from unipic.unipic1.sampling.image_to_text import answer_questions
from unipic.unipic1.sampling.inpaint import inpaint_images
from unipic.unipic1.sampling.mar_decode import SpeedOptions
from unipic.unipic1.sampling.prompts import (
    center_crop_resize,
    edit_user_text,
    format_instruction,
    images_to_tensor,
    pad_to_square,
    tensor_to_images,
)
from unipic.unipic1.sampling.rng import GeneratorGroups
from unipic.unipic1.sampling.text_to_image import generate_images

_T2I_OPTIONS = {"num_iter", "steps", "cfg", "cfg_schedule", "temperature", "head_steps", "batch_size", "fast",
                "head_anneal", "guidance_interval", "uncond_interval", "head_solver"}
# `fast=True` (training-free; benchmarks/sampling.py measures speed and --quality-gate quality,
# docs/sampling.md has the numbers): half the MAR steps (unless `steps` is given), the head sampled
# by DPM-Solver++(2M) in FAST_SOLVER_HEAD_STEPS steps (unless `head_steps` / `head_solver` are given;
# with head_solver="ddpm": half the head steps, DiSA-style annealed to FAST_HEAD_ANNEAL of them at
# the last MAR step), and LazyMAR-style condition caching: the unconditional rows through MAR + LLM
# every FAST_UNCOND_INTERVAL-th MAR step. Guidance caching inside the head (`guidance_interval`) stays
# off: measured on CPU it made the embedded model slower (the head is latency-bound, so halving its
# rows saves nothing). Each part can be switched off alone: steps=..., head_solver="ddpm",
# head_steps=..., head_anneal=1, uncond_interval=1.
FAST_STEPS_FRACTION = 0.5
FAST_HEAD_SOLVER = "dpm++2m"
FAST_SOLVER_HEAD_STEPS = 8
FAST_HEAD_STEPS_FRACTION = 0.5
FAST_HEAD_ANNEAL = 0.2
FAST_GUIDANCE_INTERVAL = 1
FAST_UNCOND_INTERVAL = 2
_I2T_OPTIONS = {"do_sample", "temperature", "top_p", "batch_size"}
DEFAULT_BATCH_SIZE = 8
# Transparent input pixels are composited onto the Shapes world's flat grey background
# (docs/world.md), which is also the neutral grey the understanding path pads with.
ALPHA_BACKGROUND = (128, 128, 128)


def _check_options(options: dict, allowed: set[str], job: str) -> dict:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"unknown {job} option(s) {unknown}; valid: {sorted(allowed)}")
    # None means "the default", as for the UniPic-2 adapters (callers pass optional settings through).
    return {key: value for key, value in options.items() if value is not None}


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

    alpha_background = ALPHA_BACKGROUND  # transparent input pixels are composited onto this

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
                "head_steps": s.head_steps or self.config.head.num_sampling_steps, "caption_question": s.caption_prompt}

    def check_inputs(self, job: Job, texts: Sequence[str], images: Sequence[Image.Image] | None = None, *,
                     height: int | None = None, width: int | None = None, images_per_prompt: int = 1,
                     seed: int | Sequence[int] | None = None, max_new_tokens: int | None = None,
                     **options: object) -> CheckedInputs:
        """Validate one request and resolve its settings; every public method calls this first.

        Raises `UserError` naming the argument, the bad value and the fix. The returned settings
        are exactly what sampling uses (defaults filled in, `num_iter`/`steps` merged into `steps`).
        An edit without height and width keeps each source's aspect ratio at the model's resolution
        (`unipic.images.aspect_size`, the one rule every front end gets here); `sizes` holds every
        edit's output size.
        """
        what = {"text_to_image": "prompts", "edit_image": "instructions", "image_to_text": "questions"}.get(job)
        if what is None:
            raise UserError(f"job={job!r}: must be 'text_to_image', 'edit_image' or 'image_to_text'")
        texts = check_texts(texts, what)
        # Generation and editing take one seed per text too; answering forks one RNG per call.
        seed = check_seed(seed) if job == "image_to_text" else check_seeds(seed, len(texts), what[:-1])
        rgb = None
        if job != "text_to_image":
            rgb = [to_rgb(im, ALPHA_BACKGROUND, name=f"images[{i}]")
                   for i, im in enumerate(check_image_list(images, "images", len(texts), what))]
        if job == "image_to_text":
            settings = self._i2t_settings(_check_options(options, _I2T_OPTIONS, "image-to-text"), max_new_tokens)
            self._check_i2t_positions(texts, settings["max_new_tokens"])
            return CheckedInputs(job, texts, rgb, seed, 1, settings)
        images_per_prompt = check_int(images_per_prompt, "images_per_prompt", minimum=1)
        sizes = None
        if job == "edit_image" and height is None and width is None:
            side, stride = self.config.sampling.image_size, self.config.pixel_stride
            sizes = [aspect_size(im.width, im.height, side, stride) for im in rgb]
        settings = self._mar_settings(_check_options(options, _T2I_OPTIONS, job.replace("_", "-")), job,
                                      sorted(set(sizes)) if sizes else [(height, width)],
                                      rows=len(texts) * images_per_prompt, texts=texts)
        if job == "edit_image" and sizes is None:
            sizes = [(settings["height"], settings["width"])] * len(texts)
        return CheckedInputs(job, texts, rgb, seed, images_per_prompt, settings, sizes=sizes)

    def _mar_settings(self, options: dict, job: str, sizes: list[tuple[object, object]], *, rows: int,
                      texts: list[str]) -> dict:
        """Every sampling setting, each checked once, for outputs of the given (height, width) sizes.

        Each distinct size must fit the model's positions (with every text) and memory (`rows` images
        at once, up to the batch size). One size is recorded as height/width; several (edits of
        differently shaped sources, inpainting) are left out: each output has its own.
        """
        s = self.config.sampling
        editing = job == "edit_image"
        stride = self.config.pixel_stride
        checked = []
        for height, width in sizes:
            checked.append(tuple(check_size(s.image_size if value is None else value, name, stride,
                                            example=s.image_size)
                                 for name, value in (("height", height), ("width", width))))
        # The smallest image bounds the steps: each step reveals at least one of its tokens.
        small_h, small_w = min(checked, key=lambda hw: hw[0] * hw[1])
        size = {"height": small_h, "width": small_w}
        if "num_iter" in options and "steps" in options and options["num_iter"] != options["steps"]:
            raise UserError(f"num_iter={options['num_iter']} and steps={options['steps']} are one setting; pass one")
        fast = options.get("fast", False)
        if not isinstance(fast, bool):
            raise UserError(f"fast={fast!r}: must be True (training-free shortcuts) or False (the exact sampler)")
        tokens = (size["height"] // stride) * (size["width"] // stride)
        default_steps = max(1, round(s.num_iter * FAST_STEPS_FRACTION)) if fast else s.num_iter
        if "steps" not in options and "num_iter" not in options and default_steps > tokens:
            # The size is what the user chose here, not the steps: name it (the CLI's --size).
            side = stride * math.ceil(math.sqrt(default_steps))
            raise UserError(f"size {size['width']}x{size['height']} is too small: it holds {tokens} token(s), fewer "
                            f"than this model's {default_steps} sampling steps; ask for a size of at least "
                            f"{side}x{side} (--size {side}), or for {tokens} step(s)")
        steps = check_int(options.get("steps", options.get("num_iter", default_steps)), "steps",
                          minimum=1, maximum=tokens,
                          hint=f" (a {size['height']}x{size['width']} image has {tokens} tokens)")
        cfg = check_number(options.get("cfg", s.edit_cfg if editing else s.cfg), "cfg", minimum=0.0,
                           maximum=MAX_CFG, hint=" (1 = no guidance)")
        temperature = check_number(options.get("temperature", s.edit_temperature if editing else s.temperature),
                                   "temperature", minimum=0.0, maximum=MAX_TEMPERATURE)
        head_solver = check_choice(options.get("head_solver", FAST_HEAD_SOLVER if fast else "ddpm"), "head_solver",
                                   HEAD_SOLVERS)
        solver = head_solver != "ddpm"
        default_head_steps = s.head_steps or self.config.head.num_sampling_steps
        if fast:
            default_head_steps = (min(FAST_SOLVER_HEAD_STEPS, default_head_steps) if solver
                                  else max(1, round(default_head_steps * FAST_HEAD_STEPS_FRACTION)))
        head_steps = check_int(options.get("head_steps", default_head_steps),
                               "head_steps", minimum=1, maximum=self.config.head.train_steps - solver,
                               hint=" (the head's training steps)")
        settings = {"height": None, "width": None, "steps": steps, "cfg": cfg,
                    "cfg_schedule": check_choice(options.get("cfg_schedule", s.cfg_schedule), "cfg_schedule",
                                                 ("constant", "linear")),
                    "temperature": temperature, "head_steps": head_steps, "fast": fast,
                    "head_solver": head_solver,
                    "head_anneal": check_number(options.get("head_anneal",
                                                            FAST_HEAD_ANNEAL if fast and not solver else 1.0),
                                                "head_anneal", minimum=0.0, maximum=1.0, above_minimum=True,
                                                hint=" (1 = every MAR step runs all head steps)"),
                    "guidance_interval": check_int(options.get("guidance_interval",
                                                               FAST_GUIDANCE_INTERVAL if fast else 1),
                                                   "guidance_interval", minimum=1, maximum=head_steps,
                                                   hint=" (1 = unconditional rows at every head step)"),
                    "uncond_interval": check_int(options.get("uncond_interval",
                                                             min(FAST_UNCOND_INTERVAL, steps) if fast else 1),
                                                 "uncond_interval", minimum=1, maximum=steps,
                                                 hint=" (1 = unconditional rows through MAR and the LLM at every step)"),
                    "batch_size": check_int(options.get("batch_size", DEFAULT_BATCH_SIZE), "batch_size", minimum=1)}
        for height, width in sorted(set(checked)):
            self._check_positions(job, texts, height, width)
            self._check_memory(height, width, min(settings["batch_size"], rows))
        if len(set(checked)) == 1:
            settings["height"], settings["width"] = checked[0]
        else:
            del settings["height"], settings["width"]
        return settings

    def _i2t_settings(self, options: dict, max_new_tokens: object) -> dict:
        limit = self.config.sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
        settings: dict[str, object] = {"max_new_tokens": check_int(limit, "max_new_tokens", minimum=1)}
        do_sample = options.get("do_sample", False)
        if not isinstance(do_sample, bool):
            raise UserError(f"do_sample={do_sample!r}: must be True or False")
        settings["do_sample"] = do_sample
        if not do_sample:
            given = sorted(k for k in ("temperature", "top_p") if k in options)
            if given:
                raise UserError(f"{given[0]}={options[given[0]]!r} applies only when sampling; "
                                "pass do_sample=True or leave it out")
        else:
            settings["temperature"] = check_number(options.get("temperature", 1.0), "temperature", minimum=0.0,
                                                   above_minimum=True, maximum=MAX_TEMPERATURE,
                                                   hint=" when sampling (greedy decoding: do_sample=False)")
            settings["top_p"] = check_number(options.get("top_p", 1.0), "top_p", minimum=0.0, above_minimum=True,
                                             maximum=1.0)
        settings["batch_size"] = check_int(options.get("batch_size", DEFAULT_BATCH_SIZE), "batch_size", minimum=1)
        return settings

    def _prompt_tokens(self, text: str) -> int:
        formatted = format_instruction(self.config.prompt_template, text)
        return len(self.tokenizer(formatted, add_special_tokens=False)["input_ids"])

    def _check_positions(self, job: str, texts: list[str], height: int, width: int) -> None:
        """The LLM sees prompt + (source image) + generated image rows; all must fit its positions."""
        s = self.config.sampling
        stride, buffers = self.config.pixel_stride, self.config.mar.buffer_size
        limit = self.config.llm.max_position_embeddings
        image_rows = (height // stride) * (width // stride) + buffers
        editing = job == "edit_image"
        per_image = 2 if editing else 1  # an edit also holds the source image's rows in its prompt

        def text_tokens(text: str) -> int:
            # Prompt tokens besides image rows (the single <image> placeholder is not counted).
            if editing:
                return self._prompt_tokens(edit_user_text(self.config, text)) - 1
            return self._prompt_tokens(s.t2i_prompt.format(prompt=text))

        lengths = [text_tokens(t.strip()) for t in texts]
        null_length = (self._prompt_tokens(edit_user_text(self.config, s.edit_cfg_prompt)) - 1 if editing
                       else self._prompt_tokens(s.cfg_prompt))
        shortest = min(lengths + [null_length])
        if shortest + per_image * image_rows > limit:
            # Even the shortest prompt does not fit: the size is the problem, not the text.
            side = math.isqrt(max((limit - shortest) // per_image - buffers, 0)) * stride
            twice = " twice (source and output)" if editing else ""
            raise UserError(f"height={height}, width={width}: a {height}x{width} image takes {image_rows} of the "
                            f"model's {limit} positions{twice}; the largest square size it can draw is {side}")
        what = "instructions" if editing else "prompts"
        for index, length in enumerate(lengths):
            if length + per_image * image_rows > limit:
                own = len(self.tokenizer(texts[index].strip(), add_special_tokens=False)["input_ids"])
                allowed = limit - per_image * image_rows - (length - own)
                raise UserError(f"{what}[{index}] is too long: {own} tokens, but with a {height}x{width} image the "
                                f"model's {limit} positions leave room for {allowed}; shorten it or use a smaller size")

    def _check_i2t_positions(self, texts: list[str], max_new_tokens: int) -> None:
        size = self.config.sampling.understanding_image_size
        image_rows = self.model.num_understanding_tokens(size)
        limit = self.config.llm.max_position_embeddings
        for index, text in enumerate(texts):
            length = self._prompt_tokens(f"{self.config.image_token}\n{text.strip()}") - 1 + image_rows
            if length + max_new_tokens > limit:
                room = limit - length
                if room < 1:
                    raise UserError(f"questions[{index}] is too long: with the image it needs {length} positions but "
                                    f"the model has {limit}; shorten the question")
                raise UserError(f"max_new_tokens={max_new_tokens}: with questions[{index}] and the image only {room} "
                                f"new tokens fit in the model's {limit} positions; use max_new_tokens={room} or less")

    def _check_memory(self, height: int, width: int, rows: int) -> None:
        """Refuse before allocating when the VAE decoder's full-resolution activations cannot fit.

        That tensor pair (input and output of one full-resolution convolution) is unavoidable, so
        the estimate is a lower bound: a refusal means the request cannot run on this device.
        """
        vae = self.config.vae
        channels = vae.ch * vae.ch_mult[0]
        element = torch.finfo(self.model.vae_dtype).bits // 8
        needed = 2 * rows * channels * height * width * element
        free = available_memory(self.model.device)
        if free is not None and needed > free:
            side = math.isqrt(free // (2 * rows * channels * element))
            side -= side % self.config.pixel_stride
            raise UserError(f"height={height}, width={width}: decoding {rows} image(s) of {height}x{width} needs at "
                            f"least {gib(needed)} but {self.model.device.type} has {gib(free)} free; the largest "
                            f"square size that fits is about {side} (fewer at once: batch_size=1)")

    @staticmethod
    def _check_finite(pixels: torch.Tensor, settings: dict) -> None:
        """A non-finite sample would be saved as a black image: report it instead."""
        if not bool(torch.isfinite(pixels).all()):
            raise UserError(f"sampling produced non-finite pixels with cfg={settings['cfg']}, "
                            f"temperature={settings['temperature']}; lower cfg/temperature or use dtype float32")

    # --- text to image ----------------------------------------------------------------------

    @staticmethod
    def _sampler_kwargs(settings: dict) -> dict:
        return {"steps": settings["steps"], "cfg": settings["cfg"], "cfg_schedule": settings["cfg_schedule"],
                "temperature": settings["temperature"], "head_steps": settings["head_steps"],
                "speed": SpeedOptions(head_anneal=settings["head_anneal"],
                                      guidance_interval=settings["guidance_interval"],
                                      uncond_interval=settings["uncond_interval"],
                                      head_solver=settings.get("head_solver", "ddpm"))}

    def text_to_image(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
                      images_per_prompt: int = 1, seed: int | Sequence[int] | None = None, progress: bool = False,
                      **options: object) -> list[list[Image.Image]]:
        """Generate `images_per_prompt` images per prompt (one list per prompt).

        `seed` may be a list with one seed per prompt: each prompt's images then come from its own
        generator, so they equal the same prompt generated alone with that seed, whatever else
        shares the batch (up to floating-point rounding of the batched arithmetic).
        """
        return self.run(self.check_inputs("text_to_image", prompts, height=height, width=width,
                                          images_per_prompt=images_per_prompt, seed=seed, **options),
                        progress=progress)

    def run(self, request: CheckedInputs, *, progress: bool = False) -> list:
        """Sample a checked request (`check_inputs` or `check_inpaint`) without checking it again."""
        job = {"text_to_image": self._text_to_image, "edit_image": self._edit_image, "inpaint": self._inpaint,
               "image_to_text": self._image_to_text}.get(request.job)
        if job is None:
            raise ValueError(f"unknown job {request.job!r} in a checked request")
        return job(request, progress)

    def _text_to_image(self, request: CheckedInputs, progress: bool) -> list[list[Image.Image]]:
        settings, per_prompt = request.settings, request.images_per_prompt
        batch_size = settings["batch_size"]
        expanded = [p for p in request.texts for _ in range(per_prompt)]
        owners = [i for i in range(len(request.texts)) for _ in range(per_prompt)]
        seeds = request.seed if isinstance(request.seed, list) else None
        generator = None if seeds is not None else make_generator(request.seed, self.model.device)
        generators: dict[int, torch.Generator] = {}
        images: list[Image.Image] = []
        batches = range(0, len(expanded), batch_size)
        for start in tqdm(batches, disable=not progress or len(batches) == 1, desc="batches"):
            if seeds is not None:
                generator = _row_generators(seeds, owners[start:start + batch_size], self.model.device, generators)
            pixels = generate_images(self.model, self.tokenizer, expanded[start:start + batch_size],
                                     height=settings["height"], width=settings["width"], generator=generator,
                                     progress=progress, **self._sampler_kwargs(settings))
            self._check_finite(pixels, settings)
            images.extend(tensor_to_images(pixels))
        return [images[i * per_prompt:(i + 1) * per_prompt] for i in range(len(request.texts))]

    # --- editing ----------------------------------------------------------------------------

    def edit_image(self, images: Sequence[Image.Image], instructions: Sequence[str], *,
                   height: int | None = None, width: int | None = None, seed: int | Sequence[int] | None = None,
                   progress: bool = False, **options: object) -> list[Image.Image]:
        """Edit image i by instruction i; sources are centre-cropped to the output aspect and resized.

        `seed` may be a list with one seed per pair, which makes each edit independent of the others
        in the batch (see `text_to_image`).
        """
        return self.run(self.check_inputs("edit_image", instructions, images, height=height, width=width, seed=seed,
                                          **options), progress=progress)

    def _edit_image(self, request: CheckedInputs, progress: bool) -> list[Image.Image]:
        settings = request.settings
        batch_size = settings["batch_size"]
        seeds = request.seed if isinstance(request.seed, list) else None
        generator = None if seeds is not None else make_generator(request.seed, self.model.device)
        generators: dict[int, torch.Generator] = {}
        outputs: list[Image.Image | None] = [None] * len(request.images)
        # A batch holds edits of one output size (each source's own when no size was given).
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(request.sizes):
            groups.setdefault(size, []).append(index)
        for (height, width), members in groups.items():
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                if seeds is not None:
                    generator = _row_generators(seeds, rows, self.model.device, generators)
                sources = [center_crop_resize(request.images[r], height, width) for r in rows]
                pixels = edit_images(self.model, self.tokenizer, images_to_tensor(sources, self.model.device),
                                     [request.texts[r] for r in rows], generator=generator, progress=progress,
                                     **self._sampler_kwargs(settings))
                self._check_finite(pixels, settings)
                for row, image in zip(rows, tensor_to_images(pixels)):
                    outputs[row] = image
        return outputs  # type: ignore[return-value]

    # --- inpainting -------------------------------------------------------------------------

    def check_inpaint(self, images: Sequence[Image.Image], masks: Sequence[object], prompts: Sequence[str], *,
                      seed: int | Sequence[int] | None = None, grow: int = DEFAULT_GROW,
                      feather: int = DEFAULT_FEATHER, **options: object) -> CheckedInputs:
        """Validate an inpainting request and resolve its settings (`UserError` naming the argument).

        Each image keeps its size (padded internally to the token stride); every distinct size must
        fit the model's positions and memory, as for text-to-image.
        """
        return self.inpaint_settings(check_inpaint_request(images, masks, prompts, seed=seed, grow=grow,
                                                           feather=feather), **options)

    def inpaint_settings(self, request: CheckedInputs, **options: object) -> CheckedInputs:
        """Complete a model-free `check_inpaint_request`: RGB images and the sampling settings."""
        request = rgb_request(request, ALPHA_BACKGROUND)
        options = _check_options(options, _T2I_OPTIONS, "inpaint")
        stride = self.config.pixel_stride
        sizes = sorted({(-(-im.height // stride) * stride, -(-im.width // stride) * stride) for im in request.images})
        settings = self._mar_settings(options, "text_to_image", sizes, rows=len(request.texts), texts=request.texts)
        settings.pop("height", None)  # each output has its source's size
        settings.pop("width", None)
        # Each image reveals its masked tokens, at least one per step: `steps` is capped per image at
        # its masked-token count, and the record says the steps each image really took.
        settings["steps_used"] = [min(settings["steps"], int(token_grid_mask(pad_to_multiple(image, mask, stride)[1],
                                                                              stride).sum()))
                                  for image, mask in zip(request.images, request.masks)]
        request.settings.update(settings)
        return request

    def inpaint(self, images: Sequence[Image.Image], masks: Sequence[object], prompts: Sequence[str], *,
                seed: int | Sequence[int] | None = None, grow: int = DEFAULT_GROW, feather: int = DEFAULT_FEATHER,
                progress: bool = False, **options: object) -> list[Image.Image]:
        """Regenerate the masked pixels of image i (white = regenerate) so that it matches prompt i.

        The mask is grown by `grow` pixels and reduced to the token grid (a token is regenerated
        when any of its pixels is masked); the other tokens are the source's, visible from the
        first MAR step, and only the masked ones are revealed, over `steps` steps (at most one per
        masked token). The decoded image is pasted into the source with a `feather`-pixel fade
        inside the mask, so every pixel outside the grown mask is exactly the source's. Any size
        the model can generate works (other sizes are padded to the 16-pixel stride and cropped
        back). Images are batched with others of the same size and masked-token count; a seed
        list gives each image its own generator, so its result does not depend on the batch.
        """
        return self.run(self.check_inpaint(images, masks, prompts, seed=seed, grow=grow, feather=feather, **options),
                        progress=progress)

    def _inpaint(self, request: CheckedInputs, progress: bool) -> list[Image.Image]:
        settings = request.settings
        stride, device = self.config.pixel_stride, self.model.device
        canvases, canvas_masks, token_masks = [], [], []
        for image, mask in zip(request.images, request.masks):
            canvas, canvas_mask = pad_to_multiple(image, mask, stride)
            canvases.append(canvas)
            canvas_masks.append(canvas_mask)
            token_masks.append(torch.from_numpy(token_grid_mask(canvas_mask, stride).reshape(-1)))  # (h·w,)
        # The MAR encoder keeps only visible tokens, so a batch holds images of one size and one
        # masked-token count (they then reveal the same number of tokens at every step).
        groups: dict[tuple[int, int, int], list[int]] = {}
        for index, (canvas, tokens) in enumerate(zip(canvases, token_masks)):
            groups.setdefault((canvas.height, canvas.width, int(tokens.sum())), []).append(index)
        seeds = request.seed if isinstance(request.seed, list) else None
        generator = None if seeds is not None else make_generator(request.seed, device)
        generators: dict[int, torch.Generator] = {}
        outputs: list[Image.Image | None] = [None] * len(canvases)
        batch_size = settings["batch_size"]
        batches = [(masked, members[start:start + batch_size]) for (_, _, masked), members in groups.items()
                   for start in range(0, len(members), batch_size)]
        kwargs = self._sampler_kwargs(settings)
        for masked, rows in tqdm(batches, disable=not progress or len(batches) == 1, desc="batches"):
            if seeds is not None:
                generator = _row_generators(seeds, rows, device, generators)
            pixels = inpaint_images(self.model, self.tokenizer, images_to_tensor([canvases[r] for r in rows], device),
                                    torch.stack([token_masks[r] for r in rows]), [request.texts[r] for r in rows],
                                    generator=generator, progress=progress,
                                    **{**kwargs, "steps": settings["steps_used"][rows[0]]})  # equal within a group
            self._check_finite(pixels, settings)
            for row, decoded in zip(rows, tensor_to_images(pixels)):
                pasted = composite(decoded, canvases[row], feather_alpha(canvas_masks[row], settings["feather"]))
                outputs[row] = pasted.crop((0, 0, request.images[row].width, request.images[row].height))
        return outputs  # type: ignore[return-value]

    def outpaint(self, images: Sequence[Image.Image], prompts: Sequence[str], *, left: int = 0, right: int = 0,
                 top: int = 0, bottom: int = 0, **kwargs: object) -> list[Image.Image]:
        """Extend each image by the given pixels (multiples of 16) on each side: pad (edge pixels
        repeated), mask the new border and `inpaint` it; keyword arguments go to `inpaint`."""
        return outpaint_with(self, images, prompts, left=left, right=right, top=top, bottom=bottom, **kwargs)

    # --- image to text ----------------------------------------------------------------------

    def image_to_text(self, images: Sequence[Image.Image], questions: Sequence[str], *,
                      max_new_tokens: int | None = None, seed: int | None = None, **options: object) -> list[str]:
        """Answer question i about image i (greedy by default; `do_sample=True` samples)."""
        return self.run(self.check_inputs("image_to_text", questions, images, seed=seed,
                                          max_new_tokens=max_new_tokens, **options))

    def _image_to_text(self, request: CheckedInputs, progress: bool = False) -> list[str]:
        settings = dict(request.settings)
        batch_size = settings.pop("batch_size")
        size = self.config.sampling.understanding_image_size
        answers: list[str] = []
        # transformers' sampling draws from the global RNG; fork it so a seed does not leak out.
        with torch.random.fork_rng(devices=[self.model.device] if self.model.device.type == "cuda" else []):
            if request.seed is not None:
                torch.manual_seed(request.seed)
            for start in range(0, len(request.images), batch_size):
                batch = [pad_to_square(im).resize((size, size), Image.BICUBIC)
                         for im in request.images[start:start + batch_size]]
                answers.extend(answer_questions(self.model, self.tokenizer,
                                                images_to_tensor(batch, self.model.device),
                                                request.texts[start:start + batch_size], **settings))
        return answers
