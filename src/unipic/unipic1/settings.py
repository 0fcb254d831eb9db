"""Run settings and the JSON loader shared by every config dataclass.

`SamplingConfig` holds a model's default sampling settings (saved in its config.json under
"sampling"; the CLI and pipelines start from them); `CHATML_TEMPLATE` is the prompt format of
the released model. `from_dict` builds any config dataclass from JSON with one-line errors.

The architecture of a UniPic-1 model, `UniPicConfig`, lives in `unipic.unipic1.models.config`, next to
the modules it builds, and the named presets in `unipic.unipic1.models.presets`. This module imports
nothing from `unipic.unipic1.models`, so the models can depend on it without a cycle.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["CHATML_TEMPLATE", "SamplingConfig", "from_dict"]

# ChatML, exactly as the released model config writes it (no system turn is ever inserted).
CHATML_TEMPLATE = {
    "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
    "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    "SUFFIX": "<|im_end|>",
    "SEP": "\n",
    "STOP_WORDS": ["<|im_end|>", "<|endoftext|>"],
}


@dataclass
class SamplingConfig:
    """Default sampling settings of a model (the CLI and pipelines start from these)."""

    image_size: int = 1024  # generation/editing side in pixels (multiple of 16)
    understanding_image_size: int = 512  # the paper's understanding resolution (the 1.5B preset: 1024, upstream's)
    num_iter: int = 32  # MAR steps (upstream CLI: 32; paper evaluation: 64)
    head_steps: int | None = None  # diffusion-head steps; None = the head config's num_sampling_steps
    cfg: float = 3.0
    cfg_schedule: str = "constant"  # or "linear" (Muse-style)
    temperature: float = 1.0
    edit_cfg: float = 3.0
    edit_temperature: float = 0.85
    edit_keep_threshold: float = 0.5  # models with edit_keep_mask: keep a source cell when P(keep) exceeds this
    t2i_prompt: str = "Generate an image: {prompt}"
    cfg_prompt: str = "Generate an image."
    edit_cfg_prompt: str = "Repeat this image."
    caption_prompt: str = "Describe the image in detail."
    max_new_tokens: int = 256


def from_dict(cls, data: dict[str, Any], where: str):
    """Instantiate dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(valid)}")
    # A wrong type would otherwise surface later as a traceback deep inside model building.
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if not _matches(value, hints[key]):
            raise ValueError(f"{where}.{key} = {value!r} should be {_type_name(hints[key])}, not {type(value).__name__}")
    return cls(**data)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a dataclass field annotation (ints count as floats; dicts as dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args else Any
        return all(_matches(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return True  # annotations this loader does not know are left to the constructor


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
