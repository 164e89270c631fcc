"""Pseudo-queries: short spans cut from a collection's own passages, extra queries to distil on.

TinyBERT and DynaBERT distil on augmented data; a reranker's data is queries. With ~100 judged queries the
student learns the teacher's ranking of those queries' candidates and little else. A few hundred spans cut
from passages, their BM25 candidates ranked by the teacher, widen what it imitates; no labels are needed.

A span is 3–8 words of one passage, lower-cased without punctuation, starting and ending with a content word
(not a stopword or a number) and mostly content words, so that it reads like a keyword query ("two factor
theory of motivation"). Passages in ``exclude`` (the held-out queries' candidates) are never a source: model
selection would otherwise rank passages the student was trained to find.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable

from ..data import Passage

WORD = re.compile(r"[a-z0-9']+")
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being it its this that "
    "these those i you he she we they me him her us them my your his our their not no do does did have has had "
    "can could will would should may might must so than then there here what which who whom when where why how "
    "all any some such more most very just also into about over after before up down out off again further "
    "once only own same too s t".split())
# Passages kept to cut spans from, per span wanted (a reservoir sample: a large collection is streamed once).
SOURCES_PER_QUERY = 4


def pseudo_queries(passages: Iterable[Passage], count: int, seed: int | str, *, min_words: int = 3,
                   max_words: int = 8, exclude: Iterable[str] = (), prefix: str = "pseudo-") -> dict[str, str]:
    """``count`` queries {qid: span} (qids ``prefix0``, ``prefix1``, ...), each from a different passage; the same
    ``seed`` and passages give the same queries. Fewer when the collection has too few long-enough passages."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    rng = random.Random(seed)
    excluded = set(exclude)
    reservoir: list[list[str]] = []
    size = count * SOURCES_PER_QUERY
    seen = 0
    for passage in passages:
        if passage.docid in excluded:
            continue
        words = WORD.findall(passage.text.lower())
        if len(words) < max_words + 2:
            continue
        seen += 1
        if len(reservoir) < size:
            reservoir.append(words)
        elif (slot := rng.randrange(seen)) < size:
            reservoir[slot] = words
    rng.shuffle(reservoir)
    queries: dict[str, str] = {}
    for words in reservoir:
        if len(queries) == count:
            break
        span = _span(words, rng, min_words, max_words)
        if span is not None:
            queries[f"{prefix}{len(queries)}"] = span
    return queries


def _span(words: list[str], rng: random.Random, min_words: int, max_words: int, tries: int = 8) -> str | None:
    for _ in range(tries):
        size = rng.randint(min_words, max_words)
        start = rng.randrange(len(words) - size + 1)
        span = words[start:start + size]
        content = [word not in STOPWORDS and not word.isdigit() for word in span]
        if content[0] and content[-1] and sum(content) >= max(min(2, size), 0.6 * size):
            return " ".join(span)
    return None
