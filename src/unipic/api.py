"""The contract every unipic model family (and the evaluation oracle) implements.

The CLI, the evaluators and the server only talk to a model through `UnifiedPipeline`, so
UniPic-1 (MAR + Qwen2.5), UniPic-2 (SD3.5M-Kontext, MetaQuery) and test oracles are
interchangeable. A job a family cannot do raises `UnsupportedTaskError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL import Image


class UserError(ValueError):
    """A mistake in what the user asked for; the CLI prints it as one line and exits with code 2."""


class UnsupportedTaskError(UserError):
    """The loaded model family cannot do the requested job (e.g. captioning with SD3.5M-Kontext)."""


def check_texts(texts: Sequence[str], name: str, *, allow_blank: bool = False) -> list[str]:
    """Validate a list of prompts/instructions/questions (a UserError names the bad entry)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise UserError(f"{name} must be a list of strings, got {type(texts).__name__}; wrap a single one in a list")
    texts = list(texts)
    if not texts:
        raise UserError(f"{name} is empty; pass at least one")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"{name}[{index}] must be a string, got {type(text).__name__}")
        if not allow_blank and not text.strip():
            raise UserError(f"{name}[{index}] is empty; give a non-empty text")
    return texts


Job = Literal["text_to_image", "edit_image", "image_to_text"]


@dataclass
class CheckedInputs:
    """One request after `check_inputs`: validated texts, RGB images, seed and the exact settings.

    `seed` is None, one seed, or (generation and editing) a list with one seed per text.
    `settings` holds every value sampling will use (defaults filled in, aliases resolved), once
    each, as plain JSON-safe values; the CLI and the server record it with each output.

    A checked request is what the pipeline's `run` samples from: nothing below `check_inputs` /
    `check_inpaint` checks or derives it again (docs/sampling.md, "Each request is checked once").
    """

    job: str
    texts: list[str]
    images: list[Image.Image] | list[list[Image.Image]] | None = None  # UniPic-3 edits: one list per instruction
    seed: int | list[int] | None = None
    images_per_prompt: int = 1
    settings: dict[str, object] = field(default_factory=dict)
    masks: list | None = None  # inpainting: one grown bool (H, W) numpy mask per image, True = regenerate
    sizes: list[tuple[int, int]] | None = None  # editing: each output's (height, width), decided by the pipeline

    def select(self, indices: Sequence[int]) -> CheckedInputs:
        """The same checked request for the texts at `indices` only (e.g. one prompt of a batch file).

        A seed list is sliced with them; one seed (or None) stays as it is.
        """
        def pick(items: list | None) -> list | None:
            return None if items is None else [items[i] for i in indices]

        seed = [self.seed[i] for i in indices] if isinstance(self.seed, list) else self.seed
        return CheckedInputs(self.job, [self.texts[i] for i in indices], pick(self.images), seed,
                             self.images_per_prompt, dict(self.settings), pick(self.masks), pick(self.sizes))


