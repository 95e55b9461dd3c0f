"""How well the prefilter's linearised evidence ranks real ESMs (or a pool derived from them), at full size.

For every target task: the exact ESM-LogME scan against the evidence linearised at the pool's mean, in two
coordinates: log M (what the index uses) and M itself (the earlier prefilter), both before the PCA (which
is exact for pools of at most 65 sources anyway). Reports Spearman, recall@5 within the top K, and how
tightly the exact top 5 is packed: (1st - 5th best score) / standard deviation of the pool's scores.

    python tools/prefilter_real.py indexes/default [--examples 100] [--samples 2]   # the real maps alone
    python tools/prefilter_real.py indexes/default --pool 1000 --k 20 50 100 200   # a derived pool

With the real maps alone, recall is also measured on seeded samples of --examples target examples (the
ground truth's size). With --pool, the pool is tools/pool.py's (seed 0, as tools/bench_query.py derives it)
and its exact scans are cached where bench_query.py caches them, so either tool reuses the other's.
"""

import argparse
import sys
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent))
from bench_query import exact_scan, pool_folder, targets  # noqa: E402
from pool import DerivedPool, load_real  # noqa: E402

from esm_index.embed import DEFAULT_BASE_MODEL  # noqa: E402
from esm_index.evaluate import rank_correlation, recall_at_k  # noqa: E402
from esm_index.logme import TargetStats, encode_labels, logme_from_stats  # noqa: E402
from esm_index.prefilter import (_pack, _unpack, evidence_gradient, exp_chain,  # noqa: E402
                                 normalised_moments, packed_log)


class Linearised:
    """Both linearisations for one pool: its packed coordinates and their centres."""

    def __init__(self, batches):
        """batches: (W, b) of the pool's ESMs, a batch at a time."""
        chunks = [(packed_log(M), _pack(M).astype(np.float32))
                  for M, _ in (normalised_moments(W, b) for W, b in batches)]  # the research was scale-free
        self.log, self.plain = (np.concatenate(c) for c in zip(*chunks))
        size = round(np.sqrt(2 * self.log.shape[1] + 0.25) - 0.5)
        self.centre = np.linalg.eigh(_unpack(self.log.mean(0, dtype=np.float64), size))
        self.M0 = np.linalg.eigh(_unpack(self.plain.mean(0, dtype=np.float64), size))

    def scores(self, X, labels):
        Y = encode_labels(labels, False)
        values, vectors = self.centre
        log = self.log @ _pack(exp_chain(evidence_gradient(X, Y, np.exp(values), vectors), values, vectors))
        return {"log M": log, "M": self.plain @ _pack(evidence_gradient(X, Y, *self.M0))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real", type=Path, help="index folder or folder of ESM folders")
    parser.add_argument("--tasks", type=Path, default=Path("data/tasks"))
    parser.add_argument("--cache", type=Path, default=Path("data/bench"))
    parser.add_argument("--pool", type=int, help="derive a pool of this many ESMs from the real ones")
    parser.add_argument("--examples", type=int, default=100, help="target sample size (real maps alone)")
    parser.add_argument("--samples", type=int, default=2, help="seeded target samples per task (real maps alone)")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--targets", type=int, help="only the first this many target tasks")
    args = parser.parse_args()

    names, W, b, base_model = load_real(args.real)
    pool, batches = None, [(W, b)]
    if args.pool:
        pool = DerivedPool.derive(names, W, b, args.pool, seed=0)
        batches = (pool.materialise(np.arange(s, min(s + 64, args.pool))) for s in range(0, args.pool, 64))
        work = pool_folder(args.cache, names, args.pool, seed=0)
    with threadpool_limits(1, "blas"):
        linearised = Linearised(batches)
    kinds = ("log M", "M")
    count = len(linearised.log)
    print(f"{count} ESMs ({len(names)} real); chance recall@5 in the top K = K / {count}")
    columns = ["top-5 spread / sd"] + [f"{kind}: Spearman" for kind in kinds] + [f"{kind}: recall@5, top {K}" for kind in kinds for K in args.k]
    if pool is None:
        columns += [f"{kind}: recall@5, top {K}, {args.examples} examples" for kind in kinds for K in args.k]
    print("| target | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    rng = np.random.default_rng(0)
    table = []
    with threadpool_limits(1, "blas"):
        tasks = targets(args.tasks, args.cache / "targets", base_model or DEFAULT_BASE_MODEL)
        for name, (X, labels) in list(tasks.items())[: args.targets]:
            if pool is None:
                exact = logme_from_stats(W, b, TargetStats.from_embeddings(X, labels))
            else:
                exact, _ = exact_scan(pool, X, labels, work / f"scan-{name}.npz")
            score = linearised.scores(X, labels)
            best = np.sort(exact)[::-1]
            row = [(best[0] - best[4]) / exact.std()] + [rank_correlation(exact, score[kind])["spearman"] for kind in kinds]
            row += [recall_at_k(exact, np.argsort(-score[kind])[:K], 5) for kind in kinds for K in args.k]
            if pool is None:
                sampled = {(kind, K): [] for kind in kinds for K in args.k}
                for _ in range(args.samples):
                    pick = rng.choice(len(X), min(args.examples, len(X)), replace=False)
                    if len(np.unique(labels[pick])) < 2:
                        continue
                    exact = logme_from_stats(W, b, TargetStats.from_embeddings(X[pick], labels[pick]))
                    score = linearised.scores(X[pick], labels[pick])
                    for kind, K in sampled:
                        sampled[kind, K].append(recall_at_k(exact, np.argsort(-score[kind])[:K], 5))
                row += [np.mean(v) for v in sampled.values()]
            table.append(row)
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)
    print("| mean | " + " | ".join(f"{v:.3f}" for v in np.mean(table, 0)) + " |")


if __name__ == "__main__":
    main()
