"""Ranking sources for a target: prefilter (FAISS screen, then the surrogate's choice) to candidates,
rescore them exactly with ESM-LogME, sort."""

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ESMIndexError
from .esm import ESM
from .logme import TargetStats, encode_labels, logme_from_stats
from .prefilter import PrefilterConfig
from .surrogate import select

DEFAULT_CANDIDATES = 200  # exactly rescored; pools up to this size are always scanned exactly
RESCORE_BATCH = 64


@dataclass
class Result:
    rank: int
    source: str
    score: float


@dataclass
class Ranking:
    """Sources ranked for one target, best first. `failed` names sources whose score was not finite."""

    results: list
    pool: int
    candidates: int
    timings: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)

    def __getitem__(self, i):
        return self.results[i]

    def to_dict(self):
        return {
            "results": [asdict(r) for r in self.results],
            "pool": self.pool,
            "candidates": self.candidates,
            "failed": list(self.failed),
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }


def check_target(X, labels, dim):
    """Validate precomputed target embeddings against the index; one-line errors for each mismatch."""
    X = np.asarray(X)
    labels = np.asarray(labels)
    if X.ndim != 2:
        raise ESMIndexError(f"target embeddings must be a 2-d array (n, d), got shape {X.shape}")
    if X.shape[1] != dim:
        raise ESMIndexError(f"target embeddings have dimension {X.shape[1]}, the index has {dim}")
    if len(labels) != len(X):
        raise ESMIndexError(f"{len(labels)} labels for {len(X)} embeddings")
    if X.dtype.kind not in "fiu" or not np.isfinite(X).all():
        raise ESMIndexError("target embeddings contain NaN, inf or non-numbers")
    return X.astype(np.float64), labels


def prefiltered(store, txn, prefilter, X, Y, budget, rescore, config):
    """`choose` on a store: the names of the sources chosen for exact rescoring and their scores (rescore
    takes names). Sources removed since the prefilter was built drop out."""
    names = {}

    def stored(ids):
        found = [store.name_of(i, txn) for i in ids.tolist()]
        names.update(zip(ids.tolist(), found))
        return np.array([n is not None for n in found], bool)

    ids, scores = choose(prefilter, X, Y, budget, lambda ids: rescore([names[i] for i in ids.tolist()]), config,
                         stored)
    return [names[i] for i in ids.tolist()], scores


def choose(prefilter, X, Y, budget, rescore, config, stored=None):
    """The `budget` source ids chosen for exact rescoring and their exact scores (rescore(ids) -> scores).
    The first pass screens (prefilter.py): FAISS on the linearised evidence or, for a target with fewer
    examples than dimensions, that evidence calibrated on the exact scores of `config.calibration` sources
    rescored first (BENCHMARKS.md, "The map's scale"); the second stage picks among the screened
    (surrogate.py). stored(ids), if given, masks the ids still in the store."""
    present = stored or (lambda ids: np.ones(len(ids), bool))
    sample, exact = np.zeros(0, np.int64), np.zeros(0)
    screened = config.screened(len(prefilter.ids), budget)
    if len(X) < X.shape[1] and 0 < config.calibration <= budget // 2:
        sample = prefilter.calibration_sample(config.calibration)
        sample = sample[present(sample)]
        exact = rescore(sample)
        ids, first_pass = prefilter.calibrated_search(X, Y, screened, sample, exact)
    else:
        ids, first_pass = prefilter.search(X, Y, screened)
    keep = present(ids) & ~np.isin(ids, sample)
    ids, first_pass = ids[keep], first_pass[keep]
    chosen, scores = select(first_pass, prefilter.coordinates_of(ids), budget - len(sample),
                            lambda picks: rescore(ids[picks]), config.anchors, config.local_rank, config.batch)
    return np.concatenate([sample, ids[chosen]]), np.concatenate([exact, scores])


def rank(store, prefilter, X, labels, regression=False, top_k=10, candidates=DEFAULT_CANDIDATES, timings=None):
    """Rank the store's sources for target embeddings X with labels.

    `candidates` is how many sources the prefilter passes to exact rescoring; None or "all" rescores the
    whole pool (the exact full scan).
    """
    timings = dict(timings or {})
    if top_k <= 0:
        raise ESMIndexError(f"top-k must be positive, got {top_k}")
    if candidates not in (None, "all") and candidates <= 0:
        raise ESMIndexError(f"the number of candidates must be positive, got {candidates}")
    started = time.perf_counter()
    meta = store.meta()
    X, labels = check_target(X, labels, meta["dim"])
    stats = TargetStats.from_embeddings(X, labels, regression)
    timings["statistics"] = time.perf_counter() - started

    with store.begin() as txn:  # one snapshot for the whole query
        pool = txn.stat(store.dbs["sources"])["entries"]
        rescoring = 0.0

        def rescore(names):
            nonlocal rescoring
            started = time.perf_counter()
            scores = [np.zeros(0)]
            for start in range(0, len(names), RESCORE_BATCH):
                esms = [ESM.from_arrays(r.arrays) for r in store.records(names[start : start + RESCORE_BATCH], txn)]
                scores.append(logme_from_stats([e.weight for e in esms], [e.bias for e in esms], stats))
            rescoring += time.perf_counter() - started
            return np.concatenate(scores)

        started = time.perf_counter()
        if candidates in (None, "all") or candidates >= pool:
            names = store.names(txn)
            scores = rescore(names)
        else:
            names, scores = prefiltered(store, txn, prefilter, X, encode_labels(labels, regression), candidates,
                                        rescore, PrefilterConfig.from_meta(meta["prefilter"]))
        timings["prefilter"] = time.perf_counter() - started - rescoring
        timings["rescore"] = rescoring

    finite = np.isfinite(scores)
    order = [i for i in np.argsort(-np.where(finite, scores, -np.inf), kind="stable") if finite[i]][:top_k]
    results = [Result(r + 1, names[i], float(scores[i])) for r, i in enumerate(order)]
    failed = [names[i] for i in np.flatnonzero(~finite)]
    return Ranking(results, pool, len(names), timings, failed)

