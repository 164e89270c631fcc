"""Benchmark the first stage on this machine: indexing time and queries/second (BM25), encoding throughput (dense).

Each measurement runs rankshrink and its peer in one process, interleaved, and reports medians over repeats,
so that other load on the machine hits both alike:

* ``bm25-index``: ``rankshrink.firststage.build_index`` (passages fed from Python into Anserini's
  SimpleIndexer) vs Anserini's ``IndexCollection`` over the same JSONL file (what ``python -m
  pyserini.index.lucene`` runs); both with positions, document vectors and raw text, 2 threads.
* ``bm25-search``: ``BM25.batch_search`` vs Pyserini's ``LuceneSearcher.batch_search``, 43 dl19 topics, k=1000.
* ``dense``: passage encoding throughput of all-MiniLM-L6-v2 in fp32 vs bf16 (the same sample, interleaved),
  how far bf16 embeddings move from fp32 ones, and, given both dl19 indexes, what bf16 does to retrieval.

    python eval/bench_firststage.py --part bm25 --repeats 3
    python eval/bench_firststage.py --part dense --repeats 3 \
        --fp32-index indexes/dl19-minilm-fp32 --bf16-index indexes/dl19-minilm

Results are merged into eval/bench_firststage.json and rendered to eval/bench_firststage.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("RANKSHRINK_SHARED", REPO.parent / "shared"))


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def bench_bm25(repeats: int, threads: int) -> dict:
    from rankshrink.data import read_topics
    from rankshrink.firststage import BM25, build_index
    from rankshrink.firststage.jvm import pyserini, start_jvm

    passages = SHARED / "trec-dl" / "dl19" / "passages.jsonl"
    topics = read_topics(SHARED / "trec-dl" / "dl19" / "topics.tsv")
    load_before = os.getloadavg()[0]
    runtime = start_jvm()
    pyserini()
    from jnius import autoclass

    index_collection = autoclass("io.anserini.index.IndexCollection")
    work = Path(tempfile.mkdtemp(prefix="bench-firststage-"))
    (work / "input").mkdir()
    os.symlink(passages, work / "input" / "passages.jsonl")

    def ours(target: Path) -> None:
        build_index(passages, target, threads=threads, progress=False)

    def anserini(target: Path) -> None:
        index_collection.main(["-collection", "JsonCollection", "-generator", "DefaultLuceneDocumentGenerator",
                               "-threads", str(threads), "-input", str(work / "input"), "-index", str(target),
                               "-storePositions", "-storeDocvectors", "-storeRaw", "-quiet"])

    index_seconds: dict[str, list[float]] = {"rankshrink": [], "anserini": []}
    try:
        for repeat in range(repeats + 1):  # the first round warms the JIT and the page cache; not counted
            for name, build in (("rankshrink", ours), ("anserini", anserini)):
                target = work / f"{name}-{repeat}"
                seconds = timed(lambda: build(target))
                if repeat:
                    index_seconds[name].append(seconds)
                if repeat < repeats:
                    shutil.rmtree(target)
        ours_index = work / f"rankshrink-{repeats}"
        bm25 = BM25(ours_index)
        lucene = pyserini().LuceneSearcher(str(ours_index))
        lucene.set_bm25(0.9, 0.4)
        qids, queries = list(topics), list(topics.values())
        search_seconds: dict[str, list[float]] = {"rankshrink": [], "pyserini": []}
        for repeat in range(repeats * 2 + 1):
            for name, search in (("rankshrink", lambda: bm25.batch_search(topics, k=1000, threads=threads)),
                                 ("pyserini", lambda: lucene.batch_search(queries, qids, 1000, threads))):
                seconds = timed(search)
                if repeat:
                    search_seconds[name].append(seconds)
        short_k = [timed(lambda: bm25.batch_search(topics, k=10, threads=threads)) for _ in range(5)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    count = 10852
    return {
        "load_average_before": round(load_before, 2),
        "search_k10_median_s": statistics.median(short_k),
        "java": f"{runtime.source} {'.'.join(map(str, runtime.version))}",
        "threads": threads,
        "repeats": repeats,
        "index": {name: {"median_s": statistics.median(values), "passages_per_s": count / statistics.median(values),
                         "all_s": [round(v, 3) for v in values]} for name, values in index_seconds.items()},
        "search": {name: {"median_s": statistics.median(values), "queries_per_s": len(topics) / statistics.median(values),
                          "all_s": [round(v, 3) for v in values]} for name, values in search_seconds.items()},
    }


def bench_dense(repeats: int, sample_size: int, batch_size: int, fp32_index: Path | None,
                bf16_index: Path | None) -> dict:
    import torch

    from rankshrink.data import open_collection, read_qrels, read_topics
    from rankshrink.firststage.dense import encode, load_encoder

    encoder = SHARED / "models" / "all-MiniLM-L6-v2"
    passages = list(open_collection(SHARED / "trec-dl" / "dl19" / "passages.jsonl"))
    step = max(1, len(passages) // sample_size)
    sample = [passage.text for passage in passages[::step][:sample_size]]  # spread over the file
    load_before = os.getloadavg()[0]
    models = {"fp32": load_encoder(encoder, "cpu", "fp32"), "bf16": load_encoder(encoder, "cpu", "bf16")}
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    vectors = {}
    for repeat in range(repeats + 1):  # round 0 warms up (oneDNN kernels), not counted
        for name, model in models.items():
            started = time.perf_counter()
            vectors[name] = encode(model, sample, kind="document", batch_size=batch_size, normalize=True)
            if repeat:
                seconds[name].append(time.perf_counter() - started)
    cosines = np.sum(vectors["fp32"] * vectors["bf16"], axis=1) / (
        np.linalg.norm(vectors["fp32"], axis=1) * np.linalg.norm(vectors["bf16"], axis=1))
    result = {
        "encoder": "all-MiniLM-L6-v2", "sample": len(sample), "batch_size": batch_size, "repeats": repeats,
        "torch_threads": torch.get_num_threads(), "load_average_before": round(load_before, 2),
        "passages_per_s": {name: len(sample) / statistics.median(values) for name, values in seconds.items()},
        "all_s": {name: [round(v, 2) for v in values] for name, values in seconds.items()},
        "cosine_fp32_bf16": {"min": float(cosines.min()), "mean": float(cosines.mean())},
    }
    if fp32_index and bf16_index:
        result["retrieval"] = compare_dense_indexes(fp32_index, bf16_index, read_topics(
            SHARED / "trec-dl" / "dl19" / "topics.tsv"), read_qrels(SHARED / "trec-dl" / "dl19" / "qrels.txt"))
    return result


def compare_dense_indexes(fp32_index: Path, bf16_index: Path, topics: dict, qrels: dict) -> dict:
    """nDCG@10 / R@100 of dense search over a pool encoded in fp32 and in bf16 (queries in fp32 for both),
    and how many of each query's top 10 the two share."""
    from rankshrink.firststage import DenseSearcher
    from rankshrink.metrics import evaluate

    runs = {name: DenseSearcher(path, device="cpu").batch_search(topics, k=1000)
            for name, path in (("fp32", fp32_index), ("bf16", bf16_index))}
    scores = evaluate(qrels, runs, ["ndcg@10", "recall@100"]).scores
    overlap = statistics.mean(len(set(list(runs["fp32"][q])[:10]) & set(list(runs["bf16"][q])[:10])) / 10
                              for q in topics)
    return {"scores": scores, "top10_overlap": overlap}


