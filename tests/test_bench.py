"""`rankshrink bench`: the peer (sentence-transformers CrossEncoder) loads a rankshrink model directory with the
same one-label head and scores exactly as the model does; the bench's summary and JSON keys."""
from __future__ import annotations

import json

import pytest
import torch

import rankshrink
from rankshrink.cli import main
from rankshrink.errors import InputError
from rankshrink.model import save_model
from rankshrink.rerank import RerankConfig
from rankshrink.rerank.bench import Arm, bench, load_peer
from test_model_fixtures import PASSAGES, QUERIES, spread_scores
from test_rerank_cli import Files

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def peer_scores(peer, query: str, passages: list[str]) -> torch.Tensor:
    return torch.tensor(peer.predict([(query, p) for p in passages], activation_fn=torch.nn.Identity(),
                                     show_progress_bar=False))


def test_the_peer_loads_a_model_directory_with_one_label_and_scores_as_the_model(tmp_path):
    files = Files(tmp_path, queries=1)
    peer = load_peer(files.model, max_length=48)
    assert peer.model.config.num_labels == 1
    model = rankshrink.load_model(files.model)
    for query in QUERIES:
        expected = model.score(query, PASSAGES, max_length=48)
        assert torch.allclose(peer_scores(peer, query, PASSAGES), expected, atol=1e-5, rtol=0)


