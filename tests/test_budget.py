"""Budgets: exit calibration, the cost model, the frontier and controller, the profile's simulation against the
engine, and a whole profile of a tiny model saved with it and used by budgeted reranks."""
from __future__ import annotations

import json
import time
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

import rankshrink
from rankshrink.data import trec_order
from rankshrink.errors import InputError
from rankshrink.model import save_model
from rankshrink.rerank import Controller, CostModel, FrontierPoint, Reranker, RerankConfig
from rankshrink.rerank.budget import does_at_least, nested_ladder, pareto_frontier
from rankshrink.rerank.calibration import LEVELS, calibrate_margins, leaving, margin_at, margins_for
from rankshrink.rerank.engine import BATCH_TOKENS
from rankshrink.rerank.profiling import (_time, _trace, agreement_qrels, dev_queries, profile, save_profile, simulate,
                                         simulate_cascade)
from test_engine import candidates_and_texts, with_margins
from test_model_fixtures import WORDS, spread_scores, tiny_dir  # noqa: F401 - a fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def tiny(tiny_dir):
    return spread_scores(rankshrink.load_model(tiny_dir))


# -- calibration -------------------------------------------------------------------------------


def test_leaving_spares_the_top_k_and_those_near_the_cut():
    scores = torch.tensor([5.0, 4.0, 3.5, 1.0, -3.0])
    assert leaving(scores, top_k=2, margin=1.0).tolist() == [False, False, False, True, True]
    assert leaving(scores, top_k=2, margin=10.0).tolist() == [False] * 5
    assert leaving(scores[:2], top_k=2, margin=0.0).tolist() == [False, False]   # no more than k running


def test_margins_are_quantiles_of_how_far_below_the_cut_top_k_documents_were():
    rng = np.random.default_rng(0)
    queries, finals = [], []
    for _ in range(50):
        final = rng.normal(size=40)
        queries.append({0: final + rng.normal(scale=1.0, size=40), 2: final + rng.normal(scale=0.1, size=40),
                        1: rng.normal(scale=0.01, size=40)})       # a head that does not rank
        finals.append(final)
    margins = calibrate_margins(queries, finals, top_k=5)
    assert set(margins) == {"0", "1", "2"} and len(margins["0"]) == len(LEVELS)
    assert margins["1"] is None                                      # no document exits by it
    for layer in ("0", "2"):   # a smaller miss probability needs a larger margin
        assert margins[layer] == sorted(margins[layer], reverse=True)
    assert margins["0"][4] > margins["2"][4]                         # the noisier layer needs more
    # the calibrated margin at ε lets about ε of the top-5 documents leave, on the data it came from
    level = LEVELS.index(0.1)
    missed = total = 0
    for scores, final in zip(queries, finals):
        top = np.argsort(-final)[:5]
        leave = leaving(torch.tensor(scores[0]), 5, margins["0"][level]).numpy()
        missed += int(leave[top].sum())
        total += 5
    assert missed / total <= 0.1 + 1e-9


def test_margins_for_splits_the_risk_over_the_exit_layers_and_interpolates():
    calibration = {"entries": [{"width": 1.0, "depth": 1.0, "max_length": 128,
                                "margins": {"0": list(np.linspace(5, 0, len(LEVELS))), "1": [1.0] * len(LEVELS)}}]}
    margins = margins_for(calibration, 1.0, 1.0, 256, [0, 1], exit_risk=0.02)
    assert margins[1] == 1.0
    assert math.isclose(margins[0], margin_at(calibration["entries"][0]["margins"]["0"], 0.01))
    between = margin_at([2.0, 1.0] + [0.0] * (len(LEVELS) - 2), math.sqrt(LEVELS[0] * LEVELS[1]))
    assert math.isclose(between, 1.5)
    assert margins_for(calibration, 0.5, 1.0, 256, [0, 1], 0.02) is None       # no entry for this width
    assert margins_for(None, 1.0, 1.0, 256, [0, 1], 0.02) is None
    calibration["entries"][0]["margins"]["2"] = None                             # a head that does not rank
    assert margins_for(calibration, 1.0, 1.0, 256, [0, 1, 2], 0.02) == margins   # the risk goes to the others
    assert margins_for(calibration, 1.0, 1.0, 256, [2], 0.02) is None


# -- cost model, frontier, controller -----------------------------------------------------------


