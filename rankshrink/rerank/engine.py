"""The reranking engine: one query's candidates through the dynamic cross-encoder, fast, inside a budget.

What makes it fast, in the order the time goes:

* **tokenize once** per query, all pairs in one call of the fast tokenizer (query first, only the passage
  truncated), and only the candidates that will be reranked;
* **length-sorted micro-batches**: pairs sorted by length and cut into batches of at most ``batch_tokens``
  padded tokens with little padding — about a thousand tokens keep oneDNN's matmuls efficient and their
  activations in cache (one 100-pair batch padded to the longest pair was 2.4× slower, eval/bench_engine.md) —
  each padded to a multiple of ``LENGTH_STEP`` tokens, so that its matrix shapes recur from query to query;
* **bf16** where the CPU has bf16 arithmetic (AVX512-BF16 / AMX), fp32 elsewhere; the model's fused oneDNN
  kernels under ``torch.inference_mode``;
* **layer by layer, with early exit**: after each layer with an exit head, a document whose score is
  confidently below the current top-k cut leaves (``calibration.py``); the survivors are repacked into
  micro-batches (trimmed to their new longest pair, small batches merged), so exited documents cost nothing;
* the **last layer for [CLS] alone**: the final head reads only the [CLS] token, so the last layer computes
  keys and values for every token but attention, projection and FFN for that one (an eighth of the full
  network's FLOPs saved at 96 tokens, the same scores);
* a **cascade** (``keep``): the model's smallest sub-network (deeper with ``prune_depth``) first scores every
  candidate at a few tokens (``PRUNE_MAX_LENGTH``) and only its best ``keep`` go through the configuration's
  network; the others rank below them in the first pass's order;
* a **deadline**: before each micro-batch step the engine checks that the step, at the speed measured so far,
  still fits; when it does not, it stops. Documents keep their latest score (from the last head they passed);
  the ones no head scored rank below every scored one, in first-stage order.

With a ``budget_ms``, the controller (``budget.py``) picks the configuration from the model's profile and the
deadline is the budget. Without one, the Reranker's fixed configuration runs with no deadline.

>>> from rankshrink.rerank import Reranker
>>> reranker = Reranker("models/trec-dl", width=1.0, depth=1.0, max_length=256)       # doctest: +SKIP
>>> result = reranker.rerank("what is a cat", {"d1": 12.0, "d2": 11.5},
...                          {"d1": "Paris is in France.", "d2": "A cat is a small feline."}, budget_ms=50)
>>> max(result.scores, key=result.scores.get), result.stats.latency_ms               # doctest: +SKIP
('d2', 31.2)
"""
from __future__ import annotations

import itertools
import math
import numbers
import random
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..data import trec_order
from ..errors import InputError, check_integer
from .budget import (DEFAULT_HEADROOM, PRUNE_MAX_LENGTH, WORK_FEATURES, Controller, FrontierPoint, RerankConfig,
                     capped, check_budget_ms, check_exit_risk, check_headroom)
from .calibration import DEFAULT_TOP_K, leaving, margins_for

Dtype = Literal["auto", "bf16", "fp32"]

# Micro-batches: at most this many padded tokens, at most this share of them padding. 1024 rather than 2048 since
# stop 32: the full network 3-8% faster at 256 tokens, smaller configurations the same (eval/bench_engine.md,
# eval/README.md).
BATCH_TOKENS = 1024
MAX_PADDING = 0.15
# A micro-batch is padded to a multiple of this many tokens. oneDNN builds a kernel for every new matrix shape
# (rows x length), which costs a query whose batches are new shapes more than its matmuls (eval/README.md); with
# lengths in steps of 16 the shapes repeat across queries.
LENGTH_STEP = 16
WARM_UP_QUERY = "how does a reranker warm up before its first query"
# Everyday words for synthetic passages: the warm-up needs their token counts, not their sense.
_WARM_UP_WORDS = ("the river runs past an old stone mill where farmers bring grain each autumn and the miller "
                  "weighs every sack before he grinds it into flour for bread sold at the market").split()
# Time kept back from a deadline for putting the result together.
FINISH_MS = 1.0
# Pairs per tokenizer call: as fast here as one call for 100 pairs (7 ms at 96 or 256 tokens on dl19), and a
# deadline can stop between calls (the tokenizer reads a long document whole before cutting it, which can take
# longer than the layers).
ENCODE_PAIRS = 25
# How fast the load estimate follows the latest query (exponential moving average).
LOAD_SMOOTHING = 0.3


@dataclass
class QueryStats:
    """What one ``rerank`` call did.

    ``layers_used[i]``: layers run for the i-th candidate in first-stage order (0: not reranked);
    ``mean_layers``: their mean over the candidates the network saw.
    ``batch_sizes[j]``: rows of each micro-batch at the j-th executed layer (exited documents are gone).
    ``work``: the counts the cost model reads (pairs, tokens, micro-batch steps, head evaluations, GFLOPs).
    """

    latency_ms: float
    config: dict[str, Any]
    layers_used: list[int]
    scored: int
    deadline_hit: bool
    budget_ms: float | None = None
    predicted_ms: float | None = None
    tokenize_ms: float = 0.0
    batch_sizes: list[list[int]] = field(default_factory=list)
    work: dict[str, float] = field(default_factory=dict)

    @property
    def mean_layers(self) -> float:
        seen = [layers for layers in self.layers_used if layers]
        return sum(seen) / len(seen) if seen else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"latency_ms": round(self.latency_ms, 3), "config": self.config, "layers_used": self.layers_used,
                "mean_layers": round(self.mean_layers, 3),
                "scored": self.scored, "deadline_hit": self.deadline_hit, "budget_ms": self.budget_ms,
                "predicted_ms": None if self.predicted_ms is None else round(self.predicted_ms, 3),
                "tokenize_ms": round(self.tokenize_ms, 3), "batch_sizes": self.batch_sizes,
                "work": {name: round(value, 6) for name, value in self.work.items()}}


