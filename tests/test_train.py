"""Training: groups, teachers and their cache, losses, recipe checks, determinism and resuming — on a tiny
random BERT and a tiny data set written here; the real recipe's --smoke run on ../shared at the end."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, shared_path
from rankshrink.data import Collection, write_run
from rankshrink.errors import InputError
from rankshrink.train import Trainer, build_groups, sample_list, train_recipe, train_spec_from_dict
from rankshrink.train.losses import hidden_mse, list_offset, listwise_ce, listwise_kl
from rankshrink.train.teacher import FusionTeacher, RunTeacher, Teacher, score_groups, teacher_from_spec
from test_model_fixtures import PASSAGES, QUERIES, tiny_hf_cross_encoder


@pytest.fixture
def tiny_data(tmp_path) -> dict:
    """Four queries over seven passages, a BM25-like run and a 'dense' run, graded labels."""
    collection = tmp_path / "passages.jsonl"
    collection.write_text("".join(json.dumps({"id": f"p{i}", "contents": text}) + "\n"
                                  for i, text in enumerate(PASSAGES)))
    (tmp_path / "topics.tsv").write_text("".join(f"q{i}\t{query}\n" for i, query in enumerate(QUERIES)))
    rng = np.random.default_rng(0)
    runs = {}
    for name in ("bm25", "dense"):
        run = {f"q{i}": {f"p{j}": float(rng.normal()) for j in range(len(PASSAGES)) if (i + j) % 5 != 0}
               for i in range(len(QUERIES))}
        write_run(run, tmp_path / f"{name}.trec")
        runs[name] = str(tmp_path / f"{name}.trec")
    (tmp_path / "qrels.txt").write_text("q0 0 p0 3\nq0 0 p1 0\nq1 0 p1 2\nq2 0 p2 1\nq2 0 p3 0\nq3 0 p3 2\n")
    model_dir = tmp_path / "base"
    tiny_hf_cross_encoder(model_dir, layers=4, heads=4, hidden=32, ffn=64)
    return {"dir": tmp_path, "runs": runs, "base": str(model_dir)}


def stage_log(cache: Path, stage: str) -> Path:
    """A stage's JSONL log in ``cache``, which holds one checkpoint key's logs."""
    (log,) = (cache / "logs").glob(f"*/{stage}.jsonl")
    return log


def tiny_section(data: dict, **changes) -> dict:
    d = data["dir"]
    section = {
        "base": data["base"], "output": str(d / "out"), "cache": str(d / "cache"), "seed": 3,
        "data": [{"name": "tiny", "topics": str(d / "topics.tsv"), "collection": str(d / "passages.jsonl"),
                  "qrels": str(d / "qrels.txt"), "runs": data["runs"], "held_out": 1}],
        "teacher": {"fusion": [{"run": "dense", "weight": 1.0}, {"run": "bm25", "weight": 0.5}]},
        "max_length": 32, "list_size": 4, "dtype": "fp32",
        "stages": {"full": {"steps": 4, "lr": 1e-3, "eval_every": 2}, "rewire": {"lists": 2},
                   "width": {"steps": 3, "lr": 1e-3, "configs": 3}, "depth": {"steps": 3, "lr": 1e-3}},
        "checkpoint_every": 2,
    }
    section.update(changes)
    return section


def test_groups_pool_the_runs_and_carry_labels(tiny_data):
    from rankshrink.data import read_qrels, read_run, read_topics

    runs = [read_run(path) for path in tiny_data["runs"].values()]
    groups = build_groups(read_topics(tiny_data["dir"] / "topics.tsv"), runs,
                          Collection(tiny_data["dir"] / "passages.jsonl"),
                          qrels=read_qrels(tiny_data["dir"] / "qrels.txt"), source="tiny")
    first = groups[0]
    assert first.key == "tiny/q0"
    assert set(first.docids) == set(runs[0]["q0"]) | set(runs[1]["q0"])
    assert first.labels[first.docids.index("p1")] == 0 and first.labels[first.docids.index("p2")] is None
    assert first.texts[first.docids.index("p2")] == PASSAGES[2]
    assert first.graded_labels()[first.docids.index("p2")] == 0


def test_sample_list_takes_teacher_top_and_a_relevant_one():
    import random

    from rankshrink.train import TrainingGroup

    group = TrainingGroup("q", "query", [f"d{i}" for i in range(40)], ["t"] * 40,
                          labels=[3 if i == 39 else None for i in range(40)],
                          teacher=np.arange(40, dtype=np.float32)[::-1].copy())
    chosen = sample_list(group, 16, random.Random(0))
    assert len(chosen) == len(set(chosen)) == 16
    assert chosen[:4] == [0, 1, 2, 3] and 39 in chosen
    assert sample_list(group, 64, random.Random(0)) == list(range(40))


def test_losses():
    scores = torch.tensor([[2.0, 0.0, -1.0]])
    assert listwise_kl(scores, scores).item() == pytest.approx(0.0, abs=1e-7)
    assert listwise_kl(scores, torch.tensor([[-1.0, 0.0, 2.0]])).item() > 0.5
    grades = torch.tensor([[3.0, 0.0, 0.0]])
    assert listwise_ce(torch.tensor([[9.0, 0.0, 0.0]]), grades) < listwise_ce(torch.tensor([[0.0, 9.0, 0.0]]), grades)
    a, b = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    b[0, 2] = 100.0  # a padded position: ignored
    assert hidden_mse([a], [b], mask).item() == pytest.approx(1.0)
    # the KL does not see a shifted list; the offset term does
    assert listwise_kl(scores + 3.0, scores).item() == pytest.approx(0.0, abs=1e-6)
    assert list_offset(scores + 3.0, scores).item() == pytest.approx(9.0)
    assert list_offset(scores, scores).item() == 0.0


class CountingTeacher(Teacher):
    """A real (if simple) teacher: passage length (times ``scale``). Counts the lists it is asked to score."""

    def __init__(self, scale: float = 1.0):
        self.scale, self.scored = scale, 0

    def identity(self):
        return {"kind": "length", "scale": self.scale}

    def score(self, groups):
        self.scored += len(groups)
        return [self.scale * np.array([len(text) for text in group.texts], dtype=np.float32) for group in groups]


def test_teacher_scores_are_cached_per_list(tiny_data, tmp_path):
    from rankshrink.data import read_run, read_topics

    groups = build_groups(read_topics(tiny_data["dir"] / "topics.tsv"), [read_run(tiny_data["runs"]["bm25"])],
                          Collection(tiny_data["dir"] / "passages.jsonl"), source="tiny")
    assert len(groups) >= 3
    teacher = CountingTeacher()
    score_groups(teacher, groups[:-1], tmp_path / "cache")
    assert teacher.scored == len(groups) - 1
    first = [group.teacher.copy() for group in groups[:-1]]
    for group in groups:
        group.teacher = None
    score_groups(teacher, groups, tmp_path / "cache")   # one list more: only it is scored
    assert teacher.scored == len(groups)
    assert all(np.array_equal(a, group.teacher) for a, group in zip(first, groups))
    assert np.array_equal(groups[-1].teacher, [len(text) for text in groups[-1].texts])
    groups[0].docids = groups[0].docids[:-1]  # another list under the same qid: scored again
    groups[0].texts = groups[0].texts[:-1]
    score_groups(teacher, groups, tmp_path / "cache")
    assert teacher.scored == len(groups) + 1
    groups[1].query += " edited"               # an edited query text too
    score_groups(teacher, groups, tmp_path / "cache")
    assert teacher.scored == len(groups) + 2
    other = CountingTeacher(scale=2.0)         # another teacher: its own cache
    score_groups(other, groups, tmp_path / "cache")
    assert other.scored == len(groups)
    assert np.array_equal(groups[2].teacher, [2.0 * len(text) for text in groups[2].texts])


def test_a_fusion_caches_each_part_so_a_new_weight_rescores_nothing(tiny_data, tmp_path):
    from rankshrink.data import read_run, read_topics

    groups = build_groups(read_topics(tiny_data["dir"] / "topics.tsv"), [read_run(tiny_data["runs"]["bm25"])],
                          Collection(tiny_data["dir"] / "passages.jsonl"), source="tiny")
    lengths, negated = CountingTeacher(), CountingTeacher(scale=-2.0)
    score_groups(FusionTeacher([(lengths, 1.0), (negated, 0.5)]), groups, tmp_path / "cache")
    assert lengths.scored == negated.scored == len(groups)
    reweighted = FusionTeacher([(lengths, 1.0), (negated, 3.0)])
    score_groups(reweighted, groups, tmp_path / "cache")
    assert lengths.scored == negated.scored == len(groups)
    expected = reweighted.score(groups)   # uncached: the same fusion computed directly
    assert all(np.allclose(group.teacher, scores) for group, scores in zip(groups, expected))


def test_run_and_fusion_teachers(tiny_data):
    from rankshrink.data import read_run, read_topics

    groups = build_groups(read_topics(tiny_data["dir"] / "topics.tsv"),
                          [read_run(tiny_data["runs"]["bm25"]), read_run(tiny_data["runs"]["dense"])],
                          Collection(tiny_data["dir"] / "passages.jsonl"), source="tiny")
    dense = RunTeacher({"tiny": tiny_data["runs"]["dense"]}).score(groups)
    run = read_run(tiny_data["runs"]["dense"])
    for group, scores in zip(groups, dense):
        for docid, score in zip(group.docids, scores):
            if docid in run[group.qid]:
                assert score == pytest.approx(run[group.qid][docid])
            else:
                assert score < min(run[group.qid].values())
    fused = FusionTeacher([(RunTeacher({"tiny": tiny_data["runs"]["dense"]}), 1.0)]).score(groups)
    for scores, raw in zip(fused, dense):
        assert np.argsort(scores).tolist() == np.argsort(raw).tolist()
        assert scores.mean() == pytest.approx(0.0, abs=1e-5) and scores.std() == pytest.approx(1.0, abs=1e-4)


def test_a_fused_run_scores_only_the_data_sets_that_have_it(tiny_data):
    """Unlabelled extra data sets (pseudo-queries) may lack a run the fusion uses: that part abstains there,
    but a teacher that is only that run still refuses them."""
    from rankshrink.data import read_run, read_topics

    topics, collection = read_topics(tiny_data["dir"] / "topics.tsv"), Collection(tiny_data["dir"] / "passages.jsonl")
    runs = [read_run(tiny_data["runs"]["bm25"]), read_run(tiny_data["runs"]["dense"])]
    with_run = build_groups(topics, runs, collection, source="tiny")
    without = build_groups(topics, runs, collection, source="extra")
    runs_by_source = {"tiny": {"dense": tiny_data["runs"]["dense"], "bm25": tiny_data["runs"]["bm25"]},
                      "extra": {"bm25": tiny_data["runs"]["bm25"]}}
    fusion = teacher_from_spec({"fusion": [{"run": "dense", "weight": 1.0}, {"run": "bm25", "weight": 0.5}]},
                               runs_by_source)
    bm25_alone = RunTeacher({"extra": tiny_data["runs"]["bm25"]}).score(without)
    for fused, raw in zip(fusion.score(without), bm25_alone):   # only bm25 speaks for "extra"
        assert np.argsort(fused, kind="stable").tolist() == np.argsort(raw, kind="stable").tolist()
        assert fused.std() == pytest.approx(0.5, abs=1e-4)
    both = fusion.score(with_run)
    assert any(not np.allclose(a, b) for a, b in zip(both, fusion.score(without)))   # dense counts for "tiny"
    with pytest.raises(InputError, match="no run for data set 'extra'"):
        teacher_from_spec({"run": "dense"}, runs_by_source).score(without)


def test_a_repeated_data_set_is_drawn_that_many_times_an_epoch(tiny_data):
    """``data[i].repeat`` puts each of that data set's training lists in an epoch N times (the held-out lists
    once); per stage (``{full: 3}``) in the stages it names alone; repeat 1, the default, leaves a recipe's
    fingerprint as it was without the key."""
    d = tiny_data["dir"]
    section = tiny_section(tiny_data, cache=str(d / "c-repeat"))
    quiet = {"progress": False, "log": lambda message: None}
    once = Trainer(train_spec_from_dict(section), **quiet)
    train, held_out = once.load_data()
    keys = [group.key for group in train]
    assert len(set(keys)) == len(keys)
    section["data"][0]["repeat"] = 3
    thrice = Trainer(train_spec_from_dict(section), **quiet)
    assert [group.key for group in thrice.load_data()[1]] == [group.key for group in held_out]
    for stage in ("full", "rewire", "depth"):
        assert [group.key for group in thrice.stage_lists(train, stage)] == [key for key in keys for _ in range(3)]
    assert thrice.fingerprint != once.fingerprint
    section["data"][0]["repeat"] = {"full": 3, "rewire": 1}
    in_full = Trainer(train_spec_from_dict(section), **quiet)
    assert [group.key for group in in_full.stage_lists(train, "full")] == [key for key in keys for _ in range(3)]
    assert [group.key for group in in_full.stage_lists(train, "width")] == keys
    assert in_full.fingerprint not in (once.fingerprint, thrice.fingerprint)
    for unrepeated in (1, {"full": 1}, {}):
        section["data"][0]["repeat"] = unrepeated
        assert Trainer(train_spec_from_dict(section), **quiet).fingerprint == once.fingerprint
    for bad, message in ((0, r"data\[0\]\.repeat must be a positive integer"), (2.5, "positive integer"),
                         (True, "positive integer"), ({"full": 0}, r"repeat\.full must be a positive integer"),
                         ({"fulll": 2}, r"unknown stage\(s\) \['fulll'\]")):
        section["data"][0]["repeat"] = bad
        with pytest.raises(InputError, match=message):
            train_spec_from_dict(section)


def test_set_reaches_a_data_set_by_its_name():
    """``--set data.dl21.repeat=5`` changes the offline recipe's dl21 data set alone; a name that is not
    there, or a list without a name, is an error that says so."""
    from rankshrink.cli.train import read_train_section

    recipe = REPO / "pipelines" / "trec-dl-offline.yaml"
    section = read_train_section(recipe, ["data.dl21.repeat=5", "stages.full.steps=10"])
    assert {data["name"]: data.get("repeat") for data in section["data"]} == \
        {"dl21": 5, "dl22": None, "dl21-pseudo": None, "dl22-pseudo": None}
    assert section["stages"]["full"]["steps"] == 10
    assert train_spec_from_dict(section).data[0].repeat == 5
    with pytest.raises(InputError, match="no item named 'dl23'"):
        read_train_section(recipe, ["data.dl23.repeat=5"])
    with pytest.raises(InputError, match=r"name one of data's items \(data.NAME.KEY\)"):
        read_train_section(recipe, ["data.repeat=5"])
    with pytest.raises(InputError, match="seed is not a mapping"):
        read_train_section(recipe, ["seed.x=1"])


def test_a_data_set_with_its_own_teacher_is_scored_by_it(tiny_data):
    """``data[i].teacher`` replaces the recipe's teacher for that data set's lists only (the offline recipe
    gives pseudo-queries, which no SPLADE run covers, a SPLADE-tiny fusion)."""
    d = tiny_data["dir"]
    section = tiny_section(tiny_data, cache=str(d / "c-own"))
    section["data"].append({**section["data"][0], "name": "other", "held_out": 0, "teacher": {"run": "bm25"}})
    messages = []
    train_groups, _ = Trainer(train_spec_from_dict(section), progress=False, log=messages.append).load_data()
    runs_by_source = {name: {run: Path(path) for run, path in tiny_data["runs"].items()} for name in ("tiny", "other")}
    fusion = teacher_from_spec(section["teacher"], runs_by_source)
    for source, teacher in (("tiny", fusion), ("other", RunTeacher({"other": tiny_data["runs"]["bm25"]}))):
        groups = [group for group in train_groups if group.source == source]
        assert groups and all(np.allclose(group.teacher, expected)
                              for group, expected in zip(groups, teacher.score(groups)))
    assert sum(message.startswith("teacher scores") for message in messages) == 2
    section["teacher"] = None
    with pytest.raises(InputError, match="data set 'tiny' has no teacher"):
        Trainer(train_spec_from_dict(section), progress=False, log=messages.append).load_data()


def test_a_sparse_encoder_teacher_scores_with_splade_term_weights(tiny_data):
    """SPLADE-tiny (real weights): each candidate's score is the dot product of the query's and the passage's
    term weights, as sentence-transformers computes it pair by pair."""
    from sentence_transformers import SparseEncoder

    from rankshrink.data import read_run, read_topics

    path = shared_path("models", "splade-tiny-msmarco")
    topics, collection = read_topics(tiny_data["dir"] / "topics.tsv"), Collection(tiny_data["dir"] / "passages.jsonl")
    groups = build_groups(topics, [read_run(tiny_data["runs"]["bm25"])], collection, source="tiny")
    teacher = teacher_from_spec({"sparse-encoder": str(path), "max_length": 64})
    assert teacher.identity()["kind"] == "sparse-encoder" and "files_sha256" in teacher.identity()
    scores = teacher.score(groups)
    model = SparseEncoder(str(path), device="cpu")
    for group, got in zip(groups, scores):
        expected = model.similarity(model.encode_query([group.query], convert_to_tensor=True),
                                    model.encode_document(group.texts, convert_to_tensor=True))[0]
        assert got.dtype == np.float32 and got == pytest.approx(expected.numpy(), rel=1e-4, abs=1e-4)
    sky = [group.qid for group in groups].index("q1")
    assert groups[sky].docids[int(np.argmax(scores[sky]))] == "p1"   # "why is the sky blue": "the sky is blue ..."


SCORE_WITH_HUB_TEACHERS = """
import json, sys
from rankshrink.data import Collection, read_run, read_topics
from rankshrink.train import build_groups
from rankshrink.train.teacher import score_groups, teacher_from_spec
data, cache = sys.argv[1], sys.argv[2]
groups = build_groups(read_topics(data + "/topics.tsv"), [read_run(data + "/bm25.trec")],
                      Collection(data + "/passages.jsonl"), source="tiny")
