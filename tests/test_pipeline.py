"""The Python search API: Pipeline.search / batch_search / rerank_run / rerank on a tiny index and a tiny random
cross-encoder, checked against the parts it strings together (BM25 alone, model.score alone)."""
from __future__ import annotations

import pytest
import torch

from rankshrink.data import read_topics
from rankshrink.errors import InputError
from rankshrink.firststage import BM25
from rankshrink.pipeline import Hit, Pipeline
from test_pipeline_fixtures import TOPICS, tiny_world  # noqa: F401 - a fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def pipeline(tiny_world) -> Pipeline:
    return Pipeline(index=tiny_world.index, model=tiny_world.model, collection=tiny_world.collection,
                    candidates=20, max_length=64, dtype="fp32", exits=False)


def model_scores(pipeline: Pipeline, query: str, texts: list[str]) -> list[float]:
    model = pipeline.reranker.model
    return model.score(query, texts, max_length=64).tolist()


def test_search_reranks_the_bm25_candidates_with_the_model_scores(pipeline, tiny_world):
    query = TOPICS["q0"]
    hits = pipeline.search(query, k=5)
    candidates = BM25(tiny_world.index).search(query, k=20)
    assert len(candidates) > 5
    texts = [tiny_world.passages[docid] for docid in candidates]
    expected = sorted(zip(model_scores(pipeline, query, texts), candidates), reverse=True)
    assert [hit.rank for hit in hits] == [1, 2, 3, 4, 5]
    assert [hit.docid for hit in hits] == [docid for _, docid in expected[:5]]
    assert [hit.score for hit in hits] == pytest.approx([score for score, _ in expected[:5]], abs=1e-5)
    assert all(hit.text == tiny_world.passages[hit.docid] for hit in hits)
    assert isinstance(hits[0], Hit) and hits[0].score >= hits[-1].score


def test_search_without_a_model_returns_the_first_stage_hits(tiny_world):
    bm25_only = Pipeline(index=tiny_world.index, collection=tiny_world.collection, candidates=20)
    hits = bm25_only.search(TOPICS["q1"], k=3)
    assert [(h.docid, h.score) for h in hits] == list(BM25(tiny_world.index).search(TOPICS["q1"], k=3).items())


def test_a_first_stage_with_tied_scores_in_its_own_order_reranks_each_passage_with_its_text(pipeline, tiny_world):
    docids = sorted(tiny_world.passages)[:6]

    class TiedFirstStage:       # a filter-like retriever: every hit scores 1.0, in its own (not trec_eval's) order
        def search(self, query, k=1000):
            return dict.fromkeys(docids[:k], 1.0)

        def texts(self, wanted):
            return [tiny_world.passages[docid] for docid in wanted]

    tied = Pipeline(index=TiedFirstStage(), model=pipeline.reranker.model, candidates=6, max_length=64,
                    dtype="fp32", exits=False)
    hits = tied.search(TOPICS["q0"], k=6)
    expected = dict(zip(docids, model_scores(pipeline, TOPICS["q0"], [tiny_world.passages[d] for d in docids])))
    assert {hit.docid: hit.score for hit in hits} == pytest.approx(expected, abs=1e-5)
    assert all(hit.text == tiny_world.passages[hit.docid] for hit in hits)


def test_texts_come_from_the_index_when_no_collection_is_given(tiny_world, pipeline):
    from_index = Pipeline(index=tiny_world.index, model=pipeline.reranker.model, candidates=20, max_length=64,
                          dtype="fp32", exits=False)
    assert from_index.search(TOPICS["q2"], k=5) == pipeline.search(TOPICS["q2"], k=5)


def test_batch_search_equals_search_query_by_query_and_keeps_the_topic_order(pipeline, tiny_world):
    topics = read_topics(tiny_world.topics_file)
    run, stats = pipeline.batch_search(topics, k=4, with_stats=True)
    assert list(run) == list(topics)
    for qid, query in topics.items():
        assert run[qid] == {hit.docid: hit.score for hit in pipeline.search(query, k=4)}
        assert stats[qid].candidates == len(BM25(tiny_world.index).search(query, 20))
        assert stats[qid].latency_ms >= stats[qid].rerank_ms > 0
    assert pipeline.batch_search(topics, k=4, threads=3) == run


