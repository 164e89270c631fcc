"""``rankshrink bench``: rankshrink against its peer, sentence-transformers' ``CrossEncoder`` on the same weights,
in one process, interleaved query by query.

The peer is ``CrossEncoder(model_dir, max_length=L)`` — a rankshrink model directory is a plain Hugging Face
cross-encoder, so it loads the same backbone and head — run as its users run it: ``predict`` on the query's
(query, passage) pairs in first-stage order, fp32, ``batch_size=32``, 2 intra-op threads. Both sides get the
same candidates (the first ``candidates`` of the run), texts already in memory; each side's clock covers
tokenization and scoring. Every repeat visits the queries in order; within a query the sides run back to
back, in an order that rotates, so load from other processes falls on both alike. Latency figures are over
all (query, repeat) calls; nDCG@10 is averaged over repeats (a budgeted rerank can differ between repeats).

>>> result = bench("models/trec-dl", run, topics, collection, qrels, arms={"budget 100": Arm(budget_ms=100)})  # doctest: +SKIP
>>> result.summary()["budget 100"]["speedup"]                                                   # doctest: +SKIP
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Qrels, Run, Topics, trec_order
from ..errors import InputError, check_integer
from .budget import RerankConfig
from .engine import Reranker, assemble

PEER = "peer"


@dataclass(frozen=True)
class Arm:
    """One rankshrink setting to time: a fixed ``config``, or a ``budget_ms`` for the controller.
    ``model_exits``: run ``config`` with the model's calibrated default exit risk instead of its own.
    ``threads``: intra-op threads for this arm (None: the bench's ``threads``); ``dtype``: "bf16" or "fp32"
    for this arm (None: the bench's ``dtype``)."""

    config: RerankConfig | None = None
    budget_ms: float | None = None
    model_exits: bool = False
    threads: int | None = None
    dtype: str | None = None

    def __post_init__(self):
        if (self.config is None) == (self.budget_ms is None):
            raise ValueError("an Arm is either a config or a budget_ms")


@dataclass
class BenchResult:
    """Per side (the peer and each arm): every call's latency in ms, per repeat a run; ``stats`` per arm and
    repeat: {qid: QueryStats}."""

    latencies: dict[str, list[float]]
    paired_ratios: dict[str, list[float]]            # arm -> peer ms / arm ms, call by call
    runs: dict[str, list[Run]]
    stats: dict[str, list[dict]] = field(default_factory=dict)
    ndcg: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, Any]]:
        """For each arm: the peer's and its median / p95 ms, the speedup (ratio of medians), the median of
        call-by-call ratios, both nDCG@10 (when qrels were given), deadline hits and configurations used."""
        peer = self.latencies[PEER]
        result = {}
        for arm, times in self.latencies.items():
            if arm == PEER:
                continue
            configs: dict[str, int] = {}
            hits = 0
            for repeat in self.stats.get(arm, []):
                for stats in repeat.values():
                    label = RerankConfig.from_dict(stats.config).label()
                    configs[label] = configs.get(label, 0) + 1
                    hits += bool(stats.deadline_hit)
            values = {
                "peer_ms_median": _median(peer), "peer_ms_p95": _p95(peer),
                "rankshrink_ms_median": _median(times), "rankshrink_ms_p95": _p95(times),
                "speedup": _median(peer) / _median(times) if _median(times) > 0 else None,
                "speedup_paired_median": _median(self.paired_ratios[arm]),
                "peer_ndcg@10": self.ndcg.get(PEER), "rankshrink_ndcg@10": self.ndcg.get(arm),
                "deadline_hits": hits, "calls": len(times), "configs": configs,
            }
            result[arm] = values
        return result


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _p95(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 95)) if values else float("nan")


def load_peer(model_dir: str | os.PathLike, max_length: int):
    """sentence-transformers' CrossEncoder on the model directory's backbone and head (one label)."""
    from sentence_transformers import CrossEncoder

    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise InputError(f"{directory}: the peer needs a Hugging Face model directory (config.json + "
                         f"model.safetensors); a rankshrink model directory is one")
    _require_classifier(directory)
    peer = CrossEncoder(str(directory), device="cpu", max_length=max_length, model_kwargs={"use_safetensors": True})
    peer.model.float()   # transformers loads a bf16 checkpoint as bf16; the peer is fp32 whatever was saved
    if peer.model.config.num_labels != 1:
        raise InputError(f"{directory}: the peer loads {peer.model.config.num_labels} labels; a ranking "
                         f"cross-encoder has one")
    return peer


def _require_classifier(directory: Path) -> None:
    from safetensors import safe_open

    weights = directory / "model.safetensors"
    if not weights.is_file():
        return  # sharded or other layouts: let the peer's loader speak
    with safe_open(str(weights), framework="pt") as handle:
        names = set(handle.keys())
    if not any(name.endswith("classifier.weight") for name in names):
        raise InputError(f"{weights}: no classifier head, so the peer and rankshrink would each score with a "
                         f"different random head; bench a trained cross-encoder (a rankshrink model directory)")


