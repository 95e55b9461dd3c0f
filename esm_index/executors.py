"""Where sources are prepared: in this process, or as tasks on a Dask cluster. Either way each result
comes back to the caller as soon as it is ready, and only the caller writes it to the store (LMDB has one
writer), so a build that is killed keeps every source committed before.

Dask runs the same code on a laptop (a LocalCluster of spawned processes on 127.0.0.1) or on many machines
(a scheduler started by hand, by dask-jobqueue on Slurm/PBS, or on Kubernetes): workers need esm-index
installed and the task files and models at the same paths as the driver.
"""

import os
import time
from dataclasses import dataclass, field

from .build import prepare_source
from .errors import ESMIndexError

EXECUTORS = ("local", "dask")
DEFAULT_WORKERS = 2


@dataclass
class Outcome:
    """One prepared source: its store record, or the one-line reason it failed."""

    name: str
    record: object = None  # a SourceRecord
    error: str | None = None


def run_source(spec, settings):
    """`prepare_source`, with a failure turned into its reason, so one bad source never stops the others."""
    try:
        return Outcome(spec.name, prepare_source(spec, settings))
    except ESMIndexError as e:
        return Outcome(spec.name, error=str(e))
    except Exception as e:  # a crash inside one source (a model that fails to load, ...) is that source's failure
        return Outcome(spec.name, error=f"{type(e).__name__}: {e}")


class LocalExecutor:
    """Prepares sources one after another in this process."""

    slots = 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, specs, settings):
        for spec in specs:
            yield run_source(spec, settings)


class DaskExecutor:
    """Prepares sources as tasks on Dask workers: on the cluster at `scheduler`, or else on a LocalCluster
    of `workers` spawned processes (never forked: torch and faiss may have run here) bound to 127.0.0.1,
    each running one source at a time with `threads` torch threads (default: its share of the cores).
    Workers of a cluster started elsewhere take their thread count from their own ESM_INDEX_THREADS."""

    def __init__(self, scheduler=None, workers=DEFAULT_WORKERS, threads=None):
        if not isinstance(workers, int) or workers < 1:
            raise ESMIndexError(f"the number of Dask workers must be a positive integer, got {workers!r}")
        self.scheduler = scheduler
        self.workers = workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)

    def __enter__(self):
        import dask
        from distributed import Client, LocalCluster

        if self.scheduler:
            try:
                self.client_ = Client(self.scheduler, timeout="30s", set_as_default=False)
            except (OSError, TimeoutError) as e:
                raise ESMIndexError(f"cannot reach the Dask scheduler at {self.scheduler} ({e})") from None
            return self
        with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):
            self.cluster_ = LocalCluster(
                n_workers=self.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, env={"ESM_INDEX_THREADS": str(self.threads)},
            )
        self.client_ = Client(self.cluster_, set_as_default=False)
        return self

    def __exit__(self, *exc):
        self.client_.close()
        if hasattr(self, "cluster_"):
            self.cluster_.close()
        return False

    @property
    def slots(self):
        """How many sources the cluster's workers can run at once, now (workers may come and go)."""
        return sum(self.client_.nthreads().values())

    def run(self, specs, settings):
        from distributed import as_completed

        names = {self.client_.submit(run_source, spec, settings, pure=False): spec.name for spec in specs}
        for future in as_completed(names, loop=self.client_.loop):
            try:
                outcome = future.result()
            except Exception as e:  # the task never ran to the end: its worker died (KilledWorker), ...
                outcome = Outcome(names[future], error=f"{type(e).__name__}: {e}")
            future.release()
            yield outcome


def make_executor(kind="local", scheduler=None, workers=None):
    """The executor a build command asks for; `scheduler` and `workers` belong to Dask only."""
    if kind not in EXECUTORS:
        raise ESMIndexError(f"unknown executor {kind!r} (choose from {', '.join(EXECUTORS)})")
    if kind == "local":
        if scheduler or workers is not None:
            raise ESMIndexError("a scheduler address and a worker count need the dask executor")
        return LocalExecutor()
    if scheduler and workers is not None:
        raise ESMIndexError("a worker count sizes a local Dask cluster; with a scheduler its own workers run")
    return DaskExecutor(scheduler, DEFAULT_WORKERS if workers is None else workers)


@dataclass
class BuildStatus:
    """A build so far: what happened to each source, how many run now, the rate and the time left.

    Rate and ETA count the sources prepared in this run (failed ones too), not those skipped unchanged.
    """

    total: int
    slots: int = 1
    results: dict = field(default_factory=dict)  # name -> "added" | "replaced" | "unchanged"
    failed: dict = field(default_factory=dict)  # name -> reason
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None

    def names(self, result):
        return [name for name, outcome in self.results.items() if outcome == result]

    @property
    def processed(self):
        return len(self.results) - len(self.names("unchanged")) + len(self.failed)

    @property
    def remaining(self):
        return self.total - len(self.results) - len(self.failed)

    @property
    def running(self):
        return min(self.slots, self.remaining)

    @property
    def seconds(self):
        return (self.ended or time.perf_counter()) - self.started

    @property
    def per_hour(self):
        return 3600 * self.processed / max(self.seconds, 1e-9)

    @property
    def eta(self):
        """Seconds left at the rate so far, or None before the first source is through."""
        return self.remaining * 3600 / self.per_hour if self.processed else None

    def to_dict(self):
        return {
            "total": self.total,
            "added": self.names("added"),
            "replaced": self.names("replaced"),
            "unchanged": self.names("unchanged"),
            "failed": [{"source": name, "error": reason} for name, reason in self.failed.items()],
            "seconds": round(self.seconds, 3),
            "sources_per_hour": round(self.per_hour, 1),
        }
