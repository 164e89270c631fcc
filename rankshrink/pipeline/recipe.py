"""End-to-end recipes: ``rankshrink run pipelines/NAME.yaml`` does index → search → rerank (fixed
configurations and budgets) → eval → a table and a plot under ``eval/NAME/``.

The recipe schema (YAML; relative paths are relative to the directory ``rankshrink run`` starts in, the
repository root, as in ``indexes/*.yaml``)::

    name: trec-dl-offline            # optional; default: the file name. Results land in eval/<name>/
    description: one line            # optional
    train: {...}                     # optional, owned by ``rankshrink train``: read here as an opaque block. When
                                     # rerank.model does not exist yet, run trains it first (rankshrink.train).
    index:                           # optional: build the first-stage index when it is missing
      recipe: indexes/dl19-passages.yaml   # an index recipe, or its keys inline (collection, index, threads,
                                           # dense, encoder, faiss, dtype, max_length)
    search:                          # where the candidates come from (required)
      topics: ../shared/trec-dl/dl19/topics.tsv     # file or ir_datasets id (required)
      run: ../shared/trec-dl/dl19/runs/bm25.top100.trec   # either an existing first-stage TREC run ...
      first_stage: bm25              # ... or a search: bm25 | dense | hybrid (default bm25)
      index: indexes/dl19-passages   # Lucene index or Pyserini prebuilt name (default: index.index)
      dense_index: indexes/dl19-minilm     # for dense / hybrid
      k1: 0.9                        # BM25 (also b); hybrid: method (rrf|sum), weights, rrf_k, depth
      name: bm25                     # the first stage's row in the table (default: first_stage or run file stem)
      k: 100                         # hits per query (default: rerank.candidates, or 1000 without rerank)
    rerank:                          # optional: without it the recipe evaluates the first stage only
      model: models/trec-dl-offline  # model directory or Hugging Face id (default: train.output)
      collection: ../shared/trec-dl/dl19/passages.jsonl    # passage texts (default: the index's stored text)
      candidates: 100                # first-stage candidates reranked per query (default 100)
      max_length: 256                # tokens per (query, passage) pair (default 256)
      exits: true                    # early exits with calibrated thresholds, where the model has them
      dtype: auto                    # auto | bf16 | fp32
      configs:                       # fixed configurations, one run each (default: [{width: 1, depth: 1}])
        - {width: 1.0, depth: 1.0}
        - {width: 0.5, depth: 0.5, name: w50-d50}
        - {width: 1.0, depth: 1.0, keep: 30}   # a cascade: the smallest sub-network keeps the best 30 for this one
        - {width: 0.5, depth: 1.0, keep: 30, prune_depth: 0.75}   # the same, its first pass at depth 0.75
      budgets_ms: [50, 100, 200, 400]    # per-query budgets, one run each: the controller chooses
      threads: 1                     # queries in flight at once (admission plans for this many)
    profile:                         # optional: dev data to profile the model on when it has no profile yet
      run: ../shared/trec-dl/dl21/runs/bm25.top100.trec   # (budget rows need one: rankshrink profile)
      topics: ../shared/trec-dl/dl21/topics.tsv
      collection: ../shared/trec-dl/dl21/passages.jsonl
      qrels: ../shared/trec-dl/dl21/qrels.txt        # optional: without, agreement with the full network judges
      queries: 30                    # optional: profile on the first N judged dev queries; also time_queries,
                                     # max_lengths, candidates: as rankshrink profile's options
    eval:
      qrels: ../shared/trec-dl/dl19/qrels.txt        # file or ir_datasets id (required)
      metrics: [ndcg@10, mrr@10, map, recall@100]    # the first one is plotted against latency
      baseline: first-stage          # a row name; significance marks are against it (default: the first stage)
      tolerance: 0.002               # how far a rerun may be from the committed results (fixed rows)
      budget_tolerance: 0.02         # ... for budget rows, which depend on the machine's speed
    output: eval/trec-dl-offline     # optional: where results.json, table.md and the plot go
    runs: runs/trec-dl-offline       # optional: where the TREC runs and per-query stats go (git-ignored)

What ``run`` writes, each file atomically (an interrupted run leaves complete files or none):
``runs/<name>/<row>.trec`` and ``<row>.stats.json`` per row; then ``<output>/results.json`` (every row's
metrics, per-query values, latency and chosen configurations), ``<output>/table.md`` and
``<output>/<metric>-vs-latency.png``. ``run --check`` writes elsewhere and compares the new results with the
committed ``results.json`` (on the queries it ran) within the tolerances.

>>> from rankshrink.pipeline.recipe import read_recipe, run_recipe
>>> results = run_recipe(read_recipe("pipelines/trec-dl-offline.yaml"))
>>> results.rows[1].metrics["ndcg@10"]
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data import (Run, Topics, atomic_write, open_collection, read_qrels, read_run, read_topics, trec_order,
                    write_run)
from ..errors import InputError, check_integer, check_number
from ..rerank.budget import RerankConfig

RowKind = Literal["first-stage", "fixed", "budget"]
RESULTS_FILE, TABLE_FILE = "results.json", "table.md"
RESULTS_FORMAT = "rankshrink-results/1"

# Each section's keys and what their values must be; train: is opaque (owned by rankshrink train).
_TOP_KEYS = {"name": str, "description": str, "train": dict, "index": dict, "search": dict, "rerank": dict,
             "profile": dict, "eval": dict, "output": str, "runs": str}
_PROFILE_KEYS = {"run": str, "topics": str, "collection": str, "qrels": str, "queries": int, "time_queries": int,
                 "max_lengths": list, "candidates": list}
_INDEX_KEYS = {"recipe": str, "collection": str, "index": str, "threads": int, "description": str, "source": str,
               "dense": bool, "encoder": str, "faiss": str, "dtype": str, "max_length": int}
_SEARCH_KEYS = {"topics": str, "k": int, "run": str, "first_stage": str, "index": str, "dense_index": str, "k1": float,
                "b": float, "method": str, "weights": list, "rrf_k": float, "depth": int, "name": str}
_RERANK_KEYS = {"model": str, "collection": str, "candidates": int, "max_length": int, "exits": bool,
                "dtype": str, "configs": list, "budgets_ms": list, "threads": int, "overhead_ms": float}
_CONFIG_KEYS = {"width": float, "depth": float, "max_length": int, "keep": int, "prune_depth": float, "name": str}
_ROW_KNOBS = ("width", "depth", "max_length", "keep", "prune_depth")   # a fixed row's RerankConfig fields
_EVAL_KEYS = {"qrels": str, "metrics": list, "baseline": str, "tolerance": float, "budget_tolerance": float}


# ---------------------------------------------------------------------------------------------
# Reading a recipe


@dataclass
class Recipe:
    """A checked recipe: the sections as plain dicts, defaults filled in."""

    path: Path
    name: str
    description: str
    index: dict[str, Any] | None
    search: dict[str, Any]
    rerank: dict[str, Any] | None
    eval: dict[str, Any]
    output: Path
    runs: Path
    train: dict[str, Any] | None = None   # opaque: handed to rankshrink.train as it is
    profile: dict[str, Any] | None = None


def read_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe: unknown keys, wrong types and missing required keys raise ``InputError``
    naming the file and the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping with sections search, rerank, eval")
    _check_keys(raw, _TOP_KEYS, path, "")
    for section in ("search", "eval"):
        if section not in raw:
            raise InputError(f"{path}: missing section '{section}:'")
    index = _index_section(raw.get("index"), path)
    search = _check_keys(dict(raw["search"]), _SEARCH_KEYS, path, "search.")
    _require(search, "topics", path, "search.")
    check_integer(f"{path}: search.k", search.get("k"))
    if "run" not in search:
        search.setdefault("first_stage", "bm25")
        if search["first_stage"] not in ("bm25", "dense", "hybrid"):
            raise InputError(f"{path}: search.first_stage must be bm25, dense or hybrid, got {search['first_stage']!r}")
        if "index" not in search and index and "index" in index and not index.get("dense"):
            search["index"] = index["index"]
        if "dense_index" not in search and index and index.get("dense") and "index" in index:
            search["dense_index"] = index["index"]
    elif "first_stage" in search or "index" in search or "dense_index" in search:
        raise InputError(f"{path}: search.run gives the candidates; drop first_stage / index / dense_index "
                         "(or drop run to search)")
    search.setdefault("name", Path(search["run"]).name.split(".")[0] if "run" in search else search["first_stage"])
    rerank_raw = raw.get("rerank")
    trained = raw.get("train") or {}
    if isinstance(rerank_raw, dict) and "model" not in rerank_raw and isinstance(trained, dict) \
            and isinstance(trained.get("output"), str):
        rerank_raw = {**rerank_raw, "model": trained["output"]}     # the model the train: section makes
    rerank = _rerank_section(rerank_raw, path, search["name"])
    evaluation = _check_keys(dict(raw["eval"]), _EVAL_KEYS, path, "eval.")
    _require(evaluation, "qrels", path, "eval.")
    evaluation.setdefault("metrics", ["ndcg@10", "mrr@10", "map", "recall@100"])
    if not evaluation["metrics"] or not all(isinstance(m, str) for m in evaluation["metrics"]):
        raise InputError(f"{path}: eval.metrics must be a list of metric names such as ndcg@10")
    from ..metrics import ranx_metric_name

    for metric in evaluation["metrics"]:
        try:
            ranx_metric_name(metric)
        except InputError as error:
            raise InputError(f"{path}: eval.metrics: {error}") from None
    evaluation.setdefault("baseline", search["name"])
    evaluation.setdefault("tolerance", 0.002)
    evaluation.setdefault("budget_tolerance", 0.02)
    profile = None
    if raw.get("profile") is not None:
        profile = _check_keys(dict(raw["profile"]), _PROFILE_KEYS, path, "profile.")
        for key in ("run", "topics", "collection"):
            _require(profile, key, path, "profile.")
    name = raw.get("name") or path.name.removesuffix(".yaml").removesuffix(".yml")
    return Recipe(path=path, name=name, description=raw.get("description", ""), index=index, search=search,
                  rerank=rerank, eval=evaluation, output=Path(raw.get("output") or Path("eval") / name),
                  runs=Path(raw.get("runs") or Path("runs") / name), train=raw.get("train"), profile=profile)


def _index_section(section: dict | None, path: Path) -> dict | None:
    if section is None:
        return None
    section = _check_keys(dict(section), _INDEX_KEYS, path, "index.")
    if "recipe" in section:
        import yaml

        index_recipe = Path(section.pop("recipe"))
        if not index_recipe.is_file():
            raise InputError(f"{path}: index.recipe {index_recipe}: no such file")
        included = yaml.safe_load(index_recipe.read_text(encoding="utf-8"))
        if not isinstance(included, dict):
            raise InputError(f"{index_recipe}: expected a mapping with keys collection, index")
        _check_keys(included, _INDEX_KEYS, index_recipe, "")
        section = {**included, **section}
    for key in ("collection", "index"):
        _require(section, key, path, "index.")
    return section


def _rerank_section(section: dict | None, path: Path, first_stage: str) -> dict | None:
    if section is None:
        return None
    section = _check_keys(dict(section), _RERANK_KEYS, path, "rerank.")
    _require(section, "model", path, "rerank.")
    section.setdefault("candidates", 100)
    section.setdefault("max_length", 256)
    section.setdefault("exits", True)
    section.setdefault("dtype", "auto")
    section.setdefault("threads", 1)
    section.setdefault("budgets_ms", [])
    configs = section.setdefault("configs", [{"width": 1.0, "depth": 1.0}] if not section["budgets_ms"] else [])
    if section["dtype"] not in ("auto", "bf16", "fp32"):
        raise InputError(f"{path}: rerank.dtype must be auto, bf16 or fp32, got {section['dtype']!r}")
    _check_config(path, "rerank", max_length=section["max_length"], candidates=section["candidates"])
    for number, config in enumerate(configs, start=1):
        if not isinstance(config, dict):
            raise InputError(f"{path}: rerank.configs[{number}] must be a mapping like {{width: 0.5, depth: 1.0}}")
        _check_keys(config, _CONFIG_KEYS, path, f"rerank.configs[{number}].")
        for key, default in (("width", 1.0), ("depth", 1.0), ("max_length", section["max_length"]), ("keep", None),
                             ("prune_depth", None)):
            config.setdefault(key, default)
        _check_config(path, f"rerank.configs[{number}]", **{key: config[key] for key in _ROW_KNOBS})
        config.setdefault("name", _config_name(config))
    for budget in section["budgets_ms"]:
        check_number(f"{path}: rerank.budgets_ms", budget, lambda value: 0 <= value < math.inf,
                     "numbers of milliseconds >= 0", optional=False)
    names = [first_stage] + [config["name"] for config in configs] + [budget_row_name(b) for b in section["budgets_ms"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{path}: rows named twice (rerank rows and the first stage's search.name): "
                         f"{', '.join(duplicates)}")
    return section


def _check_config(path: Path, where: str, **knobs) -> None:
    """The reranker's own rules for these knobs (``RerankConfig``), an error naming the file and place."""
    try:
        RerankConfig(**knobs)
    except InputError as error:
        raise InputError(f"{path}: {where}: {error}") from None


