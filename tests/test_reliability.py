"""The pipeline under bad input, concurrent callers and Ctrl-C: a clear error or a correct result, never a
crash, a hang, a different ranking, or a half-written file."""
from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import shared_path
from rankshrink.data import read_run, read_topics
from rankshrink.errors import InputError
from rankshrink.pipeline import Pipeline
from rankshrink.pipeline.search import _Turns, keep_ctrl_c_in_python
from test_model_fixtures import WORDS
from test_pipeline_fixtures import TOPICS, tiny_world, write_collection, write_topics  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def pipeline(tiny_world) -> Pipeline:
    return Pipeline(index=tiny_world.index, model=tiny_world.model, collection=tiny_world.collection,
                    candidates=20, max_length=64)


def random_topics(count: int, seed: int = 3) -> dict[str, str]:
    rng = random.Random(seed)
    return {f"r{i}": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for i in range(count)}


# ---------------------------------------------------------------------------------------------
# Concurrent callers


def test_threads_searching_at_once_rank_exactly_as_one_thread_does(pipeline):
    topics = random_topics(20)
    sequential = {qid: pipeline.search(query, k=10) for qid, query in topics.items()}
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(number: int) -> None:
        try:
            start.wait()
            order = list(topics)
            random.Random(number).shuffle(order)   # each thread its own order: queries really interleave
            results[number] = {qid: pipeline.search(topics[qid], k=10) for qid in order}
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 4
    for number in range(4):
        assert results[number] == sequential
    assert pipeline.batch_search(topics, k=10, threads=4) == \
        {qid: {hit.docid: hit.score for hit in hits} for qid, hits in sequential.items()}


def run_at_once(work, count: int = 4, timeout: float = 120) -> list:
    """``work(number)`` on ``count`` threads released together; their results, or the first error raised."""
    results: list = [None] * count
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def worker(number: int) -> None:
        try:
            start.wait()
            results[number] = work(number)
        except BaseException as error:  # noqa: BLE001 - raised below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if errors:
        raise errors[0]
    return results


def test_threads_with_a_budget_hold_it_and_rank_as_one_thread_does(tiny_world):
    pytest.importorskip("rankshrink.rerank", reason="budgets need the engine (rankshrink.rerank)")
    # A budget no rerank of the tiny model comes near even on a loaded machine (timing is for eval/, not tests):
    # what is checked is the admission arithmetic, the accounting, and that rankings do not move.
    budget = 20_000.0
    pipeline = Pipeline(index=tiny_world.index, model=tiny_world.model, collection=tiny_world.collection,
                        candidates=20, max_length=64, concurrency=4, overhead_ms=20)
    topics = random_topics(20)
    sequential = {qid: pipeline.search_with_stats(query, k=10, budget_ms=budget) for qid, query in topics.items()}

    def one_thread(number: int) -> dict:
        order = list(topics)
        random.Random(number).shuffle(order)
        return {qid: pipeline.search_with_stats(topics[qid], k=10, budget_ms=budget) for qid in order}

    for results in run_at_once(one_thread):
        for qid, (hits, stats) in results.items():
            assert hits == sequential[qid][0]
            assert stats.latency_ms <= budget
            if stats.candidates:   # the reranker got the fixed share, not what the queue happened to leave
                assert stats.rerank_budget_ms == budget / 4 - 20 == sequential[qid][1].rerank_budget_ms
                assert stats.rerank_deadline_ms >= stats.rerank_budget_ms
                assert not stats.deadline_hit
                assert stats.latency_ms >= stats.queued_ms + stats.first_stage_ms + stats.rerank_ms - 0.5


