"""Benchmark the first stage on this machine: indexing time and queries/second (BM25), encoding throughput (dense).

Each measurement runs rankshrink and its peer in one process, interleaved, and reports medians over repeats,
so that other load on the machine hits both alike:

* ``bm25-index``: ``rankshrink.firststage.build_index`` (passages fed from Python into Anserini's
  SimpleIndexer) vs Anserini's ``IndexCollection`` over the same JSONL file (what ``python -m
  pyserini.index.lucene`` runs); both with positions, document vectors and raw text, 2 threads.
* ``bm25-search``: ``BM25.batch_search`` vs Pyserini's ``LuceneSearcher.batch_search``, 43 dl19 topics, k=1000.

    python eval/bench_firststage.py --part bm25 --repeats 3

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
    return ["## Dense encoding", "", "```", json.dumps(dense, indent=2), "```", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["bm25"], default="bm25")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE / "bench_firststage.json")
    args = parser.parse_args(argv)
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if args.part in ("bm25", "all"):
        results["bm25"] = bench_bm25(args.repeats, args.threads)
    from rankshrink.data import atomic_write

    with atomic_write(args.output) as out:
        json.dump(results, out, indent=2)
    with atomic_write(args.output.with_suffix(".md")) as out:
        out.write(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
