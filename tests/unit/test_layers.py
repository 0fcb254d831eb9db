"""Layers point one way: the import graph of `src/unipic` (every import statement, also those inside
functions) has no arrow from `models/` into `eval/` or `loading`, none from `config` into `models/`,
and none from `loading` into `eval/`."""

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
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "unipic"


@pytest.mark.parametrize("source, target", [("models", "eval"), ("models", "loading"), ("config", "models"),
                                            ("loading", "eval")])
def test_no_import_against_the_layers(source: str, target: str) -> None:
    arrows = sorted((a, b) for a, b in _edges() if _layer(a) == source and _layer(b) == target)
    assert arrows == [], f"{source} must not import {target}: {arrows}"


def test_the_graph_is_read() -> None:
    """The walk sees real arrows (so an empty result above means something)."""
    assert ("unipic.models.unipic", "unipic.models.config") in _edges()
    assert ("unipic.models.config", "unipic.config") in _edges()
