"""SD3.5-Medium MMDiT extended Kontext-style: clean reference-image tokens share the image stream.

UniPic-2 (Skywork UniPic 2.0, arXiv 2509.04548) retrains SD3.5-Medium for editing without adding
a single parameter: the clean VAE latent of the input image is patch-embedded by the *same*
`pos_embed` as the noisy target (so both get identical 2-D sin-cos positions), prepended to the
image stream, and dropped again before the output head. Everything else is diffusers'
`SD3Transformer2DModel`, so a checkpoint folder loads key for key into either class.

Deliberate differences from the upstream `SD3Transformer2DKontextModel`:
- `ref_latents` is keyword-only and comes last, so positional calls written for SD3 keep working.
- ControlNet residuals are added to the target tokens only (upstream would fail on the length).
- Bad reference shapes raise a `ValueError` that names both shapes instead of a bare `assert`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin, SD3Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

try:  # diffusers >= 0.36 scales/unscales LoRA layers with this decorator
    from diffusers.utils import apply_lora_scale
except ImportError:  # pragma: no cover - older diffusers handle the LoRA scale elsewhere

    def apply_lora_scale(kwargs_name: str = "joint_attention_kwargs"):
        return lambda forward_fn: forward_fn


# A saved model_index.json names this module as the transformer's library; diffusers then looks up
# the loadable base classes (ModelMixin) in this module's namespace, so keep the name exported.
__all__ = ["ModelMixin", "SD3Transformer2DKontextModel"]

class SD3Transformer2DKontextModel(SD3Transformer2DModel):
    """`SD3Transformer2DModel` whose forward accepts optional reference-image latents.

    `__init__` is inherited unchanged, so the config, the parameters and the persistent
    `pos_embed.pos_embed` buffer are exactly SD3's. Without `ref_latents` the forward performs the
    same operations as the parent's and its output is bit-identical.
    """

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
        *,
        ref_latents: torch.Tensor | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """Predict the flow velocity of `hidden_states`, optionally conditioned on a reference image.

        Args:
            hidden_states: noisy target latents, shape (B, C, H, W).
            encoder_hidden_states: text (or MetaQuery) sequence, shape (B, L, joint_attention_dim).
            pooled_projections: pooled conditioning vector, shape (B, pooled_projection_dim).
            timestep: diffusion time, shape (B,).
            block_controlnet_hidden_states: optional ControlNet residuals for the target tokens.
            joint_attention_kwargs: passed to the attention processors (`scale` = LoRA scale).
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.
            skip_layers: indices of blocks to skip (skip-layer guidance).
            ref_latents: clean, normalised VAE latents of the reference image, shape (B, C, H, W):
                the same shape as `hidden_states`, since both share one positional grid.

        Returns:
            The prediction for the target only, shape (B, C_out, H, W).

        Raises:
            ValueError: if `ref_latents` does not have the shape of `hidden_states`.
        """
        height, width = hidden_states.shape[-2:]

        # 1. Patchify + 2-D sin-cos positions; pos_embed's output is a non-contiguous view.
        hidden_states = self.pos_embed(hidden_states).contiguous()  # (B, N, D)
        num_target = hidden_states.shape[1]
        if ref_latents is not None:
            if ref_latents.shape != (hidden_states.shape[0], self.config.in_channels, height, width):
                raise ValueError(
                    f"`ref_latents` must have the shape of the noisy latents "
                    f"{(hidden_states.shape[0], self.config.in_channels, height, width)}, got {tuple(ref_latents.shape)}; "
                    "encode a reference image of the output size (and repeat it per sample)"
                )
            # Same pos_embed => reference token i gets exactly target token i's position (spec §2).
            ref_tokens = self.pos_embed(ref_latents.to(hidden_states.dtype)).contiguous()  # (B, N, D)
            hidden_states = torch.cat([ref_tokens, hidden_states], dim=1)  # (B, 2N, D), reference first

        # 2. Conditioning: the reference tokens are modulated by the same timestep embedding.
        temb = self.time_text_embed(timestep, pooled_projections)  # (B, D)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)  # (B, L, D)

        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            ip_adapter_image_embeds = joint_attention_kwargs.pop("ip_adapter_image_embeds")
            ip_hidden_states, ip_temb = self.image_proj(ip_adapter_image_embeds, timestep)
            joint_attention_kwargs.update(ip_hidden_states=ip_hidden_states, temb=ip_temb)

        # 3. Joint attention over [text ; reference ; target]; no masks anywhere.
        for index_block, block in enumerate(self.transformer_blocks):
            is_skip = skip_layers is not None and index_block in skip_layers
            if torch.is_grad_enabled() and self.gradient_checkpointing and not is_skip:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs
                )
            elif not is_skip:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    joint_attention_kwargs=joint_attention_kwargs,
                )

            if block_controlnet_hidden_states is not None and block.context_pre_only is False:
                interval_control = len(self.transformer_blocks) / len(block_controlnet_hidden_states)
                residual = block_controlnet_hidden_states[int(index_block / interval_control)]
                if ref_latents is None:
                    hidden_states = hidden_states + residual
                else:  # ControlNet residuals describe the target grid only
                    hidden_states = torch.cat(
                        [hidden_states[:, :-num_target], hidden_states[:, -num_target:] + residual], dim=1
                    )

        # 4. Keep the target tokens (the last N); norm_out/proj_out are per token, so order is moot.
        hidden_states = hidden_states[:, -num_target:]  # (B, N, D)
        hidden_states = self.norm_out(hidden_states, temb)
        hidden_states = self.proj_out(hidden_states)  # (B, N, p*p*C_out)

        # 5. Unpatchify, exactly as SD3 does.
        patch_size = self.config.patch_size
        height = height // patch_size
        width = width // patch_size
        hidden_states = hidden_states.reshape(
            shape=(hidden_states.shape[0], height, width, patch_size, patch_size, self.out_channels)
        )
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(
            shape=(hidden_states.shape[0], self.out_channels, height * patch_size, width * patch_size)
        )  # (B, C_out, H, W)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