def bench(model_dir: str | os.PathLike, run: Run, topics: Topics, collection: Any, qrels: Qrels | None = None, *,
          arms: Mapping[str, Arm], queries: int | None = None, repeats: int = 3, candidates: int = 100,
          max_length: int = 256, dtype: str = "auto", threads: int | None = None, peer_threads: int = 2,
          peer_batch_size: int = 32, top_k: int | None = None, progress: bool = True) -> BenchResult:
    """Time the peer and each arm on the first ``queries`` queries of ``run`` (all by default), ``repeats``
    times, interleaved. ``threads``: rankshrink's intra-op threads (None: those of the model's profile, else
    the peer's)."""
    from tqdm.auto import tqdm

    from ..metrics import evaluate
    from ..model import load_model

    for name, value in (("repeats", repeats), ("queries", queries), ("threads", threads),
                        ("peer_threads", peer_threads), ("peer_batch_size", peer_batch_size)):
        check_integer(name, value)
    qids = [qid for qid in run if qid in topics]
    missing = [qid for qid in run if qid not in topics]
    if missing:
        raise InputError(f"run query {missing[0]!r} has no topic" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if queries is not None:
        qids = qids[:queries]
    if not qids:
        raise InputError("no query to bench")
    if qrels is not None and not any(qid in qrels for qid in qids):
        raise InputError(f"the qrels judge none of the {len(qids)} benched queries (first: {qids[0]!r})")
    for name, arm in arms.items():
        if arm.config is not None and arm.config.candidates > candidates:
            raise InputError(f"arm {name!r} reranks {arm.config.candidates} candidates, more than the "
                             f"{candidates} the bench gives the peer and every arm")
    peer = load_peer(model_dir, max_length)
    model = load_model(model_dir)
    if threads is None:   # as the model was profiled (its cost model holds for that), else as the peer
        threads = (model.metadata.get("profile") or {}).get("threads") or peer_threads
    reranker = Reranker(model, max_length=max_length, candidates=candidates, exits=False, dtype=dtype)
    # One engine per arm, as one serving process each: an engine's load estimate follows its own calls, and
    # another arm's (a fixed configuration the profile never timed) would move the budget arms' choices.
    engines = {name: Reranker(model, max_length=max_length, candidates=candidates, exits=False,
                              dtype=dtype if arm.dtype is None else arm.dtype) for name, arm in arms.items()}
    inputs = {}
    for qid in qids:
        ordered = [docid for docid, _ in trec_order(run[qid])]
        top = ordered[:candidates]
        texts = collection.texts(top) if hasattr(collection, "texts") else [collection[d] for d in top]
        inputs[qid] = (ordered, top, texts)

    def run_arm(name: str, qid: str, top: list[str], texts: list[str]):
        arm, engine = arms[name], engines[name]
        torch.set_num_threads(arm.threads or threads)
        if arm.config is None:
            return engine.rerank(topics[qid], top, texts, budget_ms=arm.budget_ms, top_k=top_k)
        config = arm.config
        if arm.model_exits:
            config = replace(config, exit_risk=engine.exit_risk_for(True))
        return engine.rerank_config(topics[qid], top, texts, config, top_k)

    # Warm up (first calls pay one-time initialisation), untimed: the peer and every arm on the first query.
    ordered, top, texts = inputs[qids[0]]
    torch.set_num_threads(peer_threads)
    peer.predict([(topics[qids[0]], text) for text in texts], batch_size=peer_batch_size, show_progress_bar=False)
    for name, arm in arms.items():
        run_arm(name, qids[0], top, texts)
        if arm.budget_ms:   # as rerank_run does
            torch.set_num_threads(arm.threads or threads)
            engines[name].warm_up(topics[qids[0]], texts, fixed=False)

    sides = [PEER, *arms]
    latencies: dict[str, list[float]] = {side: [] for side in sides}
    paired: dict[str, list[float]] = {arm: [] for arm in arms}
    runs: dict[str, list[Run]] = {side: [] for side in sides}
    stats: dict[str, list[dict]] = {arm: [] for arm in arms}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tqdm(total=repeats * len(qids), desc="bench", unit="query", disable=not progress,
              dynamic_ncols=True) as bar:
        for repeat in range(repeats):
            for side in sides:
                runs[side].append({})
            for arm in arms:
                stats[arm].append({})
            for index, qid in enumerate(qids):
                ordered, top, texts = inputs[qid]
                shift = (repeat + index) % len(sides)
                timed: dict[str, float] = {}
                for side in sides[shift:] + sides[:shift]:
                    if side == PEER:
                        torch.set_num_threads(peer_threads)
                        started = time.perf_counter()
                        scores = peer.predict([(topics[qid], text) for text in texts], batch_size=peer_batch_size,
                                              show_progress_bar=False)
                        timed[side] = (time.perf_counter() - started) * 1000
                        runs[side][repeat][qid] = assemble(ordered, [float(s) for s in scores])
                    else:
                        result = run_arm(side, qid, top, texts)
                        timed[side] = result.stats.latency_ms
                        scores = result.scores
                        floor = min(scores.values(), default=0.0)
                        full = dict(scores)
                        for position, docid in enumerate(ordered[len(top):], start=1):
                            full[docid] = floor - position
                        runs[side][repeat][qid] = full
                        stats[side][repeat][qid] = result.stats
                for side, ms in timed.items():
                    latencies[side].append(ms)
                for arm in arms:
                    paired[arm].append(timed[PEER] / timed[arm] if timed[arm] > 0 else float("nan"))
                bar.update()
    result = BenchResult(latencies, paired, runs, stats)
    if qrels is not None:
        for side in sides:
            names = {f"{side}#{r}": r for r in range(repeats)}
            evaluation = evaluate({qid: qrels[qid] for qid in qids if qid in qrels},
                                  {name: runs[side][r] for name, r in names.items()}, ["ndcg@10"])
            result.ndcg[side] = float(np.mean([evaluation.scores[name]["ndcg@10"] for name in names]))
    result.info = {
        "queries": len(qids), "repeats": repeats, "candidates": candidates, "max_length": max_length,
        "threads": threads, "peer_threads": peer_threads, "peer_batch_size": peer_batch_size,
        "dtype": "bf16" if reranker.dtype == torch.bfloat16 else "fp32", "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "profile": bool(reranker.controller),
    }
    return result
