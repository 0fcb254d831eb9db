"""Top-level UniPic-1 configuration, sampling defaults and named presets.

One `UniPicConfig` describes a whole model: the KL-16 VAE, the MAR encoder/decoder with its
diffusion head, the Qwen2 LLM, an optional SigLIP2 understanding tower, the projectors between
them and the prompt format. Component configs live next to their modules (`models/*.py`); the
LLM and SigLIP parts map onto transformers' `Qwen2Config` / `SiglipVisionConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unipic.models.diffusion_head import DiffusionHeadConfig
from unipic.models.mar import MARConfig
from unipic.models.vae import VAEConfig

# ChatML, exactly as the released model config writes it (no system turn is ever inserted).
CHATML_TEMPLATE = {
    "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
    "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    "SUFFIX": "<|im_end|>",
    "SEP": "\n",
    "STOP_WORDS": ["<|im_end|>", "<|endoftext|>"],
}


@dataclass
class LLMConfig:
    """The Qwen2 causal LM (Qwen2.5-1.5B-Instruct in the released model)."""

    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    vocab_size: int = 151936  # padded beyond the tokenizer; `<image>` fits without a resize
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    attn_implementation: str = "sdpa"  # upstream hard-wires flash_attention_2; sdpa runs everywhere

    def to_transformers(self):
        """Build the equivalent `transformers.Qwen2Config`."""
        from transformers import Qwen2Config

        config = Qwen2Config(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            use_cache=True,
        )
        config._attn_implementation = self.attn_implementation
        return config


@dataclass
class SiglipConfig:
    """The SigLIP2 vision tower (so400m/16 @ 512 in the released model)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 512
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    def to_transformers(self):
        """Build the equivalent `transformers.SiglipVisionConfig`."""
        from transformers import SiglipVisionConfig

        config = SiglipVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            vision_use_head=self.vision_use_head,
        )
        config._attn_implementation = "sdpa"
        return config


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
    t2i_prompt: str = "Generate an image: {prompt}"
    cfg_prompt: str = "Generate an image."
    edit_cfg_prompt: str = "Repeat this image."
    caption_prompt: str = "Describe the image in detail."
    max_new_tokens: int = 256