def test_cost_model_recovers_the_costs_of_exact_timings():
    rng = random.Random(0)
    truth = {"calls": 2.0, "tokens": 0.01, "steps": 0.3}
    per_gflop = {0.5: 4.0, 1.0: 3.0}
    samples = []
    for _ in range(60):
        width = rng.choice([0.5, 1.0])
        work = {"calls": 1, "pairs": 100, "tokens": rng.randint(2000, 20000), "steps": rng.randint(5, 60),
                "heads": 0, "gflops": rng.uniform(5, 200)}
        ms = sum(truth[k] * work[k] for k in truth) + per_gflop[width] * work["gflops"]
        samples.append((work, width, ms))
    model = CostModel.fit(samples)
    for work, width, ms in samples:
        assert math.isclose(model.predict(work, width), ms, rel_tol=1e-3)
    assert math.isclose(model.ms_per_gflop[0.5], 4.0, rel_tol=1e-2)
    assert model.gflop_cost(0.6) == model.ms_per_gflop[0.5]           # the nearest measured width
    assert CostModel.from_dict(json.loads(json.dumps(model.to_dict()))).predict(samples[0][0], samples[0][1]) == \
        pytest.approx(samples[0][2], rel=1e-3)


def test_the_cost_model_prices_a_cascades_first_pass_at_its_own_width():
    rng = random.Random(1)
    per_gflop = {0.25: 9.0, 1.0: 3.0}
    samples = []
    for index in range(40):
        work = {"calls": 1, "pairs": 100, "tokens": 9000, "steps": 20, "heads": 0, "gflops": rng.uniform(5, 200)}
        if index % 2:
            work.update(prune_gflops=rng.uniform(5, 20), prune_width=0.25)
        else:
            work["gflops"] /= 4   # a narrow rerank of its own, so both widths are seen alone too
        width = 1.0 if index % 2 else 0.25
        ms = 1.0 + per_gflop[width] * work["gflops"] + per_gflop[0.25] * work.get("prune_gflops", 0.0)
        samples.append((work, width, ms))
    model = CostModel.fit(samples)
    assert model.ms_per_gflop == pytest.approx(per_gflop, rel=1e-3)
    work, width, ms = samples[1]
    assert model.predict(work, width) == pytest.approx(ms, rel=1e-3)
    assert model.predict({**work, "prune_gflops": 0.0}, width) == pytest.approx(ms - 9.0 * work["prune_gflops"],
                                                                                rel=1e-3)


def test_a_cascade_is_a_knob_of_the_configuration():
    cascade = RerankConfig(1.0, 1.0, 128, 100, None, keep=20)
    assert cascade.reranked == 20 and "keep 20" in cascade.label()
    assert cascade.cascades(100) and not cascade.cascades(20) and not RerankConfig().cascades(100)
    assert RerankConfig.from_dict(json.loads(json.dumps(cascade.as_dict()))) == cascade
    assert RerankConfig.from_dict({"width": 0.5}).keep is None                       # profiles made before cascades
    assert RerankConfig(candidates=10, keep=20).reranked == 10 and "keep" not in RerankConfig(keep=100).label()
    # more candidates kept is more work; a cascade of the top 100 does what the plain top 20 does, and more
    assert does_at_least(replace(cascade, keep=30), cascade) and not does_at_least(cascade, replace(cascade, keep=30))
    assert does_at_least(cascade, RerankConfig(1.0, 1.0, 128, 20))
    assert does_at_least(RerankConfig(1.0, 1.0, 128), cascade)
    assert not does_at_least(cascade, RerankConfig(1.0, 1.0, 128, 50))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="keep must be a positive integer"):
            RerankConfig(keep=bad)
    for name in ("max_length", "candidates"):      # required: None is not a default here
        with pytest.raises(InputError, match=f"{name} must be a positive integer, got None"):
            RerankConfig(**{name: None})
    # numpy's integers (a grid built with numpy) are integers, and the configuration saves them as JSON's
    from_numpy = RerankConfig(max_length=np.int64(96), candidates=np.int32(50), keep=np.int64(20))
    assert json.loads(json.dumps(from_numpy.as_dict())) == RerankConfig(max_length=96, candidates=50, keep=20).as_dict()
    # the first pass's depth: None is the model's shallowest; a deeper first pass does more
    deeper = replace(cascade, prune_depth=0.75)
    assert deeper.label().endswith("keep 20 of d0.75 exits off") and "of d" not in cascade.label()
    assert RerankConfig.from_dict(json.loads(json.dumps(deeper.as_dict()))) == deeper
    assert does_at_least(deeper, cascade) and not does_at_least(cascade, deeper)
    assert does_at_least(replace(deeper, prune_depth=1.0), deeper) and does_at_least(RerankConfig(1.0, 1.0, 128), deeper)
    for bad in (0, 1.5, "deep"):
        with pytest.raises(InputError, match="prune_depth must be in"):
            RerankConfig(keep=20, prune_depth=bad)
    # fewer candidates make a plain configuration cheaper, not a cascade's second pass
    plain = FrontierPoint(RerankConfig(), 0.5, 100.0, 120.0, 20.0)
    pruned = FrontierPoint(cascade, 0.5, 100.0, 120.0, 20.0)
    assert plain.predicted_p95(50) == pytest.approx(70.0) and pruned.predicted_p95(50) == pytest.approx(120.0)


