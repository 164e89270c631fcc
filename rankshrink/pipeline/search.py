"""``Pipeline``: a first stage and a reranker behind one call, with a per-query latency budget.

>>> from rankshrink.pipeline import Pipeline
>>> pipeline = Pipeline(index="indexes/dl19-passages", model="models/trec-dl-offline",
...                     collection="../shared/trec-dl/dl19/passages.jsonl", candidates=100)
>>> seconds = pipeline.warm_up()      # before serving: the first search, texts and kernels, paid once
>>> hits = pipeline.search("what is durable medical equipment", k=10, budget_ms=200)
>>> hits[0]
Hit(docid='...', score=..., rank=1, text='...')

How queries share the machine (admission). Queries run **one at a time per model**, in arrival order:
each takes its turn for its first stage, its passage texts and its rerank, on every core torch has. On a
small CPU two reranks at once only slow each other down, and a first stage running beside a rerank slows
that rerank too, so a query in its turn runs exactly as it would alone. A query that arrives while others
run waits, and the wait counts against its budget. So that waiting queries still finish in time, and so
that a query ranks the same under load as alone, the reranker works to a **fixed share** of the budget:

    rerank budget = min(budget_ms / concurrency - overhead_ms, time left)

``concurrency`` is how many queries the caller runs at once (``batch_search`` raises it to its
``threads``); ``overhead_ms`` is set aside in each turn for the first stage and the texts (20 ms covers
BM25 on a small index with texts from a collection file; raise it for a large index or texts read from
the index). With at most ``concurrency`` queries in flight, a query waits for at most ``concurrency - 1``
turns of at most ``budget_ms / concurrency`` each, so it ends within its budget. The configuration is the
best one the model's profile predicts to fit ``(1 - headroom)`` of that share at its 95th percentile
(``headroom`` 0.2 by default), from the profile alone (not from the load measured on recent queries,
unless ``adapt_to_load``), so it does not depend on the load.

The **deadline** is at least the share, and stretches into the slack of the queries waiting behind: it is
the latest end that still leaves each waiting query ``budget_ms / concurrency`` for every turn ahead of it
and for its own (a query alone has its whole budget). So a rerank that runs slower than its prediction (a
page fault, the JVM's collector beside it) finishes instead of being cut short, which is what would make a
ranking differ from the unloaded one. The price: a pipeline declared for 4 concurrent queries plans each
rerank for a quarter of its budget even when it is alone. If more queries arrive than declared, or one
arrives while a turn runs into the slack of those already waiting, the time left is the smaller: the
budget still holds, but the ranking may then differ from the unloaded one.
"""
from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data import Collection, Run, open_collection, trec_order
from ..errors import InputError, check_integer
from ..rerank.budget import DEFAULT_HEADROOM, check_budget_ms, check_headroom, check_milliseconds

FirstStageKind = Literal["bm25", "dense", "hybrid"]
Dtype = Literal["auto", "bf16", "fp32"]
DEFAULT_OVERHEAD_MS = 20.0


@dataclass(frozen=True)
class Hit:
    """One ranked passage: ``rank`` starts at 1; ``text`` is the passage as it was scored."""

    docid: str
    score: float
    rank: int
    text: str


@dataclass(frozen=True)
class SearchStats:
    """Where one query's time went (milliseconds, wall clock) and what the reranker did."""

    latency_ms: float            # the whole call: first stage, texts, waiting, reranking
    first_stage_ms: float        # first-stage search and fetching the candidates' texts
    queued_ms: float             # waiting for the model while other queries reranked
    rerank_ms: float
    budget_ms: float | None      # the query's budget (None: fixed configuration)
    rerank_budget_ms: float | None   # the share the configuration was planned for: min(share, time left)
    candidates: int
    config: dict[str, Any] = field(default_factory=dict)   # width, depth, max_length, ... as the reranker chose
    deadline_hit: bool = False   # the reranker stopped at its deadline (some candidates kept first-stage order)
    rerank_deadline_ms: float | None = None   # how long the rerank was allowed: at least the share, see admission


# ---------------------------------------------------------------------------------------------
# Text at the boundary