def test_rerank_run_reranks_the_top_candidates_and_keeps_the_rest_below(tiny_world):
    small = Pipeline(model=tiny_world.model, collection=tiny_world.collection, candidates=3, max_length=64,
                     dtype="fp32", exits=False)
    first_stage = {"q0": {f"d{i}": 10.0 - i for i in range(6)}}
    reranked = small.rerank_run(first_stage, TOPICS)
    ranked = sorted(reranked["q0"], key=reranked["q0"].get, reverse=True)
    assert set(ranked[:3]) == {"d0", "d1", "d2"} and ranked[3:] == ["d3", "d4", "d5"]
    scores = small.reranker.model.score(TOPICS["q0"], [tiny_world.passages[f"d{i}"] for i in range(3)],
                                        max_length=64)
    assert [reranked["q0"][f"d{i}"] for i in range(3)] == pytest.approx(scores.tolist(), abs=1e-5)
    assert small.rerank_run(first_stage, TOPICS, k=2)["q0"] == {d: reranked["q0"][d] for d in ranked[:2]}
    with pytest.raises(InputError, match="run query 'nope' has no topic"):
        small.rerank_run({"nope": {"d1": 1.0}}, TOPICS)


def test_budgeted_batches_warm_the_reranker_up_once_in_the_models_turn(pipeline, tiny_world):
    topics = read_topics(tiny_world.topics_file)
    warm_ups = []
    warm_up = pipeline.reranker.warm_up
    turns = pipeline._turns          # holding the turn: a ticket taken and being served

    def counted(*args, **kwargs):
        warm_ups.append((turns._next_ticket - turns._serving, *args))
        return warm_up(*args, **kwargs)
    pipeline.reranker.warm_up = counted
    pipeline.batch_search(topics, k=4)
    pipeline.rerank_run({"q0": {"d0": 1.0, "d1": 0.5}}, TOPICS, budget_ms=0)
    pipeline.batch_search({}, budget_ms=600_000)
    assert warm_ups == []                                       # no budget, or nothing to rerank
    pipeline.rerank_run({"q0": {}, "q1": {"d0": 1.0, "d1": 0.5}}, TOPICS, budget_ms=600_000)   # on its first query
    pipeline.batch_search(topics, k=4, budget_ms=600_000)
    texts = [tiny_world.passages["d0"], tiny_world.passages["d1"]]
    assert warm_ups == [(1, TOPICS["q1"], texts)] and pipeline.reranker.warmed_up


def test_pipeline_warm_up_searches_first_and_warms_the_reranker_on_what_it_found(pipeline, tiny_world):
    searched, warm_ups = [], []
    search, warm_up = pipeline.first_stage.search, pipeline.reranker.warm_up
    pipeline.first_stage.search = lambda query, k: searched.append(query) or search(query, k=k)
    pipeline.reranker.warm_up = lambda *args: warm_ups.append(args) or warm_up(*args)
    assert pipeline.warm_up(TOPICS["q1"], rounds=1) > 0 and searched == [TOPICS["q1"]]
    candidates = BM25(tiny_world.index).search(TOPICS["q1"], k=20)
    assert warm_ups == [(TOPICS["q1"], [tiny_world.passages[docid] for docid in candidates], 1)]
    for nothing_found in ("zzzz qqqq", "  "):                # the reranker's own passages then
        pipeline.warm_up(nothing_found, rounds=1)
        assert warm_ups[-1] == (nothing_found, None, 1)
    assert searched == [TOPICS["q1"], "zzzz qqqq"]            # an empty query is not searched
    assert Pipeline(index=tiny_world.index, collection=tiny_world.collection).warm_up() > 0   # first stage alone


def test_batch_search_warms_up_on_its_first_topics_candidates(pipeline, tiny_world):
    warm_ups = []
    warm_up = pipeline.reranker.warm_up
    pipeline.reranker.warm_up = lambda *args, **kwargs: warm_ups.append(args) or warm_up(*args, **kwargs)
    pipeline.batch_search({"empty": "  ", "q2": TOPICS["q2"]}, k=4, budget_ms=600_000)
    candidates = BM25(tiny_world.index).search(TOPICS["q2"], k=20)
    assert warm_ups == [(TOPICS["q2"], [tiny_world.passages[docid] for docid in candidates])]


def test_rerank_takes_texts_pairs_or_a_mapping_like_cross_encoder_rank(pipeline):
    texts = ["a red car on the road", "the cat sat on the mat", "paris is the capital city of france"]
    query = "cat"
    scores = model_scores(pipeline, query, texts)
    best_first = sorted(range(3), key=lambda i: -scores[i])
    hits = pipeline.rerank(query, texts)
    assert [hit.docid for hit in hits] == [str(i) for i in best_first]
    assert [hit.text for hit in hits] == [texts[i] for i in best_first]
    assert [hit.score for hit in hits] == pytest.approx(sorted(scores, reverse=True), abs=1e-5)
    pairs = [(f"doc-{i}", text) for i, text in enumerate(texts)]
    assert [h.docid for h in pipeline.rerank(query, pairs, top_k=2)] == [f"doc-{i}" for i in best_first[:2]]
    assert pipeline.rerank(query, dict(pairs)) == pipeline.rerank(query, pairs)
    assert pipeline.rerank(query, []) == []