def point(ms: float, ndcg: float, candidates: int = 100, fixed: float = 0.0) -> FrontierPoint:
    return FrontierPoint(RerankConfig(candidates=candidates, max_length=int(8 + ms)), ndcg, ms, ms, fixed)


def test_pareto_frontier_keeps_what_nothing_beats():
    points = [point(10, 0.5), point(20, 0.45), point(30, 0.6), point(25, 0.6), point(40, 0.59)]
    assert [(p.ms_p95, p.ndcg) for p in pareto_frontier(points)] == [(10, 0.5), (25, 0.6)]


def rung(ms: float, ndcg: float, width: float, candidates: int, risk: float | None = None) -> FrontierPoint:
    return FrontierPoint(RerankConfig(width=width, candidates=candidates, exit_risk=risk), ndcg, ms, ms)


def test_the_ladder_climbs_only_by_adding_work_and_covers_the_most_budgets():
    a, b, c, d = rung(10, 0.50, 0.5, 20), rung(20, 0.55, 1.0, 20), rung(30, 0.56, 0.5, 50), rung(40, 0.58, 1.0, 50)
    assert pareto_frontier([a, b, c, d]) == [a, b, c, d]
    # c is narrower than b: after b it is not a rung. a, c, d also nests but buys less below 30 ms.
    assert nested_ladder([d, c, b, a]) == [a, b, d]
    assert nested_ladder([a, c, d]) == [a, c, d]
    assert nested_ladder([a, b, d], min_gain=0.06) == [a, d]
    # exits on after exits off is less work, not more; a ladder may start with exits and switch them off
    exits_then_off = [rung(10, 0.50, 0.5, 20, 0.1), rung(20, 0.55, 0.5, 20), rung(30, 0.56, 1.0, 20, 0.1)]
    assert nested_ladder(exits_then_off) == exits_then_off[:2]
    assert does_at_least(exits_then_off[1].config, exits_then_off[0].config)
    assert not does_at_least(exits_then_off[2].config, exits_then_off[1].config)
    assert nested_ladder([]) == []


def test_the_controller_climbs_the_ladder_when_the_profile_has_one():
    a, b, c, d = rung(10, 0.50, 0.5, 20), rung(20, 0.55, 1.0, 20), rung(30, 0.56, 0.5, 50), rung(40, 0.58, 1.0, 50)
    profile = {"frontier": [p.to_dict() for p in (a, b, c, d)], "ladder": [p.to_dict() for p in (a, b, d)]}
    assert Controller.from_profile(profile).choose(35, candidates=100) == b
    assert "ladder" not in Controller.from_profile(profile).info
    del profile["ladder"]                                # a profile made before ladders: the frontier
    assert Controller.from_profile(profile).choose(35, candidates=100) == c


def test_controller_picks_the_best_point_that_fits_and_the_cheapest_when_none_does():
    controller = Controller([point(10, 0.5), point(50, 0.6), point(200, 0.7)])
    assert controller.choose(100, candidates=100).ndcg == 0.6
    assert controller.choose(200, candidates=100).ndcg == 0.7
    assert controller.choose(5, candidates=100).ndcg == 0.5                     # the deadline will hold it
    assert controller.choose(100, candidates=100, load=2.5).ndcg == 0.5          # a busy machine
    assert controller.choose(110, candidates=50).ndcg == 0.7                     # fewer candidates cost less
    capped = controller.choose(500, candidates=100, max_candidates=20, max_length=16)
    assert capped.config.candidates == 20 and capped.config.max_length == 16
    # a reranker capped to 20 candidates is chosen for by what 20 cost, however many the first stage gave
    assert controller.choose(45, candidates=100, max_candidates=20).ndcg == 0.7
    assert controller.choose(45, candidates=100, max_candidates=20).predicted_p95(100) == pytest.approx(40.0)
    assert controller.cheapest_within(0.7, 0.1).ndcg == 0.6
    with pytest.raises(InputError, match="profile is malformed"):
        Controller.from_profile({"frontier": [{"width": 1.0}]})


