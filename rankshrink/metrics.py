"""Evaluate runs the way trec_eval does, through ranx, and compare them with significance tests.

Conventions (those of trec_eval and of Pyserini's reproduction pages):

- nDCG@k: linear gain over all grades (trec_eval's ``ndcg_cut``).
- Binary metrics (MRR@k, MAP, Recall@k, P@k) count a document relevant when its grade is at least
  ``rel_level`` (1 by default, trec_eval's ``-l``).
- Ties in score are broken by docid, descending, exactly as trec_eval sorts.
- Coverage: run queries without judgments are ignored; judged queries (those in the qrels) that the
  run lacks score 0 on every metric (trec_eval ``-c``), so a run cannot gain by dropping hard queries.

>>> from rankshrink.data import read_qrels, read_run
>>> result = evaluate(read_qrels("qrels.txt"), {"bm25": read_run("bm25.trec")}, ["ndcg@10", "map"])
>>> result.scores["bm25"]["ndcg@10"]
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .data import Qrels, Run, trec_order
from .errors import InputError, check_integer

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "map", "recall@100")
StatTest = Literal["student", "fisher", "tukey"]

_METRIC_PATTERN = re.compile(r"^(ndcg|mrr|map|recall|p|precision)(?:@(\d+))?$")
_NEEDS_CUTOFF = {"ndcg", "recall", "p", "precision"}


def ranx_metric_name(metric: str, rel_level: int = 1) -> str:
    """Our metric name (``ndcg@10``, ``mrr@10``, ``map``, ``map@100``, ``recall@100``, ``p@10``) in ranx's
    spelling, with the relevance level for binary metrics."""
    match = _METRIC_PATTERN.match(metric.lower())
    if not match:
        raise InputError(f"unknown metric {metric!r}; expected one of ndcg@k, mrr@k, map, map@k, recall@k, p@k")
    family, cutoff = match.groups()
    if family in _NEEDS_CUTOFF and cutoff is None:
        raise InputError(f"metric {metric!r} needs a cutoff, e.g. {family}@10")
    family = "precision" if family == "p" else family
    name = f"{family}@{cutoff}" if cutoff else family
    if family != "ndcg" and rel_level != 1:
        name += f"-l{rel_level}"
    return name


@dataclass
class Coverage:
    """How the run's queries line up with the judged ones."""

    unjudged_run_queries: int  # in the run, not in the qrels: ignored
    missing_judged_queries: int  # in the qrels, not in the run: score 0
    judged_queries: int  # what every average is over

    def message(self, run_name: str) -> str | None:
        if not (self.unjudged_run_queries or self.missing_judged_queries):
            return None
        return (f"{run_name}: {self.unjudged_run_queries} run queries have no judgments (ignored); "
                f"{self.missing_judged_queries} of {self.judged_queries} judged queries are missing from the "
                "run (scored 0)")


@dataclass
class Evaluation:
    metrics: list[str]
    scores: dict[str, dict[str, float]]  # run -> metric -> mean
    per_query: dict[str, dict[str, dict[str, float]]]  # run -> metric -> qid -> value
    coverage: dict[str, Coverage]
    baseline: str | None = None
    p_values: dict[str, dict[str, float]] = field(default_factory=dict)  # run -> metric -> p vs baseline
    stat_test: str | None = None
    alpha: float = 0.05

    def significant(self, run: str, metric: str) -> bool:
        return run in self.p_values and self.p_values[run][metric] < self.alpha

    def table(self, digits: int = 4) -> str:
        """A plain-text table; with a baseline, significant differences carry a mark (▲ better, ▼ worse)."""
        header = ["run"] + self.metrics
        rows = []
        for run in self.scores:
            cells = [run + (" (baseline)" if run == self.baseline else "")]
            for metric in self.metrics:
                value = self.scores[run][metric]
                mark = ""
                if self.significant(run, metric):
                    mark = "▲" if value > self.scores[self.baseline][metric] else "▼"
                cells.append(f"{value:.{digits}f}{mark}")
            rows.append(cells)
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in [header] + rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        if self.baseline:
            lines.append(f"▲/▼: significantly better/worse than {self.baseline} "
                         f"({_STAT_TEST_NAMES[self.stat_test]}, p < {self.alpha})")
        return "\n".join(lines)