def test_the_configuration_comes_from_the_share_and_the_profile_not_the_measured_load(tiny_world):
    pytest.importorskip("rankshrink.rerank", reason="budgets need the engine (rankshrink.rerank)")
    from rankshrink.model import load_model
    from rankshrink.rerank import Reranker

    point = {"max_length": 64, "exit_risk": None, "ms_fixed": 0.0}
    frontier = [{**point, "width": 0.5, "depth": 0.5, "candidates": 10, "ndcg@10": 0.3, "ms_p50": 8, "ms_p95": 10},
                {**point, "width": 1.0, "depth": 1.0, "candidates": 20, "ndcg@10": 0.5, "ms_p50": 80, "ms_p95": 100}]
    model = load_model(tiny_world.model)

    def pipeline(**options) -> Pipeline:
        reranker = Reranker(model, max_length=64, candidates=20, profile={"frontier": frontier})
        return Pipeline(index=tiny_world.index, model=reranker, collection=tiny_world.collection, concurrency=4,
                        overhead_ms=20, **{"headroom": 0.0, **options})

    def width(p: Pipeline, budget: float) -> float:
        return p.search_with_stats(TOPICS["q0"], k=10, budget_ms=budget)[1].config["width"]

    steady = pipeline()
    assert width(steady, 4000) == 1.0          # share 980 ms: the rich point fits
    assert width(steady, 400) == 0.5           # share 80 ms: only the cheap one
    steady.reranker._load = 50.0               # as if the engine had measured a machine 50x slower than profiled
    assert width(steady, 4000) == 1.0          # ... the configuration does not move
    adaptive = pipeline(adapt_to_load=True)
    adaptive.reranker._load = 50.0
    assert width(adaptive, 4000) == 0.5        # ... unless asked to adapt
    # headroom: the configuration must fit (1 - headroom) of the share; the deadline is the whole share
    assert width(pipeline(headroom=0.8), 840) == 0.5      # share 190 ms: the configuration must fit 38 ms
    assert width(pipeline(headroom=0.0), 840) == 1.0


def test_a_share_of_the_budget_that_leaves_nothing_for_the_reranker_returns_the_first_stage_order(tiny_world):
    pytest.importorskip("rankshrink.rerank", reason="budgets need the engine (rankshrink.rerank)")
    from rankshrink.firststage import BM25

    pipeline = Pipeline(index=tiny_world.index, model=tiny_world.model, collection=tiny_world.collection,
                        candidates=20, max_length=64, concurrency=4, overhead_ms=20)
    query = TOPICS["q0"]
    hits, stats = pipeline.search_with_stats(query, k=10, budget_ms=60)     # 60 / 4 - 20 < 0
    assert stats.rerank_budget_ms == 0
    assert [hit.docid for hit in hits] == list(BM25(tiny_world.index).search(query, k=10))
    assert [hit.docid for hit in pipeline.search(query, k=10, budget_ms=2000)] != [hit.docid for hit in hits]


def test_a_query_alone_may_run_past_its_share_but_not_past_its_budget(tiny_world):
    pipeline = Pipeline(index=tiny_world.index, model=tiny_world.model, collection=tiny_world.collection,
                        candidates=20, max_length=64, concurrency=4, overhead_ms=20)
    _, stats = pipeline.search_with_stats(TOPICS["q0"], k=10, budget_ms=4000)
    assert stats.rerank_budget_ms == 4000 / 4 - 20                 # planned for the share ...
    left = 4000 - stats.queued_ms - stats.first_stage_ms
    assert left - 50 < stats.rerank_deadline_ms <= left + 1    # ... but nobody waits: the deadline is its budget