@dataclass
class UniPicConfig:
    """A complete UniPic-1 model description; `to_dict`/`from_dict` round-trip through config.json."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    mar: MARConfig = field(default_factory=MARConfig)
    head: DiffusionHeadConfig = field(default_factory=DiffusionHeadConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    siglip: SiglipConfig | None = field(default_factory=SiglipConfig)
    understanding_encoder: str = "mar"  # "mar" (the released code path) or "siglip2" (the paper's)
    image_token: str = "<image>"
    prompt_template: dict[str, Any] = field(default_factory=lambda: dict(CHATML_TEMPLATE))
    grad_scale: float = 0.1  # gradient scale on visual features fed to the LLM (spec §10-11)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model_type: str = "unipic1"

    def __post_init__(self) -> None:
        # Accept plain dicts (from JSON) for nested configs.
        for name, cls in (("vae", VAEConfig), ("mar", MARConfig), ("head", DiffusionHeadConfig),
                          ("llm", LLMConfig), ("sampling", SamplingConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, f"config.{name}"))
        if isinstance(self.siglip, dict):
            self.siglip = _from_dict(SiglipConfig, self.siglip, "config.siglip")
        # The head's input/condition widths are fixed by the VAE and the MAR decoder.
        self.head.token_dim = self.token_dim
        self.head.cond_dim = self.mar.decoder_embed_dim
        self.mar.token_dim = self.token_dim
        self.validate()

    @property
    def token_dim(self) -> int:
        """Width of one image token: VAE latent channels × patch area."""
        return self.vae.embed_dim * self.mar.patch_size**2

    @property
    def pixel_stride(self) -> int:
        """Pixels per image token along each side."""
        return self.mar.vae_stride * self.mar.patch_size

    def validate(self) -> None:
        """Raise ValueError if the parts do not fit together."""
        if self.understanding_encoder not in ("mar", "siglip2"):
            raise ValueError(f"understanding_encoder must be 'mar' or 'siglip2', got {self.understanding_encoder!r}")
        if self.understanding_encoder == "siglip2" and self.siglip is None:
            raise ValueError("understanding_encoder='siglip2' needs a siglip config")
        if self.sampling.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"sampling.cfg_schedule must be 'constant' or 'linear', got {self.sampling.cfg_schedule!r}")
        if self.vae.stride != self.mar.vae_stride:
            raise ValueError(f"the VAE's stride ({self.vae.stride}) must equal mar.vae_stride ({self.mar.vae_stride})")
        for key in ("image_size", "understanding_image_size"):
            value = getattr(self.sampling, key)
            if value % self.pixel_stride:
                raise ValueError(f"sampling.{key}={value} is not a multiple of {self.pixel_stride}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the model folder's config.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniPicConfig:
        """Build from a config.json dict; unknown keys are an error naming the valid ones."""
        return _from_dict(cls, data, "config")

    def save(self, path: str | Path) -> None:
        """Write config.json atomically."""
        from unipic.io_utils import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> UniPicConfig:
        """Read a config.json written by `save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _from_dict(cls, data: dict[str, Any], where: str):
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


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def unipic1_1_5b() -> UniPicConfig:
    """The released Skywork-UniPic-1.5B layout (MAR-H at 512 px, Qwen2.5-1.5B, SigLIP2 so400m/16)."""
    return UniPicConfig(
        vae=VAEConfig(),
        mar=MARConfig(img_size=512, encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                      decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16, buffer_size=64,
                      class_num=1000),
        head=DiffusionHeadConfig(depth=12, width=1536, num_sampling_steps=100),
        llm=LLMConfig(),
        siglip=SiglipConfig(),
        # Upstream scripts: 1024 px for every task (image2text.py --image_size 1024) and answers of up
        # to 1024 new tokens; the paper's 512 px understanding resolution is not what the release runs.
        sampling=SamplingConfig(image_size=1024, understanding_image_size=1024, num_iter=32, max_new_tokens=1024),
    )


def _byte_tokenizer_llm(**kwargs: Any) -> LLMConfig:
    # Byte-level toy tokenizer: 256 bytes + 3 ChatML specials + `<image>` (ids 256..259).
    return LLMConfig(vocab_size=512, bos_token_id=None, eos_token_id=258, **kwargs)


def unipic1_tiny() -> UniPicConfig:
    """The tiny test layout of `unipic1_tiny_config.json` (about 4.8M parameters)."""
    return UniPicConfig(
        vae=VAEConfig(ch=32),
        mar=MARConfig(img_size=64, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                      decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, buffer_size=4,
                      class_num=10),
        head=DiffusionHeadConfig(depth=2, width=64, num_sampling_steps=10),
        llm=_byte_tokenizer_llm(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        siglip=SiglipConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=64, patch_size=16),
        sampling=SamplingConfig(image_size=128, understanding_image_size=64, num_iter=4, max_new_tokens=32),
    )


def unipic1_medium() -> UniPicConfig:
    """A ~100M-parameter layout for benchmarks: every part scaled down from the 1.5B model."""
    return UniPicConfig(
        vae=VAEConfig(ch=64),
        mar=MARConfig(img_size=256, encoder_embed_dim=512, encoder_depth=6, encoder_num_heads=8,
                      decoder_embed_dim=512, decoder_depth=6, decoder_num_heads=8, buffer_size=16,
                      class_num=10),
        head=DiffusionHeadConfig(depth=6, width=768, num_sampling_steps=50),
        llm=_byte_tokenizer_llm(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192),
        siglip=None,
        sampling=SamplingConfig(image_size=256, understanding_image_size=256, num_iter=16, max_new_tokens=64),
    )


PRESETS = {
    "unipic1-1.5b": unipic1_1_5b,
    "unipic1-medium": unipic1_medium,
    "unipic1-tiny": unipic1_tiny,
}


def get_preset(name: str) -> UniPicConfig:
    """A fresh config for a named preset (ValueError listing the names for an unknown one)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