def test_the_peer_runs_in_fp32_when_the_checkpoint_was_saved_in_bf16(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    files = Files(tmp_path, queries=1)
    saved = tmp_path / "bf16"
    AutoModelForSequenceClassification.from_pretrained(files.root / "hf").to(torch.bfloat16).save_pretrained(saved)
    AutoTokenizer.from_pretrained(files.root / "hf").save_pretrained(saved)
    peer = load_peer(saved, max_length=48)
    assert {parameter.dtype for parameter in peer.model.parameters()} == {torch.float32}


def test_the_peer_scores_minilm_as_the_model_does(shared, tmp_path):
    from rankshrink.data import open_collection, read_run, read_topics, trec_order

    model = spread_scores(rankshrink.load_model(shared / "models" / "all-MiniLM-L6-v2"))
    save_model(model, tmp_path / "minilm")
    dl19 = shared / "trec-dl" / "dl19"
    run = read_run(dl19 / "runs" / "bm25.top100.trec")
    qid = sorted(run)[1]
    docids = [docid for docid, _ in trec_order(run[qid])][:24]
    texts = open_collection(dl19 / "passages.jsonl").texts(docids)
    query = read_topics(dl19 / "topics.tsv")[qid]
    peer = load_peer(tmp_path / "minilm", max_length=256)
    expected = rankshrink.load_model(tmp_path / "minilm").score(query, texts, max_length=256)
    assert torch.allclose(peer_scores(peer, query, texts), expected, atol=1e-5, rtol=0)


def test_a_checkpoint_without_a_classifier_is_refused(shared):
    with pytest.raises(InputError, match="no classifier head"):
        load_peer(shared / "models" / "all-MiniLM-L6-v2", max_length=128)


def test_bench_times_both_sides_and_reports_both_ndcgs(tmp_path):
    from rankshrink.data import read_qrels, trec_order

    files = Files(tmp_path, queries=3)

    arms = {"full": Arm(config=RerankConfig(1.0, 1.0, 48, 30, None)), "zero": Arm(budget_ms=0)}
    result = bench(files.model, files.first_stage, files.topics_map, files.passages, read_qrels(files.qrels),
                   arms=arms, repeats=2, candidates=30, max_length=48, dtype="fp32", threads=1, progress=False)
    summary = result.summary()
    assert set(summary) == {"full", "zero"}
    assert len(result.latencies["peer"]) == len(result.latencies["full"]) == 6
    full, zero = summary["full"], summary["zero"]
    assert full["peer_ndcg@10"] == pytest.approx(full["rankshrink_ndcg@10"], abs=1e-9)   # same scores, fp32
    assert zero["deadline_hits"] == 6 and full["deadline_hits"] == 0
    assert full["speedup"] == pytest.approx(full["peer_ms_median"] / full["rankshrink_ms_median"])
    for qid, docs in result.runs["zero"][1].items():        # a budget of 0: the first-stage order
        assert [d for d, _ in trec_order(docs)] == [d for d, _ in trec_order(files.first_stage[qid])]


def test_bench_refuses_an_arm_with_more_candidates_than_it_gives(tmp_path):
    """A fixed arm of K candidates on a bench of fewer would rerank what it is given under K's name."""
    files = Files(tmp_path, queries=2)
    arms = {"full": Arm(config=RerankConfig(1.0, 1.0, 48, 30, None))}
    with pytest.raises(InputError, match="arm 'full' reranks 30 candidates, more than the 20"):
        bench(files.model, files.first_stage, files.topics_map, files.passages, arms=arms, repeats=1,
              candidates=20, max_length=48, dtype="fp32", threads=1, progress=False)


def test_each_arm_has_an_engine_of_its_own(tmp_path, monkeypatch):
    """A budget arm's load estimate follows its own calls only: a fixed arm's (a configuration the profile
    never timed, mispredicted) would move the budget arm's choices, as it never could in a serving process."""
    from rankshrink.rerank.engine import Reranker

    files = Files(tmp_path, queries=2)
    calls: dict[int, set] = {}
    real = Reranker._run

    def recording(self, started, query, docids, texts, config, top_k, budget_ms, predicted, observe=True):
        calls.setdefault(id(self), set()).add("fixed" if budget_ms is None else "budget")
        return real(self, started, query, docids, texts, config, top_k, budget_ms, predicted, observe)

    monkeypatch.setattr(Reranker, "_run", recording)
    arms = {"full": Arm(config=RerankConfig(1.0, 1.0, 48, 30, None)), "budget": Arm(budget_ms=50),
            "half": Arm(config=RerankConfig(0.5, 1.0, 48, 30, None))}
    bench(files.model, files.first_stage, files.topics_map, files.passages, arms=arms, repeats=1, candidates=30,
          max_length=48, dtype="fp32", threads=1, progress=False)
    assert sorted(sorted(kinds) for kinds in calls.values()) == [["budget"], ["fixed"], ["fixed"]]


def test_bench_json_has_the_contract_keys(tmp_path, capsys):
    files = Files(tmp_path, queries=2)
    assert main(["bench", "--run", str(files.run), "--topics", str(files.topics), "--collection",
                 str(files.collection), "--model", str(files.model), "--qrels", str(files.qrels), "--repeats", "1",
                 "--max-length", "48", "--no-exits", "--json", "--quiet", "--threads", "1"]) == 0
    values = json.loads(capsys.readouterr().out)
    for key in ("peer_ms_median", "rankshrink_ms_median", "rankshrink_ms_p95", "speedup", "peer_ndcg@10",
                "rankshrink_ndcg@10"):
        assert key in values and values[key] is not None, key
    assert values["queries"] == 2 and values["repeats"] == 1


def test_bench_reranks_fewer_candidates_than_the_peer_when_asked(tmp_path, capsys):
    """--peer-candidates 30 --candidates 10: the peer reranks each query's top 30, rankshrink its first 10;
    --peer-max-length 48 --max-length 32: the peer reads 48 tokens a pair, rankshrink 32."""
    files = Files(tmp_path, queries=2)
    common = ["bench", "--run", str(files.run), "--topics", str(files.topics), "--collection", str(files.collection),
              "--model", str(files.model), "--repeats", "1", "--max-length", "32", "--no-exits", "--quiet",
              "--threads", "1", "--candidates", "10"]
    assert main([*common, "--peer-candidates", "30", "--peer-max-length", "48", "--json"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values["candidates"] == 30 and values["max_length"] == 48
    assert [label.split()[2:4] for label in values["configs"]] == [["L32", "K10"]]
    assert main([*common, "--peer-candidates", "5"]) == 2
    assert "--peer-candidates (5) must be at least --candidates (10)" in capsys.readouterr().err
