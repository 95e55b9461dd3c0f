"""Sources per hour of an index build: one by one in this process (local) vs a Dask LocalCluster of
spawned workers, on the same sources, in one run.

    python tools/bench_build.py data/tasks --limit 8 --max-examples 256 --epochs 1 --workers 2

SOURCES is what `esm-index build` takes (a folder of task files or a manifest), or a folder written by
tools/make_tasks.py (its sources' train.csv). Prints, per executor, sources per hour while building and
over the whole wall time (cluster start included); then their ratio, whether both builds stored the same
ESMs, and what one commit costs the driver (the one LMDB writer), i.e. the ceiling on sources per hour
however many workers prepare them.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import numpy as np

from esm_index import ESMIndex
from esm_index.build import SourceSpec, read_sources
from esm_index.embed import DEFAULT_BASE_MODEL
from esm_index.executors import make_executor
from esm_index.finetune import FinetuneConfig


def load_specs(path, limit, max_examples):
    manifest = Path(path) / "manifest.json"
    if manifest.is_file():  # a tools/make_tasks.py folder
        tasks = json.loads(manifest.read_text())["tasks"]
        specs = [SourceSpec(t["name"], str(Path(path) / t["name"] / "train.csv")) for t in tasks if t["role"] == "source"]
    else:
        specs = read_sources(path)
    return [dataclasses.replace(spec, max_examples=max_examples) for spec in specs[:limit]]


def log(status, name, result):
    print(f"  {result} {name} ({status.total - status.remaining}/{status.total}, {status.per_hour:.0f}/h)",
          file=sys.stderr, flush=True)


def commit_seconds(index, name, repeats=20):
    """Median seconds for the driver to write one stored record again (one LMDB transaction)."""
    record = index.store.get(name)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        index.put(record)
        times.append(time.perf_counter() - started)
    return float(np.median(times)), len(record.encode())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", type=Path)
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--limit", type=int, default=8, help="first N sources")
    parser.add_argument("--max-examples", type=int, default=256, help="seeded sample cap per source")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    specs = load_specs(args.sources, args.limit, args.max_examples)
    print(f"{len(specs)} sources, <= {args.max_examples} examples each, {args.epochs:g} epoch(s), "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    rates, weights = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("local", "dask"):
            started, load = time.perf_counter(), os.getloadavg()[0]
            executor = make_executor(kind, workers=args.workers if kind == "dask" else None)
            with ESMIndex.create(Path(tmp) / kind, base_model=args.base_model) as index, executor:
                status = index.build(specs, executor, FinetuneConfig(epochs=args.epochs), progress=log)
                weights[kind] = {name: index.store.get(name).arrays["esm.weight"] for name in status.names("added")}
                if kind == "local":
                    commit, size = commit_seconds(index, status.names("added")[0])
            wall = time.perf_counter() - started
            rates[kind] = status.per_hour
            label = "local (1 process)" if kind == "local" else f"dask ({args.workers} workers)"
            print(f"{label:20} {status.per_hour:7.1f} sources/h building ({status.seconds:.0f} s), "
                  f"{3600 * len(specs) / wall:7.1f} sources/h over the wall time ({wall:.0f} s), "
                  f"{len(status.failed)} failed, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    same = weights["local"].keys() == weights["dask"].keys()
    gap = max(float(np.abs(weights["local"][n] - weights["dask"][n]).max()) for n in weights["local"]) if same else None
    print(f"dask / local: {rates['dask'] / rates['local']:.2f}x sources per hour")
    print(f"same sources stored: {same}; largest ESM weight difference: {gap}")
    print(f"driver commit: {1000 * commit:.2f} ms per {size / 1e6:.2f} MB record -> ceiling {3600 / commit:,.0f} sources/h")


if __name__ == "__main__":
    main()