_STAT_TEST_NAMES = {"student": "Student's t-test, paired", "fisher": "Fisher's randomization test, paired",
                    "tukey": "Tukey's HSD test"}
_NO_DOCUMENT = "\x00no document"


def trec_eval_ordered(run: Mapping[str, Mapping[str, float]]) -> Run:
    """The run with scores replaced by strictly decreasing values in trec_eval's order, so that any
    evaluator (ranx included) sees exactly trec_eval's ranking, ties broken the same way."""
    ordered: Run = {}
    for qid, doc_scores in run.items():
        ranked = trec_order(doc_scores)
        ordered[qid] = {docid: float(len(ranked) - position) for position, (docid, _) in enumerate(ranked)}
    return ordered


def evaluate(qrels: Qrels, runs: Mapping[str, Run], metrics: Sequence[str] = DEFAULT_METRICS, *,
             rel_level: int = 1, baseline: str | None = None, stat_test: StatTest = "student",
             alpha: float = 0.05) -> Evaluation:
    """Evaluate each run; with ``baseline`` (a key of ``runs``), add a significance test of every other run
    against it, per metric (``stat_test``: Student's t or Fisher's randomization, paired; or Tukey's HSD)."""
    if not runs:
        raise InputError("no runs to evaluate")
    if baseline is not None and baseline not in runs:
        raise InputError(f"baseline {baseline!r} is not among the runs {list(runs)}")
    check_integer("rel_level", rel_level, optional=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba's type-safety chatter from inside ranx
        return _evaluate(qrels, runs, metrics, rel_level, baseline, stat_test, alpha)


def _evaluate(qrels, runs, metrics, rel_level, baseline, stat_test, alpha) -> Evaluation:
    import ranx

    metrics = list(dict.fromkeys(m.lower() for m in metrics))
    ranx_names = {metric: ranx_metric_name(metric, rel_level) for metric in metrics}
    qrels = {qid: grades for qid, grades in qrels.items() if grades}   # as trec_eval: a query without judgments
    if not qrels:
        raise InputError("the qrels judge no document of any query")
    ranx_qrels = ranx.Qrels({qid: dict(grades) for qid, grades in qrels.items()})

    ranx_runs, coverage = {}, {}
    for name, run in runs.items():
        judged = set(qrels)
        coverage[name] = Coverage(unjudged_run_queries=len(set(run) - judged),
                                  missing_judged_queries=len(judged - set(run)), judged_queries=len(judged))
        ordered = trec_eval_ordered(run)
        if not any(ordered.values()):
            # ranx cannot hold a run without a document; one unjudged document scores what no document does: 0
            ordered = {next(iter(qrels)): {_NO_DOCUMENT: 1.0}}
        ranx_run = ranx.Run(ordered, name=name)
        ranx_run.make_comparable(ranx_qrels)  # drops unjudged queries, adds judged ones empty (trec_eval -c)
        ranx.evaluate(ranx_qrels, ranx_run, list(ranx_names.values()))
        ranx_runs[name] = ranx_run

    scores = {name: {metric: float(run.mean_scores[ranx_names[metric]]) for metric in metrics}
              for name, run in ranx_runs.items()}
    per_query = {name: {metric: {qid: float(value) for qid, value in run.scores[ranx_names[metric]].items()}
                        for metric in metrics}
                 for name, run in ranx_runs.items()}
    result = Evaluation(metrics, scores, per_query, coverage, baseline=baseline, stat_test=stat_test, alpha=alpha)
    if baseline is not None and len(runs) > 1:
        result.p_values = _p_values_against(ranx_qrels, ranx_runs, baseline, ranx_names, stat_test)
    return result


def _p_values_against(ranx_qrels, ranx_runs, baseline, ranx_names, stat_test) -> dict[str, dict[str, float]]:
    import ranx

    ordered = [ranx_runs[baseline]] + [run for name, run in ranx_runs.items() if name != baseline]
    report = ranx.compare(ranx_qrels, ordered, list(ranx_names.values()), stat_test=stat_test).to_dict()
    comparisons = report[baseline]["comparisons"]
    return {name: {metric: float(comparisons[name][ranx_name]) for metric, ranx_name in ranx_names.items()}
            for name in ranx_runs if name != baseline}