def clean_text(text: str | bytes, what: str) -> str:
    """Text the tokenizer and Lucene accept: bytes are decoded as UTF-8, and invalid UTF-8 (bytes, or the lone
    surrogates that ``errors="surrogateescape"`` leaves in a str) becomes U+FFFD. Mojibake (``Â°``) is valid
    text and passes unchanged."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise InputError(f"{what}: expected a string, got {type(text).__name__} {text!r:.80}")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", errors="replace")
        return raw.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Admission: one rerank at a time per model, first come first served


class _Turns:
    """A first-come-first-served lock. ``threading.Lock`` lets a newcomer overtake a thread that has waited,
    which would break the bound on waiting that the budgets rely on; tickets keep arrival order. A waiter
    interrupted (Ctrl-C in the main thread) gives up its ticket, so the queue never stalls."""

    def __init__(self):
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()
        self._waiting: dict[int, tuple[float, float]] = {}   # ticket -> (must end by, seconds per turn)

    @contextmanager
    def turn(self, ends_by: float | None = None, per_turn_s: float = 0.0) -> Iterator[None]:
        """Wait for this caller's turn. ``ends_by`` (a ``time.perf_counter`` time) and ``per_turn_s`` (how long
        each turn ahead of it, and its own, may take) let the turn being served know how far it may run over
        (``spare_until``)."""
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            if ends_by is not None:
                self._waiting[ticket] = (ends_by, per_turn_s)
            try:
                while ticket != self._serving:
                    self._condition.wait()
            except BaseException:
                if ticket == self._serving:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise
            finally:
                self._waiting.pop(ticket, None)
        try:
            yield
        finally:
            with self._condition:
                self._advance()

    def spare_until(self) -> float:
        """The latest time the turn being served may end so that every waiting caller still has its turns
        ahead of it and its own within its ``ends_by`` (each taking ``per_turn_s``); infinity when none waits."""
        with self._condition:
            latest, queued_turns = math.inf, 0.0
            for ticket in sorted(self._waiting):
                ends_by, per_turn_s = self._waiting[ticket]
                queued_turns += per_turn_s
                latest = min(latest, ends_by - queued_turns)
            return latest

    def _advance(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._condition.notify_all()


_TURNS: "weakref.WeakKeyDictionary[Any, _Turns]" = weakref.WeakKeyDictionary()
_TURNS_LOCK = threading.Lock()


def turns_of(model: Any) -> _Turns:
    """The queue of one model, shared by every Pipeline that reranks with it."""
    with _TURNS_LOCK:
        turns = _TURNS.get(model)
        if turns is None:
            turns = _TURNS[model] = _Turns()
        return turns


# ---------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """First stage → reranker, as one object: ``search`` a query, ``batch_search`` topics, or ``rerank`` your
    own candidates.

    ``index`` is a Lucene index directory or Pyserini prebuilt name (``first_stage="bm25"``, the default), or
    any first-stage object with ``search(query, k)`` (``BM25``, ``DenseSearcher``, ``HybridSearcher``), given as
    ``index`` or as ``first_stage``.
    ``dense_index`` is the faiss index for ``"dense"`` and ``"hybrid"``. ``model`` is a model directory or
    hub id, a loaded ``DynamicCrossEncoder``, or a ``rankshrink.rerank.Reranker``; without a model, hits are
    the first stage's. Passage texts come from ``collection`` (a JSONL/TSV file or ir_datasets id) when
    given, else from the index. ``width``, ``depth``, ``max_length``, ``keep`` and ``prune_depth`` (a cascade:
    see ``Reranker``), ``exits`` fix the reranker when no budget is given; ``budget_ms`` (here or per call) lets
    the reranker choose, inside the budget.
    ``concurrency``, ``overhead_ms`` and ``headroom``: see the module's notes on admission.
    ``adapt_to_load=True`` lets the engine scale its latency predictions by the load it measured on recent
    queries (fewer deadline cuts on a busier machine, but a query's configuration, and so its ranking, then
    depends on what ran before it); by default the configuration depends on the budget alone. ``threads``:
    torch intra-op threads, for the whole process (default: those the model's profile was timed with).

    >>> pipeline = Pipeline(index="indexes/dl19-passages", model="models/trec-dl-offline",
    ...                     collection="../shared/trec-dl/dl19/passages.jsonl")
    >>> [hit.docid for hit in pipeline.search("what is durable medical equipment", k=3)]
    ['...', '...', '...']
    >>> run = pipeline.batch_search({"q1": "durable medical equipment"}, k=100)   # a Run, for write_run
    >>> pipeline.rerank("what is a cat", ["A cat is a small feline.", "Paris is in France."])[0].text
    'A cat is a small feline.'
    """

    def __init__(self, index: Any = None, model: Any = None, *, candidates: int = 100,
                 first_stage: FirstStageKind | Any = "bm25", dense_index: str | Path | None = None,
                 collection: str | Path | Collection | None = None, width: float = 1.0, depth: float = 1.0,
                 max_length: int = 256, exits: bool = True, dtype: Dtype = "auto", budget_ms: float | None = None,
                 concurrency: int = 1, overhead_ms: float = DEFAULT_OVERHEAD_MS, headroom: float = DEFAULT_HEADROOM,
                 adapt_to_load: bool = False, threads: int | None = None, keep: int | None = None,
                 prune_depth: float | None = None, **first_stage_options):
        check_integer("candidates", candidates, optional=False)
        check_integer("concurrency", concurrency, optional=False)
        self.overhead_ms = check_milliseconds("overhead_ms", overhead_ms, optional=False)
        check_budget_ms(budget_ms)
        self.candidates = candidates
        self.budget_ms = budget_ms
        self.concurrency = concurrency
        self.headroom = check_headroom(headroom)
        self.adapt_to_load = bool(adapt_to_load)
        self.first_stage = _open_first_stage(index, first_stage, dense_index, first_stage_options)
        self.collection = collection if collection is None or hasattr(collection, "texts") else \
            open_collection(collection)
        self.reranker = None if model is None else _open_reranker(
            model, width=width, depth=depth, max_length=max_length, candidates=candidates, exits=exits,
            dtype=dtype, threads=threads, keep=keep, prune_depth=prune_depth)
        model_of = getattr(self.reranker, "source_model", getattr(self.reranker, "model", self.reranker))
        self._turns = turns_of(model_of) if self.reranker is not None else None

    def __repr__(self) -> str:
        return (f"Pipeline(first_stage={self.first_stage!r}, reranker={self.reranker!r}, "
                f"candidates={self.candidates}, concurrency={self.concurrency})")

    def warm_up(self, query: str | None = None, passages: Sequence[str] | Mapping[str, str] | None = None,
                rounds: int = 2) -> float:
        """Pay the process's one-time costs before serving budgeted queries, so that the first ones do not pay
        them against their budgets: the first stage's first search and the collection's first read (on dl19
        ~420 ms together: eval/bench_warm_up.py) for ``query``, then the reranker's ``warm_up`` on what they
        found (or on ``passages``), in this pipeline's turn on the model. ``batch_search`` and ``rerank_run`` do
        it once by themselves when given a budget, on their first query. Returns the seconds it took."""
        from ..rerank.engine import WARM_UP_QUERY

        started = time.perf_counter()
        query = clean_text(WARM_UP_QUERY if query is None else query, "query")
        if passages is None and self.first_stage is not None and query.strip():
            passages = self._texts(self.first_stage.search(query, k=self.candidates)) or None
        if self.reranker is not None:
            with self._turns.turn():
                self.reranker.warm_up(query, passages, rounds)
        return time.perf_counter() - started

    def _warm_up_once(self, budget_ms: float | None, query: str, candidates: Callable[[], Mapping[str, float]]
                      ) -> None:
        """Before a budgeted batch: the reranker's warm-up on one query's candidates (``candidates()``: docid →
        first-stage score, asked for only when a warm-up is due), unless it has had one (the fixed
        configuration left out: budgeted queries climb the ladder)."""
        if not budget_ms or self.reranker is None or self.reranker.warmed_up:
            return
        texts = self._texts(candidates())
        if not texts:
            return
        with self._turns.turn():
            if not self.reranker.warmed_up:    # another batch may have warmed it up while this one waited
                self.reranker.warm_up(query, texts, fixed=False)

    # -- searching -------------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, budget_ms: float | None = None) -> list[Hit]:
        """The best ``k`` passages for ``query``, best first. ``budget_ms`` (default: the pipeline's) bounds the
        whole call, first stage included. An empty query has no hits.

        >>> pipeline.search("what is durable medical equipment", k=10, budget_ms=100)
        """
        return self.search_with_stats(query, k, budget_ms)[0]

    def search_with_stats(self, query: str, k: int = 10, budget_ms: float | None = None,
                          concurrency: int | None = None) -> tuple[list[Hit], SearchStats]:
        """``search``, and where the time went (``SearchStats``)."""
        started = time.perf_counter()
        check_integer("k", k, optional=False)
        budget_ms = self._budget(budget_ms)
        query = clean_text(query, "query")
        if self.first_stage is None:
            raise InputError("this Pipeline has no index: give index= to search, or call rerank(query, docs)")

        def candidates_and_texts() -> tuple[dict[str, float], list[str]]:
            candidates = self.first_stage.search(query, k=self.candidates) if query.strip() else {}
            return candidates, self._texts(candidates)

        scores, texts, stats = self._query(query, candidates_and_texts, budget_ms, k, started,
                                           concurrency or self.concurrency)
        return _hits(scores, texts, k), stats

    def batch_search(self, topics: Mapping[str, str], k: int | None = None, budget_ms: float | None = None,
                     threads: int = 1, progress: bool = False, with_stats: bool = False):
        """Search every topic ({qid: query}); a Run in the topics' order, each query cut to ``k`` (default:
        every candidate). ``threads`` workers submit queries at once (admission plans for at least that many);
        each query's budget runs from when a worker takes it. ``with_stats=True`` returns
        ``(run, {qid: SearchStats})``.

        >>> run = pipeline.batch_search(read_topics("../shared/trec-dl/dl19/topics.tsv"), budget_ms=200)
        """
        k = self.candidates if k is None else k
        check_integer("k", k, optional=False)
        if not isinstance(topics, Mapping):
            raise InputError(f"topics must be a mapping {{qid: query}}, got {type(topics).__name__}")
        concurrency = max(self.concurrency, check_integer("threads", threads, optional=False))
        budget = self._budget(budget_ms)
        if budget and self.first_stage is not None:
            queries = (clean_text(topics[qid], f"query {qid}") for qid in topics)
            first = next((query for query in queries if query.strip()), None)
            if first is not None:
                self._warm_up_once(budget, first, lambda: self.first_stage.search(first, k=self.candidates))

        def one(qid: str) -> tuple[Run, SearchStats]:
            hits, stats = self.search_with_stats(clean_text(topics[qid], f"query {qid}"), k, budget_ms, concurrency)
            return {hit.docid: hit.score for hit in hits}, stats

        results = _map_queries(one, [str(qid) for qid in topics], threads, progress, "searching")
        run = {qid: results[qid][0] for qid in map(str, topics)}
        return (run, {qid: results[qid][1] for qid in run}) if with_stats else run

    def rerank_run(self, run: Mapping[str, Mapping[str, float]], topics: Mapping[str, str], k: int | None = None,
                   budget_ms: float | None = None, threads: int = 1, progress: bool = False,
                   with_stats: bool = False):
        """Rerank an existing first-stage Run (e.g. read with ``read_run``): each query's top ``candidates`` by
        first-stage score, texts from ``collection`` (or the index); the rest follow, in first-stage order, so
        recall at the run's depth is kept. Each query is cut to ``k`` (default: all; early exits protect the
        top 10 then, ``k`` otherwise). Queries missing from ``topics`` raise ``InputError``.

        >>> reranked = pipeline.rerank_run(read_run("../shared/trec-dl/dl19/runs/bm25.top100.trec"), topics)
        """
        if k is not None:
            check_integer("k", k, optional=False)
        budget_ms = self._budget(budget_ms)
        missing = [qid for qid in run if qid not in topics]
        if missing:
            raise InputError(f"run query {missing[0]!r} has no topic" +
                             (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        concurrency = max(self.concurrency, check_integer("threads", threads, optional=False))
        first = next((qid for qid in run if run[qid]), None)
        if first is not None:
            self._warm_up_once(budget_ms, clean_text(topics[first], f"query {first}"),
                               lambda: dict(trec_order(run[first])[:self.candidates]))

        def one(qid: str) -> tuple[dict[str, float], SearchStats]:
            started = time.perf_counter()
            query = clean_text(topics[qid], f"query {qid}")
            first_stage = trec_order(run[qid])

            def candidates_and_texts() -> tuple[dict[str, float], list[str]]:
                candidates = dict(first_stage[:self.candidates])
                return candidates, self._texts(candidates)

            scores, _, stats = self._query(query, candidates_and_texts, budget_ms, k, started, concurrency)
            floor = min(scores.values(), default=0.0)
            for position, (docid, _) in enumerate(first_stage[self.candidates:], start=1):
                scores[docid] = floor - position
            return dict(trec_order(scores)[:k]), stats

        results = _map_queries(one, list(run), threads, progress, "reranking")
        reranked = {qid: results[qid][0] for qid in run}
        return (reranked, {qid: results[qid][1] for qid in run}) if with_stats else reranked

    def rerank(self, query: str, docs: Sequence[str] | Sequence[tuple[str, str]] | Mapping[str, str],
               top_k: int | None = None, budget_ms: float | None = None) -> list[Hit]:
        """Rerank your own candidates, best first, as sentence-transformers' ``CrossEncoder.rank`` does.
        ``docs`` is a list of texts (each hit's ``docid`` is then its position, as a string: ``"0"``, ``"1"``,
        ...), a list of ``(docid, text)`` pairs, or a ``{docid: text}`` mapping; their order is the
        first-stage order that a budget falls back on. Duplicate docids raise ``InputError``. Only the first
        ``candidates`` documents are reranked; the rest follow in the given order.

        >>> pipeline.rerank("what is a cat", ["Paris is in France.", "A cat is a small feline."], top_k=1)
        [Hit(docid='1', score=..., rank=1, text='A cat is a small feline.')]
        """
        started = time.perf_counter()
        if self.reranker is None:
            raise InputError("this Pipeline has no model: give model= to rerank")
        if top_k is not None:
            check_integer("top_k", top_k, optional=False)
        budget_ms = self._budget(budget_ms)
        query = clean_text(query, "query")
        docids, texts = _docs_as_pairs(docs)
        # first-stage order = the given order: strictly decreasing scores, so trec_order keeps it
        candidates = {docid: float(len(docids) - position) for position, docid in enumerate(docids)}
        scores, by_docid, _ = self._query(query, lambda: (candidates, texts), budget_ms, top_k, started,
                                          self.concurrency)
        return _hits(scores, by_docid, top_k or len(docids))

    # -- the parts ---------------------------------------------------------------------------------

    def _budget(self, budget_ms: float | None) -> float | None:
        return self.budget_ms if budget_ms is None else check_budget_ms(budget_ms)

    def _texts(self, candidates: Mapping[str, float]) -> list[str]:
        if not candidates:
            return []
        source = self.collection if self.collection is not None else self.first_stage
        if source is None or not hasattr(source, "texts"):
            raise InputError("passage texts are needed to rerank: give collection= (a JSONL/TSV file or an "
                             "ir_datasets id)")
        return [clean_text(text, f"passage {docid}") for docid, text in zip(candidates, source.texts(candidates))]

    def _query(self, query: str, candidates_and_texts, budget_ms: float | None, top_k: int | None,
               started: float, concurrency: int) -> tuple[dict[str, float], dict[str, str], SearchStats]:
        """One query in the model's turn: ``candidates_and_texts()`` (first stage, texts), then the reranker with
        min(the fixed share of the budget, the time left). Without a reranker: the first stage's scores."""
        if self.reranker is None:
            candidates, texts = candidates_and_texts()
            latency = _ms_since(started)
            return dict(candidates), dict(zip(candidates, texts)), SearchStats(
                latency, latency, 0.0, 0.0, budget_ms, None, len(candidates))
        queued_at = time.perf_counter()
        ends_by = None if budget_ms is None else started + budget_ms / 1000
        per_turn_s = 0.0 if budget_ms is None else budget_ms / concurrency / 1000
        with self._turns.turn(ends_by, per_turn_s):
            turn_started = time.perf_counter()
            candidates, texts = candidates_and_texts()
            by_docid = dict(zip(candidates, texts))
            rerank_started = time.perf_counter()
            rerank_budget = deadline_ms = None
            if budget_ms is not None:
                share = budget_ms / concurrency - self.overhead_ms
                left = budget_ms - (rerank_started - started) * 1000
                rerank_budget = max(0.0, min(share, left))
                spare = (self._turns.spare_until() - rerank_started) * 1000
                deadline_ms = max(0.0, min(left, max(share, spare))) if rerank_budget > 0 else 0.0
            if candidates:
                top = None if top_k is None else min(top_k, len(candidates))
                result = self._rerank(query, candidates, by_docid, rerank_budget, top, deadline_ms)
                scores, config, deadline_hit = result.scores, dict(result.stats.config), result.stats.deadline_hit
            else:
                scores, config, deadline_hit = {}, {}, False
        finished = time.perf_counter()
        stats = SearchStats(
            latency_ms=(finished - started) * 1000, first_stage_ms=(rerank_started - turn_started) * 1000,
            queued_ms=(turn_started - queued_at) * 1000, rerank_ms=(finished - rerank_started) * 1000,
            budget_ms=budget_ms, rerank_budget_ms=rerank_budget, candidates=len(candidates), config=config,
            deadline_hit=bool(deadline_hit), rerank_deadline_ms=deadline_ms)
        return scores, by_docid, stats

    def _rerank(self, query: str, candidates: dict[str, float], texts: dict[str, str], budget_ms: float | None,
                top_k: int | None, deadline_ms: float | None = None):
        """The engine's rerank. With a budget and a profile, the configuration is the best one the profile
        predicts to fit ``(1 - headroom) × budget`` (its 95th percentile), and the deadline is ``deadline_ms``
        (at least the budget): a query slower than predicted still ends in time, and no deadline cuts it short,
        so it ranks as on a quiet machine. Unless ``adapt_to_load``, the prediction is the profile's own: the
        engine would scale it by the load it measured on recent queries, which makes the configuration depend
        on what ran before."""
        controller = getattr(self.reranker, "controller", None)
        deadline_ms = budget_ms if deadline_ms is None else deadline_ms
        if budget_ms is None or controller is None:
            return self.reranker.rerank(query, candidates, texts, budget_ms=deadline_ms, top_k=top_k)
        point = self.reranker.choose(budget_ms, len(candidates), None if self.adapt_to_load else 1.0, self.headroom)
        return self.reranker.rerank_config(query, candidates, texts, point.config, top_k=top_k,
                                           deadline_ms=deadline_ms)


