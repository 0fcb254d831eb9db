"""Layering facts of the UniPic-1 sampler (issue 11): import arrows from `models/` into `sampling/`,
the files the guidance scale (`cfg`) crosses, and where "is guidance on?" is decided.

    python research/experiments/sampling_layers.py [--rev GIT_REV]

Reads the sources with `ast` (from the working tree, or from a git revision with --rev), so it
needs neither torch nor the package importable.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The UniPic-1 sampling path; the other families, training, eval and the server are not on it.
# sampling/reference.py is the plain baseline loop of tests and benchmarks, not on the user path.
SKIP = ("unipic2/", "eval/", "training/", "serve/", "world/", "data/", "convert/", "sampling/reference.py")


def sources(rev: str | None) -> dict[str, str]:
    """{path under src/unipic: text} at `rev` (None: the working tree)."""
    if rev is None:
        return {str(p.relative_to(ROOT / "src/unipic")): p.read_text()
                for p in sorted((ROOT / "src/unipic").rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "src/unipic"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return {n.removeprefix("src/unipic/"): subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, capture_output=True,
                                                          text=True, check=True).stdout
            for n in names if n.endswith(".py")}


def imported(tree: ast.AST) -> set[str]:
    """Every module an `import` / `from ... import` names, at any depth (function-level imports too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def cfg_files(files: dict[str, ast.AST]) -> list[str]:
    """Files on the UniPic-1 path that take, pass or read the guidance scale `cfg`."""
    hits = []
    for name, tree in files.items():
        if name.startswith(SKIP):
            continue
        for node in ast.walk(tree):
            takes = isinstance(node, ast.arg) and node.arg == "cfg"
            passes = isinstance(node, ast.keyword) and node.arg == "cfg"
            reads = isinstance(node, ast.Attribute) and node.attr == "cfg" and name == "cli.py"
            keyed = isinstance(node, ast.Constant) and node.value == "cfg"  # settings["cfg"], {"cfg": ...}
            if takes or passes or reads or keyed:
                hits.append(name)
                break
    return hits


def guidance_decisions(files: dict[str, ast.AST]) -> list[str]:
    """`x != 1` / `x == 1` comparisons of a cfg/scale name: places that decide whether guidance is on."""
    where = []
    for name, tree in files.items():
        if name.startswith(SKIP):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
                sides = [node.left, node.comparators[0]]
                named = [s for s in sides if isinstance(s, ast.Name) and "cfg" in s.id]
                one = [s for s in sides if isinstance(s, ast.Constant) and s.value == 1]
                if named and one:
                    where.append(f"{name}:{node.lineno}")
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default=None, help="git revision to read instead of the working tree")
    args = parser.parse_args()
    texts = sources(args.rev)
    trees = {name: ast.parse(text) for name, text in texts.items()}
    arrows = sorted(f"{name} -> {mod}" for name, tree in trees.items() if name.startswith("models/")
                    for mod in imported(tree) if mod.startswith("unipic.unipic1.sampling") and mod.count(".") == 2)
    print(f"source: {args.rev or 'working tree'}")
    print(f"import arrows models/ -> sampling/: {len(arrows)}" + "".join(f"\n  {a}" for a in arrows))
    crossed = cfg_files(trees)
    print(f"files the cfg value crosses: {len(crossed)} ({', '.join(crossed)})")
    decisions = guidance_decisions(trees)
    print(f"places deciding whether guidance is on: {len(decisions)} ({', '.join(decisions)})")


if __name__ == "__main__":
    main()
