"""Does the index pick the right sources? Reads the ground truth and every method's scores, writes EVALUATION.md.

    python tools/evaluate_selection.py data/eval/ground_truth.jsonl data/eval/scores.jsonl EVALUATION.md

Evaluated: the sources with a result for every target and seed (and the baseline), and the targets
scored for every seed. A source's true performance on a target is its accuracy averaged over seeds;
each method is judged per (target, seed) on the scores it gave from that seed's training sample, then
averaged over seeds and targets. Regret@k and NDCG follow DESIGN (esm_index.evaluate).
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from esm_index.errors import ESMIndexError
from esm_index.evaluate import (
    expected_random_regret, ndcg, rank_correlation, ranking, recall_at_k, regret_at_k,
)

KS = (1, 3, 5)
BASELINE = "(no intermediate task)"
NAMES = {
    "oracle": "oracle (true ranking)",
    "esm_logme": "ESM-LogME, full scan",
    "logme_finetuned": "LogME on fine-tuned models",
    "textemb": "TextEmb (mean base embedding cosine)",
    "vocab_overlap": "vocabulary overlap (Jaccard)",
    "random": "random (seeded)",
    "random_expected": "random (exact expectation)",
}


def label(method):
    if method.startswith("esm_logme_k"):
        return f"ESM-LogME, prefilter K={method[len('esm_logme_k'):]}"
    return NAMES.get(method, method)


def read_lines(path):
    if not Path(path).is_file():
        raise ESMIndexError(f"{path}: no such file")
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class GroundTruth:
    """Accuracies by (target, source) over seeds; source None is the baseline."""

    def __init__(self, rows):
        if not rows:
            raise ESMIndexError("the ground-truth file is empty")
        self.settings = rows[0]["settings"]
        self.runs = defaultdict(dict)  # (target, source) -> seed -> accuracy
        self.n_test = {}
        self.hours = sum(row["seconds"] for row in rows) / 3600
        for row in rows:
            self.runs[row["target"], row["source"]][row["seed"]] = row["accuracy"]
            self.n_test[row["target"]] = row["n_test"]
        self.seeds = sorted({s for runs in self.runs.values() for s in runs})
        self.targets = [t for t in sorted({t for t, _ in self.runs}) if self.complete(t, None)]
        self.sources = sorted({s for _, s in self.runs
                               if s is not None and all(self.complete(t, s) for t in self.targets)})
        if not self.sources or not self.targets:
            raise ESMIndexError("no source has ground truth for every target and seed (with the baseline) yet")

    def complete(self, target, source):
        return len(self.runs.get((target, source), {})) == len(self.seeds)

    def accuracies(self, target, source):
        return np.array([self.runs[target, source][s] for s in self.seeds])

    def true(self, target, sources):
        return np.array([self.accuracies(target, s).mean() for s in sources])

    def standard_error(self, target, source):
        """Of a pair's mean accuracy: seed-to-seed spread and the test set's binomial error, combined."""
        values = self.accuracies(target, source)
        seed_se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
        p = values.mean()
        return float(np.sqrt(seed_se**2 + p * (1 - p) / self.n_test[target]))


def source_effect(gt, target):
    """Do sources differ beyond noise? Two-way ANOVA (source x seed block, seeds pair the runs)."""
    from scipy.stats import f

    table = np.stack([gt.accuracies(target, s) for s in [None, *gt.sources]])  # (sources + 1, seeds)
    S, K = table.shape
    if K < 2:
        return float("nan"), float("nan")
    residual = table - table.mean(1, keepdims=True) - table.mean(0, keepdims=True) + table.mean()
    between = K * ((table.mean(1) - table.mean()) ** 2).sum() / (S - 1)
    within = (residual**2).sum() / ((S - 1) * (K - 1))
    statistic = between / within
    return float(statistic), float(f.sf(statistic, S - 1, (S - 1) * (K - 1)))


def selection(gt, scores):
    """Per method: mean regret@k, NDCG, Spearman with the truth, seconds; and per-target regret@5."""
    per = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # method -> metric -> target -> values
    for row in scores:
        if row["target"] not in gt.targets or row["seed"] not in gt.seeds:
            continue
        if row["train_examples"] != gt.settings["train_examples"]:
            raise ESMIndexError(f"scores of {row['target']} used {row['train_examples']} target examples, "
                                f"the ground truth {gt.settings['train_examples']}")
        missing = sorted(set(gt.sources) - set(row["sources"]))
        if missing:
            raise ESMIndexError(f"scores of {row['target']} lack sources {', '.join(missing)} (rescore them)")
        keep = [row["sources"].index(s) for s in gt.sources]
        true, baseline = gt.true(row["target"], gt.sources), gt.true(row["target"], [None])[0]
        methods = {m: (np.array([np.nan if v is None else v for v in r["scores"]])[keep], r["seconds"])
                   for m, r in row["methods"].items()}
        methods["oracle"] = (true, 0.0)
        for method, (predicted, seconds) in methods.items():
            metrics = per[method]
            for k in KS:
                metrics[f"regret@{k}"][row["target"]].append(regret_at_k(true, predicted, k, baseline))
            metrics["ndcg"][row["target"]].append(ndcg(true, predicted))
            metrics["ndcg@5"][row["target"]].append(ndcg(true, predicted, 5))
            if np.isfinite(predicted).sum() >= 3:
                metrics["spearman"][row["target"]].append(rank_correlation(true, predicted)["spearman"])
            metrics["seconds"][row["target"]].append(seconds)
        for k in KS:
            per["random_expected"][f"regret@{k}"][row["target"]].append(expected_random_regret(true, k, baseline))
    return per


def mean_over_targets(values_by_target):
    """Mean over targets of the per-target mean over seeds, and its standard error across targets."""
    means = np.array([np.mean(v) for v in values_by_target.values() if len(v)])
    if not len(means):
        return float("nan"), float("nan")
    se = means.std(ddof=1) / np.sqrt(len(means)) if len(means) > 1 else float("nan")
    return float(means.mean()), float(se)


def agreement(gt, scores):
    """Rank correlation of ESM-LogME with LogME on fine-tuned models, and prefilter recall, per target."""
    rho, recall = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for row in scores:
        if row["target"] not in gt.targets:
            continue
        full = np.array([np.nan if v is None else v for v in row["methods"]["esm_logme"]["scores"]])
        tuned = np.array([np.nan if v is None else v for v in row["methods"]["logme_finetuned"]["scores"]])
        if (np.isfinite(full) & np.isfinite(tuned)).sum() >= 3:
            correlation = rank_correlation(full, tuned)
            rho["spearman"].append(correlation["spearman"])
            rho["kendall"].append(correlation["kendall"])
        rho["top1"].append(float(ranking(full)[0] == ranking(tuned)[0]))
        for method, result in row["methods"].items():
            if method.startswith("esm_logme_k"):
                kept = [i for i, v in enumerate(result["scores"]) if v is not None]
                for k in KS:
                    recall[method][k].append(recall_at_k(full, kept, k))
    return rho, recall


def fmt(value, digits=2):
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def fmt_se(mean, se, digits=2):
    """A mean with its standard error, when there is one."""
    return fmt(mean, digits) + (f" ± {se:.{digits}f}" if np.isfinite(se) else "")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def pending(gt, scores):
    """A note when the scored pool holds sources whose ground truth is not complete yet."""
    pool = sorted({source for row in scores for source in row["sources"]})
    waiting = [source for source in pool if source not in gt.sources]
    if not waiting:
        return []
    return ["", f"**Partial:** the scored pool holds {len(pool)} sources; the ground truth is complete for "
            f"{len(gt.sources)} of them so far, and only those are evaluated (still to come: {', '.join(waiting)})."]


def rescored(scores):
    """A sentence naming the methods rescored after the first scoring (score_methods.py --only), if any."""
    later = {}
    for row in scores:
        for method, result in row["methods"].items():
            if "load" in result:
                later.setdefault(method, []).append(result["load"])
    if not later:
        return []
    names = ", ".join(f"{label(m)} (load {np.mean(v):.1f})" for m, v in sorted(later.items()))
    return [f"Rescored later with `tools/score_methods.py --only`, their seconds measured then: {names}."]


def report(gt, scores, paths):
    s = gt.settings
    per = selection(gt, scores)
    if "esm_logme" not in per:
        raise ESMIndexError("no scores for the evaluated targets and seeds yet")
    rho, recall = agreement(gt, scores)
    load = np.mean([row.get("load", np.nan) for row in scores])
    lines = [
        "# Does the index pick the right sources?",
        "",
        f"{len(gt.sources)} sources x {len(gt.targets)} targets x {len(gt.seeds)} seeds (plus the no-intermediate-task "
        "baseline), all measured on this machine. Written by `tools/evaluate_selection.py`; every number below "
        "comes from the two result files it read.",
        *pending(gt, scores),
        "",
        "## How it was made",
        "",
        "Ground truth: each source's model (the base MiniLM fine-tuned on the source by "
        "`tools/finetune_sources.py`) is fine-tuned again on a small seeded sample of the target's train split "
        f"({s['train_examples']} examples, {s['epochs']:g} epochs, AdamW lr {s['learning_rate']:g}, batch "
        f"{s['batch_size']}, max length {s['max_length']}) and tested on up to {s['test_examples']} test examples; "
        "the baseline fine-tunes the base model itself. A seed fixes the sample, the head's initialisation "
        "and the batch order, shared by all sources. The scoring methods see the same sample (embedded "
        "by the index's encoder, up to 128 tokens). "
        f"The ground-truth file holds {sum(len(r) for r in gt.runs.values())} runs, {gt.hours:.1f} hours of wall time "
        "on this 2-core machine (shared with other work).",
        "",
        "```",
        "python tools/make_tasks.py data/tasks",
        f"python tools/finetune_sources.py data/tasks {paths.models} ...  # settings: indexes/default/MANIFEST.md",
        f"python tools/ground_truth.py data/tasks {paths.models} {paths.ground_truth} --targets {' '.join(gt.targets)}"
        f" --sources {' '.join(gt.sources)} --seeds {' '.join(map(str, gt.seeds))}"
        f" --train-examples {s['train_examples']} --test-examples {s['test_examples']} --epochs {s['epochs']:g}"
        f" --learning-rate {s['learning_rate']:g} --batch-size {s['batch_size']} --max-length {s['max_length']}",
        f"python tools/build_default_index.py data/tasks {paths.models} indexes/default",
        f"python tools/score_methods.py data/tasks {paths.models} indexes/default {paths.scores} --targets "
        f"{' '.join(gt.targets)} --seeds {' '.join(map(str, gt.seeds))} --train-examples {s['train_examples']}"
        f" --candidates {' '.join(m[len('esm_logme_k'):] for m in per if m.startswith('esm_logme_k'))}",
        f"python tools/evaluate_selection.py {paths.ground_truth} {paths.scores} {paths.output} --models {paths.models}",
        "```",
        "",
        "## Does the ground truth carry signal?",
        "",
        "Accuracy in points; ± is the standard error of a pair's mean over seeds (seed-to-seed spread and the "
        "test set's binomial error combined). Spread: standard deviation of the sources' mean accuracies. "
        "F and p: two-way ANOVA of accuracy on source (baseline included) with seeds as blocks; a small p "
        "means the sources differ by more than run-to-run noise.",
        "",
    ]
    rows, significant, gains = [], 0, []
    for target in gt.targets:
        true = gt.true(target, gt.sources) * 100
        ses = np.array([gt.standard_error(target, src) for src in gt.sources]) * 100
        base = gt.true(target, [None])[0] * 100
        best, worst = int(np.argmax(true)), int(np.argmin(true))
        statistic, p = source_effect(gt, target)
        significant += p < 0.05
        gains.append(true[best] - base)
        above = int((true - base > 2 * np.hypot(ses, gt.standard_error(target, None) * 100)).sum())
        rows.append([
            target, gt.n_test[target], f"{base:.1f} ± {gt.standard_error(target, None) * 100:.1f}",
            f"{true.mean():.1f}", f"{true[best]:.1f} ± {ses[best]:.1f} ({gt.sources[best]})",
            f"{true[worst]:.1f} ± {ses[worst]:.1f} ({gt.sources[worst]})", f"{true.std(ddof=1):.1f}",
            f"{ses.mean():.1f}", f"{statistic:.1f}", f"{p:.1g}", f"{above}/{len(true)}",
        ])
    lines += table(["target", "test n", "baseline", "mean of sources", "best source", "worst source", "spread",
                    "mean SE", "F", "p", "sources > baseline + 2 SE"], rows)
    lines += ["", f"Sources differ beyond run-to-run noise (p < 0.05) on {significant} of {len(gt.targets)} targets. "
              f"The best source beats the baseline by {np.mean(gains):.1f} points on average (the best of many "
              "noisy results is biased upwards by that noise)."]

    lines += ["", "## Selection quality", "",
              "Mean over targets (of the mean over seeds); regret in percent of the best accuracy available "
              "(the best source, or the baseline if no source beats it), ± its standard error across targets. "
              "Seconds: wall time to score the whole pool for one target on this 2-core machine, embedding the "
              f"target included, at a mean 1-minute load average of {fmt(load, 1)} while scoring.", *rescored(scores), ""]
    order = ["oracle", "esm_logme", *sorted((m for m in per if m.startswith("esm_logme_k")),
                                              key=lambda m: -int(m[len("esm_logme_k"):])),
             "logme_finetuned", "textemb", "vocab_overlap", "random", "random_expected"]
    rows = []
    for method in [m for m in order if m in per]:
        metrics = per[method]
        cells = [label(method)]
        cells += [fmt_se(*mean_over_targets(metrics[f"regret@{k}"])) for k in KS]
        cells += [fmt(mean_over_targets(metrics[m])[0], 3) for m in ("ndcg", "ndcg@5", "spearman", "seconds")]
        rows.append(cells)
    lines += table(["method", "regret@1", "regret@3", "regret@5", "NDCG", "NDCG@5", "Spearman vs truth",
                    "seconds / target"], rows)

    lines += ["", "Regret@5 per target (mean over seeds):", ""]
    shown = [m for m in ("esm_logme", "logme_finetuned", "textemb", "vocab_overlap", "random_expected") if m in per]
    scored = [t for t in gt.targets if per["esm_logme"]["regret@5"][t]]
    rows = [[t] + [fmt(np.mean(per[m]["regret@5"][t])) for m in shown] for t in scored]
    lines += table(["target"] + [label(m) for m in shown], rows)

    lines += ["", "## ESM-LogME against LogME on the fine-tuned models", "",
              f"Over {len(rho['top1'])} (target, seed) pairs and the whole scored pool: mean Spearman "
              f"{fmt(np.mean(rho['spearman']) if rho['spearman'] else np.nan, 3)}, mean Kendall "
              f"{fmt(np.mean(rho['kendall']) if rho['kendall'] else np.nan, 3)}; the same top source in "
              f"{np.mean(rho['top1']) * 100:.0f}% of pairs.", "",
              "Prefilter recall@k: share of the full scan's top k among the K candidates.", ""]
    rows = [[label(m)] + [fmt(np.mean(recall[m][k]), 3) for k in KS]
            for m in sorted(recall, key=lambda m: -int(m[len("esm_logme_k"):]))]
    lines += table(["prefilter", *(f"recall@{k}" for k in KS)], rows)

    small = [f"- With {len(gt.sources)} sources, regret@5 is 0 for every method: only regret@1 and @3 compare "
             "them."] if len(gt.sources) <= 5 else []
    lines += ["", "## Goals", ""] + small + goals(per) + ["", "## Ground truth", "",
              f"Mean accuracy (points) over seeds {', '.join(map(str, gt.seeds))} ± standard error, "
              "per source (rows) and target (columns).", ""]
    rows = [[BASELINE if src is None else src] + [
        f"{gt.true(t, [src])[0] * 100:.1f} ± {gt.standard_error(t, src) * 100:.1f}" for t in gt.targets]
        for src in [None, *gt.sources]]
    lines += table(["source"] + gt.targets, rows)
    return "\n".join(lines) + "\n"


def goals(per):
    """The issue's goals, checked against the numbers above."""
    regret = {m: mean_over_targets(per[m]["regret@5"]) for m in per}
    seconds = {m: mean_over_targets(per[m]["seconds"])[0] for m in per if per[m]["seconds"]}
    esm = regret["esm_logme"]
    lines = []
    for method in ("textemb", "vocab_overlap", "random", "random_expected"):
        if method in regret:
            verdict = "lower (better) than" if esm[0] < regret[method][0] else "not lower than"
            lines.append(f"- ESM-LogME regret@5 {fmt_se(*esm)} is {verdict} that of {label(method)}: "
                         f"{fmt_se(*regret[method])}.")
    if "logme_finetuned" in regret:
        within = "within" if esm[0] - regret["logme_finetuned"][0] <= 1 else "not within"
        lines.append(f"- ESM-LogME regret@5 is {within} 1 point of LogME on fine-tuned models "
                     f"({fmt_se(*regret['logme_finetuned'])}); scoring the pool took {seconds['esm_logme']:.2f} s "
                     f"per target against {seconds['logme_finetuned']:.2f} s "
                     f"({seconds['logme_finetuned'] / max(seconds['esm_logme'], 1e-9):.1f} times as long).")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ground_truth", type=Path, help="written by tools/ground_truth.py")
    parser.add_argument("scores", type=Path, help="written by tools/score_methods.py")
    parser.add_argument("output", type=Path, help="Markdown file to write (EVALUATION.md)")
    parser.add_argument("--models", type=Path, default=Path("data/models"),
                        help="the source models' folder, as named in the commands the report lists")
    paths = parser.parse_args()
    latest = {(r["target"], r["seed"]): r for r in read_lines(paths.scores)}  # a rescored pair replaces the old
    text = report(GroundTruth(read_lines(paths.ground_truth)), list(latest.values()), paths)
    paths.output.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    try:
        main()
    except ESMIndexError as e:
        sys.exit(f"error: {e}")