for spec in json.loads(sys.argv[3]):
    teacher = teacher_from_spec(spec)
    score_groups(teacher, groups, cache)
    print(json.dumps({"identity": teacher.identity(), "scores": [group.teacher.tolist() for group in groups]}))
"""


def put_in_hub_cache(hub: Path, repo_id: str, commit: str, files: Path) -> None:
    """A commit of a hub model as the Hugging Face cache holds what was downloaded: its files under
    snapshots/<commit>/, and refs/main naming that commit."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    for file in files.iterdir():
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_teacher_is_keyed_by_the_commit_it_scores_with(tiny_data, tmp_path):
    """A hub id's cached scores belong to one commit: when main moves on, the lists are scored again by the new
    commit; a pinned revision reads its own commit's scores. Offline, through a local Hugging Face cache (as a
    user without network who downloaded the teacher earlier), in a fresh process, since huggingface_hub and
    transformers read the cache's location when imported."""
    import os

    from rankshrink.data import read_run, read_topics
    from rankshrink.train.teacher import CrossEncoderTeacher

    first, second = "a" * 40, "b" * 40
    tiny_hf_cross_encoder(tmp_path / "commit-a", seed=1)
    tiny_hf_cross_encoder(tmp_path / "commit-b", seed=2)
    hub, cache = tmp_path / "hub", tmp_path / "teacher-cache"
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def score(*specs):
        done = subprocess.run([sys.executable, "-c", SCORE_WITH_HUB_TEACHERS, str(tiny_data["dir"]), str(cache),
                               json.dumps(specs)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    groups = build_groups(read_topics(tiny_data["dir"] / "topics.tsv"), [read_run(tiny_data["runs"]["bm25"])],
                          Collection(tiny_data["dir"] / "passages.jsonl"), source="tiny")
    expected = {commit: CrossEncoderTeacher(str(tmp_path / f"commit-{name}"), max_length=32).score(groups)
                for commit, name in ((first, "a"), (second, "b"))}

    def scored_by(result, commit):
        return all(np.allclose(got, want, atol=1e-5) for got, want in zip(result["scores"], expected[commit]))

    put_in_hub_cache(hub, "owner/tiny-teacher", first, tmp_path / "commit-a")
    (at_first,) = score({"cross-encoder": "owner/tiny-teacher", "max_length": 32})
    assert at_first["identity"]["revision"] == first and scored_by(at_first, first)
    assert not scored_by(at_first, second)
    (cached_first,) = cache.iterdir()
    written = cached_first.stat().st_mtime_ns

    put_in_hub_cache(hub, "owner/tiny-teacher", second, tmp_path / "commit-b")   # main moves on
    moved, pinned = score({"cross-encoder": "owner/tiny-teacher", "max_length": 32},
                          {"cross-encoder": "owner/tiny-teacher", "max_length": 32, "revision": first})
    assert moved["identity"]["revision"] == second and scored_by(moved, second)
    assert pinned["identity"]["revision"] == first and scored_by(pinned, first)
    assert len(list(cache.iterdir())) == 2 and cached_first.stat().st_mtime_ns == written   # read, not rescored


TRAIN_WHILE_MAIN_MOVES = """
import json, sys
from pathlib import Path
import rankshrink.train.distill as distill
from rankshrink.train import Trainer, train_spec_from_dict
section, main_ref, later = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
resolve = distill.model_fingerprint
def resolve_then_move_main(*args, **kwargs):
    fingerprint = resolve(*args, **kwargs)
    main_ref.write_text(later)   # the hub's main moves on between the digest and the download
    return fingerprint
distill.model_fingerprint = resolve_then_move_main
Trainer(train_spec_from_dict(section), progress=False, log=lambda message: None).run()
"""


def test_a_hub_base_trains_from_the_commit_its_checkpoints_are_keyed_by(tiny_data, tmp_path):
    import os

    from rankshrink import load_model

    first, second = "c" * 40, "d" * 40
    tiny_hf_cross_encoder(tmp_path / "commit-c", seed=1)
    tiny_hf_cross_encoder(tmp_path / "commit-d", seed=2)
    hub = tmp_path / "hub"
    put_in_hub_cache(hub, "owner/tiny-base", second, tmp_path / "commit-d")
    put_in_hub_cache(hub, "owner/tiny-base", first, tmp_path / "commit-c")   # main: the first commit
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    section = tiny_section(tiny_data, base="owner/tiny-base", stages={"full": {"steps": 0}},
                           output=str(tmp_path / "out"), cache=str(tmp_path / "cache"))
    main_ref = hub / "models--owner--tiny-base" / "refs" / "main"
    done = subprocess.run([sys.executable, "-c", TRAIN_WHILE_MAIN_MOVES, json.dumps(section), str(main_ref), second],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main_ref.read_text() == second
    trained = load_model(tmp_path / "out").state_dict()
    for commit in ("c", "d"):
        base = load_model(tmp_path / f"commit-{commit}").state_dict()
        assert torch.equal(trained["embeddings.word.weight"], base["embeddings.word.weight"]) == (commit == "c")
    with pytest.raises(InputError, match="a revision .* names a commit of a hub id, not of a local directory"):
        load_model(tmp_path / "commit-c", revision=first)


def test_a_teacher_that_is_neither_a_directory_nor_on_the_hub_is_named():
    with pytest.raises(InputError, match="teacher no-such-owner/no-such-teacher: not a local directory"):
        teacher_from_spec({"cross-encoder": "no-such-owner/no-such-teacher"}).identity()   # tests run offline
    with pytest.raises(InputError, match="a revision .* names a commit of a hub id, not of a local directory"):
        teacher_from_spec({"bi-encoder": str(shared_path("models", "all-MiniLM-L6-v2")), "revision": "main"}).identity()
    with pytest.raises(InputError, match=r"teacher.revision: expected a name, path or revision"):
        teacher_from_spec({"cross-encoder": "owner/model", "revision": ""})


@pytest.mark.parametrize("change, message", [
    ({"base": None}, "missing required key 'base'"),
    ({"unknown": 1}, r"unknown key\(s\) \['unknown'\]"),
    ({"stages": {"fll": {}}}, r"unknown stage\(s\) \['fll'\]"),
    ({"stages": {"full": {"stepz": 3}}}, r"train.stages.full: unknown key\(s\) \['stepz'\]"),
    ({"dtype": "fp16"}, "expected bf16 or fp32"),
    ({"smoke": {"steps": 0}}, r"train.smoke.steps must be a positive integer, got 0"),
    ({"smoke": {"step": 2}}, r"train.smoke: expected some of queries, candidates, steps; got \{'step': 2\}"),
    ({"smoke": [2]}, r"train.smoke: expected some of queries, candidates, steps; got \[2\]"),
    ({"dropout": 1.0}, r"train.dropout: a probability in \[0, 1\), got 1.0"),
    ({"dropout": "none"}, r"train.dropout: expected a number, got 'none'"),
    ({"losses": {"reference": "teacher"}}, "train.losses.reference must be frozen or inplace"),
    ({"stages": {"full": {"average": 1.0}}}, r"train.stages.full.average: a decay in \[0, 1\)"),
    ({"stages": {"full": {"keep": "first"}}}, r"train.stages.full.keep: best or last"),
    ({"stages": {"width": {"steps": 3, "keep": "last"}}}, r"train.stages.width.keep: best or last, and last only in "),
    ({"stages": {"exits": {"steps": 2, "pooling": "max"}}}, r"train.stages.exits.pooling: expected one of"),
    ({"exit_pooling": "pair"}, "exit_pooling belongs to the exits stage"),
    ({"depth_layers": "prefix"}, "depth_layers belongs to the depth stage"),
    ({"rewire": False}, r"train: rewire belongs to the rewire stage \(stages: \{rewire: \{enabled: ...\}\}\)"),
    ({"rewire_lists": 8}, r"rewire_lists belongs to the rewire stage \(stages: \{rewire: \{lists: ...\}\}\)"),
    ({"stages": {"depth": {"layers": "first"}}}, r"train.stages.depth.layers: expected one of \['spread', 'prefix'\]"),
    ({"stages": {"depth": {"pooling": "pair"}}}, "train.stages.depth.pooling: only with layers: prefix"),
    ({"stages": {"depth": {"layers": "prefix"}, "exits": {"steps": 2}}}, "an exits stage would replace them"),
    ({"stages": {"full": {"steps": "300"}}}, r"train.stages.full.steps: expected a whole number, got '300'"),
    ({"stages": {"width": {"steps": 3, "configs": 1}}}, r"train.stages.width.configs: must be at least 2, got 1"),
    ({"stages": {"full": {"lr": "fast"}}}, r"train.stages.full.lr: expected a number, got 'fast'"),
    ({"stages": {"rewire": {"list": 8}}}, r"train.stages.rewire: expected some of enabled, lists"),
    ({"stages": {"rewire": {"lists": 0}}}, r"train.stages.rewire.lists: must be at least 1, got 0"),
    ({"seed": "13a"}, r"train.seed: expected a whole number, got '13a'"),
    ({"output": ""}, r"train.output: expected a non-empty string"),
    ({"widths": [0.0, 1.0]}, r"train.widths: expected fractions in \(0, 1\] with 1.0"),
    ({"teacher": {"run": "bm25", "wieght": 0.3}}, r"train.teacher: unknown key 'wieght' for a run teacher"),
    ({"teacher": {"fusion": ["bi-encoder"]}}, r"train.teacher.fusion\[0\]: expected a mapping"),
    ({"teacher": {"fusion": [{"run": "bm25", "weight": "high"}]}},
     r"train.teacher.fusion\[0\].weight: expected a number"),
])
def test_recipe_errors_name_the_key(tiny_data, change, message):
    section = tiny_section(tiny_data)
    for key, value in change.items():
        if value is None:
            del section[key]
        else:
            section[key] = value
    with pytest.raises(InputError, match=message):
        train_spec_from_dict(section)


def train(section: dict) -> dict[str, torch.Tensor]:
    path = Trainer(train_spec_from_dict(section), progress=False, log=lambda message: None).run()
    from rankshrink import load_model

    return load_model(path).state_dict()


def test_training_runs_every_stage_and_is_deterministic(tiny_data):
    first = train(tiny_section(tiny_data))
    from rankshrink import load_model

    model = load_model(tiny_data["dir"] / "out")
    training = model.metadata["training"]
    assert set(training["held_out_ndcg@10"]) == {"full", "rewire", "width", "depth"}
    assert model.rewiring is not None
    for stage in ("full", "width", "depth"):
        lines = stage_log(tiny_data["dir"] / "cache", stage).read_text().splitlines()
        assert len(lines) == 3 + (stage == "full") and "loss" in json.loads(lines[0])
    # width and depth stages distilled from a frozen copy of the network as rewiring left it (DynaBERT)
    assert len(list((tiny_data["dir"] / "cache" / "checkpoints").glob("*/reference/rankshrink.json"))) == 1
    second = train(tiny_section(tiny_data, output=str(tiny_data["dir"] / "again"), cache=str(tiny_data["dir"] / "c2")))
    assert all(torch.equal(first[name], second[name]) for name in first)
    digest = training["inputs_digest"]
    assert digest == load_model(tiny_data["dir"] / "again").metadata["training"]["inputs_digest"]
    assert [path.name.split("-")[-1] for path in (tiny_data["dir"] / "cache" / "checkpoints").iterdir()] == [digest]
    base = load_model(tiny_data["base"]).state_dict()
    assert not torch.equal(first["layers.0.ffn.up.bias"], base["layers.0.ffn.up.bias"])
    # another recipe in the same cache keeps its logs apart: the first recipe's are still whole
    logs = Path(training["logs"])
    assert logs.parent == tiny_data["dir"] / "cache" / "logs" and logs.name.endswith(digest)
    full_log = (logs / "full.jsonl").read_text()
    train(tiny_section(tiny_data, output=str(tiny_data["dir"] / "seed4"), seed=4))
    assert len(list(logs.parent.iterdir())) == 2 and (logs / "full.jsonl").read_text() == full_log


def test_how_often_the_held_out_queries_are_scored_does_not_change_the_model(tiny_data):
    d = tiny_data["dir"]
    stages = {"full": {"steps": 4, "lr": 1e-3, "eval_every": 1}, "rewire": {"enabled": False},
              "width": {"steps": 0}, "depth": {"steps": 0}}
    often = train(tiny_section(tiny_data, stages=stages, output=str(d / "often"), cache=str(d / "c-often")))
    stages["full"]["eval_every"] = 4
    rarely = train(tiny_section(tiny_data, stages=stages, output=str(d / "rarely"), cache=str(d / "c-rarely")))
    assert all(torch.equal(often[name], rarely[name]) for name in often)


def test_keep_last_passes_the_end_of_the_full_stage_on_and_still_logs_the_held_out_scores(tiny_data):
    d = tiny_data["dir"]
    stages = {"full": {"steps": 4, "lr": 1e-3, "eval_every": 1, "keep": "last"}, "rewire": {"enabled": False},
              "width": {"steps": 0}, "depth": {"steps": 0}}
    last = train(tiny_section(tiny_data, stages=stages, output=str(d / "last"), cache=str(d / "c-last")))
    unevaluated = {**stages, "full": {"steps": 4, "lr": 1e-3}}
    end = train(tiny_section(tiny_data, stages=unevaluated, output=str(d / "end"), cache=str(d / "c-end")))
    assert all(torch.equal(last[name], end[name]) for name in last)
    records = [json.loads(line) for line in stage_log(d / "c-last", "full").read_text().splitlines()]
    assert [record["step"] for record in records if "held_out_ndcg@10" in record] == [1, 2, 3, 4]
    from rankshrink import load_model

    assert load_model(d / "last").metadata["training"]["selected_step"] == {"full": 4}
    assert not list((d / "c-last" / "checkpoints").glob("*/best-*"))


def test_a_weight_average_is_what_the_full_stage_keeps_and_it_resumes(tiny_data, monkeypatch):
    d = tiny_data["dir"]
    stages = {"full": {"steps": 4, "lr": 1e-3, "eval_every": 2, "average": 0.5}, "rewire": {"enabled": False},
              "width": {"steps": 0}, "depth": {"steps": 0}}
    averaged = train(tiny_section(tiny_data, stages=stages, output=str(d / "avg"), cache=str(d / "c-avg")))
    plain_stages = {**stages, "full": {**stages["full"], "average": 0.0}}
    plain = train(tiny_section(tiny_data, stages=plain_stages, output=str(d / "plain"), cache=str(d / "c-plain")))
    assert any(not torch.equal(averaged[name], plain[name]) for name in averaged)
    records = [json.loads(line) for line in stage_log(d / "c-avg", "full").read_text().splitlines()]
    evaluated = [record for record in records if "held_out_ndcg@10" in record]
    assert [record["step"] for record in evaluated] == [2, 4]
    assert all("held_out_ndcg@10_unaveraged" in record for record in evaluated)

    real_step, calls = Trainer._step_losses, {"n": 0}

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:   # after the checkpoint at step 2: the average must come back with it
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    section = tiny_section(tiny_data, stages=stages, output=str(d / "avg-resumed"), cache=str(d / "c-avg-resumed"))
    monkeypatch.setattr(Trainer, "_step_losses", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(section)
    monkeypatch.setattr(Trainer, "_step_losses", real_step)
    resumed = train(section)
    assert all(torch.equal(averaged[name], resumed[name]) for name in averaged)


def test_weight_average_follows_the_weights_with_a_short_memory_at_first():
    from rankshrink.train.averaging import WeightAverage

    weight = torch.nn.Parameter(torch.zeros(2))
    average = WeightAverage([weight], decay=0.9)
    expected = torch.zeros(2)
    for update in range(1, 40):
        with torch.no_grad():
            weight.add_(1.0)
        average.update()
        decay = min(0.9, (1 + update) / (10 + update))
        expected = decay * expected + (1 - decay) * weight.detach()
    assert torch.allclose(average.average[0], expected)
    with average.applied():
        assert torch.equal(weight.detach(), average.average[0])
    assert torch.equal(weight.detach(), torch.full((2,), 39.0))
    with pytest.raises(ValueError, match="decay"):
        WeightAverage([weight], decay=1.0)


@pytest.mark.parametrize("interrupted, at_call", [("_step_losses", 4),      # full step 4, after its checkpoint
                                                   ("_step_losses", 8),      # depth step 1, after its stage's end
                                                   ("_save_optimizer", 2)])  # writing the width stage's checkpoint
def test_interrupted_training_resumes_to_the_same_model(tiny_data, monkeypatch, interrupted, at_call):
    import rankshrink.train.distill as distill

    uninterrupted = train(tiny_section(tiny_data, output=str(tiny_data["dir"] / "whole"),
                                       cache=str(tiny_data["dir"] / "c-whole")))
    owner = Trainer if interrupted == "_step_losses" else distill
    real = getattr(owner, interrupted)
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, interrupted, interrupting)
    section = tiny_section(tiny_data, output=str(tiny_data["dir"] / "resumed"), cache=str(tiny_data["dir"] / "c-r"))
    with pytest.raises(KeyboardInterrupt):
        train(section)
    assert not (tiny_data["dir"] / "resumed").exists()
    monkeypatch.setattr(owner, interrupted, real)
    resumed = train(section)
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
    assert len(list((tiny_data["dir"] / "c-r" / "checkpoints").glob("*/state-*"))) == 1   # the last checkpoint's
    for stage, steps in (("full", 4), ("width", 3), ("depth", 3)):      # replayed steps are logged once
        lines = stage_log(tiny_data["dir"] / "c-r", stage).read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1)), stage


def test_a_data_file_changed_in_place_trains_afresh_instead_of_resuming(tiny_data):
    messages: list[str] = []
    section = tiny_section(tiny_data)
    Trainer(train_spec_from_dict(section), progress=False, log=messages.append).run()
    qrels = tiny_data["dir"] / "qrels.txt"
    qrels.write_text(qrels.read_text().replace("q1 0 p1 2", "q1 0 p2 3"))
    messages.clear()
    Trainer(train_spec_from_dict(section), progress=False, log=messages.append).run()
    assert not any("resuming" in message for message in messages)
    assert len(list((tiny_data["dir"] / "cache" / "checkpoints").iterdir())) == 2


def test_the_exits_stage_trains_new_exit_heads_on_the_frozen_network_and_reruns_alone(tiny_data):
    from rankshrink import load_model

    d = tiny_data["dir"]
    section = tiny_section(tiny_data)
    network = train(section)
    messages: list[str] = []
    exits = {"steps": 3, "lr": 1e-2, "configs": 3, "pooling": "pair"}
    with_exits = tiny_section(tiny_data, stages={**section["stages"], "exits": exits})
    Trainer(train_spec_from_dict(with_exits), progress=False, log=messages.append).run()
    assert any("done: ['depth', 'full', 'rewire', 'width']" in m for m in messages)   # the network was not retrained
    model = load_model(d / "out")
    trained = model.state_dict()
    assert model.config.exit_pooling == "pair" and model.exits["0"].pooler.in_features == 3 * 32
    assert all(torch.equal(trained[name], network[name]) for name in network if not name.startswith("exits."))
    assert set(model.metadata["training"]["held_out_ndcg@10"]["exits"]) == {"exit-1", "exit-2", "exit-3", "exit-4"}
    lines = stage_log(d / "cache", "exits").read_text().splitlines()
    assert len(lines) == 3 and {"exit_kl", "exit_offset"} <= set(json.loads(lines[0]))
    # A changed exits stage runs again on its own, and gives what a run from nothing gives.
    messages.clear()
    exits["steps"] = 4
    again = tiny_section(tiny_data, stages={**section["stages"], "exits": exits})
    Trainer(train_spec_from_dict(again), progress=False, log=messages.append).run()
    assert any("done: ['depth', 'exits', 'full', 'rewire', 'width']" in m for m in messages)
    rerun = load_model(d / "out").state_dict()
    fresh = train({**again, "output": str(d / "fresh"), "cache": str(d / "c-fresh")})
    assert all(torch.equal(rerun[name], fresh[name]) for name in fresh)
    assert not torch.equal(rerun["exits.0.pooler.weight"], trained["exits.0.pooler.weight"])
    # Without it again, the exit heads are the depth stage's, as if it had never run.
    train(section)
    without = load_model(d / "out")
    assert without.config.exit_pooling == "cls" and "exits" not in without.metadata["training"]["held_out_ndcg@10"]
    assert all(torch.equal(without.state_dict()[name], network[name]) for name in network)


def test_the_exit_offset_weight_keys_the_exits_stage_alone(tiny_data):
    section = tiny_section(tiny_data)
    default = Trainer(train_spec_from_dict(section), progress=False)
    light = Trainer(train_spec_from_dict(tiny_section(tiny_data, losses={"exit_offset": 0.1})), progress=False)
    # the network's checkpoint is shared (only the exits stage runs again); the whole recipe's key differs
    assert light.fingerprint == default.fingerprint and light.recipe_fingerprint != default.recipe_fingerprint
    assert light._exit_offset_weight() == 0.1 and default._exit_offset_weight() == default.spec.losses.exit_kl == 1.0
    for bad in (-1, "heavy", True):
        with pytest.raises(InputError, match="losses.exit_offset(: expected a number| must be a weight >= 0)"):
            train_spec_from_dict(tiny_section(tiny_data, losses={"exit_offset": bad}))


def test_loss_weights_are_numbers_at_least_zero_and_temperatures_above_zero(tiny_data):
    for name, bad in (("teacher_kl", -0.5), ("hidden_mse", "a lot"), ("labels_ce", None), ("exit_kl", float("nan")),
                      ("inplace_kl", True)):
        with pytest.raises(InputError, match=f"losses.{name}(: expected a number| must be a weight >= 0)"):
            train_spec_from_dict(tiny_section(tiny_data, losses={name: bad}))
    for name in ("temperature", "label_temperature"):
        with pytest.raises(InputError, match=f"losses.{name} must be a temperature > 0"):
            train_spec_from_dict(tiny_section(tiny_data, losses={name: 0}))
    spec = train_spec_from_dict(tiny_section(tiny_data, losses={"hidden_mse": 0, "exit_offset": None, "temperature": 2}))
    assert spec.losses.hidden_mse == 0 and spec.losses.temperature == 2


def test_a_prefix_depth_stage_trains_fresh_pair_heads_with_the_network_on_the_final_scale(tiny_data):
    from rankshrink import load_model

    d = tiny_data["dir"]
    section = tiny_section(tiny_data)
    spread_spec = train_spec_from_dict(section)
    stages = {**section["stages"], "depth": {**section["stages"]["depth"], "layers": "prefix"}}
    spec = train_spec_from_dict(tiny_section(tiny_data, stages=stages))
    assert (spec.depth_layers, spec.exit_pooling) == ("prefix", "pair")
    # the heads are trained with the network, so their pooling keys the network's checkpoints
    with_cls = train_spec_from_dict(tiny_section(tiny_data, stages={**stages, "depth": {**stages["depth"], "pooling": "cls"}}))
    assert len({Trainer(s, progress=False).fingerprint for s in (spread_spec, spec, with_cls)}) == 3
    Trainer(spec, progress=False, log=lambda message: None).run()
    model = load_model(d / "out")
    assert model.config.depth_layers == "prefix" and model.config.exit_pooling == "pair"
    assert model.layers_for(0.5) == [0, 1]
    lines = [json.loads(line) for line in stage_log(d / "cache", "depth").read_text().splitlines()]
    assert all({"inplace_offset", "exit_kl", "exit_offset"} <= set(line) for line in lines)
    for head in model.exits.values():   # fresh pair heads (the base's are [CLS] copies of its final head), trained
        assert head.pooler.in_features == 3 * 32 and float(head.classifier.bias.abs().max()) > 0


def test_dropout_is_the_recipes_while_training_and_the_model_keeps_it(tiny_data):
    """``dropout`` sets every hidden and attention dropout of the network and its heads; at 0 a training-mode
    forward pass is the eval one. Without the key, the base's dropout and the fingerprint recipes had before."""
    from rankshrink import load_model

    d = tiny_data["dir"]
    stages = {"full": {"steps": 2, "lr": 1e-3, "eval_every": 0}, "rewire": {"enabled": False},
              "width": {"steps": 0}, "depth": {"steps": 0}}
    section = tiny_section(tiny_data, stages=stages, output=str(d / "no-dropout"), dropout=0.0)
    assert Trainer(train_spec_from_dict(section), progress=False).fingerprint != \
        Trainer(train_spec_from_dict({**section, "dropout": None}), progress=False).fingerprint
    assert Trainer(train_spec_from_dict({**section, "dropout": None}), progress=False).fingerprint == \
        Trainer(train_spec_from_dict({key: value for key, value in section.items() if key != "dropout"}),
                progress=False).fingerprint
    train(section)
    model = load_model(d / "no-dropout")
    assert model.config.hidden_dropout == model.config.attention_dropout == 0.0
    assert json.loads((d / "no-dropout" / "config.json").read_text())["hidden_dropout_prob"] == 0.0
    assert load_model(tiny_data["base"]).config.hidden_dropout > 0
    batch = model.tokenize([QUERIES[0]] * 3, PASSAGES[:3], max_length=32)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(**batch).score, model.eval()(**batch).score)
        model.set_dropout(0.5)
        assert all(module.p == 0.5 for module in model.modules() if isinstance(module, torch.nn.Dropout))
        assert not torch.allclose(model.train()(**batch).score, model.eval()(**batch).score)


