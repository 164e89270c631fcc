"""A fresh process's first budgeted queries, cold and after ``Reranker.warm_up``: TREC DL 2019 BM25 top-100.

    python eval/bench_warm_up.py --model models/trec-dl-offline --budget-ms 50 --trials 6
    python eval/bench_warm_up.py --model models/trec-dl-offline --budget-ms 200 --trials 4 --pipeline

Each trial starts two fresh processes, one cold and one that first warms up on the last dl19 query's
candidates (a query the timed ones are not), in alternating order; each then reranks the first ``--queries``
dl19 queries within the budget and reports each one's latency over the controller's prediction (which the
warm-up's load already scales) and its deadline cuts. Prints, per arm, the first query's ratio (median, max
over trials) and the cuts.

With ``--pipeline``, each process builds a ``Pipeline`` over the dl19 BM25 index (``--index``) and times its
first ``search`` calls, cold and after ``Pipeline.warm_up()`` (which also runs the first stage's first search and
reads the collection once); it prints the first search's latency and the configuration the reranker chose.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(args: argparse.Namespace) -> None:
    import torch

    from rankshrink.data import open_collection, read_run, read_topics
    from rankshrink.model import load_model
    from rankshrink.rerank import Reranker

    torch.set_num_threads(args.threads)
    if args.pipeline:
        return pipeline_child(args)
    run = read_run(args.split / "runs" / "bm25.top100.trec")
    topics = read_topics(args.split / "topics.tsv")
    collection = open_collection(args.split / "passages.jsonl")
    qids = [qid for qid in run if qid in topics]
    reranker = Reranker(load_model(args.model), dtype="bf16")
    texts = {qid: dict(zip(run[qid], collection.texts(list(run[qid])))) for qid in qids}
    seconds = reranker.warm_up(topics[qids[-1]], texts[qids[-1]]) if args.child == "warm" else 0.0
    queries = []
    for qid in qids[:-1][:args.queries]:          # never the warm-up's own query
        stats = reranker.rerank(topics[qid], run[qid], texts[qid], budget_ms=args.budget_ms).stats
        queries.append({"ratio": stats.latency_ms / stats.predicted_ms, "cut": stats.deadline_hit})
    print(json.dumps({"warm_up_s": seconds, "queries": queries}))


def pipeline_child(args: argparse.Namespace) -> None:
    from rankshrink.data import read_topics
    from rankshrink.pipeline import Pipeline

    topics = read_topics(args.split / "topics.tsv")
    pipeline = Pipeline(index=str(args.index), model=str(args.model), collection=args.split / "passages.jsonl",
                        candidates=100, threads=args.threads)
    seconds = pipeline.warm_up() if args.child == "warm" else 0.0
    queries = []
    for query in list(topics.values())[:args.queries]:
        stats = pipeline.search_with_stats(query, k=10, budget_ms=args.budget_ms)[1]
        config = stats.config
        queries.append({"ms": stats.latency_ms, "first_stage_ms": stats.first_stage_ms, "cut": stats.deadline_hit,
                        "config": f"w{config['width']:g} d{config['depth']:g} K{config['candidates']}"
                                  + (f" keep {config['keep']}" if config.get("keep") else "")})
    print(json.dumps({"warm_up_s": seconds, "queries": queries}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a profiled model directory")
    parser.add_argument("--split", type=Path, default=REPO.parent / "shared" / "trec-dl" / "dl19")
    parser.add_argument("--budget-ms", type=float, default=50.0)
    parser.add_argument("--queries", type=int, default=5, help="queries timed in each process")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipeline", action="store_true", help="time Pipeline.search over --index instead")
    parser.add_argument("--index", type=Path, default=REPO / "indexes" / "dl19-passages")
    parser.add_argument("--child", choices=("cold", "warm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.queries < 2 or args.trials < 1:
        parser.error("--queries must be at least 2 (the first, and later ones) and --trials at least 1")
    if args.child:
        child(args)
        return 0
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    for trial in range(args.trials):
        for arm in (("cold", "warm") if trial % 2 == 0 else ("warm", "cold")):
            command = [sys.executable, __file__, "--child", arm, "--model", str(args.model), "--split",
                       str(args.split), "--budget-ms", str(args.budget_ms), "--queries", str(args.queries),
                       "--threads", str(args.threads), "--index", str(args.index)] + ["--pipeline"] * args.pipeline
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[arm].append(json.loads(output.strip().splitlines()[-1]))
    if args.pipeline:
        print(f"{args.trials} trials, fresh processes, Pipeline.search at {args.budget_ms:g} ms, first {args.queries} "
              f"topics of {args.split.name}:")
        for arm, trials in results.items():
            first = [trial["queries"][0] for trial in trials]
            later = [query["ms"] for trial in trials for query in trial["queries"][1:]]
            configs = sorted({query["config"] for query in first})
            warm_up = f", warm-up {statistics.median(t['warm_up_s'] for t in trials):.1f} s" if arm == "warm" else ""
            print(f"{arm}: first search median {statistics.median(q['ms'] for q in first):.1f} ms (first stage "
                  f"{statistics.median(q['first_stage_ms'] for q in first):.1f}), reranked with {'; '.join(configs)}; "
                  f"later searches median {statistics.median(later):.1f} ms{warm_up}")
        return 0
    print(f"{args.trials} trials, fresh processes, budget {args.budget_ms:g} ms, first {args.queries} queries of "
          f"{args.split.name}; latency / prediction:")
    for arm, trials in results.items():
        first = [trial["queries"][0]["ratio"] for trial in trials]
        rest = [query["ratio"] for trial in trials for query in trial["queries"][1:]]
        cuts = sum(query["cut"] for trial in trials for query in trial["queries"])
        timed = sum(len(trial["queries"]) for trial in trials)
        warm_up = f", warm-up {statistics.median(t['warm_up_s'] for t in trials):.1f} s" if arm == "warm" else ""
        print(f"{arm}: first query median {statistics.median(first):.2f}, max {max(first):.2f} "
              f"(each: {', '.join(f'{r:.2f}' for r in first)}); later queries median {statistics.median(rest):.2f}, "
              f"max {max(rest):.2f}; deadline cuts {cuts} of {timed}{warm_up}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
