"""Tiny random UniPic-2 models and folders, built offline in about a second, for tests and smoke runs.

The sizes are those of `unipic2_tiny_config.json` (spec §9): every class is the real library
class with toy dimensions and the real dimensional relations. Tokenizers cannot be downloaded
here, so we build them locally from a small built-in corpus:
- CLIP-L/CLIP-G: byte-level BPE with CLIP's `</w>` end-of-word marker (merges learned below);
- T5: a Unigram model whose pieces are the corpus words and single characters;
- Qwen2: byte-level BPE plus Qwen's special tokens at the ids the tiny Qwen config expects.

Usage:
    save_tiny_kontext("/tmp/unipic2-kontext-tiny")
    save_tiny_metaquery("/tmp/unipic2-mq-tiny")          # Qwen saved inside, under mllm*/
    save_tiny_metaquery("/tmp/mq", qwen_folder="/tmp/qwen")  # Qwen in its own folder
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import Counter
from pathlib import Path

import torch

TINY_CONFIG: dict = {
    "image_size_for_tests": [64, 48],
    "sd35m_kontext": {
        "transformer": {
            "sample_size": 32, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
            "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 64,
            "caption_projection_dim": 32, "pooled_projection_dim": 48, "pos_embed_max_size": 32,
            "dual_attention_layers": [0], "qk_norm": "rms_norm",
        },
        "vae": {
            "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "latent_channels": 4, "sample_size": 64, "use_quant_conv": False, "use_post_quant_conv": False,
            "scaling_factor": 1.5305, "shift_factor": 0.0609,
        },
        "text_encoder": {
            "vocab_size": 1000, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "projection_dim": 16, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 1,
        },
        "text_encoder_2": {
            "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "projection_dim": 32, "max_position_embeddings": 77,
            "hidden_act": "gelu", "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 1,
        },
        "text_encoder_3": {
            "vocab_size": 1000, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4,
            "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu",
        },
        "tokenizers": {"clip_max_length": 77, "t5_max_sequence_length": 16},
        "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
        "pipeline_call": {"num_inference_steps": 2, "guidance_scale": 3.5, "height": 64, "width": 48},
    },
    "metaquery": {
        "qwen2_5_vl": {
            "text_config": {
                "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
                "bos_token_id": 1004, "eos_token_id": 1005, "pad_token_id": 1006,
            },
            "vision_config": {
                "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                "fullatt_block_indexes": [1], "tokens_per_second": 2,
            },
            "image_token_id": 1000, "video_token_id": 1001, "vision_start_token_id": 1002, "vision_end_token_id": 1003,
        },
        "image_processor": {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2},
        "conditioner": {
            "num_queries": 8, "llm_hidden_size": 64, "pooled_projection_dim": 48, "joint_attention_dim": 64,
            "connector_config": {
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06, "attention_dropout": 0.0,
            },
        },
    },
}

# Qwen special tokens, in the id order of the tiny config (1000 = image pad ... 1006 = pad).
QWEN_SPECIAL_TOKENS = (
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>",
    "<|endoftext|>",
)

# Training text for the tiny tokenizers: prompt-like words, so common words become single tokens.
_CORPUS = """a photo of a cat sitting on a red chair next to a blue dog in the garden at sunset
make it red turn the sky blue add a hat remove the background replace the car with a bicycle
generate an image of two green apples and three yellow bananas on a wooden table
describe the image in detail what color is the square left of the circle
a small purple triangle above a large orange diamond on a gray background
high quality detailed painting of a mountain lake with trees and snow under a clear sky
blurry low quality low resolution distorted deformed broken content missing parts damaged details
artifacts glitch noise pixelated grainy compression artifacts bad composition wrong proportion
incomplete editing unfinished unedited areas white black brown pink star heart cross hexagon"""


# ---------------------------------------------------------------------------- tokenizers


def _learn_bpe(word_counts: Counter, max_merges: int, end_of_word: str = "") -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    words = {w: tuple(w[:-1]) + (w[-1] + end_of_word,) for w in word_counts if w}
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs: Counter = Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += word_counts[word]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for word, symbols in words.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[word] = tuple(merged)
    return merges


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def tiny_clip_tokenizer(model_max_length: int = 77):
    """CLIP byte-level BPE with `</w>` word ends; <|startoftext|>=998, <|endoftext|>=999 (= pad)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    merges = _learn_bpe(Counter(_CORPUS.split()), max_merges=998 - 2 * len(alphabet), end_of_word="</w>")
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = 998  # ids the tiny CLIP configs expect (bos/eos)
    vocab["<|endoftext|>"] = 999
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """T5 Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, then characters and whole corpus words."""
    from transformers import T5Tokenizer

    words = Counter(_CORPUS.split())
    total = sum(words.values())
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(ch, -8.0) for ch in chars]  # characters: a fallback segmentation for any word
    pieces += [("\u2581" + w, math.log(c / total)) for w, c in sorted(words.items())]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_qwen_tokenizer(model_max_length: int = 512):
    """Qwen2 byte-level BPE (< 1000 ids) plus Qwen's special tokens at ids 1000-1006."""
    from transformers import Qwen2Tokenizer

    alphabet = _byte_alphabet()
    pre_tokenizer = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer  # Qwen's split regex + byte mapping
    words: Counter = Counter()
    for line in _CORPUS.split("\n"):
        for piece, _ in pre_tokenizer.pre_tokenize_str(line):
            words[piece] += 1
    merges = _learn_bpe(words, max_merges=1000 - len(alphabet))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[token] = 1000 + offset
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS),
        model_max_length=model_max_length,
    )


