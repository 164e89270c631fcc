"""Listwise training data: one group per query — its candidates, their texts, graded labels where judged,
and teacher scores once a teacher has scored them.

Candidates are the union of the first-stage runs given for the query (e.g. BM25, BM25+RM3 and SPLADE
top-100), so the student sees the kinds of passages it will rerank. Each training step samples a list
of ``list_size`` candidates from a group (``sample_list``): the teacher's best, some judged relevant
ones, and the rest at random, so lists hold both hard negatives and easy ones.

>>> groups = build_groups(read_topics("dl21/topics.tsv"), [read_run("dl21/runs/bm25.top100.trec")],
...                       open_collection("dl21/passages.jsonl"), qrels=read_qrels("dl21/qrels.txt"))  # doctest: +SKIP
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..data import Collection, Qrels, Run, Topics, trec_order
from ..errors import InputError


@dataclass
class TrainingGroup:
    qid: str
    query: str
    docids: list[str]
    texts: list[str]
    labels: list[int | None] | None = None  # graded labels; None for unjudged passages or unlabelled data
    teacher: np.ndarray | None = None       # one teacher score per candidate
    source: str = ""                        # which data set it came from (for logs)

    def __len__(self) -> int:
        return len(self.docids)

    @property
    def key(self) -> str:
        """Unique across data sets: ``source/qid``."""
        return f"{self.source}/{self.qid}"

    def graded_labels(self) -> np.ndarray:
        """Labels as floats, unjudged candidates counted 0 (non-relevant), as trec_eval counts them."""
        if self.labels is None:
            raise ValueError(f"query {self.qid} has no labels")
        return np.array([0 if label is None else label for label in self.labels], dtype=np.float32)


def build_groups(topics: Topics, candidate_runs: Sequence[Run], collection: Collection, *,
                 qrels: Qrels | None = None, queries: Iterable[str] | None = None, source: str = "",
                 min_candidates: int = 2) -> list[TrainingGroup]:
    """One group per query of ``queries`` (default: every query some run has), candidates pooled from
    ``candidate_runs`` in first-run-first order. Queries with labels but no relevant candidate still
    count (their lists teach what is not relevant); a query the qrels do not judge has no labels (it learns from
    the teacher alone). ``source``: the data set's name, in the groups and in errors."""
    where = f"data set {source!r}: " if source else ""
    if not candidate_runs:
        raise InputError(f"{where}no candidate runs to build training groups from")
    wanted = list(queries) if queries is not None else sorted({qid for run in candidate_runs for qid in run})
    groups = []
    for qid in wanted:
        if qid not in topics:
            raise InputError(f"{where}query {qid} is in the candidate runs but not in the topics")
        docids = list(dict.fromkeys(docid for run in candidate_runs for docid, _ in trec_order(run.get(qid, {}))))
        if len(docids) < min_candidates:
            continue
        labels = None
        if qrels is not None and qid in qrels:
            labels = [qrels[qid].get(docid) for docid in docids]
        groups.append(TrainingGroup(qid, topics[qid], docids, collection.texts(docids), labels, source=source))
    if not groups:
        raise InputError(f"{where}no training groups: no query has {min_candidates}+ candidates")
    return groups


def split_queries(qids: Sequence[str], held_out: int, seed: int, where: str = "") -> tuple[list[str], list[str]]:
    """(train, held-out) query ids: a seeded random choice of ``held_out`` queries for model selection."""
    qids = sorted(qids)
    if not 0 <= held_out < len(qids):
        raise InputError(f"{where}cannot hold out {held_out} of {len(qids)} queries")
    held = set(random.Random(seed).sample(qids, held_out))
    return [qid for qid in qids if qid not in held], sorted(held)


def sample_list(group: TrainingGroup, list_size: int, rng: random.Random) -> list[int]:
    """Indices of one training list from ``group``: a quarter from the teacher's top, up to an eighth of
    the judged relevant (grade ≥ 2, else ≥ 1) not already in, then uniform at random from the rest."""
    n = len(group)
    if n <= list_size:
        return list(range(n))
    chosen: list[int] = []
    if group.teacher is not None:
        chosen = np.argsort(-group.teacher, kind="stable")[: list_size // 4].tolist()
    if group.labels is not None:
        taken = set(chosen)
        relevant = [i for i, label in enumerate(group.labels) if label is not None and label >= 2 and i not in taken]
        relevant = relevant or [i for i, label in enumerate(group.labels) if label and i not in taken]
        chosen += rng.sample(relevant, min(len(relevant), max(1, list_size // 8)))
    taken = set(chosen)
    rest = [i for i in range(n) if i not in taken]
    chosen += rng.sample(rest, list_size - len(chosen))
    return chosen


def groups_by_qid(groups: Iterable[TrainingGroup]) -> Mapping[str, TrainingGroup]:
    return {group.qid: group for group in groups}
