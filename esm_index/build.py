"""Turning a labelled source into a store record: embed, fine-tune (or take a given model), fit the ESM.

`prepare_source` is a pure function of its inputs (no store, no open files afterwards), so it runs the
same in this process or on a Dask worker; only the caller writes the result to LMDB.
"""

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .data import SOURCE_MAX_EXAMPLES, read_rows, read_task
from .errors import ESMIndexError
from .esm import ESM, ESMFitConfig
from .finetune import FinetuneConfig
from .store import SourceRecord


@dataclass
class SourceSpec:
    """One source to add: a task file with its column options, or a pre-fine-tuned model folder beside it."""

    name: str
    path: str
    text_column: str | None = None
    label_column: str | None = None
    regression: bool = False
    finetuned: str | None = None
    max_examples: int = SOURCE_MAX_EXAMPLES
    seed: int = 0


TASK_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
MANIFEST_SUFFIXES = (".json", ".jsonl", ".ndjson")


def read_sources(path):
    """The sources of a build: every task file in a folder, named by its stem, or the entries of a
    manifest (a .json list, or .jsonl lines, of objects with `SourceSpec` fields; `path` and `finetuned`
    relative to the manifest's folder)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in TASK_SUFFIXES)
        if not files:
            raise ESMIndexError(f"{path}: no task files ({', '.join(TASK_SUFFIXES)}) in this folder")
        specs = [SourceSpec(file.stem, str(file)) for file in files]
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        specs = [manifest_spec(path, number, entry) for number, entry in enumerate(manifest_entries(path), 1)]
    else:
        raise ESMIndexError(f"{path}: not a folder of task files nor a .json or .jsonl manifest")
    repeated = sorted(name for name, count in Counter(spec.name for spec in specs).items() if count > 1)
    if repeated:
        raise ESMIndexError(f"{path}: more than one source named {', '.join(map(repr, repeated))}")
    return specs


def manifest_entries(path):
    """The raw entries of a manifest: one JSON list, or one object per JSONL line."""
    if path.suffix.lower() != ".json":
        return read_rows(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ESMIndexError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ESMIndexError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ESMIndexError(f"{path}: a manifest holds a non-empty JSON list of sources")
    return entries


def manifest_spec(manifest, number, entry):
    """A manifest entry checked field by field against `SourceSpec`'s types."""
    where = f"{manifest}: source {number}"
    if not isinstance(entry, dict):
        raise ESMIndexError(f"{where}: expected a JSON object")
    types = {f.name: f.type for f in fields(SourceSpec)}
    unknown = sorted(set(entry) - set(types))
    if unknown:
        raise ESMIndexError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(types)})")
    for key in ("name", "path"):
        if key not in entry:
            raise ESMIndexError(f"{where}: missing {key!r}")
    for key, value in entry.items():
        kind = types[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ESMIndexError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    if entry.get("max_examples", 1) < 1:
        raise ESMIndexError(f"{where}: 'max_examples' must be positive")
    spec = SourceSpec(**entry)
    spec.path = str(manifest.parent / spec.path)
    if spec.finetuned:
        spec.finetuned = str(manifest.parent / spec.finetuned)
    return spec


@dataclass
class BuildSettings:
    """What every source of one index shares: its base model, ESM storage form and fitting settings."""

    base_model: str
    pooling: str
    dim: int
    storage: str = "float32"  # see esm.check_storage
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    esm: ESMFitConfig = field(default_factory=ESMFitConfig)

    @classmethod
    def from_meta(cls, meta, finetune=None, esm=None):
        return cls(
            meta["base_model"], meta["pooling"], meta["dim"], meta.get("storage", "float32"),
            finetune or FinetuneConfig(), esm or ESMFitConfig(),
        )


def content_hash(spec, settings):
    """A hash of everything that determines a source's record: the file's bytes, every setting and, for
    an already fine-tuned model, each of its files' name, size and modification time (as `make` would:
    hashing gigabytes of weights on every resumed build would cost more than it saves)."""
    digest = hashlib.sha256()
    with open(spec.path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    options = {k: v for k, v in asdict(spec).items() if k not in ("name", "path")}
    digest.update(json.dumps([options, asdict(settings)], sort_keys=True, default=str).encode())
    if spec.finetuned:
        model = Path(spec.finetuned)
        files = sorted(f for f in model.rglob("*") if f.is_file()) if model.is_dir() else []
        stats = [(str(f.relative_to(model)), f.stat()) for f in files]
        digest.update(json.dumps([(name, stat.st_size, stat.st_mtime_ns) for name, stat in stats]).encode())
    return digest.hexdigest()


def esm_record(name, esm, settings, base_embeddings=None, info=None):
    """The store record of an ESM: its arrays and, given the source's base embeddings, summary statistics
    of the mapped embeddings (mean and spread) and of the base ones."""
    arrays = esm.to_arrays(settings.storage)
    if base_embeddings is not None:
        mapped = esm.apply(base_embeddings)
        arrays.update({
            "stats.base_mean": base_embeddings.mean(0),
            "stats.mapped_mean": mapped.mean(0),
            "stats.mapped_std": mapped.std(0),
        })
    return SourceRecord(name, arrays, {**(info or {}), "esm": esm.config})


def prepare_source(spec, settings, progress=None):
    """Read, embed, fine-tune (unless a fine-tuned model is given), embed again, fit the ESM."""
    from .embed import Encoder
    from .finetune import finetune

    started = time.perf_counter()
    task = read_task(spec.path, spec.text_column, spec.label_column, spec.regression, spec.max_examples, spec.seed)
    encoder = Encoder(settings.base_model, settings.pooling)
    base = encoder.embed(task.texts)
    if spec.finetuned:
        tuned_model = Encoder(spec.finetuned, settings.pooling)
        tuned_model._load()
        model = tuned_model.model_
    else:
        model, _ = finetune(encoder, task, settings.finetune, progress=progress)
    tuned = encoder.embed(task.texts, model=model)
    esm = ESM.fit(base, tuned, settings.esm)
    info = {
        "source_file": str(spec.path),
        "finetuned": spec.finetuned,
        "num_examples": len(task),
        "num_classes": None if task.regression else int(len(np.unique(task.labels))),
        "regression": task.regression,
        "content_hash": content_hash(spec, settings),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return esm_record(spec.name, esm, settings, base, info)
