"""The ``train:`` section of a recipe (``pipelines/*.yaml``), as typed, checked dataclasses.

::

    train:
      base: ../shared/models/all-MiniLM-L6-v2   # any BERT checkpoint: local directory or hub id
      output: models/trec-dl-offline             # the model directory written at the end
      cache: cache/trec-dl-offline               # teacher scores, checkpoints, logs
      seed: 13
      data:                                      # listwise groups: candidates pooled from the runs
        - name: dl21
          topics: ../shared/trec-dl/dl21/topics.tsv
          collection: ../shared/trec-dl/dl21/passages.jsonl
          qrels: ../shared/trec-dl/dl21/qrels.txt          # optional: hard labels
          runs: {bm25: ../shared/trec-dl/dl21/runs/bm25.top100.trec, ...}
          held_out: 13                                     # queries kept aside for model selection
          repeat: 1                                        # optional: each training list N times an epoch,
                                                           # or per stage: {full: 5, rewire: 5} (others once)
        - name: msmarco-train                    # online: MS MARCO train, judged queries, BM25 negatives
          topics: msmarco-passage/train/judged             # ir_datasets ids work for topics, qrels, collection
          qrels: msmarco-passage/train/judged
          collection: msmarco-passage
          search: {index: msmarco-v1-passage, k: 30}       # candidates searched here (no runs: files)
          queries: 20000                                   # the first N judged queries, by qid
        - name: dl22-pseudo                      # augmentation: unlabelled keyword spans cut from the
          collection: ../shared/trec-dl/dl22/passages.jsonl  # passages (train/pseudo.py), BM25 candidates
          pseudo_queries: {count: 400, min_words: 3, max_words: 8}
          search: {k: 24}                                  # no index: the collection is indexed into the cache
          teacher: {sparse-encoder: ../shared/models/splade-tiny-msmarco}   # optional: this data set's own
      teacher:                                   # cross-encoder | bi-encoder | sparse-encoder | run | fusion
                                                 # (a hub id may add revision: a branch, tag or commit)
        fusion:
          - {bi-encoder: ../shared/models/all-MiniLM-L6-v2, weight: 1.0}
          - {run: splade-pp-ed, weight: 1.0}
      max_length: 96                             # tokens per (query, passage) pair while training
      list_size: 32                              # candidates per training list
      micro_batches: 2                           # a list runs as length-sorted slices (less padding; 1: one batch)
      dtype: bf16                                # autocast dtype for training: bf16 | fp32
      dropout: 0.0                               # optional: hidden and attention dropout (default: the base's)
      losses: {teacher_kl: 1.0, temperature: 1.0, labels_ce: 1.0, label_temperature: 0.5,
               hidden_mse: 1.0, inplace_kl: 1.0, exit_kl: 1.0}
      stages:
        full:   {steps: 1200, lr: 1.0e-4, eval_every: 200,   # the full network learns from teacher + labels
                 average: 0.998,                             # optional: keep an average of the weights
                 keep: last}                                 # the end's weights, or the best held-out step
        rewire: {lists: 64}                                  # importance over this many lists
        width:  {steps: 300, lr: 5.0e-5}                     # DynaBERT stage 1: widths, distilled from full
        depth:  {steps: 300, lr: 5.0e-5}                     # DynaBERT stage 2: widths x depths, + exit heads
        exits:  {steps: 600, lr: 1.0e-3, pooling: pair}      # FastBERT: new exit heads, the network frozen
      smoke: {queries: 4, candidates: 16, steps: 3}          # what --smoke shrinks everything to

Relative paths are relative to the directory the command runs in (the repository root).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError, check_integer
from .teacher import check_teacher_spec

STAGES = ("full", "rewire", "width", "depth", "exits")


@dataclass(frozen=True)
class DataSpec:
    name: str
    topics: str | None              # None only with pseudo_queries
    collection: str
    runs: dict[str, str] = field(default_factory=dict)
    qrels: str | None = None
    held_out: int = 0
    queries: int | None = None      # use only the first N queries (by qid; of the judged ones with search)
    candidates: int | None = None   # keep only the first N candidates of each query (smoke runs)
    search: SearchSpec | None = None   # candidates from a BM25 search instead of (or besides) run files
    pseudo_queries: PseudoQuerySpec | None = None   # queries cut from the collection's passages (pseudo.py)
    teacher: dict[str, Any] | None = None   # this data set's teacher, instead of the recipe's
    repeat: int | dict[str, int] = 1   # each training list this many times an epoch (weights a small data set);
                                       # a mapping ({full: 5}) names stages; the others draw each once

    def repeat_in(self, stage: str) -> int:
        """How many times each of this data set's training lists goes into an epoch of ``stage``."""
        return self.repeat.get(stage, 1) if isinstance(self.repeat, dict) else self.repeat


