"""Contact sheets: one PNG with many results, each tile its image(s), text and verdict, for a
person to look over an evaluation at a glance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

_GREEN, _RED, _GRAY = (40, 160, 60), (210, 40, 40), (120, 120, 120)


@dataclass
class Tile:
    """One result: images shown side by side, lines of text under them, and a verdict."""

    images: Sequence[Image.Image]
    lines: Sequence[str]
    correct: bool | None = None


def contact_sheet(tiles: Sequence[Tile], image_size: int = 128, columns: int | None = None,
                  text_lines: int = 4) -> Image.Image:
    """Lay `tiles` out in a grid.

    Each tile shows its images at `image_size` (nearest-neighbour, so pixels stay crisp), then up
    to `text_lines` wrapped lines of text; a green or red frame and an OK/FAIL mark give the verdict.
    """
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    font = ImageFont.load_default()
    per_tile = max(len(t.images) for t in tiles)
    pad, line_h = 6, 12
    tile_w = per_tile * image_size + (per_tile - 1) * 2 + 2 * pad
    tile_h = image_size + text_lines * line_h + 2 * pad + 4
    chars = max(12, (tile_w - 2 * pad) // 5)  # a rough cap for the truncated last line
    columns = columns or max(1, min(len(tiles), 1600 // tile_w))
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, tile in enumerate(tiles):
        x0, y0 = (n % columns) * tile_w, (n // columns) * tile_h
        frame = _GRAY if tile.correct is None else (_GREEN if tile.correct else _RED)
        draw.rectangle([x0 + 1, y0 + 1, x0 + tile_w - 2, y0 + tile_h - 2], outline=frame, width=3)
        for k, image in enumerate(tile.images):
            thumb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.NEAREST)
            sheet.paste(thumb, (x0 + pad + k * (image_size + 2), y0 + pad))
        texts = list(tile.lines) or [""]
        if tile.correct is not None:
            texts[0] = ("OK: " if tile.correct else "FAIL: ") + texts[0]
        lines: list[str] = []
        for text in texts:
            lines += _wrap(draw, text, font, tile_w - 2 * pad) or [""]
        if len(lines) > text_lines:
            lines = lines[: text_lines - 1] + [lines[text_lines - 1][: chars - 3] + "..."]
        for k, line in enumerate(lines):
            color = frame if k == 0 and tile.correct is not None else (0, 0, 0)
            draw.text((x0 + pad, y0 + pad + image_size + 2 + k * line_h), line, fill=color, font=font)
    return sheet


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` pixels wide in `font`."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines
