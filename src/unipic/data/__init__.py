"""Datasets for the three tasks: Shapes-world streams generated on the fly, the on-disk layout
(`data.jsonl` + images) that `unipic data export` writes and users fill with their own data, and
readers for it. `unipic.data.disk` needs no torch; `unipic.data.datasets` holds the torch datasets.
"""

__all__ = ["DiskFolder", "detect_task", "export", "read_folder"]


def __getattr__(name: str):
    # Lazily: `unipic.data.cli` registers `unipic data` in every command's parser, and
    # `unipic.data.disk` imports the Shapes world (scipy, ~0.25 s) that only `data export` needs.
    if name in __all__:
        from unipic.data import disk

        return getattr(disk, name)
    raise AttributeError(f"module 'unipic.data' has no attribute {name!r}")
