"""Per-row random number streams, so a batched sample equals the same sample drawn alone.

A sampler draws its randomness in tensors whose first dimension runs over rows grouped by image
(reveal orders: one row per image; diffusion-head noise: the same number of tokens per image).
`GeneratorGroups` gives each group of images its own `torch.Generator`: the first dimension is split
in proportion to the images of each group and each part is drawn from its group's generator. One
group covering every image draws exactly what the plain generator draws, so a call with one seed is
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class GeneratorGroups:
    """Generators that each own a consecutive block of images (rows) of a batch."""

    def __init__(self, generators: Sequence[torch.Generator], rows: Sequence[int]) -> None:
        if len(generators) != len(rows) or not generators:
            raise ValueError(f"need one row count per generator, got {len(generators)} generators and {len(rows)} counts")
        if any(r < 1 for r in rows):
            raise ValueError(f"row counts must be positive, got {list(rows)}")
        self.generators = list(generators)
        self.rows = [int(r) for r in rows]

    @property
    def total_rows(self) -> int:
        """How many images (rows) the groups cover together."""
        return sum(self.rows)

    def _parts(self, shape: Sequence[int]) -> list[tuple[torch.Generator, tuple[int, ...]]]:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] % self.total_rows:
            raise ValueError(f"cannot split a draw of shape {shape} over {self.total_rows} rows")
        per_row = shape[0] // self.total_rows
        return [(g, (rows * per_row, *shape[1:])) for g, rows in zip(self.generators, self.rows)]

    def randn(self, shape: Sequence[int], *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal draws of `shape`, each group's part from its own generator."""
        return torch.cat([torch.randn(part, generator=g, device=device, dtype=dtype) for g, part in self._parts(shape)])

    def rand(self, shape: Sequence[int], *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Uniform [0, 1) draws of `shape`, each group's part from its own generator."""
        return torch.cat([torch.rand(part, generator=g, device=device, dtype=dtype) for g, part in self._parts(shape)])


Randomness = torch.Generator | GeneratorGroups | None


def randn(shape: Sequence[int], generator: Randomness, *, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.randn` that also accepts `GeneratorGroups`."""
    if isinstance(generator, GeneratorGroups):
        return generator.randn(shape, device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def rand(shape: Sequence[int], generator: Randomness, *, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.rand` that also accepts `GeneratorGroups`."""
    if isinstance(generator, GeneratorGroups):
        return generator.rand(shape, device=device, dtype=dtype)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def row_generator(generator: Randomness, row: int) -> torch.Generator | None:
    """The generator that draws image `row`'s randomness: its group's, or the one shared generator."""
    if not isinstance(generator, GeneratorGroups):
        return generator
    end = 0
    for g, rows in zip(generator.generators, generator.rows):
        end += rows
        if row < end:
            return g
    raise IndexError(f"row {row} is beyond the {generator.total_rows} rows of these generators")
