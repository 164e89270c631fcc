"""``rankshrink profile``: measure on this machine what every configuration costs and what nDCG@10 it buys on
dev data, calibrate the early exits, and keep the Pareto frontier and the budget ladder with the model.

How, without running every configuration on every query:

1. **Trace** each (width, depth, max length) once on the dev queries: every candidate through every layer,
   every exit head's score recorded, each query timed (these are the first timings of the cost model).
2. **Calibrate** the exit margins of each (width, depth, max length) from its traces (``calibration.py``).
3. **Simulate** every number of candidates × exit risk × cascade (candidates kept after the pruner's pass)
   from the traces: the engine's own exit rule, micro-batch packing and cascade replayed on the recorded
   scores give each query's ranking (→ nDCG@10 against the dev qrels) and the work it would do (→ latency,
   through the cost model fitted to step 1's timings). Without qrels (a user's own, unjudged queries), the
   judgments are the full network's own top 10 (``agreement_qrels``): quality is agreement with it.
4. Keep the **frontier** and the **ladder** (``budget.py``), then **time them for real**: each of their
   configurations reranks dev queries through the engine; the cost model is refitted on all timings and
   both recomputed. The controller corrects each timed configuration's prediction by its own timing
   (``FrontierPoint.correction``).

Dev data must not be the test set: calibrate and profile on TREC DL 2021, quote numbers on DL 2019.

>>> result = profile(model, read_run(".../dl21/runs/bm25.top100.trec"), read_topics(".../dl21/topics.tsv"),
...                  open_collection(".../dl21/passages.jsonl"), read_qrels(".../dl21/qrels.txt"))  # doctest: +SKIP
>>> save_profile("models/trec-dl", result)                                                # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Qrels, Run, Topics, atomic_write, trec_order
from ..errors import InputError, check_integer
from .budget import CostModel, FrontierPoint, RerankConfig, nested_ladder, pareto_frontier
from .calibration import DEFAULT_TOP_K, LEVELS, calibrate_margins, leaving
from .engine import (BATCH_TOKENS, MAX_PADDING, Reranker, Trace, assemble, batch_length, cascade_values,
                     cascade_work, first_pass_order, layer_gflops, pack, regroup)

# 96: the offline recipe's training length. On the 53 judged dl21 queries the full network ranks as well at 96
# tokens as at 256 (0.5396 against 0.5408) in 0.9 of the time. 80 and the exit risk 0.2 (stop 32): steps between
# the frontier's neighbours that dev's best within a point of the full network came to use (eval/README.md).
DEFAULT_MAX_LENGTHS = (64, 80, 96, 128, 256)
TIMING_ROUNDS = 4
# Steps of 10 from 30 to 80 (stop 33): with 50 and then 100, dev's best within a point had to rerank all 100; with
# 60 it reranks 60 in 0.82 of the time (dl19, w0.75 L80 exits 0.2), since exits save less on the top 60.
DEFAULT_CANDIDATES = (10, 20, 30, 40, 50, 60, 70, 80, 100)
DEFAULT_EXIT_RISKS = (None, 0.01, 0.03, 0.1, 0.2, 0.3)
# Cascades profiled: the pruner's best this many candidates go on (for every larger number of candidates).
# The pruner's depth is profiled too: on the 53 judged dl21 queries a first pass at depth 0.75 instead of 0.5
# lifted w1 d1 L128 K100 keep 20 exits 0.3 from 0.5053 to 0.5233 for ~20% more time (eval/README.md).
DEFAULT_KEEPS = (10, 20, 30)
# exits=True runs at the largest risk that costs the full network at most this much dev nDCG@10.
DEFAULT_RISK_TOLERANCE = 0.005
# Simulated runs are scored and dropped this many at a time: all of an 18,000-configuration grid's runs at once
# (100 scores per dev query each) outgrew 24 GB.
SIMULATED_RUNS_AT_ONCE = 500
# A dearer frontier (or ladder) configuration must gain more dev nDCG@10 than this over the cheaper one.
FRONTIER_MIN_GAIN = 0.002
# Without qrels, the full network's top 10 stand in for judgments: grade 3 for its ranks 1-3, 2 for 4-6, 1 for
# 7-10. Bands, not one grade per rank, so that a swap of neighbours costs little, as with real judgments.
AGREEMENT_GRADES = (3, 3, 3, 2, 2, 2, 1, 1, 1, 1)


@dataclass
class ProfileResult:
    """What ``profile`` found: ``calibration`` and ``profile`` (saved in the model's metadata under those
    keys) and ``points``, every simulated configuration (for plots; not saved with the model)."""

    calibration: dict[str, Any]
    profile: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _DevQuery:
    qid: str
    query: str
    docids: list[str]          # first-stage order, as many as the largest candidates setting
    all_docids: list[str]      # every candidate of the run, first-stage order
    texts: list[str]


def dev_queries(run: Run, topics: Topics, collection: Any, qrels: Qrels | None, candidates: int,
                queries: int | None = None) -> list[_DevQuery]:
    """The judged queries of ``run`` (every query in the topics when ``qrels`` is None), sorted by qid;
    ``queries`` of them, evenly spread, when given."""
    qids = sorted(qid for qid in run if (qrels is None or qid in qrels) and qid in topics)
    if not qids:
        raise InputError("no query of the run is in the topics: nothing to profile on" if qrels is None else
                         "no query of the run is both judged (in the qrels) and in the topics: nothing to profile on")
    if queries is not None and queries < len(qids):
        step = len(qids) / queries
        qids = [qids[int(i * step)] for i in range(queries)]
    result = []
    for qid in qids:
        ordered = [docid for docid, _ in trec_order(run[qid])]
        top = ordered[:candidates]
        texts = collection.texts(top) if hasattr(collection, "texts") else [collection[d] for d in top]
        result.append(_DevQuery(qid, topics[qid], top, ordered, texts))
    return result


def simulate(trace: Trace, config: RerankConfig, margins: Mapping[int, float] | None, model, top_k: int,
             batch_tokens: int = BATCH_TOKENS, max_padding: float = MAX_PADDING,
             flops_cache: dict | None = None) -> tuple[list[float], dict[str, float]]:
    """Replay the engine on a trace (budget mode: heads after every exit layer): each reranked candidate's
    score (NaN: none) and the work counts the cost model reads."""
    count = min(config.candidates, len(trace.lengths))
    lengths = trace.lengths[:count]
    layers = model.layers_for(config.depth)
    values = torch.full((count,), math.nan)
    work = {"calls": 1, "pairs": count, "tokens": sum(lengths), "steps": 0, "heads": 0, "gflops": 0.0}
    if count == 0:
        return [], work
    cache = flops_cache if flops_cache is not None else {}
    groups = pack(lengths, None, batch_tokens, max_padding)
    for position, layer in enumerate(layers):
        last = position == len(layers) - 1
        head = last or model.has_exit(layer)
        first_token_only = last and model.scores_from_first_token(layer)
        for group in groups:
            length = batch_length(group, lengths, model)
            key = (config.width, length, first_token_only)
            if key not in cache:
                cache[key] = layer_gflops(model, config.width, length, 1, first_token_only)
            work["steps"] += 1
            work["gflops"] += cache[key] * len(group)
        running = [p for group in groups for p in group]
        if head:
            source = trace.final if last else trace.layer_scores[layer]
            index = torch.tensor(running)
            values[index] = torch.from_numpy(source[:count]).float()[index]
            work["heads"] += len(running)
        if last:
            break
        if margins and layer in margins:
            leave = leaving(values[torch.tensor(running)], top_k, margins[layer])
            if bool(leave.any()):
                gone = {p for p, out in zip(running, leave.tolist()) if out}
                groups = regroup([[p for p in group if p not in gone] for group in groups], lengths, batch_tokens,
                                 max_padding)
    return values.tolist(), work


def simulate_cascade(first_trace: Trace, trace: Trace, config: RerankConfig, pruner: RerankConfig,
                     margins: Mapping[int, float] | None, model, top_k: int, batch_tokens: int = BATCH_TOKENS,
                     max_padding: float = MAX_PADDING, flops_cache: dict | None = None
                     ) -> tuple[list[float], dict[str, float]]:
    """``simulate`` for a cascade (``config.keep``): the pruner's trace chooses the candidates that
    ``config``'s trace then replays."""
    count = min(config.candidates, len(trace.lengths))
    first, first_work = simulate(first_trace, replace(pruner, candidates=count), None, model, top_k, batch_tokens,
                                 max_padding, flops_cache)
    order = first_pass_order(first)
    kept = order[:config.keep]
    index = np.asarray(kept, dtype=np.int64)
    chosen = Trace({layer: scores[index] for layer, scores in trace.layer_scores.items()}, trace.final[index],
                   [trace.lengths[p] for p in kept], trace.stats)
    second, second_work = simulate(chosen, replace(config, candidates=len(kept), keep=None, prune_depth=None), margins,
                                   model, top_k, batch_tokens, max_padding, flops_cache)
    return cascade_values(count, order, second), cascade_work(first_work, second_work, pruner.width)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def profile(model, run: Run, topics: Topics, collection: Any, qrels: Qrels | None, *,
            widths: Sequence[float] | None = None, depths: Sequence[float] | None = None,
            max_lengths: Sequence[int] = DEFAULT_MAX_LENGTHS, candidates: Sequence[int] = DEFAULT_CANDIDATES,
            exit_risks: Sequence[float | None] = DEFAULT_EXIT_RISKS, keeps: Sequence[int] = DEFAULT_KEEPS,
            prune_depths: Sequence[float] | None = None, dtype: str = "auto",
            threads: int | None = None, queries: int | None = None, time_queries: int = 20,
            top_k: int = DEFAULT_TOP_K, batch_tokens: int = BATCH_TOKENS, progress: bool = True,
            dev_name: str = "dev") -> ProfileResult:
    """Calibrate exits and profile every (width × depth × max length × candidates × exit risk), each also as
    a cascade keeping each of ``keeps`` smaller than its candidates (none: ``keeps=()``) after a first pass
    at each of ``prune_depths`` (default: the model's depths but its deepest), on dev data.

    ``model``: a loaded ``DynamicCrossEncoder`` (its metadata gains the calibration in memory). ``qrels``: the
    dev judgments; None: the largest configuration's own top 10 judge (``agreement_qrels``), so any queries
    will do. ``queries``: profile on this many dev queries (default: all judged ones, or all); ``time_queries``:
    how many of them time each frontier and ladder configuration for real. Returns a ``ProfileResult``;
    ``save_profile`` stores it with the model."""
    for name, value in (("queries", queries), ("top_k", top_k), ("threads", threads), ("batch_tokens", batch_tokens)):
        check_integer(name, value)
    check_integer("time_queries", time_queries, least=0)
    widths = sorted(set(float(w) for w in (widths or model.config.widths)))
    depths = sorted(set(float(d) for d in (depths or model.config.depths)))
    max_lengths = sorted(set(int(n) for n in max_lengths))
    candidates = sorted(set(int(k) for k in candidates))
    risks = sorted(set(exit_risks), key=lambda r: -1.0 if r is None else r)
    keeps = sorted(set(int(k) for k in keeps))
    limit = model.config.max_position_embeddings
    if max_lengths[-1] > limit:
        raise InputError(f"max length {max_lengths[-1]} is longer than the model's {limit} positions")
    for k in candidates:
        RerankConfig(candidates=k)
    for risk in risks:
        if risk is not None:
            RerankConfig(exit_risk=risk)
    for keep in keeps:
        RerankConfig(keep=keep)
    started = time.time()
    machine = _machine()
    reranker = Reranker(model, exits=False, dtype=dtype, threads=threads, batch_tokens=batch_tokens, profile={})
    dev = dev_queries(run, topics, collection, qrels, candidates[-1], queries)
    bases = [(w, d, n) for w in widths for d in depths for n in max_lengths]
    model_depths = sorted(set(float(d) for d in model.config.depths))
    prune_depths = sorted(set(float(d) for d in prune_depths)) if prune_depths is not None else \
        (model_depths[:-1] or model_depths)
    for prune_depth in prune_depths:
        RerankConfig(keep=1, prune_depth=prune_depth)
    grid = [RerankConfig(w, d, n, k, risk, keep, prune_depth)
            for (w, d, n) in bases for k in candidates for risk in risks
            for keep in [None] + [keep for keep in keeps if keep < k]
            for prune_depth in ([None] if keep is None else prune_depths)]
    pruners = {_base(reranker.pruner(config, config.candidates)) for config in grid if config.keep is not None}

    traces, samples = _trace(reranker, dev, bases + sorted(pruners - set(bases)), candidates[-1], progress)
    calibration = {"top_k": top_k, "levels": list(LEVELS), "dev": dev_name, "queries": len(dev),
                   "dtype": "bf16" if reranker.dtype == torch.bfloat16 else "fp32", "default_risk": None,
                   "entries": [{"width": w, "depth": d, "max_length": n,
                                "margins": calibrate_margins([t.layer_scores for t in traced],
                                                             [t.final for t in traced], top_k)}
                               for (w, d, n), traced in traces.items() if (w, d, n) in bases]}
    model.metadata["calibration"] = reranker.calibration = calibration
    reference_base = (widths[-1], depths[-1], max_lengths[-1])
    dev_qrels = agreement_qrels(dev, traces[reference_base]) if qrels is None else {q.qid: qrels[q.qid] for q in dev}
    works, ndcg = _simulate(reranker, dev, traces, grid, dev_qrels, top_k, progress)

    def points_with(cost_model: CostModel) -> dict[RerankConfig, FrontierPoint]:
        points = {}
        for config, query_works in works.items():
            predicted = [cost_model.predict(work, config.width) for work in query_works]
            points[config] = FrontierPoint(config, ndcg[config], _percentile(predicted, 50),
                                           _percentile(predicted, 95), cost_model.coefficients.get("calls", 0.0))
        return points

    timing = dev[:time_queries] if time_queries else []
    measured: dict[RerankConfig, list[float]] = {}
    for round_ in range(TIMING_ROUNDS + 1):
        # Real timings refit the cost model, which can move new configurations onto the frontier: time those too.
        cost_model = CostModel.fit(samples)
        points = points_with(cost_model)
        for config, times in measured.items():
            points[config] = replace(points[config], measured_ms_p50=_percentile(times, 50),
                                     measured_ms_p95=_percentile(times, 95))
        frontier = pareto_frontier(points.values(), FRONTIER_MIN_GAIN)
        ladder = nested_ladder(points.values(), FRONTIER_MIN_GAIN)
        untimed = list({point.config: point for point in frontier + ladder
                        if point.config not in measured}.values())
        if not timing or not untimed or round_ == TIMING_ROUNDS:
            break
        measured.update(_time(reranker, timing, untimed, top_k, samples, progress))

    full = RerankConfig(widths[-1], depths[-1], max_lengths[-1], candidates[-1], None)
    calibration["default_risk"] = _default_risk(ndcg, full, risks)
    reference = points.get(full)
    profile_data = {
        "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1), "machine": machine,
        "dtype": calibration["dtype"], "threads": torch.get_num_threads(), "batch_tokens": batch_tokens,
        "top_k": top_k, "dev": dev_name, "queries": len(dev), "timed_queries": len(timing),
        "judged_by": "qrels" if qrels is not None else "agreement with the full network",
        "grid": {"widths": widths, "depths": depths, "max_lengths": max_lengths, "candidates": candidates,
                 "exit_risks": risks, "keeps": keeps, "prune_depths": prune_depths},
        "cost_model": cost_model.to_dict(),
        "reference": None if reference is None else reference.to_dict(),
        "frontier": [point.to_dict() for point in frontier],
        "ladder": [point.to_dict() for point in ladder],
    }
    return ProfileResult(calibration, profile_data, [point.to_dict() for point in points.values()])


