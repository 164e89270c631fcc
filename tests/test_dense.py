"""Dense first stage: search equals brute-force numpy inner products, builds resume after an interruption,
approximate faiss kinds keep their recall, and bad input is a clear error."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from conftest import shared_path
from rankshrink.cli import main
from rankshrink.data import read_run, read_topics
from rankshrink.errors import InputError
from rankshrink.firststage import BM25, DenseSearcher, build_dense_index
from rankshrink.firststage.dense import _faiss_index
from test_dense_fixtures import (SMALL_POOL, first_passages, small_dense_index, small_pool,  # noqa: F401
                                 tiny_encoder, write_jsonl)

pytestmark = pytest.mark.shared


def brute_force_top(encoder_dir, passages: list[dict], queries: list[str], k: int):
    """Top-k (docid, score) lists by a numpy inner product of embeddings sentence-transformers computes itself."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(encoder_dir), device="cpu")
    docs = model.encode_document([p["contents"] for p in passages], normalize_embeddings=True, batch_size=64)
    questions = model.encode_query(queries, normalize_embeddings=True)
    scores = questions @ docs.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[(passages[j]["id"], float(scores[i, j])) for j in row] for i, row in enumerate(order)]


def assert_same_ranking(got: dict[str, float], expected: list[tuple[str, float]]) -> None:
    assert list(got) == [docid for docid, _ in expected]
    assert list(got.values()) == pytest.approx([score for _, score in expected], abs=1e-5)


def test_dense_top10_equals_brute_force_numpy_inner_product(small_dense_index, tiny_encoder, dl19):
    topics = read_topics(dl19 / "topics.tsv")
    run = DenseSearcher(small_dense_index, device="cpu").batch_search(topics, k=10)
    expected = brute_force_top(tiny_encoder, first_passages(SMALL_POOL), list(topics.values()), 10)
    for qid, top in zip(topics, expected):
        assert_same_ranking(run[qid], top)


def test_real_minilm_top10_equals_brute_force_and_finds_a_passage_by_its_own_text(tmp_path):
    encoder = shared_path("models", "all-MiniLM-L6-v2")
    passages = first_passages(30)
    collection = write_jsonl(tmp_path / "c.jsonl", passages)
    build_dense_index(collection, tmp_path / "index", encoder, dtype="fp32", device="cpu", progress=False)
    dense = DenseSearcher(tmp_path / "index", device="cpu")
    queries = ["what is durable medical equipment", passages[7]["contents"]]
    got = dense.batch_search(dict(enumerate(queries)), k=10)
    for (qid, top) in zip(got, brute_force_top(encoder, passages, queries, 10)):
        assert_same_ranking(got[qid], top)
    assert next(iter(got["1"])) == passages[7]["id"]
    info = json.loads((tmp_path / "index" / "dense.json").read_text())
    assert info["dimension"] == 384 and info["similarity"] == "cosine" and info["documents"] == 30


def test_search_and_batch_search_agree_and_empty_query_has_no_hits(small_dense_index):
    dense = DenseSearcher(small_dense_index, device="cpu")
    run = dense.batch_search({"a": "durable medical equipment", "b": "", "c": "  "}, k=5)
    assert run["b"] == {} and run["c"] == {} and len(run["a"]) == 5
    assert dense.search("durable medical equipment", k=5) == run["a"]
    assert len(dense.search("anything", k=10_000)) == SMALL_POOL  # k beyond the collection: all of it
    with pytest.raises(InputError, match="k must be a positive integer"):
        dense.search("x", k=0)


def test_doc_reads_the_collection_the_index_was_built_from(small_dense_index, dl19):
    dense = DenseSearcher(small_dense_index, device="cpu")
    first = first_passages(2)[1]
    assert dense.doc(first["id"]) == first["contents"]


def test_bf16_build_records_its_dtype_and_stays_close_to_fp32(tmp_path, tiny_encoder, small_pool,
                                                             small_dense_index):
    build_dense_index(small_pool, tmp_path / "bf16", tiny_encoder, dtype="bf16", device="cpu", progress=False)
    fp32, bf16 = DenseSearcher(small_dense_index, device="cpu"), DenseSearcher(tmp_path / "bf16", device="cpu")
    assert bf16.info["dtype"] == "bf16" and fp32.info["dtype"] == "fp32"
    a, b = fp32.index.reconstruct_n(0, SMALL_POOL), bf16.index.reconstruct_n(0, SMALL_POOL)
    assert np.min(np.sum(a * b, axis=1)) > 0.98  # cosine of each passage's two embeddings