def _check_keys(section: dict, allowed: Mapping[str, type], path: Path, prefix: str) -> dict:
    if not isinstance(section, dict):
        raise InputError(f"{path}: {prefix.rstrip('.') or 'the recipe'} must be a mapping")
    unknown = sorted(set(map(str, section)) - set(allowed))
    if unknown:
        raise InputError(f"{path}: unknown key {prefix}{unknown[0]}; expected one of {', '.join(sorted(allowed))}")
    for key, value in section.items():
        expected = allowed[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok and value is not None:
            raise InputError(f"{path}: {prefix}{key} must be {_type_name(expected)}, got {value!r}")
        if value is None:
            raise InputError(f"{path}: {prefix}{key} is empty; give {_type_name(expected)} or leave the key out")
    return section


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
            dict: "a mapping"}[kind]


def _require(section: dict, key: str, path: Path, prefix: str) -> None:
    if key not in section:
        raise InputError(f"{path}: missing {prefix}{key}")


def budget_row_name(budget_ms: float) -> str:
    return f"budget-{budget_ms:g}ms"


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One line of the table: a run and how it scored."""

    name: str
    kind: RowKind
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]           # metric -> qid -> value
    budget_ms: float | None = None
    config: dict[str, Any] = field(default_factory=dict)         # fixed rows: width, depth, max_length
    latency_ms: dict[str, float] = field(default_factory=dict)   # median / p95 / max per query (reranked rows)
    deadline_hits: int = 0
    configs_chosen: dict[str, int] = field(default_factory=dict)  # budget rows: "w0.5-d1-L128" -> queries


@dataclass
class Results:
    recipe: str
    name: str
    queries: list[str]
    metrics: list[str]
    baseline: str
    rows: list[Row]
    significant: dict[str, dict[str, str]] = field(default_factory=dict)   # row -> metric -> "▲" | "▼"
    environment: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"format": RESULTS_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any], where: Path) -> "Results":
        if value.get("format") != RESULTS_FORMAT:
            raise InputError(f"{where}: not a rankshrink results file (format {value.get('format')!r}, "
                             f"expected {RESULTS_FORMAT!r})")
        fields = {key: value[key] for key in value if key != "format"}
        fields["rows"] = [Row(**row) for row in fields["rows"]]
        return cls(**fields)


def read_results(path: str | Path) -> Results:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such results file (run the recipe once to create it)")
    try:
        return Results.from_json(json.loads(path.read_text(encoding="utf-8")), path)
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise InputError(f"{path}: not a readable results file ({error})") from None


# ---------------------------------------------------------------------------------------------
# Running


def run_recipe(recipe: Recipe, *, output: str | Path | None = None, queries: int | None = None,
               budgets: bool = True, progress: bool = True, log=print) -> Results:
    """Index (when missing) → first stage → rerank at each configuration and budget → evaluate; writes the runs
    under ``recipe.runs`` and ``results.json``, ``table.md`` and the plot under ``output`` (default:
    ``recipe.output``). ``queries`` keeps the first N topics (for a quick check); ``budgets=False`` skips the
    budget rows (they depend on the machine's speed).

    >>> results = run_recipe(read_recipe("pipelines/trec-dl-offline.yaml"), queries=5)
    """
    output = Path(output) if output is not None else recipe.output
    runs_dir = recipe.runs if output == recipe.output else output / "runs"
    topics = read_topics(recipe.search["topics"])   # an ir_datasets fetch that fails is an InputError
    qrels = read_qrels(recipe.eval["qrels"])
    if check_integer("queries", queries) is not None:
        topics = dict(list(topics.items())[:queries])
    model = _ensure_model(recipe, log)
    if budgets:
        _ensure_profile(recipe, model, progress, log)
    _ensure_index(recipe, progress, log)

    first_stage, first_stats = _first_stage_run(recipe, topics, log)
    write_run(first_stage, runs_dir / f"{recipe.search['name']}.trec", tag=_tag(recipe.search["name"]))
    runs: dict[str, Run] = {recipe.search["name"]: first_stage}
    rows_info: dict[str, dict[str, Any]] = {recipe.search["name"]: {"kind": "first-stage", **first_stats}}

    if recipe.rerank is not None:
        for name, run, info in _rerank_rows(recipe, model, first_stage, topics, budgets, progress, log):
            write_run(run, runs_dir / f"{name}.trec", tag=_tag(name))
            with atomic_write(runs_dir / f"{name}.stats.json") as out:
                json.dump(info.pop("per_query_stats"), out, indent=1)
            runs[name], rows_info[name] = run, info

    results = _evaluate(recipe, runs, rows_info, qrels, topics)
    write_results(results, output)
    log(f"runs in {runs_dir}/; table, results and plot in {output}/")
    return results


def _ensure_model(recipe: Recipe, log) -> str | None:
    if recipe.rerank is None:
        return None
    model = recipe.rerank["model"]
    if Path(model).exists() or recipe.train is None:
        return model
    try:
        from ..train import train_recipe
    except ImportError:
        raise InputError(f"{recipe.path}: rerank.model {model} does not exist; it is what the recipe's train: "
                         f"section produces, and this rankshrink cannot train (no rankshrink.train)") from None
    log(f"{model} does not exist: training it from {recipe.path} first (rankshrink train {recipe.path})")
    trained = train_recipe(recipe.train, log=log)
    if not Path(model).exists():
        raise InputError(f"{recipe.path}: training finished in {trained}, but rerank.model names {model}")
    return model


def _ensure_profile(recipe: Recipe, model: str | None, progress: bool, log) -> None:
    """Budget rows need the model's profile: make it from the recipe's profile: section when it is missing."""
    if model is None or not recipe.rerank["budgets_ms"] or recipe.profile is None:
        return
    from ..model.io import MANIFEST

    manifest = Path(model) / MANIFEST
    if not manifest.is_file() or (json.loads(manifest.read_text(encoding="utf-8")).get("metadata") or {}).get("profile"):
        return
    from ..model import load_model
    from ..rerank.profiling import profile, save_profile

    section = recipe.profile
    grid = {key: section[key] for key in ("max_lengths", "candidates") if key in section}
    log(f"{model} has no profile: profiling it on {section['run']} first (rankshrink profile)")
    result = profile(load_model(model), read_run(section["run"]), read_topics(section["topics"]),
                     open_collection(section["collection"]),
                     read_qrels(section["qrels"]) if section.get("qrels") else None, **grid,
                     queries=section.get("queries"), time_queries=section.get("time_queries", 20),
                     dtype=recipe.rerank["dtype"], progress=progress,
                     dev_name=f"{section['run']} ({section.get('qrels') or 'no qrels'})")
    save_profile(model, result)


def _ensure_index(recipe: Recipe, progress: bool, log) -> None:
    section = recipe.index
    if section is None or Path(section["index"]).exists():
        return
    log(f"building {section['index']} from {section['collection']}")
    from ..firststage.jvm import start_jvm
    from .search import keep_ctrl_c_in_python

    start_jvm()
    keep_ctrl_c_in_python()
    if section.get("dense"):
        from ..firststage import build_dense_index

        build_dense_index(section["collection"], section["index"], section["encoder"],
                          faiss_kind=section.get("faiss", "flat"), dtype=section.get("dtype", "auto"),
                          max_length=section.get("max_length"), progress=progress)
    else:
        from ..firststage import build_index

        build_index(section["collection"], section["index"], threads=section.get("threads", 2), progress=progress)


def _first_stage_run(recipe: Recipe, topics: Topics, log) -> tuple[Run, dict[str, Any]]:
    search = recipe.search
    depth = search.get("k") or (recipe.rerank["candidates"] if recipe.rerank else 1000)
    if "run" in search:
        run = read_run(search["run"])
        kept = {qid: dict(trec_order(run[qid])[:search["k"]]) if "k" in search else run[qid]
                for qid in topics if qid in run}
        missing = [qid for qid in topics if qid not in run]
        if missing:
            log(f"{search['run']}: no candidates for {len(missing)} of {len(topics)} topics ({', '.join(missing[:5])})")
        return {**{qid: {} for qid in missing}, **kept}, {"config": {"run": search["run"]}}
    searcher = _open_first_stage(search)
    started = time.perf_counter()
    run = searcher.batch_search(topics, k=depth, threads=2)
    seconds = time.perf_counter() - started
    log(f"{search['name']}: searched {len(topics)} topics in {seconds:.1f} s")
    return run, {"config": {key: search[key] for key in search if key not in ("topics", "name")}}


def _open_first_stage(search: dict[str, Any]):
    from ..firststage import open_first_stage

    from .search import keep_ctrl_c_in_python

    options = {key: search[key] for key in ("k1", "b", "method", "weights", "rrf_k", "depth") if key in search}
    searcher = open_first_stage(search["first_stage"], index=search.get("index"),
                                dense_index=search.get("dense_index"), **options)
    keep_ctrl_c_in_python()
    return searcher


def _rerank_rows(recipe: Recipe, model: str, first_stage: Run, topics: Topics, budgets: bool, progress: bool, log):
    """(row name, run, info) for each fixed configuration, then each budget."""
    from .search import Pipeline

    section = recipe.rerank
    loaded = None
    texts = open_collection(section["collection"]) if "collection" in section else _index_texts(recipe)
    for config in section["configs"]:
        pipeline = Pipeline(model=loaded or model, collection=texts,
                            candidates=section["candidates"], width=config["width"], depth=config["depth"],
                            max_length=config["max_length"], keep=config["keep"],
                            prune_depth=config["prune_depth"], exits=section["exits"],
                            dtype=section["dtype"], overhead_ms=section.get("overhead_ms", 20.0))
        loaded = pipeline.reranker.source_model      # loaded once; each row converts it as its dtype needs
        yield config["name"], *_rerank_one(pipeline, config["name"], first_stage, topics, None, section, progress,
                                           log, {k: config[k] for k in _ROW_KNOBS})
    if section["budgets_ms"] and budgets:
        pipeline = Pipeline(model=loaded or model, collection=texts, candidates=section["candidates"],
                            max_length=section["max_length"],
                            exits=section["exits"], dtype=section["dtype"], concurrency=section["threads"],
                            overhead_ms=section.get("overhead_ms", 20.0))
        for budget in section["budgets_ms"]:
            name = budget_row_name(budget)
            yield name, *_rerank_one(pipeline, name, first_stage, topics, float(budget), section, progress, log, {})


def _index_texts(recipe: Recipe):
    """Without rerank.collection, passage texts come from the first stage's index."""
    if "run" in recipe.search:
        raise InputError(f"{recipe.path}: rerank.collection is needed: the candidates come from a run file "
                         f"({recipe.search['run']}), so there is no index to read passages from")
    return _open_first_stage(recipe.search)


def _rerank_one(pipeline, name: str, first_stage: Run, topics: Topics, budget_ms: float | None,
                section: dict[str, Any], progress: bool, log, config: dict[str, Any]):
    run, stats = pipeline.rerank_run(first_stage, topics, budget_ms=budget_ms,
                                     threads=section["threads"], progress=progress, with_stats=True)
    latencies = [s.latency_ms for s in stats.values() if s.candidates]
    chosen: dict[str, int] = {}
    for s in stats.values():
        if s.candidates and budget_ms is not None:
            key = _config_name(s.config)
            chosen[key] = chosen.get(key, 0) + 1
    info = {
        "kind": "budget" if budget_ms is not None else "fixed",
        "budget_ms": budget_ms,
        "config": config,
        "latency_ms": _latency_summary(latencies),
        "deadline_hits": sum(s.deadline_hit for s in stats.values()),
        "configs_chosen": chosen,
        "per_query_stats": {qid: asdict(s) for qid, s in stats.items()},
    }
    summary = info["latency_ms"]
    log(f"{name}: median {summary.get('median', 0):.1f} ms, p95 {summary.get('p95', 0):.1f} ms per query"
        + (f", {info['deadline_hits']} deadline hits" if budget_ms is not None else ""))
    return run, info


def _config_name(config: Mapping[str, Any]) -> str:
    parts = [f"{key[0]}{config[key]:g}" for key in ("width", "depth") if key in config]
    if "max_length" in config:
        parts.append(f"L{config['max_length']}")
    if "candidates" in config:
        parts.append(f"c{config['candidates']}")
    if config.get("keep") is not None:
        parts.append(f"keep{config['keep']}")
        if config.get("prune_depth") is not None:
            parts.append(f"by-d{config['prune_depth']:g}")
    return "-".join(parts) or "first-stage order"


def _latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    if not latencies:
        return {}
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]   # nearest rank
    return {"median": round(statistics.median(ordered), 2), "p95": round(p95, 2), "max": round(ordered[-1], 2)}


