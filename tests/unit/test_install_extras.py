"""Every command works after the install its docs name (base, `[train]`, `[serve]`, `[unipic2]`).

How: the test builds, from the test environment's own site-packages, a folder that holds only the
distributions one install would bring: the project's base dependencies (or base + one extra) and,
recursively, everything those require (markers evaluated for this machine). Each distribution's
top-level modules and its `.dist-info` are symlinked there, so `importlib.metadata` and
`find_spec` see exactly that install and nothing else. A child interpreter started with `-S` (no
site-packages) and `-I` then imports `unipic` from `src/` on top of that folder and runs every
subcommand's `--help` plus one real call per command of that install. A module the install lacks
(scipy before issue 11, say) then fails exactly as it would for a user, without creating a venv or
downloading anything, in a few seconds per install.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test needs the 3.11 standard library's TOML reader
    tomllib = None

pytestmark = pytest.mark.skipif(tomllib is None, reason="needs Python >= 3.11 (tomllib)")


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(requirements: list[str]) -> set[str]:
    """Installed distributions (canonical names) that `requirements` pull in, transitively."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _canonical(req.name)
        if name in seen or name == "unipic":
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # e.g. a platform-only dependency this machine does not install
        seen.add(name)
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            wanted = {_canonical(e) for e in req.extras}
            if sub_req.marker is not None:
                # Keep requirements that hold without extras, or under an extra the parent asked for.
                if not any(sub_req.marker.evaluate({"extra": e}) for e in ({""} | wanted)):
                    continue
            todo.append(sub)
    return seen


def _install_folder(tmp_path: Path, extra: str | None) -> Path:
    """A folder of symlinks holding exactly the distributions of `pip install unipic[extra]`."""
    project = _project()
    requirements = list(project["dependencies"])
    if extra is not None:
        requirements += project["optional-dependencies"][extra]
    wanted = _closure(requirements)
    site = Path(sysconfig.get_paths()["purelib"])
    folder = tmp_path / f"site-{extra or 'base'}"
    folder.mkdir()
    for dist in metadata.distributions():
        if _canonical(dist.metadata["Name"]) not in wanted:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = site / top
            if source.exists() and not (folder / top).exists() and top != "__pycache__":
                (folder / top).symlink_to(source)
    return folder


def _run(folder: Path, script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` in a child interpreter that sees only `folder` and `src/` besides the stdlib."""
    prelude = f"import sys; sys.path[:0] = [{str(ROOT / 'src')!r}, {str(folder)!r}]\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-S", "-I", "-c", prelude + textwrap.dedent(script)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


# Every subcommand path; each must print its help in the base install.
HELP = [[], ["generate"], ["edit"], ["caption"], ["state-dict"], ["convert"], ["eval"], ["eval", "geneval"],
        ["eval", "judge"], ["eval", "t2i"], ["eval", "i2t"], ["eval", "edit"], ["eval", "dpg"], ["data"],
        ["data", "export"], ["train"], ["serve"]]

BASE_SCRIPT = """
import contextlib, io, json
from unipic.cli import main

def run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue()

for argv in {help}:
    code, text = run(argv + ["--help"])
    assert code == 0 and "usage:" in text, (argv, code, text[-300:])
calls = [
    ["generate", "--model", "shapes-oracle", "a red circle", "-o", "t2i.png", "--quiet"],
    ["edit", "--model", "shapes-oracle", "t2i.png", "make the circle blue", "-o", "edit.png", "--quiet"],
    ["caption", "--model", "shapes-oracle", "t2i.png"],
    ["state-dict", "--preset", "unipic1-tiny"],
    ["data", "export", "--task", "t2i", "--n", "2", "--out", "data"],
    ["eval", "i2t", "--model", "shapes-oracle", "--out", "i2t", "--n-per-kind", "1", "--quiet"],
]
results = {{" ".join(argv): run(argv)[0] for argv in calls}}
print(json.dumps(results))
"""


def test_every_command_module_imports_in_the_base_install(tmp_path: Path) -> None:
    """The fast gate (default tier): the modules behind base-install commands import without extras."""
    folder = _install_folder(tmp_path, None)
    proc = _run(folder, """
        import unipic.cli, unipic.data.cli, unipic.eval.cli, unipic.eval.t2i, unipic.eval.i2t, unipic.eval.edit
        import unipic.eval.dpg, unipic.world.oracle, unipic.loading, unipic.unipic1.pipeline, unipic.training.cli, unipic.serve.cli
        print("ok")
    """, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.slow  # a child interpreter runs every command; the import gate above stays in the default tier
def test_every_command_works_in_the_base_install(tmp_path: Path) -> None:
    """`pip install unipic`: every --help, and generate/edit/caption/state-dict/data/eval for real."""
    folder = _install_folder(tmp_path, None)
    proc = _run(folder, BASE_SCRIPT.format(help=HELP), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert results and set(results.values()) == {0}, (results, proc.stderr[-3000:])
    assert (tmp_path / "edit.png").is_file() and (tmp_path / "data" / "data.jsonl").is_file()


def test_base_install_leaves_out_the_extras(tmp_path: Path) -> None:
    """The base folder really lacks the extras' modules (so the test above proves something)."""
    folder = _install_folder(tmp_path, None)
    proc = _run(folder, """
        import importlib.util
        print([m for m in ("accelerate", "diffusers", "fastapi", "pytest", "scipy") if importlib.util.find_spec(m)])
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['scipy']"  # scipy is a base dependency: the Shapes judge needs it


TRAIN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from tiny_overrides import TINY
from unipic.cli import main
code = main(["train", {config!r}, "out_dir=run", *TINY, "train.max_steps=1"])
print("exit", code)
"""


@pytest.mark.slow
def test_train_works_in_the_train_install(tmp_path: Path) -> None:
    """`pip install unipic[train]`: one real one-step training run."""
    folder = _install_folder(tmp_path, "train")
    script = TRAIN_SCRIPT.format(tests=str(ROOT / "tests" / "training"),
                                 config=str(ROOT / "configs" / "shapes" / "pretrain.yaml"))
    proc = _run(folder, script, tmp_path)
    assert proc.returncode == 0 and "exit 0" in proc.stdout, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


@pytest.mark.slow
def test_serve_app_builds_in_the_serve_install(tmp_path: Path) -> None:
    """`pip install unipic[serve]`: the FastAPI app builds around a pipeline."""
    folder = _install_folder(tmp_path, "serve")
    proc = _run(folder, """
        from unipic.loading import load_pipeline
        from unipic.serve.app import create_app
        app = create_app(lambda: load_pipeline("shapes-oracle"), model_name="shapes-oracle")
        print(type(app).__name__)
    """, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "FastAPI", proc.stderr[-3000:]


@pytest.mark.slow
def test_unipic2_modules_import_in_the_unipic2_install(tmp_path: Path) -> None:
    """`pip install unipic[unipic2]`: the UniPic-2 pipelines and loader import."""
    folder = _install_folder(tmp_path, "unipic2")
    proc = _run(folder, """
        import unipic.unipic2.loading, unipic.unipic2.pipeline_kontext, unipic.unipic2.pipeline_metaquery
        print("ok")
    """, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
