"""`ESMIndex`: the Python API that ties store, encoder, prefilter and rescoring together."""

import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from .build import BuildSettings, SourceSpec, content_hash, esm_record, prepare_source
from .embed import DEFAULT_BASE_MODEL, Encoder, check_pooling, default_pooling, resolve_model
from .errors import ESMIndexError
from .esm import ESM, check_origin, check_storage, import_name
from .prefilter import Prefilter, PrefilterConfig
from .query import DEFAULT_CANDIDATES, rank
from .store import SourceRecord, Store, check_new_folder
from .verify import check_record, verify

NAME_PATTERN = re.compile(r"^[\w.:@+/-][\w .:@+/=-]{0,199}$")
MAX_NAME_BYTES = 511  # LMDB's default largest key
PREFILTER_RETRIES = 3  # queries rerun when a write lands between the prefilter and the ranking's snapshot


def disk_bytes(folder):
    """Bytes of the files in a folder; a temporary file renamed away meanwhile (a prefilter save) counts 0."""
    total = 0
    for file in Path(folder).iterdir():
        try:
            total += file.stat().st_size if file.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def check_name(name):
    if (not isinstance(name, str) or not NAME_PATTERN.match(name) or name != name.strip()
            or len(name.encode()) > MAX_NAME_BYTES):
        raise ESMIndexError(f"invalid source name {name!r} (letters, digits, and . _ - : @ + / = space; "
                            f"1-200 chars, at most {MAX_NAME_BYTES} bytes in UTF-8)")
    return name


