"""How fast can a model of the embedded LLM's size learn to answer world questions? (issue 9)

A standalone screen, outside UniPic: a fresh Qwen2 of the embedded LLM's size (hidden 192, 4 layers)
reads the frozen shipped VAE's tokens of a scene (projected, plus a learned position table) and one
question, and names the one-word answer from its last row (count, color, shape, relation; no
captions). It separates what the task costs from what UniPic's plumbing costs, and screens the
prompt order:

- `img_q`: image rows, then the question (UniPic's chat layout: the image rows cannot see the
  question, so the question's few rows must find the named object among 64 image rows);
- `q_img`: the question, then the image rows, then one answer row (each image row can test itself
  against the question, so finding the named object is local).

`--encoder-layers K` puts K bidirectional transformer layers over the image rows first (the MAR
encoder's role). Scored on the evaluation questions (`i2t_eval_set`, held-out pairs included).

    python research/experiments/vqa_order.py --order img_q --steps 3000 --out runs/exp/s10/order-img_q.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from unipic.loading import default_model_folder
from unipic.unipic1.checkpoint import load_model_folder
from unipic.unipic1.sampling.prompts import images_to_tensor
from unipic.unipic1.tokenizer import load_tokenizer
from unipic.world import render
from unipic.world.examples import i2t_eval_set, i2t_example
from unipic.world.questions import _parse_question, named_objects
from unipic.world.scene import covered_cells
from unipic.world.spec import COLORS, SHAPES
from unipic.world.text import NUMBER_WORDS

KINDS = ("count", "color", "shape", "relation")
ANSWERS = tuple(NUMBER_WORDS[:5]) + tuple(COLORS) + tuple(SHAPES) + ("yes", "no")


def encode_examples(examples: list, vae_model, tokenizer, size: int = 128) -> dict[str, torch.Tensor]:
    """VAE tokens (N, L, C), left-padded question ids (N, Q), their mask, answer classes, kinds."""
    token_rows = []
    with torch.no_grad():
        for start in range(0, len(examples), 128):
            chunk = examples[start:start + 128]
            pixels = images_to_tensor([render(e.scene, size) for e in chunk], torch.device("cpu"))
            token_rows.append(vae_model.encode_images(pixels).float())
    ids = [tokenizer(e.question.question).input_ids for e in examples]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    question = torch.tensor([[pad] * (width - len(i)) + i for i in ids])  # (N, Q) left-padded
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    answers = torch.tensor([ANSWERS.index(e.question.answer) for e in examples])
    kinds = torch.tensor([KINDS.index(e.question.kind) for e in examples])
    return {"tokens": torch.cat(token_rows), "question": question, "mask": mask, "answer": answers, "kind": kinds,
            **object_labels(examples, token_rows[0].shape[1])}


def relation_pair(e) -> tuple | None:
    """A relation question's two objects in the question's order (first shape, second shape), else None."""
    if e.question.kind != "relation":
        return None
    first_shape = _parse_question(e.question.question)[1].group(1)
    a, b = named_objects(e.scene, e.question)
    return (a, b) if a.shape == first_shape else (b, a)


def named_rows(examples: list, num_tokens: int, split_relation: bool = False) -> torch.Tensor:
    """(N, 2, L) bool: per head, the token cells covered by the object(s) each question names (none
    for a count of zero): the rows an answer has to look at. All go to head 0, unless
    `split_relation`: then a relation question's first shape goes to head 0 and its second to head 1."""
    side = int(num_tokens ** 0.5)
    rows = torch.zeros(len(examples), 2, num_tokens, dtype=torch.bool)
    for n, e in enumerate(examples):
        pair = relation_pair(e) if split_relation else None
        by_head = [[o] for o in pair] if pair else [named_objects(e.scene, e.question)]
        for head, objects in enumerate(by_head):
            for o in objects:
                rows[n, head, covered_cells(o.box, side, side)] = True
    return rows


def relation_signs(examples: list) -> torch.Tensor:
    """(N, 2) float: for a relation question, whether its first shape lies left of and above its
    second (centre against centre); -1 for other kinds."""
    signs = torch.full((len(examples), 2), -1.0)
    for n, e in enumerate(examples):
        pair = relation_pair(e)
        if pair:
            first, second = pair
            signs[n] = torch.tensor([float(first.cx < second.cx), float(first.cy < second.cy)])
    return signs


def object_labels(examples: list, num_tokens: int) -> dict[str, torch.Tensor]:
    """Per scene: its object count, and per token the shape and color of the object centred there
    (class `len(SHAPES)` / `len(COLORS)` where none is)."""
    side = int(num_tokens ** 0.5)
    shapes = torch.full((len(examples), num_tokens), len(SHAPES))
    colors = torch.full((len(examples), num_tokens), len(COLORS))
    for n, e in enumerate(examples):
        for o in e.scene.objects:
            cell = min(int(o.cy * side), side - 1) * side + min(int(o.cx * side), side - 1)
            shapes[n, cell], colors[n, cell] = SHAPES.index(o.shape), tuple(COLORS).index(o.color)
    return {"objects": torch.tensor([len(e.scene.objects) for e in examples]), "token_shape": shapes,
            "token_color": colors}


