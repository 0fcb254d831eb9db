"""`ShapesOracle`: a "model" that is exactly right about the Shapes world, for checking the
evaluators end to end (`--model shapes-oracle`).

- text to image: parses a template prompt, a canonical caption or a coloured position prompt
  (`a photo of a red circle left of a blue star`) and renders a scene that satisfies it exactly;
  any other prompt is a `UserError` saying what it can draw.
- editing: reads the source with the judge, applies the instruction, renders the result.
- image to text: reads the image with the judge and answers the five question forms (any other
  question is a `UserError`).
- inpainting: keeps the objects the judge finds outside the mask and draws what the prompt names
  but the kept scene lacks (a one-object prompt: that object) centred in the mask's bounding box,
  pasted into the source like every family's output (outpainting pads and inpaints).

Corruption switches make it wrong on purpose, so tests can check that each evaluator fails
exactly the categories it should: `wrong_colors` paints every object a different color,
`drop_object` leaves one object out, `mirror_positions` mirrors every centre through the
canvas centre (swapping left/right and above/below).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from unipic.api import CheckedInputs, Job, UserError, check_texts
from unipic.checks import check_image_list, check_int, check_seed, check_seeds
from unipic.images import to_rgb
from unipic.inpainting import (
    DEFAULT_FEATHER,
    DEFAULT_GROW,
    check_inpaint_request,
    composite,
    feather_alpha,
    outpaint_with,
    rgb_request,
)
from unipic.world.edits import apply_instruction
from unipic.world.geneval import colored_position, record_for_prompt, scene_for_record
from unipic.world.judge import judge, judge_scene
from unipic.world.questions import answer_question, is_world_question
from unipic.world.render import render
from unipic.world.scene import LATTICE, Scene, WorldObject, layout, rng_for
from unipic.world.spec import COLOR_NAMES, DEFAULT_SIZE, MAX_BOX, MIN_BOX
from unipic.world.text import parse_colored_position, parse_description

logger = logging.getLogger(__name__)


class ShapesOracle:
    """Exact Shapes-world pipeline implementing `unipic.api.UnifiedPipeline`.

    Args:
        wrong_colors: paint every object a color other than the right one.
        drop_object: leave one object out of every image.
        mirror_positions: mirror every object's centre through the canvas centre.
        size: default image side when height/width are not given.
        blank_unknown: draw an empty canvas for a prompt it cannot parse instead of refusing it
            (tests of evaluators' file layouts on real-world prompt sets use this).
    """

    alpha_background = (128, 128, 128)  # transparent input pixels are composited onto this

    def __init__(self, wrong_colors: bool = False, drop_object: bool = False, mirror_positions: bool = False,
                 size: int = DEFAULT_SIZE, blank_unknown: bool = False) -> None:
        self.blank_unknown = blank_unknown
        self.wrong_colors = wrong_colors
        self.drop_object = drop_object
        self.mirror_positions = mirror_positions
        self.size = size

    def sampling_defaults(self) -> dict[str, object]:
        """The oracle's settings: its default size and corruption switches."""
        return {"oracle": True, "size": self.size, "caption_question": "Describe the image.",
                "wrong_colors": self.wrong_colors,
                "drop_object": self.drop_object, "mirror_positions": self.mirror_positions}

    def check_inputs(self, job: Job, texts: Sequence[str], images: Sequence[Image.Image] | None = None, *,
                     height: int | None = None, width: int | None = None, images_per_prompt: int = 1,
                     seed: int | Sequence[int] | None = None, max_new_tokens: int | None = None,
                     **options: object) -> CheckedInputs:
        """Validate a request (`UserError` naming the argument); edits take their size from each source."""
        if options:
            raise UserError(f"the Shapes oracle takes no sampling options; got {', '.join(sorted(options))}")
        what = {"text_to_image": "prompts", "edit_image": "instructions", "image_to_text": "questions"}[job]
        texts = check_texts(texts, what, allow_blank=job == "text_to_image")
        seed = check_seed(seed) if job == "image_to_text" else check_seeds(seed, len(texts), what[:-1])
        settings: dict[str, object] = {"wrong_colors": self.wrong_colors, "drop_object": self.drop_object,
                                       "mirror_positions": self.mirror_positions}
        rgb = None
        if job != "text_to_image":
            rgb = [to_rgb(im, self.alpha_background, name=f"images[{i}]")
                   for i, im in enumerate(check_image_list(images, "images", len(texts), what))]
        sizes = None
        if job == "text_to_image":
            images_per_prompt = check_int(images_per_prompt, "images_per_prompt", minimum=1)
            settings["size"] = self._size(height, width)
            for prompt in texts:  # an unparseable prompt is refused before anything is drawn
                self.scene_for_prompt(prompt, rng_for(0, 31))
        elif job == "edit_image":  # each source's own size unless one is given
            if height is not None or width is not None:
                settings["size"] = self._size(height, width)
            sizes = [(self._size(height or im.height, width or im.width),) * 2 for im in rgb]
        elif height is not None or width is not None:
            settings["size"] = self._size(height, width)
        if max_new_tokens is not None:
            check_int(max_new_tokens, "max_new_tokens", minimum=1)
        return CheckedInputs(job, texts, rgb, seed, images_per_prompt, settings, sizes=sizes)

    # -- helpers ---------------------------------------------------------------------------------

    def _size(self, height: int | None, width: int | None) -> int:
        height = height or width or self.size
        width = width or height
        if height != width:
            raise UserError(f"the Shapes oracle draws square images; got height={height}, width={width}")
        return check_int(height, "height", minimum=16)

    @staticmethod
    def _seed(seed: int | None) -> int:
        return int(np.random.SeedSequence().entropy % (2**63)) if seed is None else int(seed)

    def _seed_keys(self, seed: int | list[int] | None, count: int) -> list[tuple[int, int]]:
        """(seed, index) per item of a checked request: one seed for all (item i is index i), or a
        seed list (each item index 0, so an item does not depend on the others)."""
        if isinstance(seed, list):
            return [(s, 0) for s in seed]
        base = self._seed(seed)
        return [(base, i) for i in range(count)]

    def _corrupt(self, scene: Scene, rng: np.random.Generator) -> Scene:
        objects = list(scene.objects)
        if self.wrong_colors:
            others = [[c for c in COLOR_NAMES if c != o.color] for o in objects]
            objects = [o.recolored(opts[int(rng.integers(len(opts)))]) for o, opts in zip(objects, others)]
        if self.drop_object and objects:
            del objects[int(rng.integers(len(objects)))]
        if self.mirror_positions:
            objects = [o.moved(1 - o.cx, 1 - o.cy) for o in objects]
        return Scene(tuple(objects))

    def scene_for_prompt(self, prompt: str, rng: np.random.Generator) -> Scene:
        """The (uncorrupted) scene drawn for a prompt; empty when the prompt does not parse."""
        record = record_for_prompt(prompt)
        if record is not None:
            return scene_for_record(rng, record, allow_held_out=True)
        pairs = parse_description(prompt)
        if pairs is not None and len(pairs) <= 4:
            return layout(rng, pairs)
        fields = parse_colored_position(prompt)
        if fields is not None:
            return scene_for_record(rng, colored_position(**fields), allow_held_out=True)
        if self.blank_unknown:
            return Scene(())
        raise UserError(f"the Shapes oracle cannot draw {prompt!r}: it draws the world's template prompts "
                        "(docs/world.md §7, e.g. 'a photo of two stars'), canonical captions "
                        "('a red circle and a blue star') and 'a photo of a red circle left of a blue star'")

    # -- UnifiedPipeline ---------------------------------------------------------------------------

    def text_to_image(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
                      images_per_prompt: int = 1, seed: int | Sequence[int] | None = None, progress: bool = False,
                      **options: object) -> list[list[Image.Image]]:
        """Render each prompt's scene `images_per_prompt` times (an unparseable prompt is a UserError)."""
        return self.run(self.check_inputs("text_to_image", prompts, height=height, width=width,
                                          images_per_prompt=images_per_prompt, seed=seed, **options))

    def run(self, request: CheckedInputs, *, progress: bool = False) -> list:
        """Draw (or answer) a checked request without checking it again."""
        job = {"text_to_image": self._text_to_image, "edit_image": self._edit_image, "inpaint": self._inpaint,
               "image_to_text": self._image_to_text}.get(request.job)
        if job is None:
            raise ValueError(f"unknown job {request.job!r} in a checked request")
        return job(request)

    def _text_to_image(self, request: CheckedInputs) -> list[list[Image.Image]]:
        size, keys = request.settings["size"], self._seed_keys(request.seed, len(request.texts))
        out = []
        for i, prompt in enumerate(request.texts):
            images = []
            for k in range(request.images_per_prompt):
                rng = rng_for(keys[i][0], 31, keys[i][1], k)
                images.append(render(self._corrupt(self.scene_for_prompt(prompt, rng), rng), size))
            out.append(images)
        return out

    def edit_image(self, images: Sequence[Image.Image], instructions: Sequence[str], *, height: int | None = None,
                   width: int | None = None, seed: int | Sequence[int] | None = None, progress: bool = False,
                   **options: object) -> list[Image.Image]:
        """Read each source with the judge, apply its instruction and render the result."""
        return self.run(self.check_inputs("edit_image", instructions, images, height=height, width=width,
                                          seed=seed, **options))

    def _edit_image(self, request: CheckedInputs) -> list[Image.Image]:
        keys = self._seed_keys(request.seed, len(request.texts))
        out = []
        for i, (image, instruction) in enumerate(zip(request.images, request.texts)):
            size = request.sizes[i][0]
            source = Scene(tuple(_snap(o) for o in judge_scene(image).objects))
            rng = rng_for(keys[i][0], 32, keys[i][1])
            edit = apply_instruction(rng, source, instruction)
            target = source if edit is None else edit.target
            out.append(render(self._corrupt(target, rng), size))
        return out

    def check_inpaint(self, images: Sequence[Image.Image], masks: Sequence[object], prompts: Sequence[str], *,
                      seed: int | Sequence[int] | None = None, grow: int = DEFAULT_GROW,
                      feather: int = DEFAULT_FEATHER, **options: object) -> CheckedInputs:
        """Validate an inpainting request (square images only, like everything the oracle draws)."""
        return self.inpaint_settings(check_inpaint_request(images, masks, prompts, seed=seed, grow=grow,
                                                           feather=feather), **options)

    def inpaint_settings(self, request: CheckedInputs, **options: object) -> CheckedInputs:
        """Complete a model-free `check_inpaint_request` (square images only, like everything the oracle draws)."""
        if options:
            raise UserError(f"the Shapes oracle takes no sampling options; got {', '.join(sorted(options))}")
        request = rgb_request(request, self.alpha_background)
        for i, image in enumerate(request.images):
            if image.width != image.height:
                raise UserError(f"the Shapes oracle draws square images; images[{i}] is {image.width}x{image.height}")
        request.settings.update(wrong_colors=self.wrong_colors, drop_object=self.drop_object,
                                mirror_positions=self.mirror_positions)
        return request

    def inpaint(self, images: Sequence[Image.Image], masks: Sequence[object], prompts: Sequence[str], *,
                seed: int | Sequence[int] | None = None, grow: int = DEFAULT_GROW, feather: int = DEFAULT_FEATHER,
                progress: bool = False, **options: object) -> list[Image.Image]:
        """Keep what lies outside each mask and draw the prompt's missing object inside it."""
        return self.run(self.check_inpaint(images, masks, prompts, seed=seed, grow=grow, feather=feather, **options))

    def _inpaint(self, request: CheckedInputs) -> list[Image.Image]:
        keys = self._seed_keys(request.seed, len(request.texts))
        out = []
        for i, (image, mask, prompt) in enumerate(zip(request.images, request.masks, request.texts)):
            size = image.width
            rng = rng_for(keys[i][0], 34, keys[i][1])
            kept = [_snap(d.to_object()) for d in judge(image)
                    if not mask[min(int(d.cy * size), size - 1), min(int(d.cx * size), size - 1)]]
            scene = Scene(tuple(kept + self._objects_for_mask(prompt, kept, mask)))
            drawn = render(self._corrupt(scene, rng), size)
            out.append(composite(drawn, image, feather_alpha(mask, request.settings["feather"])))
        return out

    @staticmethod
    def _objects_for_mask(prompt: str, kept: list[WorldObject], mask: np.ndarray) -> list[WorldObject]:
        """What the prompt names beyond the kept objects (a one-object prompt: that object), centred in
        the mask's bounding box at 80 % of its shorter side (clamped to the world's box sizes)."""
        pairs = parse_description(prompt) or []
        if len(pairs) != 1:
            missing = list(pairs)
            for obj in kept:
                if obj.pair in missing:
                    missing.remove(obj.pair)
            pairs = missing
        if not pairs:
            logger.warning("shapes-oracle: the prompt %r names nothing missing; leaving the mask empty", prompt)
            return []
        size = mask.shape[0]
        rows, cols = np.nonzero(mask)
        y0, y1, x0, x1 = rows.min() / size, (rows.max() + 1) / size, cols.min() / size, (cols.max() + 1) / size
        side = min(max(0.8 * min(x1 - x0, y1 - y0), MIN_BOX), MAX_BOX)
        color, shape = pairs[0]
        return [WorldObject(color, shape, (x0 + x1) / 2, (y0 + y1) / 2, side)]

    def outpaint(self, images: Sequence[Image.Image], prompts: Sequence[str], *, left: int = 0, right: int = 0,
                 top: int = 0, bottom: int = 0, **kwargs: object) -> list[Image.Image]:
        """Pad each image (multiples of 16) and inpaint the new border."""
        return outpaint_with(self, images, prompts, left=left, right=right, top=top, bottom=bottom, **kwargs)

    def image_to_text(self, images: Sequence[Image.Image], questions: Sequence[str], *, max_new_tokens: int = 256,
                      seed: int | None = None, **options: object) -> list[str]:
        """Read each image with the judge and answer its question."""
        return self.run(self.check_inputs("image_to_text", questions, images, seed=seed,
                                          max_new_tokens=max_new_tokens, **options))

    def _image_to_text(self, request: CheckedInputs) -> list[str]:
        answers = []
        for i, (image, question) in enumerate(zip(request.images, request.texts)):
            found = judge(image)
            if self.wrong_colors or self.drop_object or self.mirror_positions:
                rng = rng_for(self._seed(request.seed), 33, i)
                found = list(self._corrupt(Scene(tuple(d.to_object() for d in found)), rng).objects)
            answer = answer_question(found, question)
            if answer is None and not is_world_question(question):
                raise UserError(f"the Shapes oracle answers the world's five question forms (docs/world.md §9, e.g. "
                                f"'How many stars are there?'); questions[{i}] is {question!r}")
            # A form that does not apply (its shape is not there exactly once) gets a plain reason.
            answers.append(answer if answer is not None else "the question does not apply to this image")
        return answers


def _snap(obj: WorldObject) -> WorldObject:
    """Snap a box read back from an image onto the 1/128 lattice the generators use, so the
    oracle re-renders exactly what a ground-truth render would be."""
    side = round(obj.size * LATTICE) / LATTICE
    x0 = round((obj.cx - side / 2) * LATTICE) / LATTICE
    y0 = round((obj.cy - side / 2) * LATTICE) / LATTICE
    return WorldObject(obj.color, obj.shape, x0 + side / 2, y0 + side / 2, side)