def _tag(name: str) -> str:
    return "".join(c if not c.isspace() else "_" for c in name) or "rankshrink"


def _evaluate(recipe: Recipe, runs: dict[str, Run], rows_info: dict[str, dict[str, Any]], qrels, topics: Topics
              ) -> Results:
    from ..metrics import evaluate

    metrics = [m.lower() for m in recipe.eval["metrics"]]
    baseline = recipe.eval["baseline"]
    if baseline not in runs:
        raise InputError(f"{recipe.path}: eval.baseline {baseline!r} is not a row; rows: {', '.join(runs)}")
    judged = {qid: qrels[qid] for qid in topics if qid in qrels}
    if not judged:
        raise InputError(f"{recipe.path}: none of the {len(topics)} topics has judgments in {recipe.eval['qrels']}")
    evaluation = evaluate(judged, runs, metrics, baseline=baseline if len(runs) > 1 else None)
    rows = []
    significant: dict[str, dict[str, str]] = {}
    for name, info in rows_info.items():
        rows.append(Row(name=name, kind=info["kind"], metrics=evaluation.scores[name],
                        per_query=evaluation.per_query[name], budget_ms=info.get("budget_ms"),
                        config=info.get("config", {}), latency_ms=info.get("latency_ms", {}),
                        deadline_hits=info.get("deadline_hits", 0), configs_chosen=info.get("configs_chosen", {})))
        for metric in metrics:
            if evaluation.significant(name, metric):
                better = evaluation.scores[name][metric] > evaluation.scores[baseline][metric]
                significant.setdefault(name, {})[metric] = "▲" if better else "▼"
    return Results(recipe=str(recipe.path), name=recipe.name, queries=sorted(judged), metrics=metrics,
                   baseline=baseline, rows=rows, significant=significant, environment=_environment())


