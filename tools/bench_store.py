"""What the store's guarantees cost: writes against raw LMDB puts of the same bytes, queries with and
without a writer process committing beside them, verify and a prefilter rebuild.

    python tools/bench_store.py [--sources 200] [--dim 128] [--queries 15]

Every write is one fsynced LMDB transaction in both arms of the write comparison, so the ratio is the
bookkeeping (record check, ids table, generation, id counter) and not the disk.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch: both bring OpenMP)
import lmdb
import numpy as np

from esm_index import ESMIndex
from esm_index.esm import ESM


def random_esm(seed, dim):
    rng = np.random.default_rng(seed)
    return ESM(np.eye(dim) + 0.1 * rng.standard_normal((dim, dim)), rng.standard_normal(dim))


def keep_writing(path, dim):
    """The concurrent writer: replace sources one transaction at a time until killed."""
    with ESMIndex.open(path) as index:
        names = index.store.names()
        for step in range(10**9):
            index.add_esm(names[step % len(names)], random_esm(10**6 + step, dim))


def time_queries(index, X, labels, count, candidates):
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        index.query_embeddings(X, labels, candidates=candidates)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=15)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    print(f"# {args.sources} sources, d={args.dim}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    folder = Path(tempfile.mkdtemp(prefix="bench-store-"))

    with ESMIndex.create(folder / "index", base_model="x", dim=args.dim) as index:
        started = time.perf_counter()
        for i in range(args.sources):
            index.add_esm(f"s{i}", random_esm(i, args.dim))
        ours = (time.perf_counter() - started) / args.sources
        blobs = [index.store.get(f"s{i}").encode() for i in range(args.sources)]
        size = (folder / "index" / "data.mdb").stat().st_size / args.sources

    env = lmdb.open(str(folder / "raw"), map_size=1 << 34)
    started = time.perf_counter()
    for i, blob in enumerate(blobs):
        with env.begin(write=True) as txn:
            txn.put(f"s{i}".encode(), blob)
    raw = (time.perf_counter() - started) / args.sources
    env.close()
    print(f"add: {ours * 1e3:.1f} ms per source (raw LMDB put of the same record: {raw * 1e3:.1f} ms, "
          f"ratio {ours / raw:.2f}); {size / 1e3:.0f} kB on disk per source")

    rng = np.random.default_rng(0)
    X, labels = rng.standard_normal((300, args.dim)), rng.integers(0, 4, 300)
    with ESMIndex.open(folder / "index", readonly=True) as index:
        index.query_embeddings(X, labels)  # builds and saves the prefilter
        alone = {c: time_queries(index, X, labels, args.queries, c) for c in (None, 20)}
        writer = subprocess.Popen([sys.executable, __file__, "--writer", str(folder / "index"), str(args.dim)])
        time.sleep(2.0)
        before = index.meta["generation"]
        beside = {c: time_queries(index, X, labels, args.queries, c) for c in (None, 20)}
        writes = index.meta["generation"] - before
        writer.kill()
        writer.wait()
        for candidates in (None, 20):
            label = "all" if candidates is None else candidates
            print(f"query (candidates {label}): {alone[candidates] * 1e3:.0f} ms median alone, "
                  f"{beside[candidates] * 1e3:.0f} ms beside a writer process "
                  f"(ratio {beside[candidates] / alone[candidates]:.2f})")
        print(f"the writer committed {writes} replaces during those queries (each query of 20 candidates "
              f"rebuilds the prefilter when the generation moved)")

    with ESMIndex.open(folder / "index") as index:
        started = time.perf_counter()
        report = index.verify()
        checked = time.perf_counter() - started
        started = time.perf_counter()
        index.verify(repair=True)
        print(f"verify: {checked:.2f} s ({checked / args.sources * 1e3:.1f} ms per source, ok={report.ok}); "
              f"verify --repair with a stale prefilter: {time.perf_counter() - started:.2f} s")
    shutil.rmtree(folder)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--writer"]:
        keep_writing(sys.argv[2], int(sys.argv[3]))
    else:
        main()
