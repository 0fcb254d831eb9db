"""Shared reporting helpers for the evaluators: score slices, printed tables, process sync."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from unipic.api import UserError
from unipic.distributed import process_rank_and_world


def output_folder(out_dir: str | Path) -> Path:
    """Create the evaluation's output folder (UserError when the path is a file)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_image_size(size: int | None) -> None:
    """`--size`, when given, must be an integer of at least 16 pixels."""
    if size is not None and (not isinstance(size, int) or size < 16):
        raise UserError(f"--size must be an integer >= 16, got {size!r}")


def announce_plan(what: str, count: int, *, done: int = 0, noun: str = "images to draw",
                  progress: bool = True) -> None:
    """Say up front how much work a long evaluation has left (stderr, one line; silent with --quiet)."""
    if not progress:
        return
    rank, world = process_rank_and_world()
    who = f"process {rank + 1}/{world}: " if world > 1 else ""
    skipped = f" ({done} already done, skipped)" if done else ""
    print(f"{who}{what}: {count} {noun}{skipped}; the progress bar shows the time left", file=sys.stderr, flush=True)


def score(rows: Sequence[dict], key: str = "correct") -> dict:
    """{"score": mean of row[key] (None when empty), "n": number of rows}."""
    n = len(rows)
    return {"score": (sum(bool(r[key]) for r in rows) / n) if n else None, "n": n}


def by_group(rows: Sequence[dict], group: Callable[[dict], str], order: Iterable[str],
             key: str = "correct") -> dict[str, dict]:
    """`score` per group, groups in `order` first (those with rows), then any others sorted."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(group(row), []).append(row)
    names = [g for g in order if g in groups] + sorted(g for g in groups if g not in set(order))
    return {g: score(groups[g], key) for g in names}


def mean_of(scores: dict[str, dict], names: Sequence[str]) -> float | None:
    """Mean of the named groups' scores (None when any is missing, so a partial run never
    reports an 'overall' that silently skips a category)."""
    values = [scores[n]["score"] for n in names if n in scores and scores[n]["score"] is not None]
    return sum(values) / len(values) if len(values) == len(names) else None


def format_table(title: str, entries: Sequence[tuple[str, float | None, int | None]]) -> str:
    """A plain text table: name, score (3 decimals or '-'), n."""
    width = max([len(name) for name, _, _ in entries] + [len("category")])
    lines = [title, f"{'category':<{width}}  {'score':>6}  {'n':>6}", "-" * (width + 16)]
    for name, value, n in entries:
        shown = "-" if value is None else f"{value:.3f}"
        lines.append(f"{name:<{width}}  {shown:>6}  {'' if n is None else n:>6}")
    return "\n".join(lines)


def summarize_kinds(rows: Sequence[dict], benchmark: str, kinds: Sequence[str]) -> dict:
    """Success per case kind, their mean (`overall`), the held-out / seen slices and the count."""
    scores = by_group(rows, lambda r: r["kind"], kinds)
    return {
        "benchmark": benchmark,
        "overall": mean_of(scores, kinds),
        "kinds": scores,
        "held_out": score([r for r in rows if r["held_out"]]),
        "seen": score([r for r in rows if not r["held_out"]]),
        "n": len(rows),
    }


def kinds_table(summary: dict, title: str, kinds: Sequence[str]) -> str:
    """The printed table of a `summarize_kinds` result over `kinds`."""
    entries = [(kind, e["score"], e["n"]) for kind, e in summary["kinds"].items()]
    entries += [(f"overall (mean of {len(kinds)})", summary["overall"], None),
                ("held-out pairs", summary["held_out"]["score"], summary["held_out"]["n"]),
                ("seen pairs", summary["seen"]["score"], summary["seen"]["n"])]
    return format_table(title, entries)


def wait_for_all_processes() -> bool:
    """Under `accelerate launch` (WORLD_SIZE > 1) wait until every process got here.

    Returns True on the main process (rank 0), which then does the single-process work
    (judging, summaries); False on the others.
    """
    rank, world = process_rank_and_world()
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    return rank == 0