def test_when_no_rung_fits_the_one_predicted_cheapest_after_its_correction_is_chosen():
    ran_slow = replace(point(10, 0.4), measured_ms_p50=20.0)     # the profile timed it at twice the model
    ran_fast = replace(point(12, 0.5), measured_ms_p50=6.0)      # and this one at half
    controller = Controller([ran_slow, ran_fast])
    assert controller.choose(5, candidates=100).ndcg == 0.5
    assert controller.choose(13, candidates=100).ndcg == 0.5    # it fits; the other does not


def test_the_cheapest_point_within_a_drop_is_cheapest_after_its_correction():
    ran_slow = replace(point(50, 0.60), measured_ms_p50=100.0)    # first by the cost model, twice as dear timed
    ran_fast = replace(point(60, 0.61), measured_ms_p50=60.0)
    ladder_only = replace(point(55, 0.605), measured_ms_p50=55.0)
    controller = Controller([point(10, 0.5), ran_slow, ran_fast, point(200, 0.62)], ladder=[ladder_only])
    assert controller.cheapest_within(0.62, 0.02) == ladder_only
    assert Controller([point(10, 0.5), ran_slow, ran_fast, point(200, 0.62)]).cheapest_within(0.62, 0.02) == ran_fast
    assert controller.cheapest_within(0.62, 0.0).ndcg == 0.62 and controller.cheapest_within(0.9, 0.01) is None


def test_a_profiled_timing_corrects_the_prediction_of_its_configuration(tiny):
    cheap = point(10, 0.5)
    slow = replace(point(50, 0.6), measured_ms_p50=100.0, measured_ms_p95=130.0)     # ran twice as long
    assert slow.correction == 2.0 and slow.predicted_p95(100) == 100.0 and slow.predicted_p95(50) == 50.0
    assert replace(slow, measured_ms_p50=5000.0).correction == 2.0                  # bounded
    assert FrontierPoint.from_dict(slow.to_dict()).correction == 2.0
    controller = Controller([cheap, slow])
    assert controller.choose(60, candidates=100) == cheap
    assert controller.correction(slow.config) == 2.0 and controller.correction(cheap.config) == 1.0
    assert controller.correction(replace(slow.config, candidates=30)) == 2.0       # capped to fewer
    assert slow.capped_to(50, None).correction == 2.0 and slow.capped_to(50, None).predicted_p95(100) == 50.0
    deeper = replace(slow.config, keep=20, prune_depth=0.75)
    shallower = FrontierPoint(replace(deeper, prune_depth=0.5), 0.6, 50.0, 50.0, 0.0, 25.0, 30.0)
    assert Controller([FrontierPoint(deeper, 0.6, 50.0, 50.0, 0.0, 100.0, 130.0), shallower]).correction(
        shallower.config) == 0.5                                                     # each cascade its own
    # the engine does not read a configuration's known misprediction as load
    work = {"calls": 1, "pairs": 10, "tokens": 500, "steps": 4, "heads": 0, "gflops": 1.0}
    cost_model = CostModel({"calls": 50.0}, {})
    profile = {"frontier": [slow.to_dict()], "cost_model": cost_model.to_dict(), "threads": torch.get_num_threads()}
    reranker = Reranker(tiny, dtype="fp32", profile=profile)
    reranker._observe(slow.config, work, elapsed_ms=100.0)
    assert reranker.load == pytest.approx(1.0)
    reranker._observe(replace(slow.config, max_length=16), work, elapsed_ms=100.0)   # not timed: load
    assert reranker.load > 1.0


# -- the simulation is the engine ---------------------------------------------------------------


