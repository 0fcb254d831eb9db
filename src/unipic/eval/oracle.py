"""`ShapesOracle`: a "model" that is exactly right about the Shapes world, for checking the
evaluators end to end (`--model shapes-oracle`).

- text to image: parses a template prompt (or a canonical caption) and renders a scene that
  satisfies it exactly; an unparseable prompt gives an empty canvas.
- editing: reads the source with the judge, applies the instruction, renders the result.
- image to text: reads the image with the judge and answers the five question forms.

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

from unipic.api import UserError, check_seeds
from unipic.world.edits import apply_instruction
from unipic.world.geneval import record_for_prompt, scene_for_record
from unipic.world.judge import judge, judge_scene
from unipic.world.questions import answer_question
from unipic.world.render import render
from unipic.world.scene import LATTICE, Scene, WorldObject, layout, rng_for
from unipic.world.spec import COLOR_NAMES, DEFAULT_SIZE
from unipic.world.text import parse_description

logger = logging.getLogger(__name__)


class ShapesOracle:
    """Exact Shapes-world pipeline implementing `unipic.api.UnifiedPipeline`.

    Args:
        wrong_colors: paint every object a color other than the right one.
        drop_object: leave one object out of every image.
        mirror_positions: mirror every object's centre through the canvas centre.
        size: default image side when height/width are not given.
    """

    def __init__(self, wrong_colors: bool = False, drop_object: bool = False, mirror_positions: bool = False,
                 size: int = DEFAULT_SIZE) -> None:
        self.wrong_colors = wrong_colors
        self.drop_object = drop_object
        self.mirror_positions = mirror_positions
        self.size = size

    def sampling_defaults(self) -> dict[str, object]:
        return {"oracle": True, "size": self.size, "wrong_colors": self.wrong_colors,
                "drop_object": self.drop_object, "mirror_positions": self.mirror_positions}

    # -- helpers ---------------------------------------------------------------------------------

    def _size(self, height: int | None, width: int | None) -> int:
        height = height or width or self.size
        width = width or height
        if height != width:
            raise UserError(f"the Shapes oracle draws square images; got height={height}, width={width}")
        if not isinstance(height, int) or height < 16:
            raise UserError(f"image size must be an integer >= 16, got {height!r}")
        return height

    @staticmethod
    def _check_options(options: dict) -> None:
        if options:
            raise UserError(f"the Shapes oracle takes no sampling options; got {', '.join(sorted(options))}")

    @staticmethod
    def _seed(seed: int | None) -> int:
        return int(np.random.SeedSequence().entropy % (2**63)) if seed is None else int(seed)

    def _seed_keys(self, seed: int | Sequence[int] | None, count: int) -> list[tuple[int, int]]:
        """(seed, index) per item: one seed for all (item i is index i), or a list (each item index 0)."""
        seeds = check_seeds(seed, count, "prompt")
        if seeds is not None:
            return [(s, 0) for s in seeds]
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
        logger.warning("shapes-oracle: cannot parse prompt %r; drawing an empty canvas", prompt)
        return Scene(())

    # -- UnifiedPipeline ---------------------------------------------------------------------------

    def text_to_image(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
                      images_per_prompt: int = 1, seed: int | Sequence[int] | None = None, progress: bool = False,
                      **options: object) -> list[list[Image.Image]]:
        self._check_options(options)
        if isinstance(prompts, str):
            raise UserError("prompts must be a list of strings, not a single string")
        if images_per_prompt < 1:
            raise UserError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
        size = self._size(height, width)
        keys = self._seed_keys(seed, len(prompts))
        out = []
        for i, prompt in enumerate(prompts):
            images = []
            for k in range(images_per_prompt):
                rng = rng_for(keys[i][0], 31, keys[i][1], k)
                images.append(render(self._corrupt(self.scene_for_prompt(prompt, rng), rng), size))
            out.append(images)
        return out

    def edit_image(self, images: Sequence[Image.Image], instructions: Sequence[str], *, height: int | None = None,
                   width: int | None = None, seed: int | Sequence[int] | None = None, progress: bool = False,
                   **options: object) -> list[Image.Image]:
        self._check_options(options)
        if len(images) != len(instructions):
            raise UserError(f"got {len(images)} images but {len(instructions)} instructions; pass one per image")
        keys = self._seed_keys(seed, len(instructions))
        out = []
        for i, (image, instruction) in enumerate(zip(images, instructions)):
            size = self._size(height or image.height, width or image.width)
            source = Scene(tuple(_snap(o) for o in judge_scene(image.convert("RGB")).objects))
            rng = rng_for(keys[i][0], 32, keys[i][1])
            edit = apply_instruction(rng, source, instruction)
            target = source if edit is None else edit.target
            out.append(render(self._corrupt(target, rng), size))
        return out

    def image_to_text(self, images: Sequence[Image.Image], questions: Sequence[str], *, max_new_tokens: int = 256,
                      seed: int | None = None, **options: object) -> list[str]:
        self._check_options(options)
        if len(images) != len(questions):
            raise UserError(f"got {len(images)} images but {len(questions)} questions; pass one per image")
        answers = []
        for i, (image, question) in enumerate(zip(images, questions)):
            found = judge(image.convert("RGB"))
            if self.wrong_colors or self.drop_object or self.mirror_positions:
                rng = rng_for(self._seed(seed), 33, i)
                found = list(self._corrupt(Scene(tuple(d.to_object() for d in found)), rng).objects)
            answers.append(answer_question(found, question) or "")
        return answers


def _snap(obj: WorldObject) -> WorldObject:
    """Snap a box read back from an image onto the 1/128 lattice the generators use, so the
    oracle re-renders exactly what a ground-truth render would be."""
    side = round(obj.size * LATTICE) / LATTICE
    x0 = round((obj.cx - side / 2) * LATTICE) / LATTICE
    y0 = round((obj.cy - side / 2) * LATTICE) / LATTICE
    return WorldObject(obj.color, obj.shape, x0 + side / 2, y0 + side / 2, side)
