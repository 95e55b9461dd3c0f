"""`esm-index serve`: a warm query service over HTTP (FastAPI on uvicorn), for retrieval systems in any
language. One process holds the base model and the index open, so a query pays for neither.

Why it is shaped this way:
- answers are the CLI's: `POST /rank/texts` and `/rank/embeddings` return `Ranking.to_dict()`, the JSON of
  `query --json`, and take its options; `GET /sources` and `/info` return `list --json` and `info --json`;
- the store is LMDB, so every read sees the latest commit, and `ESMIndex.query_embeddings` ranks from one
  snapshot with the prefilter of that snapshot's generation (no torn view), rebuilt when a writer (this
  server or any other process) bumped it. The generation that answered is in the `X-Index-Generation`
  header: a query that a write overtook runs again (up to RACE_RETRIES times) so that header is exact;
- endpoints are plain functions, run in uvicorn's threadpool: numpy, torch and LMDB release the GIL. The
  encoder takes a lock (a tokenizer is not thread-safe); writes exclude reads, and the writable store maps
  all its address space up front (`threaded`), so no thread ever has to remap LMDB under another's reads;
- every bad request is a 4xx with one line, `{"error": "..."}`: ESMIndexError -> 400, schema -> 422,
  body too large -> 413, writes on a read-only server -> 403, unknown source -> 404;
- `--workers N` starts N spawned processes (uvicorn never forks), each opening its own LMDB environment.
"""

import copy
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictInt, StringConstraints, model_validator
from starlette.exceptions import HTTPException

from .data import TARGET_MAX_EXAMPLES, Task
from .errors import ESMIndexError
from .query import DEFAULT_CANDIDATES

CONFIG_ENV = "ESM_INDEX_SERVE"  # how the parent hands the config to spawned workers
RACE_RETRIES = 3  # runs of a query until the store's generation holds still across it
log = logging.getLogger("esm_index.serve")


@dataclass
class ServeConfig:
    index: str
    allow_writes: bool = False
    max_body_bytes: int = 64_000_000  # 1,000 texts are ~0.1 MB; 1,000 x 768 embeddings as JSON ~15 MB


# -- requests and responses: pydantic models, so the OpenAPI schema is precise ---------------------
Text = Annotated[str, StringConstraints(strict=True, strip_whitespace=True, min_length=1)]  # as task files are read
Label = Text | StrictInt | FiniteFloat
Labels = Annotated[
    list[Label] | list[Annotated[list[FiniteFloat], Field(min_length=1)]],
    Field(min_length=1, description="Class labels (strings or integers), or numbers with `regression` "
                                    "(one per example, or one list per example for several targets)."),
]


class RankOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: Labels
    regression: bool = Field(False, description="Labels are numbers (regression), not classes.")
    top_k: int = Field(10, ge=1, description="How many sources to return.")
    candidates: Annotated[int, Field(ge=1)] | Literal["all"] = Field(
        DEFAULT_CANDIDATES, description="How many prefilter candidates to rescore exactly, or 'all'.")

    def examples(self):
        raise NotImplementedError

    @model_validator(mode="after")
    def same_length(self):
        if len(self.labels) != len(self.examples()):
            raise ValueError(f"{len(self.labels)} labels for {len(self.examples())} examples")
        return self


class TextsQuery(RankOptions):
    """A target as texts (or [first, second] pairs) and labels, embedded by the server's base model."""

    texts: list[Text | tuple[Text, Text]] = Field(min_length=1)
    max_examples: int = Field(TARGET_MAX_EXAMPLES, ge=1, description="Seeded sample cap on target examples.")
    seed: int = Field(0, ge=0, description="Seed for sampling.")

    def examples(self):
        return self.texts

    @model_validator(mode="after")
    def one_kind(self):
        if len({isinstance(t, tuple) for t in self.texts}) > 1:
            raise ValueError("texts must be all strings or all [first, second] pairs")
        return self


class EmbeddingsQuery(RankOptions):
    """A target as precomputed base-model embeddings (n rows of the index's dimension) and labels."""

    embeddings: list[list[FiniteFloat]] = Field(min_length=1)

    def examples(self):
        return self.embeddings


