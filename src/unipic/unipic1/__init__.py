"""UniPic-1: a Qwen2.5 LLM between a masked-autoregressive image encoder/decoder with a per-token
diffusion head (KL-16 VAE latents) and an optional SigLIP2 understanding tower.

`models/` holds the networks, `sampling/` the numerical loops, `pipeline` the `UnifiedPipeline`
front (`UniPicPipeline`), `checkpoint` model folders and strict loading, `tokenizer` the Qwen2.5
and tiny tokenizers, `convert` the official release's conversion and `settings` the sampling
defaults and the JSON loader of the config dataclasses.
"""
