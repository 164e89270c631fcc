"""rankshrink bench --run RUN --topics T --collection C --model M [--qrels Q] [--queries N] [--repeats R]
                 [--budget-ms B] [--json]"""
from __future__ import annotations

import argparse
import json

from .rerank import add_reranker_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time rankshrink against sentence-transformers' CrossEncoder on the same weights",
        description="Rerank the same candidates with the peer (sentence-transformers CrossEncoder on the model's "
                    "backbone and head: fp32, batch 32, --peer-threads threads) and with rankshrink (at "
                    "--width/--depth, or within --budget-ms), in one process, interleaved query by query, "
                    "--repeats times. Prints median and p95 ms per query of each, the speedup, and both nDCG@10 "
                    "when --qrels is given.")
    parser.add_argument("--run", required=True, help="first-stage TREC run")
    parser.add_argument("--topics", required=True, help="topics")
    parser.add_argument("--collection", required=True, help="passages (JSONL, TSV or ir_datasets id)")
    parser.add_argument("--model", required=True, help="model directory (a trained cross-encoder)")
    parser.add_argument("--qrels", help="qrels, for nDCG@10")
    parser.add_argument("--queries", type=int, help="the first N queries of the run (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the queries (default: %(default)s)")
    parser.add_argument("--budget-ms", type=float, help="rankshrink within this budget per query (needs a profile)")
    parser.add_argument("--peer-threads", type=int, default=2, help="the peer's intra-op threads (default: %(default)s)")
    parser.add_argument("--peer-candidates", type=int,
                        help="the peer reranks each query's first N candidates, of which rankshrink reranks "
                             "--candidates (the rest follow in first-stage order): e.g. 100, to compare reranking "
                             "fewer of the same top 100 (default: --candidates)")
    parser.add_argument("--peer-max-length", type=int,
                        help="the peer's tokens per pair, where rankshrink runs at --max-length (default: "
                             "--max-length)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON: peer_ms_median, rankshrink_ms_median, rankshrink_ms_p95, speedup, "
                             "peer_ndcg@10, rankshrink_ndcg@10 (and more)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_reranker_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data import open_collection, read_qrels, read_run, read_topics
    from ..errors import InputError
    from ..rerank.bench import Arm, bench
    from ..rerank.budget import RerankConfig
    from .rerank import exits_option

    if args.budget_ms is not None and not args.budget_ms >= 0:
        raise InputError(f"--budget-ms must be >= 0, got {args.budget_ms}")
    exits = exits_option(args)
    peer_candidates = args.candidates if args.peer_candidates is None else args.peer_candidates
    peer_max_length = args.max_length if args.peer_max_length is None else args.peer_max_length
    if peer_candidates < args.candidates:
        raise InputError(f"--peer-candidates ({peer_candidates}) must be at least --candidates ({args.candidates}): "
                         f"rankshrink reranks its candidates from the peer's")
    if args.budget_ms is not None:
        arm = Arm(budget_ms=args.budget_ms)
    else:
        risk = None if exits is True or exits is False else exits
        config = RerankConfig(args.width, args.depth, args.max_length, args.candidates, risk, args.keep,
                              args.prune_depth)
        arm = Arm(config=config, model_exits=exits is True)
    result = bench(args.model, read_run(args.run), read_topics(args.topics), open_collection(args.collection),
                   read_qrels(args.qrels) if args.qrels else None, arms={"rankshrink": arm}, queries=args.queries,
                   repeats=args.repeats, candidates=peer_candidates, max_length=peer_max_length, dtype=args.dtype,
                   threads=args.threads, peer_threads=args.peer_threads, top_k=args.top_k, progress=not args.quiet)
    summary = result.summary()["rankshrink"]
    if args.json:
        print(json.dumps({**summary, **result.info}, indent=1))
        return 0
    info = result.info
    print(f"{info['queries']} queries x {info['repeats']} repeats, {info['candidates']} candidates, max length "
          f"{info['max_length']}; peer: CrossEncoder fp32, batch {info['peer_batch_size']}, {info['peer_threads']} "
          f"threads; rankshrink: {info['dtype']}, {info['threads']} threads; load average "
          f"{info['load_average_before']:.2f} -> {info['load_average_after']:.2f}")
    print(f"{'':12} {'median ms':>10} {'p95 ms':>10} {'nDCG@10':>8}")
    for name, median, p95, ndcg in (("peer", summary["peer_ms_median"], summary["peer_ms_p95"], summary["peer_ndcg@10"]),
                                    ("rankshrink", summary["rankshrink_ms_median"], summary["rankshrink_ms_p95"],
                                     summary["rankshrink_ndcg@10"])):
        print(f"{name:12} {median:10.1f} {p95:10.1f} {'' if ndcg is None else f'{ndcg:8.4f}'}")
    print(f"speedup {summary['speedup']:.2f}x (median of per-query ratios {summary['speedup_paired_median']:.2f}x)"
          + (f"; {summary['deadline_hits']} deadline hits" if args.budget_ms is not None else ""))
    for label, count in summary["configs"].items():
        print(f"  {count:5d} x {label}")
    return 0

