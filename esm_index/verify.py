"""`esm-index verify`: every stored record, the `ids` table and the saved FAISS prefilter, checked.

A problem breaks queries or makes them wrong; a note is expected and harmless (a stale or missing
prefilter is rebuilt by the next query). `repair` rebuilds the `ids` table and the prefilter file, gives a
record whose id is missing or taken a new one (the only change it makes to records: their maps and texts'
statistics are untouched), and never deletes a record: a damaged source is reported for the user to
remove or add again.
The same record checks guard every write (`check_record`), so what they reject is never stored.
"""

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ESMIndexError
from .esm import ESM
from .prefilter import INDEX_FILE, Prefilter, PrefilterConfig

META_KEYS = ("schema_version", "base_model", "dim", "pooling", "prefilter", "generation", "next_id")
STATS_KEYS = ("stats.base_mean", "stats.mapped_mean", "stats.mapped_std")  # optional: only with source texts


@dataclass
class Report:
    """What `verify` found: problems (it is not ok), notes (harmless) and what `repair` rebuilt."""

    path: str
    sources: int = 0
    generation: int | None = None
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    repaired: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.problems

    def to_dict(self):
        return {"ok": self.ok, **asdict(self)}


def expected_shapes(meta):
    """Shapes of the summary statistics of this index (optional arrays). The ESM's own depend on its storage
    form and are checked by decoding it; the settings of the prefilter are checked on the way."""
    PrefilterConfig.from_meta(meta["prefilter"])
    return {key: (meta["dim"],) for key in STATS_KEYS}