@runtime_checkable
class UnifiedPipeline(Protocol):
    """Text-to-image, editing and image-to-text behind one interface.

    Images go in and come out as RGB `PIL.Image.Image`. Every method validates its inputs and
    raises `UserError` (with the argument name, the bad value and the fix) for bad ones.
    `seed=None` means nondeterministic; the same seed on the same device gives the same output.
    For generation and editing `seed` may also be a list, one seed per prompt (or pair): each
    prompt's images are then drawn from its own generator, so they do not depend on what else
    shares the call (the server batches unrelated requests this way).
    Extra keyword options (`cfg`, `temperature`, `num_iter`, `num_inference_steps`, ...) are
    family-specific sampling settings; unknown ones raise `UserError`.

    Each job method is `run(check_inputs(...))`: the request is checked once, and a front end that
    needs the checked request first (the CLI records its settings) calls the two itself.
    """

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
        """Generate `images_per_prompt` images for each prompt; returns one list per prompt."""
        ...

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
        """Apply instruction i to image i; returns one edited image per pair.

        Multi-image families (UniPic-3: 1-6 images per instruction) also take a list of images as
        entry i; single-image families reject such entries.
        """
        ...

    def image_to_text(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        *,
        max_new_tokens: int = 256,
        seed: int | None = None,
        **options: object,
    ) -> list[str]:
        """Answer question i about image i (a caption when the question asks for one)."""
        ...

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
        """Validate a request without running it (each method calls this first); raises `UserError`.

        A seed list (generation and editing only) needs one valid seed per text.
        """
        ...

    def run(self, request: CheckedInputs, *, progress: bool = False) -> list:
        """Sample a request `check_inputs` (or `check_inpaint`) returned, without checking it again.

        Returns what the job's method returns: one list of images per prompt (text_to_image), one
        image per pair (edit_image, inpaint) or one answer per question (image_to_text).
        """
        ...

    def sampling_defaults(self) -> dict[str, object]:
        """The default settings this pipeline samples with.

        A pipeline that answers questions includes `caption_question`: what `unipic caption` asks
        when the user gives no question.
        """
        ...


@runtime_checkable
class InpaintingPipeline(Protocol):
    """The optional inpainting capability (UniPic-1, both UniPic-2 families and the Shapes oracle).

    Masks are PIL images (white = regenerate) or (H, W) bool arrays of the image's size; `grow`
    dilates them by that many pixels and `feather` fades the generated pixels into the source over
    that many pixels inside the mask, so every pixel outside the grown mask stays the source's.

    `check_inpaint` = `inpaint_settings(unipic.inpainting.check_inpaint_request(...))`: the first
    part needs no model (the CLI runs it before loading one, so masks are checked and grown once),
    the second converts the images to RGB and adds the family's sampling settings.
    """

    def inpaint_settings(self, request: CheckedInputs, **options: object) -> CheckedInputs:
        """Complete a model-free `check_inpaint_request`: RGB images, this family's checked settings."""
        ...

    def check_inpaint(self, images: Sequence[Image.Image], masks: Sequence[object], prompts: Sequence[str], *,
                      seed: int | Sequence[int] | None = None, grow: int = 0, feather: int = 4,
                      **options: object) -> CheckedInputs:
        """Validate an inpainting request without running it; raises `UserError`."""
        ...

    def inpaint(self, images: Sequence[Image.Image], masks: Sequence[object], prompts: Sequence[str], *,
                seed: int | Sequence[int] | None = None, grow: int = 0, feather: int = 4, progress: bool = False,
                **options: object) -> list[Image.Image]:
        """Regenerate the masked pixels of image i from prompt i; one same-size image per pair."""
        ...

    def outpaint(self, images: Sequence[Image.Image], prompts: Sequence[str], *, left: int = 0, right: int = 0,
                 top: int = 0, bottom: int = 0, **kwargs: object) -> list[Image.Image]:
        """Extend each image by the given pixels (multiples of 16) on each side; keyword arguments go to `inpaint`."""
        ...


def runtime_settings(pipeline: object) -> dict[str, str]:
    """The device type and dtype a pipeline computes in, which change its pixels ({} for one without
    torch weights, as the Shapes oracle); outputs record them beside the sampling settings."""
    import sys

    torch = sys.modules.get("torch")  # a pipeline with weights has imported torch already
    if torch is None:
        return {}
    for name in ("model", "pipeline"):
        holder = getattr(pipeline, name, None)
        modules = [holder] if isinstance(holder, torch.nn.Module) else [
            getattr(holder, part, None) for part in ("transformer", "text_encoder", "vae")]
        for module in modules:
            if isinstance(module, torch.nn.Module):
                parameter = next(module.parameters(), None)
                if parameter is not None:
                    return {"device": parameter.device.type, "dtype": str(parameter.dtype).removeprefix("torch.")}
    return {}