def test_rerank_refuses_duplicate_docids_naming_them(pipeline):
    with pytest.raises(InputError, match=r"duplicate docid\(s\) in the candidate list: 'a'"):
        pipeline.rerank("cat", [("a", "the cat"), ("b", "a dog"), ("a", "the cat again")])


def test_a_candidate_without_text_is_an_error_naming_it(pipeline, tiny_world, tmp_path):
    with pytest.raises(InputError, match=r"passage 'b' has no text"):
        pipeline.rerank("cat", [("a", "the cat"), ("b", None)])
    # a first-stage candidate missing from the collection the texts come from
    partial = tmp_path / "partial.jsonl"
    lines = tiny_world.collection.read_text().splitlines(keepends=True)
    partial.write_text("".join(line for line in lines if '"id": "d3"' not in line))
    holey = Pipeline(index=tiny_world.index, model=pipeline.reranker.model, collection=partial, max_length=64)
    query = "the cat sat on the mat"
    assert "d3" in BM25(tiny_world.index).search(query, k=100)
    with pytest.raises(InputError, match=r"docid 'd3' not found in collection .*partial.jsonl"):
        holey.search(query)


def test_an_empty_or_blank_query_has_no_hits_but_rerank_still_scores(pipeline):
    assert pipeline.search("") == [] and pipeline.search("   \t") == []
    hits = pipeline.rerank("", ["the cat", "a dog"])
    assert len(hits) == 2 and all(torch.isfinite(torch.tensor(hit.score)) for hit in hits)
    run = pipeline.batch_search({"empty": "", "q0": TOPICS["q0"]}, k=3)
    assert run["empty"] == {} and len(run["q0"]) == 3


@pytest.mark.parametrize("call, message", [
    (lambda p: p.search("cat", k=0), "k must be a positive integer"),
    (lambda p: p.search("cat", budget_ms=-1), "budget_ms must be a number"),
    (lambda p: p.search("cat", budget_ms=float("nan")), "budget_ms must be a number of milliseconds >= 0"),
    (lambda p: p.search(None), "query: expected a string"),
    (lambda p: p.batch_search(["cat"]), "topics must be a mapping"),
    (lambda p: p.batch_search(TOPICS, threads=0), "threads must be a positive integer"),
    (lambda p: p.rerank("cat", "a single string"), "docs must be a list"),
    (lambda p: p.rerank("cat", ["text", ("id", "text")]), "all texts or all"),
    (lambda p: p.rerank("cat", ["text"], top_k=0), "top_k must be a positive integer"),
])
def test_bad_arguments_raise_input_errors(pipeline, call, message):
    with pytest.raises(InputError, match=message):
        call(pipeline)


def test_bad_construction_raises_input_errors(tiny_world):
    with pytest.raises(InputError, match="candidates must be a positive integer"):
        Pipeline(index=tiny_world.index, candidates=0)
    with pytest.raises(InputError, match="concurrency must be a positive integer, got True"):
        Pipeline(index=tiny_world.index, concurrency=True)
    with pytest.raises(InputError, match="overhead_ms must be a number of milliseconds >= 0, got '20'"):
        Pipeline(index=tiny_world.index, overhead_ms="20")
    with pytest.raises(InputError, match="first stage must be bm25, dense or hybrid"):
        Pipeline(index=tiny_world.index, first_stage="tfidf")
    with pytest.raises(InputError, match="a dense first stage needs dense_index"):
        Pipeline(index=tiny_world.index, first_stage="dense")
    with pytest.raises(InputError, match="no such index directory"):
        Pipeline(index=tiny_world.root / "nowhere")
    with pytest.raises(InputError, match="has no index"):
        Pipeline(model=tiny_world.model).search("cat")
    with pytest.raises(InputError, match="has no model"):
        Pipeline(index=tiny_world.index).rerank("cat", ["a cat"])


@pytest.mark.parametrize("keyword", ["index", "first_stage"])
def test_a_first_stage_object_can_be_passed_as_the_index_or_the_first_stage(tiny_world, pipeline, keyword):
    searcher = BM25(tiny_world.index)
    given = Pipeline(**{keyword: searcher}, model=pipeline.reranker.model, collection=tiny_world.collection,
                     candidates=20, max_length=64, dtype="fp32", exits=False)
    assert given.first_stage is searcher
    assert given.search(TOPICS["q3"], k=5) == pipeline.search(TOPICS["q3"], k=5)
    with pytest.raises(InputError, match="already a first-stage object"):
        Pipeline(**{keyword: searcher}, k1=1.2)


def test_a_first_stage_object_is_the_whole_first_stage(tiny_world):
    with pytest.raises(InputError, match="first_stage= is already a first-stage object"):
        Pipeline(first_stage=BM25(tiny_world.index), index=tiny_world.index)
    with pytest.raises(InputError, match="an object with search"):
        Pipeline(first_stage=42)
