"""Ranking sources for a target: prefilter to candidates, rescore them exactly with ESM-LogME, sort."""

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ESMIndexError
from .esm import ESM
from .logme import TargetStats, encode_labels, logme_from_stats

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


def prefiltered(store, txn, prefilter, X, labels, regression, candidates, timings):
    """The `candidates` sources worth exact rescoring: the FAISS search for those whose linearised
    evidence for the target is highest (see prefilter.py)."""
    started = time.perf_counter()
    ids = prefilter.search(X, encode_labels(labels, regression), candidates)
    names = [n for n in (store.name_of(i, txn) for i in ids) if n is not None]
    timings["prefilter"] = time.perf_counter() - started
    return names


def rank(store, prefilter, X, labels, regression=False, top_k=10, candidates=DEFAULT_CANDIDATES, timings=None):
    """Rank the store's sources for target embeddings X with labels.

    `candidates` is how many sources the prefilter passes to exact rescoring; None or "all" rescores the
    whole pool (the exact full scan).
    """
    timings = dict(timings or {})
    if top_k <= 0:
        raise ESMIndexError(f"top-k must be positive, got {top_k}")
    started = time.perf_counter()
    meta = store.meta()
    X, labels = check_target(X, labels, meta["dim"])
    stats = TargetStats.from_embeddings(X, labels, regression)
    timings["statistics"] = time.perf_counter() - started

    with store.begin() as txn:  # one snapshot for the whole query
        pool = txn.stat(store.dbs["sources"])["entries"]
        if candidates in (None, "all") or candidates >= pool:
            started = time.perf_counter()
            names = store.names(txn)
            timings["prefilter"] = time.perf_counter() - started
        else:
            names = prefiltered(store, txn, prefilter, X, labels, regression, candidates, timings)

        started = time.perf_counter()
        scores = []
        for start in range(0, len(names), RESCORE_BATCH):
            esms = [ESM.from_arrays(r.arrays) for r in store.records(names[start : start + RESCORE_BATCH], txn)]
            scores.append(logme_from_stats([e.weight for e in esms], [e.bias for e in esms], stats))
        timings["rescore"] = time.perf_counter() - started

    scores = np.concatenate(scores) if scores else np.zeros(0)
    finite = np.isfinite(scores)
    order = [i for i in np.argsort(-np.where(finite, scores, -np.inf), kind="stable") if finite[i]][:top_k]
    results = [Result(r + 1, names[i], float(scores[i])) for r, i in enumerate(order)]
    failed = [names[i] for i in np.flatnonzero(~finite)]
    return Ranking(results, pool, len(names), timings, failed)

