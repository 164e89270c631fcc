"""rankshrink: a BM25 first stage and a budgeted, width/depth/exit-adaptive BERT reranker.

Heavy parts (torch, the JVM) load on first use, so ``rankshrink eval`` starts fast.
"""
from __future__ import annotations

from .data import (Collection, Qrels, Run, Topics, open_collection, read_qrels, read_run, read_topics,
                   write_run)
from .errors import InputError
from .metrics import evaluate

__version__ = "0.1.0"
__all__ = ["Collection", "InputError", "Qrels", "Run", "Topics", "evaluate", "load_model", "open_collection",
           "read_qrels", "read_run", "read_topics", "write_run"]


def __getattr__(name: str):
    # rankshrink.load_model imports torch on first use only, so `import rankshrink` stays light.
    if name == "load_model":
        from .model import load_model

        return load_model
    raise AttributeError(f"module 'rankshrink' has no attribute {name!r}")
