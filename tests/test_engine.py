"""The reranking engine on tiny random cross-encoders (and once on MiniLM): exact scores with exits off, exits
that really shrink the batch, the deadline's fallback order, thread safety, bad input."""
from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

import rankshrink
from rankshrink.data import trec_order
from rankshrink.errors import InputError
from rankshrink.rerank import CostModel, FrontierPoint, Reranker, RerankConfig
from rankshrink.rerank.calibration import LEVELS
from rankshrink.rerank.engine import (LENGTH_STEP, assemble, pack, padded_length, regroup, truncated_pairs,
                                      warm_up_passages)
from test_model_fixtures import WORDS, pair_exits, spread_scores, tiny_dir  # noqa: F401 - a fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def candidates_and_texts(count: int = 30, seed: int = 1) -> tuple[dict[str, float], dict[str, str]]:
    """First-stage scores (with ties, so trec_order's tie-break matters) and passages of varied length."""
    rng = random.Random(seed)
    candidates = {f"d{i:02d}": float(count - i // 2) for i in range(count)}
    texts = {docid: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for docid in candidates}
    return candidates, texts


@pytest.fixture
def tiny(tiny_dir):
    return spread_scores(rankshrink.load_model(tiny_dir))


def with_margins(model, margin: float = 0.0):
    """A calibration that lets every document below the cut leave (margin ``margin`` at every level)."""
    layers = [str(layer) for layer in model.config.exit_layers]
    model.metadata["calibration"] = {
        "top_k": 3, "levels": list(LEVELS), "default_risk": 0.1,
        "entries": [{"width": w, "depth": d, "max_length": 64, "margins": {layer: [margin] * len(LEVELS) for layer in layers}}
                    for w in (0.5, 1.0) for d in (0.5, 0.75, 1.0)]}
    return model


def test_exits_off_fp32_scores_equal_model_score(tiny):
    candidates, texts = candidates_and_texts()
    order = [docid for docid, _ in trec_order(candidates)]
    expected = tiny.score("what is the capital of france", [texts[d] for d in order], max_length=24)
    for batch_tokens in (40, 2048):   # many small micro-batches, and one
        reranker = Reranker(tiny, max_length=24, exits=False, dtype="fp32", batch_tokens=batch_tokens)
        result = reranker.rerank("what is the capital of france", candidates, texts)
        got = torch.tensor([result.scores[d] for d in order])
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
        assert result.stats.scored == len(order) and not result.stats.deadline_hit
        assert result.stats.layers_used == [tiny.config.num_layers] * len(order)
    small = Reranker(tiny, max_length=24, exits=False, dtype="fp32", batch_tokens=40).rerank("cat", candidates, texts)
    assert len(small.stats.batch_sizes[0]) > len(result.stats.batch_sizes[0]) + 3


@pytest.mark.parametrize("width, depth", [(0.5, 1.0), (1.0, 0.5), (0.5, 0.75)])
def test_exits_off_fp32_scores_equal_model_score_at_every_size(tiny, width, depth):
    candidates, texts = candidates_and_texts(12)
    order = [docid for docid, _ in trec_order(candidates)]
    expected = tiny.score("why is the sky blue", [texts[d] for d in order], width=width, depth=depth, max_length=32)
    result = Reranker(tiny, width=width, depth=depth, max_length=32, exits=False, dtype="fp32",
                      batch_tokens=64).rerank("why is the sky blue", candidates, texts)
    assert torch.allclose(torch.tensor([result.scores[d] for d in order]), expected, atol=1e-5, rtol=0)
    assert len(result.stats.batch_sizes) == len(tiny.layers_for(depth))


@pytest.mark.parametrize("depth", [0.5, 0.75])
def test_a_prefix_depth_reranks_with_the_exit_head_it_ends_at(tiny, depth):
    pair_exits(tiny)
    tiny.config = replace(tiny.config, depth_layers="prefix")
    candidates, texts = candidates_and_texts(12)
    order = [docid for docid, _ in trec_order(candidates)]
    expected = tiny.score("why is the sky blue", [texts[d] for d in order], depth=depth, max_length=32)
    result = Reranker(tiny, depth=depth, max_length=32, exits=False, dtype="fp32",
                      batch_tokens=64).rerank("why is the sky blue", candidates, texts)
    assert torch.allclose(torch.tensor([result.scores[d] for d in order]), expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.1 and len(result.stats.batch_sizes) == len(tiny.layers_for(depth)) < tiny.config.num_layers


def test_a_list_of_texts_follows_the_first_stage_order_and_an_ambiguous_one_is_refused(tiny):
    candidates, texts = candidates_and_texts(10)
    order = [docid for docid, _ in trec_order(candidates)]
    assert list(candidates) != order                                   # ties: d00 and d01 swap
    reranker = Reranker(tiny, max_length=32, exits=False, dtype="fp32")
    expected = reranker.rerank("cat", candidates, texts).scores
    in_order = {docid: candidates[docid] for docid in order}
    assert reranker.rerank("cat", in_order, [texts[d] for d in order]).scores == expected
    as_list = reranker.rerank("cat", order, [texts[d] for d in order]).scores
    assert max(abs(as_list[d] - expected[d]) for d in candidates) < 1e-5
    for call in (reranker.rerank, lambda *args: reranker.rerank_config(*args, reranker.config)):
        with pytest.raises(InputError, match="give texts as a mapping docid -> text"):
            call("cat", candidates, [texts[d] for d in candidates])     # which order? refused, not guessed


@pytest.mark.parametrize("pooling", ["cls", "pair"])
def test_exited_documents_leave_the_batch_and_keep_their_exit_score(tiny, pooling):
    if pooling == "pair":   # exit heads reading each pair's query and passage tokens: the batch's masks and types
        pair_exits(tiny)
    with_margins(tiny, 0.0)
    candidates, texts = candidates_and_texts(24)
    order = [docid for docid, _ in trec_order(candidates)]
    query = "how does a fish swim"
    reranker = Reranker(tiny, max_length=64, exits=0.1, dtype="fp32", batch_tokens=4096)
    result = reranker.rerank(query, candidates, texts, top_k=3)
    stats = result.stats
    assert stats.config["exits"] and stats.config["exit_risk"] == 0.1
    running = [sum(sizes) for sizes in stats.batch_sizes]
    assert running[0] == 24 and running[-1] < running[0]          # fewer rows as layers go
    assert running == sorted(running, reverse=True)
    assert sum(stats.layers_used) < 24 * tiny.config.num_layers
    # With margin 0, after layer l every document below the top-3 cut leaves; the survivors of the last layer
    # are never more than top_k, and each document's score is the head it stopped at.
    assert running[-1] <= 3
    tokens = tiny.tokenize([query] * len(order), [texts[d] for d in order], max_length=64)
    with torch.inference_mode():
        out = tiny(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"], exits="all")
    for position, docid in enumerate(order):
        used = stats.layers_used[position]
        layer = used - 1
        expected = out.score[position] if layer == tiny.config.num_layers - 1 else out.exit_scores[layer][position]
        assert math.isclose(result.scores[docid], float(expected), abs_tol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "pair"])
def test_repacking_after_exits_keeps_the_survivors_scores_exact(tiny, pooling):
    """Trimming, padding and merging micro-batches after exits must not change any survivor's arithmetic."""
    if pooling == "pair":
        pair_exits(tiny)
    with_margins(tiny, 0.5)
    candidates, texts = candidates_and_texts(40, seed=3)
    order = [docid for docid, _ in trec_order(candidates)]
    query = "what is the capital of france"
    result = Reranker(tiny, max_length=64, exits=0.1, dtype="fp32", batch_tokens=120).rerank(
        query, candidates, texts, top_k=5)
    full = tiny.score(query, [texts[d] for d in order], max_length=64)
    finished = [i for i, used in enumerate(result.stats.layers_used) if used == tiny.config.num_layers]
    assert 0 < len(finished) < len(order)
    for position in finished:
        assert math.isclose(result.scores[order[position]], float(full[position]), abs_tol=1e-5)
    tokens = tiny.tokenize([query] * len(order), [texts[d] for d in order], max_length=64)
    with torch.inference_mode():
        out = tiny(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"], exits="all")
    for position, used in enumerate(result.stats.layers_used):   # and the exited, at their head
        if used < tiny.config.num_layers:
            assert math.isclose(result.scores[order[position]], float(out.exit_scores[used - 1][position]), abs_tol=1e-5)


def test_a_budget_of_zero_returns_the_first_stage_order(tiny):
    candidates, texts = candidates_and_texts(15)
    result = Reranker(tiny, max_length=32, dtype="fp32").rerank("cat", candidates, texts, budget_ms=0)
    order = [docid for docid, _ in trec_order(candidates)]
    assert result.ranking() == order
    values = [result.scores[d] for d in order]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert result.stats.scored == 0 and result.stats.deadline_hit and result.stats.layers_used == [0] * 15


def test_unscored_candidates_rank_below_scored_ones_in_first_stage_order(tiny):
    candidates, texts = candidates_and_texts(30)
    order = [docid for docid, _ in trec_order(candidates)]
    reranker = Reranker(tiny, max_length=64, candidates=20, exits=False, dtype="fp32")
    result = reranker.rerank("cat", candidates, texts)
    ranking = result.ranking()
    assert set(ranking[:20]) == set(order[:20]) and ranking[20:] == order[20:]   # beyond `candidates`
    assert result.stats.layers_used[20:] == [0] * 10
    # A partly scored list, as a deadline leaves it: NaN = no head reached.
    values = [1.5, math.nan, -0.5, math.nan, 3.0]
    scores = assemble(["a", "b", "c", "d", "e", "f"], values)
    assert [docid for docid, _ in trec_order(scores)] == ["e", "a", "c", "b", "d", "f"]


def test_deadlines_always_leave_a_well_formed_ranking(tiny):
    """Whatever a deadline cuts, scored candidates come first and the rest keep first-stage order."""
    candidates, texts = candidates_and_texts(60)
    order = [docid for docid, _ in trec_order(candidates)]
    reranker = Reranker(tiny, max_length=64, exits=False, dtype="fp32", batch_tokens=64)
    for budget in (0.0, 0.5, 2.0, 5.0, 20.0, 600_000.0):
        result = reranker.rerank("why does grass green", candidates, texts, budget_ms=budget)
        ranking = result.ranking()
        scored = result.stats.scored
        assert sorted(ranking) == sorted(order)
        unscored = [d for d in order if d not in set(ranking[:scored])]
        assert ranking[scored:] == unscored
        assert result.stats.deadline_hit or scored == len(order)
    assert not result.stats.deadline_hit and result.stats.layers_used == [tiny.config.num_layers] * len(order)


def test_a_deadline_stops_the_tokenizer_between_chunks_of_long_documents(tiny):
    """Long documents take the tokenizer longer than a tiny budget: the deadline stops it between chunks of
    pairs (``ENCODE_PAIRS``) instead of after all of them, and the first-stage order comes back."""
    rng = random.Random(3)
    candidates = {f"d{i:03d}": float(400 - i) for i in range(400)}
    texts = {docid: " ".join(rng.choice(WORDS) for _ in range(3000)) for docid in candidates}
    reranker = Reranker(tiny, max_length=64, candidates=400, exits=False, dtype="fp32")
    started = time.perf_counter()
    reranker._encode("cat", list(texts.values()), 64)
    tokenize_all_ms = (time.perf_counter() - started) * 1000
    budget = tokenize_all_ms / 20
    result = reranker.rerank("cat", candidates, texts, budget_ms=budget)
    assert result.stats.deadline_hit and result.stats.scored == 0
    assert result.ranking() == [docid for docid, _ in trec_order(candidates)]
    assert result.stats.tokenize_ms < tokenize_all_ms / 2       # a chunk is 1/16 of the pairs
    assert reranker._encode("cat", ["a cat"] * 3, 64, deadline=time.perf_counter() - 1) is None


def test_warm_up_runs_what_a_budget_can_choose_and_only_its_last_round_sets_the_load(tiny):
    rungs = [FrontierPoint(RerankConfig(0.5, 0.5, 16, 10), 0.4, 1.0, 1.0),
             FrontierPoint(RerankConfig(1.0, 1.0, 512, 100, keep=8), 0.6, 9.0, 9.0),   # capped to 32 tokens, 20
             FrontierPoint(RerankConfig(1.0, 1.0, 32, 20), 0.7, 20.0, 20.0)]           # the fixed one: once a round
    profile = {"frontier": [p.to_dict() for p in rungs], "ladder": [p.to_dict() for p in rungs],
               "cost_model": CostModel({"calls": 1.0}, {}).to_dict(), "threads": torch.get_num_threads()}
    reranker = Reranker(tiny, max_length=32, candidates=20, exits=False, dtype="fp32", profile=profile)
    ran, observed = [], []
    run, observe = reranker._run, reranker._observe
    reranker._run = lambda *args, **kwargs: ran.append((args[4], args[6])) or run(*args, **kwargs)
    reranker._observe = lambda config, *args: observed.append(config) or observe(config, *args)
    seconds = reranker.warm_up(rounds=3)
    configs = [reranker.config, RerankConfig(0.5, 0.5, 16, 10), RerankConfig(1.0, 1.0, 32, 20, keep=8)]
    assert [config for config, _ in ran] == configs * 3 and seconds > 0 and reranker.warmed_up
    assert all(deadline >= 3_600_000 for _, deadline in ran)          # heads run as under a budget
    assert observed == configs and reranker.load != 1.0               # the last round sets the load
    ran.clear()
    reranker.warm_up("pets", {"a": "a cat", "b": "a dog"}, rounds=1, fixed=False)   # by docid; the ladder alone
    assert [config for config, _ in ran] == configs[1:] + configs[:1]     # the fixed one here as a rung
    for bad in ({"rounds": 0}, {"rounds": True}, {"passages": []}, {"passages": "one text"}):
        with pytest.raises(InputError):
            reranker.warm_up(**bad)


def test_rerank_run_warms_up_once_before_its_first_budgeted_query(tiny):
    candidates, texts = candidates_and_texts(12)
    run, topics = {"q1": candidates, "q2": candidates}, {"q1": "why is the sky blue", "q2": "cats"}
    reranker = Reranker(tiny, max_length=32, exits=False, dtype="fp32")
    warm_ups = []
    warm_up = reranker.warm_up
    reranker.warm_up = lambda *args, **kwargs: warm_ups.append(args) or warm_up(*args, **kwargs)
    reranker.rerank_run(run, topics, texts, progress=False)
    assert warm_ups == []                               # no budget: nothing to protect
    with pytest.raises(InputError, match="budget"):
        reranker.rerank_run(run, topics, texts, budget_ms=-5, progress=False)
    assert warm_ups == []                               # a bad budget is refused first
    for _ in range(2):
        reranked, _ = reranker.rerank_run(run, topics, texts, budget_ms=600_000, progress=False)
    first_stage = {docid: texts[docid] for docid, _ in trec_order(candidates)}
    assert warm_ups == [("why is the sky blue", first_stage)] and set(reranked) == {"q1", "q2"}


def test_warm_up_passages_spread_their_lengths_in_every_prefix():
    passages = warm_up_passages()
    lengths = [len(p.split()) for p in passages]
    assert len(passages) == 100 and min(lengths) == 4 and max(lengths) == 300
    assert min(lengths[:20]) < 75 and max(lengths[:20]) > 225 and passages == warm_up_passages()


def pruned_order(model, reranker, query, candidates, texts):
    """The candidates in the order of ``reranker``'s cascade first pass, scored by ``model.score`` directly."""
    order = [docid for docid, _ in trec_order(candidates)]
    pruner = reranker.pruner(reranker.config, len(order))
    first = model.score(query, [texts[d] for d in order], width=pruner.width, depth=pruner.depth,
                        max_length=pruner.max_length)
    return [order[i] for i in sorted(range(len(order)), key=lambda i: (-float(first[i]), i))]


def test_a_cascade_reranks_the_pruners_best_with_the_network_and_the_rest_in_its_order(tiny):
    candidates, texts = candidates_and_texts(30, seed=3)
    order = [docid for docid, _ in trec_order(candidates)]
    query = "why is the sky blue"
    reranker = Reranker(tiny, max_length=24, exits=False, dtype="fp32", batch_tokens=64, keep=8)
    pruner = reranker.pruner(reranker.config, len(order))
    assert (pruner.width, pruner.depth, pruner.max_length, pruner.keep) == \
        (min(tiny.config.widths), min(tiny.config.depths), 24, None)
    pruned = pruned_order(tiny, reranker, query, candidates, texts)
    kept = pruned[:8]
    second = tiny.score(query, [texts[d] for d in kept], max_length=24)
    result = reranker.rerank(query, candidates, texts)
    assert torch.allclose(torch.tensor([result.scores[d] for d in kept]), second, atol=1e-5, rtol=0)
    assert set(result.ranking()[:8]) == set(kept) and result.ranking()[8:] == pruned[8:]
    stats = result.stats
    assert stats.config["keep"] == 8 and stats.work["calls"] == 2 and stats.work["pairs"] == 30 + 8
    assert stats.work["prune_gflops"] > 0 and stats.work["prune_width"] == pruner.width
    layers = [stats.layers_used[order.index(d)] for d in order]
    assert sorted(set(layers)) == [len(tiny.layers_for(pruner.depth)), tiny.config.num_layers]
    assert sum(n == tiny.config.num_layers for n in layers) == 8
    # keeping every candidate is no cascade; a cascade under any deadline still ranks every candidate
    everything = Reranker(tiny, max_length=24, exits=False, dtype="fp32", keep=30).rerank(query, candidates, texts)
    plain = Reranker(tiny, max_length=24, exits=False, dtype="fp32").rerank(query, candidates, texts)
    assert everything.scores == plain.scores and "prune_gflops" not in everything.stats.work
    for budget in (0.0, 0.5, 3.0, 600_000.0):
        ranking = reranker.rerank(query, candidates, texts, budget_ms=budget).ranking()
        assert sorted(ranking) == sorted(order)
        if budget == 0.0:
            assert ranking == order
    with pytest.raises(InputError, match="keep must be a positive integer"):
        Reranker(tiny, keep=0)


def test_a_deeper_first_pass_is_a_cascade_knob(tiny):
    candidates, texts = candidates_and_texts(30, seed=3)
    reranker = Reranker(tiny, max_length=24, exits=False, dtype="fp32", keep=8, prune_depth=1.0)
    pruner = reranker.pruner(reranker.config, len(candidates))
    assert (pruner.width, pruner.depth) == (min(tiny.config.widths), 1.0)
    result = reranker.rerank("why is the sky blue", candidates, texts)
    assert set(result.ranking()[:8]) == set(pruned_order(tiny, reranker, "why is the sky blue", candidates, texts)[:8])
    assert result.stats.config["prune_depth"] == 1.0
    assert set(result.stats.layers_used) == {tiny.config.num_layers}     # both passes ran every layer
    with pytest.raises(InputError, match="prune_depth must be in"):
        Reranker(tiny, keep=8, prune_depth=0.0)
    with pytest.raises(InputError, match="give keep too"):
        Reranker(tiny, prune_depth=0.75)


def test_a_cascade_tokenizes_once_and_cuts_the_pairs_as_the_tokenizer_would(tiny):
    rng = random.Random(5)
    passages = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(40)]
    for query in ("cat", " ".join(rng.choice(WORDS) for _ in range(30))):   # the second fills 24 tokens alone
        long = tiny.encode([query] * len(passages), passages, 64)
        cut, redo = truncated_pairs(long, 24)
        short = tiny.encode([query] * len(passages), passages, 24)
        assert (redo == []) == (query == "cat")
        for position in range(len(passages)):
            if position not in redo:
                assert [cut[key][position] for key in short] == [short[key][position] for key in short]
    # and a cascade at 64 tokens over a first pass at 24 ranks as with the pairs tokenized at each length
    candidates, texts = candidates_and_texts(30, seed=4)
    texts = {docid: text + " " + text + " " + text for docid, text in texts.items()}
    reranker = Reranker(tiny, max_length=64, exits=False, dtype="fp32", keep=8)
    reranker.pruner = lambda config, count: RerankConfig(0.25, 0.5, 24, count, None)
    result = reranker.rerank("cat", candidates, texts)
    assert result.ranking()[8:] == pruned_order(tiny, reranker, "cat", candidates, texts)[8:]


def test_rerank_is_thread_safe(tiny):
    with_margins(tiny, 0.2)
    reranker = Reranker(tiny, max_length=64, exits=0.1, dtype="fp32", batch_tokens=100)
    queries = ["what is the capital of france", "why is the sky blue", "how does a fish swim", "cat"]
    inputs = [candidates_and_texts(25, seed=i) for i in range(len(queries))]
    expected = [reranker.rerank(q, c, t).scores for q, (c, t) in zip(queries, inputs)]
    results: dict[tuple[int, int], dict] = {}
    errors = []

    def work(worker: int) -> None:
        try:
            for round_ in range(3):
                index = (worker + round_) % len(queries)
                results[(worker, round_)] = reranker.rerank(queries[index], *inputs[index]).scores
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for (worker, round_), scores in results.items():
        assert scores == expected[(worker + round_) % len(queries)]


def test_bf16_copy_leaves_the_callers_model_alone_and_ranks_alike(tiny):
    candidates, texts = candidates_and_texts(20)
    bf16 = Reranker(tiny, max_length=64, exits=False, dtype="bf16")
    fp32 = Reranker(tiny, max_length=64, exits=False, dtype="fp32")
    assert next(tiny.parameters()).dtype == torch.float32 and fp32.model is tiny
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert Reranker(tiny, dtype="bf16").model is bf16.model          # one copy per (model, dtype)
    a = bf16.rerank("cat", candidates, texts).scores
    b = fp32.rerank("cat", candidates, texts).scores
    spread = max(b.values()) - min(b.values())
    assert max(abs(a[d] - b[d]) for d in b) < 0.05 * spread


@pytest.mark.parametrize("dtype, training", [("bf16", False), ("fp32", True)])
def test_a_new_reranker_scores_with_the_models_current_weights(tiny, dtype, training):
    candidates, texts = candidates_and_texts(6)
    tiny.train(training)
    before = Reranker(tiny, max_length=32, exits=False, dtype=dtype).rerank("cat", candidates, texts).scores
    tiny.head.classifier.weight.data.mul_(-1.0)   # an in-place change autograd does not see
    after = Reranker(tiny, max_length=32, exits=False, dtype=dtype).rerank("cat", candidates, texts).scores
    assert all(math.isclose(after[d], 2 * tiny.head.classifier.bias.item() - before[d], abs_tol=0.05)
               for d in candidates)


def test_empty_input_and_empty_query(tiny):
    reranker = Reranker(tiny, max_length=32, dtype="fp32")
    assert reranker.rerank("cat", {}, {}).scores == {}
    candidates, texts = candidates_and_texts(5)
    assert len(reranker.rerank("", candidates, texts).scores) == 5


def test_long_passages_are_truncated_to_max_length(tiny):
    candidates = {"long": 2.0, "short": 1.0}
    texts = {"long": " ".join(["cat"] * 500), "short": "a cat"}
    result = Reranker(tiny, max_length=16, exits=False, dtype="fp32").rerank("cat", candidates, texts)
    assert result.stats.work["tokens"] <= 32
    expected = tiny.score("cat", [texts["long"], texts["short"]], max_length=16)
    assert math.isclose(result.scores["long"], float(expected[0]), abs_tol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda r: r.rerank("cat", {"a": 1.0, "b": 0.5}, {"a": "x"}), "no text for candidate 'b'"),
    (lambda r: r.rerank("cat", ["a", "b", "a"], ["x", "y", "z"]), "duplicate docid(s) among the candidates: 'a'"),
    (lambda r: r.rerank("cat", {"a": 1.0, "b": 0.5}, ["x"]), "1 texts for 2 candidates"),
    (lambda r: r.rerank("cat", {"a": 1.0}, {"a": None}), "the text of candidate 'a' is NoneType"),
    (lambda r: r.rerank("cat", {"a": 1.0}, {"a": "x"}, budget_ms=-1), "budget_ms must be"),
    (lambda r: r.rerank("cat", {"a": 1.0}, {"a": "x"}, top_k=0), "top_k must be a positive integer"),
    (lambda r: r.rerank("cat", {"a": math.nan, "b": 1.0}, {"a": "x", "b": "y"}, budget_ms=0),
     "the first-stage score of candidate 'a' is nan"),
    (lambda r: r.rerank(None, {"a": 1.0}, {"a": "x"}), "the query must be a string, got NoneType"),
    (lambda r: r.choose(50, 10), "the model has no profile to choose from"),
])
def test_bad_input_raises_input_error(tiny, call, message):
    with pytest.raises(InputError) as error:
        call(Reranker(tiny, max_length=32, dtype="fp32"))
    assert message in str(error.value)


def test_numpy_numbers_are_numbers(tiny):
    result = Reranker(tiny, max_length=32, dtype="fp32").rerank("cat", {"a": np.float32(2.0), "b": 1.0},
                                                                {"a": "x", "b": "y"}, budget_ms=np.int64(0),
                                                                top_k=np.int64(1))
    assert result.ranking() == ["a", "b"]


def test_bad_construction_raises_input_error(tiny):
    with pytest.raises(InputError, match="width must be in"):
        Reranker(tiny, width=0)
    assert Reranker(tiny, max_length=512).config.max_length == 64      # the model's positions
    explicit = Reranker(tiny, dtype="fp32").rerank_config("cat", ["a"], ["cat " * 300], RerankConfig(max_length=512))
    assert explicit.stats.config["max_length"] == 64
    with pytest.raises(InputError, match="exit_risk must be a probability"):
        Reranker(tiny, exits=2.0)
    with pytest.raises(InputError, match="depth must be in"):
        Reranker(tiny, depth=math.nan)
    with pytest.raises(InputError, match=r"headroom must be in \[0, 1\), got '0.1'"):   # a TypeError before
        Reranker(tiny, headroom="0.1")
    with pytest.raises(InputError, match="dtype must be"):
        Reranker(tiny, dtype="fp16")


def test_exits_true_without_calibration_runs_every_layer(tiny):
    reranker = Reranker(tiny, max_length=32, dtype="fp32")
    assert reranker.config.exit_risk is None
    candidates, texts = candidates_and_texts(10)
    assert reranker.rerank("cat", candidates, texts).stats.config["exits"] is False


def test_pack_and_regroup_cover_every_document_once_within_the_limits():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(200)]
    groups = pack(lengths, None, batch_tokens=512, max_padding=0.2)
    assert sorted(p for g in groups for p in g) == list(range(200))
    for group in groups:
        longest = max(lengths[p] for p in group)
        assert len(group) == 1 or len(group) * padded_length(longest, 512) <= 512
        assert len(group) == 1 or len(group) * longest - sum(lengths[p] for p in group) <= 0.2 * len(group) * longest
    survivors = [[p for p in g if rng.random() < 0.3] for g in groups]
    merged = regroup(survivors, lengths, 512, 0.2)
    assert [p for g in merged for p in g] == [p for g in survivors for p in g]
    assert len(merged) < len([g for g in survivors if g])