def agreement_qrels(dev: list[_DevQuery], reference: list[Trace]) -> Qrels:
    """Judgments without qrels: on each dev query, the reference's (the full network's) top 10 graded by
    ``AGREEMENT_GRADES``; nDCG@10 against them measures how well a configuration agrees with it."""
    judged: Qrels = {}
    for query, trace in zip(dev, reference):
        # trec_eval's order (ties, common in bf16, by docid), so that the reference scores 1 against itself
        ranked = trec_order(assemble(query.docids, [float(value) for value in trace.final]))
        judged[query.qid] = {docid: grade for (docid, _), grade in zip(ranked, AGREEMENT_GRADES)}
    return judged


def _trace(reranker: Reranker, dev: list[_DevQuery], bases: list[tuple[float, float, int]], candidates: int,
           progress: bool) -> tuple[dict[tuple[float, float, int], list[Trace]], list[tuple[dict, float, float]]]:
    """Step 1: every (width, depth, max length) on every dev query, timed (the cost model's first samples).
    Each first traces the first query once untimed: a first call pays oneDNN's kernel creation for its batch
    shapes, and a cost model fitted on relative error reads such an outlier as much as the rest together."""
    from tqdm.auto import tqdm

    traces: dict[tuple[float, float, int], list[Trace]] = {}
    samples: list[tuple[dict, float, float]] = []
    with tqdm(total=len(bases) * len(dev), desc="tracing", unit="query", disable=not progress,
              dynamic_ncols=True) as bar:
        for w, d, n in bases:
            config = RerankConfig(w, d, n, candidates)
            reranker.trace(dev[0].query, dev[0].texts, config)
            traces[(w, d, n)] = []
            for query in dev:
                trace = reranker.trace(query.query, query.texts, config)
                traces[(w, d, n)].append(trace)
                samples.append((trace.stats.work, w, trace.stats.latency_ms))
                bar.update()
    return traces, samples