def render(results: dict) -> str:
    lines = ["# First-stage benchmarks on this machine", "",
             f"Machine: {results.get('machine', '?')}. Produced by `eval/bench_firststage.py` (the command under each "
             "table); medians over interleaved repeats in one process, so that other load hits both sides alike.", ""]
    bm25 = results.get("bm25")
    if bm25:
        lines += [
            "## BM25 (Lucene through Pyserini)", "",
            f"dl19 candidate pool (10,852 passages), 43 dl19 topics, k=1000, {bm25['threads']} threads, "
            f"Java {bm25['java']}; {bm25['repeats']} repeats after a warm-up (search: twice as many); "
            f"1-minute load average {bm25['load_average_before']} on 2 cores when it started (others' jobs).", "",
            "```", f"python eval/bench_firststage.py --part bm25 --repeats {bm25['repeats']}", "```", "",
            "| what | rankshrink | peer | peer is |", "| --- | --- | --- | --- |",
            f"| indexing, seconds | {bm25['index']['rankshrink']['median_s']:.2f} "
            f"({bm25['index']['rankshrink']['passages_per_s']:,.0f} passages/s) "
            f"| {bm25['index']['anserini']['median_s']:.2f} ({bm25['index']['anserini']['passages_per_s']:,.0f} "
            "passages/s) | Anserini `IndexCollection` on the JSONL file |",
            f"| search, queries/s at k=1000 | {bm25['search']['rankshrink']['queries_per_s']:.1f} "
            f"| {bm25['search']['pyserini']['queries_per_s']:.1f} | Pyserini `LuceneSearcher.batch_search` |", "",
            "Indexing feeds passages from Python (`rankshrink.data.open_collection`, so JSONL, TSV and ir_datasets "
            "ids all work, with the data layer's error messages) into Anserini's `SimpleIndexer`. Search time is "
            f"dominated by Anserini loading the stored document of every one of the 1000 hits, which Pyserini's "
            f"batch search does too: the same 43 queries take {bm25['search_k10_median_s']:.3f} s at k=10 against "
            f"{bm25['search']['rankshrink']['median_s']:.2f} s at k=1000.", ""]
    dense = results.get("dense")
    if dense:
        lines += render_dense(dense)
    return "\n".join(lines)


