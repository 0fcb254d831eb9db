"""Start-up benchmark (issue 40): the README's first command as a fresh process, against `import torch`.

Runs, interleaved `--repeats` times, each as a fresh Python process:

- `python -c "import torch"`: the floor every command that draws pays;
- `unipic generate "a photo of a red circle left of a blue star" -o out.png` (the README's first
  command: the default model, one 128 px image, its own settings);
- `unipic --help`, `unipic CMD --help` for every command, and a usage error caught before any
  model loads (`unipic generate PROMPT --size 17`): these should not import torch at all;

then, once more in a fresh process, the breakdown of the generate command (interpreter start,
imports, model load, the first image, later images) and the heaviest imports of
`python -X importtime -m unipic generate ...`. Prints medians; the LAST line reads

    cli/torch X.XX first/later Y.YY help/torch Z.ZZ

cli/torch: the generate command's wall time over the bare torch import; first/later: the first
image of a process over a later one (same process); help/torch: the slowest help or usage-error
command over the bare torch import. Timings of a shared machine are noisy: only ratios measured in
one run mean anything, and the benchmark says how loaded the machine was (`os.getloadavg`).

    python benchmarks/startup.py                 # 5 repeats
    python benchmarks/startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of a red circle left of a blue star"
COMMANDS = ("generate", "edit", "inpaint", "outpaint", "caption", "state-dict", "convert", "eval", "data", "train",
            "serve")


def run(argv: list[str], *, check_rc: int | None = 0) -> float:
    """Wall seconds of one fresh process."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if check_rc is not None and done.returncode != check_rc:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def stages(images: int) -> None:
    """In this (fresh) process: seconds of the generate command's parts, as JSON on stdout."""
    start = time.perf_counter()
    import torch  # noqa: F401  (the floor: what every drawing command imports)

    torch_done = time.perf_counter()
    import unipic.cli  # noqa: F401  (the command's own imports)
    from unipic import loading
    from unipic.unipic1.pipeline import UniPicPipeline  # noqa: F401

    imports_done = time.perf_counter()
    pipeline = loading.load_pipeline("default", device="auto")
    if hasattr(loading, "cpu_threads_for"):  # the command's thread setting (absent before issue 40)
        loading.cpu_threads_for(pipeline)
    loaded = time.perf_counter()
    seconds = []
    for k in range(images):
        t = time.perf_counter()
        pipeline.text_to_image([PROMPT], seed=k)
        seconds.append(time.perf_counter() - t)
    print(json.dumps({"torch": torch_done - start, "imports": imports_done - torch_done, "load": loaded - imports_done,
                      "images": seconds, "threads": torch.get_num_threads()}))


def heaviest_imports(argv: list[str], top: int = 10) -> list[tuple[float, str]]:
    """(seconds, module) of the slowest top-level imports of a command (`-X importtime`, cumulative)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if name.startswith(" ") and not name.startswith("  "):  # one space: imported at top level
            try:
                rows.append((int(cumulative) / 1e6, name.strip()))
            except ValueError:
                continue
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command (median reported)")
    parser.add_argument("--images", type=int, default=4, help="images drawn in the breakdown's process")
    parser.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stages:
        stages(args.images)
        return
    env_note = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "PYTHONPATH") if k in os.environ}
    cli = [sys.executable, "-m", "unipic"]
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drift affects every command alike
            jobs = {
                "torch": ([sys.executable, "-c", "import torch"], 0),
                "interpreter": ([sys.executable, "-c", "pass"], 0),
                "generate": ([*cli, "generate", PROMPT, "-o", str(Path(tmp) / f"out-{r}.png")], 0),
                "--help": ([*cli, "--help"], 0),
                "usage error": ([*cli, "generate", PROMPT, "--size", "17", "-o", str(Path(tmp) / "x.png")], 2),
            }
            for command in COMMANDS:
                jobs[f"{command} --help"] = ([*cli, command, "--help"], 0)
            for name, (argv, rc) in jobs.items():
                times.setdefault(name, []).append(run(argv, check_rc=rc))
        breakdown = json.loads(subprocess.run([sys.executable, __file__, "--stages", "--images", str(args.images)],
                                              stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()[-1])
        imports = heaviest_imports(["-m", "unipic", "generate", PROMPT, "-o", str(Path(tmp) / "imports.png")])
    load_after = os.getloadavg()
    median = {name: statistics.median(values) for name, values in times.items()}
    torch_s = median["torch"]
    print(f"{args.repeats} fresh processes per command, interleaved; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f} on {os.cpu_count()} CPUs {env_note or ''}")
    print("| command | median s | / import torch |")
    print("|---|---:|---:|")
    for name, value in median.items():
        print(f"| {name} | {value:.3f} | {value / torch_s:.2f} |")
    images = breakdown["images"]
    later = statistics.median(images[1:]) if len(images) > 1 else float("nan")
    print(f"breakdown of one generate process ({breakdown['threads']} threads): interpreter "
          f"{median['interpreter']:.3f} s (python -c pass), import torch {breakdown['torch']:.3f} s, other imports "
          f"{breakdown['imports']:.3f} s, model load {breakdown['load']:.3f} s, first image {images[0]:.3f} s, "
          f"later images {later:.3f} s (median of {len(images) - 1})")
    print("heaviest top-level imports of `unipic generate` (python -X importtime, cumulative s): "
          + ", ".join(f"{name} {seconds:.3f}" for seconds, name in imports))
    helps = [v for k, v in median.items() if k.endswith("--help") or k == "usage error"]
    print(f"cli/torch {median['generate'] / torch_s:.2f} first/later {images[0] / later:.2f} "
          f"help/torch {max(helps) / torch_s:.2f}")


if __name__ == "__main__":
    main()
