"""`python -m matchlock` runs the CLI (used by `run -d` to start its background owner)."""

from .cli.main import main

main()
