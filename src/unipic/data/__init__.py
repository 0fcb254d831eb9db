"""Datasets for the three tasks: Shapes-world streams generated on the fly, the on-disk layout
(`data.jsonl` + images) that `unipic data export` writes and users fill with their own data, and
readers for it. `unipic.data.disk` needs no torch; `unipic.data.datasets` holds the torch datasets.
"""

from unipic.data.disk import DiskFolder, detect_task, export, read_folder

__all__ = ["DiskFolder", "detect_task", "export", "read_folder"]
