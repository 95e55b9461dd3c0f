"""Selection metrics: regret@k, NDCG, recall@k, rank correlation, checked by hand and by brute force."""

import json
import os
import shutil
import subprocess
import sys
from itertools import combinations, permutations
from pathlib import Path

import numpy as np
import pytest

from esm_index import ESMIndex, ESMIndexError
from esm_index.evaluate import (
    expected_random_regret, ndcg, rank_correlation, ranking, recall_at_k, regret_at_k,
)

TRUE = np.array([0.70, 0.80, 0.60, 0.75])


def test_regret_by_hand():
    scores = np.array([3.0, 1.0, 4.0, 2.0])  # ranks sources 2, 0, 3, 1
    assert regret_at_k(TRUE, scores, 1) == pytest.approx((0.80 - 0.60) / 0.80 * 100)
    assert regret_at_k(TRUE, scores, 2) == pytest.approx((0.80 - 0.70) / 0.80 * 100)
    assert regret_at_k(TRUE, scores, 3) == pytest.approx((0.80 - 0.75) / 0.80 * 100)
    assert regret_at_k(TRUE, scores, 4) == 0
    assert regret_at_k(TRUE, scores, 99) == 0  # k beyond the pool means the whole pool


def test_baseline_counts_towards_best():
    assert regret_at_k(TRUE, TRUE, 1) == 0
    assert regret_at_k(TRUE, TRUE, 1, baseline=0.5) == 0  # a baseline below every source changes nothing
    assert regret_at_k(TRUE, TRUE, 1, baseline=0.9) == pytest.approx((0.9 - 0.8) / 0.9 * 100)


def test_nan_scores_rank_last_and_ties_keep_input_order():
    assert ranking([np.nan, 1.0, 2.0, np.nan, 1.0]).tolist() == [2, 1, 4, 0, 3]
    scores = np.array([np.nan, np.nan, 1.0, np.nan])  # only the worst source ranked
    assert regret_at_k(TRUE, scores, 1) == pytest.approx(25.0)
    assert regret_at_k(TRUE, scores, 2) == pytest.approx((0.80 - 0.70) / 0.80 * 100)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("baseline", [None, 0.72, 0.95])
def test_expected_random_regret_is_the_mean_over_all_rankings(k, baseline):
    true = np.array([0.61, 0.7, 0.7, 0.55, 0.8])  # with a tie
    brute = np.mean([regret_at_k(true, -np.argsort(order), k, baseline) for order in permutations(range(5))])
    assert expected_random_regret(true, k, baseline) == pytest.approx(brute, abs=1e-12)


def test_ndcg_perfect_reversed_and_by_hand():
    assert ndcg(TRUE, TRUE) == pytest.approx(1.0)
    assert ndcg(TRUE, TRUE + 5) == pytest.approx(1.0)  # only the order matters
    assert ndcg(TRUE, -TRUE) < ndcg(TRUE, [1.0, 0.5, 0.0, 0.9]) < 1
    gain = 2 ** (100 * TRUE) - 1
    discount = 1 / np.log2([2, 3, 4, 5])
    order = [2, 0, 3, 1]
    expected = gain[order] @ discount / (np.sort(gain)[::-1] @ discount)
    assert ndcg(TRUE, [3.0, 1.0, 4.0, 2.0]) == pytest.approx(expected, rel=1e-12)
    assert ndcg(TRUE, [3.0, 1.0, 4.0, 2.0], k=2) == pytest.approx(
        gain[order[:2]] @ discount[:2] / (np.sort(gain)[::-1][:2] @ discount[:2]), rel=1e-12)


def test_ndcg_of_all_zero_performance_is_one():
    assert ndcg([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]) == 1.0


def test_recall_at_k():
    reference = np.array([0.1, 0.9, 0.5, 0.7, 0.3])  # top 2: sources 1 and 3
    assert recall_at_k(reference, [1, 3], 2) == 1.0
    assert recall_at_k(reference, [1, 0, 4], 2) == 0.5
    assert recall_at_k(reference, [], 2) == 0.0
    assert recall_at_k(reference, range(5), 5) == 1.0


