"""Benchmark `esm-index serve` against the CLI on the real MiniLM: latency of one query of the same target
through `esm-index query` (a new process each time) and through a warm server, then requests per second
with concurrent clients. Loopback only.

    python tools/bench_serve.py                                  # builds runs/bench-serve-index first (resumable)
    python tools/bench_serve.py --index indexes/default --target indexes/default-target.csv

Without --index it builds a small index of real ESMs: base MiniLM -> `sre-embedding-model` (the same MiniLM
fine-tuned elsewhere), each ESM fitted on a different source task's texts from data/tasks (tools/make_tasks.py).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import httpx
import numpy as np

from esm_index import ESMIndex
from esm_index.build import SourceSpec
from esm_index.data import read_task

HERE = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def build_index(path, tasks, sources, per_source):
    """An index of real ESMs, one per source task, fitted base MiniLM -> sre-embedding-model; skips sources
    already stored from the same content, so an interrupted build resumes."""
    import sre_embedding_model

    tuned = Path(sre_embedding_model.__file__).parent / "model_weights"
    manifest = json.loads((tasks / "manifest.json").read_text())
    names = [t["name"] for t in manifest["tasks"] if t["role"] == "source"][:sources]
    index = ESMIndex.open(path) if (path / "data.mdb").exists() else ESMIndex.create(path)
    with index:
        for name in names:
            spec = SourceSpec(name, str(tasks / name / "train.csv"), finetuned=str(tuned), max_examples=per_source)
            started = time.perf_counter()
            outcome = index.add(spec, skip_unchanged=True)
            print(f"{name}: {outcome} ({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)


def cli_latencies(index, target_args, runs):
    """Wall time of `esm-index query INDEX TARGET_ARGS --json` in a new process each time: imports, ranking
    and, for a task file, loading the base model and embedding the texts."""
    command = [str(BIN / "esm-index"), "query", str(index), *map(str, target_args), "--json", "--quiet"]
    seconds, answer = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        seconds.append(time.perf_counter() - started)
        answer = json.loads(result.stdout)
    return seconds, answer


class Server:
    def __init__(self, index, workers):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [str(BIN / "esm-index"), "serve", str(index), "--port", str(port), "--workers", str(workers)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.perf_counter() - started > 300:
                self.stop()
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        self.startup = time.perf_counter() - started

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


def timed_posts(url, path, body, count):
    seconds = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = client.post(path, json=body)
            seconds.append(time.perf_counter() - started)
            response.raise_for_status()
    return seconds, response.json()


def throughput(url, path, body, clients, per_client):
    """Requests per second with `clients` threads each sending `per_client` requests back to back."""
    latencies = []

    def client():
        latencies.extend(timed_posts(url, path, body, per_client)[0])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - started), latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, help="an existing index (default: build runs/bench-serve-index)")
    parser.add_argument("--tasks", type=Path, default=HERE / "data/tasks")
    parser.add_argument("--sources", type=int, default=8, help="sources in the built index")
    parser.add_argument("--per-source", type=int, default=200, help="texts per source ESM in the built index")
    parser.add_argument("--target", type=Path, help="target task file (default: the first target's train.csv)")
    parser.add_argument("--target-examples", type=int, default=200, help="target examples per query")
    parser.add_argument("--cli-runs", type=int, default=5)
    parser.add_argument("--warm-runs", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    args = parser.parse_args()

    index = args.index
    if index is None:
        index = HERE / "runs/bench-serve-index"
        build_index(index, args.tasks, args.sources, args.per_source)
    target = args.target
    if target is None:
        manifest = json.loads((args.tasks / "manifest.json").read_text())
        target = args.tasks / next(t["name"] for t in manifest["tasks"] if t["role"] == "target") / "train.csv"
    task = read_task(target, max_examples=args.target_examples)
    with ESMIndex.open(index, readonly=True) as opened:
        pool = len(opened)
        X = opened.encoder.embed(task.texts)
    texts_body = {"texts": task.texts, "labels": task.labels.tolist(), "max_examples": args.target_examples}
    embeddings_body = {"embeddings": X.tolist(), "labels": task.labels.tolist()}
    print(f"index {index} ({pool} sources), target {target} ({len(task)} examples), {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the server on `timeout` or kill, too
    print("| query | requests | p50 s | p99 s | mean s |\n|---|---|---|---|---|", flush=True)
    cli, cli_answer = cli_latencies(index, [target, "--max-examples", args.target_examples], args.cli_runs)
    report("CLI `esm-index query TARGET` (new process each)", cli)
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "X.npy", X)
        np.save(Path(folder) / "y.npy", task.labels)
        cli_embeddings, _ = cli_latencies(index, ["--embeddings", Path(folder) / "X.npy", "--labels",
                                                  Path(folder) / "y.npy"], args.cli_runs)
    report("CLI `esm-index query --embeddings` (new process each)", cli_embeddings)
    server = Server(index, args.workers)
    try:
        timed_posts(server.url, "/rank/texts", texts_body, 2)  # warm-up
        warm, warm_answer = timed_posts(server.url, "/rank/texts", texts_body, args.warm_runs)
        assert [r["source"] for r in warm_answer["results"]] == [r["source"] for r in cli_answer["results"]]
        report("warm server, POST /rank/texts", warm)
        warm_embeddings, _ = timed_posts(server.url, "/rank/embeddings", embeddings_body, args.warm_runs)
        report("warm server, POST /rank/embeddings", warm_embeddings)
        rps = {}
        for path, body in (("/rank/texts", texts_body), ("/rank/embeddings", embeddings_body)):
            rps[path], latencies = throughput(server.url, path, body, args.clients, args.per_client)
            report(f"{args.clients} concurrent clients, POST {path}", latencies)
    finally:
        server.stop()
    print(f"\nserver startup (spawn to first /health): {server.startup:.1f}s; workers {args.workers}")
    print(f"p50 speed-up of the warm server over the CLI: {np.median(cli) / np.median(warm):.1f}x (texts), "
          f"{np.median(cli_embeddings) / np.median(warm_embeddings):.1f}x (embeddings)")
    print(f"throughput with {args.clients} concurrent clients: " + ", ".join(f"{v:.2f} req/s ({k})" for k, v in rps.items()))
    print(f"load average {os.getloadavg()[0]:.1f} at end")


def report(name, seconds):
    print(f"| {name} | {len(seconds)} | {np.percentile(seconds, 50):.3f} | {np.percentile(seconds, 99):.3f} "
          f"| {np.mean(seconds):.3f} |", flush=True)


if __name__ == "__main__":
    main()
