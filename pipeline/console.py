"""Where a run talks: progress bars and info lines on a rich console, and the closing summary."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.finish import RunSummary


class Reporter:
    """A rich console with progress bars, or nothing (tests, library use)."""

    def __init__(self, console=None):
        self.console = console

    def info(self, msg: str) -> None:
        if self.console is not None:
            from rich.markup import escape

            self.console.print(f"[dim]amgen:[/dim] {escape(msg)}")

    def progress(self, total: int, description: str):
        if self.console is None:
            return NullProgress()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
        p.add_task(description, total=total, rate="")
        return p


class NullProgress:
    """A progress bar that shows nothing (the shape of rich's ``Progress`` that the run uses)."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def update(self, *a, **k):
        pass

    @property
    def task_ids(self):
        return [0]


def print_summary(summary: RunSummary, console, verify_ok: bool | None = None) -> None:
    from rich.table import Table

    t = Table(title=f"amgen run: {summary.mode}", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("output", summary.out)
    t.add_row("samples written", f"{summary.written} of {summary.planned} planned ({summary.synthesized} synthesized now)")
    t.add_row("shards", f"{summary.shards} ({summary.shards_written} written now, {summary.shards_skipped} already done)")
    if summary.remade:
        t.add_row("remade", "; ".join(f"{r['name']}: {r['reason']}" for r in summary.remade))
    by = ", ".join(f"{k}: {v}" for k, v in summary.quarantined_by_stage.items())
    t.add_row("quarantined", f"{summary.quarantined}" + (f" ({by}) -> errors/" if by else ""))
    if summary.filtered or summary.filtered_by_reason:
        by = ", ".join(f"{k}: {v}" for k, v in summary.filtered_by_reason.items())
        t.add_row("filtered (gate)", f"{summary.filtered} ({by}) -> filtered/")
    t.add_row("targets / exemplars", f"{summary.targets} / {summary.exemplars} (banks encoded now: {summary.banks_encoded})")
    t.add_row("throughput", f"{summary.images_per_s:.2f} images/s")
    w = summary.workers
    if w:
        t.add_row("workers", f"{w['actors']} actor(s), {w['device']}, {w['num_gpus']:g} GPU, {w['torch_threads']} thread(s) each")
    t.add_row("model", str(summary.model))
    t.add_row("config hash", summary.config_hash[:16])
    t.add_row("time", ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in summary.timings.items()))
    if verify_ok is not None:
        t.add_row("verify", "OK" if verify_ok else "FAILED")
    console.print(t)
