"""Fusion through ranx: a run fused with itself keeps its order, RRF and the normalised sum compute what
they say, weights steer, and the hybrid searcher is BM25 and dense fused."""
from __future__ import annotations

import pytest

from rankshrink.cli import main
from rankshrink.data import read_run, read_topics, trec_order
from rankshrink.errors import InputError
from rankshrink.firststage import BM25, DenseSearcher, HybridSearcher, fuse, open_first_stage
from test_dense_fixtures import small_dense_index, small_pool, tiny_encoder  # noqa: F401

RUN_WITH_TIES = {
    "q1": {"d1": 3.0, "d2": 2.0, "d3": 2.0, "d4": 1.0, "d5": -0.5},
    "q2": {"x": 1.0},
    "q3": {"a": 0.25, "b": 0.25, "c": 0.25},
}


def order(run: dict) -> dict[str, list[str]]:
    return {qid: [docid for docid, _ in trec_order(docs)] for qid, docs in run.items()}


@pytest.mark.parametrize("method", ["rrf", "sum"])
def test_run_fused_with_itself_keeps_its_order(method):
    fused = fuse([RUN_WITH_TIES, RUN_WITH_TIES], method=method)
    assert {qid: list(docs) for qid, docs in fused.items()} == order(RUN_WITH_TIES)
    assert order(fused) == order(RUN_WITH_TIES)  # the written file (trec_eval order) too


@pytest.mark.shared
@pytest.mark.parametrize("method", ["rrf", "sum"])
def test_real_bm25_run_fused_with_itself_keeps_its_order(dl19_index, dl19, method):
    run = BM25(dl19_index).batch_search(read_topics(dl19 / "topics.tsv"), k=1000)
    assert order(fuse([run, run], method=method, weights=(0.3, 0.7))) == order(run)


def test_rrf_scores_are_weighted_reciprocal_ranks():
    a = {"q": {"x": 9.0, "y": 5.0, "z": 1.0}}
    b = {"q": {"z": 0.9, "w": 0.8}}
    fused = fuse([a, b], method="rrf", weights=(2.0, 1.0), rrf_k=10)["q"]
    assert fused == pytest.approx({"z": 2 / 13 + 1 / 11, "x": 2 / 11, "y": 2 / 12, "w": 1 / 12})
    assert list(fused) == ["z", "x", "y", "w"]


def test_sum_is_min_max_normalised_then_weighted():
    a = {"q": {"x": 10.0, "y": 6.0, "z": 2.0}}
    b = {"q": {"z": 0.5, "w": 0.1, "x": 0.3}}
    fused = fuse([a, b], method="sum", weights=(1.0, 3.0))["q"]
    assert fused == pytest.approx({"x": 1.0 + 3 * 0.5, "y": 0.5, "z": 0.0 + 3 * 1.0, "w": 0.0})
    assert list(fused) == ["z", "x", "y", "w"]


def test_sum_counts_a_lone_or_all_tied_list_as_its_runs_best():
    fused = fuse([{"q": {"x": 5.0}}, {"q": {"x": 1.0, "y": 1.0}}], "sum")
    assert fused == {"q": {"x": 2.0, "y": 1.0}}


@pytest.mark.parametrize("method", ["rrf", "sum"])
def test_a_zero_weight_leaves_the_other_runs_order_first(method):
    a = {"q": {"a1": 3.0, "a2": 2.0, "a3": 1.0}}
    b = {"q": {"b1": 30.0, "a3": 20.0, "b2": 10.0}}
    # min-max maps a run's last document to 0, where absent documents are: "sum" orders all but the last
    kept = 3 if method == "rrf" else 2
    assert list(fuse([a, b], method=method, weights=(1.0, 0.0))["q"])[:kept] == ["a1", "a2", "a3"][:kept]
    assert list(fuse([a, b], method=method, weights=(0.0, 1.0))["q"])[:kept] == ["b1", "a3", "b2"][:kept]