def _simulate(reranker: Reranker, dev: list[_DevQuery], traces: Mapping[tuple[float, float, int], list[Trace]],
              grid: list[RerankConfig], dev_qrels: Qrels, top_k: int, progress: bool
              ) -> tuple[dict[RerankConfig, list[dict]], dict[RerankConfig, float]]:
    """Step 3: each configuration's work per dev query and its dev nDCG@10, replayed from the traces."""
    from tqdm.auto import tqdm

    from ..metrics import evaluate

    runs: dict[RerankConfig, Run] = {}
    works: dict[RerankConfig, list[dict]] = {}
    ndcg: dict[RerankConfig, float] = {}
    flops_cache: dict = {}

    def score_runs() -> None:
        names = {config: f"c{i}" for i, config in enumerate(runs)}
        evaluation = evaluate(dev_qrels, {names[config]: run for config, run in runs.items()}, ["ndcg@10"])
        ndcg.update({config: evaluation.scores[names[config]]["ndcg@10"] for config in runs})
        runs.clear()

    for config in tqdm(grid, desc="simulating", unit="config", disable=not progress, dynamic_ncols=True):
        margins = reranker._margins(config)
        if config.exit_risk is not None and not margins:
            continue  # no exit layer runs at this depth, or nothing calibrated: the same as exits off
        if len(runs) == SIMULATED_RUNS_AT_ONCE:
            score_runs()
        runs[config], works[config] = {}, []
        pruner = reranker.pruner(config, config.candidates) if config.keep is not None else None
        for position, (query, trace) in enumerate(zip(dev, traces[_base(config)])):
            if config.cascades(len(trace.lengths)):
                values, work = simulate_cascade(traces[_base(pruner)][position], trace, config, pruner, margins,
                                                reranker.model, top_k, reranker.batch_tokens, reranker.max_padding,
                                                flops_cache)
            else:
                values, work = simulate(trace, config, margins, reranker.model, top_k, reranker.batch_tokens,
                                        reranker.max_padding, flops_cache)
            runs[config][query.qid] = assemble(query.all_docids, values)
            works[config].append(work)
    if runs:
        score_runs()
    return works, ndcg