def test_passages_with_empty_text_are_not_encoded_as_bm25_does_not_index_them(tmp_path, tiny_encoder):
    from test_dense_fixtures import write_jsonl

    pool = write_jsonl(tmp_path / "pool.jsonl", [{"id": "a", "contents": "a cat"}, {"id": "e", "contents": "  "},
                                                 {"id": "b", "contents": "a dog"}])
    with pytest.warns(UserWarning, match=r"1 passage\(s\) with empty text were not encoded"):
        build_dense_index(pool, tmp_path / "index", tiny_encoder, dtype="fp32", device="cpu", progress=False)
    assert DenseSearcher(tmp_path / "index", device="cpu").docids == ["a", "b"]


def test_interrupted_build_resumes_from_its_shards_and_equals_an_uninterrupted_one(tmp_path, tiny_encoder,
                                                                                  small_pool, small_dense_index):
    from rankshrink.data import Collection

    class InterruptedCollection(Collection):
        def __iter__(self):
            for number, passage in enumerate(super().__iter__()):
                if number == 150:
                    raise KeyboardInterrupt
                yield passage

    index = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match=r"2 encoded shard\(s\) of 64"):
        build_dense_index(InterruptedCollection(small_pool), index, tiny_encoder, dtype="fp32", device="cpu",
                          shard_size=64, progress=False)
    assert not index.exists()
    assert sorted(p.name for p in (tmp_path / ".index.building-dense").iterdir()) == [
        "build.json", "lock", "shard-00000.ids", "shard-00000.npy", "shard-00001.ids", "shard-00001.npy"]
    info = build_dense_index(small_pool, index, tiny_encoder, dtype="fp32", device="cpu", shard_size=64,
                             progress=False)
    assert info.resumed_passages == 128 and info.documents == SMALL_POOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    resumed, whole = DenseSearcher(index, device="cpu"), DenseSearcher(small_dense_index, device="cpu")
    assert resumed.docids == whole.docids
    np.testing.assert_allclose(resumed.index.reconstruct_n(0, SMALL_POOL), whole.index.reconstruct_n(0, SMALL_POOL),
                               atol=1e-5)


def test_unfinished_build_with_other_settings_is_discarded(tmp_path, tiny_encoder, small_pool):
    from rankshrink.data import Collection

    class InterruptedCollection(Collection):
        def __iter__(self):
            for number, passage in enumerate(super().__iter__()):
                if number == 100:
                    raise KeyboardInterrupt
                yield passage

    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_dense_index(InterruptedCollection(small_pool), tmp_path / "index", tiny_encoder, dtype="fp32",
                          device="cpu", shard_size=64, progress=False)
    with pytest.warns(UserWarning, match="other settings .* is discarded"):
        info = build_dense_index(small_pool, tmp_path / "index", tiny_encoder, dtype="bf16", device="cpu",
                                 shard_size=64, progress=False)
    assert info.resumed_passages == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_a_second_build_of_the_same_index_at_once_is_refused(tmp_path, tiny_encoder, small_pool):
    import fcntl

    building = tmp_path / ".index.building-dense"
    building.mkdir()
    with open(building / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another build of this index is running"):
            build_dense_index(small_pool, tmp_path / "index", tiny_encoder, dtype="fp32", device="cpu",
                              progress=False)
    assert not (tmp_path / "index").exists()


def test_hnsw_and_ivfpq_keep_recall_against_flat():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 64))
    vectors = (centres[rng.integers(0, 50, 2000)] + 0.5 * rng.normal(size=(2000, 64))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:100] + 0.1 * rng.normal(size=(100, 64)).astype(np.float32)
    def shards(vectors=vectors):  # as the build hands them over: in pieces
        return (vectors[start:start + 1024] for start in range(0, len(vectors), 1024))

    flat, _, _ = _faiss_index(shards, len(vectors), "flat", 32)
    _, exact = flat.search(queries, 10)
    np.testing.assert_array_equal(flat.reconstruct_n(0, len(vectors)), vectors)
    hnsw, factory, defaults = _faiss_index(shards, len(vectors), "hnsw", 32)
    hnsw.hnsw.efSearch = defaults["ef_search"]
    ivfpq, ivf_factory, ivf_defaults = _faiss_index(shards, len(vectors), "ivfpq", 32)
    ivfpq.nprobe = ivf_defaults["nprobe"]
    recall = lambda found: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])  # noqa: E731
    assert factory == "HNSW32,Flat" and recall(hnsw.search(queries, 10)[1]) > 0.97
    assert ivf_factory.startswith("IVF") and ",PQ8x4" in ivf_factory  # 64 dims / 8; 4 bits below 9,984 vectors
    # compressed codes blur close neighbours, but a first stage keeps the true top 10 within its top 100
    found = ivfpq.search(queries, 100)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]) > 0.9
    with pytest.raises(InputError, match="IVF-PQ needs at least 1,000 passages"):
        _faiss_index(lambda: [vectors[:999]], 999, "ivfpq", 32)


