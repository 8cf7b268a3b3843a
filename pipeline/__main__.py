"""`python -m pipeline ...` is the `amgen` CLI (the entry point for `ray job submit`)."""
from pipeline.cli import main

main()