def test_rank_correlation():
    a = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    assert rank_correlation(a, a * 10) == pytest.approx({"spearman": 1.0, "kendall": 1.0})
    assert rank_correlation(a, -a) == pytest.approx({"spearman": -1.0, "kendall": -1.0})
    swapped = rank_correlation(a, np.array([2.0, 1.0, 3.0, 4.0, 0.0]))  # NaN row ignored, one swap
    assert swapped["spearman"] == pytest.approx(0.8) and swapped["kendall"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("call, message", [
    (lambda: regret_at_k([0.5, 0.6], [1.0], 1), "1 scores for 2 sources"),
    (lambda: regret_at_k([50.0, 60.0], [1.0, 2.0], 1), "within [0, 1]"),
    (lambda: regret_at_k([0.5, np.nan], [1.0, 2.0], 1), "within [0, 1]"),
    (lambda: regret_at_k([], [], 1), "non-empty"),
    (lambda: regret_at_k([0.5, 0.6], [1.0, 2.0], 0), "positive integer"),
    (lambda: ndcg([0.5, 0.6], [1.0, 2.0], k=1.5), "positive integer"),
    (lambda: expected_random_regret([0.5, 0.6], -1), "positive integer"),
    (lambda: recall_at_k([], [0], 1), "non-empty"),
    (lambda: rank_correlation([1.0, 2.0], [1.0, 2.0]), "at least 3"),
    (lambda: rank_correlation([1.0, 2.0, 3.0], [1.0, 2.0]), "one length"),
])
def test_bad_input_raises_one_line_error(call, message):
    with pytest.raises(ESMIndexError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        call()
    assert "\n" not in str(info.value)


def test_regret_is_within_bounds_on_random_input():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        true, scores = rng.uniform(0.3, 1.0, n), rng.standard_normal(n)
        for k in (1, 3, 5):
            regret = regret_at_k(true, scores, k)
            assert 0 <= regret <= (true.max() - true.min()) / true.max() * 100 + 1e-12
            assert regret >= regret_at_k(true, scores, k + 1)  # more picks never hurt
        subsets = [true[list(c)].max() for c in combinations(range(n), min(3, n))]
        assert regret_at_k(true, true, 3) == pytest.approx((true.max() - max(subsets)) / true.max() * 100)


# -- the selection tools end to end, on the tiny model: ground truth, index, scores, EVALUATION.md -----

ROOT = Path(__file__).resolve().parents[1]
POOL = {  # name -> (classes, role)
    "animals-food": (["animals", "food"], "source"),
    "tools-weather": (["tools", "weather"], "source"),
    "animals-tools": (["animals", "tools"], "source"),
    "food-weather": (["food", "weather"], "source"),
    "animals-weather": (["animals", "weather"], "target"),
}


def tool(*args):
    """Run a tool as the lead would; its stderr is returned for checks, a failure shows it."""
    env = {**os.environ, "ESM_INDEX_THREADS": "1"}
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_model):
    """Task files in tools/make_tasks.py's layout and one tiny fine-tuned model per source."""
    from conftest import write_task

    folder = tmp_path_factory.mktemp("pool")
    tasks, models = folder / "tasks", folder / "models"
    manifest = []
    for i, (name, (classes, role)) in enumerate(POOL.items()):
        (tasks / name).mkdir(parents=True)
        write_task(tasks / name / "train.csv", classes, n=48, seed=i)
        write_task(tasks / name / "test.csv", classes, n=40, seed=100 + i)
        manifest.append({"name": name, "role": role, "corpus": "synthetic", "description": name, "classes": classes})
    (tasks / "manifest.json").write_text(json.dumps({"seed": 0, "tasks": manifest}))
    tool("tools/finetune_sources.py", tasks, models, "--base-model", tiny_model, "--max-examples", 32)
    return folder, tasks, models


def test_selection_tools_end_to_end(pool, tiny_model):
    folder, tasks, models = pool
    truth, scores, index = folder / "truth.jsonl", folder / "scores.jsonl", folder / "indexes" / "default"
    settings = ["--base-model", tiny_model, "--train-examples", 24, "--test-examples", 30, "--epochs", 1,
                "--seeds", 0, 1]
    tool("tools/ground_truth.py", tasks, models, truth, *settings)
    rows = [json.loads(line) for line in truth.read_text().splitlines()]
    assert len(rows) == (4 + 1) * 2  # (sources + baseline) x seeds, one target
    assert {r["source"] for r in rows} == {None, *[n for n, (_, role) in POOL.items() if role == "source"]}
    assert all(0 <= r["accuracy"] <= 1 and r["n_train"] == 24 and r["n_test"] == 30 for r in rows)
    assert all((r["source_model"] is None) == (r["source"] is None) for r in rows)  # how each source was tuned
    resumed = tool("tools/ground_truth.py", tasks, models, truth, *settings)
    assert "accuracy" not in resumed.stderr and len(truth.read_text().splitlines()) == 10  # nothing left to do
    refused = subprocess.run([sys.executable, "tools/ground_truth.py", str(tasks), str(models), str(truth),
                              "--base-model", str(tiny_model), "--train-examples", "25"], cwd=ROOT,
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "made with other settings" in refused.stderr
    refit = folder / "refit"  # the same models, but one source fine-tuned anew: its results are stale
    shutil.copytree(models, refit)
    facts = json.loads((refit / "animals-food" / "done.json").read_text())
    (refit / "animals-food" / "done.json").write_text(json.dumps({**facts, "epochs": facts["epochs"] + 1}))
    command = [sys.executable, "tools/ground_truth.py", str(tasks), str(refit), str(truth), *map(str, settings)]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 1 and "results for animals-food come from another model" in refused.stderr

    tool("tools/build_default_index.py", tasks, models, index, "--base-model", tiny_model,
         "--target", "animals-weather", "--target-rows", 20)
    assert not (index / "lock.mdb").exists() and not (index / "compact.tmp").exists()
    assert "| animals-food | synthetic |" in (index / "MANIFEST.md").read_text()
    assert len((folder / "indexes" / "default-target.csv").read_text().splitlines()) == 21
    with ESMIndex.open(index, readonly=True) as opened:
        assert sorted(opened.store.names()) == sorted(n for n, (_, role) in POOL.items() if role == "source")

    tool("tools/score_methods.py", tasks, models, index, scores, "--seeds", 0, 1, "--train-examples", 24,
         "--candidates", 2)
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(lines) == 2
    methods = lines[0]["methods"]
    assert set(methods) == {"esm_logme", "esm_logme_k2", "logme_finetuned", "textemb", "vocab_overlap", "random"}
    assert sum(v is not None for v in methods["esm_logme_k2"]["scores"]) == 2  # the prefilter kept two
    assert all(np.isfinite(methods[m]["scores"]).all() for m in ("esm_logme", "logme_finetuned", "textemb"))
    tool("tools/score_methods.py", tasks, models, index, scores, "--train-examples", 24, "--candidates", 3,
         "--only", "esm_logme_k3")  # one method rescored in place, the others kept as they were
    again = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [set(r["methods"]) for r in again] == [set(methods) | {"esm_logme_k3"}] * 2
    assert all(r["methods"]["textemb"] == old["methods"]["textemb"] for r, old in zip(again, lines))
    assert sum(v is not None for v in again[0]["methods"]["esm_logme_k3"]["scores"]) == 3
    before = scores.read_text()
    command = [sys.executable, "tools/score_methods.py", *map(str, (tasks, models, index, scores)),
               "--train-examples", "24", "--only", "esm_logme_k7"]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 1 and "unknown method(s) esm_logme_k7" in refused.stderr
    assert scores.read_text() == before

    output = folder / "EVALUATION.md"
    tool("tools/evaluate_selection.py", truth, scores, output)
    text = output.read_text()
    assert "4 sources x 1 targets x 2 seeds" in text
    mean = lambda source: np.mean([r["accuracy"] for r in rows if r["source"] == source])  # noqa: E731
    best_source = max(mean(n) for n, (_, role) in POOL.items() if role == "source")
    best = max(best_source, mean(None))
    assert f"| oracle (true ranking) | {(best - best_source) / best * 100:.2f} |" in text
    assert f"| (no intermediate task) | {mean(None) * 100:.1f} ± " in text
    for heading in ("## Does the ground truth carry signal?", "## Selection quality", "## Goals", "## Ground truth"):
        assert heading in text
    assert "| ESM-LogME, prefilter K=2 |" in text and "Rescored later" in text
