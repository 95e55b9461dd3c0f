"""`esm-index serve` over loopback: real uvicorn servers in subprocesses answer as the CLI does, give one-line
4xx errors for bad requests, stay consistent while sources are added and removed, and schema-driven
fuzzing (schemathesis, positive and negative cases) finds no 5xx."""

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from esm_index import ESMIndex
from esm_index.cli import app
from esm_index.data import read_task
from esm_index.esm import ESM

STARTUP_SECONDS = 180  # two cores shared by everyone: importing torch can take a while
FUZZ_EXAMPLES = 20  # per endpoint and phase: about 500 requests, well under a minute


class Server:
    """`esm-index serve INDEX` on a free loopback port, in its own process; stopped on exit."""

    def __init__(self, index, folder, *flags):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.index, self.url = index, f"http://127.0.0.1:{self.port}"
        self.stdout, self.stderr = folder / "stdout.log", folder / "stderr.log"
        command = [str(Path(sys.executable).with_name("esm-index")), "serve", str(index), "--port", str(self.port), *flags]
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err)
        self.client = httpx.Client(base_url=self.url, timeout=120)
        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            while not self.up():
                assert self.process.poll() is None, f"server exited: {self.stderr.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"not up in {STARTUP_SECONDS}s: {self.stderr.read_text()[-2000:]}"
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def up(self):
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self):
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def serving(built_index, tmp_path_factory, *flags):
    """A server on a private copy of the built index."""
    folder = tmp_path_factory.mktemp("serve")
    shutil.copytree(built_index, folder / "index")
    server = Server(folder / "index", folder, *flags)
    try:
        yield server
    finally:
        server.stop()
    assert server.stdout.read_text() == "", "logs belong on stderr"


@pytest.fixture(scope="module")
def served(built_index, tmp_path_factory):
    """A read-only server with a 1 MB body limit."""
    with serving(built_index, tmp_path_factory, "--max-body-mb", "1") as server:
        yield server


@pytest.fixture(scope="module")
def writable(built_index, tmp_path_factory):
    """A server that allows writes, with two worker processes."""
    with serving(built_index, tmp_path_factory, "--allow-writes", "--workers", "2") as server:
        yield server


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def call(server, method, path, body=None, status=200):
    response = server.client.request(method, path, json=body)
    assert response.status_code == status, response.text
    return response


def same_ranking(served_json, cli_json):
    """Equal rankings: every key and value but the timings' values (how long it took differs)."""
    assert set(served_json["timings"]) == set(cli_json["timings"])
    assert {k: v for k, v in served_json.items() if k != "timings"} == {k: v for k, v in cli_json.items() if k != "timings"}


@pytest.fixture(scope="module")
def target_embeddings(built_index, tasks):
    target = read_task(tasks["target"])
    with ESMIndex.open(built_index, readonly=True) as opened:
        return opened.encoder.embed(target.texts), target.labels


@pytest.mark.parametrize("options, flags", [
    ({"candidates": "all"}, ["--candidates", "all"]),
    ({"candidates": 2, "top_k": 1, "max_examples": 25, "seed": 3},
     ["--candidates", "2", "--top-k", "1", "--max-examples", "25", "--seed", "3"]),
])
def test_rank_texts_equals_cli(served, tasks, options, flags):
    target = read_task(tasks["target"])
    body = {"texts": target.texts, "labels": target.labels.tolist(), **options}
    response = call(served, "POST", "/rank/texts", body)
    same_ranking(response.json(), cli("query", served.index, tasks["target"], "--json", *flags))
    assert response.headers["X-Index-Generation"] == str(call(served, "GET", "/health").json()["generation"])


@pytest.mark.parametrize("regression", [False, True])
def test_rank_embeddings_equals_cli(served, target_embeddings, tmp_path, regression):
    X, labels = target_embeddings
    if regression:
        labels = np.arange(len(labels)) % 7 * 0.5
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", labels)
    body = {"embeddings": X.tolist(), "labels": labels.tolist(), "regression": regression, "candidates": 3}
    want = cli("query", served.index, "--embeddings", tmp_path / "X.npy", "--labels", tmp_path / "y.npy",
               "--candidates", "3", "--json", *(["--regression"] if regression else []))
    same_ranking(call(served, "POST", "/rank/embeddings", body).json(), want)


