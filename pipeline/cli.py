"""The ``amgen`` command line. Each command group lives in its own module and is added here."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="amgen: layouts to labelled training images with AM-Adapter.")

# (module, attribute, name) of sub-apps / commands; a module that is not there yet is skipped.
_GROUPS = [
    ("pipeline.cli_run", "register"),
    ("pipeline.cli_index", "register"),
    ("pipeline.cli_toytown", "register"),
    ("pipeline.cli_train", "register"),
    ("pipeline.cli_eval", "register"),
]

for _mod, _attr in _GROUPS:
    try:
        getattr(importlib.import_module(_mod), _attr)(app)
    except ModuleNotFoundError as exc:  # only a missing command module is tolerated
        if exc.name != _mod:
            raise


def main() -> None:
    app()


if __name__ == "__main__":
    main()