class ESMUpload(BaseModel):
    """An ESM fitted elsewhere: f(x) = weight x + bias, with its config (hf-dataset-selector's config.json)."""

    model_config = ConfigDict(extra="forbid")

    weight: list[list[FiniteFloat]] = Field(min_length=1, description="d rows of d numbers.")
    bias: list[FiniteFloat] = Field(min_length=1, description="d numbers.")
    config: dict[str, Any] = Field(default_factory=dict)


class Result(BaseModel):
    rank: int
    source: str
    score: float


class RankingOut(BaseModel):
    """The JSON of `esm-index query --json`."""

    results: list[Result]
    pool: int
    candidates: int
    failed: list[str]
    timings: dict[str, float]


class Source(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class Sources(BaseModel):
    """The JSON of `esm-index list --json`."""

    sources: list[Source]


class Info(BaseModel):
    """The JSON of `esm-index info --json`."""

    model_config = ConfigDict(extra="allow")
    path: str
    base_model: str
    dim: int
    sources: int
    generation: int


class Health(BaseModel):
    status: Literal["ok"]
    generation: int
    sources: int


class Change(BaseModel):
    source: str
    outcome: Literal["added", "replaced", "removed"]
    generation: int


class Error(BaseModel):
    error: str


# -- the state one server process shares between its threads ----------------------------------------
class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers, so writes are not starved."""

    def __init__(self):
        self.condition = threading.Condition()
        self.readers = 0
        self.writer = False

    @contextmanager
    def reading(self):
        with self.condition:
            self.condition.wait_for(lambda: not self.writer)
            self.readers += 1
        try:
            yield
        finally:
            with self.condition:
                self.readers -= 1
                self.condition.notify_all()

    @contextmanager
    def writing(self):
        with self.condition:
            self.condition.wait_for(lambda: not self.writer)
            self.writer = True
            self.condition.wait_for(lambda: self.readers == 0)
        try:
            yield
        finally:
            with self.condition:
                self.writer = False
                self.condition.notify_all()


class Service:
    """One process's open index and base model, and the locks that let its threads share them."""

    def __init__(self, config):
        from .index import ESMIndex

        self.config = config
        self.index = ESMIndex.open(config.index, readonly=not config.allow_writes, threaded=True)
        self.access = ReadWriteLock()
        self.embedding = threading.Lock()

    def warm(self):
        """Load the prefilter and the base model now, so the first query pays for neither."""
        self.index.prefilter()
        try:
            self.index.encoder.dim
        except ESMIndexError as e:  # e.g. an index of imported ESMs: embeddings queries still work
            log.warning("text queries will fail: %s", e)

    def close(self):
        self.index.close()

    def embed(self, texts):
        with self.embedding:
            return self.index.encoder.embed(texts)

    def rank(self, X, labels, options, timings=None):
        """The ranking (one snapshot, see ESMIndex.query_embeddings) and the generation it was made at."""
        candidates = None if options.candidates == "all" else options.candidates
        store = self.index.store
        with self.access.reading():
            for _ in range(RACE_RETRIES):
                generation = store.generation
                ranking = self.index.query_embeddings(X, labels, options.regression, options.top_k, candidates, timings)
                if store.generation == generation:  # generations only grow: nothing committed in between
                    break
        return ranking, generation

    def write(self, change):
        """Run change() with every reader held back; returns its outcome and the generation it made."""
        if not self.config.allow_writes:
            raise HTTPException(403, "this server is read-only; start it with --allow-writes to change sources")
        with self.access.writing():
            return change(), self.index.store.generation


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes`, declared or streamed, gets a JSON 413. (Starlette's
    own limiter answers a declared oversize in plain text, whatever the app's error handlers say.)"""

    def __init__(self, app, max_bytes):
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"request body larger than this server's limit of {max_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"error": self.message}, status_code=413)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message)  # FastAPI passes it on to the app's handler
            return message

        await self.app(scope, limited, send)


def as_array(values, what, dtype=None):
    try:
        return np.asarray(values, dtype=dtype)
    except ValueError:
        raise ESMIndexError(f"{what} rows have differing lengths") from None


def validation_message(errors, shown=3):
    """Pydantic's errors as one line: the first error at each of the first few places. A place is the
    field path (`texts.0`), without the union-member tags pydantic inserts (`constrained-str`)."""
    found = {}
    for e in errors:
        if e["type"] == "json_invalid":
            return f"invalid JSON at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', e['msg'])}"
        where = ".".join(str(p) for p in e["loc"][1:] if isinstance(p, int) or str(p).isidentifier())
        found.setdefault(where, e["msg"].removeprefix("Value error, "))
    parts = [f"{where}: {message}" if where else message for where, message in found.items()]
    more = f" (and {len(parts) - shown} more)" if len(parts) > shown else ""
    return " ".join(("; ".join(parts[:shown]) + more).split())


def create_app(config):
    """The ASGI app of one server process: opens the index now, loads the base model at startup."""
    service = Service(config)

    @asynccontextmanager
    async def lifespan(app):
        service.warm()
        yield
        service.close()

    errors = {code: {"model": Error} for code in (400, 403, 404, 413, 422)}
    app = FastAPI(title="esm-index", summary="Rank intermediate tasks (sources) for a target with ESM-LogME.",
                  lifespan=lifespan, responses=errors)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.exception_handler(ESMIndexError)
    async def bad_input(request, e):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e):
        return JSONResponse({"error": validation_message(e.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def refused(request, e):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crashed(request, e):  # uvicorn logs the traceback
        return JSONResponse({"error": f"internal error ({type(e).__name__})"}, status_code=500)

    @app.get("/health", response_model=Health)
    def health():
        with service.access.reading():
            return {"status": "ok", "generation": service.index.store.generation, "sources": len(service.index)}

    @app.get("/info", response_model=Info)
    def info():
        with service.access.reading():
            return service.index.info()

    @app.get("/sources", response_model=Sources)
    def sources():
        with service.access.reading():
            return {"sources": service.index.sources()}

    @app.post("/rank/texts", response_model=RankingOut)
    def rank_texts(query: TextsQuery, response: Response):
        """Rank the sources for a target given as texts and labels (like `esm-index query DATA`)."""
        labels = as_array(query.labels, "label")
        task = Task(list(query.texts), labels, query.regression).subsample(query.max_examples, query.seed)
        started = time.perf_counter()
        X = service.embed(task.texts)
        ranking, generation = service.rank(X, task.labels, query, {"embed": time.perf_counter() - started})
        response.headers["X-Index-Generation"] = str(generation)
        return ranking.to_dict()

    @app.post("/rank/embeddings", response_model=RankingOut)
    def rank_embeddings(query: EmbeddingsQuery, response: Response):
        """Rank the sources for a target given as base-model embeddings (like `query --embeddings`)."""
        X = as_array(query.embeddings, "embedding", np.float64)
        ranking, generation = service.rank(X, as_array(query.labels, "label"), query)
        response.headers["X-Index-Generation"] = str(generation)
        return ranking.to_dict()

    @app.put("/sources/{name:path}", response_model=Change)
    def put_source(name: str, upload: ESMUpload):
        """Add (or replace) a source from its ESM. Only with --allow-writes."""
        from .esm import ESM

        esm = ESM(as_array(upload.weight, "weight"), np.asarray(upload.bias), upload.config)
        outcome, generation = service.write(lambda: service.index.add_esm(name, esm))
        return {"source": name, "outcome": outcome, "generation": generation}

    @app.delete("/sources/{name:path}", response_model=Change)
    def delete_source(name: str):
        """Remove a source. Only with --allow-writes."""

        def remove():
            if name not in service.index:
                raise HTTPException(404, f"no source named {name!r}")
            service.index.remove(name)
            return "removed"

        outcome, generation = service.write(remove)
        return {"source": name, "outcome": outcome, "generation": generation}

    return app


def app_from_env():
    """The app factory uvicorn calls in each worker process."""
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))


def serve(config, host="127.0.0.1", port=8000, workers=1):
    """Run the service on uvicorn until interrupted. Logs (access lines included) go to stderr."""
    import uvicorn

    from .index import ESMIndex

    ESMIndex.open(config.index, readonly=True).close()  # a bad index fails here, once, in one line
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    os.environ.setdefault("ESM_INDEX_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    uvicorn.run("esm_index.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_config=log_config)