@dataclass
class RerankResult:
    """``scores``: every candidate's score (unscored candidates below every scored one, in first-stage order)."""

    scores: dict[str, float]
    stats: QueryStats

    def ranking(self) -> list[str]:
        """Docids best first (trec_eval's order)."""
        return [docid for docid, _ in trec_order(self.scores)]


@dataclass
class Trace:
    """Every head's score for every candidate, no exit taken (what ``profile`` calibrates and simulates
    from). ``layer_scores[layer][i]``: the exit head after physical ``layer`` (every executed layer but the
    last) on candidate i; ``final[i]``: the final head after the last executed layer; ``lengths[i]``: tokens."""

    layer_scores: dict[int, np.ndarray]
    final: np.ndarray
    lengths: list[int]
    stats: QueryStats


# ---------------------------------------------------------------------------------------------
# Micro-batches


def pack(lengths: Sequence[int], positions: Sequence[int] | None = None, batch_tokens: int = BATCH_TOKENS,
         max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Cut ``positions`` (default: all) into micro-batches, shortest pairs first: a batch grows while its
    padded size (rows × its longest rounded up to ``LENGTH_STEP``) stays within ``batch_tokens`` and the
    padding to its longest within ``max_padding`` of rows × longest."""
    positions = range(len(lengths)) if positions is None else positions
    groups: list[list[int]] = []
    for position in sorted(positions, key=lambda p: (lengths[p], p)):
        if groups and _fits(groups[-1], [position], lengths, batch_tokens, max_padding):
            groups[-1].append(position)
        else:
            groups.append([position])
    return groups


def regroup(groups: Sequence[Sequence[int]], lengths: Sequence[int], batch_tokens: int = BATCH_TOKENS,
            max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Micro-batches after exits: empty ones dropped, neighbours merged while the merge fits (never split)."""
    merged: list[list[int]] = []
    for group in groups:
        if not group:
            continue
        if merged and _fits(merged[-1], group, lengths, batch_tokens, max_padding):
            merged[-1] = merged[-1] + list(group)
        else:
            merged.append(list(group))
    return merged


def _fits(group: Sequence[int], extra: Sequence[int], lengths: Sequence[int], batch_tokens: int,
          max_padding: float) -> bool:
    rows = len(group) + len(extra)
    longest = max(max(lengths[p] for p in group), max(lengths[p] for p in extra))
    real = sum(lengths[p] for p in group) + sum(lengths[p] for p in extra)
    # The tokens cap counts the padding to LENGTH_STEP; the padding share does not (every batch has it).
    return (rows * padded_length(longest) <= batch_tokens
            and rows * longest - real <= max_padding * rows * longest)


def padded_length(longest: int, limit: int | None = None) -> int:
    """The length a micro-batch whose longest pair has ``longest`` tokens is padded to: the next multiple of
    ``LENGTH_STEP``, at most ``limit`` (the position embeddings), never below ``longest``."""
    step = -(-longest // LENGTH_STEP) * LENGTH_STEP
    return step if limit is None else max(longest, min(step, limit))


def batch_length(group: Sequence[int], lengths: Sequence[int], model) -> int:
    """The padded length of the micro-batch of the pairs at ``group``'s positions."""
    return padded_length(max(lengths[p] for p in group), model.config.max_position_embeddings)


def layer_gflops(model, width: float, length: int, rows: int, first_token_only: bool = False) -> float:
    """GFLOPs of one layer at ``width`` on ``rows`` pairs padded to ``length`` tokens (``model.layer_flops``)."""
    return rows * model.layer_flops(width, length, first_token_only) / 1e9


@dataclass
class _Batch:
    docs: list[int]                 # positions in the reranked list, one per row
    hidden: torch.Tensor            # [rows, length, hidden]
    mask: torch.Tensor | None       # model.attention_mask_for of the padding; None when nothing is padded
    types: torch.Tensor             # [rows, length] token types (query 0, passage 1), for "pair" exit heads

    @property
    def length(self) -> int:
        return self.hidden.shape[1]


# ---------------------------------------------------------------------------------------------
# The model in the right dtype, shared by every Reranker on it

_CONVERTED: "weakref.WeakKeyDictionary[Any, dict[torch.dtype, tuple[tuple, Any]]]" = weakref.WeakKeyDictionary()
_CONVERTED_LOCK = threading.Lock()
_TOKENIZER_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()


def bf16_is_fast() -> bool:
    from ..firststage.dense import bf16_is_fast as fast

    return fast("cpu")


def resolve_dtype(dtype: Dtype) -> torch.dtype:
    """The Reranker's compute dtype (it runs on the CPU): "auto" is bf16 where this CPU runs it fast."""
    if dtype not in ("auto", "bf16", "fp32"):
        raise InputError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_fast() else torch.float32
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def inference_copy(model, dtype: torch.dtype):
    """``model`` in eval mode and ``dtype``: the model itself when it already is, else a converted copy of its
    current weights, shared by the Rerankers made on the model until its weights change (the caller's model
    is never changed)."""
    parameter = next(model.parameters())
    if parameter.dtype == dtype and not model.training:
        return model
    signature = _weights_signature(model)
    with _CONVERTED_LOCK:
        copies = _CONVERTED.setdefault(model, {})
        if dtype not in copies or copies[dtype][0] != signature:
            copies[dtype] = (signature, model.clone().to(dtype=dtype).eval())
        return copies[dtype][1]


def _weights_signature(model) -> tuple:
    # A replaced module (new exit heads) brings new tensors; a tensor's version counter moves with in-place
    # changes made through autograd (an optimizer step, load_state_dict), its sum with those made through .data.
    with torch.no_grad():
        return tuple((id(tensor), tensor.data_ptr(), tensor._version, float(tensor.sum(dtype=torch.float64)))
                     for tensor in itertools.chain(model.parameters(), model.buffers()))


def _tokenizer_lock(tokenizer) -> threading.Lock:
    # A Hugging Face fast tokenizer sets its truncation state on every call: concurrent calls collide.
    with _CONVERTED_LOCK:
        lock = _TOKENIZER_LOCKS.get(tokenizer)
        if lock is None:
            lock = _TOKENIZER_LOCKS[tokenizer] = threading.Lock()
        return lock


# ---------------------------------------------------------------------------------------------
# The reranker


class Reranker:
    """Rerank one query's first-stage candidates with a ``DynamicCrossEncoder``.

    ``model``: a loaded model or a model directory / hub id. ``width``, ``depth``, ``max_length`` (cut to the
    model's position embeddings), ``candidates`` (rerank at most this many, best first-stage first), ``keep``
    (None, or a cascade: the ``pruner`` sub-network, ``prune_depth`` deep, scores the candidates first and only
    its best ``keep`` run at ``width`` and ``depth``) and ``exits`` fix the configuration used when a call gives
    no budget; with a budget, ``candidates`` and ``max_length`` still cap what the controller picks.
    ``exits``: True uses the model's calibrated early exits at its default risk (none when the model has no
    calibration for this width and depth); a float is the exit risk itself (``calibration.py``); False runs every
    document through every layer. ``dtype``: "auto" (bf16 where the CPU has bf16 arithmetic), "bf16", "fp32".
    ``threads``: torch intra-op threads, set for the whole process (None leaves torch's setting). ``headroom``:
    with a budget, the controller picks the best configuration whose predicted p95 (scaled by the load measured
    on recent calls) fits ``(1 - headroom) × budget``; the deadline is the whole budget. ``batch_tokens``: padded
    tokens per micro-batch (None: what the model's profile was timed with, else ``BATCH_TOKENS``). ``rerank`` is
    thread-safe.

    >>> reranker = Reranker(rankshrink.load_model("models/trec-dl"), exits=False, dtype="fp32")   # doctest: +SKIP
    >>> reranker.rerank("cat", {"a": 2.0, "b": 1.0}, ["Paris is in France.", "A cat."]).ranking()  # doctest: +SKIP
    ['b', 'a']
    """

    def __init__(self, model: Any, width: float = 1.0, depth: float = 1.0, max_length: int = 256,
                 candidates: int = 100, exits: bool | float = True, dtype: Dtype = "auto",
                 threads: int | None = None, keep: int | None = None, *, prune_depth: float | None = None,
                 batch_tokens: int | None = None,
                 max_padding: float = MAX_PADDING, headroom: float = DEFAULT_HEADROOM,
                 profile: Mapping[str, Any] | None = None):
        if isinstance(model, (str, Path)):
            from ..model import load_model

            model = load_model(model)
        if not hasattr(model, "run_layer"):
            raise InputError(f"model must be a DynamicCrossEncoder or a model directory, got {type(model).__name__}")
        if model.tokenizer is None:
            raise InputError("the model has no tokenizer (its directory had none); a reranker tokenizes its input")
        if check_integer("threads", threads) is not None:
            torch.set_num_threads(threads)
        check_integer("batch_tokens", batch_tokens)
        limit = model.config.max_position_embeddings
        if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > limit:
            max_length = limit   # a pair cannot be longer than the position embeddings
        self.source_model = model
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise InputError(f"the Reranker runs on the CPU and the model is on {device}: move it (model.to('cpu'))")
        self.dtype = resolve_dtype(dtype)
        self.model = inference_copy(model, self.dtype)
        self.calibration = model.metadata.get("calibration")
        self.config = RerankConfig(width, depth, max_length, candidates, self.exit_risk_for(exits), keep, prune_depth)
        self.threads = threads
        if not 0 <= max_padding <= 1:
            raise InputError(f"max_padding must be a fraction in [0, 1], got {max_padding!r}")
        self.headroom = check_headroom(headroom)
        self.max_padding = float(max_padding)
        self._tokenizer_lock = _tokenizer_lock(model.tokenizer)
        profile = model.metadata.get("profile") if profile is None else profile
        self.controller = Controller.from_profile(profile) if profile else None
        # The profile's cost model counts micro-batch steps: by default, cut them as the profile timed them.
        profiled = check_integer("the profile's batch_tokens", (profile or {}).get("batch_tokens"))
        self.batch_tokens = batch_tokens if batch_tokens is not None else profiled or BATCH_TOKENS
        self._load = 1.0
        self._load_lock = threading.Lock()
        self._warned_no_profile = False
        self._warmed_up = False

    def __repr__(self) -> str:
        dtype = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        return (f"Reranker({self.config.label()}, dtype={dtype}, "
                f"profile={'yes' if self.controller else 'no'})")

    def exit_risk_for(self, exits: bool | float) -> float | None:
        """The exit risk ``exits`` means: None for False, the calibration's default for True (None without one)."""
        if exits is False or exits is None:
            return None
        if exits is True:
            risk = (self.calibration or {}).get("default_risk")
            return None if risk is None else float(risk)
        return check_exit_risk(exits)

    def pruner(self, config: RerankConfig, candidates: int) -> RerankConfig:
        """The first pass of ``config``'s cascade over ``candidates`` candidates: the model's narrowest
        sub-network at ``config.prune_depth`` (None: its shallowest), no exits, at ``PRUNE_MAX_LENGTH`` tokens
        (``config``'s max length if shorter)."""
        depth = min(self.model.config.depths) if config.prune_depth is None else config.prune_depth
        return RerankConfig(min(self.model.config.widths), depth, min(PRUNE_MAX_LENGTH, config.max_length),
                            candidates, None)

    @property
    def warmed_up(self) -> bool:
        """Whether ``warm_up`` has run."""
        return self._warmed_up

    @property
    def load(self) -> float:
        """How much slower than at profile time reranks run now (1.0 until measured)."""
        return self._load

    # -- one query ---------------------------------------------------------------------------------

    def rerank(self, query: str, candidates: Mapping[str, float] | Sequence[str],
               texts: Mapping[str, str] | Sequence[str], budget_ms: float | None = None,
               top_k: int | None = None) -> RerankResult:
        """New scores for ``candidates`` (docid → first-stage score, or docids in first-stage order).
        ``texts``: docid → passage, or passages in first-stage order (``trec_order``: a mapping of candidates
        given in another order, e.g. with tied scores, needs a mapping of texts).
        ``budget_ms``: None runs the fixed configuration; a number lets the controller choose (within
        ``(1 - headroom)`` of it) and holds the call to it (0 returns the first-stage order). ``top_k``: the
        cut early exits protect (default 10)."""
        started = time.perf_counter()
        docids = _ordered_beside(candidates, texts)
        config, predicted = self.config, None
        if budget_ms is not None:
            budget_ms = check_budget_ms(budget_ms)
            if self.controller is not None:
                point = self.choose(budget_ms, len(docids))
                config = point.config
                predicted = point.predicted_p95(len(docids)) * self._load
            elif not self._warned_no_profile:
                self._warned_no_profile = True
                warnings.warn("the model has no profile (run rankshrink profile): budgets run the fixed "
                              "configuration, stopped at the deadline", stacklevel=2)
        return self._run(started, query, docids, texts, config, top_k, budget_ms, predicted)

    def choose(self, budget_ms: float, candidates: int, load: float | None = None,
               headroom: float | None = None) -> FrontierPoint:
        """The profile's best configuration whose predicted p95, times ``load`` (default: the load measured on
        recent calls), fits ``(1 - headroom) × budget_ms`` (default: this reranker's headroom), within this
        reranker's ``candidates`` and ``max_length``. Needs a profile (``controller``)."""
        if self.controller is None:
            raise InputError("the model has no profile to choose from: run rankshrink profile")
        headroom = self.headroom if headroom is None else headroom
        return self.controller.choose(budget_ms * (1 - headroom), candidates, self._load if load is None else load,
                                      max_candidates=self.config.candidates, max_length=self.config.max_length)

    def rerank_config(self, query: str, candidates: Mapping[str, float] | Sequence[str],
                      texts: Mapping[str, str] | Sequence[str], config: RerankConfig, top_k: int | None = None,
                      deadline_ms: float | None = None) -> RerankResult:
        """``rerank`` at an explicit configuration (what the profile and the benchmarks time), with an
        optional deadline in milliseconds from now."""
        started = time.perf_counter()
        config = capped(config, None, self.model.config.max_position_embeddings)   # as the constructor cuts it
        return self._run(started, query, _ordered_beside(candidates, texts), texts, config, top_k, deadline_ms, None)

    def warm_up(self, query: str | None = None, passages: Sequence[str] | Mapping[str, str] | None = None,
                rounds: int = 2, *, fixed: bool = True) -> float:
        """Rerank ``passages`` (texts, or docid → text) for ``query`` (default: ``warm_up_passages()`` for
        ``WARM_UP_QUERY``; a real query's candidates warm up better) at every configuration a budget can choose
        (the profile's ladder) and, with ``fixed``, at the fixed one that calls without a budget run, ``rounds``
        times, before any query's clock runs: a process's first reranks pay one-time costs (oneDNN builds a
        kernel for each new matrix shape) that would otherwise count against its first queries' budgets. Only
        the last round updates the load (``load``), so that with 2 or more it measures the machine, not those
        costs. Call it before serving queries; ``rerank_run`` with a budget calls it once, on its first query.
        Returns the seconds it took."""
        check_integer("rounds", rounds, optional=False)
        if isinstance(passages, (str, bytes)):
            raise InputError("passages must be a list of texts or a mapping docid -> text, not one string")
        query = WARM_UP_QUERY if query is None else query
        passages = warm_up_passages() if passages is None else \
            list(passages.values()) if isinstance(passages, Mapping) else list(passages)
        if not passages:
            raise InputError("warm_up needs at least one passage")
        configs = [self.config] if fixed or self.controller is None else []
        if self.controller is not None:
            configs += [capped(point.config, self.config.candidates, self.config.max_length)
                        for point in self.controller.rungs]
        docids = [str(position) for position in range(len(passages))]
        started = time.perf_counter()
        for round_ in range(rounds):
            for config in dict.fromkeys(configs):   # a deadline never reached: the heads run as under a budget
                self._run(time.perf_counter(), query, docids, passages, config, None, 3_600_000, None,
                          observe=round_ == rounds - 1)
        self._warmed_up = True
        return time.perf_counter() - started

    def _run(self, started: float, query: str, docids: list[str], texts: Mapping[str, str] | Sequence[str],
             config: RerankConfig, top_k: int | None, budget_ms: float | None, predicted: float | None,
             observe: bool = True) -> RerankResult:
        if not isinstance(query, str):
            raise InputError(f"the query must be a string, got {type(query).__name__}")
        top_k = DEFAULT_TOP_K if top_k is None else int(check_integer("top_k", top_k))
        deadline = None
        if budget_ms is not None:
            budget_ms = check_budget_ms(budget_ms)
            deadline = started + max(0.0, budget_ms - FINISH_MS) / 1000
        reranked = docids[:config.candidates]
        passages = _texts_for(reranked, docids, texts)
        if budget_ms == 0 or not reranked:
            outcome = None
        elif config.cascades(len(reranked)):
            outcome = self._score_cascade(query, passages, config, top_k, deadline)
        else:
            outcome = self._score(query, passages, config, top_k, deadline, record=False)
        return self._result(docids, reranked, outcome, config, started, budget_ms, predicted, observe)

    def trace(self, query: str, passages: Sequence[str], config: RerankConfig) -> Trace:
        """Every head's score on every passage at ``config`` (no exit, no deadline), for calibration."""
        outcome = self._score(query, list(passages), replace(config, exit_risk=None), DEFAULT_TOP_K, None,
                              record=True)
        stats = QueryStats(outcome.elapsed_ms, self._config_dict(config, None), outcome.layers_used.tolist(),
                           len(passages), False, tokenize_ms=outcome.tokenize_ms, batch_sizes=outcome.batch_sizes,
                           work=outcome.work)
        final = outcome.scores.numpy().astype(np.float64)
        return Trace({layer: scores.numpy().astype(np.float64) for layer, scores in outcome.layer_scores.items()},
                     final, outcome.lengths, stats)

    # -- the work ----------------------------------------------------------------------------------

    def _margins(self, config: RerankConfig) -> dict[int, float] | None:
        if config.exit_risk is None:
            return None
        layers = self.model.layers_for(config.depth)
        exit_layers = [layer for layer in layers[:-1] if self.model.has_exit(layer)]
        return margins_for(self.calibration, config.width, config.depth, config.max_length, exit_layers,
                           config.exit_risk)

    def _encode(self, query: str, passages: list[str], max_length: int,
                deadline: float | None = None) -> dict[str, list] | None:
        """The pairs' tokens (``DynamicCrossEncoder.encode``), ``ENCODE_PAIRS`` at a time; None when
        ``deadline`` passes before they all are."""
        encoded: dict[str, list] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        for start in range(0, len(passages), ENCODE_PAIRS):
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            part = passages[start:start + ENCODE_PAIRS]
            with self._tokenizer_lock:
                for key, rows in self.model.encode([query] * len(part), part, max_length).items():
                    encoded[key].extend(rows)
        return encoded

    def _score(self, query: str, passages: list[str], config: RerankConfig, top_k: int, deadline: float | None,
               record: bool, encoded: Mapping[str, list] | None = None) -> "_Outcome":
        """``encoded``: the pairs already tokenized at ``config.max_length`` (a cascade's one tokenization)."""
        model = self.model
        began = time.perf_counter()
        outcome = _Outcome(torch.full((len(passages),), math.nan), torch.zeros(len(passages), dtype=torch.long))
        if deadline is not None and time.perf_counter() >= deadline:
            outcome.deadline_hit = True
            return outcome.finish(began)
        if encoded is None:
            encoded = self._encode(query, passages, config.max_length, deadline)
        outcome.tokenize_ms = (time.perf_counter() - began) * 1000
        if encoded is None:
            outcome.deadline_hit = True
            return outcome.finish(began)
        ids, types = encoded["input_ids"], encoded["token_type_ids"]
        lengths = [len(row) for row in ids]
        outcome.lengths = lengths
        work = outcome.work
        work.update(calls=1, pairs=len(passages), tokens=sum(lengths), steps=0, heads=0, gflops=0.0)
        margins = self._margins(config)
        layers = model.layers_for(config.depth)
        # Heads after every exit layer: to decide exits, to leave a score when the deadline stops, to record.
        heads_everywhere = bool(margins) or deadline is not None or record
        ms_per_gflop = self._step_speed_prior(config.width)
        with torch.inference_mode():
            batches = [self._embed(group, ids, types, lengths)
                       for group in pack(lengths, None, self.batch_tokens, self.max_padding)]
            for position, layer in enumerate(layers):
                last = position == len(layers) - 1
                head = last or (heads_everywhere and model.has_exit(layer))
                first_token_only = last and model.scores_from_first_token(layer)
                sizes = []
                for batch in batches:
                    gflops = layer_gflops(model, config.width, batch.length, len(batch.docs), first_token_only)
                    if deadline is not None and time.perf_counter() + gflops * ms_per_gflop / 1000 > deadline:
                        outcome.deadline_hit = True
                        break
                    step_started = time.perf_counter()
                    batch.hidden = model.run_layer(layer, batch.hidden, batch.mask, config.width,
                                                   first_token_only=first_token_only)
                    rows = torch.tensor(batch.docs)
                    if head:
                        scores = (model.last_score if last else model.exit_score)(layer, batch.hidden, batch.mask,
                                                                                  batch.types)
                        outcome.scores[rows] = scores.float()
                        if record and not last:
                            outcome.layer_scores.setdefault(layer, torch.full((len(passages),), math.nan))[rows] = \
                                scores.float()
                        work["heads"] += len(batch.docs)
                    outcome.layers_used[rows] = position + 1
                    step_ms = (time.perf_counter() - step_started) * 1000
                    ms_per_gflop = 0.5 * ms_per_gflop + 0.5 * step_ms / max(gflops, 1e-9) if ms_per_gflop else \
                        step_ms / max(gflops, 1e-9)
                    sizes.append(len(batch.docs))
                    work["steps"] += 1
                    work["gflops"] += gflops
                outcome.batch_sizes.append(sizes)
                if outcome.deadline_hit or last:
                    break
                if margins and layer in margins:
                    batches = self._exit(batches, outcome.scores, top_k, margins[layer], lengths, types)
        return outcome.finish(began)

    def _score_cascade(self, query: str, passages: list[str], config: RerankConfig, top_k: int,
                       deadline: float | None) -> "_Outcome":
        """The pruner over every passage, then ``config`` over the pruner's best ``config.keep``; the scores
        ``cascade_values`` orders that way. The pairs are tokenized once, at the longer max length; the first
        pass reads them cut to its own (``truncated_pairs``)."""
        pruner = self.pruner(config, len(passages))
        began = time.perf_counter()
        encoded = self._encode(query, passages, config.max_length, deadline)
        tokenize_ms = (time.perf_counter() - began) * 1000
        first_pass = None
        if encoded is not None:
            first_pass, redo = truncated_pairs(encoded, pruner.max_length)
            if redo:   # queries too long to leave a passage token at the first pass's length: as encode cuts them
                again = self._encode(query, [passages[p] for p in redo], pruner.max_length)
                for key in first_pass:
                    for position, row in zip(redo, again[key]):
                        first_pass[key][position] = row
        first = self._score(query, passages, pruner, top_k, deadline, record=False, encoded=first_pass)
        order = first_pass_order(first.scores.tolist())
        kept = order[:config.keep]
        second_pass = None if encoded is None else {key: [encoded[key][p] for p in kept] for key in first_pass}
        second = self._score(query, [passages[p] for p in kept], replace(config, keep=None, prune_depth=None), top_k,
                             deadline, record=False, encoded=second_pass)
        layers_used = first.layers_used.clone()
        layers_used[torch.tensor(kept, dtype=torch.long)] = second.layers_used
        return _Outcome(torch.tensor(cascade_values(len(passages), order, second.scores.tolist())),
                        layers_used, deadline_hit=first.deadline_hit or second.deadline_hit,
                        tokenize_ms=tokenize_ms + first.tokenize_ms + second.tokenize_ms,
                        elapsed_ms=first.elapsed_ms + second.elapsed_ms, lengths=first.lengths,
                        batch_sizes=first.batch_sizes + second.batch_sizes,
                        work=cascade_work(first.work, second.work, pruner.width))

    def _embed(self, group: list[int], ids: list[list[int]], types: list[list[int]], lengths: list[int]) -> _Batch:
        length = batch_length(group, lengths, self.model)
        input_ids = np.full((len(group), length), self.model.config.pad_token_id, dtype=np.int64)
        for row, position in enumerate(group):
            input_ids[row, :lengths[position]] = ids[position]
        token_types = _token_types(group, types, lengths, length)
        hidden = self.model.embed(torch.from_numpy(input_ids), token_types)
        return _Batch(list(group), hidden, self._mask([lengths[p] for p in group], length), token_types)

    def _mask(self, lengths: list[int], length: int) -> torch.Tensor | None:
        if all(n == length for n in lengths):
            return None
        valid = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
        return self.model.attention_mask_for(valid)

    def _exit(self, batches: list[_Batch], scores: torch.Tensor, top_k: int, margin: float,
              lengths: list[int], types: list[list[int]]) -> list[_Batch]:
        """Drop the documents that leave; repack the rest (trim to the longest left, merge small batches)."""
        running = [doc for batch in batches for doc in batch.docs]
        leave = leaving(scores[torch.tensor(running)], top_k, margin)
        if not bool(leave.any()):
            return batches
        gone = {doc for doc, out in zip(running, leave.tolist()) if out}
        kept = [[doc for doc in batch.docs if doc not in gone] for batch in batches]
        where = {doc: (index, row) for index, batch in enumerate(batches) for row, doc in enumerate(batch.docs)}
        result = []
        for group in regroup(kept, lengths, self.batch_tokens, self.max_padding):
            sources = sorted({where[doc][0] for doc in group})
            if len(sources) == 1 and batches[sources[0]].docs == group:
                result.append(batches[sources[0]])
                continue
            length = batch_length(group, lengths, self.model)
            pieces = []
            for index in sources:
                rows = [where[doc][1] for doc in group if where[doc][0] == index]
                hidden = batches[index].hidden
                if len(rows) != hidden.shape[0]:
                    hidden = hidden.index_select(0, torch.tensor(rows))
                if hidden.shape[1] > length:
                    hidden = hidden[:, :length]
                elif hidden.shape[1] < length:
                    hidden = torch.nn.functional.pad(hidden, (0, 0, 0, length - hidden.shape[1]))
                pieces.append(hidden)
            hidden = pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces)
            result.append(_Batch(group, hidden, self._mask([lengths[doc] for doc in group], length),
                                 _token_types(group, types, lengths, length)))
        return result

    # -- speed and load ----------------------------------------------------------------------------

    def _step_speed_prior(self, width: float) -> float:
        """ms per GFLOP expected for a call's first micro-batch step: the profile's, scaled by the load measured
        on recent calls (0 without a profile: the first step always runs). Not the last call's own step speed:
        one slow step (a new batch shape, a page fault) would then refuse every later call's first step, and
        a step that never runs never corrects it."""
        if self.controller is not None and self.controller.cost_model is not None:
            return self.controller.cost_model.gflop_cost(width) * self._load
        return 0.0

    def _observe(self, config: RerankConfig, work: Mapping[str, float], elapsed_ms: float) -> None:
        """Update the load: this call's time over what the profile predicts for its work, corrected where the
        profile timed this configuration (``Controller.correction``)."""
        cost_model = self.controller.cost_model if self.controller is not None else None
        if cost_model is None or not work:
            return
        profiled_threads = self.controller.info.get("threads")
        if profiled_threads and profiled_threads != torch.get_num_threads():
            return   # another thread count runs at another speed: not the load the controller corrects for
        predicted = cost_model.predict(work, config.width) * self.controller.correction(config)
        if predicted < 1.0:
            return
        ratio = min(8.0, max(0.25, elapsed_ms / predicted))
        with self._load_lock:
            self._load = (1 - LOAD_SMOOTHING) * self._load + LOAD_SMOOTHING * ratio

    # -- the answer --------------------------------------------------------------------------------

    def _config_dict(self, config: RerankConfig, margins_used: bool | None) -> dict[str, Any]:
        exits = bool(margins_used) if margins_used is not None else config.exit_risk is not None
        return {"width": config.width, "depth": config.depth, "max_length": config.max_length,
                "candidates": config.candidates, "keep": config.keep, "prune_depth": config.prune_depth,
                "exits": exits,
                "exit_risk": config.exit_risk if exits else None,
                "dtype": "bf16" if self.dtype == torch.bfloat16 else "fp32"}

    def _result(self, docids: list[str], reranked: list[str], outcome: "_Outcome | None", config: RerankConfig,
                started: float, budget_ms: float | None, predicted: float | None, observe: bool) -> RerankResult:
        values = outcome.scores.tolist() if outcome is not None else [math.nan] * len(reranked)
        scores = assemble(docids, values)
        layers_used = (outcome.layers_used.tolist() if outcome is not None else [0] * len(reranked))
        layers_used += [0] * (len(docids) - len(reranked))
        scored = sum(1 for value in values if not math.isnan(value))
        latency_ms = (time.perf_counter() - started) * 1000
        stats = QueryStats(
            latency_ms=latency_ms, config=self._config_dict(config, bool(self._margins(config))),
            layers_used=layers_used, scored=scored,
            deadline_hit=bool(outcome.deadline_hit) if outcome is not None else budget_ms is not None and bool(reranked),
            budget_ms=budget_ms, predicted_ms=predicted,
            tokenize_ms=outcome.tokenize_ms if outcome is not None else 0.0,
            batch_sizes=outcome.batch_sizes if outcome is not None else [],
            work=dict(outcome.work) if outcome is not None else {})
        if outcome is not None and observe:
            self._observe(config, outcome.work, latency_ms)
        return RerankResult(scores, stats)

    # -- a whole run -------------------------------------------------------------------------------

    def rerank_run(self, run: Mapping[str, Mapping[str, float]], topics: Mapping[str, str], collection: Any,
                   budget_ms: float | None = None, progress: bool = True, top_k: int | None = None
                   ) -> tuple[dict[str, dict[str, float]], dict[str, QueryStats]]:
        """Rerank every query of a Run: ``(new run, {qid: QueryStats})``. ``collection``: a ``Collection``,
        a path to one, or any mapping docid → text. Texts are read before each query's clock starts; with a
        budget, the reranker warms up on the first query's candidates (``warm_up``), unless it has already."""
        from tqdm.auto import tqdm

        from ..data import open_collection

        missing = [qid for qid in run if qid not in topics]
        if missing:
            raise InputError(f"run query {missing[0]!r} has no topic" +
                             (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        budget_ms = None if budget_ms is None else check_budget_ms(budget_ms)
        if isinstance(collection, (str, Path)):
            collection = open_collection(collection)
        reranked_run: dict[str, dict[str, float]] = {}
        stats: dict[str, QueryStats] = {}
        for qid in tqdm(list(run), desc="reranking", unit="query", disable=not progress, dynamic_ncols=True):
            docids = [docid for docid, _ in trec_order(run[qid])][:self.config.candidates]
            texts = dict(zip(docids, _read_texts(collection, docids)))
            if budget_ms and not self.warmed_up and texts:
                self.warm_up(topics[qid], texts, fixed=False)
            result = self.rerank(topics[qid], run[qid], texts, budget_ms=budget_ms, top_k=top_k)
            reranked_run[qid] = result.scores
            stats[qid] = result.stats
        return reranked_run, stats


@dataclass
class _Outcome:
    scores: torch.Tensor                 # [n] latest head score, NaN where no head ran
    layers_used: torch.Tensor            # [n] layers run
    deadline_hit: bool = False
    tokenize_ms: float = 0.0
    elapsed_ms: float = 0.0
    lengths: list[int] = field(default_factory=list)
    batch_sizes: list[list[int]] = field(default_factory=list)
    work: dict[str, float] = field(default_factory=dict)
    layer_scores: dict[int, torch.Tensor] = field(default_factory=dict)

    def finish(self, began: float) -> "_Outcome":
        self.elapsed_ms = (time.perf_counter() - began) * 1000
        return self


def warm_up_passages(count: int = 100, longest_words: int = 300) -> list[str]:
    """``count`` synthetic passages from 4 to ``longest_words`` words (300: past 256 tokens), evenly spread and
    shuffled the same way every time, so that a warm-up meets short and long passages' micro-batch shapes, in
    its first candidates too. Real candidates warm up better (their shapes are the ones queries will make)."""
    lengths = [4 + i * (longest_words - 4) // max(1, count - 1) for i in range(count)]
    random.Random(0).shuffle(lengths)
    words = _WARM_UP_WORDS
    return [" ".join(words[(i + j) % len(words)] for j in range(length)) for i, length in enumerate(lengths)]


def assemble(docids: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """Scores for every candidate (``docids`` in first-stage order): ``values[i]`` for the first
    ``len(values)`` where it is a number; the rest, and NaNs, below the lowest score, in first-stage order."""
    scored = [value for value in values if not math.isnan(value)]
    floor = min(scored) - 1.0 if scored else 0.0
    scores: dict[str, float] = {}
    unscored = 0
    for position, docid in enumerate(docids):
        value = values[position] if position < len(values) else math.nan
        if math.isnan(value):
            scores[docid] = floor - unscored
            unscored += 1
        else:
            scores[docid] = float(value)
    return scores


def truncated_pairs(encoded: Mapping[str, list], max_length: int) -> tuple[dict[str, list], list[int]]:
    """``encoded`` (``DynamicCrossEncoder.encode``'s pairs) cut to ``max_length`` tokens as ``encode`` cuts
    them: the passage's tail goes, its closing [SEP] stays (truncation works on tokens, so this is exact). Also
    the positions of pairs whose query leaves no passage token at ``max_length``, which ``encode`` cuts
    otherwise: their rows are left as they were, for the caller to encode again."""
    cut: dict[str, list] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
    redo = []
    for position, (ids, types) in enumerate(zip(encoded["input_ids"], encoded["token_type_ids"])):
        if len(ids) > max_length:
            if types.count(0) + 2 > max_length:   # [CLS] query [SEP], one passage token, [SEP]
                redo.append(position)
            else:
                ids, types = ids[:max_length - 1] + ids[-1:], types[:max_length - 1] + types[-1:]
        cut["input_ids"].append(ids)
        cut["token_type_ids"].append(types)
        cut["attention_mask"].append([1] * len(ids))
    return cut, redo


def first_pass_order(first_scores: Sequence[float]) -> list[int]:
    """Positions the first pass of a cascade scored, best first (ties in first-stage order); its first
    ``keep`` go on to the second pass."""
    scored = [p for p, score in enumerate(first_scores) if not math.isnan(score)]
    return sorted(scored, key=lambda p: (-first_scores[p], p))


def cascade_values(count: int, order: Sequence[int], second_scores: Sequence[float]) -> list[float]:
    """One value per candidate of a cascade, in ``assemble``'s sense: the kept candidates' (``order``'s first
    ``len(second_scores)``) second-pass scores; below them the rest of ``order`` (kept ones the deadline left
    without a second score too), in that order; NaN where the first pass did not score."""
    values = [math.nan] * count
    for position, score in zip(order, second_scores):
        values[position] = score
    scored = [value for value in values if not math.isnan(value)]
    floor = min(scored) - 1.0 if scored else 0.0
    for rank, position in enumerate(p for p in order if math.isnan(values[p])):
        values[position] = floor - rank
    return values


def cascade_work(first: Mapping[str, float], second: Mapping[str, float], pruner_width: float) -> dict[str, float]:
    """The cost model's counts of a cascade: both passes' counts, the first pass's GFLOPs apart (another width)."""
    work = {name: float(first.get(name, 0)) + float(second.get(name, 0)) for name in WORK_FEATURES}
    work.update(gflops=float(second.get("gflops", 0.0)), prune_gflops=float(first.get("gflops", 0.0)),
                prune_width=pruner_width)
    return work


# ---------------------------------------------------------------------------------------------
# Checking input


def _token_types(group: Sequence[int], types: Sequence[Sequence[int]], lengths: Sequence[int],
                 length: int) -> torch.Tensor:
    """[rows, length] token types of the pairs at ``group``'s positions, padded with 0."""
    padded = np.zeros((len(group), length), dtype=np.int64)
    for row, position in enumerate(group):
        padded[row, :lengths[position]] = types[position]
    return torch.from_numpy(padded)


def _first_stage_order(candidates: Mapping[str, float] | Sequence[str]) -> list[str]:
    if isinstance(candidates, Mapping):
        for docid, score in candidates.items():
            if not isinstance(score, numbers.Real) or not math.isfinite(score):
                raise InputError(f"the first-stage score of candidate {docid!r} is {score!r}, expected a finite number")
        return [docid for docid, _ in trec_order(candidates)]
    if isinstance(candidates, (str, bytes)):
        raise InputError("candidates must be a mapping docid → first-stage score or a list of docids, got a string")
    docids = list(candidates)
    if len(set(docids)) != len(docids):
        seen: set[str] = set()
        duplicates = list(dict.fromkeys(d for d in docids if d in seen or seen.add(d)))
        raise InputError(f"duplicate docid(s) among the candidates: {', '.join(map(repr, duplicates[:5]))}"
                         + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""))
    return docids


def _ordered_beside(candidates: Mapping[str, float] | Sequence[str], texts: Mapping[str, str] | Sequence[str]
                    ) -> list[str]:
    """``_first_stage_order`` of ``candidates``, refusing a list of texts that could follow either of two
    orders: beside a mapping of candidates whose own order is not the first-stage order."""
    docids = _first_stage_order(candidates)
    if isinstance(candidates, Mapping) and not isinstance(texts, (Mapping, str, bytes)) and list(candidates) != docids:
        raise InputError("texts is a list, and the candidates mapping is not in first-stage order (score "
                         "descending, ties by docid descending): give texts as a mapping docid -> text")
    return docids


def _texts_for(reranked: list[str], docids: list[str], texts: Mapping[str, str] | Sequence[str]) -> list[str]:
    if isinstance(texts, Mapping):
        missing = [docid for docid in reranked if docid not in texts]
        if missing:
            raise InputError(f"no text for candidate {missing[0]!r}" +
                             (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        chosen = [texts[docid] for docid in reranked]
    else:
        if isinstance(texts, (str, bytes)):
            raise InputError("texts must be a mapping docid → text or a list of texts, got a string")
        texts = list(texts)
        if len(texts) != len(docids):
            raise InputError(f"{len(texts)} texts for {len(docids)} candidates; expected one text per candidate, "
                             f"in first-stage order")
        chosen = texts[:len(reranked)]
    for docid, text in zip(reranked, chosen):
        if not isinstance(text, str):
            raise InputError(f"the text of candidate {docid!r} is {type(text).__name__}, expected a string")
    return chosen


def _read_texts(collection: Any, docids: list[str]) -> list[str]:
    if hasattr(collection, "texts"):
        return collection.texts(docids)
    missing = [docid for docid in docids if docid not in collection]
    if missing:
        raise InputError(f"docid {missing[0]!r} is not in the collection" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [collection[docid] for docid in docids]