def test_a_sub_network_matches_the_hidden_states_of_what_its_layers_feed():
    from rankshrink.model.dynabert import RankerOutput
    from rankshrink.train.distill import _matching_states

    states = [torch.full((1, 2, 3), float(i)) for i in range(7)]   # the embeddings, then layers 0-5
    full = RankerOutput(torch.zeros(1), hidden_states=states, layers=list(range(6)))
    matched = lambda sub, final: [int(s[0, 0, 0]) for s in _matching_states(full, sub, ends_at_final_head=final)]  # noqa: E731
    # DynaBERT's depth 0.5 feeds the final head from layer 4: that state matches the full network's last
    assert matched(RankerOutput(torch.zeros(1), layers=[0, 2, 4]), True) == [1, 3, 6]
    # a prefix depth's layer 2 feeds its exit head and, in the full network, layer 3: it matches its own state
    assert matched(RankerOutput(torch.zeros(1), layers=[0, 1, 2]), False) == [1, 2, 3]


def test_a_list_run_in_length_sorted_slices_scores_as_one_padded_batch(tiny_data):
    """``micro_batches``: the list sorted by length and run in slices, each cut to its own longest pair, gives
    the scores, exit scores and hidden states (at real tokens) of one padded batch; 1 keeps one batch."""
    from rankshrink import load_model
    from rankshrink.train.batches import forward_in_slices, length_sorted

    model = load_model(tiny_data["base"]).eval()
    passages = PASSAGES[::-1]
    order, batch = length_sorted(model.tokenize([QUERIES[0]] * len(passages), passages, max_length=32))
    lengths = batch["attention_mask"].sum(1)
    assert sorted(order) == list(range(len(passages))) and bool((lengths.diff() >= 0).all())
    assert [passages[i] for i in order][0] == "dog" and lengths[0] < lengths[-1]
    shapes = []

    def network(input_ids, attention_mask, token_type_ids, **options):
        shapes.append(tuple(input_ids.shape))
        return model(input_ids, attention_mask, token_type_ids, **options)

    options = {"width": 0.5, "exits": "all", "output_hidden_states": True}
    whole = network(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **options)
    sliced = forward_in_slices(network, batch, 3, **options)
    assert [rows for rows, _ in shapes[1:]] == [3, 2, 2] and shapes[1][1] < shapes[0][1] == shapes[3][1]
    torch.testing.assert_close(sliced.score, whole.score)
    assert set(sliced.exit_scores) == set(whole.exit_scores) and len(whole.exit_scores) > 1
    for layer, scores in whole.exit_scores.items():
        torch.testing.assert_close(sliced.exit_scores[layer], scores)
    real = batch["attention_mask"].bool()
    assert len(sliced.hidden_states) == len(whole.hidden_states) and sliced.layers == whole.layers
    for joined, alone in zip(sliced.hidden_states, whole.hidden_states):
        assert joined.shape == alone.shape and not joined[:3, shapes[1][1]:].any()   # the cut columns: zeros
        torch.testing.assert_close(joined[real], alone[real])
    assert forward_in_slices(network, batch, 1, **options).score.shape == (len(passages),)
    assert shapes[-1] == shapes[0]
    section = tiny_section(tiny_data)
    one_batch = Trainer(train_spec_from_dict({**section, "micro_batches": 1}), progress=False)
    assert one_batch.fingerprint != Trainer(train_spec_from_dict(section), progress=False).fingerprint
    with pytest.raises(InputError, match="micro_batches: must be at least 1, got 0"):
        train_spec_from_dict({**section, "micro_batches": 0})


