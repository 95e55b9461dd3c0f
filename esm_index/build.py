"""Turning a labelled source into a store record: embed, fine-tune (or take a given model), fit the ESM.

`prepare_source` is a pure function of its inputs (no store, no open files afterwards), so it runs the
same in this process or on a Dask worker; only the caller writes the result to LMDB.
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .data import SOURCE_MAX_EXAMPLES, read_task
from .esm import ESM, ESMFitConfig
from .finetune import FinetuneConfig
from .prefilter import VECTOR_KEY, PrefilterConfig, source_vector
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


@dataclass
class BuildSettings:
    """What every source of one index shares: its base model, storage precision and fitting settings."""

    base_model: str
    pooling: str
    dim: int
    prefilter: dict
    dtype: str = "float32"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    esm: ESMFitConfig = field(default_factory=ESMFitConfig)

    @classmethod
    def from_meta(cls, meta, finetune=None, esm=None):
        return cls(
            meta["base_model"], meta["pooling"], meta["dim"], meta["prefilter"], meta.get("dtype", "float32"),
            finetune or FinetuneConfig(), esm or ESMFitConfig(),
        )


def content_hash(spec, settings):
    """A hash of everything that determines a source's record: the file's bytes and every setting."""
    digest = hashlib.sha256()
    with open(spec.path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    options = {k: v for k, v in asdict(spec).items() if k not in ("name", "path")}
    digest.update(json.dumps([options, asdict(settings)], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def esm_record(name, esm, settings, base_embeddings=None, info=None):
    """The store record of an ESM: its arrays, its prefilter vector and, given the source's base
    embeddings, summary statistics of the mapped embeddings (mean and spread) and of the base ones."""
    basis = PrefilterConfig(**settings.prefilter).basis(settings.dim)
    arrays = {**esm.to_arrays(settings.dtype), VECTOR_KEY: source_vector(esm.weight, basis)}
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