def test_a_stretched_turn_leaves_every_waiting_query_its_turns():
    turns = _Turns()
    assert turns.spare_until() == math.inf
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with turns.turn():
            holding.set()
            release.wait(10)

    def waiter(ends_by: float, per_turn_s: float) -> None:
        with turns.turn(ends_by, per_turn_s):
            pass

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    holding.wait(10)
    for number, (ends_by, per_turn_s) in enumerate([(100.0, 10.0), (90.0, 5.0), (200.0, 1.0)], start=1):
        threads.append(threading.Thread(target=waiter, args=(ends_by, per_turn_s)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while len(turns._waiting) != number and time.monotonic() < deadline:
            time.sleep(0.001)
    # the first waiter needs 10 s before 100; the second 10 + 5 s before 90; the third 16 s before 200
    assert turns.spare_until() == min(100.0 - 10.0, 90.0 - 15.0, 200.0 - 16.0) == 75.0
    release.set()
    for thread in threads:
        thread.join(10)
    assert turns.spare_until() == math.inf and not turns._waiting


def test_reranks_take_turns_in_arrival_order():
    turns = _Turns()
    order: list[int] = []
    holding = threading.Event()
    release = threading.Event()

    def first() -> None:
        with turns.turn():
            holding.set()
            release.wait(10)
            order.append(0)

    def later(number: int) -> None:
        with turns.turn():
            order.append(number)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    holding.wait(10)
    for number in range(1, 6):   # queue up one by one, so arrival order is known
        threads.append(threading.Thread(target=later, args=(number,)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while turns._next_ticket != number + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3, 4, 5]


def test_a_waiter_interrupted_by_ctrl_c_gives_up_its_turn(monkeypatch):
    """The main thread, waiting for a turn, gets Ctrl-C: it leaves, and whoever queued behind it still runs."""
    keep_ctrl_c_in_python()   # this process may have started the JVM, which takes SIGINT over
    turns = _Turns()
    holding, release, after = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        with turns.turn():
            holding.set()
            release.wait(10)

    def behind() -> None:
        with turns.turn():
            after.set()

    def interrupt_main() -> None:
        while turns._next_ticket < 2:                             # the main thread holds ticket 1, waiting
            time.sleep(0.001)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(0.1)
        release.set()

    first = threading.Thread(target=holder)
    first.start()
    holding.wait(10)
    helpers = [threading.Thread(target=interrupt_main)]
    with pytest.raises(KeyboardInterrupt):
        helpers[0].start()
        with turns.turn():   # ticket 1: interrupted while waiting
            pytest.fail("the interrupted waiter must not get the turn")
    # ticket 2 was taken after ours; it must run once the holder is done
    late = threading.Thread(target=behind)
    late.start()
    assert after.wait(10), "the queue stalled behind an interrupted waiter"
    for thread in (first, late, *helpers):
        thread.join(10)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_a_query_longer_than_512_tokens_is_truncated_not_an_error(pipeline, tiny_world):
    long_query = " ".join(["cat", "sat", "mat", "dog"] * 200)   # 800 words, 800+ tokens
    hits = pipeline.search(long_query, k=5)
    assert len(hits) == 5 and all(abs(hit.score) < float("inf") for hit in hits)
    assert pipeline.rerank(long_query, ["the cat sat on the mat", "a fish does swim"])[0].text


@pytest.mark.shared
def test_a_long_query_and_a_long_passage_with_the_real_minilm(tmp_path):
    model = shared_path("models", "all-MiniLM-L6-v2")
    real = Pipeline(model=model, max_length=512, dtype="fp32", exits=False)
    query = "what is durable medical equipment " * 150                  # ~750 tokens
    passage = "Durable medical equipment (DME) is equipment that can withstand repeated use. " * 80
    hits = real.rerank(query, [passage, "Paris is the capital of France."])
    assert len(hits) == 2 and all(hit.score == hit.score for hit in hits)     # no NaN
    assert real.rerank(query[:40], [passage])[0].score == real.rerank(query[:40], [passage + " more"])[0].score


def test_invalid_utf8_and_mojibake_are_scored_as_text(tiny_world, tmp_path):
    passages = {"good": "the cat sat on the mat", "mojibake": "the cat sat at 37Â°C on the mat â€” yes",
                "invalid": "the cat sat on the mat \udcff\udcfe"}
    path = tmp_path / "bad.jsonl"
    write_collection(path, {k: v for k, v in passages.items() if k != "invalid"})
    with open(path, "ab") as out:   # a line with invalid UTF-8 bytes, as a damaged file has
        out.write(b'{"id": "invalid", "contents": "the cat sat on the mat \xff\xfe"}\n')
    from rankshrink.firststage import build_index

    build_index(path, tmp_path / "index", threads=1, progress=False)
    bad = Pipeline(index=tmp_path / "index", model=tiny_world.model, collection=path, max_length=64, dtype="fp32",
                   exits=False)
    model = bad.reranker.model
    with pytest.warns(UserWarning, match="invalid UTF-8"):
        hits = {hit.docid: hit for hit in bad.search("cat sat on the mat", k=10)}
    assert set(hits) == {"good", "mojibake", "invalid"}
    assert hits["invalid"].text == "the cat sat on the mat \ufffd\ufffd"
    assert hits["mojibake"].text == passages["mojibake"]
    expected = model.score("cat sat on the mat", [hits[d].text for d in hits], max_length=64).tolist()
    assert [hits[d].score for d in hits] == pytest.approx(expected, abs=1e-5)
    # the same text handed over in Python: bytes, or a str with lone surrogates (surrogateescape)
    direct = bad.rerank("cat \udce9", [("b", b"the cat sat on the mat \xff\xfe"), ("s", passages["invalid"])])
    assert {hit.text for hit in direct} == {"the cat sat on the mat \ufffd\ufffd"}
    assert direct[0].score == pytest.approx(direct[1].score, abs=1e-6)


def test_duplicate_docids_from_a_first_stage_run_cannot_happen_and_in_a_list_are_named(pipeline, tmp_path):
    run_file = tmp_path / "dup.trec"
    run_file.write_text("q0 Q0 d1 1 3.0 x\nq0 Q0 d2 2 2.0 x\nq0 Q0 d1 3 1.0 x\n")
    with pytest.raises(InputError, match=r"dup.trec:3: duplicate \(qid, docid\) = \(q0, d1\)"):
        read_run(run_file)
    with pytest.raises(InputError, match="duplicate docid"):
        pipeline.rerank("cat", [("d1", "x"), ("d2", "y"), ("d1", "z")])


@pytest.mark.parametrize("missing, named", [
    ("config.json", "missing config.json"),
    ("model.safetensors", "missing model.safetensors"),
    ("vocab.txt", "missing tokenizer files"),
    ("rankshrink.safetensors", "missing rankshrink.safetensors"),
])
def test_a_model_directory_with_a_file_missing_is_an_error_naming_it(tiny_world, tmp_path, missing, named):
    from rankshrink.model import load_model, save_model

    model_dir = tmp_path / "model"
    save_model(load_model(tiny_world.model), model_dir)      # a rankshrink directory: HF files + exits
    for name in [missing] + (["tokenizer.json"] if missing == "vocab.txt" else []):
        (model_dir / name).unlink(missing_ok=missing == "vocab.txt")
    with pytest.raises(InputError, match=named) as error:
        Pipeline(model=model_dir)
    assert str(model_dir) in str(error.value)


def test_an_hf_directory_without_a_tokenizer_is_an_error_not_a_warning(tiny_world, tmp_path):
    model_dir = tmp_path / "hf"
    shutil.copytree(tiny_world.model, model_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    with pytest.raises(InputError, match=r"hf: missing tokenizer files \(expected tokenizer.json or vocab.txt\)"):
        Pipeline(model=model_dir)


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("threads", [1, 2])
def test_ctrl_c_in_the_middle_of_run_leaves_no_partial_file(tiny_world, tmp_path, threads):
    topics = write_topics(tmp_path / "topics.tsv", random_topics(400))
    recipe = {"search": {"topics": str(topics), "index": str(tiny_world.index), "k": 40},
              "rerank": {"model": str(tiny_world.model), "collection": str(tiny_world.collection),
                         "candidates": 40, "max_length": 64, "threads": threads},
              "eval": {"qrels": str(tiny_world.qrels_file)},
              "output": str(tmp_path / "eval"), "runs": str(tmp_path / "runs")}
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-m", "rankshrink", "run", str(path)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_stage = tmp_path / "runs" / "bm25.trec"
        assert wait_for(first_stage.exists, 90), "the first stage never finished"
        time.sleep(1.0)                                           # now in the middle of reranking
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted; no partial output was written" in err
    assert "Traceback" not in err
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    assert not (tmp_path / "eval").exists()                      # nothing of the unfinished evaluation
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["bm25.trec"]
    from rankshrink.firststage import BM25

    def rounded(run: dict) -> dict:
        return {qid: {docid: round(score, 4) for docid, score in hits.items()} for qid, hits in run.items() if hits}

    searched = BM25(tiny_world.index).batch_search(read_topics(topics), k=40)
    assert rounded(read_run(first_stage)) == rounded(searched)          # what is there is complete


def test_ctrl_c_in_the_middle_of_rerank_leaves_no_partial_file(tiny_world, tmp_path):
    topics = random_topics(400)
    write_topics(tmp_path / "topics.tsv", topics)
    rng = random.Random(5)
    docids = list(tiny_world.passages)
    with open(tmp_path / "first.trec", "w") as out:
        for qid in topics:
            for rank, docid in enumerate(rng.sample(docids, 40), start=1):
                out.write(f"{qid} Q0 {docid} {rank} {100 - rank} first\n")
    output, stats = tmp_path / "out" / "reranked.trec", tmp_path / "out" / "stats.json"
    command = [sys.executable, "-m", "rankshrink", "rerank", "--run", str(tmp_path / "first.trec"),
               "--topics", str(tmp_path / "topics.tsv"), "--collection", str(tiny_world.collection),
               "--model", str(tiny_world.model), "--max-length", "64", "--candidates", "40",
               "--output", str(output), "--stats", str(stats)]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = bytearray()

    def read_stderr() -> None:
        while chunk := process.stderr.read1(256):
            err.extend(chunk)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: b"reranking:" in err, 90), "reranking never started"   # its progress bar
        time.sleep(1.0)
        assert process.poll() is None, bytes(err).decode()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        reader.join(10)
    finally:
        process.kill()
    text = bytes(err).decode(errors="replace")
    assert process.returncode == 130, text
    assert "Traceback" not in text
    left = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.parent.name == "out" or p.suffix == ".tmp"]
    assert left == []                               # neither the run, nor the stats, nor a temp file
