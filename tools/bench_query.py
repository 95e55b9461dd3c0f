"""Query latency by stage, memory, disk and recall of the prefilter, for pools of 10^3 to 10^6 ESMs.

Pools are derived from the real ESMs of an index by tools/pool.py (Dirichlet mixtures of real maps; see
its docstring). For each pool size N, in a fresh process (so peak memory is that size's own):
  build      the prefilter the index would build: its basis trained on a seeded sample of train_max
             sources' log moments, every source's coordinates, the FAISS index over them (exhaustive
             <= exact_max, IVF beyond), saved with Prefilter.save under --cache and reused by later runs
             with their build times (the coordinates of 10^5 maps take ~35 CPU-minutes).
  per target, from precomputed base embeddings of its texts, --repeats times (p50 and p90 reported):
    statistics  TargetStats (A, B) of the target
    prefilter   the target's query vector (the evidence gradient on the basis), the FAISS screen of
                PrefilterConfig.screened(N, K) sources and the second stage's choice of K among them,
                without the exact scores it asks for, which count as rescoring
    rescore     exact ESM-LogME of the K candidates (the surrogate's anchors included)
    query       the sum of the three; `+embed` adds embedding the target's texts with the base model
                (timed once per run on the first target).
    materialise rebuilding the candidates' maps from the compact pool, timed apart and not in `query`:
                an index reads them from LMDB instead (see `lmdb` below).
  exact      the full scan of the same pool: ESM-LogME of all N maps, for --scan-targets targets; scores
             are cached under --cache in chunks (resumable; a resumed scan reports the time summed over
             its runs). recall@k at K = share of the scan's top k among the K sources rescored exactly:
             as the index chooses them (FAISS screen, then the surrogate, its anchors' exact scores
             taken from the scan), and ", first pass" the FAISS top K alone.
  lmdb       for N <= --index-max, the same pool written to a real index (ESMs in the --storage form)
             and queried end to end with ESMIndex.query_embeddings (LMDB reads and all): p50 of its total.
             The index is kept under --cache and reused: delete its folder (index-FORM) after a change to
             how that form encodes, or the run measures the old records.

    python tools/bench_query.py indexes/default --sizes 1000 10000 100000 [--scan-targets 4] [--json out.json]
    python tools/bench_query.py REAL --sizes 1000 --quick     # 2 targets, 1 repeat: a smoke run
    python tools/bench_query.py REAL --sizes 1000 --seed 1 --screen 15 --anchors 32 --local-rank 3
                                  # another derived pool, other second-stage settings (the build is reused)
    python tools/bench_query.py REAL --sizes 1000 --examples 100   # targets of 100 examples (n < d)
    python tools/bench_query.py REAL --sizes 10000 --target-tasks fortunes_en_life bible_wisdom ...
                                  # other tasks as targets (held out from choosing the settings)

REAL is an index folder or a folder of ESM folders; targets are the "target" tasks of --tasks.
"""

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch: both bring OpenMP)
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from pool import DerivedPool, load_real  # noqa: E402

from esm_index.data import TARGET_MAX_EXAMPLES, read_task  # noqa: E402
from esm_index.embed import DEFAULT_BASE_MODEL, Encoder  # noqa: E402
from esm_index.evaluate import recall_at_k  # noqa: E402
from esm_index.logme import TargetStats, encode_labels, logme_from_stats  # noqa: E402
from esm_index.prefilter import Basis, Prefilter, PrefilterConfig, faiss_index, log_moments  # noqa: E402
from esm_index.query import DEFAULT_CANDIDATES, choose  # noqa: E402

RECALL_K = (5, 10)
CANDIDATES = (10, 20, 50, 100, 200)


