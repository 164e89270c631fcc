"""The Python search API (``Pipeline``) and end-to-end recipes (``run_recipe``, ``rankshrink run``).

>>> from rankshrink.pipeline import Pipeline
>>> pipeline = Pipeline(index="indexes/dl19-passages", model="models/trec-dl-offline",
...                     collection="../shared/trec-dl/dl19/passages.jsonl")
>>> pipeline.search("what is durable medical equipment", k=10)
"""
from .search import Hit, Pipeline, SearchStats, clean_text

__all__ = ["Hit", "Pipeline", "SearchStats", "clean_text"]
