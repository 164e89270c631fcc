"""A tiny world for pipeline, recipe and reliability tests: 40 passages over the tiny model's vocabulary, their
Lucene index (built once per session), topics, qrels, and a tiny random cross-encoder directory.

Imported by test_pipeline*.py, test_recipe*.py and test_reliability*.py."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from test_model_fixtures import PASSAGES, QUERIES, WORDS, tiny_hf_cross_encoder

TOPICS = {f"q{i}": query for i, query in enumerate(QUERIES)}


def tiny_passages(count: int = 40, seed: int = 7) -> dict[str, str]:
    """docid -> text: the fixture passages, then random sentences over the tiny vocabulary."""
    rng = random.Random(seed)
    passages = {f"d{i}": text for i, text in enumerate(PASSAGES)}
    while len(passages) < count:
        passages[f"d{len(passages)}"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
    return passages


def write_collection(path: Path, passages: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for docid, text in passages.items():
            out.write(json.dumps({"id": docid, "contents": text}) + "\n")
    return path


def write_topics(path: Path, topics: dict[str, str]) -> Path:
    path.write_text("".join(f"{qid}\t{query}\n" for qid, query in topics.items()), encoding="utf-8")
    return path


def write_qrels(path: Path, passages: dict[str, str]) -> Path:
    """A passage is relevant to a query (grade 1, or 2 for the fixture passage it was written for) when they
    share a content word."""
    stop = {"the", "a", "of", "is", "what", "how", "why", "does", "on"}
    lines = []
    for qid, query in TOPICS.items():
        words = set(query.split()) - stop
        for docid, text in passages.items():
            shared = words & set(text.split())
            lines.append(f"{qid} 0 {docid} {2 if len(shared) > 1 else int(bool(shared))}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


class TinyWorld:
    def __init__(self, root: Path):
        from rankshrink.firststage import build_index

        self.root = root
        self.passages = tiny_passages()
        self.collection = write_collection(root / "passages.jsonl", self.passages)
        self.topics_file = write_topics(root / "topics.tsv", TOPICS)
        self.qrels_file = write_qrels(root / "qrels.txt", self.passages)
        self.index = root / "index"
        build_index(self.collection, self.index, threads=1, progress=False)
        self.model = root / "model"
        tiny_hf_cross_encoder(self.model)


_WORLD: dict[str, TinyWorld] = {}


@pytest.fixture
def tiny_world(tmp_path_factory) -> TinyWorld:
    """Built once per session, whichever module asks first (fixtures imported into several modules would
    otherwise build it once per module)."""
    if "world" not in _WORLD:
        _WORLD["world"] = TinyWorld(tmp_path_factory.mktemp("tiny-world"))
    return _WORLD["world"]