def test_cli_builds_hnsw_and_searches_dense(tmp_path, tiny_encoder, small_pool, small_dense_index, dl19, capsys):
    index = tmp_path / "hnsw"
    assert main(["index", "--dense", "--encoder", str(tiny_encoder), "--collection", str(small_pool),
                 "--index", str(index), "--faiss", "hnsw", "--dtype", "fp32", "--device", "cpu", "--quiet"]) == 0
    assert "HNSW32,Flat, 32 dims, fp32" in capsys.readouterr().out
    output = tmp_path / "dense.trec"
    assert main(["search", "--dense", "--index", str(index), "--topics", str(dl19 / "topics.tsv"), "--k", "10",
                 "--output", str(output), "--device", "cpu"]) == 0
    run = read_run(output)
    exact = DenseSearcher(small_dense_index, device="cpu").batch_search(read_topics(dl19 / "topics.tsv"), k=10)
    assert len(run) == 43 and all(len(docs) == 10 for docs in run.values())
    overlap = np.mean([len(set(run[qid]) & set(exact[qid])) / 10 for qid in exact])
    assert overlap > 0.95
    assert output.read_text().split("\n", 1)[0].endswith(" dense")


def test_bad_dense_input_is_a_one_line_error(tmp_path, tiny_encoder, small_pool, small_dense_index, dl19_index,
                                             dl19, capsys):
    topics = str(dl19 / "topics.tsv")
    cases = [
        (["index", "--dense", "--collection", str(small_pool), "--index", str(tmp_path / "x")],
         "--dense needs --encoder"),
        (["index", "--encoder", str(tiny_encoder), "--collection", str(small_pool), "--index", str(tmp_path / "x")],
         "--encoder applies to dense indexes; add --dense"),
        (["index", "--dense", "--encoder", str(tmp_path / "no-model"), "--collection", str(small_pool),
          "--index", str(tmp_path / "x")], "no-model: no such encoder directory"),
        (["search", "--dense", "--index", str(dl19_index), "--topics", topics, "--output", str(tmp_path / "r")],
         "a Lucene index (search it without --dense)"),
        (["search", "--index", str(small_dense_index), "--topics", topics, "--output", str(tmp_path / "r")],
         "a dense index, not a Lucene one"),
        (["search", "--dense", "--index", str(tmp_path / "nothing"), "--topics", topics, "--output",
          str(tmp_path / "r")], "no such dense index directory"),
        (["search", "--hybrid", "--index", str(dl19_index), "--topics", topics, "--output", str(tmp_path / "r")],
         "--hybrid needs --dense-index"),
        (["search", "--index", str(dl19_index), "--dense-index", str(small_dense_index), "--topics", topics,
          "--output", str(tmp_path / "r")], "--dense-index is for --hybrid"),
        (["search", "--dense", "--msmarco", "--index", str(small_dense_index), "--topics", topics, "--output",
          str(tmp_path / "r")], "BM25 parameters; --dense has none"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "r").exists()
    with pytest.raises(InputError, match="a dense index"):
        BM25(small_dense_index)