def _environment() -> dict[str, Any]:
    import os

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "machine": platform.machine()}


# ---------------------------------------------------------------------------------------------
# Table, plot, and comparing with the committed results


def format_table(results: Results, digits: int = 4) -> str:
    """A Markdown table: each row's metrics (▲/▼ significant against the baseline), latency and choices."""
    header = ["run", *results.metrics, "median ms", "p95 ms", "configuration"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in results.rows:
        name = row.name + (" (baseline)" if row.name == results.baseline else "")
        cells = [name]
        for metric in results.metrics:
            cells.append(f"{row.metrics[metric]:.{digits}f}{results.significant.get(row.name, {}).get(metric, '')}")
        cells.append(f"{row.latency_ms['median']:.1f}" if row.latency_ms else "")
        cells.append(f"{row.latency_ms['p95']:.1f}" if row.latency_ms else "")
        cells.append(_describe(row))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{len(results.queries)} judged queries. ▲/▼: significantly better/worse than {results.baseline} "
                 "(paired t-test, p < 0.05). Latency: wall clock per query, reranking and its queueing.")
    return "\n".join(lines)


def _describe(row: Row) -> str:
    if row.kind == "first-stage":
        return "first stage" + (f" ({Path(row.config['run']).name})" if "run" in row.config else "")
    if row.kind == "fixed":
        return _config_name(row.config)
    chosen = ", ".join(f"{name} ×{count}" for name, count in sorted(row.configs_chosen.items(), key=lambda kv: -kv[1]))
    hits = f"; deadline hit on {row.deadline_hits}" if row.deadline_hits else ""
    return f"budget {row.budget_ms:g} ms: {chosen}{hits}"


