"""`ESMIndex`: the Python API that ties store, encoder, prefilter and rescoring together."""

import re
import time
from pathlib import Path

from .build import BuildSettings, SourceSpec, content_hash, esm_record, prepare_source
from .embed import DEFAULT_BASE_MODEL, Encoder, default_pooling, resolve_model
from .errors import ESMIndexError
from .prefilter import Prefilter, PrefilterConfig
from .query import DEFAULT_CANDIDATES, rank
from .store import Store

NAME_PATTERN = re.compile(r"^[\w.:@+/-][\w .:@+/=-]{0,199}$")
DTYPES = ("float32", "float16")


def check_name(name):
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name != name.strip():
        raise ESMIndexError(f"invalid source name {name!r} (letters, digits, and . _ - : @ + / = space; 1-200 chars)")
    return name


class ESMIndex:
    """A folder holding the LMDB store of one base model's sources and its derived FAISS prefilter.

    >>> index = ESMIndex.create("my-index")                 # the packaged MiniLM as base model
    >>> index.add_source("sst2", texts, labels)             # fine-tunes, fits the ESM, stores it
    >>> for result in index.query(target_texts, target_labels, top_k=5):
    ...     print(result.rank, result.source, result.score)
    """

    def __init__(self, store):
        self.store = store
        self.path = store.path

    @classmethod
    def create(cls, path, base_model=DEFAULT_BASE_MODEL, dim=None, pooling=None, dtype="float32", prefilter=None):
        """A new, empty index. With `dim` the base model need not be on this machine (imported ESMs,
        queries by precomputed embeddings): it is loaded only when texts must be embedded."""
        if dtype not in DTYPES:
            raise ESMIndexError(f"unknown storage dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        if dim is None:
            encoder = Encoder(base_model, pooling)
            dim, pooling = encoder.dim, encoder.pooling_
        elif pooling is None:
            try:
                pooling = default_pooling(resolve_model(base_model))
            except ESMIndexError:
                pooling = "mean"  # not loadable here; stated in `info` and overridable
        if not isinstance(dim, int) or dim <= 0:
            raise ESMIndexError(f"the embedding dimension must be a positive integer, got {dim!r}")
        meta = {
            "base_model": str(base_model),
            "dim": dim,
            "pooling": pooling,
            "dtype": dtype,
            "prefilter": vars(prefilter or PrefilterConfig()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return cls(Store.create(path, meta))

    @classmethod
    def open(cls, path, readonly=False):
        return cls(Store(path, readonly=readonly))

    def close(self):
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- facts -----------------------------------------------------------------------------------
    @property
    def meta(self):
        return self.store.meta()

    @property
    def settings(self):
        return BuildSettings.from_meta(self.meta)

    @property
    def encoder(self):
        """The base model, loaded on first use."""
        if not hasattr(self, "encoder_"):
            self.encoder_ = Encoder(self.meta["base_model"], self.meta["pooling"])
        return self.encoder_

    def info(self):
        meta = self.meta
        return {
            "path": str(self.path),
            "base_model": meta["base_model"],
            "dim": meta["dim"],
            "pooling": meta["pooling"],
            "dtype": meta["dtype"],
            "sources": len(self.store),
            "generation": meta["generation"],
            "schema_version": meta["schema_version"],
            "prefilter": meta["prefilter"],
            "created": meta["created"],
            "disk_bytes": sum(f.stat().st_size for f in Path(self.path).iterdir() if f.is_file()),
        }

    def sources(self):
        """One dict per source: its name and stored facts (no arrays)."""
        return [{"name": r.name, **r.info} for r in self.store.records(keys=[])]

    def __len__(self):
        return len(self.store)

    def __contains__(self, name):
        return name in self.store

    # -- changes ---------------------------------------------------------------------------------
    def add(self, spec, finetune=None, esm=None, skip_unchanged=False, progress=None):
        """Add (or replace) the source described by a `SourceSpec`. Returns "added", "replaced" or
        "unchanged" (only with skip_unchanged, when the same content is already stored)."""
        check_name(spec.name)
        settings = BuildSettings.from_meta(self.meta, finetune, esm)
        if skip_unchanged and spec.name in self.store:
            stored = self.store.get(spec.name, keys=[]).info.get("content_hash")
            if stored == content_hash(spec, settings):
                return "unchanged"
        record = prepare_source(spec, settings, progress)
        return self.put(record)

    def add_source(self, name, path, text_column=None, label_column=None, regression=False, finetuned=None, **kw):
        """Add a source from a task file (CSV, TSV, JSONL). See `add` for the keyword options."""
        spec = SourceSpec(name, str(path), text_column, label_column, regression, finetuned)
        return self.add(spec, **kw)

    def add_esm(self, name, esm, info=None, base_embeddings=None):
        """Store an ESM fitted elsewhere (e.g. imported from hf-dataset-selector)."""
        check_name(name)
        if esm.dim != self.meta["dim"]:
            raise ESMIndexError(f"ESM {name!r} has dimension {esm.dim}, the index has {self.meta['dim']}")
        return self.put(esm_record(name, esm, self.settings, base_embeddings, info))

    def put(self, record):
        return "replaced" if self.store.put(record) else "added"

    def remove(self, name):
        self.store.remove(name)

    def rename(self, old, new):
        self.store.rename(old, check_name(new))

    # -- queries ---------------------------------------------------------------------------------
    def prefilter(self):
        """The FAISS prefilter at the store's current generation (rebuilt if stale)."""
        cached = getattr(self, "prefilter_", None)
        if cached is None or cached.generation != self.store.generation:
            self.prefilter_ = Prefilter.for_store(self.store)
        return self.prefilter_

    def query_embeddings(self, X, labels, regression=False, top_k=10, candidates=DEFAULT_CANDIDATES, timings=None):
        """Rank sources for a target given its base-model embeddings (n, d) and labels."""
        return rank(self.store, self.prefilter(), X, labels, regression, top_k, candidates, timings)

    def query(self, texts, labels, regression=False, top_k=10, candidates=DEFAULT_CANDIDATES, progress=None):
        """Rank sources for a target given its texts and labels (embedded with the base model)."""
        if len(texts) != len(labels):
            raise ESMIndexError(f"{len(labels)} labels for {len(texts)} texts")
        if len(texts) == 0:
            raise ESMIndexError("the target has no examples")
        started = time.perf_counter()
        X = self.encoder.embed(list(texts), progress=progress)
        timings = {"embed": time.perf_counter() - started}
        return self.query_embeddings(X, labels, regression, top_k, candidates, timings)