def test_sources_info_and_health_equal_cli(served):
    assert call(served, "GET", "/sources").json() == cli("list", served.index, "--json")
    info, want = call(served, "GET", "/info").json(), cli("info", served.index, "--json")
    assert {k: v for k, v in info.items() if k != "disk_bytes"} == {k: v for k, v in want.items() if k != "disk_bytes"}
    assert call(served, "GET", "/health").json() == {"status": "ok", "generation": info["generation"], "sources": 5}


TEXTS = ["cat dog the", "rain snow a"]
BAD_REQUESTS = {  # the CLI's bad inputs, and what only HTTP can get wrong
    "one class": ("POST", "/rank/texts", {"texts": TEXTS, "labels": ["a", "a"]}, 400, "need at least 2 classes"),
    "fewer labels": ("POST", "/rank/texts", {"texts": TEXTS, "labels": ["a"]}, 422, "1 labels for 2 examples"),
    "no texts": ("POST", "/rank/texts", {"texts": [], "labels": []}, 422, "texts: List should have at least 1 item"),
    "blank text": ("POST", "/rank/texts", {"texts": [" ", "b"], "labels": ["a", "b"]}, 422, "texts.0: String should"),
    "texts and pairs": ("POST", "/rank/texts", {"texts": ["a", ["b", "c"]], "labels": ["a", "b"]}, 422, "all strings or all"),
    "bad candidates": ("POST", "/rank/texts", {"texts": TEXTS, "labels": ["a", "b"], "candidates": "many"}, 422, "candidates:"),
    "zero top-k": ("POST", "/rank/texts", {"texts": TEXTS, "labels": ["a", "b"], "top_k": 0}, 422, "top_k: Input should be greater"),
    "unknown option": ("POST", "/rank/texts", {"texts": TEXTS, "labels": ["a", "b"], "topk": 3}, 422, "topk: Extra inputs"),
    "wrong dimension": ("POST", "/rank/embeddings", {"embeddings": [[1, 2], [3, 4]], "labels": [0, 1]}, 400,
                        "target embeddings have dimension 2, the index has 32"),
    "ragged embeddings": ("POST", "/rank/embeddings", {"embeddings": [[1, 2], [3]], "labels": [0, 1]}, 400,
                          "embedding rows have differing lengths"),
    "text regression labels": ("POST", "/rank/embeddings", {"embeddings": [[0.5] * 32] * 2, "labels": ["a", "b"],
                                                             "regression": True}, 400, "regression labels must be numbers"),
    "read-only add": ("PUT", "/sources/x", {"weight": [[1.0]], "bias": [0.0]}, 403, "start it with --allow-writes"),
    "read-only remove": ("DELETE", "/sources/all-four", None, 403, "read-only"),
    "unknown path": ("GET", "/nowhere", None, 404, "Not Found"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_one_line_4xx(served, case):
    method, path, body, status, message = BAD_REQUESTS[case]
    error = call(served, method, path, body, status).json()
    assert list(error) == ["error"] and message in error["error"] and "\n" not in error["error"]


@pytest.mark.parametrize("body, status, message", [
    (b'{"embeddings": [[NaN]], "labels": [1]}', 422, "embeddings.0.0: Input should be a finite number"),
    (b'{"embeddings": [[1.0]', 422, "invalid JSON at character"),
    (b'{"texts": ["' + b"x" * 1_100_000 + b'"], "labels": [1]}', 413, "limit of 1000000 bytes"),
])
def test_malformed_and_oversized_bodies(served, body, status, message):
    response = served.client.post("/rank/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status and message in response.json()["error"]
    assert call(served, "GET", "/health").json()["sources"] == 5  # and the server is still fine


def test_oversized_body_without_length_is_cut_off(served):
    chunks = (b"[" * 100_000 for _ in range(12))  # chunked transfer: no Content-Length to refuse up front
    response = served.client.post("/rank/texts", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit of 1000000 bytes" in response.json()["error"]


def test_serve_refuses_a_missing_index_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0
    assert "not an esm-index index" in result.stderr


def random_esm(seed, dim=32):
    rng = np.random.default_rng(seed)
    weight = np.eye(dim) + 0.2 * rng.standard_normal((dim, dim))
    return {"weight": weight.tolist(), "bias": (0.05 * rng.standard_normal(dim)).tolist(), "config": {"seed": seed}}


def test_concurrent_clients_while_sources_change(writable, target_embeddings):
    """Readers query without pause while sources are added (over HTTP and by another process through the
    API), replaced and removed: every answer is complete and matches one generation's sources exactly."""
    X, labels = target_embeddings
    start = call(writable, "GET", "/health").json()
    names = {start["generation"]: {s["name"] for s in call(writable, "GET", "/sources").json()["sources"]}}
    current = set(names[start["generation"]])
    answers, done = [], threading.Event()

    def changed(generation, name, present):
        current.add(name) if present else current.discard(name)
        names[generation] = set(current)

    def writer():
        try:
            deadline = time.monotonic() + 120
            while len(answers) < 4 and time.monotonic() < deadline:  # first, answers from before any write
                time.sleep(0.05)
            for i in range(6):
                name = f"added/{i}"
                if i % 2:
                    with ESMIndex.open(writable.index) as opened:  # another process, as `esm-index add` would
                        opened.add_esm(name, ESM(**random_esm(i)))
                        changed(opened.meta["generation"], name, True)
                else:
                    result = call(writable, "PUT", f"/sources/{name}", random_esm(i)).json()
                    assert result["outcome"] == "added"
                    changed(result["generation"], name, True)
            result = call(writable, "PUT", "/sources/added/0", random_esm(99)).json()
            assert result["outcome"] == "replaced"
            changed(result["generation"], "added/0", True)
            for name in ("added/1", "all-four"):
                result = call(writable, "DELETE", f"/sources/{name}").json()
                changed(result["generation"], name, False)
        finally:
            done.set()

    def reader(candidates):
        with httpx.Client(base_url=writable.url, timeout=120) as client:
            body = {"embeddings": X.tolist(), "labels": labels.tolist(), "candidates": candidates, "top_k": 100}
            finished = False
            while not finished:
                finished = done.is_set()  # so one more answer comes after the last write
                response = client.post("/rank/embeddings", json=body)
                answers.append((candidates, response.status_code, response.headers.get("X-Index-Generation"),
                                response.json()))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(c,)) for c in ("all", 3, "all", 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert done.is_set() and len(names) == 10, sorted(names)
    generations = set()
    for candidates, status, generation, ranking in answers:
        assert status == 200, ranking
        generations.add(int(generation))
        sources = names[int(generation)]
        assert ranking["pool"] == len(sources) and ranking["failed"] == []
        assert ranking["candidates"] == (len(sources) if candidates == "all" else 3)
        assert {r["source"] for r in ranking["results"]} <= sources
        if candidates == "all":
            assert {r["source"] for r in ranking["results"]} == sources
    assert len(generations) > 1, "the readers should have seen the sources change"
    final = max(names)
    assert {s["name"] for s in call(writable, "GET", "/sources").json()["sources"]} == names[final]
    body = {"embeddings": X.tolist(), "labels": labels.tolist(), "candidates": "all"}
    np.save(writable.index.parent / "X.npy", X)
    np.save(writable.index.parent / "y.npy", labels)
    same_ranking(call(writable, "POST", "/rank/embeddings", body).json(),
                 cli("query", writable.index, "--embeddings", writable.index.parent / "X.npy",
                     "--labels", writable.index.parent / "y.npy", "--candidates", "all", "--json"))


def test_fuzzing_finds_no_server_error(writable, tmp_path):
    """schemathesis, driven by /openapi.json, sends valid and invalid requests (its coverage, fuzzing and
    stateful phases) to every endpoint, writes included: never a 5xx, invalid input refused with a 4xx,
    every answer as the schema documents it."""
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance," \
             "negative_data_rejection"
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{writable.url}/openapi.json",
               "--max-examples", str(FUZZ_EXAMPLES), "--seed", "0", "--checks", checks, "--request-timeout", "120"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", result.stdout).groups())
    assert generated == passed >= 200, result.stdout[-2000:]
