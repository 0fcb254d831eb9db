"""MetaQuery conditioner: learnable queries + a SigLIP-style connector that drive the SD3 DiT.

The frozen Qwen2.5-VL reads the prompt (and the input image) followed by `num_queries` learnable
query slots; the conditioner maps the last-layer states of those slots to what SD3's three text
encoders would have produced (spec §4.2-4.3):

    h (B, Q, llm_hidden) --projector_1--> (B, Q, H) --connector (24 pre-LN encoder layers)--> x
    prompt_embeds = projector_3(x)                (B, Q, joint_attention_dim)  # replaces CLIP+T5 tokens
    pooled        = projector_2(mean_Q(x))        (B, pooled_projection_dim)   # replaces CLIP pooled

The connector is transformers' `SiglipEncoder` module for module and key for key, so we compose
it rather than re-implement it. Config keys and parameter names follow the upstream
`StableDiffusion3Conditioner`, so an upstream `conditioner/` folder loads strictly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder

logger = logging.getLogger(__name__)

# Connector config keys that shape the SigLIP encoder; anything else upstream stores (notably
# `_attn_implementation: flash_attention_2`, which breaks on machines without flash-attn) is ignored.
_CONNECTOR_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def connector_config_from_dict(connector_config: dict[str, Any], attn_implementation: str = "sdpa") -> SiglipVisionConfig:
    """Build the `SiglipVisionConfig` of the connector from the upstream `connector_config` dict."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    ignored = sorted(k for k in connector_config if k not in _CONNECTOR_KEYS and not k.startswith("_"))
    if ignored:
        logger.debug("connector_config keys not used by the SigLIP encoder: %s", ignored)
    config = SiglipVisionConfig(**{k: v for k, v in connector_config.items() if k in _CONNECTOR_KEYS})
    # Set the kernel explicitly: upstream's value (flash_attention_2) or a missing one both fail (spec §10.4).
    config._attn_implementation = attn_implementation
    return config


class StableDiffusion3Conditioner(ModelMixin, ConfigMixin):
    """Meta queries, connector and the three projections of UniPic2-MetaQuery.

    Args:
        connector_config: SigLIP encoder settings (hidden_size, intermediate_size, num_hidden_layers,
            num_attention_heads, hidden_act, layer_norm_eps, attention_dropout).
        num_queries: number of learnable query slots appended after the prompt (256 full size).
        llm_hidden_size: hidden size of the MLLM whose states are read (3584 for Qwen2.5-VL-7B).
        pooled_projection_dim: width of the pooled vector the DiT expects (2048).
        joint_attention_dim: width of the sequence the DiT's context_embedder expects (4096).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        connector_config: dict[str, Any],
        num_queries: int = 256,
        llm_hidden_size: int = 3584,
        pooled_projection_dim: int = 2048,
        joint_attention_dim: int = 4096,
    ):
        super().__init__()
        siglip_config = connector_config_from_dict(connector_config)
        hidden = siglip_config.hidden_size
        # Registration order = upstream state-dict order (meta_queries, connector, projector_1..3).
        # Upstream initialises the queries to zeros; trained weights always overwrite them.
        self.meta_queries = nn.Parameter(torch.zeros(num_queries, llm_hidden_size))
        self.connector = SiglipEncoder(siglip_config)
        self.projector_1 = nn.Linear(llm_hidden_size, hidden)  # MLLM width -> connector width
        self.projector_2 = nn.Linear(hidden, pooled_projection_dim)  # mean-pooled -> pooled embedding
        self.projector_3 = nn.Linear(hidden, joint_attention_dim)  # per token -> sequence embedding

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """Choose the connector's attention kernel: "sdpa" (default) or "eager"."""
        config = connector_config_from_dict(self.config.connector_config, attn_implementation)
        self.connector.config._attn_implementation = config._attn_implementation
        for layer in self.connector.layers:
            layer.self_attn.config._attn_implementation = config._attn_implementation

    def forward(self, query_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map MLLM query states to DiT conditioning.

        Args:
            query_states: last-layer MLLM states at the query slots, shape (B, Q, llm_hidden_size).

        Returns:
            `(prompt_embeds, pooled_prompt_embeds)` of shapes (B, Q, joint_attention_dim) and
            (B, pooled_projection_dim).
        """
        x = self.projector_1(query_states.to(self.projector_1.weight.dtype))  # (B, Q, H)
        # Bidirectional attention over the queries: no mask, no positions, no final LayerNorm.
        x = self.connector(inputs_embeds=x, attention_mask=None).last_hidden_state  # (B, Q, H)
        prompt_embeds = self.projector_3(x)  # (B, Q, joint_attention_dim)
        pooled_prompt_embeds = self.projector_2(x.mean(dim=1))  # (B, pooled_projection_dim)
        return prompt_embeds, pooled_prompt_embeds
