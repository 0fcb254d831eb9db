"""Layers point one way: the import graph of `src/unipic` (every import statement, also those inside
functions) has no arrow against the layers below.

- A model family (`unipic1/`, `unipic2/`, `unipic3/`) imports no front end (`cli`, `serve/`,
  `eval/`, `loading`) and no other family, except that UniPic-3 builds on UniPic-2's Qwen2.5-VL
  pieces (its tiny Qwen tokenizer and the memory arithmetic of Qwen2.5-VL-7B); UniPic-1's networks (`unipic1.models`) do not import its
  sampling loops or pipeline, and its settings do not import its networks.
- The shared pieces the families build on (`api`, `checks`, `images`, `io_utils`, `inpainting`,
  `interrupt`, `world/`) import no family, and `loading` imports no evaluator.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def _edges() -> set[tuple[str, str]]:
    """(importing module, imported unipic module) for every import statement under src/unipic."""
    edges = set()
    for path in (SRC / "unipic").rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            else:
                continue
            edges.update((module, target) for target in targets if target.startswith("unipic"))
    return edges


def _layer(module: str) -> str:
    """`unipic.unipic1.models.mar` -> `unipic1.models`; `unipic.eval.t2i` -> `eval`."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "unipic1":
        return "unipic1." + parts[2]
    return parts[1] if len(parts) > 1 else "unipic"


FAMILIES = ("unipic1", "unipic2", "unipic3")
FRONT_ENDS = ("cli", "cli_common", "serve", "eval", "loading")
SHARED = ("api", "checks", "images", "io_utils", "inpainting", "interrupt", "world")
RULES = (
    [(family, front) for family in FAMILIES for front in FRONT_ENDS]
    + [(a, b) for a in FAMILIES for b in FAMILIES if a != b and (a, b) != ("unipic3", "unipic2")]
    + [(shared, family) for shared in SHARED for family in FAMILIES]
    + [("unipic1.models", "unipic1.sampling"), ("unipic1.models", "unipic1.pipeline"),
       ("unipic1.settings", "unipic1.models"), ("loading", "eval")]
)


def _in(layer: str, group: str) -> bool:
    return layer == group or layer.startswith(group + ".")


@pytest.mark.parametrize("source, target", RULES)
def test_no_import_against_the_layers(source: str, target: str) -> None:
    arrows = sorted((a, b) for a, b in _edges() if _in(_layer(a), source) and _in(_layer(b), target))
    assert arrows == [], f"{source} must not import {target}: {arrows}"


def test_the_graph_is_read() -> None:
    """The walk sees real arrows (so an empty result above means something)."""
    assert ("unipic.unipic1.models.unipic", "unipic.unipic1.models.config") in _edges()
    assert ("unipic.unipic1.models.config", "unipic.unipic1.settings") in _edges()
    assert ("unipic.loading", "unipic.unipic1.pipeline") in _edges()
