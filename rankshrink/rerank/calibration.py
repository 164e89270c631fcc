"""Asymmetric early exit for ranking: which documents may leave the network after a layer, and how far below
the cut a document must be before it may.

After an exit layer every document still running has a score. The **cut** is the ``top_k``-th best of those
scores. A document leaves when its score is below the cut by more than the layer's **margin**; documents
near or above the cut go on (early-exit monoBERT's asymmetry: only the confidently irrelevant stop early).

Margins are calibrated on dev data (never the test set) from the scores every exit head gives, with no exit
taken: for the documents the final layer puts in the top ``k`` of a query, ``gap = cut_l - score_l`` is how far
below layer l's cut they were. The margin for a per-layer miss probability ε is the (1 - ε) quantile of those
gaps, so a future top-k document leaves at layer l with probability about ε. ``exit_risk`` splits a total
miss probability evenly over the exit layers a configuration runs (a union bound).

A head that does not rank gets no margin (stored as None: no document leaves there). Its scores barely
spread, so the dev queries' gaps are all tiny and so is the margin, and on other queries top-k documents
fall just outside it: on TREC DL 2019 the [CLS] heads after layers 1–3 of the offline model cost the full
network 3 points this way, while on the dev queries their top 10 held 10–18% of the final top 10 (layers
4–5: 76–90%). The model's "pair" exit heads rank from layer 2 on, so those get margins.

>>> margins = calibrate_margins(layer_scores, final_scores)   # doctest: +SKIP
>>> leaving(torch.tensor([5.0, 4.0, 3.0, -3.0]), top_k=2, margin=2.0)
tensor([False, False, False,  True])
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


DEFAULT_TOP_K = 10
# Per-layer miss probabilities the margins are stored at; others are interpolated (in log ε).
LEVELS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
# An exit head whose top k holds less than this share of the final top k (mean over the dev queries) ranks
# too little to exit by.
MIN_TOP_K_AGREEMENT = 0.4


def leaving(scores: torch.Tensor, top_k: int, margin: float) -> torch.Tensor:
    """Which documents leave: score below the ``top_k``-th best score minus ``margin`` ([n] bool).
    With ``top_k`` or fewer documents running, none leaves."""
    if scores.numel() <= top_k:
        return torch.zeros(scores.shape, dtype=torch.bool)
    cut = torch.topk(scores, top_k).values[-1]
    return scores < cut - margin


def gaps_of_top_k(layer_scores: np.ndarray, final_scores: np.ndarray, top_k: int) -> np.ndarray:
    """For one query: ``cut - score`` at this layer for each document the final scores put in the top k."""
    if len(final_scores) <= top_k:
        return np.empty(0)
    cut = np.sort(layer_scores)[-top_k]
    best = np.argsort(-final_scores, kind="stable")[:top_k]
    return cut - layer_scores[best]


def top_k_agreement(layer_scores: np.ndarray, final_scores: np.ndarray, top_k: int) -> float:
    """The share of the final top k that this layer's own top k holds, for one query."""
    k = min(top_k, len(final_scores))
    mine = set(np.argsort(-layer_scores, kind="stable")[:k].tolist())
    return len(mine.intersection(np.argsort(-final_scores, kind="stable")[:k].tolist())) / max(k, 1)


def calibrate_margins(queries: Sequence[Mapping[int, np.ndarray]], finals: Sequence[np.ndarray],
                      top_k: int = DEFAULT_TOP_K) -> dict[str, list[float] | None]:
    """Margins per exit layer at each of ``LEVELS``: ``{str(layer): [margin at LEVELS[0], ...]}``, or None
    for a layer whose head does not rank (``MIN_TOP_K_AGREEMENT``).

    ``queries[i]`` maps an exit layer to query i's scores at that layer (one per candidate), ``finals[i]``
    holds its final scores. A margin is never negative (a document above the cut never leaves)."""
    layers = sorted({layer for scores in queries for layer in scores})
    margins: dict[str, list[float] | None] = {}
    for layer in layers:
        pairs = [(scores[layer], final) for scores, final in zip(queries, finals) if layer in scores]
        gaps = np.concatenate([gaps_of_top_k(scores, final, top_k) for scores, final in pairs] or [np.empty(0)])
        if gaps.size == 0:
            continue
        if np.mean([top_k_agreement(scores, final, top_k) for scores, final in pairs]) < MIN_TOP_K_AGREEMENT:
            margins[str(layer)] = None
            continue
        margins[str(layer)] = [max(0.0, float(np.quantile(gaps, 1.0 - level, method="higher"))) for level in LEVELS]
    return margins


def margin_at(levels_margins: Sequence[float], level: float) -> float:
    """The margin at per-layer miss probability ``level``, interpolated in log(level) between stored levels."""
    if level <= LEVELS[0]:
        return float(levels_margins[0])
    if level >= LEVELS[-1]:
        return float(levels_margins[-1])
    logs = [math.log(value) for value in LEVELS]
    return float(np.interp(math.log(level), logs, levels_margins))


def margins_for(calibration: Mapping[str, Any] | None, width: float, depth: float, max_length: int,
                exit_layers: Sequence[int], exit_risk: float) -> dict[int, float] | None:
    """The margin of each exit layer in ``exit_layers`` whose head ranks, for a configuration, from a model's
    calibration (``model.metadata["calibration"]``); None when the calibration has no entry for (width,
    depth) or none of these heads ranks.

    The entry with the same width and depth and the nearest max_length is used."""
    if not calibration or not exit_layers:
        return None
    entries = [entry for entry in calibration.get("entries", [])
               if math.isclose(entry["width"], width) and math.isclose(entry["depth"], depth)]
    if not entries:
        return None
    entry = min(entries, key=lambda e: (abs(math.log(e["max_length"] / max_length)), -e["max_length"]))
    stored = entry["margins"]
    if any(str(layer) not in stored for layer in exit_layers):
        return None
    ranking = [layer for layer in exit_layers if stored[str(layer)] is not None]
    if not ranking:
        return None
    per_layer = exit_risk / len(ranking)
    return {layer: margin_at(stored[str(layer)], per_layer) for layer in ranking}