class Reader(nn.Module):
    """Image rows + question → answer class, with the embedded LLM's shape."""

    def __init__(self, token_dim: int, num_tokens: int, vocab: int, order: str, encoder_layers: int,
                 stem: str = "linear") -> None:
        super().__init__()
        hidden = 192
        self.order = order
        self.side = int(num_tokens ** 0.5)
        if stem == "conv":
            # Two 3×3 convolutions over the token grid: each row sees its neighbours before attention.
            self.proj = nn.Sequential(nn.Conv2d(token_dim, hidden, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(hidden, hidden, 3, padding=1))
        else:
            self.proj = nn.Sequential(nn.Linear(token_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.stem = stem
        self.position = nn.Parameter(torch.randn(1, num_tokens, hidden) * 0.02)
        layer = nn.TransformerEncoderLayer(hidden, 4, 512, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, encoder_layers) if encoder_layers else None
        self.answer_row = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.llm = Qwen2Model(Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=512,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, attn_implementation="eager"))
        self.attention: tuple | None = None
        self.head = nn.Linear(hidden, len(ANSWERS))
        self.shape_readout = nn.Linear(hidden, len(SHAPES) + 1)
        self.color_readout = nn.Linear(hidden, len(COLORS) + 1)
        self.position_readout = nn.Linear(hidden, 2)
        self.compare_readout = nn.Linear(hidden, 2)
        self.answer_hidden: torch.Tensor | None = None
        self.image_rows: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor, question: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, C) tokens, (B, Q) left-padded ids and mask → (B, answers) logits."""
        if self.stem == "conv":
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.side, self.side)  # (B, C, h, w)
            image = self.proj(grid).flatten(2).transpose(1, 2) + self.position  # (B, L, hidden)
        else:
            image = self.proj(tokens) + self.position  # (B, L, hidden)
        if self.encoder is not None:
            image = self.encoder(image)
        self.image_rows = image  # kept for the training-only read-out loss
        text = self.llm.get_input_embeddings()(question)  # (B, Q, hidden)
        ones = mask.new_ones(image.shape[:2])
        if self.order == "img_q":
            # The question's left padding sits between image and question, masked out.
            inputs = torch.cat([image, text], 1)
            full_mask = torch.cat([ones, mask], 1)
        else:
            answer = self.answer_row.expand(tokens.shape[0], 1, -1)
            inputs = torch.cat([text, image, answer], 1)
            full_mask = torch.cat([mask, ones, mask.new_ones(mask.shape[0], 1)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=inputs, attention_mask=full_mask, position_ids=positions,
                       output_attentions=self.training)
        self.attention = out.attentions  # per layer (B, heads, T, T); image rows first in img_q
        self.answer_hidden = out.last_hidden_state[:, -1]  # kept for the training-only comparison read-out
        return self.head(self.answer_hidden)


def accuracy_by_kind(model: Reader, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy per question kind and their mean (the VQA score of `unipic eval i2t`)."""
    model.eval()
    with torch.no_grad():
        right = torch.cat([model(data["tokens"][s:s + 256], data["question"][s:s + 256], data["mask"][s:s + 256])
                           .argmax(-1) == data["answer"][s:s + 256] for s in range(0, len(data["answer"]), 256)])
    model.train()
    scores = {k: round(float(right[data["kind"] == i].float().mean()), 3) for i, k in enumerate(KINDS)}
    scores["vqa"] = round(sum(scores.values()) / len(KINDS), 3)
    return scores


def main() -> None:
    """Train one reader and print its learning curve."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", choices=("img_q", "q_img"), default="img_q", help="prompt order (see above)")
    parser.add_argument("--encoder-layers", type=int, default=0, help="bidirectional layers over the image rows")
    parser.add_argument("--stem", choices=("linear", "conv"), default="linear",
                        help="how image tokens become rows: per token (linear) or two 3×3 convolutions (conv)")
    parser.add_argument("--curriculum", type=int, default=0,
                        help="steps over which scenes may hold at most 1, 2, 3 objects in turn (0: none)")
    parser.add_argument("--aux", type=float, default=0.0,
                        help="weight of a per-row read-out of the shape and color centred there")
    parser.add_argument("--attend", type=float, default=0.0,
                        help="weight of a loss that puts one head's attention from the last row on the named object's rows")
    parser.add_argument("--attend-layer", type=int, default=1, help="layer of that head (default 1)")
    parser.add_argument("--aux-position", type=float, default=0.0,
                        help="weight of a per-row regression of the row's own grid position (x, y in 0..1)")
    parser.add_argument("--split-relation", action="store_true",
                        help="with --attend: a relation question's first shape on head 0, its second on head 1")
    parser.add_argument("--aux-compare", type=float, default=0.0,
                        help="weight of a read-out, from the answer row, of whether a relation's first shape is left of / above its second")
    parser.add_argument("--kinds", default=",".join(KINDS), help="question kinds to train on (comma-separated)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--batch", type=int, default=64, help="questions per step (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--pool", type=int, default=20000, help="training examples, rendered and encoded once")
    parser.add_argument("--cache", default="runs/exp/s10/vqa_pool.pt", help="where the encoded pool is kept")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between scores")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="JSON file for the curve")
    args = parser.parse_args()
    if not set(args.kinds.split(",")) <= set(KINDS):
        parser.error(f"--kinds takes some of {','.join(KINDS)}")
    if args.attend and args.order != "img_q":
        parser.error("--attend needs --order img_q (the image rows first)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cache = Path(args.cache)
    if cache.exists():
        pool, test = torch.load(cache, weights_only=True)
    else:
        folder = default_model_folder()
        vae_model, _ = load_model_folder(folder)
        tokenizer = load_tokenizer(folder)
        train_examples = [i2t_example(21, i, kind=KINDS[i % 4]) for i in range(args.pool)]
        test_examples = [e for e in i2t_eval_set(100, seed=0) if e.question.kind in KINDS]
        pool, test = encode_examples(train_examples, vae_model, tokenizer), encode_examples(test_examples, vae_model, tokenizer)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((pool, test), cache)
    num_tokens = pool["tokens"].shape[1]
    pool_examples = [i2t_example(21, i, kind=KINDS[i % 4]) for i in range(len(pool["answer"]))]
    pool["relation_signs"] = relation_signs(pool_examples)
    pool["named_rows"] = named_rows(pool_examples, num_tokens, args.split_relation)
    # Scale tokens to unit spread (as the trained MAR sees them).
    spread = pool["tokens"].std()
    pool["tokens"], test["tokens"] = pool["tokens"] / spread, test["tokens"] / spread
    model = Reader(pool["tokens"].shape[-1], pool["tokens"].shape[1], int(pool["question"].max()) + 1,
                   args.order, args.encoder_layers, args.stem)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    generator = torch.Generator().manual_seed(1)
    trained = torch.isin(pool["kind"], torch.tensor([KINDS.index(k) for k in args.kinds.split(",")]))
    allowed_by_phase = [torch.nonzero((pool["objects"] <= k) & trained).flatten() for k in (1, 2, 3)]
    every = torch.nonzero(trained).flatten()
    side = int(num_tokens ** 0.5)
    centres = (torch.arange(side) + 0.5) / side
    xy = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(1, num_tokens, 2)  # cell centres (1, L, 2)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        if step <= args.curriculum:
            allowed = allowed_by_phase[min(3 * (step - 1) // args.curriculum, 2)]
            idx = allowed[torch.randint(0, len(allowed), (args.batch,), generator=generator)]
        else:
            idx = every[torch.randint(0, len(every), (args.batch,), generator=generator)]
        logits = model(pool["tokens"][idx], pool["question"][idx], pool["mask"][idx])
        answer_loss = nn.functional.cross_entropy(logits, pool["answer"][idx])
        loss = answer_loss
        extra_losses: dict[str, float] = {}
        if args.attend:
            target = pool["named_rows"][idx]  # (B, 2, L): heads 0 and 1
            has = target.any(-1)
            weights = model.attention[args.attend_layer][:, :2, -1, :target.shape[-1]]  # heads 0-1, last row → image rows
            on_target = (weights * target).sum(-1).clamp(min=1e-6)
            loss = loss + args.attend * -(on_target.log() * has).sum() / has.sum().clamp(min=1)
        if args.aux:
            rows = model.image_rows  # (B, L, hidden)
            loss = loss + args.aux * (
                nn.functional.cross_entropy(model.shape_readout(rows).flatten(0, 1), pool["token_shape"][idx].flatten())
                + nn.functional.cross_entropy(model.color_readout(rows).flatten(0, 1), pool["token_color"][idx].flatten()))
        if args.aux_position:
            predicted = model.position_readout(model.image_rows)  # (B, L, 2)
            loss = loss + args.aux_position * nn.functional.mse_loss(predicted, xy.expand_as(predicted))
        if args.aux_compare:
            signs = pool["relation_signs"][idx]  # (B, 2); -1 off relation questions
            asked = signs[:, 0] >= 0
            if bool(asked.any()):
                compare_loss = nn.functional.binary_cross_entropy_with_logits(
                    model.compare_readout(model.answer_hidden[asked]), signs[asked])
                loss = loss + args.aux_compare * compare_loss
                extra_losses["compare_loss"] = round(compare_loss.item(), 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "minutes": round((time.perf_counter() - start) / 60, 2), "loss": round(answer_loss.item(), 3), **extra_losses,
                   **accuracy_by_kind(model, test)}
            curve.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