def record_problems(record, meta, shapes):
    """What is wrong with one decoded record for this index, one line each (empty: nothing)."""
    problems = []
    for key, array in record.arrays.items():
        if key in shapes and array.shape != shapes[key]:
            problems.append(f"{key} has shape {array.shape}, the index needs {shapes[key]}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            problems.append(f"{key} contains NaN or infinity")
    if not problems:
        try:
            esm = ESM.from_arrays(record.arrays)
            if esm.dim != meta["dim"]:
                problems.append(f"the ESM is {esm.dim}-d, the index {meta['dim']}-d")
        except KeyError as e:
            problems.append(f"missing array {e}")
        except (ESMIndexError, ValueError) as e:
            problems.append(f"the ESM's arrays do not form a map ({e})")
    config = record.info.get("esm")
    base_model = config.get("base_model_name") if isinstance(config, dict) else None
    if base_model is not None and base_model != meta["base_model"]:  # the rule of `esm.check_origin`
        problems.append(f"the ESM is for base model {base_model!r}, the index's is {meta['base_model']!r}")
    return [f"source {record.name!r}: {problem}" for problem in problems]


def check_record(record, meta):
    """Refuse a record that does not fit the index, with the first thing wrong with it."""
    problems = record_problems(record, meta, expected_shapes(meta))
    if problems:
        raise ESMIndexError(problems[0])


def verify(store, repair=False):
    """Check the store; with `repair`, rebuild what the check found stale or wrong in derived data and
    check again. The returned report lists what was repaired and what is still wrong."""
    report, stale = _check(store)
    if repair and stale:
        repaired = _repair(store, stale)
        report, _ = _check(store)
        report.repaired = repaired
    return report


def _check(store):
    """The report, and the derived parts to rebuild: "ids", "prefilter", "temporary" (leftover files)."""
    report, stale = Report(str(store.path)), set()
    with store.begin() as txn:
        meta = store.meta(txn)
        report.generation = meta.get("generation")
        missing = [key for key in META_KEYS if key not in meta]
        if missing:
            report.problems.append(f"metadata lacks {', '.join(missing)}")
            return report, stale
        try:
            shapes = expected_shapes(meta)
        except (TypeError, ValueError, ESMIndexError) as e:
            report.problems.append(f"metadata: unusable dim or prefilter settings ({e})")
            return report, stale
        names = store.names(txn)
        report.sources = len(names)
        ids, corrupt, renumber = {}, set(), False
        for name in names:
            try:
                record = store.get(name, txn)
            except ESMIndexError as e:
                report.problems.append(str(e))
                corrupt.add(name)
                continue
            report.problems += record_problems(record, meta, shapes)
            source_id = record.info.get("id")
            if type(source_id) is not int or source_id < 0:
                report.problems.append(f"source {name!r}: no valid id ({source_id!r})")
                renumber = True
            elif source_id in ids:
                report.problems.append(f"sources {ids[source_id]!r} and {name!r} share id {source_id}")
                renumber = True
            else:
                ids[source_id] = name
        table = store.id_table(txn)
    wrong = {i for i, name in ids.items() if table.get(i) != name}
    wrong |= {i for i, name in table.items() if ids.get(i) != name and name not in corrupt}
    if wrong:
        report.problems.append(f"the ids table disagrees with the records at {len(wrong)} id(s)")
    behind = bool(ids) and meta["next_id"] <= max(ids)
    if behind:
        report.problems.append(f"next_id {meta['next_id']} is not above the largest id {max(ids)}")
    if wrong or renumber or behind:
        stale.add("ids")
    _check_prefilter(store, report, stale)
    return report, stale


def _check_prefilter(store, report, stale):
    """Compare the saved prefilter with one rebuilt from the store at the same generation."""
    leftovers = list(store.path.glob(INDEX_FILE + ".*.tmp"))
    if leftovers:
        report.notes.append(f"{len(leftovers)} temporary prefilter file(s), left by a killed process or being written")
        stale.add("temporary")
    saved = Prefilter.load(store.path)
    if saved is None:
        exists = (store.path / INDEX_FILE).exists()
        state = "unreadable or of an earlier kind" if exists else "missing"
        report.notes.append(f"the saved prefilter is {state}; the next query builds it")
        stale.add("prefilter")
        return
    if saved.generation < report.generation:
        report.notes.append(f"the saved prefilter is stale (generation {saved.generation}, the store's "
                            f"{report.generation}); the next query rebuilds it")
        stale.add("prefilter")
        return
    if saved.generation > report.generation:  # the store was restored from an older copy
        report.problems.append(f"the saved prefilter is from generation {saved.generation}, "
                               f"newer than the store's {report.generation}")
        stale.add("prefilter")
        return
    try:
        fresh = Prefilter.build(store, previous=saved, reuse=False)
    except ESMIndexError as e:
        report.notes.append(f"the prefilter cannot be rebuilt to compare ({e})")
        return
    if fresh.generation != saved.generation:
        report.notes.append("the store changed during the check; the prefilter was not compared")
    elif not _same(fresh, saved):
        report.problems.append(f"the saved prefilter (generation {saved.generation}) differs from the store's sources")
        stale.add("prefilter")


def _same(fresh, saved):
    """Same sources, the same coordinates (recomputed on the saved basis) and a FAISS index holding them."""
    return (np.array_equal(fresh.ids, saved.ids) and fresh.vectors.shape == saved.vectors.shape
            and np.allclose(fresh.vectors, saved.vectors, rtol=1e-4, atol=1e-5)
            and (saved.index.ntotal if saved.index is not None else 0) == len(saved.ids))


def _repair(store, stale):
    """Rebuild the stale derived parts; returns what was done, one line each."""
    done = []
    if "ids" in stale:
        renumbered = store.rebuild_ids()
        done.append(f"rebuilt the ids table ({len(renumbered)} source(s) given a new id)")
    if "temporary" in stale:
        for file in store.path.glob(INDEX_FILE + ".*.tmp"):
            file.unlink(missing_ok=True)
        done.append("removed temporary prefilter files")
    if stale & {"ids", "prefilter"}:
        try:
            prefilter = Prefilter.build(store)
        except ESMIndexError:  # a corrupt record: the check reports it
            return done
        prefilter.save(store.path)
        done.append(f"rebuilt the prefilter at generation {prefilter.generation}")
    return done