class ESMIndex:
    """A folder holding the LMDB store of one base model's sources and its derived FAISS prefilter.

    >>> index = ESMIndex.create("my-index")                 # the packaged MiniLM as base model
    >>> index.add_source("sst2", "sst2.csv")                # fine-tunes, fits the ESM, stores it
    >>> for result in index.query(target_texts, target_labels, top_k=5):
    ...     print(result.rank, result.source, result.score)
    """

    def __init__(self, store):
        self.store = store
        self.path = store.path
        self.prefilter_lock = threading.Lock()  # one refresh at a time: threads share an index in `serve`

    @classmethod
    def create(cls, path, base_model=DEFAULT_BASE_MODEL, dim=None, pooling=None, storage="float32", prefilter=None):
        """A new, empty index. With `dim` the base model need not be on this machine (imported ESMs,
        queries by precomputed embeddings): it is loaded only when texts must be embedded. `storage` is
        how records keep each ESM: one of `esm.STORAGE_FORMS`."""
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
        check_pooling(pooling)
        check_storage(storage)
        meta = {
            "base_model": str(base_model),
            "dim": dim,
            "pooling": pooling,
            "storage": storage,
            "prefilter": vars(prefilter or PrefilterConfig()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return cls(Store.create(path, meta))

    @classmethod
    def open(cls, path, readonly=False, threaded=False):
        """An existing index; `threaded`: one handle shared by threads that read while it writes (`serve`)."""
        return cls(Store(path, readonly=readonly, threaded=threaded))

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
            "storage": meta.get("storage", "float32"),
            "sources": len(self.store),
            "generation": meta["generation"],
            "schema_version": meta["schema_version"],
            "prefilter": vars(PrefilterConfig.from_meta(meta["prefilter"])),  # as queries use them
            "created": meta["created"],
            "disk_bytes": disk_bytes(self.path),
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
        if skip_unchanged and self.unchanged(spec, settings):
            return "unchanged"
        record = prepare_source(spec, settings, progress)
        return self.put(record)

    def unchanged(self, spec, settings):
        """Whether the store holds this source built from the same file and settings (a missing or
        damaged record is not: adding it again replaces it)."""
        try:
            stored = self.store.get(spec.name, keys=[]).info.get("content_hash")
        except ESMIndexError:
            return False
        return stored == content_hash(spec, settings)

    def build(self, specs, executor=None, finetune=None, esm=None, progress=None):
        """Add many sources, prepared by `executor` (default: one by one in this process; see
        `executors.DaskExecutor`) and committed each in its own transaction as it arrives, so an
        interrupted build keeps what finished; sources stored from the same content are skipped.
        A failing source is recorded in the returned `BuildStatus`, not raised.
        `progress(status, name, result)` follows each source."""
        from .executors import BuildStatus, LocalExecutor

        executor = executor or LocalExecutor()
        settings = BuildSettings.from_meta(self.meta, finetune, esm)
        status = BuildStatus(len(specs), executor.slots)

        def done(name, result, reason=None):
            if reason is None:
                status.results[name] = result
            else:
                status.failed[name] = reason
            status.slots = executor.slots
            if progress:
                progress(status, name, result)

        todo = []
        for spec in specs:
            try:
                check_name(spec.name)
                skip = self.unchanged(spec, settings)
            except (ESMIndexError, OSError) as e:  # a bad name, an unreadable file: this source fails
                done(spec.name, "failed", str(e))
                continue
            if skip:
                done(spec.name, "unchanged")
            else:
                todo.append(spec)
        for outcome in executor.run(todo, settings):
            result, reason = "failed", outcome.error
            if reason is None:
                try:
                    result = self.put(outcome.record)
                except ESMIndexError as e:  # a record that does not fit the index fails alone
                    reason = str(e)
            done(outcome.name, result, reason)
        status.ended = time.perf_counter()
        return status

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

    def import_esm(self, folders, name=None, base_model=None):
        """Import hf-dataset-selector ESM folders, each named `name` (one folder only), else by its config's
        task id (and subset), else by its folder. Every folder is read and checked (layout, base model,
        dimension) before any is stored; the config is kept as the source's metadata. Without source
        texts the record has no summary statistics, but its prefilter coordinates need only W.
        `base_model` stands in for configs that name none. Returns {name: "added" | "replaced"}."""
        if name is not None and len(folders) != 1:
            raise ESMIndexError(f"a name is for one imported ESM, got {len(folders)} folders")
        meta, loaded = self.meta, {}
        for folder in folders:
            esm = ESM.load(folder)
            check_origin(esm, folder, meta["base_model"], meta["dim"], base_model)
            source = check_name(name or import_name(esm.config, folder))
            if source in loaded:
                raise ESMIndexError(f"{folder}: a second ESM named {source!r} in one import (use --name)")
            info = {"imported_from": str(Path(folder).resolve())}
            if isinstance(esm.config.get("num_examples"), int):
                info["num_examples"] = esm.config["num_examples"]
            loaded[source] = esm, info
        return {source: self.add_esm(source, esm, info) for source, (esm, info) in loaded.items()}

    def export_esm(self, name, folder):
        """Write a source's ESM as an hf-dataset-selector folder (its `ESM.from_pretrained` loads it);
        from a float16 or low-rank index that is the stored approximation of the map."""
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ESMIndexError(f"{folder}: exists and is not an empty folder")
        record = self.store.get(name)
        esm = ESM.from_arrays(record.arrays, record.info.get("esm"))
        facts = {"base_model_name": self.meta["base_model"], "task_id": name,
                 "num_examples": record.info.get("num_examples")}
        esm.save(folder, {**{k: v for k, v in facts.items() if v is not None}, **esm.config})

    def convert(self, path, storage, progress=None):
        """A new index at `path` (a missing or empty folder) holding every source of this one with its ESM
        re-stored in `storage`, and its prefilter; this index is only read. From a triangular form the new
        records hold its rounded, rotated map; the statistics kept describe the map as fitted. A converted
        record has no content hash, as its hash named the old form: a later `build` prepares it again.
        The copy is made in a temporary folder beside `path` and moved there once complete, so a failure
        leaves nothing behind. `progress(done, total)` follows the sources. Returns the new index, open."""
        check_storage(storage)
        path, meta = check_new_folder(path), self.meta
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.converting"
        draft.mkdir()
        try:
            with ESMIndex.create(draft, meta["base_model"], meta["dim"], meta["pooling"], storage,
                                 PrefilterConfig.from_meta(meta["prefilter"])) as converted, self.store.begin() as txn:
                names = self.store.names(txn)
                for done, record in enumerate(self.store.records(names, txn), 1):
                    check_record(record, meta)  # a damaged source is refused by its name
                    kept = {key: value for key, value in record.arrays.items() if not key.startswith("esm.")}
                    info = {key: value for key, value in record.info.items() if key not in ("id", "content_hash")}
                    arrays = {**kept, **ESM.from_arrays(record.arrays).to_arrays(storage)}
                    converted.put(SourceRecord(record.name, arrays, info))
                    if progress:
                        progress(done, len(names))
                converted.prefilter()
            draft.rename(path)  # replaces `path` only if it is still a missing or empty folder
        except BaseException:
            shutil.rmtree(draft, ignore_errors=True)
            raise
        return ESMIndex.open(path)

    def put(self, record):
        """Store a prepared record, once it is checked to fit the index (shapes, finite values, base model)."""
        check_record(record, self.meta)
        return "replaced" if self.store.put(record) else "added"

    def remove(self, name):
        self.store.remove(name)

    def rename(self, old, new):
        self.store.rename(old, check_name(new))

    def verify(self, repair=False):
        """Check every record, the ids table and the saved prefilter (a `verify.Report`); `repair` rebuilds
        the derived parts that are stale or wrong."""
        return verify(self.store, repair)

    # -- queries ---------------------------------------------------------------------------------
    def prefilter(self):
        """The FAISS prefilter at the store's current generation (rebuilt if stale; thread-safe)."""
        with self.prefilter_lock:
            cached = getattr(self, "prefilter_", None)
            if cached is None or cached.generation != self.store.generation:
                self.prefilter_ = Prefilter.for_store(self.store)
            return self.prefilter_

    def query_embeddings(self, X, labels, regression=False, top_k=10, candidates=DEFAULT_CANDIDATES, timings=None):
        """Rank sources for a target given its base-model embeddings (n, d) and labels.

        Candidates and scores come from one generation: when a writer commits between the prefilter and
        the ranking's snapshot (generations only grow, so an unchanged one means none did), the query runs
        again with a fresh prefilter; if writes outpace that, it rescores every source in one snapshot."""
        for _ in range(PREFILTER_RETRIES):
            prefilter = self.prefilter()
            ranking = rank(self.store, prefilter, X, labels, regression, top_k, candidates, timings)
            if ranking.candidates == ranking.pool or self.store.generation == prefilter.generation:
                return ranking  # no prefilter used, or no write since it was made
        return rank(self.store, prefilter, X, labels, regression, top_k, None, timings)

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
