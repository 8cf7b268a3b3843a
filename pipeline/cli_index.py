"""``amgen index build|query``: the sharded exemplar index from the command line."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer

from connectors.registry import SOURCE_KINDS as SOURCES
SHOWN_META = ("domain", "split")
PART_SIZE = 20_000                 # inputs per staged part: ~53 MB of vectors at dim 660   # the table's meta columns; --json prints all of it

index_app = typer.Typer(no_args_is_help=True, help="The sharded exemplar index (layout embeddings + FAISS).")


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _fail(console, message: str) -> None:
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(2)


def open_source(source: str, root: Path, split: str, options: dict[str, Any] | None = None):
    """The layout source behind ``--source``, through the registry `amgen run` uses too."""
    from connectors.registry import make_source

    if source not in SOURCES:
        raise typer.BadParameter(f"{source!r} is not one of {', '.join(SOURCES)}", param_hint="--source")
    return make_source(source, str(root), split, options)


def parse_options(values: list[str] | None) -> dict[str, Any]:
    """``--option key=value`` -> connector keyword arguments (YAML values), as a run config's
    ``source.options``; e.g. ``--option label_table=table.yaml`` for a folder source."""
    import yaml

    out: dict[str, Any] = {}
    for text in values or []:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{text!r}: expected key=value", param_hint="--option")
        out[key] = yaml.safe_load(raw) if raw.strip() else None
    return out


def read_layouts(src, items: list, errors: list[dict], limit: int | None) -> Iterator:
    """Read items one by one; a bad input is recorded in ``errors`` (with its path) and skipped."""
    from amgen_core.quarantine import blamed_path
    from connectors.source_api import BAD_INPUT_ERRORS

    for item in items[:limit] if limit else items:
        try:
            yield src.read_item(item)
        except BAD_INPUT_ERRORS as exc:
            row = item if isinstance(item, dict) else getattr(item, "to_row", lambda: {})()
            errors.append({"item": str(row.get("item_id", row.get("layout_id", "?"))),
                           "path": str(blamed_path(exc, row) or row.get("label", "")), "reason": str(exc)})


def parse_filters(values: list[str] | None) -> dict[str, Any] | None:
    """``key=value`` pairs -> {key: value}; JSON values (numbers, true) are decoded, the rest stay strings.
    A repeated key accepts any of its values."""
    if not values:
        return None
    out: dict[str, Any] = {}
    for text in values:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{text!r}: expected key=value", param_hint="--filter")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key in out:
            prev = out[key] if isinstance(out[key], list) else [out[key]]
            out[key] = prev + [value]
        else:
            out[key] = value
    return out


@index_app.command("build")
def build_cmd(
    source: str = typer.Option(..., "--source", help=f"one of {', '.join(SOURCES)}"),
    root: Path = typer.Option(..., "--root", help="the source folder (Cityscapes/toy-town tree, or Parquet files)"),
    out: Path = typer.Option(..., "--out", help="index folder to write (replaced atomically if it is an index)"),
    shards: int = typer.Option(1, "--shards", min=1, help="number of FAISS shards, built in parallel"),
    split: str = typer.Option("train", "--split"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="index only the first N items"),
    require_image: bool = typer.Option(True, "--require-image/--labels-only",
                                       help="skip layouts without an image (they cannot lend appearance)"),
    ivf_threshold: Optional[int] = typer.Option(None, "--ivf-threshold", min=1, help="rows per shard above which shards are IVF"),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1, help="IVF lists (default ~4*sqrt(N))"),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, help="IVF lists probed per query"),
    codec: str = typer.Option("flat", "--codec", help="what IVF lists hold: flat (the vectors) or pq<M>x4fs (4-bit "
                              "PQ fast-scan codes + an exact rerank, e.g. pq220x4fs; docs/performance.md)"),
    rerank: Optional[int] = typer.Option(None, "--rerank", min=1, help="pq codecs: candidates re-scored exactly "
                                         "per hit (default 16)"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the IVF k-means sample"),
    part_size: int = typer.Option(PART_SIZE, "--part-size", min=1, help="inputs per staged part (the unit a "
                                  "killed build resumes from)"),
    resume: bool = typer.Option(True, "--resume/--restart", help="continue a killed build of the same input "
                                "(sealed parts and finished shards are kept), or start over"),
    options: Optional[List[str]] = typer.Option(None, "--option", help="connector argument key=value, as a run "
                                                "config's source.options (e.g. label_table=table.yaml for folder)"),
) -> None:
    """Embed every layout of a source and write a sharded FAISS index with a manifest.

    Streams: label maps are read, embedded and written to a staging folder next to ``--out`` in
    parts of ``--part-size`` inputs; a rerun after a kill skips the sealed parts and the
    finished shards (same source, root, split, limit and options; ``--restart`` starts over).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from connectors.index_store import DEFAULT_IVF_THRESHOLD, pq_subquantizers
    from stages.embed import EMBED_DIM
    from connectors.source_api import BAD_INPUT_ERRORS
    from stages.retrieve import build_exemplar_index_parts

    console = _console()
    if source not in SOURCES:
        raise typer.BadParameter(f"{source!r} is not one of {', '.join(SOURCES)}", param_hint="--source")
    t0 = time.perf_counter()
    opts = parse_options(options)
    try:
        src = open_source(source, root, split, opts)
        items = src.list_items()
    except (*BAD_INPUT_ERRORS, TypeError) as exc:
        _fail(console, str(exc))
    items = items[:limit] if limit else items
    total = len(items)
    errors: list[dict] = []
    bounds = list(range(0, total, part_size)) + [total]
    parts = [(lambda lo=lo, hi=hi: read_layouts(src, items[lo:hi], errors, None)) for lo, hi in zip(bounds, bounds[1:])]
    fingerprint = {"source": source, "root": str(root.resolve()), "split": split, "items": total,
                   "part_size": part_size, "options": opts}
    try:
        pq_subquantizers(codec, EMBED_DIM)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--codec") from None
    kwargs = {"ivf_threshold": ivf_threshold or DEFAULT_IVF_THRESHOLD, "nlist": nlist, "nprobe": nprobe, "seed": seed,
              "codec": codec, "rerank": rerank}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        read_task = bar.add_task(f"read + embed {root}", total=total)
        shard_task = bar.add_task(f"write shards -> {out}", total=shards)

        def part_done(i: int, resumed: bool) -> None:
            if resumed:   # its inputs are not read again
                bar.update(read_task, advance=bounds[i + 1] - bounds[i])

        try:
            index, stats = build_exemplar_index_parts(
                parts, out, shards, require_image=require_image, resume=resume, fingerprint=fingerprint,
                on_layout=lambda _: bar.advance(read_task), on_part=part_done,
                progress=lambda done, n: bar.update(shard_task, completed=done), **kwargs)
        except (ValueError, FileExistsError) as exc:
            _fail(console, f"{exc}" + (f" ({len(errors)} unreadable inputs, first: {errors[0]['reason']})" if errors else ""))
    seconds = time.perf_counter() - t0
    _print_build_summary(console, index, stats, errors, seconds, source, root)