@dataclass(frozen=True)
class SearchSpec:
    """BM25 candidates for a data set's queries, searched once and cached as a TREC run."""

    index: str | None = None        # a Lucene index directory or a Pyserini prebuilt name (msmarco-v1-passage);
                                    # None: the data set's collection, indexed once into the cache
    k: int = 30
    name: str = "bm25"              # the run's name, for a ``{run: NAME}`` teacher
    k1: float | None = None         # BM25 parameters (default: Anserini's 0.9 / 0.4)
    b: float | None = None


@dataclass(frozen=True)
class PseudoQuerySpec:
    """Unlabelled queries cut from the data set's own passages; the teacher ranks their BM25 candidates."""

    count: int = 500
    min_words: int = 3
    max_words: int = 8


@dataclass(frozen=True)
class StageSpec:
    steps: int = 0
    lr: float = 5e-5
    warmup: float = 0.1             # fraction of the steps with a linear warm-up
    eval_every: int = 0             # evaluate on the held-out queries every N steps (0: at the end only)
    configs: int = 4                # sub-networks per step in width / depth stages (full + smallest + random)
    average: float = 0.0            # decay of an exponential moving average of the weights (0: none); the
                                    # average is what is evaluated, kept and passed on (train/averaging.py)
    keep: str = "best"              # full stage with eval_every: "best" held-out step, or "last" (the end's
                                    # weights; the held-out scores are only logged)


@dataclass(frozen=True)
class LossWeights:
    teacher_kl: float = 1.0         # listwise KL to the teacher's scores (soft labels)
    temperature: float = 1.0
    labels_ce: float = 1.0          # listwise CE on graded labels (hard labels), where there are any
    label_temperature: float = 0.5
    inplace_kl: float = 1.0         # sub-network ← full network's scores (DynaBERT)
    hidden_mse: float = 1.0         # sub-network ← full network's hidden states (TinyBERT's intermediate loss)
    exit_kl: float = 1.0            # exit heads ← the final layer's scores (FastBERT self-distillation)
    # Exit heads ← the mean of each list's final scores (the KL leaves a head's offset free; the engine ranks an
    # exited document among final scores). None: exit_kl's weight.
    exit_offset: float | None = None
    sub_labels_ce: float = 0.0      # sub-networks ← graded labels directly (the labels-only ablation)
    exit_labels_ce: float = 0.0     # exit heads ← graded labels directly (the labels-only ablation)
    # What width and depth stages distill from. "frozen" (DynaBERT): every configuration, the full one included,
    # learns from a frozen copy of the network as the full stage left it, so the full network does not drift
    # (with ~100 training queries, training it on teacher and labels for longer overfits). "inplace": the full
    # network keeps learning from teacher and labels, the sub-networks from it.
    reference: str = "frozen"