def targets(tasks, cache, base_model, examples=None, seed=0, named=None):
    """{name: (X, labels)} of the target tasks (or of the `named` tasks, any role), base embeddings cached
    under `cache`, one folder per base model; with `examples`, a seeded sample of that many of each task's
    examples (the selection study's targets have 100)."""
    manifest = json.loads((tasks / "manifest.json").read_text())
    unknown = set(named or ()) - {task["name"] for task in manifest["tasks"]}
    if unknown:
        raise SystemExit(f"{tasks}: no task named {', '.join(sorted(unknown))}")
    out, encoder = {}, None
    cache = cache / f"{Path(base_model).name}-{hashlib.sha1(base_model.encode()).hexdigest()[:8]}"
    cache.mkdir(parents=True, exist_ok=True)
    for task in manifest["tasks"]:
        if (task["name"] not in named) if named else task["role"] != "target":
            continue
        file = cache / f"{task['name']}.npz"
        if not file.exists():
            encoder = encoder or Encoder(base_model)
            data = read_task(tasks / task["name"] / "train.csv", max_examples=TARGET_MAX_EXAMPLES)
            np.savez(file, X=encoder.embed(data.texts), labels=data.labels)
        saved = np.load(file)
        X, labels = saved["X"].astype(np.float64), saved["labels"]
        if examples:
            pick = np.random.default_rng(seed).choice(len(X), min(examples, len(X)), replace=False)
            X, labels = X[pick], labels[pick]
        out[task["name"]] = X, labels
    return out


def embed_seconds(tasks, name, base_model):
    """Wall time to embed one target's texts with the base model (model load excluded)."""
    encoder = Encoder(base_model)
    encoder._load()
    data = read_task(tasks / name / "train.csv", max_examples=TARGET_MAX_EXAMPLES)
    started = time.perf_counter()
    encoder.embed(data.texts)
    return time.perf_counter() - started


def exact_scan(pool, X, labels, file, batch=256):
    """ESM-LogME of every map of the pool; resumable through `file` (scores so far and seconds spent)."""
    if file.exists():
        saved = np.load(file)
        scores, seconds = saved["scores"], float(saved["seconds"])
    else:
        scores, seconds = np.full(len(pool), np.nan), 0.0
    stats = TargetStats.from_embeddings(X, labels)
    todo = int(np.argmax(np.isnan(scores))) if np.isnan(scores).any() else len(pool)
    for start in range(todo, len(pool), batch * 16):
        started = time.perf_counter()
        for chunk in range(start, min(start + batch * 16, len(pool)), batch):
            ids = np.arange(chunk, min(chunk + batch, len(pool)))
            scores[ids] = logme_from_stats(*pool.materialise(ids), stats)
        seconds += time.perf_counter() - started
        np.savez(file, scores=scores, seconds=seconds)
    return scores, seconds


