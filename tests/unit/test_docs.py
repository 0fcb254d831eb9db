"""The documentation of upstream differences: one complete table, and UniPic-2 defaults stated right."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_differences_table_is_complete():
    text = (DOCS / "differences-from-upstream.md").read_text()
    header = "| # | Family | What | Upstream | `unipic` | Why |"
    assert text.count(header) == 1, "one table"
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(header)]
    assert len(rows) >= 20
    for number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 6 and all(cells), f"row {number} needs all six cells, a reason included: {row}"
        assert cells[0] == str(number) and cells[1] in ("UniPic-1", "UniPic-2"), row
    # The issue-10 defaults are stated: the text-to-image scripts' size and the edit input resize.
    assert "height 512, width 384" in text and "input_resize" in text
    # docs/unipic2.md no longer claims the scripts default to 512x512, and points at the table.
    unipic2 = " ".join((DOCS / "unipic2.md").read_text().split())  # line breaks do not matter
    assert "text-to-image scripts use height 512 and width 384" in unipic2
    assert "differences-from-upstream.md" in unipic2
