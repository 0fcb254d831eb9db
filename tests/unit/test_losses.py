"""Each task's training loss is finite and reaches the parts it should train."""

from __future__ import annotations

import pytest
import torch

from unipic.training.losses import edit_loss, image_to_text_loss, text_to_image_loss
from unipic.unipic1.sampling.prompts import expand_image_placeholder, format_instruction, tokenize_padded


@pytest.fixture()
def fresh_model():
    from unipic.loading import tiny_random_model

    model, tokenizer = tiny_random_model(seed=1)
    # The head's output layers start at zero (DiT init), which blocks every gradient upstream of
    # them; give them small values so the test sees gradients reach the MAR, LLM and projectors.
    with torch.no_grad():
        for name, param in model.mar.diffloss.named_parameters():
            if not param.any():
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model.train(), tokenizer


def _ids(tokenizer, texts):
    return tokenize_padded(tokenizer, texts, pad_id=tokenizer.eos_token_id, device=torch.device("cpu"))


def _grads(model, prefix):
    return [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]


def test_text_to_image_loss_backpropagates(fresh_model):
    model, tokenizer = fresh_model
    ids, mask = _ids(tokenizer, [format_instruction(model.config.prompt_template, "Generate an image: a red circle"),
                                 format_instruction(model.config.prompt_template, "Generate an image.")])
    loss = text_to_image_loss(model, torch.rand(2, 3, 64, 64) * 2 - 1, ids, mask,
                              generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for prefix in ("mar.encoder_blocks", "mar.decoder_blocks", "llm.model.layers", "proj_in", "proj_out"):
        grads = _grads(model, prefix)
        assert grads and all(g is not None for g in grads), prefix
        assert any(g.abs().sum() > 0 for g in grads), prefix
    assert all(p.grad is None for p in model.vae.parameters()), "the VAE is frozen"


def test_edit_loss_backpropagates(fresh_model):
    model, tokenizer = fresh_model
    grid = (4, 4)
    text = expand_image_placeholder(format_instruction(model.config.prompt_template, "<image>\nRemove the star."),
                                    "<image>", model.num_image_tokens(grid))
    ids, mask = _ids(tokenizer, [text])
    loss = edit_loss(model, torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1, ids, mask,
                     generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert model.mar.decoder_embed.weight.grad is not None
    assert model.proj_in[0].weight.grad.abs().sum() > 0


def test_image_to_text_loss_backpropagates(fresh_model):
    model, tokenizer = fresh_model
    count = model.num_understanding_tokens(64)
    prompt = expand_image_placeholder(format_instruction(model.config.prompt_template, "<image>\nHow many stars?"),
                                      "<image>", count)
    answer = "two<|im_end|>"
    ids, mask = _ids(tokenizer, [prompt + answer])
    labels = ids.clone()
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels[:, :prompt_len] = -100
    loss = image_to_text_loss(model, torch.rand(1, 3, 64, 64) * 2 - 1, ids, mask, labels)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.llm.model.embed_tokens.weight.grad is not None
    assert model.mar.encoder_blocks[0].attn.qkv.weight.grad.abs().sum() > 0, "features must receive gradient"


def test_grad_scale_is_the_runs_setting_and_scales_only_the_visual_features(fresh_model):
    """`loss.grad_scale` reaches the loss as an argument (the model's config is not rewritten): the
    MAR encoder's gradient scales with it, the LLM's does not."""
    model, tokenizer = fresh_model
    model.eval()  # no dropout: the two backward passes must see the same forward
    count = model.num_understanding_tokens(64)
    prompt = expand_image_placeholder(format_instruction(model.config.prompt_template, "<image>\nHow many stars?"),
                                      "<image>", count)
    ids, mask = _ids(tokenizer, [prompt + "two<|im_end|>"])
    labels = ids.clone()
    labels[:, : len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = -100
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    grads = {}
    for scale in (1.0, 0.25):
        model.zero_grad()
        image_to_text_loss(model, pixels, ids, mask, labels, grad_scale=scale).backward()
        grads[scale] = (model.mar.encoder_blocks[0].attn.qkv.weight.grad.clone(),
                        model.llm.model.layers[0].mlp.up_proj.weight.grad.clone())
    assert model.config.grad_scale == 0.1  # untouched
    torch.testing.assert_close(grads[0.25][0], grads[1.0][0] * 0.25)
    torch.testing.assert_close(grads[0.25][1], grads[1.0][1])
    assert grads[1.0][0].abs().sum() > 0


def test_siglip_understanding_path_runs():
    from unipic.unipic1.checkpoint import build_model
    from unipic.unipic1.models.presets import unipic1_tiny
    from unipic.unipic1.pipeline import UniPicPipeline
    from unipic.unipic1.tokenizer import build_byte_tokenizer

    config = unipic1_tiny()
    config.understanding_encoder = "siglip2"
    model = build_model(config, seed=0)
    tokenizer = build_byte_tokenizer()
    model.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    features = model.understanding_features(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert features.shape == (2, model.num_understanding_tokens(64), config.llm.hidden_size) == (2, 16, 64)
    from PIL import Image

    [answer] = UniPicPipeline(model, tokenizer).image_to_text([Image.new("RGB", (50, 80))], ["What is it?"],
                                                              max_new_tokens=3)
    assert isinstance(answer, str)


def test_training_masks_follow_the_models_mask_ratio_spread(fresh_model):
    from unipic.training.losses import _masked_targets

    model, _ = fresh_model
    tokens = torch.zeros(2, 64, 4)
    generator = torch.Generator().manual_seed(0)
    default = [float(_masked_targets(model, tokens, generator).mean()) for _ in range(50)]
    assert min(default) >= 0.7  # MAR's truncated normal never trains a mostly visible image
    model.config.mar.mask_ratio_min, model.config.mar.mask_ratio_std = 0.0, 10.0
    wide = [float(_masked_targets(model, tokens, generator).mean()) for _ in range(50)]
    assert sum(r < 0.3 for r in wide) >= 5
