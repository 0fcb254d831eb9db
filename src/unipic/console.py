"""The `unipic` console script and `python -m unipic`: Ctrl-C at any moment, start-up included,
prints one line and exits with 130 instead of a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    """Run the command line, reporting an interrupt during the imports as one line too."""
    try:
        from unipic.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        print("unipic: interrupted", file=sys.stderr)
        return 130