def test_micro_batches_are_padded_to_a_multiple_of_the_length_step(tiny):
    assert [padded_length(n, 40) for n in (1, 16, 17, 33, 40, 41)] == [16, 16, 32, 40, 40, 41]
    lengths = []
    reranker = Reranker(tiny, max_length=60, exits=False, dtype="fp32", batch_tokens=128)
    real_run_layer = reranker.model.run_layer
    reranker.model.run_layer = lambda index, hidden, *args, **kwargs: (
        lengths.append(hidden.shape[1]), real_run_layer(index, hidden, *args, **kwargs))[1]
    candidates, texts = candidates_and_texts(30)
    try:
        reranker.rerank("why is the sky blue", candidates, texts)
    finally:
        reranker.model.run_layer = real_run_layer
    assert len(set(lengths)) > 1 and all(n % LENGTH_STEP == 0 for n in lengths), lengths


def test_minilm_exits_off_fp32_equals_model_score(shared):
    """The real 6-layer network on real dl19 passages (mojibake included), 100 candidates' worth of lengths."""
    from rankshrink.data import open_collection, read_run, read_topics

    dl19 = shared / "trec-dl" / "dl19"
    run = read_run(dl19 / "runs" / "bm25.top100.trec")
    qid = sorted(run)[0]
    candidates = dict(trec_order(run[qid])[:40])
    texts = dict(zip(candidates, open_collection(dl19 / "passages.jsonl").texts(candidates)))
    model = spread_scores(rankshrink.load_model(shared / "models" / "all-MiniLM-L6-v2"))
    query = read_topics(dl19 / "topics.tsv")[qid]
    result = Reranker(model, max_length=128, exits=False, dtype="fp32").rerank(query, candidates, texts)
    expected = model.score(query, list(texts.values()), max_length=128)
    got = torch.tensor([result.scores[d] for d in texts])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_config_from_reranker_options():
    assert RerankConfig(0.5, 0.75, 128, 30, 0.1).label() == "w0.5 d0.75 L128 K30 exits 0.1"
    with pytest.raises(InputError):
        RerankConfig(candidates=0)


_KERNEL_CACHE_PROBE = """
import torch
import rankshrink.model
weight, bias = torch.randn(16, 16), torch.zeros(16)
for _ in range(2):
    for rows in range(1, 1101):
        torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 16), weight, bias, "none", [], "")
    print("round", flush=True)
"""


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="no oneDNN fused linear")
@pytest.mark.parametrize("capacity, second_round_misses", [(None, 0), ("1024", 1100)])
def test_onednn_keeps_the_kernels_of_more_shapes_than_its_default_cache(capacity, second_round_misses):
    """1100 matrix shapes, twice: with rankshrink imported, oneDNN still has all of them the second time;
    a user's own cache size (here oneDNN's default, 1024) wins, and then every one is rebuilt."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    env.update({"ONEDNN_VERBOSE": "2", **({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": capacity} if capacity else {})})
    log = subprocess.run([sys.executable, "-c", _KERNEL_CACHE_PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout
    second_round = log.split("round")[1]
    assert second_round.count("cache_miss") == second_round_misses
    assert second_round.count("cache_hit") == 1100 - second_round_misses