# ---------------------------------------------------------------------------------------------
# Helpers


def _open_first_stage(index: Any, kind: Any, dense_index: Any, options: dict):
    if not isinstance(kind, str):
        if not hasattr(kind, "search"):
            raise InputError(f"first_stage must be 'bm25', 'dense', 'hybrid' or an object with search(query, k), "
                             f"got {kind!r}")
        if index is not None or dense_index is not None or options:
            raise InputError("first_stage= is already a first-stage object; index=, dense_index= and BM25/fusion "
                             "options apply only to a named first stage")
        return kind
    if index is not None and hasattr(index, "search") and not isinstance(index, (str, Path)):
        if dense_index is not None or options:
            raise InputError("index= is already a first-stage object; dense_index= and BM25/fusion options "
                             "apply only when index= is a path")
        return index
    if index is None and dense_index is None:
        if options:
            raise InputError(f"first-stage options {sorted(options)} need index= or dense_index=")
        return None
    from ..firststage import open_first_stage

    try:
        first_stage = open_first_stage(kind, index=None if index is None else str(index),
                                       dense_index=None if dense_index is None else str(dense_index), **options)
    except TypeError as error:  # an option open_first_stage does not know
        raise InputError(f"first stage {kind!r}: {error}") from None
    keep_ctrl_c_in_python()
    return first_stage


