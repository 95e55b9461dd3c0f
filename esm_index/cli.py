"""The `esm-index` command line. Results go to stdout (a table, or JSON with --json); progress and
errors to stderr. Every error is one line and a non-zero exit code."""

import datetime
import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .data import SOURCE_MAX_EXAMPLES, TARGET_MAX_EXAMPLES
from .embed import DEFAULT_BASE_MODEL
from .errors import ESMIndexError
from .query import DEFAULT_CANDIDATES

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
EPOCHS = typer.Option(3.0, help="Fine-tuning epochs (fewer for quick builds).")
FIT = typer.Option("lstsq", help="ESM fit: lstsq (exact ridge) | adamw (the paper's optimiser).")


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
    base_model: str = typer.Option(DEFAULT_BASE_MODEL, help="Model folder or packaged name."),
    dim: Optional[int] = typer.Option(None, help="Embedding dimension; when given, the model is not loaded now."),
    pooling: Optional[str] = typer.Option(None, help="mean | pooler | cls (default: by model kind)."),
    storage: str = typer.Option("float32", help="How records keep each ESM: float32 | triangular-float16 (R of "
                                                "[W, b] = QR in float16: a quarter of the bytes) | triangular-int10 "
                                                "(R in 10-bit steps, Rice-coded: 11-13%) | triangular-int9 "
                                                "(9-bit steps: 9-11%); the same top 5 on every pool measured."),
):
    """Create an empty index for one base model."""
    from .index import ESMIndex

    with ESMIndex.create(index, base_model, dim, pooling, storage) as created:
        meta = created.meta
    err.print(f"created {index} (base model {meta['base_model']}, dim {meta['dim']}, pooling {meta['pooling']}, "
              f"storage {meta['storage']})")


