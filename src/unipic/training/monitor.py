"""What a run shows while it trains: metrics.csv, loss.png, sample grids and quick Shapes-world scores.

Everything here runs on the main process and writes files atomically. The quick evaluation
judges a handful of generated images, answers and edits with the world's exact judge
(`unipic.world`), the same rules the full evaluators apply, on a small fixed set so that it
costs seconds, not minutes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unipic.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text, save_image_atomic

METRICS_FILE = "metrics.csv"
PLOT_FILE = "loss.png"


# ---------------------------------------------------------------------------------------------
# metrics.csv
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.csv with a header fixed at the start of the run; blank cells where a value is absent.

    On resume, rows after the checkpoint's step (written by the killed run after its last
    checkpoint) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, columns: Sequence[str], resume_step: int | None) -> None:
        self.path = path
        self.columns = list(columns)
        rows: list[dict] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if r.get("step") and int(r["step"]) <= resume_step]
        self._write(rows)

    def _write(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())

    def append(self, row: dict) -> None:
        # Appending (not rewriting) keeps this O(1); a torn last line is dropped by `read_metrics`.
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: _fmt(v) for k, v in row.items()})


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.csv with numbers parsed (blank → None); incomplete rows are skipped."""
    if not path.is_file():
        return []
    out = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                out.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
            except ValueError:
                continue
    return out


def plot_losses(metrics_path: Path, out_path: Path, title: str) -> None:
    """loss.png: the task losses (log scale) and the learning rate against the step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    if not rows:
        return
    fig = Figure(figsize=(8, 6), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in rows]
    for key in rows[0]:
        if key.startswith("loss_") or key == "loss":
            points = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None and r[key] > 0]
            if points:
                top.plot(*zip(*points), label=key, linewidth=1.2 if key == "loss" else 1.0)
    top.set_yscale("log")
    top.set_ylabel("loss")
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    top.set_title(title)
    lr = [(s, r["lr"]) for s, r in zip(steps, rows) if r.get("lr") is not None]  # eval rows have no lr
    if lr:
        bottom.plot(*zip(*lr), color="gray")
    bottom.set_ylabel("lr")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(out_path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Sample grids
# ---------------------------------------------------------------------------------------------


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2) -> Image.Image:
    """Tile rows of equally sized images (rows may differ in length) on a white background."""
    width, height = rows[0][0].size
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * (width + pad) + pad, len(rows) * (height + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image, (pad + j * (width + pad), pad + i * (height + pad)))
    return grid


def save_samples(path: Path, rows: Sequence[Sequence[Image.Image]], captions: dict) -> None:
    """samples/step-N.png plus a .json side file saying what each row shows."""
    save_image_atomic(image_grid(rows), path)
    atomic_write_json(path.with_suffix(".json"), captions)


def unipic_samples(pipeline, prompts: Sequence[str], tasks: Sequence[str], size: int, *, num_iter: int,
                   head_steps: int, cfg: float, seed: int) -> tuple[list[list[Image.Image]], dict]:
    """Generated images for `prompts` (row 1), and for stages that train them, world edits
    (row 2: sources, row 3: results) and answers to world questions (in the captions)."""
    from unipic.data.datasets import render_example
    from unipic.world.examples import make_example

    options = {"num_iter": num_iter, "head_steps": head_steps, "cfg": cfg}
    images = [im[0] for im in pipeline.text_to_image(list(prompts), height=size, width=size, seed=seed, **options)]
    rows, captions = [images], {"row 1 (text to image)": list(prompts)}
    if "edit" in tasks:
        edits = [render_example("edit", make_example("edit", seed, i, train=False), i, size) for i in range(len(prompts))]
        results = pipeline.edit_image([e["source"] for e in edits], [e["instruction"] for e in edits],
                                      height=size, width=size, seed=seed, **options)
        rows += [[e["source"] for e in edits], results]
        captions["rows 2-3 (edit: source, result)"] = [e["instruction"] for e in edits]
    if "i2t" in tasks:
        asks = [render_example("i2t", make_example("i2t", seed, i, train=False), i, size) for i in range(4)]
        answers = pipeline.image_to_text([a["image"] for a in asks], [a["question"] for a in asks])
        rows.append([a["image"] for a in asks])
        captions[f"row {len(rows)} (image to text)"] = [
            {"question": a["question"], "answer": a["answer"], "model": m} for a, m in zip(asks, answers)]
    return rows, captions


# ---------------------------------------------------------------------------------------------
# Quick evaluation with the world's judge
# ---------------------------------------------------------------------------------------------


def quick_eval(pipeline, tasks: Sequence[str], size: int, per_kind: int, *, num_iter: int, head_steps: int,
               cfg: float, seed: int = 0) -> dict[str, float]:
    """Fraction correct per task on a small fixed evaluation set (held-out pairs included).

    - t2i: ShapesEval prompts (`per_kind` of each of the six GenEval categories), judged;
    - i2t: `per_kind` questions of each of the five kinds, scored as `score_answer`;
    - edit: `per_kind` edits of each of the five kinds, judged as `edit_succeeded`.
    The judge is exact for S >= 128; at smaller sizes the numbers are only indicative.
    """
    from unipic.eval.probe import probe_verdicts

    verdicts = probe_verdicts(pipeline, per_kind, size, seed, tasks, num_iter=num_iter, head_steps=head_steps, cfg=cfg)
    scores = {f"eval_{task}": float(np.mean([row["correct"] for row in rows])) for task, rows in verdicts.items()}
    return scores


@torch.no_grad()
def vae_eval(vae, size: int, count: int, seed: int = 0) -> tuple[dict[str, float], list[list[Image.Image]]]:
    """Reconstruction PSNR and the judge's exact-scene rate on `count` evaluation renders, plus a
    grid (originals, reconstructions) of the first eight."""
    from unipic.unipic1.sampling.prompts import images_to_tensor, tensor_to_images
    from unipic.world import judge, matches_scene, render
    from unipic.world.examples import i2t_example

    scenes = [i2t_example(seed, i, train=False).scene for i in range(count)]
    originals = [render(s, size) for s in scenes]
    device = next(vae.parameters()).device
    pixels = images_to_tensor(originals, device)
    recon = vae.decode(vae.encode(pixels)).float().clamp(-1, 1)
    mse = ((recon - pixels) ** 2).mean(dim=(1, 2, 3))  # on [-1, 1]: peak-to-peak 2
    psnr = float(torch.mean(10 * torch.log10(4.0 / mse.clamp_min(1e-10))))
    images = tensor_to_images(recon)
    exact = float(np.mean([matches_scene(judge(im), s) for im, s in zip(images, scenes)]))
    return {"eval_psnr": psnr, "eval_judge": exact}, [originals[:8], images[:8]]