def keep_ctrl_c_in_python() -> None:
    """The JVM that Pyserini starts installs its own SIGINT handler, which ends the process at once: no
    KeyboardInterrupt, so no clean-up (temp files stay behind). Hand SIGINT back to Python (main thread only,
    where Python's handler lives)."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.getsignal(signal.SIGINT))


def _open_reranker(model: Any, **options):
    """A ``rankshrink.rerank.Reranker`` for a path, a hub id, a loaded model, or a Reranker as given."""
    from ..rerank import Reranker

    if isinstance(model, Reranker):
        return model
    if isinstance(model, (str, Path)):
        model = _load_checked(model)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit:  # a longer max_length would index past the position embeddings
        options["max_length"] = min(options["max_length"], int(limit))
    if options.get("threads") is None:   # as `rankshrink rerank` does: the thread count the profile was timed at
        options["threads"] = ((getattr(model, "metadata", None) or {}).get("profile") or {}).get("threads")
    return Reranker(model, **options)


def _load_checked(model: str | Path):
    """``load_model``, and a reranker needs a tokenizer: an HF directory without one is an error naming the
    files (``load_model`` only warns, as a model can be scored from token ids)."""
    import warnings

    from ..model import load_model
    from ..model.io import TOKENIZER_FILES

    path = Path(model)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{path}: missing tokenizer files (expected {' or '.join(TOKENIZER_FILES)}); "
                         "a reranker tokenizes its input")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no tokenizer files.*")
        return load_model(model)


def _docs_as_pairs(docs: Any) -> tuple[list[str], list[str]]:
    if isinstance(docs, (str, bytes)):
        raise InputError("docs must be a list of passages, got a single string")
    if isinstance(docs, Mapping):
        items = [(str(docid), text) for docid, text in docs.items()]
    else:
        try:
            docs = list(docs)
        except TypeError:
            raise InputError(f"docs must be a list of texts or (docid, text) pairs, got {type(docs).__name__}") \
                from None
        if all(isinstance(doc, (str, bytes)) for doc in docs):
            items = [(str(position), doc) for position, doc in enumerate(docs)]
        elif all(isinstance(doc, (tuple, list)) and len(doc) == 2 for doc in docs):
            items = [(str(docid), text) for docid, text in docs]
        else:
            bad = next(doc for doc in docs if not isinstance(doc, (str, bytes)))
            raise InputError(f"docs must be all texts or all (docid, text) pairs, found {bad!r:.80}")
    docids = [docid for docid, _ in items]
    if len(set(docids)) != len(docids):
        seen: set[str] = set()
        duplicates = list(dict.fromkeys(d for d in docids if d in seen or seen.add(d)))
        raise InputError(f"duplicate docid(s) in the candidate list: {', '.join(map(repr, duplicates[:5]))}"
                         + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""))
    texts = []
    for docid, text in items:
        if text is None:
            raise InputError(f"passage {docid!r} has no text (None)")
        texts.append(clean_text(text, f"passage {docid!r}"))
    return docids, texts


def _hits(scores: Mapping[str, float], texts: Mapping[str, str], k: int) -> list[Hit]:
    return [Hit(docid, float(score), rank, texts[docid])
            for rank, (docid, score) in enumerate(trec_order(scores)[:k], start=1)]


def _map_queries(work, qids: list[str], threads: int, progress: bool, desc: str) -> dict:
    """``work(qid)`` for every qid, on ``threads`` workers; Ctrl-C cancels what has not started."""
    from tqdm.auto import tqdm

    results = {}
    with tqdm(total=len(qids), desc=desc, unit="query", disable=not progress, dynamic_ncols=True) as bar:
        if threads == 1:
            for qid in qids:
                results[qid] = work(qid)
                bar.update()
            return results
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rankshrink-search")
        try:
            futures = {pool.submit(work, qid): qid for qid in qids}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return results


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
