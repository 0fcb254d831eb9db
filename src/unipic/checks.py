"""Argument checks for the edge of the package: each pipeline's `check_inputs` and the CLI.

Every check raises `UserError` with one line naming the argument, the bad value and the fix, so
a mistake never reaches the numerical code (which keeps plain asserts). The same functions serve
the Python API (names like `cfg`) and the command line (names like `--cfg`), so the CLI can reject
options before it spends time loading a model.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from unipic.api import UserError

# torch.Generator.manual_seed takes 0 .. 2**64 - 1.
MAX_SEED = 2**64 - 1
# Guidance multiplies the gap between the conditional and unconditional predictions. Useful
# values lie around 1 to 15; far larger ones are typos that saturate or overflow the sample.
MAX_CFG = 100.0
# Temperature scales the sampler's per-step noise; above a few the output is pure noise.
MAX_TEMPERATURE = 10.0
# How UniPic-2 brings an edit source to the output size (`input_resize`, `--input-resize`):
# "stretch" resizes straight to it, as upstream's editing scripts do; "crop" centre-crops to the
# output's aspect ratio first (unipic.unipic2.images.resize_input).
INPUT_RESIZE_MODES = ("stretch", "crop")
# Every model family's pixel stride (VAE factor × patch size) is a multiple of 16, so the CLI and
# the server can refuse other sizes before a model is loaded; each pipeline then applies its own.
PIXEL_MULTIPLE = 16


def show(name: str, value: object) -> str:
    """`--cfg nan` for a command-line option, `cfg=nan` for a Python argument."""
    shown = value if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
    return f"{name} {shown}" if name.startswith("-") else f"{name}={shown}"


def check_int(value: object, name: str, *, minimum: int | None = None, maximum: int | None = None,
              hint: str = "") -> int:
    """An integer (not bool) within [minimum, maximum]; returns it as `int`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{show(name, value)}: must be an integer{_range(minimum, maximum)}{hint}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise UserError(f"{show(name, value)}: must be an integer{_range(minimum, maximum)}{hint}")
    return value


def check_number(value: object, name: str, *, minimum: float, maximum: float, above_minimum: bool = False,
                 hint: str = "") -> float:
    """A finite real number in [minimum, maximum] (or (minimum, maximum] with `above_minimum`)."""
    bound = f"> {minimum:g}" if above_minimum else f">= {minimum:g}"
    rule = f"must be a finite number {bound} and <= {maximum:g}{hint}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{show(name, value)}: {rule}")
    number = float(value)
    low_ok = number > minimum if above_minimum else number >= minimum
    if not math.isfinite(number) or not low_ok or number > maximum:
        raise UserError(f"{show(name, value)}: {rule}")
    return number


def check_size(value: object, name: str, multiple: int = PIXEL_MULTIPLE, *, example: int | None = None) -> int:
    """An image side in pixels: a positive multiple of `multiple` (the fix names the nearest one)."""
    value = check_int(value, name, minimum=multiple,
                      hint=f" and a multiple of {multiple}" + (f" (e.g. {example})" if example else ""))
    if value % multiple:
        fixed = max(multiple, round(value / multiple) * multiple)
        raise UserError(f"{show(name, value)}: must be a positive multiple of {multiple}; use {show(name, fixed)}")
    return value


def check_seed(seed: object, name: str = "seed", *, count: int = 1) -> int | None:
    """None or an integer such that seed .. seed + count - 1 are all valid generator seeds."""
    if seed is None:
        return None
    return check_int(seed, name, minimum=0, maximum=MAX_SEED - max(count - 1, 0),
                     hint=" (the same seed reproduces the output)" if count == 1 else
                     f" (the {count} prompts use seed .. seed+{count - 1})")


def check_seeds(seed: object, count: int, what: str, name: str = "seed") -> int | list[int] | None:
    """None, one seed, or a list of `count` seeds, one per prompt/instruction (`what`, singular).

    A list gives each prompt its own generator (the server batches unrelated requests this way);
    every element must be a valid seed on its own.
    """
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        return check_seed(seed, name)
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise UserError(f"{show(name, seed)}: must be an integer, a list of integers (one per {what}) or None")
    seeds = list(seed)
    if len(seeds) != count:
        raise UserError(f"{name}: got {len(seeds)} seeds for {count} {what}s; give one seed per {what}")
    return [check_int(value, f"{name}[{index}]", minimum=0, maximum=MAX_SEED, hint=f" (one seed per {what})")
            for index, value in enumerate(seeds)]


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """One of `choices`."""
    if value not in choices:
        raise UserError(f"{show(name, value)}: must be one of {', '.join(map(repr, choices))}")
    return str(value)


def check_image_list(images: object, name: str, count: int, what: str) -> list:
    """A list of `count` images (one per prompt/instruction/question); the items are checked by `to_rgb`."""
    from PIL import Image

    if isinstance(images, Image.Image) or isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise UserError(f"{name} must be a list of PIL images, got a {type(images).__name__}; "
                        "wrap a single image in a list")
    images = list(images)
    if len(images) != count:
        raise UserError(f"got {len(images)} {name} but {count} {what}; give one image per {what.rstrip('s')}")
    return images


def check_writable(folder: Path, flag: str, shown: str) -> None:
    """Fail now, not after the compute, when nothing can be written in `folder` (created later if missing)."""
    existing = folder if str(folder) else Path(".")
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {shown}: {existing} is a file, so no folder can be made there")
    try:
        # A real probe: permissions, read-only file systems and full quotas all show up here.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{flag} {shown}: cannot write in {existing} ({error.strerror or type(error).__name__}); "
                        "choose another place") from None


def available_memory(device: object) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: free device memory; CPU: MemAvailable), or None."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None  # MPS shares system memory without a reliable free-memory query


def gib(size: int) -> str:
    """A byte count for messages: '3.2 GiB', '0.4 MiB', '12 TiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:,.0f} TiB"


def _range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def parse_diffusion_options(options: dict, allowed: Sequence[str], aliases: dict[str, str], *, family: str,
                            task: str) -> dict:
    """A diffusion family's sampling options under their canonical names, the shared ones checked.

    None means the default; an unknown name, or two spellings of one option with different values,
    is a `UserError`. `num_inference_steps` (>= 1), `cfg` (0..MAX_CFG; these families turn guidance
    off at <= 1) and `negative_prompt` (a string) are checked here; the family checks the rest.
    """
    parsed: dict = {}
    for key, value in options.items():
        if key not in allowed:
            raise UserError(f"unknown {task} option {key!r} for {family}; valid options: {', '.join(allowed)}")
        if value is None:
            continue
        name = aliases.get(key, key)
        if name in parsed and parsed[name] != value:
            raise UserError(f"option {key!r} conflicts with another spelling of {name!r}; pass it once")
        parsed[name] = value
    if "num_inference_steps" in parsed:
        parsed["num_inference_steps"] = check_int(parsed["num_inference_steps"], "num_inference_steps", minimum=1)
    if "cfg" in parsed:
        parsed["cfg"] = check_number(parsed["cfg"], "cfg", minimum=0.0, maximum=MAX_CFG,
                                     hint=" (<= 1 disables guidance)")
    if "negative_prompt" in parsed and not isinstance(parsed["negative_prompt"], str):
        raise UserError(f"negative_prompt must be a string, got {type(parsed['negative_prompt']).__name__}")
    return parsed
