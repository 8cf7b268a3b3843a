"""The ``amgen`` command line. Each command group lives in its own module and is added here."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="amgen: layouts to labelled training images with AM-Adapter.")

# Each command group registers itself on the app.
for _mod in ("pipeline.cli_run", "pipeline.cli_index", "pipeline.cli_toytown", "pipeline.cli_train", "pipeline.cli_eval"):
    importlib.import_module(_mod).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
