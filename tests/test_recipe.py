"""Recipes and ``rankshrink run``: a recipe is checked before anything runs; a run writes runs, results, a table
and a plot whose scores equal ``rankshrink eval`` on the written runs; ``--check`` compares a rerun with the
committed results within the recipe's tolerances."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, shared_path
from rankshrink.cli import main
from rankshrink.data import read_qrels, read_run
from rankshrink.errors import InputError
from rankshrink.metrics import evaluate
from rankshrink.pipeline.recipe import compare_results, read_recipe, read_results, run_recipe
from test_pipeline_fixtures import tiny_world  # noqa: F401 - a fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_recipe(world, tmp_path: Path, **changes) -> Path:
    recipe = {
        "name": "tiny",
        "index": {"collection": str(world.collection), "index": str(tmp_path / "index")},
        "search": {"topics": str(world.topics_file), "first_stage": "bm25", "k": 30},
        "rerank": {"model": str(world.model), "collection": str(world.collection), "candidates": 10,
                   "max_length": 64, "configs": [{"width": 1.0, "depth": 1.0}, {"width": 0.5, "depth": 0.5}]},
        "eval": {"qrels": str(world.qrels_file), "metrics": ["ndcg@10", "recall@20"]},
        "output": str(tmp_path / "eval"),
        "runs": str(tmp_path / "runs"),
    }
    for section, value in changes.items():
        if value is None:
            recipe.pop(section)
        elif isinstance(value, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **value}
        else:
            recipe[section] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_a_run_builds_the_index_and_writes_runs_results_table_and_plot(tiny_world, tmp_path, capsys):
    configs = [{"width": 1.0, "depth": 1.0}, {"width": 0.5, "depth": 0.5}, {"width": 1.0, "depth": 1.0, "keep": 4,
                                                                                      "prune_depth": 0.75}]
    path = tiny_recipe(tiny_world, tmp_path, rerank={"configs": configs})
    assert main(["run", str(path), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert (tmp_path / "index" / "rankshrink-index.json").is_file()          # index: built when missing
    rows = ["bm25", "w1-d1-L64", "w0.5-d0.5-L64", "w1-d1-L64-keep4-by-d0.75"]
    for row in rows:
        assert (tmp_path / "runs" / f"{row}.trec").is_file()
        assert f"| {row}" in table
    results = read_results(tmp_path / "eval" / "results.json")
    assert [row.name for row in results.rows] == rows
    assert (tmp_path / "eval" / "ndcg10-vs-latency.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "eval" / "table.md").read_text().count("\n| ") == 6
    # the scores are those of rankshrink eval on the runs it wrote
    runs = {row: read_run(tmp_path / "runs" / f"{row}.trec") for row in rows}
    expected = evaluate(read_qrels(tiny_world.qrels_file), runs, ["ndcg@10", "recall@20"])
    for row in results.rows:
        assert row.metrics == pytest.approx(expected.scores[row.name], abs=1e-9)
    assert len(runs["bm25"]["q0"]) > 10 and set(runs["w1-d1-L64"]["q0"]) == set(runs["bm25"]["q0"])
    # rows that rerank the same candidates at different sizes rank them differently
    assert runs["w1-d1-L64"] != runs["w0.5-d0.5-L64"]
    stats = json.loads((tmp_path / "runs" / "w1-d1-L64.stats.json").read_text())
    assert set(stats) == set(runs["bm25"]) and all(s["latency_ms"] > 0 for s in stats.values())
    assert results.row("w1-d1-L64").latency_ms["p95"] >= results.row("w1-d1-L64").latency_ms["median"] > 0
    # the cascade row: the full network reranks only the 4 its narrowest sub-network (at depth 0.75) ranked best
    cascade = json.loads((tmp_path / "runs" / "w1-d1-L64-keep4-by-d0.75.stats.json").read_text())
    assert all(s["config"]["keep"] == 4 and s["config"]["prune_depth"] == 0.75 for s in cascade.values())
    assert set(runs["w1-d1-L64-keep4-by-d0.75"]["q0"]) == set(runs["bm25"]["q0"])


def test_check_passes_on_a_rerun_and_fails_when_the_committed_scores_differ(tiny_world, tmp_path, capsys):
    path = tiny_recipe(tiny_world, tmp_path, eval={"tolerance": 0.0})
    assert main(["run", str(path), "--quiet"]) == 0
    committed = tmp_path / "eval" / "results.json"
    before = committed.read_bytes()
    assert main(["run", str(path), "--quiet", "--check"]) == 0
    assert "matches" in capsys.readouterr().out
    assert committed.read_bytes() == before                                # --check never replaces them
    assert (tmp_path / "runs" / "check" / "results.json").is_file()
    assert main(["run", str(path), "--quiet", "--check", "--queries", "2"]) == 0   # a subset: per-query values

    results = json.loads(before)
    row = next(row for row in results["rows"] if row["name"] == "w0.5-d0.5-L64")
    first = sorted(row["per_query"]["ndcg@10"])[0]
    row["per_query"]["ndcg@10"][first] += 0.5
    committed.write_text(json.dumps(results))
    assert main(["run", str(path), "--quiet", "--check"]) == 1
    err = capsys.readouterr().err
    assert "w0.5-d0.5-L64 ndcg@10" in err and "1 difference(s)" in err


def test_compare_results_uses_the_budget_tolerance_for_budget_rows(tiny_world, tmp_path):
    results = run_recipe(read_recipe(tiny_recipe(tiny_world, tmp_path)), progress=False, log=lambda m: None)
    committed = read_results(tmp_path / "eval" / "results.json")
    row = committed.row("w1-d1-L64")
    for qid in row.per_query["ndcg@10"]:
        row.per_query["ndcg@10"][qid] += 0.01
    assert [d.row for d in compare_results(results, committed, tolerance=0.005, budget_tolerance=0.02)] == \
        ["w1-d1-L64"]
    row.kind = "budget"
    results.row("w1-d1-L64").kind = "budget"
    assert compare_results(results, committed, tolerance=0.005, budget_tolerance=0.02) == []


def test_a_recipe_may_take_its_candidates_from_a_run_file(tiny_world, tmp_path):
    first_stage = tmp_path / "given.trec"
    first_stage.write_text("".join(f"q0 Q0 d{i} {i + 1} {20 - i} given\n" for i in range(12)))
    path = tiny_recipe(tiny_world, tmp_path, index=None, search={"topics": str(tiny_world.topics_file),
                                                                  "run": str(first_stage)})
    text = path.read_text().replace("  first_stage: bm25\n", "").replace("  k: 30\n", "")
    path.write_text(text)
    results = run_recipe(read_recipe(path), progress=False, log=lambda m: None)
    assert [row.name for row in results.rows][0] == "given"
    reranked = read_run(tmp_path / "runs" / "w1-d1-L64.trec")
    assert set(reranked) == {"q0"} and set(reranked["q0"]) == {f"d{i}" for i in range(12)}
    assert results.row("w1-d1-L64").per_query["ndcg@10"]["q1"] == 0.0     # topics without candidates score 0


@pytest.mark.parametrize("judged", [True, False])
def test_budget_rows_profile_a_model_that_has_no_profile_on_the_recipes_dev_data(tiny_world, tmp_path, judged):
    from rankshrink.model import load_model, save_model

    save_model(load_model(tiny_world.model), tmp_path / "model")           # a rankshrink directory, no profile
    given = tmp_path / "given.trec"
    given.write_text("".join(f"{qid} Q0 d{i} {i + 1} {20 - i} given\n" for qid in ("q0", "q1") for i in range(12)))
    section = {"run": str(given), "topics": str(tiny_world.topics_file), "collection": str(tiny_world.collection),
               "max_lengths": [32, 64], "candidates": [5, 10], "time_queries": 1}
    if judged:
        section["qrels"] = str(tiny_world.qrels_file)
    path = tiny_recipe(tiny_world, tmp_path, rerank={"model": str(tmp_path / "model"), "budgets_ms": [5000]},
                       profile=section)
    results = run_recipe(read_recipe(path), progress=False, log=lambda m: None)
    manifest = json.loads((tmp_path / "model" / "rankshrink.json").read_text())
    assert manifest["metadata"]["profile"]["grid"]["max_lengths"] == [32, 64]
    assert manifest["metadata"]["profile"]["dev"].startswith(str(given))
    assert manifest["metadata"]["profile"]["judged_by"] == ("qrels" if judged else "agreement with the full network")
    assert results.rows[-1].kind == "budget"


@pytest.mark.parametrize("change, message", [
    ({"profile": {"run": "dev.trec"}}, "profile.topics"),
    ({"serach": {}}, "unknown key serach"),
    ({"search": {"topics": "t.tsv", "kk": 3}}, "unknown key search.kk"),
    ({"search": None}, "missing section 'search:'"),
    ({"eval": {"metrics": ["ndcg"]}}, "eval.metrics: metric 'ndcg' needs a cutoff"),
    ({"rerank": {"candidates": "many"}}, "rerank.candidates must be an integer, got 'many'"),
    ({"rerank": {"configs": [{"width": 2.0}]}}, r"rerank.configs\[1\]: width must be in \(0, 1\], got 2.0"),
    ({"rerank": {"configs": [{"width": 1.0}, {"width": 1.0}]}}, r"rows named twice \(.*\): w1-d1-L64"),
    ({"rerank": {"configs": [{"name": "bm25"}]}}, r"rows named twice \(rerank rows and the first stage's "
                                                   r"search.name\): bm25"),
    ({"search": {"topics": "t.tsv", "k": 0}}, "search.k must be a positive integer, got 0"),
    ({"rerank": {"configs": [{"keep": 0}]}}, r"rerank.configs\[1\]: keep must be a positive integer, got 0"),
    ({"rerank": {"configs": [{"prune_depth": 0.75}]}},
     r"rerank.configs\[1\]: prune_depth 0.75 is the depth of a cascade's first pass: give keep too"),
    ({"rerank": {"configs": [{"keep": 10, "prune_depth": 1.5}]}}, r"rerank.configs\[1\]: prune_depth must be in"),
    ({"rerank": {"configs": [{"max_length": 4}]}}, r"rerank.configs\[1\]: max_length must be at least 8"),
    ({"rerank": {"max_length": 4, "budgets_ms": [50]}}, r"rerank: max_length must be at least 8"),
    ({"rerank": {"candidates": 0}}, r"rerank: candidates must be a positive integer, got 0"),
    ({"rerank": {"budgets_ms": [100, -5]}}, "budgets_ms must be numbers of milliseconds >= 0, got -5"),
    ({"rerank": {"dtype": "fp16"}}, "rerank.dtype must be auto, bf16 or fp32"),
    ({"search": {"first_stage": "tfidf"}}, "search.first_stage must be bm25, dense or hybrid"),
    ({"search": {"run": "x.trec"}}, "search.run gives the candidates; drop first_stage"),
    ({"index": {"collection": "c.jsonl", "index": None}}, "index.index is empty"),
])
def test_a_bad_recipe_is_one_error_naming_the_file_and_key(tiny_world, tmp_path, change, message):
    path = tiny_recipe(tiny_world, tmp_path, **change)
    with pytest.raises(InputError, match=message) as error:
        read_recipe(path)
    assert str(path) in str(error.value)


def test_a_given_first_stage_run_is_cut_to_search_k(tiny_world, tmp_path):
    from rankshrink.data import read_run, read_topics

    given = tmp_path / "given.trec"
    given.write_text("".join(f"{qid} Q0 {docid} {rank} {10 - rank} x\n" for qid in read_topics(tiny_world.topics_file)
                             for rank, docid in enumerate(sorted(tiny_world.passages)[:5], start=1)))
    path = tiny_recipe(tiny_world, tmp_path, index=None, rerank=None,
                       search={"first_stage": None, "run": str(given), "k": 2})
    raw = yaml.safe_load(path.read_text())
    del raw["search"]["first_stage"]
    path.write_text(yaml.safe_dump(raw))
    run_recipe(read_recipe(path), progress=False, log=lambda m: None)
    written = read_run(tmp_path / "runs" / "given.trec")
    assert written and all(list(docs) == sorted(tiny_world.passages)[:2] for docs in written.values())


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("search:\n  topics: [unclosed\neval:\n  qrels: q.txt\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rankshrink run: error: {path}:") and "not valid YAML" in err and "\n" not in err


def test_a_missing_model_without_a_train_section_is_a_clear_error(tiny_world, tmp_path, capsys):
    path = tiny_recipe(tiny_world, tmp_path, rerank={"model": str(tmp_path / "no-model")})
    assert main(["run", str(path), "--quiet"]) == 2
    assert "no-model: no such model directory" in capsys.readouterr().err


def test_the_train_section_is_opaque_and_an_untrained_model_says_how_it_is_made(tiny_world, tmp_path, capsys):
    train = {"base": "../shared/models/all-MiniLM-L6-v2", "stages": [{"width": [1.0, 0.5]}], "anything": {"x": 1}}
    path = tiny_recipe(tiny_world, tmp_path, train=train, rerank={"model": str(tmp_path / "to-be-trained")})
    recipe = read_recipe(path)
    assert recipe.train == train
    try:
        import rankshrink.train  # noqa: F401
    except ImportError:
        assert main(["run", str(path), "--quiet"]) == 2
        assert "train: section produces" in capsys.readouterr().err


def test_the_online_recipe_reads_and_fails_offline_with_one_line(tmp_path, capsys, monkeypatch):
    recipe = read_recipe(REPO / "pipelines" / "trec-dl-2019.yaml")
    assert recipe.search["index"] == "msmarco-v1-passage" and recipe.rerank["model"].startswith("cross-encoder/")
    assert recipe.search["topics"] == recipe.eval["qrels"] == "msmarco-passage/trec-dl-2019/judged"
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "irds"))   # nothing cached: it must fetch
    assert main(["run", str(REPO / "pipelines" / "trec-dl-2019.yaml"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rankshrink run: error: msmarco-passage/trec-dl-2019/judged: ir_datasets could not fetch")


@pytest.mark.shared
def test_the_offline_recipe_reproduces_its_committed_results(tmp_path, monkeypatch, capsys):
    """`rankshrink run pipelines/trec-dl-offline.yaml --check` on the first 8 dl19 queries (fixed sizes; budget
    rows depend on the machine's speed) gives the committed per-query scores within the recipe's tolerance."""
    path = REPO / "pipelines" / "trec-dl-offline.yaml"
    if not path.is_file() or "search" not in (yaml.safe_load(path.read_text()) or {}):
        pytest.skip("pipelines/trec-dl-offline.yaml has no search/rerank/eval sections yet")
    shared_path("trec-dl", "dl19", "passages.jsonl")
    monkeypatch.chdir(REPO)                       # the recipe's paths are relative to the repository
    recipe = read_recipe(path)
    if recipe.rerank and not Path(recipe.rerank["model"]).exists():
        pytest.skip(f"{recipe.rerank['model']} is not trained here: rankshrink train {path.relative_to(REPO)}")
    if not (recipe.output / "results.json").is_file():
        pytest.skip(f"no committed {recipe.output}/results.json yet: rankshrink run {path.relative_to(REPO)}")
    code = main(["run", str(path), "--check", "--queries", "8", "--no-budgets", "--quiet",
                 "--output", str(tmp_path / "check")])
    assert code == 0, capsys.readouterr().err
