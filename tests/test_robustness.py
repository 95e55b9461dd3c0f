"""The store under real use: a writer process killed with SIGKILL again and again, and reader processes
querying while a writer adds, replaces, renames and removes sources.

Workers are real processes running this file (`python test_robustness.py writer|reader ...`), each opening
its own LMDB environment. Every source's ESM is a function of the seed in its name, so any process can
tell a whole record from a torn or stale one.
"""

import itertools
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from esm_index import ESMIndex
from esm_index.esm import ESM

DIM = 16
KILLS = 24
TAIL = 20  # sources the last, unkilled writer adds after resuming the series
READERS = 3
CHANGES = 240  # writes while the readers query
PACE = 0.015  # seconds between writes, so that even on a loaded machine every reader queries throughout


def esm_for(name):
    """The ESM a source named `s<seed>` (or `s<seed>-<suffix>`, after a rename) must hold."""
    rng = np.random.default_rng(int(re.match(r"s(\d+)", name)[1]))
    return ESM(np.eye(DIM) + 0.3 * rng.standard_normal((DIM, DIM)), rng.standard_normal(DIM))


def is_intact(index, name):
    stored = ESM.from_arrays(index.store.get(name).arrays)
    expected = esm_for(name)
    return np.array_equal(stored.weight, expected.weight) and np.array_equal(stored.bias, expected.bias)


def worker(*args):
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], stdout=subprocess.PIPE, text=True)


# -- the SIGKILL series --------------------------------------------------------------------------
def write_series(path, total=None):
    """Add s0000 .. s<total-1> (or on until killed), skipping those already stored (so a rerun resumes),
    and print each name once its transaction has committed. Every 10th add also replaces an earlier source
    with the same content and saves the prefilter, so kills land in replaces and prefilter saves too."""
    with ESMIndex.open(path) as index:
        print("ready", flush=True)
        for i in itertools.count() if total is None else range(total):
            name = f"s{i:04d}"
            if name in index:
                continue
            index.add_esm(name, esm_for(name))
            print(name, flush=True)
            if i % 10 == 9:
                assert index.add_esm(f"s{i - 5:04d}", esm_for(f"s{i - 5:04d}")) == "replaced"
                index.prefilter()


def test_writer_killed_24_times_mid_series_loses_nothing_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr("esm_index.store.MAP_SIZE", 1 << 17)  # small, so the map also grows under the kills
    path = tmp_path / "index"
    ESMIndex.create(path, base_model="x", dim=DIM).close()
    rng = random.Random(0)
    committed = set()
    for kill in range(KILLS):
        writer = worker("writer", path)
        assert writer.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.25))
        writer.kill()
        committed |= {line.strip() for line in writer.communicate()[0].splitlines()}
        assert writer.returncode == -9, f"kill {kill}: the writer died before it was killed"
        with ESMIndex.open(path, readonly=True) as index:
            report = index.verify()
            assert report.ok, f"kill {kill}: {report.problems}"
            assert all(name in index and is_intact(index, name) for name in committed), f"kill {kill}"
    assert committed
    total = max(int(name[1:]) for name in committed) + 1 + TAIL
    writer = worker("writer", path, total)
    writer.communicate()
    assert writer.returncode == 0
    with ESMIndex.open(path, readonly=True) as index:
        assert sorted(s["name"] for s in index.sources()) == sorted(f"s{i:04d}" for i in range(total))
        assert all(is_intact(index, f"s{i:04d}") for i in range(total))
        assert index.verify().ok
        assert index.store.env.info()["map_size"] > 1 << 17


# -- readers during writes -----------------------------------------------------------------------
def target(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((60, DIM)), rng.integers(0, 3, 60)


def read_loop(path, stop_file, seed):
    """Query until `stop_file` exists, checking each answer against the ESMs the names imply; print how
    many queries ran and the pool sizes seen. Any exception fails the process."""
    from esm_index.logme import TargetStats, logme_from_stats

    X, labels = target()
    stats = TargetStats.from_embeddings(X.astype(np.float64), labels, False)
    expected, pools, generations, queries = {}, set(), [], 0
    rng = random.Random(seed)
    with ESMIndex.open(path, readonly=True) as index:
        while True:
            candidates = rng.choice([None, 5])
            generations.append(index.meta["generation"])
            ranking = index.query_embeddings(X, labels, top_k=10_000, candidates=candidates)
            assert not ranking.failed and len(ranking) == ranking.candidates
            # every candidate the prefilter named exists in the snapshot scored (or all were rescored)
            assert ranking.candidates in (ranking.pool if candidates is None else min(5, ranking.pool), ranking.pool)
            for result in ranking:
                if result.source not in expected:
                    esm = esm_for(result.source)
                    expected[result.source] = float(logme_from_stats([esm.weight], [esm.bias], stats)[0])
                assert np.isclose(result.score, expected[result.source], rtol=1e-6), result
            pools.add(ranking.pool)
            queries += 1
            if queries == 1:
                print("ready", flush=True)
            if Path(stop_file).exists():
                break
    assert generations == sorted(generations)
    print(json.dumps({"queries": queries, "pools": sorted(pools)}), flush=True)


def test_3_reader_processes_never_see_a_torn_state_during_240_writes(tmp_path, monkeypatch):
    monkeypatch.setattr("esm_index.store.MAP_SIZE", 1 << 17)  # the map grows while the readers read
    path, stop_file = tmp_path / "index", tmp_path / "stop"
    rng = random.Random(1)
    with ESMIndex.create(path, base_model="x", dim=DIM) as index:
        live = [f"s{seed}" for seed in range(20)]
        for name in live:
            index.add_esm(name, esm_for(name))
        readers = [worker("reader", path, stop_file, seed) for seed in range(READERS)]
        assert all(reader.stdout.readline() == "ready\n" for reader in readers)
        seeds = iter(range(20, 20 + CHANGES))
        for step in range(CHANGES):
            time.sleep(PACE)
            change = rng.choice(["add", "add", "remove", "replace", "rename"]) if len(live) > 5 else "add"
            if change == "add":
                live.append(f"s{next(seeds)}")
                assert index.add_esm(live[-1], esm_for(live[-1])) == "added"
            elif change == "remove":
                index.remove(live.pop(rng.randrange(len(live))))
            elif change == "replace":
                name = rng.choice(live)
                assert index.add_esm(name, esm_for(name)) == "replaced"
            else:
                old = live.pop(rng.randrange(len(live)))
                live.append(f"{old.split('-')[0]}-{step}")
                index.rename(old, live[-1])
        stop_file.touch()
        summaries = []
        for reader in readers:
            out, _ = reader.communicate(timeout=60)
            assert reader.returncode == 0
            summaries.append(json.loads(out.splitlines()[-1]))
        assert sorted(index.store.names()) == sorted(live)
        assert index.verify().ok and index.store.env.info()["map_size"] > 1 << 17
    for summary in summaries:  # every reader queried throughout, and saw the pool change under it
        assert summary["queries"] >= 5 and len(summary["pools"]) >= 3, summary


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "writer":
        write_series(args[0], int(args[1]) if len(args) > 1 else None)
    else:
        read_loop(args[0], args[1], int(args[2]))