@pytest.mark.parametrize("risk, keep", [(None, None), (0.1, None), (None, 12), (0.1, 12)])
def test_simulating_a_trace_gives_the_engines_scores_and_work(tiny, risk, keep):
    with_margins(tiny, 0.3)
    reranker = Reranker(tiny, max_length=64, dtype="fp32", batch_tokens=100, profile={})
    candidates, texts = candidates_and_texts(40, seed=5)
    order = [docid for docid, _ in trec_order(candidates)]
    query = "what is the capital of france"
    config = RerankConfig(1.0, 1.0, 64, 30, risk, keep)
    trace = reranker.trace(query, [texts[d] for d in order], RerankConfig(1.0, 1.0, 64, 40))
    if keep is None:
        values, work = simulate(trace, config, reranker._margins(config), reranker.model, top_k=4, batch_tokens=100)
    else:
        pruner = reranker.pruner(config, 40)
        first_trace = reranker.trace(query, [texts[d] for d in order], pruner)
        values, work = simulate_cascade(first_trace, trace, config, pruner, reranker._margins(config),
                                        reranker.model, top_k=4, batch_tokens=100)
    result = reranker.rerank_config(query, candidates, texts, config, top_k=4, deadline_ms=600_000)
    assert not result.stats.deadline_hit
    got = [result.scores[d] for d in order[:30]]
    assert np.allclose(got, values, atol=1e-5)
    for name in ("calls", "pairs", "tokens", "steps", "heads", "prune_width"):
        assert work.get(name) == result.stats.work.get(name), name
    for name in ("gflops", "prune_gflops"):
        assert math.isclose(work.get(name, 0.0), result.stats.work.get(name, 0.0), rel_tol=1e-9)
    assert ("prune_gflops" in work) == (keep is not None)
    if risk is not None:
        assert result.stats.work["steps"] < len(result.stats.batch_sizes[0]) * tiny.config.num_layers


# -- a whole profile -----------------------------------------------------------------------------


def tiny_dev(count_queries: int = 4, count_docs: int = 30, seed: int = 11):
    rng = random.Random(seed)
    topics = {f"q{i}": " ".join(rng.choice(WORDS) for _ in range(3)) for i in range(count_queries)}
    collection, run, qrels = {}, {}, {}
    for qid in topics:
        run[qid] = {}
        for i in range(count_docs):
            docid = f"{qid}-d{i}"
            collection[docid] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            run[qid][docid] = float(count_docs - i)
        qrels[qid] = {f"{qid}-d{i}": rng.choice([0, 0, 1, 2, 3]) for i in range(count_docs)}
    return run, topics, collection, qrels


def test_profile_times_every_configuration_on_one_query_before_the_next(tiny, monkeypatch):
    """Interleaved, as the bench is: a slow spell of the machine then slows every configuration alike. (The
    timing step itself, on two given points: which points a whole profile times depends on its timings.)"""
    timed = []
    real = Reranker.rerank_config

    def recording(self, query, candidates, texts, config, top_k=None, deadline_ms=None):
        timed.append((query, config))
        return real(self, query, candidates, texts, config, top_k, deadline_ms)

    monkeypatch.setattr(Reranker, "rerank_config", recording)
    run, topics, collection, qrels = tiny_dev()
    reranker = Reranker(tiny, exits=False, dtype="fp32", profile={})
    timing = dev_queries(run, topics, collection, qrels, candidates=10, queries=2)
    small, large = RerankConfig(0.5, 1.0, 16, 10), RerankConfig(1.0, 1.0, 16, 10)
    samples = []
    measured = _time(reranker, timing, [FrontierPoint(small, 0.5, 1.0, 1.2), FrontierPoint(large, 0.6, 2.0, 2.4)],
                     3, samples, progress=False)
    first, second = timing[0].query, timing[1].query
    assert first != second
    # each configuration first reranks the first query untimed (a first call builds its kernels)
    assert timed == [(first, small), (first, large)] * 2 + [(second, small), (second, large)]
    assert {config: len(times) for config, times in measured.items()} == {small: 2, large: 2} and len(samples) == 4


def test_tracing_runs_each_configuration_once_untimed_first(tiny, monkeypatch):
    """A configuration's first call builds its kernels: timed, it would be an outlier the cost model fits."""
    traced = []
    real = Reranker.trace

    def recording(self, query, texts, config):
        traced.append((query, config.width))
        return real(self, query, texts, config)

    monkeypatch.setattr(Reranker, "trace", recording)
    run, topics, collection, qrels = tiny_dev()
    dev = dev_queries(run, topics, collection, qrels, candidates=10, queries=2)
    traces, samples = _trace(Reranker(tiny, exits=False, dtype="fp32", profile={}), dev,
                             [(0.5, 1.0, 16), (1.0, 1.0, 16)], 10, progress=False)
    first, second = dev[0].query, dev[1].query
    assert traced == [(first, 0.5), (first, 0.5), (second, 0.5), (first, 1.0), (first, 1.0), (second, 1.0)]
    assert len(samples) == 4 and [len(t) for t in traces.values()] == [2, 2]


