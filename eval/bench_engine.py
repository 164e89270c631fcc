"""What the engine's micro-batching, bf16 and thread count are worth: the full network (no exits) on TREC DL 2019
BM25 top-100, one query at a time, tokenization included.

    python eval/bench_engine.py --model models/minilm-untrained --queries 10 --repeats 2 --output eval/bench_engine.md

Variants, interleaved query by query in one process (medians over all calls):

* micro-batches of at most 512 / 1024 / 2048 / 4096 padded tokens (the engine's default, ``BATCH_TOKENS``, is one
  of them), length-sorted, ≤ 15% padding;
* one batch of all 100 pairs padded to the longest (what batching without length sorting approaches);
* fp32 at the default micro-batches (what bf16 buys);

each with 1 and with 2 intra-op threads. Speed does not depend on the weights, so an untrained model serves.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from rankshrink.data import atomic_write, open_collection, read_run, read_topics, trec_order  # noqa: E402
from rankshrink.model import load_model  # noqa: E402
from rankshrink.rerank import Reranker, RerankConfig  # noqa: E402
from rankshrink.rerank.engine import BATCH_TOKENS  # noqa: E402

DEFAULT = f"bf16, ≤{BATCH_TOKENS}-token micro-batches"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--split", type=Path, default=REPO.parent / "shared" / "trec-dl" / "dl19")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--output", type=Path, default=REPO / "eval" / "bench_engine.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    run = read_run(args.split / "runs" / "bm25.top100.trec")
    topics = read_topics(args.split / "topics.tsv")
    collection = open_collection(args.split / "passages.jsonl")
    qids = list(run)[:args.queries]
    inputs = {}
    for qid in qids:
        docids = [docid for docid, _ in trec_order(run[qid])][:100]
        inputs[qid] = (docids, collection.texts(docids))
    model = load_model(args.model)
    options = dict(max_length=args.max_length, exits=False)
    variants = {f"bf16, ≤{n}-token micro-batches": Reranker(model, dtype="bf16", batch_tokens=n, **options)
                for n in (512, 1024, 2048, 4096)}
    variants["bf16, one batch padded to the longest"] = Reranker(model, dtype="bf16", batch_tokens=10 ** 9,
                                                                 max_padding=1.0, **options)
    variants[f"fp32, ≤{BATCH_TOKENS}-token micro-batches"] = Reranker(model, dtype="fp32", batch_tokens=BATCH_TOKENS,
                                                                       **options)
    config = RerankConfig(1.0, 1.0, args.max_length, 100, None)
    times = {(name, threads): [] for name in variants for threads in args.threads}
    tokenize = []
    load_before = os.getloadavg()[0]
    for name, reranker in variants.items():   # warm-up, untimed
        reranker.rerank_config(topics[qids[0]], *inputs[qids[0]], config)
    for repeat in range(args.repeats):
        for index, qid in enumerate(qids):
            order = list(times)
            shift = (repeat * len(qids) + index) % len(order)
            for name, threads in order[shift:] + order[:shift]:
                torch.set_num_threads(threads)
                started = time.perf_counter()
                result = variants[name].rerank_config(topics[qid], *inputs[qid], config)
                times[(name, threads)].append((time.perf_counter() - started) * 1000)
                if name == DEFAULT:
                    tokenize.append(result.stats.tokenize_ms)
    load_after = os.getloadavg()[0]
    medians = {key: statistics.median(values) for key, values in times.items()}
    command = " ".join(["python eval/bench_engine.py", *sys.argv[1:]])
    lines = ["# Engine: micro-batching, bf16 and threads (full network, no exits)", "", "```", command, "```", "",
             f"Model `{args.model}` ({model.config.num_layers} layers, hidden {model.config.hidden_size}); "
             f"{len(qids)} dl19 queries × 100 BM25 candidates, max length {args.max_length}, × {args.repeats} repeats, "
             f"variants interleaved query by query. torch {torch.__version__}; load average {load_before:.2f} before, "
             f"{load_after:.2f} after, on 2 shared cores. Milliseconds per query (median), tokenization included; "
             f"tokenization alone: {statistics.median(tokenize):.1f} ms (median).", "",
             "| variant | " + " | ".join(f"{t} thread{'s' if t > 1 else ''} ms" for t in args.threads) + " | " +
             " | ".join(f"vs default, {t} thread{'s' if t > 1 else ''}" for t in args.threads) + " |",
             "| --- | " + " | ".join("---" for _ in args.threads * 2) + " |"]
    for name in variants:
        cells = [f"{medians[(name, t)]:.0f}" for t in args.threads]
        cells += [f"{medians[(name, t)] / medians[(DEFAULT, t)]:.2f}×" for t in args.threads]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with atomic_write(args.output) as out:
        out.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