def test_offline_recipe_smoke_run(tmp_path):
    shared_path("trec-dl", "dl21")
    result = subprocess.run(
        [sys.executable, "-m", "rankshrink", "train", str(REPO / "pipelines" / "trec-dl-offline.yaml"), "--smoke",
         "--quiet", "--set", f"output={tmp_path / 'model'}", "--set", f"cache={tmp_path / 'cache'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from rankshrink import load_model

    model = load_model(tmp_path / "model-smoke")
    assert model.rewiring is not None and len(model.exits) == 5 and model.config.exit_pooling == "pair"
    assert set(model.metadata["training"]["held_out_ndcg@10"]) == {"full", "rewire", "width", "depth", "exits"}


def test_the_labels_only_ablation_trains_on_labelled_queries_without_a_teacher(tiny_data):
    d = tiny_data["dir"]
    unlabelled = {"name": "unlabelled", "topics": str(d / "topics.tsv"), "collection": str(d / "passages.jsonl"),
                  "runs": tiny_data["runs"]}
    section = tiny_section(tiny_data, output=str(d / "labels-only"), cache=str(d / "c-labels"),
                           losses={"teacher_kl": 0, "inplace_kl": 0, "hidden_mse": 0, "exit_kl": 0,
                                   "sub_labels_ce": 1, "exit_labels_ce": 1})
    section["data"] = section["data"] + [unlabelled]
    messages = []
    train_recipe(section, progress=False, log=messages.append)
    assert any("without labels left out" in message for message in messages)
    assert not (d / "c-labels" / "teacher").exists()          # no teacher was asked for anything


def test_candidates_searched_with_bm25_are_cached_and_teach(tiny_data):
    """The MS MARCO train path (judged queries, BM25 negatives from an index), on a local index."""
    from rankshrink.data import read_qrels, read_run, read_topics
    from rankshrink.firststage import BM25, build_index

    d = tiny_data["dir"]
    build_index(d / "passages.jsonl", d / "index", threads=1, progress=False)
    (d / "topics.tsv").write_text("q0\tcapital of france sky\nq1\tfish cat mat sky\nq2\tsky blue fish\n"
                                  "q3\tcar road dog\n")   # words that several passages share
    section = tiny_section(tiny_data, teacher={"run": "bm25"}, cache=str(d / "c-search"),
                           output=str(d / "searched"))
    section["data"] = [{"name": "judged", "topics": str(d / "topics.tsv"), "collection": str(d / "passages.jsonl"),
                        "qrels": str(d / "qrels.txt"), "search": {"index": str(d / "index"), "k": 5},
                        "queries": 3, "held_out": 1}]
    trainer = Trainer(train_spec_from_dict(section), progress=False, log=lambda message: None)
    train_groups, held_out = trainer.load_data()
    [cached] = list((d / "c-search" / "runs").glob("judged-bm25-*.trec"))
    judged = sorted(read_qrels(d / "qrels.txt"))[:3]
    topics = read_topics(d / "topics.tsv")
    expected = BM25(d / "index").batch_search({qid: topics[qid] for qid in judged}, k=5)
    searched = read_run(cached)
    assert {qid: list(docs) for qid, docs in searched.items()} == \
        {qid: list(docs) for qid, docs in expected.items() if docs}
    for qid, docs in searched.items():
        assert list(docs.values()) == pytest.approx(list(expected[qid].values()), abs=1e-4)
    groups = {group.qid: group for group in train_groups + held_out}
    assert set(groups) == {qid for qid, docs in expected.items() if docs}
    for qid, group in groups.items():
        assert set(group.docids) == set(expected[qid])
    assert all(group.teacher is not None for group in train_groups)   # the searched run teaches
    modified = cached.stat().st_mtime_ns
    Trainer(train_spec_from_dict(section), progress=False, log=lambda message: None).run()   # trains, reuses
    assert cached.stat().st_mtime_ns == modified


def test_pseudo_queries_are_content_word_spans_of_passages_outside_the_excluded():
    from rankshrink.data import Passage
    from rankshrink.train.pseudo import STOPWORDS, pseudo_queries

    passages = [Passage(f"d{i}", f"The {i}th Record: river{i} light{i} of water{i} and road{i}, rain{i} on grass{i} "
                                 f"in the city{i} near hills{i}.") for i in range(40)]
    passages.append(Passage("short", "too short to cut"))
    queries = pseudo_queries(passages, 12, seed=5, exclude={"d0", "d1", "d2"}, prefix="x-")
    assert list(queries) == [f"x-{i}" for i in range(12)]
    sources = set()
    for query in queries.values():
        words = query.split()
        assert 3 <= len(words) <= 8 and words[0] not in STOPWORDS and words[-1] not in STOPWORDS
        owners = [p.docid for p in passages if f" {query} " in " " + " ".join(
            re.findall(r"[a-z0-9']+", p.text.lower())) + " "]
        assert len(owners) == 1 and owners[0] not in {"d0", "d1", "d2", "short"}   # one passage, not excluded
        sources.add(owners[0])
    assert len(sources) == 12                                                     # each from another passage
    assert pseudo_queries(passages, 12, seed=5, exclude={"d0", "d1", "d2"}, prefix="x-") == queries
    assert pseudo_queries(passages, 12, seed=6, exclude={"d0", "d1", "d2"}, prefix="x-") != queries
    assert len(pseudo_queries(passages[:5], 12, seed=5)) == 5                     # no more than there are sources


def _write_pool(path: Path) -> dict[str, str]:
    shared = ["river", "light", "water", "road", "rain", "grass", "city", "fish"]
    texts = {f"p{i}": " ".join(f"u{i}w{j} {shared[(3 * i + j) % 8]}" for j in range(6)) for i in range(10)}
    path.write_text("".join(json.dumps({"id": docid, "contents": text}) + "\n" for docid, text in texts.items()))
    return texts


def _with_pool(section: dict, d: Path) -> dict:
    section["data"].append({"name": "pool", "collection": str(d / "pool.jsonl"),
                            "pseudo_queries": {"count": 5, "max_words": 6}, "search": {"k": 4}})
    return section


def test_pseudo_query_data_sets_are_searched_in_their_own_index_and_teacher_scored(tiny_data):
    """Unlabelled queries cut from a pool: indexed once into the cache, BM25 candidates cached, teacher-scored
    by the fusion parts that apply, never cut from a held-out query's candidates."""
    from rankshrink.data import read_run

    d = tiny_data["dir"]
    texts = _write_pool(d / "pool.jsonl")
    section = _with_pool(tiny_section(tiny_data, cache=str(d / "c-pseudo"), output=str(d / "pseudo")), d)
    messages = []
    trainer = Trainer(train_spec_from_dict(section), progress=False, log=messages.append)
    train_groups, held_out = trainer.load_data()
    excluded = {docid for group in held_out for docid in group.docids}
    pseudo = [group for group in train_groups if group.source == "pool"]
    assert len(pseudo) == min(5, len(set(texts) - excluded)) and all(group.labels is None and group.teacher is not None for group in pseudo)
    for group in pseudo:
        owner = [docid for docid, text in texts.items() if group.query in text]
        assert len(owner) == 1 and owner[0] not in excluded and owner[0] in group.docids
        assert 1 <= len(group) <= 4
    [index] = list((d / "c-pseudo" / "indexes").glob("pool-*"))
    [run_file] = list((d / "c-pseudo" / "runs").glob("pool-bm25-*.trec"))
    assert {group.qid: set(group.docids) for group in pseudo} == {qid: set(docs) for qid, docs in
                                                                 read_run(run_file).items()}
    stamps = index.stat().st_mtime_ns, run_file.stat().st_mtime_ns
    again, _ = Trainer(train_spec_from_dict(section), progress=False, log=messages.append).load_data()
    assert [g.query for g in again if g.source == "pool"] == [g.query for g in pseudo]
    assert (index.stat().st_mtime_ns, run_file.stat().st_mtime_ns) == stamps      # neither rebuilt
    os.utime(d / "pool.jsonl", ns=(stamps[0] + 10**9, stamps[0] + 10**9))     # the same bytes, a new mtime
    Trainer(train_spec_from_dict(section), progress=False, log=messages.append).load_data()
    assert sum("indexing" in message for message in messages) == 1
    with open(d / "pool.jsonl", "a") as pool:                                  # new bytes: a new index
        pool.write(json.dumps({"id": "p10", "contents": "u10w0 river u10w1 light"}) + "\n")
    Trainer(train_spec_from_dict(section), progress=False, log=messages.append).load_data()
    assert len(list((d / "c-pseudo" / "indexes").glob("pool-*"))) == 2


def test_a_pool_index_published_by_another_trainer_meanwhile_is_kept_not_replaced(tiny_data, monkeypatch):
    """Two trainers sharing a cache (two seeds at once) may both build a pool's index. The one that finishes
    second keeps the first one's: replacing an index's files under the other's open reader corrupts its search."""
    import shutil

    from rankshrink.firststage import bm25

    d = tiny_data["dir"]
    _write_pool(d / "pool.jsonl")
    section = _with_pool(tiny_section(tiny_data, cache=str(d / "c-race"), output=str(d / "race")), d)
    publish, first = bm25.publish_directory, {}

    def racing(new, target, **options):   # the other trainer publishes the same index just before this one
        shutil.copytree(new, target)
        first["inode"] = target.stat().st_ino
        return publish(new, target, **options)

    monkeypatch.setattr(bm25, "publish_directory", racing)
    train_groups, _ = Trainer(train_spec_from_dict(section), progress=False, log=lambda _: None).load_data()
    [index] = (d / "c-race" / "indexes").iterdir()          # no staging directory left behind
    assert index.name.startswith("pool-") and index.stat().st_ino == first["inode"]
    assert any(group.source == "pool" for group in train_groups)


@pytest.mark.parametrize("pool_change, message", [
    ({"topics": "t.tsv"}, r"pseudo_queries makes its own queries .* remove \['topics'\]"),
    ({"search": None}, "pseudo_queries need search"),
    ({"pseudo_queries": {"count": 0}}, "pseudo_queries.count must be a positive integer, got 0"),
    ({"pseudo_queries": {"min_words": 5, "max_words": 4}}, "min_words 5 > max_words 4"),
])
def test_pseudo_query_recipe_errors_name_the_key(tiny_data, pool_change, message):
    section = tiny_section(tiny_data)
    pool = {"name": "pool", "collection": "pool.jsonl", "pseudo_queries": {"count": 3}, "search": {"k": 4}}
    pool.update(pool_change)
    section["data"].append({key: value for key, value in pool.items() if value is not None})
    with pytest.raises(InputError, match=message):
        train_spec_from_dict(section)


@pytest.mark.parametrize("data_change, message", [
    ({"runs": None}, "give runs .candidate run files. or search"),
    ({"search": {"index": "x", "k": 1}}, "search.k must be an integer >= 2, got 1"),
    ({"search": {"index": "x", "name": "dense"}}, "search.name 'dense' is also a run's name"),
    ({"search": {"idx": "x"}}, r"search: unknown key\(s\) \['idx'\]"),
    ({"teacher": "bm25"}, r"data\[0\].teacher: expected a mapping"),
])
def test_data_set_errors_name_the_key(tiny_data, data_change, message):
    section = tiny_section(tiny_data)
    for key, value in data_change.items():
        if value is None:
            del section["data"][0][key]
        else:
            section["data"][0][key] = value
    with pytest.raises(InputError, match=message):
        train_spec_from_dict(section)


def test_two_data_sets_may_not_share_a_name_and_a_float_without_a_dot_is_a_float(tiny_data):
    section = tiny_section(tiny_data)
    section["data"].append(dict(section["data"][0]))
    with pytest.raises(InputError, match=r"train.data\[1\].name 'tiny' is already data\[0\]'s"):
        train_spec_from_dict(section)
    spec = train_spec_from_dict(tiny_section(tiny_data, stages={"full": {"steps": 4, "lr": "1e-4"}}))
    assert spec.full.lr == 1e-4      # YAML reads 1e-4 (no dot) as a string
    section = tiny_section(tiny_data, teacher={"fusion": [{"bi-encoder": "m", "max_length": None},
                                                          {"run": "bm25", "weight": -0.3}]})
    section["data"][0]["name"] = 2021
    assert train_spec_from_dict(section).data[0].name == "2021"
    with pytest.raises(InputError, match=r"train.teacher.batch_size must be a positive integer, got 0"):
        train_spec_from_dict(tiny_section(tiny_data, teacher={"bi-encoder": "m", "batch_size": 0}))


def test_a_query_the_qrels_do_not_judge_has_no_labels_and_is_never_held_out(tiny_data):
    from rankshrink.data import read_qrels, read_run, read_topics

    qrels = read_qrels(tiny_data["dir"] / "qrels.txt")
    del qrels["q3"]
    groups = build_groups(read_topics(tiny_data["dir"] / "topics.tsv"), [read_run(tiny_data["runs"]["bm25"])],
                          Collection(tiny_data["dir"] / "passages.jsonl"), qrels=qrels, source="tiny")
    assert {group.qid: group.labels is None for group in groups} == {"q0": False, "q1": False, "q2": False, "q3": True}
    (tiny_data["dir"] / "qrels.txt").write_text("q0 0 p1 3\nq1 0 p2 2\n")      # two judged queries
    trainer = Trainer(train_spec_from_dict(tiny_section(tiny_data)), progress=False, log=lambda message: None)
    train_groups, held_out = trainer.load_data()
    assert [group.qid for group in held_out] in (["q0"], ["q1"]) and len(train_groups) == 3
    (tiny_data["dir"] / "qrels.txt").write_text("q9 0 p1 3\n")                  # none of its queries judged
    with pytest.raises(InputError, match="data set 'tiny': held_out 1 needs judged queries"):
        Trainer(train_spec_from_dict(tiny_section(tiny_data)), progress=False, log=lambda message: None).load_data()


def test_the_online_recipe_distils_from_ms_marco_train_and_fails_offline_with_one_line(tmp_path, capsys,
                                                                                        monkeypatch):
    from rankshrink.cli import main
    from rankshrink.pipeline.recipe import read_recipe

    recipe = read_recipe(REPO / "pipelines" / "msmarco-distill.yaml")
    spec = train_spec_from_dict(recipe.train)
    [data] = spec.data
    assert data.topics == data.qrels == "msmarco-passage/train/judged" and data.search.index == "msmarco-v1-passage"
    assert spec.teacher == {"cross-encoder": "cross-encoder/ms-marco-MiniLM-L-12-v2", "max_length": 256}
    assert recipe.rerank["model"] == spec.output
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "irds"))   # nothing cached: it must fetch
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(REPO / "pipelines" / "msmarco-distill.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rankshrink train: error: msmarco-passage/train/judged: ir_datasets could not fetch")
