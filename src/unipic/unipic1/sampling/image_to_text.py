"""Image-to-text with UniPic-1: visual features replace the `<image>` rows of a chat prompt and
transformers' `generate` continues from `inputs_embeds`.

Batches are LEFT-padded here (decoder-only generation appends on the right), with the attention
mask passed, so a batched answer equals the same question asked alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unipic.unipic1.sampling.prompts import padding_id, tokenize_chat


@torch.no_grad()
def answer_questions(
    model,
    tokenizer,
    pixels: torch.Tensor,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """Answer question i about image i ((B, 3, S, S) in [-1, 1]); returns the decoded answers."""
    config = model.config
    features = model.understanding_features(pixels.to(model.device))  # (B, N, hidden)
    texts = [f"{config.image_token}\n{q.strip()}" for q in questions]
    input_ids, mask = tokenize_chat(config, tokenizer, texts, device=model.device, image_rows=features.shape[1],
                                    side="left")
    pad = padding_id(tokenizer)
    embeds = model.fill_image_rows(input_ids, features)
    stop_ids = [i for i in tokenizer.convert_tokens_to_ids(list(config.prompt_template["STOP_WORDS"]))
                if i is not None and i != tokenizer.unk_token_id]
    options = {"do_sample": do_sample}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    output = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                eos_token_id=stop_ids, pad_token_id=pad, **options)
    answers = []
    for row in output:
        text = tokenizer.decode(row, skip_special_tokens=True)
        for stop in config.prompt_template["STOP_WORDS"]:
            text = text.split(stop)[0]
        answers.append(text.strip())
    return answers
