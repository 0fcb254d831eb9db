"""A Qwen2 decoder for inference without importing transformers (issue 40: the first picture in two seconds).

`from transformers import Qwen2ForCausalLM` costs about 1.7 s on the project's CPU machine, more
than `import torch` itself (it pulls in torch._dynamo, torch.distributed.tensor, scipy and
transformers' loading machinery), while drawing an image needs only the decoder's forward pass
with a key/value cache. `Qwen2ForCausalLM` here is that forward pass, with transformers' module
tree and parameter names (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ...,
`lm_head`), so a checkpoint loads into either unchanged, and with transformers' arithmetic (the
same ops in the same order: RMSNorm in float32, rotary tables, SDPA with a boolean mask), so the
two agree to float32 rounding (tests/unit/test_light_llm.py). What it does not do — `generate`,
gradient checkpointing, training — it hands to a transformers model built on the same parameter
tensors the first time it is asked (`transformers_model`), importing transformers only then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KVCache", "Qwen2ForCausalLM", "Qwen2Model"]


class KVCache:
    """Per-layer keys and values (B, kv_heads, T, head_dim), the subset of transformers' DynamicCache used here."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self, layer: int = 0) -> int:
        """Cached positions."""
        return self.keys[layer].shape[-2] if len(self.keys) > layer else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys and values to layer `layer`'s; return all of them."""
        if len(self.keys) <= layer:
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], key], dim=-2)
            self.values[layer] = torch.cat([self.values[layer], value], dim=-2)
        return self.keys[layer], self.values[layer]

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions; negative: drop that many (transformers' convention)."""
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        self.keys = [k[..., :max_length, :] for k in self.keys]
        self.values = [v[..., :max_length, :] for v in self.values]


@dataclass
class BaseModelOutput:
    """What callers read from a forward pass (transformers' `BaseModelOutputWithPast` fields)."""

    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None


class RMSNorm(nn.Module):
    """transformers' Qwen2RMSNorm: normalised in float32, scaled in the input dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer: int) -> None:
        super().__init__()
        self.layer_idx = layer
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        shape = (*hidden.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden).view(shape).transpose(1, 2)  # (B, heads, T, d)
        k = self.k_proj(hidden).view(shape).transpose(1, 2)  # (B, kv_heads, T, d)
        v = self.v_proj(hidden).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.num_key_value_groups > 1:  # transformers' repeat_kv
            b, h, t, d = k.shape
            k = k[:, :, None].expand(b, h, self.num_key_value_groups, t, d).reshape(b, -1, t, d)
            v = v[:, :, None].expand(b, h, self.num_key_value_groups, t, d).reshape(b, -1, t, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scaling)
        out = out.transpose(1, 2).reshape(*hidden.shape[:-1], -1).contiguous()
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, mask, cache):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class RotaryEmbedding(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=like.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


class Qwen2Model(nn.Module):
    """The decoder stack (`llm.model`): embeddings, layers, final norm."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool = False) -> BaseModelOutput:
        """Hidden states of `inputs_embeds` (B, T, hidden) (or `input_ids`) after `past_key_values`' positions.

        `attention_mask` (B, past + T) marks valid positions (1) and padding (0), as transformers
        takes it; `position_ids` (B, T) default to past … past + T − 1.
        """
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(past, past + length, device=hidden.device)
        if position_ids is None:
            position_ids = positions.unsqueeze(0).expand(batch, -1)
        # (B, 1, T, past + T) boolean: causal, and never a padded key.
        mask = positions[:, None] >= torch.arange(past + length, device=hidden.device)[None, :]
        mask = mask[None, None].expand(batch, 1, length, past + length)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        cos, sin = self.rotary_emb(hidden, position_ids)
        cache = past_key_values if use_cache or past_key_values is not None else None
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, cache)
        return BaseModelOutput(self.norm(hidden), cache)


class Qwen2ForCausalLM(nn.Module):
    """`llm`: the decoder (`model`) and the output matrix (`lm_head`, tied to the embeddings when configured).

    Args:
        config: a `unipic.unipic1.models.config.LLMConfig`.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    @staticmethod
    def new_cache() -> KVCache:
        """An empty key/value cache for `model`'s forward."""
        return KVCache()

    def forward(self, *args, **kwargs):
        """Logits, via transformers (`transformers_model`); the sampler calls `model` directly."""
        return self.transformers_model()(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """transformers' `generate` on a transformers model sharing these parameters."""
        return self.transformers_model().generate(*args, **kwargs)

    def transformers_model(self):
        """transformers' Qwen2ForCausalLM over the same parameter tensors (built once, imports transformers)."""
        cached = self.__dict__.get("_transformers_model")
        if cached is None:
            from transformers import Qwen2ForCausalLM as HFQwen2ForCausalLM

            from unipic.unipic1.models.unipic import init_empty_weights

            with init_empty_weights():
                cached = HFQwen2ForCausalLM(self.config.to_transformers())
            state = dict(self.state_dict(keep_vars=True))  # the very Parameters: no copy, shared updates
            cached.load_state_dict(state, strict=False, assign=True)
            if self.config.tie_word_embeddings:
                cached.lm_head.weight = cached.model.embed_tokens.weight
            cached.to(self.model.embed_tokens.weight.device)
            cached.eval()
            self.__dict__["_transformers_model"] = cached
        return cached
