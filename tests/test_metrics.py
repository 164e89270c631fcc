from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rankshrink.cli import main
from rankshrink.data import read_qrels, read_run
from rankshrink.errors import InputError
from rankshrink.metrics import evaluate, ranx_metric_name

RUN_NAMES = ["bm25", "bm25-rm3", "splade-pp-ed", "tas-b", "openai-ada2"]


def test_metric_names():
    assert ranx_metric_name("nDCG@10", rel_level=2) == "ndcg@10"
    assert ranx_metric_name("mrr@10", rel_level=2) == "mrr@10-l2"
    assert ranx_metric_name("p@5") == "precision@5"
    with pytest.raises(ValueError, match="needs a cutoff"):
        ranx_metric_name("ndcg")
    with pytest.raises(ValueError, match="unknown metric"):
        ranx_metric_name("bleu")


def test_small_run_by_hand():
    qrels = {"q": {"a": 3, "b": 1, "c": 0}}
    run = {"q": {"c": 3.0, "a": 2.0, "x": 1.0}}
    result = evaluate(qrels, {"r": run}, ["ndcg@3", "mrr@10", "recall@2", "p@1"])
    ideal = 3 / np.log2(2) + 1 / np.log2(3)
    assert result.scores["r"]["ndcg@3"] == pytest.approx((3 / np.log2(3)) / ideal)
    assert result.scores["r"]["mrr@10"] == pytest.approx(0.5)
    assert result.scores["r"]["recall@2"] == pytest.approx(0.5)
    assert result.scores["r"]["p@1"] == 0.0
    strict = evaluate(qrels, {"r": run}, ["mrr@10"], rel_level=2)
    assert strict.scores["r"]["mrr@10"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="rel_level must be a positive integer, got 0"):
        evaluate(qrels, {"r": run}, ["mrr@10"], rel_level=0)


def test_ties_are_broken_by_docid_descending():
    qrels = {"q": {"a": 1}}
    tied = {"q": {"a": 1.0, "b": 1.0}}  # trec_eval ranks b before a
    assert evaluate(qrels, {"r": tied}, ["mrr@10"]).scores["r"]["mrr@10"] == 0.5


def test_coverage_counts_missing_judged_queries_as_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0}, "unjudged": {"z": 1.0}}
    result = evaluate(qrels, {"r": run}, ["mrr@10"])
    assert result.scores["r"]["mrr@10"] == 0.5
    coverage = result.coverage["r"]
    assert (coverage.unjudged_run_queries, coverage.missing_judged_queries) == (1, 1)
    assert "1 run queries have no judgments" in coverage.message("r")


@pytest.mark.parametrize("run", [{"q1": {}}, {}, {"elsewhere": {"z": 1.0}}])
def test_a_run_without_a_document_for_any_judged_query_scores_zero(run):
    qrels = {"q1": {"a": 1}, "q2": {"b": 2}}
    result = evaluate(qrels, {"r": run, "b": {"q1": {"a": 1.0}}}, ["ndcg@10", "map", "recall@100", "mrr@10"],
                      baseline="b")
    assert result.scores["r"] == {"ndcg@10": 0.0, "map": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    assert result.per_query["r"]["ndcg@10"] == {"q1": 0.0, "q2": 0.0}


def test_a_query_without_judgments_is_not_evaluated_as_trec_eval_does_not():
    result = evaluate({"q1": {}, "q2": {"a": 1}}, {"r": {"q1": {"b": 1.0}, "q2": {"a": 1.0}}}, ["mrr@10"])
    assert result.scores["r"]["mrr@10"] == 1.0 and result.coverage["r"].judged_queries == 1
    with pytest.raises(InputError, match="the qrels judge no document"):
        evaluate({"q1": {}}, {"r": {"q1": {"b": 1.0}}})


def test_equals_pytrec_eval_on_all_dl19_runs(dl19):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels = read_qrels(dl19 / "qrels.txt")
    runs = {name: read_run(dl19 / "runs" / f"{name}.top100.trec") for name in RUN_NAMES}
    ours = evaluate(qrels, runs, ["ndcg@10", "map", "recall@100"])
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map", "recall.100"})
    for name, run in runs.items():
        theirs = evaluator.evaluate(run)
        for ours_name, theirs_name in [("ndcg@10", "ndcg_cut_10"), ("map", "map"), ("recall@100", "recall_100")]:
            expected = np.mean([per_query[theirs_name] for per_query in theirs.values()])
            assert ours.scores[name][ours_name] == pytest.approx(expected, abs=1e-9), (name, ours_name)
    assert ours.scores["bm25"]["ndcg@10"] == pytest.approx(0.5058, abs=1e-4)


def test_cli_json_and_baseline_marks(dl19, capsys):
    runs = [str(dl19 / "runs" / f"{name}.top100.trec") for name in RUN_NAMES]
    assert main(["eval", "--qrels", str(dl19 / "qrels.txt"), *runs, "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["bm25.top100"]["ndcg@10"] == pytest.approx(0.5058, abs=1e-4)
    assert set(scores["bm25.top100"]) == {"ndcg@10", "mrr@10", "map", "recall@100"}

    assert main(["eval", "--qrels", str(dl19 / "qrels.txt"), *runs, "--baseline", runs[0]]) == 0
    table = capsys.readouterr().out
    splade_row = next(line for line in table.splitlines() if line.startswith("splade-pp-ed"))
    assert "0.7308▲" in splade_row
    baseline_row = next(line for line in table.splitlines() if line.startswith("bm25.top100"))
    assert "(baseline)" in baseline_row and "▲" not in baseline_row
    assert "significantly better/worse than bm25.top100" in table


def test_cli_per_query_json(tmp_path, capsys):
    qrels = tmp_path / "q.txt"
    qrels.write_text("q1 0 a 1\nq2 0 b 2\n")
    run = tmp_path / "mine.trec"
    run.write_text("q1 Q0 a 1 2.0 t\nq2 Q0 c 1 1.0 t\n")
    assert main(["eval", "--qrels", str(qrels), f"best={run}", "--metrics", "mrr@10", "--json", "--per-query"]) == 0
    assert json.loads(capsys.readouterr().out) == {"best": {"mrr@10": {"q1": 1.0, "q2": 0.0}}}


@pytest.mark.parametrize("run_text, qrels_text, expected", [
    ("q1 Q0 a 1 1.0\n", "q1 0 a 1\n", "bad.trec:1: expected 6 columns"),
    ("q1 Q0 a 1 x t\n", "q1 0 a 1\n", "bad.trec:1: score 'x' is not a number"),
    ("q1 Q0 a 1 1 t\nq1 Q0 a 2 0 t\n", "q1 0 a 1\n", "duplicate (qid, docid) = (q1, a)"),
    ("", "q1 0 a 1\n", "bad.trec: empty run file"),
    ("q1 Q0 a 1 1 t\n", "q1 0 a high\n", "qrels.txt:1: grade 'high' is not an integer"),
    ("q1 Q0 a 1 1 t\n", "q1 a 1\n", "qrels.txt:1: expected 4 columns"),
    ("q1 Q0 a 1 1 t\n", "", "qrels.txt: empty qrels file"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, run_text, qrels_text, expected):
    (tmp_path / "bad.trec").write_text(run_text)
    (tmp_path / "qrels.txt").write_text(qrels_text)
    result = subprocess.run([sys.executable, "-m", "rankshrink", "eval", "--qrels", str(tmp_path / "qrels.txt"),
                             str(tmp_path / "bad.trec")], capture_output=True, text=True)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