def _base(config: RerankConfig) -> tuple[float, float, int]:
    """The trace a configuration replays: its (width, depth, max length)."""
    return config.width, config.depth, config.max_length


def _time(reranker: Reranker, timing: list[_DevQuery], points: list[FrontierPoint], top_k: int,
          samples: list[tuple[dict, float, float]], progress: bool) -> dict[RerankConfig, list[float]]:
    """Step 4: the frontier's and ladder's configurations rerank dev queries for real; their timings join
    ``samples``. Query by query, every configuration in turn, so that a slow spell of this machine falls on
    all of them alike rather than on the few timed during it; each configuration first reranks the first query
    once untimed, as ``Reranker.warm_up`` does before a budget is served."""
    from tqdm.auto import tqdm

    measured: dict[RerankConfig, list[float]] = {}
    if not timing:
        return measured
    with tqdm(total=len(points) * len(timing), desc="timing", unit="query", disable=not progress,
              dynamic_ncols=True) as bar:
        for warming, query in [(True, timing[0]), *((False, query) for query in timing)]:
            for point in points:
                far = 10 * point.ms_p95 + 1000   # a deadline that never stops it, so heads run as in budget mode
                result = reranker.rerank_config(query.query, query.docids, query.texts, point.config, top_k,
                                                deadline_ms=far)
                if warming:
                    continue
                measured.setdefault(point.config, []).append(result.stats.latency_ms)
                samples.append((result.stats.work, point.config.width, result.stats.latency_ms))
                bar.update()
    return measured


