"""Qwen2-VL prompt processing without torchvision: chat template, image patches, placeholder expansion.

transformers 5 cannot build `Qwen2VLProcessor` unless torchvision is installed (its video
processor class is looked up even when no video is given), and this package does not require
torchvision. `load_processor` returns the real `Qwen2VLProcessor` where it can be built and
otherwise `QwenVLChatProcessor`, which does the processor's job for images from the same saved
folder, with the same outputs:

1. the chat is rendered with the folder's chat template (the tokenizer's renderer);
2. the image processor (PIL backend) turns the images into patches and `image_grid_thw`;
3. each `<|image_pad|>` becomes grid_t * grid_h * grid_w / merge² copies, image by image;
4. the text is tokenized with padding; `mm_token_type_ids` marks image tokens with 1, which
   Qwen2.5-VL in transformers 5 needs to give image tokens their 3-D rotary positions.

UniPic-3 calls the processor with `do_resize=False`, so both backends see the same pixels; the
PIL backend's rescale-then-normalise differs from the torchvision one's fused step only in
float32 rounding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature

logger = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class QwenVLChatProcessor:
    """The image half of `Qwen2VLProcessor`: tokenizer + image processor + chat template.

    Args:
        tokenizer: the Qwen2 tokenizer (must know `<|image_pad|>`).
        image_processor: a Qwen2-VL image processor (PIL or torchvision backend).
        chat_template: Jinja chat template; defaults to the tokenizer's.
    """

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> QwenVLChatProcessor:
        """Read a saved `Qwen2VLProcessor` folder (tokenizer files, preprocessor_config.json, chat template)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = Path(folder)
        return cls(AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder),
                   read_chat_template(folder))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the folder layout `Qwen2VLProcessor.save_pretrained` writes, so either class can load it."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}) + "\n")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            **kwargs) -> str:
        """Render `messages` with the chat template (text only; images appear as placeholders)."""
        if self.chat_template is None:
            raise ValueError("the Qwen processor folder has no chat template (chat_template.jinja/.json)")
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def __call__(self, text: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None, *,
                 do_resize: bool = True, padding: bool = True, return_tensors: str = "pt") -> BatchFeature:
        """Token ids, mask, `mm_token_type_ids`, and (with images) `pixel_values` and `image_grid_thw`."""
        text = list(text)
        data: dict = {}
        if images:
            flat = [image for sample in images for image in sample]
            vision = self.image_processor(images=flat, do_resize=do_resize, return_tensors="pt")
            data.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            merge = self.image_processor.merge_size**2
            counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
            expanded = []
            for chat in text:
                pieces = chat.split(IMAGE_PAD)
                # Each placeholder, in order, stands for one image's merged patches.
                expanded.append(pieces[0] + "".join(IMAGE_PAD * next(counts) + piece for piece in pieces[1:]))
            leftover = next(counts, None)
            if leftover is not None:
                raise ValueError(f"got {len(flat)} images but fewer {IMAGE_PAD} placeholders in the text")
            text = expanded
        tokens = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        data.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        data["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).to(torch.int32)
        return BatchFeature(data=data, tensor_type=return_tensors)


def read_chat_template(folder: Path) -> str | None:
    """The chat template saved in a processor folder (chat_template.jinja or chat_template.json), if any."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return None


def load_processor(folder: str | Path):
    """`Qwen2VLProcessor.from_pretrained(folder)` where transformers can build it, else `QwenVLChatProcessor`."""
    try:
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, ValueError, TypeError) as error:  # transformers 5 without torchvision
        logger.debug("Qwen2VLProcessor unavailable (%s); using QwenVLChatProcessor", type(error).__name__)
        return QwenVLChatProcessor.from_pretrained(folder)


def build_processor(tokenizer, image_processor, chat_template: str):
    """A `Qwen2VLProcessor` from parts where transformers can build it, else `QwenVLChatProcessor`."""
    try:
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
    except (ImportError, AttributeError, ValueError, TypeError):
        return QwenVLChatProcessor(tokenizer, image_processor, chat_template)
