"""The `esm-index` command line. Results go to stdout (a table, or JSON with --json); progress and
errors to stderr. Every error is one line and a non-zero exit code."""

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import ESMIndexError

app = typer.Typer(
    help="Rank intermediate tasks (sources) for a target dataset with Embedding Space Maps and LogME.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

INDEX = typer.Argument(..., help="Index folder.")
JSON = typer.Option(False, "--json", help="Print one JSON object (stable keys) instead of a table.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
TEXT_COLUMN = typer.Option(None, help="Text column; two joined by a comma are read as a text pair.")
LABEL_COLUMN = typer.Option(None, help="Label column.")
REGRESSION = typer.Option(False, "--regression", help="Labels are numbers (regression), not classes.")


def command(name=None):
    """Register a command whose ESMIndexError (or OS error) becomes a one-line message and exit code 1."""

    def register(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except ESMIndexError as e:
                fail(str(e))
            except OSError as e:
                fail(f"{type(e).__name__}: {e}")

        return app.command(name)(run)

    return register


def fail(message):
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(1)


def progress_bar(quiet):
    """A progress bar on stderr, or one that draws nothing."""
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=err, disable=quiet, transient=True)


def open_index(path, readonly=False):
    from .index import ESMIndex

    return ESMIndex.open(path, readonly=readonly)


def print_json(value):
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


@command()
def init(
    index: Path = INDEX,
    base_model: str = typer.Option("sentence-transformers/all-MiniLM-L6-v2", help="Model folder or packaged name."),
    dim: Optional[int] = typer.Option(None, help="Embedding dimension; when given, the model is not loaded now."),
    pooling: Optional[str] = typer.Option(None, help="mean | pooler | cls (default: by model kind)."),
    dtype: str = typer.Option("float32", help="Storage precision of ESMs: float32 | float16."),
):
    """Create an empty index for one base model."""
    from .index import ESMIndex

    with ESMIndex.create(index, base_model, dim, pooling, dtype) as created:
        meta = created.meta
    err.print(f"created {index} (base model {meta['base_model']}, dim {meta['dim']}, pooling {meta['pooling']})")


@command()
def add(
    index: Path = INDEX,
    data: Path = typer.Argument(..., help="Source task file (.csv, .tsv, .jsonl)."),
    name: str = typer.Option(..., help="Name of the source in the index."),
    finetuned: Optional[Path] = typer.Option(None, help="An already fine-tuned model folder (skips fine-tuning)."),
    text_column: Optional[str] = TEXT_COLUMN,
    label_column: Optional[str] = LABEL_COLUMN,
    regression: bool = REGRESSION,
    max_examples: int = typer.Option(10_000, help="Seeded sample cap on source examples."),
    epochs: float = typer.Option(3.0, help="Fine-tuning epochs (fewer for quick builds)."),
    fit: str = typer.Option("lstsq", help="ESM fit: lstsq (exact ridge) | adamw (the paper's optimiser)."),
    seed: int = typer.Option(0, help="Seed for sampling and training."),
    quiet: bool = QUIET,
):
    """Fine-tune on a source (or take --finetuned), fit its ESM and store it (replaces a same-named one)."""
    from .build import SourceSpec
    from .esm import ESMFitConfig
    from .finetune import FinetuneConfig

    spec = SourceSpec(name, str(data), text_column, label_column, regression,
                      str(finetuned) if finetuned else None, max_examples, seed)
    with open_index(index) as opened, progress_bar(quiet) as bar:
        task = bar.add_task(f"fine-tuning {name}", total=100)
        outcome = opened.add(
            spec, FinetuneConfig(epochs=epochs, seed=seed), ESMFitConfig(method=fit, seed=seed),
            progress=lambda fraction: bar.update(task, completed=100 * fraction),
        )
    err.print(f"{outcome} source {name!r}")


@command()
def query(
    index: Path = INDEX,
    data: Optional[Path] = typer.Argument(None, help="Target task file (.csv, .tsv, .jsonl)."),
    embeddings: Optional[Path] = typer.Option(None, help="Precomputed base embeddings (.npy, n x d) instead of DATA."),
    labels: Optional[Path] = typer.Option(None, help="Labels (.npy) for --embeddings."),
    top_k: int = typer.Option(10, help="How many sources to print."),
    candidates: str = typer.Option("200", help="How many prefilter candidates to rescore exactly, or 'all'."),
    text_column: Optional[str] = TEXT_COLUMN,
    label_column: Optional[str] = LABEL_COLUMN,
    regression: bool = REGRESSION,
    max_examples: int = typer.Option(1_000, help="Seeded sample cap on target examples."),
    seed: int = typer.Option(0, help="Seed for sampling."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Rank the index's sources for a target (texts and labels, or precomputed embeddings)."""
    from .data import read_task

    if candidates != "all" and not candidates.isdigit():
        raise ESMIndexError(f"--candidates takes a positive number or 'all', got {candidates!r}")
    count = None if candidates == "all" else int(candidates)
    with open_index(index, readonly=True) as opened:
        if embeddings is not None or labels is not None:
            if data is not None or embeddings is None or labels is None:
                raise ESMIndexError("give either DATA or both --embeddings and --labels")
            X, y = load_npy(embeddings), load_npy(labels)
            ranking = opened.query_embeddings(X, y, regression, top_k, count)
        else:
            if data is None:
                raise ESMIndexError("missing target: give DATA or --embeddings with --labels")
            task = read_task(data, text_column, label_column, regression, max_examples, seed)
            with progress_bar(quiet or as_json) as bar:
                bar_task = bar.add_task("embedding target", total=len(task))
                ranking = opened.query(task.texts, task.labels, regression, top_k, count,
                                       progress=lambda done: bar.update(bar_task, completed=done))
    if as_json:
        print_json(ranking.to_dict())
        return
    table = Table(title=f"top {len(ranking)} of {ranking.pool} sources ({ranking.candidates} rescored)")
    for column in ("rank", "source", "ESM-LogME"):
        table.add_column(column, justify="right" if column != "source" else "left")
    for result in ranking:
        table.add_row(str(result.rank), result.source, f"{result.score:.4f}")
    out.print(table)
    if ranking.failed:
        err.print(f"warning: no finite score for {len(ranking.failed)} source(s): {', '.join(ranking.failed)}")
    if not quiet:
        err.print("timings: " + ", ".join(f"{k} {v:.3f}s" for k, v in ranking.timings.items()))


def load_npy(path):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ESMIndexError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise ESMIndexError(f"{path}: not a .npy array ({e})") from None


@command("list")
def list_sources(index: Path = INDEX, as_json: bool = JSON):
    """List the sources in an index."""
    with open_index(index, readonly=True) as opened:
        sources = opened.sources()
    if as_json:
        print_json({"sources": sources})
        return
    table = Table(title=f"{len(sources)} sources")
    for column in ("name", "examples", "classes", "fit R^2"):
        table.add_column(column)
    for s in sources:
        r2 = s.get("esm", {}).get("fit", {}).get("heldout_r2")
        table.add_row(s["name"], str(s.get("num_examples", "-")), str(s.get("num_classes", "-")),
                      "-" if r2 is None else f"{r2:.3f}")
    out.print(table)


@command()
def info(index: Path = INDEX, as_json: bool = JSON):
    """Show an index's base model, dimension, size and settings."""
    with open_index(index, readonly=True) as opened:
        facts = opened.info()
    if as_json:
        print_json(facts)
        return
    for key, value in facts.items():
        out.print(f"{key}: {value}")


@command()
def remove(index: Path = INDEX, name: str = typer.Argument(..., help="Source to remove.")):
    """Remove a source."""
    with open_index(index) as opened:
        opened.remove(name)
    err.print(f"removed source {name!r}")


@command()
def rename(index: Path = INDEX, old: str = typer.Argument(...), new: str = typer.Argument(...)):
    """Rename a source."""
    with open_index(index) as opened:
        opened.rename(old, new)
    err.print(f"renamed source {old!r} to {new!r}")

