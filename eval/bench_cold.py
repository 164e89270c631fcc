"""What a query's first rerank costs over a repeat of it: oneDNN builds a kernel for every new matrix shape, and
a query's micro-batches bring shapes the process has not seen. TREC DL 2019 BM25 top-100, one query at a time.

    python eval/bench_cold.py --model models/trec-dl-offline --width 0.5 --max-length 64 --candidates 20
    python eval/bench_cold.py --model models/trec-dl-offline --queries 12

Two passes over the same queries in one fresh process, one configuration, no exits, no deadline: the first
pass meets each query's shapes for the first time, the second finds them built (when oneDNN's kernel cache,
1024 by default, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, holds them all). Prints each pass's median and p95 ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from rankshrink.data import open_collection, read_run, read_topics, trec_order  # noqa: E402
from rankshrink.model import load_model  # noqa: E402
from rankshrink.rerank import Reranker, RerankConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--split", type=Path, default=REPO.parent / "shared" / "trec-dl" / "dl19")
    parser.add_argument("--queries", type=int, default=43)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--depth", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    run = read_run(args.split / "runs" / "bm25.top100.trec")
    topics = read_topics(args.split / "topics.tsv")
    collection = open_collection(args.split / "passages.jsonl")
    reranker = Reranker(load_model(args.model), max_length=args.max_length, exits=False, dtype="bf16")
    config = RerankConfig(args.width, args.depth, args.max_length, args.candidates, None)
    inputs = []
    for qid in [qid for qid in run if qid in topics][:args.queries]:
        top = [docid for docid, _ in trec_order(run[qid])][:args.candidates]
        inputs.append((topics[qid], top, collection.texts(top)))
    print(f"{config.label()}, bf16, {args.threads} threads, {len(inputs)} queries of {args.split.name}; "
          f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'unset (1024)')}")
    for name in ("first pass (new shapes)", "second pass (same queries)"):
        times = sorted(reranker.rerank_config(query, top, texts, config, 10).stats.latency_ms
                       for query, top, texts in inputs)
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        print(f"{name}: median {statistics.median(times):.1f} ms, p95 {p95:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
