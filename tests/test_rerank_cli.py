"""`rankshrink rerank` and `rankshrink profile` on a tiny model and tiny TREC files: the run and stats they write,
budgets after a profile, bad input as one-line errors, and Ctrl-C leaving nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rankshrink
from rankshrink.cli import main
from rankshrink.data import read_run, trec_order
from rankshrink.model import save_model
from rankshrink.rerank import Reranker
from test_budget import tiny_dev
from test_model_fixtures import spread_scores, tiny_hf_cross_encoder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Files:
    def __init__(self, root: Path, queries: int = 4, docs: int = 30):
        self.root = root
        hf = root / "hf"
        tiny_hf_cross_encoder(hf)
        self.model = root / "model"
        save_model(spread_scores(rankshrink.load_model(hf)), self.model)
        run, topics, collection, qrels = tiny_dev(queries, docs)
        self.first_stage, self.topics_map, self.passages = run, topics, collection
        self.run = root / "bm25.trec"
        self.run.write_text("".join(f"{qid} Q0 {docid} {rank} {score} bm25\n" for qid, docs_ in run.items()
                                    for rank, (docid, score) in enumerate(trec_order(docs_), start=1)))
        self.topics = root / "topics.tsv"
        self.topics.write_text("".join(f"{qid}\t{query}\n" for qid, query in topics.items()))
        self.collection = root / "passages.jsonl"
        self.collection.write_text("".join(json.dumps({"id": d, "contents": t}) + "\n" for d, t in collection.items()))
        self.qrels = root / "qrels.txt"
        self.qrels.write_text("".join(f"{qid} 0 {d} {g}\n" for qid, grades in qrels.items() for d, g in grades.items()))

    def rerank_args(self, output: Path, *extra: str) -> list[str]:
        return ["rerank", "--run", str(self.run), "--topics", str(self.topics), "--collection", str(self.collection),
                "--model", str(self.model), "--output", str(output), "--max-length", "48", "--quiet", *extra]


@pytest.fixture
def files(tmp_path) -> Files:
    return Files(tmp_path)


def test_rerank_writes_every_candidate_and_the_stats(files, tmp_path):
    output, stats_path = tmp_path / "out" / "reranked.trec", tmp_path / "stats.json"
    output.parent.mkdir()
    assert main(files.rerank_args(output, "--candidates", "20", "--dtype", "fp32", "--no-exits",
                                  "--stats", str(stats_path))) == 0
    reranked = read_run(output)
    assert {qid: set(docs) for qid, docs in reranked.items()} == \
        {qid: set(docs) for qid, docs in files.first_stage.items()}
    model = rankshrink.load_model(files.model)
    library, _ = Reranker(model, max_length=48, candidates=20, exits=False, dtype="fp32").rerank_run(
        files.first_stage, files.topics_map, files.passages, progress=False)
    for qid, docs in reranked.items():
        assert [d for d, _ in trec_order(docs)] == [d for d, _ in trec_order(library[qid])]
        first_stage = [d for d, _ in trec_order(files.first_stage[qid])]
        assert [d for d, _ in trec_order(docs)][20:] == first_stage[20:]      # the rest, in first-stage order
    stats = json.loads(stats_path.read_text())
    assert set(stats["queries"]) == set(files.first_stage)
    for qid, query_stats in stats["queries"].items():
        assert query_stats["latency_ms"] > 0
        assert query_stats["layers_used"] == [4] * 20 + [0] * 10
        assert query_stats["config"]["candidates"] == 20 and query_stats["config"]["exits"] is False
    assert stats["summary"]["queries"] == 4
    assert sorted(p.name for p in output.parent.iterdir()) == ["reranked.trec"]   # nothing temporary left


def test_keep_reranks_a_cascade(files, tmp_path):
    output, stats_path = tmp_path / "cascade.trec", tmp_path / "stats.json"
    assert main(files.rerank_args(output, "--candidates", "20", "--keep", "5", "--dtype", "fp32", "--no-exits",
                                  "--stats", str(stats_path))) == 0
    model = rankshrink.load_model(files.model)
    library, _ = Reranker(model, max_length=48, candidates=20, keep=5, exits=False, dtype="fp32").rerank_run(
        files.first_stage, files.topics_map, files.passages, progress=False)
    for qid, docs in read_run(output).items():
        assert [d for d, _ in trec_order(docs)] == [d for d, _ in trec_order(library[qid])]
    for query_stats in json.loads(stats_path.read_text())["queries"].values():
        assert query_stats["config"]["keep"] == 5 and query_stats["layers_used"].count(4) == 5


def test_a_budget_of_zero_writes_the_first_stage_order(files, tmp_path):
    output = tmp_path / "zero.trec"
    assert main(files.rerank_args(output, "--budget-ms", "0", "--dtype", "fp32")) == 0
    for qid, docs in read_run(output).items():
        assert [d for d, _ in trec_order(docs)] == [d for d, _ in trec_order(files.first_stage[qid])]


def test_profile_then_rerank_within_budgets(files, tmp_path, capsys):
    assert main(["profile", "--model", str(files.model), "--run", str(files.run), "--topics", str(files.topics),
                 "--collection", str(files.collection), "--qrels", str(files.qrels), "--widths", "0.5", "1",
                 "--depths", "0.5", "1", "--max-lengths", "24", "48", "--candidates", "10", "30",
                 "--exit-risks", "off", "0.1", "--keeps", "10", "--prune-depths", "0.5", "--time-queries", "2",
                 "--dtype", "fp32", "--quiet",
                 "--points", str(tmp_path / "points.json")]) == 0
    printed = capsys.readouterr().out
    assert "| width | depth |" in printed and "frontier configurations" in printed
    manifest = json.loads((files.model / "rankshrink.json").read_text())
    assert manifest["metadata"]["profile"]["frontier"] and manifest["metadata"]["calibration"]["entries"]
    # every (width, depth, length, candidates) without exits, and with them where an exit head ranks; the 30
    # candidates also as a cascade keeping 10
    ranking = [e for e in manifest["metadata"]["calibration"]["entries"]
               if any(m is not None for m in e["margins"].values())]
    assert len(json.loads((tmp_path / "points.json").read_text())["points"]) == (16 + 2 * len(ranking)) * 3 // 2
    assert "ladder (what budgets climb)" in printed and manifest["metadata"]["profile"]["ladder"]
    for budget in ("1", "100000"):
        stats_path = tmp_path / f"stats-{budget}.json"
        assert main(files.rerank_args(tmp_path / f"b{budget}.trec", "--budget-ms", budget, "--dtype", "fp32",
                                      "--stats", str(stats_path))) == 0
        stats = json.loads(stats_path.read_text())
        assert all(q["budget_ms"] == float(budget) for q in stats["queries"].values())
        assert read_run(tmp_path / f"b{budget}.trec").keys() == files.first_stage.keys()


def test_profile_without_qrels_says_what_judged(files, tmp_path, capsys):
    output = tmp_path / "profiled"
    assert main(["profile", "--model", str(files.model), "--run", str(files.run), "--topics", str(files.topics),
                 "--collection", str(files.collection), "--widths", "1", "--depths", "1", "--max-lengths", "24",
                 "--candidates", "10", "30", "--exit-risks", "off", "--keeps", "--time-queries", "1",
                 "--dtype", "fp32", "--quiet", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "dev nDCG@10 1.0000 (against itself)" in printed
    profile = json.loads((output / "rankshrink.json").read_text())["metadata"]["profile"]
    assert profile["judged_by"] == "agreement with the full network" and profile["dev"].endswith("(no qrels)")


def test_profile_of_a_plain_hugging_face_directory_needs_output(files, capsys):
    code = main(["profile", "--model", str(files.root / "hf"), "--run", str(files.run), "--topics",
                 str(files.topics), "--collection", str(files.collection), "--qrels", str(files.qrels)])
    assert code == 2
    assert "give --output DIR" in capsys.readouterr().err


def test_a_run_query_without_topic_is_a_one_line_error(files, tmp_path, capsys):
    files.topics.write_text("q0\tcat\n")
    code = main(files.rerank_args(tmp_path / "x.trec"))
    err = capsys.readouterr().err
    assert code == 2 and "has no topic" in err and len(err.strip().splitlines()) == 1
    assert str(files.run) in err and str(files.topics) in err
    assert not (tmp_path / "x.trec").exists()


def test_a_run_docid_without_text_names_the_run_query_and_collection(files, tmp_path, capsys):
    gone = next(iter(next(iter(files.first_stage.values()))))
    kept = [line for line in files.collection.read_text().splitlines() if json.loads(line)["id"] != gone]
    files.collection.write_text("\n".join(kept) + "\n")
    code = main(files.rerank_args(tmp_path / "x.trec"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"docid {gone!r} not found in collection" in err and str(files.run) in err and str(files.collection) in err
    assert not (tmp_path / "x.trec").exists()


def test_candidates_past_those_reranked_need_no_text(files, tmp_path):
    """A deep run (BM25 top 1000) reranked at its top 20 needs the texts of those 20 only."""
    unreranked = {docid for docs in files.first_stage.values() for docid, _ in trec_order(docs)[20:]}
    kept = [line for line in files.collection.read_text().splitlines() if json.loads(line)["id"] not in unreranked]
    files.collection.write_text("\n".join(kept) + "\n")
    output = tmp_path / "x.trec"
    assert main(files.rerank_args(output, "--candidates", "20")) == 0
    assert {qid: set(docs) for qid, docs in read_run(output).items()} == \
        {qid: set(docs) for qid, docs in files.first_stage.items()}


@pytest.mark.parametrize("command, extra, message", [
    ("rerank", ["--tag", "my run"], "run tag must be one word without spaces, got 'my run'"),
    ("rerank", ["--stats", "."], ".: is a directory; give the path of a file to write"),
    ("bench", ["--queries", "0"], "queries must be a positive integer, got 0"),
    ("bench", ["--peer-threads", "0"], "peer_threads must be a positive integer, got 0"),
    ("profile", ["--queries", "0"], "queries must be a positive integer, got 0"),
    ("profile", ["--top-k", "0"], "top_k must be a positive integer, got 0"),
])
def test_bad_options_are_one_line_errors_before_any_work(files, tmp_path, capsys, monkeypatch, command, extra,
                                                          message):
    def no_work(*args, **kwargs):
        raise AssertionError("reranked before checking its options")

    monkeypatch.setattr(Reranker, "rerank_config", no_work)
    monkeypatch.setattr(Reranker, "rerank_run", no_work)
    monkeypatch.setattr(Reranker, "trace", no_work)
    common = ["--run", str(files.run), "--topics", str(files.topics), "--collection", str(files.collection)]
    if command == "rerank":
        args = files.rerank_args(tmp_path / "x.trec", *extra)
    elif command == "bench":
        args = ["bench", *common, "--model", str(files.model), "--quiet", *extra]
    else:
        args = ["profile", *common, "--model", str(files.model), "--qrels", str(files.qrels), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_stats_mean_layers_counts_the_passages_the_network_saw(files, tmp_path):
    stats = tmp_path / "stats.json"
    assert main(files.rerank_args(tmp_path / "x.trec", "--candidates", "10", "--no-exits", "--stats", str(stats))) == 0
    written = json.loads(stats.read_text())
    layers = rankshrink.load_model(files.model).config.num_layers
    assert written["summary"]["mean_layers"] == layers
    assert all(query["mean_layers"] == layers and 0 in query["layers_used"] for query in written["queries"].values())


def test_ctrl_c_leaves_no_partial_output(tmp_path):
    files = Files(tmp_path, queries=300, docs=30)
    output = tmp_path / "interrupted.trec"
    args = files.rerank_args(output, "--dtype", "fp32", "--stats", str(tmp_path / "stats.json"))
    args.remove("--quiet")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-m", "rankshrink", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while "reranking" not in seen and time.monotonic() < deadline and process.poll() is None:
            seen += process.stderr.read(1)
        assert "reranking" in seen, seen
        time.sleep(0.5)
        assert process.poll() is None, "finished before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "interrupted" in err
    assert not output.exists() and not (tmp_path / "stats.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