def pool_folder(cache, names, size, seed):
    """The folder under `cache` for the pool of `size` ESMs derived from `names` with `seed` (created):
    its saved prefilter build and exact scans, shared by every tool that derives the same pool."""
    key = hashlib.sha1(json.dumps([names, size, seed]).encode()).hexdigest()[:12]
    folder = cache / f"pool-{size}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_size(args, size):
    """Everything measured for one pool size; returns a JSON-able dict."""
    faiss.omp_set_num_threads(args.threads)
    config = PrefilterConfig(screen=args.screen, anchors=args.anchors, local_rank=args.local_rank, batch=args.batch,
                             calibration=args.calibration)
    names, weights, biases, base_model = load_real(args.real)
    pool = DerivedPool.derive(names, weights, biases, size, seed=args.seed)
    dim = weights.shape[1]
    out = {"size": size, "real": len(names), "dim": dim, "config": vars(config)}
    work = pool_folder(args.cache, names, size, args.seed)

    prefilter, built = Prefilter.load(work), work / "build.json"
    if prefilter is not None and len(prefilter.ids) == size and built.exists():
        out.update(json.loads(built.read_text()))  # the saved build of an earlier run, and what it took
    else:
        started = time.perf_counter()
        sample = np.arange(size)
        if size > config.train_max:  # as Prefilter.build samples (there by source id, here by position)
            sample = np.sort(np.random.default_rng(config.seed).choice(size, config.train_max, replace=False))
        basis = Basis.fit(np.concatenate([log_moments(*pool.materialise(sample[s : s + 64]))
                                          for s in range(0, len(sample), 64)]), config.rank)
        out["basis_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        ids = np.arange(size, dtype=np.int64)
        vectors = pool.coordinates(basis, threads=args.threads)
        out["coordinates_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        prefilter = Prefilter(basis, ids, vectors, faiss_index(vectors, ids, config), 0)
        out["faiss_build_seconds"] = time.perf_counter() - started
        prefilter.save(work)
        built.write_text(json.dumps({k: out[k] for k in ("basis_seconds", "coordinates_seconds", "faiss_build_seconds")}))
        del vectors
    out["faiss_type"] = type(prefilter.index).__name__
    out["prefilter_file_bytes"] = (work / "prefilter.npz").stat().st_size

    data = targets(args.tasks, args.cache / "targets", args.base_model, args.examples, args.seed, args.target_tasks)
    names_t = list(data)[: args.targets]
    out["targets"] = names_t
    latency, recall = {}, {}
    for t, name in enumerate(names_t):
        X, labels = data[name]
        Y = encode_labels(labels, False)
        for _ in range(args.repeats):
            times = dict.fromkeys(("materialise", "rescore"), 0.0)
            started = time.perf_counter()
            stats = TargetStats.from_embeddings(X, labels)
            times["statistics"] = time.perf_counter() - started

            def rescore(picks):
                started = time.perf_counter()
                W, b = pool.materialise(picks)
                times["materialise"] += time.perf_counter() - started
                started = time.perf_counter()
                scores = logme_from_stats(W, b, stats)
                times["rescore"] += time.perf_counter() - started
                return scores

            started = time.perf_counter()
            choose(prefilter, X, Y, args.candidates, rescore, config)
            times["prefilter"] = time.perf_counter() - started - times["materialise"] - times["rescore"]
            times["query"] = sum(times[k] for k in ("statistics", "prefilter", "rescore"))
            for key, value in times.items():
                latency.setdefault(key, []).append(value)
        if t < args.scan_targets and size <= args.scan_max:
            sample = f"-n{args.examples}-seed{args.seed}" if args.examples else ""
            scores, seconds = exact_scan(pool, X, labels, work / f"scan-{name}{sample}.npz")
            latency.setdefault("exact_scan", []).append(seconds)
            for K in CANDIDATES:
                chosen, _ = choose(prefilter, X, Y, K, lambda picks: scores[picks], config)
                first_pass, _ = prefilter.search(X, Y, K)
                for k in RECALL_K:
                    recall.setdefault(f"r@{k} K={K}", []).append(recall_at_k(scores, chosen, k))
                    recall.setdefault(f"r@{k} K={K}, first pass", []).append(recall_at_k(scores, first_pass, k))
        print(f"  {size}: {name} done", file=sys.stderr, flush=True)
    out["latency_p50"] = {k: float(np.median(v)) for k, v in latency.items()}
    out["latency_p90"] = {k: float(np.percentile(v, 90)) for k, v in latency.items()}
    out["recall"] = {k: float(np.mean(v)) for k, v in recall.items()}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if size <= args.index_max:
        out["lmdb_query_p50"] = index_query(pool, work, data, names_t, base_model, args)
    return out


def index_query(pool, work, data, names_t, base_model, args):
    """p50 of ESMIndex.query_embeddings on a real index holding the pool in the --storage form (built
    once, then reused)."""
    from esm_index.index import ESMIndex

    path = work / ("index" if args.storage == "float32" else f"index-{args.storage}")
    if not (path / "data.mdb").exists():
        pool.to_index(path.with_suffix(".tmp"), base_model, args.storage)
        path.with_suffix(".tmp").rename(path)
    with ESMIndex.open(path, readonly=True) as index:
        index.prefilter()
        times = []
        for name in names_t:
            for _ in range(args.repeats):
                started = time.perf_counter()
                index.query_embeddings(*data[name], candidates=args.candidates)
                times.append(time.perf_counter() - started)
    return float(np.median(times))


def report(results, embed):
    """The figures as Markdown tables."""
    lines = [f"embedding one target's texts (base model, first target): {embed:.2f} s" if embed else ""]
    stages = ("statistics", "prefilter", "rescore", "query", "materialise")
    lines += ["", "| N | FAISS | build (basis + coordinates + FAISS) | " + " | ".join(f"{s} p50" for s in stages)
              + " | query+embed p50 | exact scan | speed-up | lmdb query p50 | peak RSS | prefilter file |",
              "|" + "---|" * (len(stages) + 9)]
    for r in results:
        p50 = r["latency_p50"]
        scan = p50.get("exact_scan")
        build = r["basis_seconds"] + r["coordinates_seconds"] + r["faiss_build_seconds"]
        lines.append(
            f"| {r['size']:,} | {r['faiss_type']} | {build:.1f} s | "
            + " | ".join(f"{p50[s] * 1000:.0f} ms" for s in stages)
            + f" | {(p50['query'] + embed) if embed else float('nan'):.2f} s"
            + (f" | {scan:.0f} s | {scan / p50['query']:.0f}x" if scan else " | - | -")
            + (f" | {r['lmdb_query_p50'] * 1000:.0f} ms" if "lmdb_query_p50" in r else " | -")
            + f" | {r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['prefilter_file_bytes'] / 2**20:.1f} MiB |")
    keys = sorted({k for r in results for k in r["recall"]},
                  key=lambda k: (k.split()[0], "first pass" in k, int(k.split("=")[1].split(",")[0])))
    if keys:
        lines += ["", "| recall (mean over scanned targets) | " + " | ".join(f"N={r['size']:,}" for r in results)
                  + " |", "|---|" + "---|" * len(results)]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(f"{r['recall'][key]:.3f}" if key in r["recall"] else "-"
                                                     for r in results) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real", type=Path, help="index folder or folder of ESM folders with the real ESMs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--tasks", type=Path, default=Path("data/tasks"))
    parser.add_argument("--cache", type=Path, default=Path("data/bench"))
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--targets", type=int, default=12, help="targets queried per size")
    parser.add_argument("--target-tasks", nargs="+", metavar="TASK",
                        help="these tasks of --tasks (any role, e.g. sources without a model: held-out targets)")
    parser.add_argument("--examples", type=int, help="a seeded sample (--seed) of this many examples per target")
    parser.add_argument("--scan-targets", type=int, default=4, help="targets whose exact full scan is run")
    parser.add_argument("--scan-max", type=int, default=10**6, help="largest N whose exact full scan is run")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="candidates rescored exactly")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--index-max", type=int, default=1000, help="largest N also queried as a real index")
    parser.add_argument("--storage", default="float32", help="ESM storage form of that index (esm.STORAGE_FORMS)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("ESM_INDEX_THREADS", 2)))
    parser.add_argument("--seed", type=int, default=0, help="of the derived pool (and of the --examples sample)")
    default = PrefilterConfig()
    parser.add_argument("--screen", type=float, default=default.screen, help="second stage: screen sqrt(N) candidates")
    parser.add_argument("--anchors", type=int, default=default.anchors, help="second stage: exactly scored anchors")
    parser.add_argument("--local-rank", type=int, default=default.local_rank, help="second stage: local directions")
    parser.add_argument("--batch", type=int, default=default.batch, help="second stage: rescored per model refit")
    parser.add_argument("--calibration", type=int, default=default.calibration,
                        help="targets with n < d: sources rescored to calibrate the first pass (0: never)")
    parser.add_argument("--quick", action="store_true", help="2 targets, 1 repeat, 1 scan, no embedding timing")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, JSON to stdout
    args = parser.parse_args()
    if args.quick:
        args.targets, args.repeats, args.scan_targets = 2, 1, 1
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(run_size(args, args.one)))
        return

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", file=sys.stderr)
    data = targets(args.tasks, args.cache / "targets", args.base_model, named=args.target_tasks)
    embed = None if args.quick else embed_seconds(args.tasks, next(iter(data)), args.base_model)
    results = []
    for size in args.sizes:
        child = [sys.executable, __file__, *sys.argv[1:], "--one", str(size)]
        done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()[0]
    print(f"load average at end: {load:.1f} ({os.cpu_count()} cores); latency at K = {args.candidates}; second "
          f"stage: screen {args.screen:g} sqrt(N), anchors {args.anchors}, local rank {args.local_rank}, batch {args.batch}")
    print(report(results, embed))
    if args.json:
        args.json.write_text(json.dumps({"embed_seconds": embed, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