def _default_risk(ndcg: Mapping[RerankConfig, float], full: RerankConfig, risks: Sequence[float | None]) -> float | None:
    """The largest exit risk that costs the full network at most DEFAULT_RISK_TOLERANCE of dev nDCG@10."""
    if full not in ndcg:
        return None
    chosen = None
    for risk in risks:
        config = replace(full, exit_risk=risk)
        if risk is not None and config in ndcg and ndcg[config] >= ndcg[full] - DEFAULT_RISK_TOLERANCE:
            chosen = risk
    return chosen


def save_profile(directory: str | os.PathLike, result: ProfileResult) -> Path:
    """Store the calibration and profile in a rankshrink model directory's ``rankshrink.json`` (atomically;
    everything else in it is kept)."""
    from ..model.io import MANIFEST

    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{directory}: not a rankshrink model directory (no {MANIFEST}); save the model with "
                         f"rankshrink.model.save_model first, or give --output")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{manifest_path}:{error.lineno}: not valid JSON ({error.msg})") from None
    metadata = manifest.get("metadata") or {}
    metadata["calibration"] = result.calibration
    metadata["profile"] = result.profile
    manifest["metadata"] = metadata
    with atomic_write(manifest_path) as out:
        out.write(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest_path


def frontier_table(profile_data: Mapping[str, Any], key: str = "frontier") -> str:
    """The frontier (or, with ``key="ladder"``, the ladder) as a Markdown table."""
    lines = ["| width | depth | max length | candidates | kept | exit risk | dev nDCG@10 | predicted ms p50 | p95 | "
             "measured ms p50 | p95 |", "| " + " | ".join(["---"] * 11) + " |"]
    for point in profile_data.get(key) or []:
        measured = (f"{point['measured_ms_p50']:.1f} | {point['measured_ms_p95']:.1f}"
                    if point.get("measured_ms_p50") is not None else "– | –")
        risk = "off" if point["exit_risk"] is None else f"{point['exit_risk']:g}"
        kept = "all" if point.get("keep") is None else point["keep"]
        if point.get("prune_depth") is not None:   # only a cascade has one
            kept = f"{kept} of d{point['prune_depth']:g}"
        lines.append(f"| {point['width']:g} | {point['depth']:g} | {point['max_length']} | {point['candidates']} | "
                     f"{kept} | {risk} | "
                     f"{point['ndcg@10']:.4f} | {point['ms_p50']:.1f} | {point['ms_p95']:.1f} | {measured} |")
    return "\n".join(lines)