def test_queries_missing_or_empty_in_one_run_and_cut_to_k():
    a = {"q1": {"d1": 1.0, "d2": 0.5}, "q2": {}, "q3": {}}
    b = {"q1": {"d3": 2.0}, "q2": {"e": 1.0}, "q4": {"f": 3.0, "g": 2.0}}
    fused = fuse([a, b], k=2)
    assert list(fused) == ["q1", "q2", "q3", "q4"]
    assert fused["q2"] == pytest.approx({"e": 1 / 61}) and fused["q3"] == {} and list(fused["q4"]) == ["f", "g"]
    assert len(fused["q1"]) == 2 and "" not in fused["q1"]


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "max"}, "fusion method must be rrf or sum"),
    ({"weights": (1.0,)}, "1 weights for 2 runs"),
    ({"weights": (0.0, 0.0)}, "not all 0"),
    ({"weights": (1.0, -1.0)}, "must be >= 0"),
    ({"rrf_k": 0}, "rrf_k must be a number > 0, got 0"),
    ({"rrf_k": "60"}, "rrf_k must be a number > 0, got '60'"),
    ({"k": 0}, "k must be a positive integer"),
])
def test_bad_fusion_options(kwargs, message):
    with pytest.raises(InputError, match=message):
        fuse([RUN_WITH_TIES, RUN_WITH_TIES], **kwargs)
    with pytest.raises(InputError, match="at least two runs"):
        fuse([RUN_WITH_TIES])


@pytest.mark.parametrize("depth", [0, 2.5, None])
def test_a_hybrid_searcher_names_a_bad_depth(depth):
    with pytest.raises(InputError, match="depth must be a positive integer"):
        HybridSearcher(None, None, depth=depth)


@pytest.mark.shared
def test_hybrid_searcher_is_bm25_and_dense_fused(dl19_index, small_dense_index, dl19):
    topics = dict(list(read_topics(dl19 / "topics.tsv").items())[:8])
    bm25, dense = BM25(dl19_index), DenseSearcher(small_dense_index, device="cpu")
    hybrid = HybridSearcher(bm25, dense, method="sum", weights=(0.4, 0.6), depth=200)
    expected = fuse([bm25.batch_search(topics, k=200), dense.batch_search(topics, k=200)], method="sum",
                    weights=(0.4, 0.6), k=50)
    assert hybrid.batch_search(topics, k=50) == expected
    qid = next(iter(topics))
    alone = hybrid.search(topics[qid], k=50)  # the query encoded alone: float noise against the batch
    assert list(alone) == list(expected[qid]) and alone == pytest.approx(expected[qid], abs=1e-5)
    docid = next(iter(expected[qid]))
    assert hybrid.doc(docid) == bm25.doc(docid)
    with pytest.raises(InputError, match="weights must be >= 0"):
        HybridSearcher(bm25, dense, weights=(-1, 1))
    assert isinstance(open_first_stage("hybrid", index=str(dl19_index), dense_index=str(small_dense_index),
                                       method="rrf"), HybridSearcher)
    with pytest.raises(InputError, match="needs dense_index="):
        open_first_stage("hybrid", index=str(dl19_index))


@pytest.mark.shared
def test_cli_hybrid_writes_the_fused_run(dl19_index, small_dense_index, dl19, tmp_path):
    output = tmp_path / "hybrid.trec"
    assert main(["search", "--hybrid", "--index", str(dl19_index), "--dense-index", str(small_dense_index),
                 "--topics", str(dl19 / "topics.tsv"), "--k", "100", "--fusion", "rrf", "--weights", "1", "2",
                 "--output", str(output), "--device", "cpu"]) == 0
    topics = read_topics(dl19 / "topics.tsv")
    expected = fuse([BM25(dl19_index).batch_search(topics, k=1000),
                     DenseSearcher(small_dense_index, device="cpu").batch_search(topics, k=1000)],
                    method="rrf", weights=(1.0, 2.0), k=100)
    written = read_run(output)
    assert order(written) == order(expected)   # RRF scores six decimals would tie are written whole
    assert output.read_text().split("\n", 1)[0].endswith(" hybrid-rrf")
