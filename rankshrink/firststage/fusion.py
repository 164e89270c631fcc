"""Fusing first-stage runs through ranx: reciprocal rank fusion and normalised score sum, with weights.

* ``rrf``: each document scores sum_i w_i / (rrf_k + rank_i), rank_i its rank in run i (missing: no term).
  Ranks follow trec_eval's order (score descending, ties by docid descending), so tied scores fuse
  the same way every time.
* ``sum``: each run's scores are min-max normalised per query to [0, 1], then summed with weights
  (a document missing from a run gets 0 from it), as ranx's ``wsum`` does.

``HybridSearcher`` runs BM25 and dense search to ``depth`` and fuses them; it has the same
``search`` / ``batch_search`` shape as ``BM25`` and ``DenseSearcher``.

>>> hybrid = HybridSearcher(BM25("indexes/dl19-passages"), DenseSearcher("indexes/dl19-minilm"))
>>> hybrid.batch_search({"q1": "what is durable medical equipment"}, k=100)
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Protocol

from ..data import Run, trec_order
from ..errors import InputError, check_integer, check_number

FusionMethod = Literal["rrf", "sum"]
DEFAULT_RRF_K = 60


def fuse(runs: Sequence[Mapping[str, Mapping[str, float]]], method: FusionMethod = "rrf",
         weights: Sequence[float] | None = None, rrf_k: float = DEFAULT_RRF_K, k: int | None = None) -> Run:
    """Fuse runs query by query; each query of the result lists its documents best first (cut to ``k``).

    >>> fuse([bm25_run, dense_run], method="sum", weights=(0.3, 0.7), k=1000)
    """
    if len(runs) < 2:
        raise InputError(f"fusion needs at least two runs, got {len(runs)}")
    if method not in ("rrf", "sum"):
        raise InputError(f"fusion method must be rrf or sum, got {method!r}")
    weights = [1.0] * len(runs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(runs):
        raise InputError(f"{len(weights)} weights for {len(runs)} runs")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise InputError(f"weights must be >= 0 and not all 0, got {weights}")
    if method == "rrf":
        check_number("rrf_k", rrf_k, lambda value: 0 < value < math.inf, "a number > 0", optional=False)
    if k is not None:
        check_integer("k", k, optional=False)
    qids = list(dict.fromkeys(qid for run in runs for qid in run))
    # ranx wants every run to hold every query and at least one document per query
    fusable = [qid for qid in qids if any(run.get(qid) for run in runs)]
    fused: Run = {qid: {} for qid in qids}
    if fusable:
        fused.update(_ranx_fuse([{qid: dict(run.get(qid, {})) for qid in fusable} for run in runs],
                                method, weights, rrf_k))
    return {qid: dict(trec_order(fused[qid])[:k]) if k else dict(trec_order(fused[qid])) for qid in qids}


def _ranx_fuse(runs: list[Run], method: FusionMethod, weights: list[float], rrf_k: float) -> Run:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="unsafe cast from uint64 to int64")  # inside ranx's numba code
        return _ranx_fuse_quietly(runs, method, weights, rrf_k)


def _ranx_fuse_quietly(runs: list[Run], method: FusionMethod, weights: list[float], rrf_k: float) -> Run:
    from ranx import Run as RanxRun
    from ranx.fusion import rrf, wsum
    from ranx.normalization import min_max_norm

    if method == "rrf":
        # ranx ranks documents by sorting scores, in no fixed order among ties: hand it 1, 2, 3...
        # descending in trec_eval's order instead, so the ranks are trec_eval's.
        ranked = [{qid: {docid: float(-rank) for rank, (docid, _) in enumerate(trec_order(docs), start=1)}
                   for qid, docs in run.items()} for run in runs]
        parts = [rrf([_ranx_run(run, RanxRun)], k=rrf_k) for run in ranked]
    else:
        parts = []
        for run in runs:
            normalised = min_max_norm(_ranx_run(run, RanxRun)).to_dict()
            for qid, docs in run.items():
                if docs and len(set(docs.values())) == 1:   # ranx maps a lone or all-tied list to 0, not to its best
                    normalised[qid] = dict.fromkeys(docs, 1.0)
            parts.append(_ranx_run(normalised, RanxRun))
    fused = wsum(parts, weights=weights).to_dict()
    for docs in fused.values():
        docs.pop("", None)
    return fused


def _ranx_run(run: Run, ranx_run_class):
    """A ranx Run; queries without documents get a placeholder that scores nothing (ranx needs one)."""
    return ranx_run_class({qid: docs if docs else {"": 0.0} for qid, docs in run.items()})


class FirstStage(Protocol):
    def search(self, query: str, k: int = 1000) -> dict[str, float]: ...
    def batch_search(self, topics: Mapping[str, str], k: int = 1000, threads: int = 2) -> Run: ...
    def doc(self, docid: str) -> str: ...


class HybridSearcher:
    """BM25 and dense retrieval fused: each retrieves ``depth`` passages per query, ``fuse`` combines them.

    ``weights`` are (BM25, dense). Passage texts come from the BM25 index (``doc``, ``texts``).

    >>> hybrid = HybridSearcher(BM25("indexes/dl19-passages"), DenseSearcher("indexes/dl19-minilm"),
    ...                         method="rrf", weights=(1.0, 1.0))
    >>> hybrid.search("what is durable medical equipment", k=10)
    """

    def __init__(self, bm25: FirstStage, dense: FirstStage, *, method: FusionMethod = "rrf",
                 weights: Sequence[float] = (1.0, 1.0), rrf_k: float = DEFAULT_RRF_K, depth: int = 1000):
        check_integer("depth", depth, optional=False)
        fuse([{"q": {"d": 1.0}}, {"q": {"d": 1.0}}], method, weights, rrf_k)  # checks the options now
        self.bm25, self.dense = bm25, dense
        self.method, self.weights, self.rrf_k, self.depth = method, tuple(weights), rrf_k, depth

    def __repr__(self) -> str:
        return (f"HybridSearcher({self.bm25!r}, {self.dense!r}, method={self.method!r}, weights={self.weights}, "
                f"depth={self.depth})")

    def search(self, query: str, k: int = 1000) -> dict[str, float]:
        return self.batch_search({"q": query}, k=k, threads=1)["q"]

    def batch_search(self, topics: Mapping[str, str], k: int = 1000, threads: int = 2) -> Run:
        check_integer("k", k, optional=False)
        depth = max(self.depth, k)
        runs = [self.bm25.batch_search(topics, k=depth, threads=threads),
                self.dense.batch_search(topics, k=depth, threads=threads)]
        return fuse(runs, self.method, self.weights, self.rrf_k, k=k)

    def doc(self, docid: str) -> str:
        return self.bm25.doc(docid)

    def texts(self, docids: Iterable[str]) -> list[str]:
        return [self.doc(docid) for docid in docids]
