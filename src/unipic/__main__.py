"""`python -m unipic` runs the command line."""

from unipic.cli import main

raise SystemExit(main())
