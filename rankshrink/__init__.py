"""rankshrink: a BM25 first stage and a budgeted, width/depth/exit-adaptive BERT reranker.

Heavy parts (torch, the JVM) load on first use, so ``rankshrink eval`` starts fast.
"""
from __future__ import annotations

from .data import (Collection, Qrels, Run, Topics, open_collection, read_qrels, read_run, read_topics,
                   write_run)
from .errors import InputError
from .metrics import evaluate

__version__ = "0.1.0"
__all__ = ["Collection", "InputError", "Qrels", "Run", "Topics", "evaluate", "open_collection", "read_qrels",
           "read_run", "read_topics", "write_run"]