def test_profile_saves_a_frontier_that_budgeted_reranks_use(tiny, tmp_path):
    directory = tmp_path / "model"
    save_model(tiny, directory)
    model = rankshrink.load_model(directory)
    run, topics, collection, qrels = tiny_dev()
    result = profile(model, run, topics, collection, qrels, widths=[0.5, 1.0], depths=[0.5, 1.0],
                     max_lengths=[16, 48], candidates=[10, 30], exit_risks=[None, 0.1], keeps=[10],
                     prune_depths=[0.5, 1.0], dtype="fp32", time_queries=2, top_k=3, progress=False)
    frontier, ladder = result.profile["frontier"], result.profile["ladder"]
    assert frontier and [p["ms_p95"] for p in frontier] == sorted(p["ms_p95"] for p in frontier)
    assert [p["ndcg@10"] for p in frontier] == sorted(p["ndcg@10"] for p in frontier)
    assert all(p.get("measured_ms_p50") is not None for p in frontier[:1] + ladder[:1])
    rungs = [RerankConfig.from_dict(p) for p in ladder]
    assert rungs and all(does_at_least(upper, lower) for lower, upper in zip(rungs, rungs[1:]))
    # every (width, depth, length, candidates) without exits, and with them where an exit head ranks; the 30
    # candidates also as a cascade keeping 10 after a first pass (the model's smallest width) at each depth
    ranking = [e for e in result.calibration["entries"] if any(m is not None for m in e["margins"].values())]
    assert len(result.points) == (2 ** 4 + 2 * len(ranking)) * 2
    cascades = [p for p in result.points if p["keep"] == 10]
    assert len(cascades) == 2 * (2 ** 3 + len(ranking))
    assert {p["prune_depth"] for p in cascades} == {0.5, 1.0}
    assert all(p["prune_depth"] is None for p in result.points if p["keep"] is None)
    assert result.profile["grid"]["keeps"] == [10] and result.profile["grid"]["prune_depths"] == [0.5, 1.0]
    assert {(e["width"], e["depth"], e["max_length"]) for e in result.calibration["entries"]} == \
        {(w, d, n) for w in (0.5, 1.0) for d in (0.5, 1.0) for n in (16, 48)}
    assert result.profile["reference"]["candidates"] == 30 and result.profile["reference"]["exit_risk"] is None

    save_profile(directory, result)
    manifest = json.loads((directory / "rankshrink.json").read_text())
    assert manifest["metadata"]["profile"]["frontier"] == frontier
    reloaded = rankshrink.load_model(directory)
    reranker = Reranker(reloaded, max_length=48, dtype="fp32")
    assert reranker.controller is not None
    # micro-batches cut as the profile timed them, unless told otherwise
    assert reranker.batch_tokens == result.profile["batch_tokens"] == BATCH_TOKENS
    assert Reranker(reloaded, profile={**result.profile, "batch_tokens": 512}).batch_tokens == 512
    assert Reranker(reloaded, batch_tokens=300, profile={**result.profile, "batch_tokens": 512}).batch_tokens == 300
    assert Reranker(reloaded, profile={}).batch_tokens == BATCH_TOKENS
    candidates, texts = candidates_and_texts(30)
    cheapest = Controller.from_profile(result.profile).rungs[0]
    small = reranker.rerank("cat", candidates, texts, budget_ms=cheapest.ms_p95 / 100)
    large = reranker.rerank("cat", candidates, texts, budget_ms=600_000)
    assert small.stats.config["width"] == cheapest.config.width and small.stats.budget_ms > 0
    best = ladder[-1]
    assert [large.stats.config[k] for k in ("width", "depth", "candidates")] == \
        [best["width"], best["depth"], best["candidates"]]
    assert not large.stats.deadline_hit and large.stats.predicted_ms is not None

    # the configuration fits (1 - headroom) of the budget, the deadline the whole budget
    points = Controller.from_profile(result.profile).rungs
    if len(points) > 1:   # (always, with this seed)
        tight = points[-1].predicted_p95(30) * 1.2
        planned = {headroom: Reranker(reloaded, max_length=48, dtype="fp32", headroom=headroom)
                   .rerank("cat", candidates, texts, budget_ms=tight).stats for headroom in (0.0, 0.4)}
        assert planned[0.0].config["width"] == best["width"] and planned[0.0].config["depth"] == best["depth"]
        assert planned[0.4].predicted_ms <= 0.6 * tight or planned[0.4].config == small.stats.config
        assert planned[0.4].predicted_ms < planned[0.0].predicted_ms
    with pytest.raises(InputError, match="headroom"):
        Reranker(reloaded, headroom=1.0)

    # one very slow call (a stall) does not make later calls refuse their first step
    real_run_layer = reloaded.run_layer
    reloaded.run_layer = lambda *args, **kwargs: (time.sleep(0.2), real_run_layer(*args, **kwargs))[1]
    reranker.rerank("cat", candidates, texts, budget_ms=600_000)
    reloaded.run_layer = real_run_layer
    reranker._load = 1.0                               # the load estimate, adaptive by design, aside
    # a budget far above the profiled cost, below one stalled layer: the first step runs. (Later steps may still
    # stop at the deadline on a busy CPU: the call predicts them from its own first step's speed.)
    after = reranker.rerank("cat", candidates, texts, budget_ms=max(20 * best["ms_p95"], 150.0))
    assert after.stats.batch_sizes and after.stats.scored > 0