def write_results(results: Results, output: Path) -> None:
    with atomic_write(output / RESULTS_FILE) as out:
        json.dump(results.to_json(), out, indent=1, ensure_ascii=False)
        out.write("\n")
    with atomic_write(output / TABLE_FILE) as out:
        out.write(f"# {results.name}\n\n```\nrankshrink run {results.recipe}\n```\n\n{format_table(results)}\n")
    plot_results(results, output / f"{_file_safe(results.metrics[0])}-vs-latency.png")


def _file_safe(metric: str) -> str:
    return metric.replace("@", "")


def plot_results(results: Results, path: Path) -> None:
    """The first metric against median latency per query: budgets as a line, fixed configurations as points,
    the first stage as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results.metrics[0]
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    budgets = [row for row in results.rows if row.kind == "budget" and row.latency_ms]
    if budgets:
        axes.plot([row.latency_ms["median"] for row in budgets], [row.metrics[metric] for row in budgets], "o-",
                  color="tab:blue", label="budget (median latency)")
        for row in budgets:
            axes.annotate(f"{row.budget_ms:g} ms", (row.latency_ms["median"], row.metrics[metric]),
                          textcoords="offset points", xytext=(4, -10), fontsize=7)
    fixed = [row for row in results.rows if row.kind == "fixed" and row.latency_ms]
    if fixed:
        axes.plot([row.latency_ms["median"] for row in fixed], [row.metrics[metric] for row in fixed], "s",
                  color="tab:orange", label="fixed configuration")
        for row in fixed:
            axes.annotate(row.name, (row.latency_ms["median"], row.metrics[metric]), textcoords="offset points",
                          xytext=(4, 4), fontsize=7)
    for row in results.rows:
        if row.kind == "first-stage":
            axes.axhline(row.metrics[metric], color="gray", linestyle="--", label=f"{row.name} (first stage)")
    if budgets or fixed:
        from matplotlib.ticker import FuncFormatter

        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(FuncFormatter(
            lambda value, _: f"{value:g}" if f"{value:g}"[0] in "25" else ""))
    axes.set_xlabel("median latency per query (ms, log scale)")
    axes.set_ylabel(metric)
    axes.set_title(f"{results.name}: {metric} vs latency ({len(results.queries)} queries)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    with atomic_write(path, mode="wb") as out:
        figure.savefig(out, format="png")
    plt.close(figure)


@dataclass
class Difference:
    row: str
    metric: str
    expected: float
    found: float
    tolerance: float

    def __str__(self) -> str:
        if self.metric == "(row)":
            return f"{self.row}: not in the committed results"
        if math.isnan(self.expected):
            return f"{self.row} {self.metric}"
        return (f"{self.row} {self.metric}: {self.found:.4f}, committed {self.expected:.4f} "
                f"(differs by {abs(self.found - self.expected):.4f} > {self.tolerance})")


def compare_results(found: Results, committed: Results, tolerance: float, budget_tolerance: float
                    ) -> list[Difference]:
    """Rows and metrics whose mean over ``found``'s queries differs from the committed per-query values over
    the same queries by more than the tolerance (budget rows: ``budget_tolerance``). A row or query the
    committed results lack is a difference too."""
    differences = []
    for row in found.rows:
        try:
            expected_row = committed.row(row.name)
        except KeyError:
            differences.append(Difference(row.name, "(row)", math.nan, math.nan, 0.0))
            continue
        limit = budget_tolerance if row.kind == "budget" else tolerance
        for metric in found.metrics:
            values = expected_row.per_query.get(metric, {})
            missing = [qid for qid in found.queries if qid not in values]
            if missing:
                differences.append(Difference(row.name, f"{metric} (query {missing[0]} not committed)",
                                              math.nan, row.metrics[metric], 0.0))
                continue
            expected = statistics.fmean(values[qid] for qid in found.queries)
            if abs(row.metrics[metric] - expected) > limit + 1e-9:   # means of the same values, summed apart
                differences.append(Difference(row.name, metric, expected, row.metrics[metric], limit))
    return differences