def tiny_qwen_image_processor():
    """Qwen2-VL image processor (the PIL backend when torchvision is missing) with the tiny patch sizes."""
    try:  # transformers >= 5 ships a PIL backend; the default class needs torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import Qwen2VLImageProcessor as cls
    return cls(**TINY_CONFIG["metaquery"]["image_processor"])


# ---------------------------------------------------------------------------- models


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the CPU RNG inside a fork, so building tiny models never changes the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_kontext_components(seed: int = 0) -> dict:
    """Random tiny components of `StableDiffusion3KontextPipeline` (a dict of its constructor arguments)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from unipic.unipic2.transformer_sd3_kontext import SD3Transformer2DKontextModel

    cfg = TINY_CONFIG["sd35m_kontext"]
    with _seeded(seed):
        components = {
            "transformer": SD3Transformer2DKontextModel(**cfg["transformer"]).eval(),
            "vae": AutoencoderKL(**cfg["vae"]).eval(),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"])).eval(),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])).eval(),
            "text_encoder_3": T5EncoderModel(T5Config(**cfg["text_encoder_3"])).eval(),
        }
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    components["tokenizer"] = tiny_clip_tokenizer(cfg["tokenizers"]["clip_max_length"])
    components["tokenizer_2"] = tiny_clip_tokenizer(cfg["tokenizers"]["clip_max_length"])
    components["tokenizer_3"] = tiny_t5_tokenizer()
    return components


def build_tiny_kontext_pipeline(seed: int = 0):
    """A random tiny `StableDiffusion3KontextPipeline` on the CPU in float32."""
    from unipic.unipic2.pipeline_kontext import StableDiffusion3KontextPipeline

    pipe = StableDiffusion3KontextPipeline(**build_tiny_kontext_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_qwen(seed: int = 0):
    """(model, tokenizer, image_processor) of a random tiny Qwen2.5-VL."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    q = copy.deepcopy(TINY_CONFIG["metaquery"]["qwen2_5_vl"])
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**q)).eval()
    text = q["text_config"]
    # Greedy by default; stop at <|im_end|> or <|endoftext|> like the real Qwen2.5-VL-Instruct.
    model.generation_config = GenerationConfig(
        eos_token_id=[text["eos_token_id"], text["pad_token_id"]],
        pad_token_id=text["pad_token_id"],
        do_sample=False,
    )
    return model, tiny_qwen_tokenizer(), tiny_qwen_image_processor()


def build_tiny_conditioner(seed: int = 0):
    """A random tiny `StableDiffusion3Conditioner` (queries random rather than upstream's zeros)."""
    from unipic.unipic2.conditioner import StableDiffusion3Conditioner

    with _seeded(seed), torch.no_grad():
        conditioner = StableDiffusion3Conditioner(**copy.deepcopy(TINY_CONFIG["metaquery"]["conditioner"])).eval()
        conditioner.meta_queries.normal_(std=0.02)
    return conditioner


def build_tiny_metaquery_pipeline(seed: int = 0, with_mllm: bool = True):
    """A random tiny `UniPic2MetaQueryPipeline` (DiT/VAE/scheduler shared with the tiny Kontext sizes)."""
    from unipic.unipic2.pipeline_metaquery import UniPic2MetaQueryPipeline

    parts = build_tiny_kontext_components(seed)
    mllm, tokenizer, image_processor = build_tiny_qwen(seed + 1) if with_mllm else (None, None, None)
    pipe = UniPic2MetaQueryPipeline(
        transformer=parts["transformer"],
        scheduler=parts["scheduler"],
        vae=parts["vae"],
        conditioner=build_tiny_conditioner(seed + 2),
        mllm=mllm,
        mllm_tokenizer=tokenizer,
        mllm_image_processor=image_processor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0):
    """A PIL image of uniform noise (mode "RGB", "RGBA" or "L") for tests and smoke runs."""
    import numpy as np
    from PIL import Image

    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = (np.random.default_rng(seed).random((height, width, channels)) * 255).astype("uint8")
    return Image.fromarray(data[..., 0] if channels == 1 else data)  # mode follows the shape


# ---------------------------------------------------------------------------- folders


def save_tiny_kontext(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny UniPic2-SD3.5M-Kontext folder in the diffusers `model_index.json` layout."""
    folder = Path(folder)
    build_tiny_kontext_pipeline(seed).save_pretrained(folder)
    return folder


def save_qwen_folder(folder: str | Path, model, tokenizer, image_processor) -> Path:
    """Save Qwen2.5-VL model, tokenizer and image processor together, as a hub Qwen folder holds them."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def save_tiny_metaquery(folder: str | Path, qwen_folder: str | Path | None = None, seed: int = 0) -> Path:
    """Write a tiny UniPic2-MetaQuery folder.

    Args:
        folder: destination (transformer/, vae/, conditioner/, scheduler/, model_index.json).
        qwen_folder: where to save the tiny Qwen2.5-VL. None saves it inside `folder` as the
            `mllm`, `mllm_tokenizer` and `mllm_image_processor` components; a path saves a
            stand-alone Qwen folder there and leaves those components null (load with `qwen_path`).
        seed: random seed of the weights.
    """
    from unipic.unipic2.loading import save_metaquery_pipeline

    folder = Path(folder)
    pipe = build_tiny_metaquery_pipeline(seed, with_mllm=True)
    if qwen_folder is None:
        save_metaquery_pipeline(pipe, folder, include_mllm=True)
    else:
        save_qwen_folder(qwen_folder, pipe.mllm, pipe.mllm_tokenizer, pipe.mllm_image_processor)
        save_metaquery_pipeline(pipe, folder, include_mllm=False)
    return folder
