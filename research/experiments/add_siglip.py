"""Give a model folder its own small SigLIP understanding tower, freshly initialised (issue 9).

Copies every tensor of MODEL into a model whose config adds a `siglip` tower of the given size and
sets `understanding_encoder: siglip2`, so image-to-text reads pixels through the new tower instead
of the MAR encoder (whose features lose shape: `shape_probe.py`); generation is unchanged.

    python research/experiments/add_siglip.py runs/shapes/sft/final runs/exp/s10/sig-init --hidden 128 --layers 2
"""

from __future__ import annotations

import argparse
import dataclasses

from unipic.unipic1.checkpoint import build_model, load_model_folder, save_model_folder
from unipic.unipic1.models.config import SiglipConfig


def main() -> None:
    """Write OUT: MODEL's weights plus a fresh SigLIP tower and projector."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="unipic model folder to start from")
    parser.add_argument("out", help="new model folder")
    parser.add_argument("--hidden", type=int, default=128, help="tower width (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="tower depth (default 2)")
    parser.add_argument("--patch", type=int, default=16, help="pixels per patch side (default 16)")
    args = parser.parse_args()
    model, tokenizer = load_model_folder(args.model)
    size = model.config.sampling.understanding_image_size
    tower = SiglipConfig(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, image_size=size, patch_size=args.patch, vision_use_head=False)
    config = dataclasses.replace(model.config, siglip=tower, understanding_encoder="siglip2")
    fresh = build_model(config, seed=0)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("siglip2") for k in missing), (missing, unexpected)
    fresh.image_token_id = model.image_token_id
    save_model_folder(fresh, tokenizer, args.out)
    extra = sum(p.numel() for n, p in fresh.named_parameters() if n.startswith("siglip2"))
    print(f"wrote {args.out}: {extra / 1e6:.2f}M new parameters ({len(missing)} tensors)")


if __name__ == "__main__":
    main()
