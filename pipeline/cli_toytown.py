"""``amgen toytown make``: write a toy-town Cityscapes-format tree (and optional ground-truth triples)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from toytown import DOMAINS

toytown_app = typer.Typer(no_args_is_help=True, help="Toy-town: a procedural driving world with known ground truth.")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=True)


def _ticker(bar: Progress, description: str, total: int):
    """A progress callback advancing a new bar, showing the rate so far."""
    task = bar.add_task(description, total=total, rate="")
    t0, done = time.perf_counter(), [0]

    def tick(k: int) -> None:
        done[0] += k
        bar.update(task, advance=k, rate=f"{done[0] / max(time.perf_counter() - t0, 1e-9):.0f}/s")
    return tick


@toytown_app.command("make")
def make_cmd(
    n: int = typer.Option(..., "--n", min=0, help="scenes to write"),
    out: Path = typer.Option(..., "--out", help="root of the Cityscapes-format tree"),
    seed: int = typer.Option(0, "--seed", min=0, help="scene i depends only on (seed, i)"),
    domain: Optional[str] = typer.Option(None, "--domain", help=f"one of {', '.join(DOMAINS)}; default: mixed"),
    split: str = typer.Option("train", "--split", help="gtFine/{split} and leftImg8bit/{split}"),
    start: int = typer.Option(0, "--start", min=0, help="first scene index (to add scenes to a tree)"),
    height: int = typer.Option(64, "--height", min=8),
    width: int = typer.Option(128, "--width", min=8),
    triples: int = typer.Option(0, "--triples", min=0, help="also write N ground-truth triples to OUT/triples"),
) -> None:
    """Write N scenes as leftImg8bit/ + gtFine/ (labelIds, instanceIds, color) with a summary."""
    from toytown import make_tree, make_triples, write_triples

    if domain is not None and domain not in DOMAINS:
        raise typer.BadParameter(f"{domain!r} is not one of {', '.join(DOMAINS)}", param_hint="--domain")
    console = Console(stderr=True)
    rows: list[tuple[str, str, str, str]] = []
    with _progress(console) as bar:
        summary = make_tree(out, n, seed=seed, domain=domain, split=split, height=height, width=width,
                            start=start, progress=_ticker(bar, f"scenes -> {out}", n))
        domains = ", ".join(f"{d} {c}" for d, c in summary.domains.items()) or "-"
        rows.append(("scenes", str(summary.written), f"{summary.scenes_per_s:.0f}/s",
                     f"{out / 'leftImg8bit' / split}, {out / 'gtFine' / split}  ({domains})"))
        if triples:
            tick = _ticker(bar, f"triples -> {out / 'triples'}", triples)
            t0 = time.perf_counter()

            def counted():
                for t in make_triples(triples, seed=seed, domain=domain, height=height, width=width):
                    yield t
                    tick(1)

            written = write_triples(out / "triples", counted(),
                                    params={"n": triples, "seed": seed, "domain": domain, "height": height,
                                            "width": width})
            seconds = time.perf_counter() - t0
            rows.append(("triples", str(written), f"{written / max(seconds, 1e-9):.0f}/s", str(out / "triples")))
    table = Table(title=f"toy-town {split} (seed {seed}, {height}x{width})", title_justify="left")
    for col in ("what", "written", "rate", "where"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(toytown_app, name="toytown")
