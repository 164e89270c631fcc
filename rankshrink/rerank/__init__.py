"""Budgeted reranking: the engine (``engine.py``: early exit, bf16, length-sorted micro-batches, a deadline),
exit calibration (``calibration.py``), the cost model, frontier and controller (``budget.py``), the profile
that measures them (``profiling.py``) and the benchmark against sentence-transformers (``bench.py``).

>>> from rankshrink.rerank import Reranker
>>> reranker = Reranker("models/trec-dl")                                             # doctest: +SKIP
>>> result = reranker.rerank("what is a cat", {"d1": 2.0, "d2": 1.0},
...                          ["Paris is in France.", "A cat is a small feline."], budget_ms=100)  # doctest: +SKIP
>>> result.ranking(), result.stats.latency_ms                                         # doctest: +SKIP
"""
from .budget import Controller, CostModel, FrontierPoint, RerankConfig
from .engine import QueryStats, Reranker, RerankResult, Trace

__all__ = ["Controller", "CostModel", "FrontierPoint", "QueryStats", "RerankConfig", "RerankResult", "Reranker",
           "Trace"]
