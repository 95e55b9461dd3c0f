"""The FAISS prefilter: one vector per source, one per target, inner-product search for candidates.

The vectors sketch what LogME rewards. An ESM W makes directions it stretches cheap for LogME's prior;
a target separates its classes along the directions of its between-class scatter S_b. In a fixed
orthonormal basis P (d x r) the source vector is the normalised r x r matrix P^T W^T W P and the target
vector the normalised P^T S_b P, both as their upper triangles (off-diagonal entries times sqrt 2), so the
inner product is the trace inner product tr(P^T W^T W P  P^T S_b P) / norms: how much the ESM stretches
the target's class-separating directions. The FAISS index is derived data: rebuilt from the store
when its generation is stale.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ESMIndexError

INDEX_FILE, STATE_FILE = "prefilter.faiss", "prefilter.json"
VECTOR_KEY = "prefilter.vector"


@dataclass
class PrefilterConfig:
    """Kept in the store's metadata: the sketch's rank and the seed of its basis."""

    rank: int = 24
    seed: int = 0

    def basis(self, dim):
        """The fixed orthonormal basis P (d x r) of this index."""
        rank = min(self.rank, dim)
        q, _ = np.linalg.qr(np.random.default_rng(self.seed).standard_normal((dim, rank)))
        return q


def _upper(matrix):
    """Upper triangle of a symmetric matrix, off-diagonal times sqrt 2: <upper(A), upper(B)> = tr(A B)."""
    rows, cols = np.triu_indices(matrix.shape[-1])
    scale = np.where(rows == cols, 1.0, np.sqrt(2.0))
    vector = matrix[..., rows, cols] * scale
    return (vector / max(np.linalg.norm(vector), 1e-30)).astype(np.float32)


def source_vector(weight, basis):
    """Prefilter vector of an ESM: the normalised sketch P^T W^T W P."""
    projected = np.asarray(weight, np.float64) @ basis
    return _upper(projected.T @ projected)


def target_vector(X, labels, basis):
    """Query vector of a target: the normalised between-class scatter in the basis P."""
    Z = (np.asarray(X, np.float64) - np.mean(X, axis=0)) @ basis
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.dtype.kind == "f":  # regression: scatter of the label-correlated directions
        y = labels - labels.mean(0)
        cross = Z.T @ y / len(Z)
        return _upper(cross @ cross.T)
    scatter = np.zeros((Z.shape[1], Z.shape[1]))
    for label in np.unique(labels):
        members = labels == label
        mean = Z[members].mean(0)
        scatter += members.mean() * np.outer(mean, mean)
    return _upper(scatter)


class Prefilter:
    """A FAISS inner-product index over the stored source vectors, tagged with the store's generation."""

    def __init__(self, index, generation):
        self.index = index
        self.generation = generation

    @classmethod
    def build(cls, store):
        """Rebuild from the store's records, reading only their prefilter vectors."""
        import faiss

        with store.env.begin() as txn:
            generation = store.meta(txn)["generation"]
            ids, vectors = [], []
            for record in store.records(txn=txn, keys=[VECTOR_KEY]):
                ids.append(record.info["id"])
                vectors.append(record.arrays[VECTOR_KEY])
        dim = PrefilterConfig(**store.meta()["prefilter"]).basis(store.meta()["dim"]).shape[1]
        width = dim * (dim + 1) // 2
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(width))
        if vectors:
            index.add_with_ids(np.stack(vectors).astype(np.float32), np.asarray(ids, dtype=np.int64))
        return cls(index, generation)

    def save(self, folder):
        import faiss

        folder = Path(folder)
        faiss.write_index(self.index, str(folder / (INDEX_FILE + ".tmp")))
        (folder / (INDEX_FILE + ".tmp")).replace(folder / INDEX_FILE)
        (folder / STATE_FILE).write_text(json.dumps({"generation": self.generation, "ntotal": self.index.ntotal}))

    @classmethod
    def load(cls, folder):
        """The persisted prefilter, or None when it is missing or unreadable."""
        import faiss

        folder = Path(folder)
        try:
            state = json.loads((folder / STATE_FILE).read_text())
            return cls(faiss.read_index(str(folder / INDEX_FILE)), state["generation"])
        except (OSError, ValueError, KeyError, RuntimeError):
            return None

    @classmethod
    def for_store(cls, store):
        """The prefilter matching the store's generation: loaded if fresh, else rebuilt (and saved if writable)."""
        prefilter = cls.load(store.path)
        if prefilter is None or prefilter.generation != store.generation:
            prefilter = cls.build(store)
            try:
                prefilter.save(store.path)
            except OSError:
                pass  # a read-only folder: keep the rebuilt index in memory
        return prefilter

    def search(self, query, k):
        """Ids of the k sources whose vectors score highest against the query vector."""
        if k <= 0:
            raise ESMIndexError(f"the number of candidates must be positive, got {k}")
        _, ids = self.index.search(np.asarray(query, np.float32)[None], min(k, self.index.ntotal))
        return [int(i) for i in ids[0] if i >= 0]
