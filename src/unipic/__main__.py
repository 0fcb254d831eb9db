"""`python -m unipic` runs the command line."""

from unipic.console import main

raise SystemExit(main())
