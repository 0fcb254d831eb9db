"""`UniPicConfig`: the architecture of one UniPic-1 model, as its config.json stores it.

One `UniPicConfig` describes a whole model: the KL-16 VAE, the MAR encoder/decoder with its
diffusion head, the Qwen2 LLM, an optional SigLIP2 understanding tower, the projectors between
them, the prompt format and the model's default sampling settings. Component configs live next
to their modules (`vae.py`, `mar.py`, `diffusion_head.py`; the LLM and SigLIP parts here, mapped
onto transformers' `Qwen2Config` / `SiglipVisionConfig`). Values that follow from others (the
token width, the pixel stride) are properties here and are passed to the constructors that need
them, never stored twice. Named presets: `unipic.unipic1.models.presets`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unipic.unipic1.models.diffusion_head import DiffusionHeadConfig
from unipic.unipic1.models.mar import MARConfig
from unipic.unipic1.models.vae import VAEConfig
from unipic.unipic1.settings import CHATML_TEMPLATE, SamplingConfig, from_dict

__all__ = ["LLMConfig", "SiglipConfig", "UniPicConfig"]


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
    grad_scale: float = 0.1  # the released config records it (spec §10-11); training uses its own loss.grad_scale
    # Editing, our extension (upstream: False). True: the instruction precedes the source's `<image>`
    # rows, and those rows' LLM states add to x_con through proj_out, so every hidden position starts
    # from a source feature that has read the instruction (research/shapes-model-notebook.md, "Fifteenth session").
    edit_source_through_llm: bool = False
    # Editing, our extension (upstream: False; needs edit_source_through_llm). True: a linear head on
    # the source rows' LLM states predicts which token cells hold objects the instruction leaves
    # alone; the edit sampler keeps those cells at the source's tokens and regenerates only the rest
    # (research/shapes-model-notebook.md, "Seventeenth session").
    edit_keep_mask: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model_type: str = "unipic1"

    def __post_init__(self) -> None:
        # Accept plain dicts (from JSON) for nested configs; the VAE first, the MAR's legacy keys need it.
        if isinstance(self.vae, dict):
            self.vae = from_dict(VAEConfig, self.vae, "config.vae")
        if isinstance(self.mar, dict):
            self.mar = from_dict(MARConfig, self._without_legacy_copies(self.mar), "config.mar")
        if isinstance(self.head, dict):
            self.head = from_dict(DiffusionHeadConfig, self._head_without_legacy_copies(self.head), "config.head")
        for name, cls in (("llm", LLMConfig), ("sampling", SamplingConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_dict(cls, value, f"config.{name}"))
        if isinstance(self.siglip, dict):
            self.siglip = from_dict(SiglipConfig, self.siglip, "config.siglip")
        self.validate()

    def _head_without_legacy_copies(self, head: dict[str, Any]) -> dict[str, Any]:
        """`head` minus the widths earlier config.json files stored there (they follow from the VAE and
        the MAR decoder and are passed to DiffusionHead), refused where they disagree."""
        head = dict(head)
        for key, derived in (("token_dim", self.token_dim), ("cond_dim", self.mar.decoder_embed_dim)):
            stored = head.pop(key, None)
            if stored is not None and stored != derived:
                raise ValueError(f"config.head.{key}={stored} disagrees with the value the VAE and MAR imply "
                                 f"({derived}); remove head.{key}")
        return head

    def _without_legacy_copies(self, mar: dict[str, Any]) -> dict[str, Any]:
        """`mar` minus the derived values earlier config.json files stored there, checked where they can disagree."""
        mar = dict(mar)
        stride = mar.pop("vae_stride", None)
        if stride is not None and stride != self.vae.stride:
            raise ValueError(f"config.mar.vae_stride={stride} disagrees with the VAE's stride ({self.vae.stride}); "
                             "the stride follows from the VAE (vae.patch_size, vae.ch_mult): remove mar.vae_stride")
        mar.pop("token_dim", None)  # always replaced by vae.embed_dim × mar.patch_size² when it was stored
        return mar

    @property
    def token_dim(self) -> int:
        """Width of one image token: VAE latent channels × patch area."""
        return self.vae.embed_dim * self.mar.patch_size**2

    @property
    def pixel_stride(self) -> int:
        """Pixels per image token along each side: the VAE's stride × the MAR patch size."""
        return self.vae.stride * self.mar.patch_size

    @property
    def trained_grid_size(self) -> int:
        """Side of the token grid the MAR position tables are stored for (32 for 512 px at stride 16)."""
        return self.mar.img_size // self.pixel_stride

    def validate(self) -> None:
        """Raise ValueError if the parts do not fit together."""
        if self.understanding_encoder not in ("mar", "siglip2"):
            raise ValueError(f"understanding_encoder must be 'mar' or 'siglip2', got {self.understanding_encoder!r}")
        if self.understanding_encoder == "siglip2" and self.siglip is None:
            raise ValueError("understanding_encoder='siglip2' needs a siglip config")
        if self.edit_keep_mask and not self.edit_source_through_llm:
            raise ValueError("edit_keep_mask reads the source rows' LLM states after the instruction: "
                             "it needs edit_source_through_llm=true")
        if not 0.0 < self.sampling.edit_keep_threshold < 1.0:
            raise ValueError(f"sampling.edit_keep_threshold must lie in (0, 1), got {self.sampling.edit_keep_threshold}")
        if self.sampling.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"sampling.cfg_schedule must be 'constant' or 'linear', got {self.sampling.cfg_schedule!r}")
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
        return from_dict(cls, data, "config")

    def save(self, path: str | Path) -> None:
        """Write config.json atomically."""
        from unipic.io_utils import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> UniPicConfig:
        """Read a config.json written by `save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