@dataclass(frozen=True)
class TrainSpec:
    base: str
    output: str
    data: tuple[DataSpec, ...]
    teacher: dict[str, Any] | None = None
    cache: str = "cache/train"
    seed: int = 13
    max_length: int = 96
    list_size: int = 32
    # Each list runs as this many length-sorted slices, each padded to its own longest pair (train/batches.py).
    micro_batches: int = 2
    dtype: Literal["bf16", "fp32"] = "bf16"
    # The network's dropout (hidden and attention) while it trains; None: the base's (0.1 for BERT checkpoints).
    dropout: float | None = None
    freeze_word_embeddings: bool = True
    rewire: bool = True
    losses: LossWeights = LossWeights()
    full: StageSpec = StageSpec()
    rewire_lists: int = 64
    width: StageSpec = StageSpec()
    depth: StageSpec = StageSpec()
    # FastBERT's stage: fresh exit heads reading exit_pooling, trained on the frozen network (0 steps: the exit
    # heads stay as the depth stage trained them, along with the network).
    exits: StageSpec = StageSpec()
    exit_pooling: str = "cls"
    # Which layers a depth keeps (model.dynabert.DEPTH_LAYERS). "prefix": the depth stage starts fresh exit heads
    # reading exit_pooling and trains them with the network, as each depth below 1 ends at one of them.
    depth_layers: str = "spread"
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    depths: tuple[float, ...] = (0.5, 0.75, 1.0)
    smoke: dict[str, int] = field(default_factory=lambda: {"queries": 4, "candidates": 16, "steps": 3})
    checkpoint_every: int = 100

    def smoke_version(self) -> "TrainSpec":
        """The same recipe shrunk to a few queries, candidates and steps: an end-to-end check in minutes."""
        queries, candidates, steps = (int(self.smoke.get(key, default)) for key, default in
                                      (("queries", 4), ("candidates", 16), ("steps", 3)))
        data = tuple(replace(spec, queries=queries + min(spec.held_out, 2), candidates=candidates,
                             held_out=min(spec.held_out, 2),
                             pseudo_queries=spec.pseudo_queries and replace(spec.pseudo_queries, count=queries))
                     for spec in self.data)
        shrink = lambda stage: replace(stage, steps=min(stage.steps, steps), eval_every=0)  # noqa: E731
        return replace(self, data=data, full=shrink(self.full), width=shrink(self.width), depth=shrink(self.depth),
                       exits=shrink(self.exits),
                       rewire_lists=min(self.rewire_lists, 2), list_size=min(self.list_size, 8),
                       max_length=min(self.max_length, 64), output=self.output + "-smoke",
                       cache=str(Path(self.cache) / "smoke"), checkpoint_every=max(1, steps))


def _check_loss_weights(losses: LossWeights, where: str) -> None:
    """Weights are numbers >= 0 (``exit_offset`` may be absent), temperatures numbers > 0."""
    for item in fields(LossWeights):
        value = getattr(losses, item.name)
        if item.name == "reference" or (item.name == "exit_offset" and value is None):
            continue
        temperature = item.name.endswith("temperature")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (temperature and value == 0):
            rule = "a temperature > 0" if temperature else "a weight >= 0"
            raise InputError(f"{where}.{item.name} must be {rule}, got {value!r}")


def _build(cls, values: Mapping[str, Any], where: str):
    if not isinstance(values, Mapping):
        raise InputError(f"{where}: expected a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    try:
        return cls(**{key: _typed(value, known[key].type, f"{where}.{key}") for key, value in values.items()})
    except TypeError as error:
        raise InputError(f"{where}: {error}") from None


def _typed(value: Any, annotation: str, where: str) -> Any:
    """``value`` checked against a plain field type (int, float, bool, str, optionally ``| None``); a float
    written without a dot (``1e-4``, which YAML reads as a string) becomes one."""
    kind = annotation.removesuffix(" | None")
    if value is None and kind != annotation:
        return None
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"{where}: expected a whole number, got {value!r}")
    if kind == "bool" and not isinstance(value, bool):
        raise InputError(f"{where}: expected true or false, got {value!r}")
    if kind == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)    # a name such as 2021, which YAML reads as a number
    if kind == "str" and (not isinstance(value, str) or not value.strip()):
        raise InputError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _at_least(value: float, least: float, where: str) -> None:
    if value < least:
        raise InputError(f"{where}: must be at least {least:g}, got {value!r}")


def _repeat(value: Any, where: str) -> int | dict[str, int]:
    """``repeat: N`` (every stage) or ``{stage: N}`` (the stages it names; the others once), its 1s dropped: a
    recipe that repeats nothing keeps the fingerprint it had without the key."""
    if not isinstance(value, Mapping):
        return check_integer(where, value, optional=False)
    unknown = sorted(set(value) - set(STAGES))
    if unknown:
        raise InputError(f"{where}: unknown stage(s) {unknown}; expected some of {', '.join(STAGES)}")
    counts = {stage: check_integer(f"{where}.{stage}", count, optional=False) for stage, count in value.items()}
    return {stage: count for stage, count in counts.items() if count != 1} or 1