def render_dense(dense: dict) -> list[str]:
    rate = dense["passages_per_s"]
    lines = [
        "## Dense encoding: fp32 vs bf16", "",
        f"{dense['encoder']} encoding {dense['sample']} dl19 passages (every n-th of the pool), batch {dense['batch_size']}, "
        f"{dense['torch_threads']} torch threads on the CPU; {dense['repeats']} interleaved repeats after a warm-up; "
        f"1-minute load average {dense['load_average_before']} when it started.", "",
        "```", f"python eval/bench_firststage.py --part dense --repeats {dense['repeats']} "
        "--fp32-index indexes/dl19-minilm-fp32 --bf16-index indexes/dl19-minilm", "```", "",
        "| precision | passages/s | seconds per repeat |", "| --- | --- | --- |",
        *[f"| {name} | {rate[name]:.1f} | {', '.join(map(str, dense['all_s'][name]))} |" for name in ("fp32", "bf16")],
        "", f"bf16 encodes {rate['bf16'] / rate['fp32']:.2f}x as many passages per second as fp32. Each passage's bf16 "
        f"embedding has cosine {dense['cosine_fp32_bf16']['mean']:.4f} (mean; min {dense['cosine_fp32_bf16']['min']:.4f}) "
        "with its fp32 one.", ""]
    retrieval = dense.get("retrieval")
    if retrieval:
        scores = retrieval["scores"]
        lines += [
            "Dense retrieval over the whole pool (10,852 passages), 43 dl19 queries encoded in fp32; the fp32 pool "
            "index is built by `rankshrink index --recipe indexes/dl19-minilm.yaml --dtype fp32 --index "
            "indexes/dl19-minilm-fp32`:", "",
            "| pool encoded in | nDCG@10 | R@100 |", "| --- | --- | --- |",
            *[f"| {name} | {scores[name]['ndcg@10']:.4f} | {scores[name]['recall@100']:.4f} |" for name in ("fp32", "bf16")],
            "", f"The two runs share {retrieval['top10_overlap']:.1%} of each query's top 10 on average. So "
            "`rankshrink index --dense` encodes in bf16 where the CPU has bf16 arithmetic (`--dtype auto`), "
            "and queries are encoded in fp32.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["bm25", "dense"], default="bm25")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE / "bench_firststage.json")
    parser.add_argument("--sample", type=int, default=512, help="passages encoded per repeat (dense)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size (dense)")
    parser.add_argument("--fp32-index", type=Path, help="dl19 dense index encoded in fp32 (dense, optional)")
    parser.add_argument("--bf16-index", type=Path, help="dl19 dense index encoded in bf16 (dense, optional)")
    args = parser.parse_args(argv)
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if args.part in ("bm25", "all"):
        results["bm25"] = bench_bm25(args.repeats, args.threads)
    if args.part == "dense":
        results["dense"] = bench_dense(args.repeats, args.sample, args.batch_size, args.fp32_index, args.bf16_index)
    from rankshrink.data import atomic_write

    with atomic_write(args.output) as out:
        json.dump(results, out, indent=2)
    with atomic_write(args.output.with_suffix(".md")) as out:
        out.write(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
