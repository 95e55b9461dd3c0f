"""Scale pools: many realistic ESMs derived from a few real ones, kept compact, materialised on demand.

How a derived ESM is made. Each one picks `parents` distinct real ESMs at random and mixing weights
lam ~ Dirichlet(concentration), and is the affine map W = sum_j lam_j W_j, b = sum_j lam_j b_j. An ESM
fitted by least squares is linear in the fine-tuned embeddings it is fitted to, so on shared texts this
is exactly the ESM of a model whose embeddings are the lam-weighted average of its parents' fine-tuned
embeddings (an embedding-space "model soup" of related sources): a map of the kind real fine-tuning
produces, never random noise, and with a ranking that is not known in advance. A concentration below 1
makes most mixtures lean on one parent, so the pool holds many close relatives of every real source:
a hard case for a prefilter, which must tell near-duplicates apart. The real ESMs themselves are the
first entries of every pool.

Storage: parents and weights only (N x parents int32 + float32: 24 bytes per ESM at 3 parents, against
590 KB for one 384-d fp32 map), so pools of 10^6 fit in memory; `materialise` rebuilds any ESMs
exactly. Prefilter coordinates are those of the materialised maps (`coordinates`: one d x d moment and
its eigendecomposition per ESM, about 20 ms at d = 384, in threads), so large pools take a while: 10^5
ESMs ~35 CPU-minutes.

    python tools/pool.py REAL OUT.npz --size 100000 [--parents 3] [--concentration 0.5] [--seed 0]
    python tools/pool.py REAL OUT.npz --size 1000 --index data/pools/index-1k   # also a real LMDB index

REAL is an index folder or a folder of hf-dataset-selector ESM folders.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch: both bring OpenMP)
import numpy as np

from esm_index.embed import DEFAULT_BASE_MODEL
from esm_index.esm import ESM
from esm_index.index import ESMIndex
from esm_index.prefilter import log_moments


def load_real(path):
    """Names, weights (m, d, d) float32 and biases (m, d) of the real ESMs in an index or a folder of ESM
    folders, and their base model."""
    path = Path(path)
    if (path / "data.mdb").is_file():
        with ESMIndex.open(path, readonly=True) as index:
            esms = [(r.name, ESM.from_arrays(r.arrays)) for r in index.store.records()]
            base_model = index.meta["base_model"]
    else:
        esms = [(f.name, ESM.load(f)) for f in sorted(path.iterdir()) if (f / "config.json").is_file()]
        base_model = esms[0][1].config.get("base_model_name", DEFAULT_BASE_MODEL) if esms else None
    if len(esms) < 2:
        raise SystemExit(f"{path}: need at least 2 real ESMs, found {len(esms)}")
    return [n for n, _ in esms], np.stack([e.weight for _, e in esms]), np.stack([e.bias for _, e in esms]), base_model


@dataclass
class DerivedPool:
    """N ESMs, each a Dirichlet mixture of real ones; entry i < len(real) is real ESM i itself."""

    names: list  # of the real ESMs
    weights: np.ndarray  # (m, d, d) real weights
    biases: np.ndarray  # (m, d)
    parents: np.ndarray  # (N, p) indices into the real ESMs
    mix: np.ndarray  # (N, p) mixing weights, rows sum to 1

    @classmethod
    def derive(cls, names, weights, biases, size, parents=3, concentration=0.5, seed=0):
        m = len(names)
        parents = min(parents, m)
        if size < m:
            raise SystemExit(f"a pool of {size} cannot hold the {m} real ESMs it derives from")
        rng = np.random.default_rng(seed)
        picks = rng.random((size - m, m)).argsort(axis=1)[:, :parents]  # distinct parents per row
        real = np.zeros((m, parents), np.int64)
        real[:, 0] = np.arange(m)
        real[:, 1:] = (np.arange(m)[:, None] + np.arange(1, parents)) % m  # zero-weight fillers
        mix = np.zeros((m, parents), np.float32)
        mix[:, 0] = 1
        return cls(
            names, weights, biases,
            np.concatenate([real, picks]).astype(np.int32),
            np.concatenate([mix, rng.dirichlet([concentration] * parents, size - m).astype(np.float32)]),
        )

    def __len__(self):
        return len(self.parents)

    def name(self, i):
        return self.names[i] if i < len(self.names) else f"mix{i}"

    def recipe(self, i):
        """How ESM i is made: {real name: weight}."""
        return {self.names[p]: round(float(w), 4) for p, w in zip(self.parents[i], self.mix[i]) if w > 0}

    def materialise(self, ids):
        """Weights (k, d, d) and biases (k, d), float32, of the pool's ESMs `ids`."""
        ids = np.asarray(ids)
        mix, parents = self.mix[ids], self.parents[ids]
        W = np.einsum("kp,kpij->kij", mix, self.weights[parents], dtype=np.float32)
        b = np.einsum("kp,kpi->ki", mix, self.biases[parents], dtype=np.float32)
        return W, b

    def coordinates(self, basis, batch=64, threads=1):
        """Every ESM's prefilter coordinates on `basis` (prefilter.Basis), `batch` ESMs materialised at a
        time in each of `threads` threads (numpy's LAPACK calls release the GIL; BLAS runs one thread each)."""
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        def project(start):
            ids = np.arange(start, min(start + batch, len(self)))
            return basis.coordinates(log_moments(*self.materialise(ids)))

        with threadpool_limits(1, "blas"), ThreadPoolExecutor(threads) as pool:
            return np.concatenate(list(pool.map(project, range(0, len(self), batch))))

    def save(self, path):
        np.savez(path, names=np.asarray(self.names), parents=self.parents, mix=self.mix)

    @classmethod
    def load(cls, path, real):
        """A pool saved by `save`, with its real ESMs read from `real` (checked by name)."""
        saved = np.load(path)
        names, weights, biases, _ = load_real(real)
        if list(saved["names"]) != names:
            raise SystemExit(f"{path} was derived from other real ESMs than those in {real}")
        return cls(names, weights, biases, saved["parents"], saved["mix"])

    def to_index(self, path, base_model, storage="float32", progress=None):
        """A real esm-index index holding every ESM of the pool (for pools that fit on disk)."""
        with ESMIndex.create(path, base_model=base_model, dim=self.weights.shape[1], storage=storage) as index:
            for start in range(0, len(self), 256):
                ids = np.arange(start, min(start + 256, len(self)))
                for i, W, b in zip(ids, *self.materialise(ids)):
                    index.add_esm(self.name(i), ESM(W, b, {"mixture": self.recipe(i)}))
                if progress:
                    progress(ids[-1] + 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real", type=Path, help="index folder, or folder of ESM folders, holding the real ESMs")
    parser.add_argument("out", type=Path, help="where to write the pool (.npz: parents and weights)")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--parents", type=int, default=3)
    parser.add_argument("--concentration", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=Path, help="also write every ESM of the pool into a new index here")
    parser.add_argument("--storage", default="float32", help="storage form of that index's ESMs")
    args = parser.parse_args()

    started = time.perf_counter()
    names, weights, biases, base_model = load_real(args.real)
    pool = DerivedPool.derive(names, weights, biases, args.size, args.parents, args.concentration, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pool.save(args.out)
    print(f"{len(pool)} ESMs from {len(names)} real ones -> {args.out} ({time.perf_counter() - started:.1f}s)")
    if args.index:
        pool.to_index(args.index, base_model, args.storage,
                      progress=lambda done: print(f"{done}/{len(pool)}", file=sys.stderr, end="\r"))
        print(f"index of {len(pool)} ESMs -> {args.index} ({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
