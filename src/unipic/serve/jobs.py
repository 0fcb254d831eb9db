"""What the model thread does with a batch: one pipeline call for compatible requests.

Every request brings its own seed, and image k of a request uses seed + k (its `seeds`, as the
pipeline's `check_inputs` accepted them when the request arrived). The pipelines take one seed per
prompt (`seed=[...]`), so an image does not depend on which other requests shared its batch: the
same request gives the same image alone or batched, and image k can be redrawn alone with seed + k
(up to floating-point rounding of batched arithmetic).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from unipic.api import UserError
from unipic.serve.batching import Job
from unipic.serve.errors import APIError, from_user_error

logger = logging.getLogger("unipic.serve")


@dataclass(frozen=True)
class ImageSettings:
    """The settings requests must share to be batched (part of the compatibility key)."""

    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    temperature: float | None = None
    fast: bool | None = None

    def options(self) -> dict[str, object]:
        """Pipeline keyword options for the settings that were given (the rest keep the model's defaults)."""
        options: dict[str, object] = {}
        if self.fast is not None:
            options["fast"] = self.fast
        if self.steps is not None:
            options["steps"] = self.steps
        if self.guidance_scale is not None:
            options["cfg"] = self.guidance_scale
        if self.temperature is not None:
            options["temperature"] = self.temperature
        return options


@dataclass
class GenerateWork:
    """A text-to-image request: one image of `prompt` per seed (image k with `seeds[k]`)."""

    prompt: str
    seeds: list[int]
    settings: ImageSettings


@dataclass
class EditWork:
    """An edit request: one edit of `image` (RGB; UniPic-3: a list of 1-6) by `instruction` per seed
    (edit k with `seeds[k]`)."""

    image: Image.Image | list[Image.Image]
    instruction: str
    seeds: list[int]
    settings: ImageSettings


@dataclass
class InpaintWork:
    """An edit with a mask: the masked pixels of `image` (RGB) redrawn by `instruction`, once per seed."""

    image: Image.Image
    mask: Any  # (H, W) bool, True = regenerate
    instruction: str
    seeds: list[int]
    settings: ImageSettings


@dataclass(frozen=True)
class ChatSettings:
    """Decoding settings of an image-to-text request (part of the compatibility key)."""

    max_tokens: int | None
    temperature: float | None = None
    top_p: float | None = None

    @property
    def sampling(self) -> bool:
        """Sampling rather than greedy decoding (temperature > 0)."""
        return bool(self.temperature)

    def options(self) -> dict[str, object]:
        """Pipeline keyword options: none for greedy decoding (every family's default)."""
        if not self.sampling:
            return {}
        options: dict[str, object] = {"do_sample": True, "temperature": float(self.temperature)}
        if self.top_p is not None:
            options["top_p"] = float(self.top_p)
        return options


@dataclass
class ChatWork:
    """An image-to-text request."""

    image: Image.Image
    question: str
    settings: ChatSettings
    seed: int | None = None


def run_jobs(pipeline, jobs: Sequence[Job]) -> list[Any]:
    """Run one batch (all jobs share kind and key); a result or an `APIError` per job.

    A `UserError` from a batch of several is retried job by job, so one request the model rejects
    does not fail the others with it.
    """
    try:
        return _run(pipeline, jobs)
    except UserError as error:
        if len(jobs) == 1:
            return [from_user_error(error)]
    except Exception as error:
        logger.exception("a batch of %d %s request(s) failed", len(jobs), jobs[0].kind)
        return [_internal_error(error)] * len(jobs)
    results: list[Any] = []
    for job in jobs:
        try:
            results.extend(_run(pipeline, [job]))
        except UserError as error:
            results.append(from_user_error(error))
        except Exception as error:
            logger.exception("a %s request failed", job.kind)
            results.append(_internal_error(error))
    return results


def _internal_error(error: Exception) -> APIError:
    return APIError(500, f"the model failed on this request ({type(error).__name__}: {str(error)[:300]})",
                    code="internal_error")


def _run(pipeline, jobs: Sequence[Job]) -> list[Any]:
    kind = jobs[0].kind
    if kind == "generate":
        return _generate(pipeline, [job.payload for job in jobs])
    if kind == "edit":
        return _edit(pipeline, [job.payload for job in jobs])
    if kind == "inpaint":
        return _inpaint(pipeline, [job.payload for job in jobs])
    if kind == "chat":
        return _chat(pipeline, [job.payload for job in jobs])
    raise ValueError(f"unknown job kind {kind!r}")


def _split(items: list, counts: Sequence[int]) -> list[list]:
    out, start = [], 0
    for count in counts:
        out.append(items[start:start + count])
        start += count
    return out


def _generate(pipeline, works: Sequence[GenerateWork]) -> list[list[Image.Image]]:
    settings = works[0].settings
    prompts = [w.prompt for w in works for _ in w.seeds]
    seeds = [seed for w in works for seed in w.seeds]
    rows = pipeline.text_to_image(prompts, height=settings.height, width=settings.width, images_per_prompt=1,
                                  seed=seeds, **settings.options())
    return _split([row[0] for row in rows], [len(w.seeds) for w in works])


def _edit(pipeline, works: Sequence[EditWork]) -> list[list[Image.Image]]:
    settings = works[0].settings
    images = [w.image for w in works for _ in w.seeds]
    instructions = [w.instruction for w in works for _ in w.seeds]
    seeds = [seed for w in works for seed in w.seeds]
    edited = pipeline.edit_image(images, instructions, height=settings.height, width=settings.width, seed=seeds,
                                 **settings.options())
    return _split(list(edited), [len(w.seeds) for w in works])


def _inpaint(pipeline, works: Sequence[InpaintWork]) -> list[list[Image.Image]]:
    settings = works[0].settings
    images = [w.image for w in works for _ in w.seeds]
    masks = [w.mask for w in works for _ in w.seeds]
    instructions = [w.instruction for w in works for _ in w.seeds]
    seeds = [seed for w in works for seed in w.seeds]
    painted = pipeline.inpaint(images, masks, instructions, seed=seeds, **settings.options())
    return _split(list(painted), [len(w.seeds) for w in works])


def _chat(pipeline, works: Sequence[ChatWork]) -> list[str]:
    settings = works[0].settings
    # Sampled answers with a seed run alone (their key is unique): the seed forks one RNG per call.
    seed = works[0].seed if len(works) == 1 else None
    return list(pipeline.image_to_text([w.image for w in works], [w.question for w in works],
                                       max_new_tokens=settings.max_tokens, seed=seed, **settings.options()))