@command()
def add(
    index: Path = INDEX,
    data: Path = typer.Argument(..., help="Source task file (.csv, .tsv, .jsonl)."),
    name: str = typer.Option(..., help="Name of the source in the index."),
    finetuned: Optional[Path] = typer.Option(None, help="An already fine-tuned model folder (skips fine-tuning)."),
    text_column: Optional[str] = TEXT_COLUMN,
    label_column: Optional[str] = LABEL_COLUMN,
    regression: bool = REGRESSION,
    max_examples: int = typer.Option(SOURCE_MAX_EXAMPLES, help="Seeded sample cap on source examples."),
    epochs: float = EPOCHS,
    fit: str = FIT,
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
def build(
    index: Path = INDEX,
    sources: Path = typer.Argument(..., help="A folder of task files (name = file stem), or a .json/.jsonl "
                                             "manifest of sources (name, path, text_column, label_column, ...)."),
    executor: str = typer.Option("local", help="local (this process) | dask."),
    scheduler: Optional[str] = typer.Option(None, help="Dask scheduler address (default: a local cluster)."),
    workers: Optional[int] = typer.Option(None, help="Worker processes of the local Dask cluster (default 2)."),
    epochs: float = EPOCHS,
    fit: str = FIT,
    seed: int = typer.Option(0, help="Seed for training."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Add every source of a folder or manifest, prepared here or on Dask workers and committed one by one;
    sources stored from the same content are skipped, so a rerun resumes. Exit 1 if any source failed."""
    from .build import read_sources
    from .esm import ESMFitConfig
    from .executors import make_executor
    from .finetune import FinetuneConfig

    specs = read_sources(sources)
    pool = make_executor(executor, scheduler, workers)
    with open_index(index) as opened, pool:
        status = opened.build(specs, pool, FinetuneConfig(epochs=epochs, seed=seed), ESMFitConfig(method=fit, seed=seed),
                              progress=None if quiet else build_progress)
    if as_json:
        print_json(status.to_dict())
    else:
        table = Table()
        for column in ("source", "result", "reason"):
            table.add_column(column)
        for name, result in status.results.items():
            if result != "unchanged":
                table.add_row(name, result, "")
        for name, reason in status.failed.items():
            table.add_row(name, "failed", reason)
        if table.row_count:
            out.print(table)
        counts = ", ".join(f"{len(status.names(result))} {result}" for result in ("added", "replaced", "unchanged"))
        out.print(f"{counts}, {len(status.failed)} failed in {clock(status.seconds)} ({status.per_hour:.0f} sources/h)",
                  soft_wrap=True)
    if status.failed:
        fail(f"{len(status.failed)} of {status.total} sources failed: {', '.join(status.failed)}")


def build_progress(status, name, result):
    """One stderr line per prepared source: counts, sources per hour and the time left."""
    if result == "unchanged":
        return
    finished = status.total - status.remaining
    eta = "-" if status.eta is None else clock(status.eta)
    err.print(f"[{finished}/{status.total}] {result} {name} | done {len(status.results)}, failed "
              f"{len(status.failed)}, running {status.running} | {status.per_hour:.0f}/h, ETA {eta}",
              markup=False, soft_wrap=True)


def clock(seconds):
    return str(datetime.timedelta(seconds=round(seconds)))


@command()
def query(
    index: Path = INDEX,
    data: Optional[Path] = typer.Argument(None, help="Target task file (.csv, .tsv, .jsonl)."),
    embeddings: Optional[Path] = typer.Option(None, help="Precomputed base embeddings (.npy, n x d) instead of DATA."),
    labels: Optional[Path] = typer.Option(None, help="Labels (.npy) for --embeddings."),
    top_k: int = typer.Option(10, help="How many sources to print."),
    candidates: str = typer.Option(str(DEFAULT_CANDIDATES), help="How many prefilter candidates to rescore exactly, or 'all'."),
    text_column: Optional[str] = TEXT_COLUMN,
    label_column: Optional[str] = LABEL_COLUMN,
    regression: bool = REGRESSION,
    max_examples: int = typer.Option(TARGET_MAX_EXAMPLES, help="Seeded sample cap on target examples."),
    seed: int = typer.Option(0, help="Seed for sampling."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
):
    """Rank the index's sources for a target (texts and labels, or precomputed embeddings)."""
    from .data import read_task

    if candidates != "all" and not (candidates.isascii() and candidates.isdigit() and int(candidates) > 0):
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


@command()
def verify(
    index: Path = INDEX,
    repair: bool = typer.Option(False, "--repair", help="Rebuild the derived parts (ids table, FAISS prefilter)."),
    as_json: bool = JSON,
):
    """Check every record (decodes, shapes, finite, base model and dimension), the ids table and the saved
    FAISS prefilter against the store. Exit 1 if something is wrong; --repair never deletes a record."""
    with open_index(index, readonly=not repair) as opened:
        report = opened.verify(repair)
    if as_json:
        print_json(report.to_dict())
    else:
        out.print(f"{report.path}: {report.sources} sources at generation {report.generation}", markup=False)
        for kind, lines in (("repaired", report.repaired), ("note", report.notes), ("problem", report.problems)):
            for line in lines:
                out.print(f"{kind}: {line}", markup=False, soft_wrap=True)
        out.print("ok" if report.ok else f"{len(report.problems)} problem(s)")
    if not report.ok:
        fail(f"{len(report.problems)} problem(s) in {index}; a damaged source can be removed and added again")


@command()
def convert(
    index: Path = INDEX,
    new_index: Path = typer.Argument(..., help="New index folder (missing or empty)."),
    storage: str = typer.Option(..., help="Storage form of the new index (see `init --storage`)."),
    quiet: bool = QUIET,
):
    """Copy an index with every ESM re-stored in another storage form (statistics and facts kept); the
    index itself is only read. Measure a form's ranking fidelity on the index first:
    tools/bench_compression.py INDEX."""
    with open_index(index, readonly=True) as opened, progress_bar(quiet) as bar:
        task = bar.add_task("converting", total=len(opened))
        with opened.convert(new_index, storage, lambda done, total: bar.update(task, completed=done)) as converted:
            info = converted.info()
    err.print(f"converted {info['sources']} sources to {new_index} (storage {info['storage']}, "
              f"{info['disk_bytes'] / 1e6:.1f} MB)")


@command("import-esm")
def import_esm(
    index: Path = INDEX,
    folders: List[Path] = typer.Argument(..., help="hf-dataset-selector ESM folders (config.json, model.safetensors)."),
    name: Optional[str] = typer.Option(None, help="Source name (one folder only; default: the config's task id "
                                                  "and subset, else the folder's name)."),
    base_model: Optional[str] = typer.Option(None, help="Base model of ESMs whose config names none."),
):
    """Import ESMs made elsewhere (current or legacy 0.1.0 layout); all are checked before any is stored."""
    with open_index(index) as opened:
        outcomes = opened.import_esm(folders, name, base_model)
    for source, outcome in outcomes.items():
        err.print(f"{outcome} source {source!r}")


@command("export-esm")
def export_esm(
    index: Path = INDEX,
    name: str = typer.Argument(..., help="Source to export."),
    folder: Path = typer.Argument(..., help="New folder for config.json and model.safetensors."),
):
    """Write a source's ESM in hf-dataset-selector's format (its ESM.from_pretrained loads it)."""
    with open_index(index, readonly=True) as opened:
        opened.export_esm(name, folder)
    err.print(f"exported source {name!r} to {folder}")


@command()
def serve(
    index: Path = INDEX,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, min=1, help="Server processes, each with its own model and store handle."),
    allow_writes: bool = typer.Option(False, "--allow-writes", help="Allow adding and removing sources over HTTP."),
    max_body_mb: float = typer.Option(64.0, min=0.001, help="Largest request body accepted, in MB."),
):
    """Answer queries over HTTP with the base model and index held warm (OpenAPI schema at /docs)."""
    from .serve import ServeConfig
    from .serve import serve as run_server

    run_server(ServeConfig(str(index), allow_writes, int(max_body_mb * 1e6)), host, port, workers)