def _print_build_summary(console, index, stats, errors, seconds, source, root) -> None:
    from rich.table import Table

    t = Table(title="amgen index build", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("indexed", f"{stats.count} layouts from {source}: {root}")
    t.add_row("skipped", f"{stats.skipped} without an image, {len(errors)} unreadable"
              + (f" (this run; {stats.parts_resumed} part(s) resumed from a killed build)" if stats.parts_resumed else ""))
    kind = index.kind if index.kind == "flat" else f"ivf (nlist {index.nlist}, nprobe {index.nprobe}" + (
        f", {index.codec}, rerank x{index.rerank})" if index.codec != "flat" else ")")
    t.add_row("index", f"{index.num_shards} shard(s), {kind}, dim {index.dim}, {index.embedding_version}")
    t.add_row("time", f"{seconds:.1f}s ({stats.count / max(seconds, 1e-9):.0f} layouts/s)")
    t.add_row("output", str(index.path))
    console.print(t)
    for err in errors[:5]:
        console.print(f"  [yellow]unreadable[/yellow] {err['item']}: {err['reason']}", soft_wrap=True)
    if len(errors) > 5:
        console.print(f"  ... and {len(errors) - 5} more")


@index_app.command("query")
def query_cmd(
    index_dir: Path = typer.Option(..., "--index", help="index folder written by `amgen index build`"),
    label: Path = typer.Option(..., "--label", help="target label map PNG (Cityscapes label ids)"),
    k: int = typer.Option(5, "--k", min=1),
    filters: Optional[List[str]] = typer.Option(None, "--filter", help="key=value metadata filter, e.g. domain=night (repeatable)"),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="exemplar id to leave out (repeatable), e.g. the target's own id"),
    candidates: int = typer.Option(32, "--candidates", min=1, help="ANN candidates reranked exactly"),
    diversity: float = typer.Option(0.3, "--diversity", min=0.0, max=1.0, help="0 = pure IoU order; higher = more varied"),
    as_json: bool = typer.Option(False, "--json", help="print the results as one JSON line on stdout"),
) -> None:
    """The k exemplars for one label map: FAISS candidates, exact class-IoU rerank, diverse top-k."""
    from amgen_core.labels import LabelError
    from amgen_core.image_io import CorruptImageError, read_label_png
    from connectors.index_store import IndexFormatError, IndexNotFoundError
    from stages.retrieve import Retriever

    console = _console()
    wanted = parse_filters(filters)
    t0 = time.perf_counter()
    try:
        retriever = Retriever(index_dir, k=k, candidates=max(candidates, k), diversity=diversity)
        target = read_label_png(label)
        matches = retriever.query(target, exclude_ids=[exclude] if exclude else None, filters=wanted)
    except (IndexNotFoundError, IndexFormatError, FileNotFoundError, CorruptImageError, LabelError) as exc:
        _fail(console, str(exc))
    seconds = time.perf_counter() - t0
    if as_json:
        typer.echo(json.dumps([{"id": m.exemplar_id, "iou": round(m.score, 6), "cosine": round(m.embed_score, 6),
                                "meta": m.meta} for m in matches]))
        return
    from rich.table import Table

    t = Table(title=f"exemplars for {label.name} (index {index_dir}, {len(retriever.index)} layouts)")
    for col in ("rank", "exemplar", "class IoU", "cosine", *SHOWN_META):
        t.add_column(col, no_wrap=col == "exemplar")
    for rank, m in enumerate(matches, 1):
        t.add_row(str(rank), m.exemplar_id, f"{m.score:.3f}", f"{m.embed_score:.3f}",
                  *(str(m.meta.get(key, "")) for key in SHOWN_META))
    console.print(t)
    note = f"filter {wanted}" if wanted else "no filter"
    console.print(f"{len(matches)} of k={k} found ({note}) in {seconds * 1000:.0f} ms")


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