def _pseudo_spec(item: Mapping[str, Any], where: str) -> PseudoQuerySpec:
    clashing = [key for key in ("topics", "qrels", "runs", "held_out") if item.get(key)]
    if clashing:
        raise InputError(f"{where}: pseudo_queries makes its own queries (unlabelled, candidates from search); "
                         f"remove {clashing}")
    if not item.get("search"):
        raise InputError(f"{where}: pseudo_queries need search (their BM25 candidates), e.g. search: {{k: 24}}")
    spec = _build(PseudoQuerySpec, item["pseudo_queries"] or {}, f"{where}.pseudo_queries")
    for key in ("count", "min_words", "max_words"):
        check_integer(f"{where}.pseudo_queries.{key}", getattr(spec, key), optional=False)
    if spec.min_words > spec.max_words:
        raise InputError(f"{where}.pseudo_queries: min_words {spec.min_words} > max_words {spec.max_words}")
    return spec


def train_spec_from_dict(section: Mapping[str, Any], where: str = "train") -> TrainSpec:
    """Check and type a recipe's ``train:`` mapping; errors name the key that is wrong."""
    section = dict(section)
    for key in ("base", "output", "data"):
        if key not in section:
            raise InputError(f"{where}: missing required key {key!r}")
    data = section.pop("data")
    if not isinstance(data, list) or not data:
        raise InputError(f"{where}.data: expected a non-empty list of data sets")
    specs = []
    for i, item in enumerate(data):
        pseudo = isinstance(item, Mapping) and item.get("pseudo_queries") is not None
        for key in ("name", "collection") + (() if pseudo else ("topics",)):
            if not isinstance(item, Mapping) or key not in item:
                raise InputError(f"{where}.data[{i}]: missing required key {key!r}")
        if pseudo:
            item = {**item, "topics": None,
                    "pseudo_queries": _pseudo_spec(item, f"{where}.data[{i}]")}
        if not item.get("runs") and not item.get("search"):
            raise InputError(f"{where}.data[{i}]: give runs (candidate run files) or search (a BM25 index)")
        if item.get("teacher") is not None:
            check_teacher_spec(item["teacher"], f"{where}.data[{i}].teacher")
        if not isinstance(item.get("runs") or {}, Mapping):
            raise InputError(f"{where}.data[{i}].runs: expected a mapping of run names to files, got {item['runs']!r}")
        earlier = [j for j, other in enumerate(data[:i]) if other.get("name") == item["name"]]
        if earlier:
            raise InputError(f"{where}.data[{i}].name {item['name']!r} is already data[{earlier[0]}]'s")
        item = {**item, "repeat": _repeat(item.get("repeat", 1), f"{where}.data[{i}].repeat")}
        search = item.get("search")
        if search is not None:
            search = _build(SearchSpec, search, f"{where}.data[{i}].search")
            check_integer(f"{where}.data[{i}].search.k", search.k, 2, optional=False)   # a list of 2 at least
            if search.name in (item.get("runs") or {}):
                raise InputError(f"{where}.data[{i}].search.name {search.name!r} is also a run's name")
        specs.append(_build(DataSpec, {**item, "runs": dict(item.get("runs") or {}), "search": search},
                            f"{where}.data[{i}]"))
    stages = dict(section.pop("stages", {}) or {})
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise InputError(f"{where}.stages: unknown stage(s) {unknown}; expected {', '.join(STAGES)}")
    # TrainSpec fields that a stage's settings fill in: set at the top level, a stage's would silently overrule them.
    for key, stage, inner in (("exit_pooling", "exits", "pooling"), ("depth_layers", "depth", "layers"),
                              ("rewire", "rewire", "enabled"), ("rewire_lists", "rewire", "lists")):
        if key in section:
            raise InputError(f"{where}: {key} belongs to the {stage} stage (stages: {{{stage}: {{{inner}: ...}}}})")
    from ..model.dynabert import DEPTH_LAYERS, EXIT_POOLINGS   # here: reading a recipe does not otherwise need torch

    def pooling_of(stage: dict, name: str) -> str:
        pooling = stage.pop("pooling", "pair")
        if pooling not in EXIT_POOLINGS:
            raise InputError(f"{where}.stages.{name}.pooling: expected one of {list(EXIT_POOLINGS)}, got {pooling!r}")
        return pooling

    depth = dict(stages.get("depth") or {})
    layers = depth.pop("layers", "spread")
    if layers not in DEPTH_LAYERS:
        raise InputError(f"{where}.stages.depth.layers: expected one of {list(DEPTH_LAYERS)}, got {layers!r}")
    if layers == "prefix":
        if "exits" in stages:
            raise InputError(f"{where}.stages: with depth layers: prefix, every depth ends at an exit head that the "
                             f"depth stage trains with the network; an exits stage would replace them (remove it)")
        section["exit_pooling"], section["depth_layers"] = pooling_of(depth, "depth"), layers
    elif "pooling" in depth:
        raise InputError(f"{where}.stages.depth.pooling: only with layers: prefix (else the exits stage's pooling)")
    if "depth" in stages:
        stages["depth"] = depth
    if "exits" in stages:
        exits = dict(stages["exits"] or {})
        section["exit_pooling"] = pooling_of(exits, "exits")
        stages["exits"] = exits
    for name in ("full", "width", "depth", "exits"):
        if name in stages:
            stage = section[name] = _build(StageSpec, stages[name] or {}, f"{where}.stages.{name}")
            if not 0.0 <= stage.average < 1.0:
                raise InputError(f"{where}.stages.{name}.average: a decay in [0, 1) (0: no average), "
                                 f"got {stage.average!r}")
            if stage.keep not in ("best", "last") or (stage.keep == "last" and name != "full"):
                raise InputError(f"{where}.stages.{name}.keep: best or last, and last only in the full stage (the "
                                 f"one evaluated on held-out queries), got {stage.keep!r}")
            if not stage.lr > 0 or not 0 <= stage.warmup <= 1:
                raise InputError(f"{where}.stages.{name}: lr must be > 0 and warmup a fraction in [0, 1], got "
                                 f"{stage.lr!r} and {stage.warmup!r}")
            for key, least in (("steps", 0), ("eval_every", 0), ("configs", 1 if name == "full" else 2)):
                _at_least(getattr(stage, key), least, f"{where}.stages.{name}.{key}")
    if "rewire" in stages:
        rewire = stages["rewire"] or {}
        if not isinstance(rewire, Mapping) or set(rewire) - {"enabled", "lists"}:
            raise InputError(f"{where}.stages.rewire: expected some of enabled, lists; got {rewire!r}")
        section["rewire"] = _typed(rewire.get("enabled", True), "bool", f"{where}.stages.rewire.enabled")
        section["rewire_lists"] = _typed(rewire.get("lists", 64), "int", f"{where}.stages.rewire.lists")
        _at_least(section["rewire_lists"], 1, f"{where}.stages.rewire.lists")
    if "losses" in section:
        section["losses"] = _build(LossWeights, section["losses"] or {}, f"{where}.losses")
        _check_loss_weights(section["losses"], f"{where}.losses")
        if section["losses"].reference not in ("frozen", "inplace"):
            raise InputError(f"{where}.losses.reference must be frozen or inplace, got {section['losses'].reference!r}")
    for key in ("widths", "depths"):
        if key in section:
            values = section[key]
            if not isinstance(values, list) or not values:
                raise InputError(f"{where}.{key}: expected a list of fractions in (0, 1] with 1.0, got {values!r}")
            section[key] = tuple(_typed(value, "float", f"{where}.{key}") for value in values)
            if not all(0 < value <= 1 for value in section[key]) or 1.0 not in section[key]:
                raise InputError(f"{where}.{key}: expected fractions in (0, 1] with 1.0, got {values!r}")
    if section.get("teacher") is not None:
        check_teacher_spec(section["teacher"], f"{where}.teacher")
    spec = _build(TrainSpec, {**section, "data": tuple(specs)}, where)
    if spec.dtype not in ("bf16", "fp32"):
        raise InputError(f"{where}.dtype: expected bf16 or fp32, got {spec.dtype!r}")
    if spec.list_size < 2:
        raise InputError(f"{where}.list_size: a list needs at least 2 candidates, got {spec.list_size}")
    if spec.dropout is not None and not 0 <= spec.dropout < 1:
        raise InputError(f"{where}.dropout: a probability in [0, 1), got {spec.dropout!r}")
    _at_least(spec.max_length, 8, f"{where}.max_length")
    _at_least(spec.micro_batches, 1, f"{where}.micro_batches")
    _at_least(spec.checkpoint_every, 1, f"{where}.checkpoint_every")
    if not isinstance(spec.smoke, Mapping) or set(spec.smoke) - {"queries", "candidates", "steps"}:
        raise InputError(f"{where}.smoke: expected some of queries, candidates, steps; got {spec.smoke!r}")
    for key, value in spec.smoke.items():
        check_integer(f"{where}.smoke.{key}", value, optional=False)
    return spec