def test_profile_scores_its_simulated_runs_a_few_at_a_time_as_all_at_once(tiny, monkeypatch):
    """A large grid's runs are scored in chunks (all at once outgrew 24 GB): the chunks change no score."""
    from rankshrink.rerank import profiling

    run, topics, collection, qrels = tiny_dev()
    config_keys = ("width", "depth", "max_length", "candidates", "exit_risk", "keep", "prune_depth")

    def scores() -> dict[tuple, float]:
        result = profile(tiny, run, topics, collection, qrels, widths=[0.5, 1.0], depths=[1.0], max_lengths=[16],
                         candidates=[10, 30], exit_risks=[None, 0.1], keeps=[10], dtype="fp32", time_queries=0,
                         top_k=3, progress=False)
        return {tuple(point[key] for key in config_keys): point["ndcg@10"] for point in result.points}

    at_once = scores()
    monkeypatch.setattr(profiling, "SIMULATED_RUNS_AT_ONCE", 3)
    assert len(at_once) > 2 * 3 and scores() == at_once


def test_profile_without_qrels_judges_by_agreement_with_the_full_network(tiny):
    """A user's own, unjudged queries: the largest configuration's top 10 stand in for qrels, so it scores
    1 against itself and a configuration that reranks fewer candidates scores what it misses."""
    run, topics, collection, _ = tiny_dev()
    topics["q-unjudged"] = "cat dog"      # every query of the run counts, judged or not
    run["q-unjudged"] = dict(run["q0"])
    result = profile(tiny, run, topics, collection, None, widths=[1.0], depths=[1.0], max_lengths=[16],
                     candidates=[10, 30], exit_risks=[None], keeps=[], dtype="fp32", time_queries=1, top_k=3,
                     progress=False)
    assert result.profile["judged_by"] == "agreement with the full network"
    assert result.profile["queries"] == 5
    assert result.profile["reference"]["ndcg@10"] == pytest.approx(1.0)
    fewer = [p for p in result.points if p["candidates"] == 10]
    assert len(fewer) == 1 and fewer[0]["ndcg@10"] < 1.0

    dev = dev_queries(run, topics, collection, None, candidates=30)
    reranker = Reranker(tiny, exits=False, dtype="fp32", profile={})
    traces = [reranker.trace(q.query, q.texts, RerankConfig(1.0, 1.0, 16, 30)) for q in dev]
    judged = agreement_qrels(dev, traces)
    first = judged[dev[0].qid]
    best = max(range(30), key=lambda i: traces[0].final[i])
    assert len(first) == 10 and sorted(first.values(), reverse=True) == [3, 3, 3, 2, 2, 2, 1, 1, 1, 1]
    assert first[dev[0].docids[best]] == 3


def test_save_profile_needs_a_rankshrink_directory(tiny_dir, tiny, tmp_path):
    from rankshrink.rerank.profiling import ProfileResult

    with pytest.raises(InputError, match="not a rankshrink model directory"):
        save_profile(tiny_dir, ProfileResult({}, {}))
