"""rankshrink rerank --run RUN --topics T --collection C --model MODEL_DIR --output RUN
                  [--width W] [--depth D] [--max-length L] [--candidates K] [--budget-ms B] [--stats STATS.json]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from ..errors import InputError


def add_reranker_options(parser: argparse.ArgumentParser) -> None:
    """The options that fix a Reranker (shared with rankshrink bench)."""
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier in (0, 1] (default: %(default)s)")
    parser.add_argument("--depth", type=float, default=1.0, help="depth multiplier in (0, 1] (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=256,
                        help="tokens per (query, passage) pair; passages are truncated (default: %(default)s)")
    parser.add_argument("--candidates", type=int, default=100,
                        help="rerank each query's first K candidates; the rest follow in first-stage order "
                             "(default: %(default)s)")
    parser.add_argument("--keep", type=int,
                        help="a cascade: the model's smallest sub-network scores the candidates first and only its "
                             "best KEEP run at --width/--depth; the others follow in its order (default: all)")
    parser.add_argument("--prune-depth", type=float,
                        help="with --keep: the first pass's depth (default: the model's shallowest)")
    exits = parser.add_mutually_exclusive_group()
    exits.add_argument("--no-exits", action="store_true",
                       help="run every passage through every layer (default: the model's calibrated early exits)")
    exits.add_argument("--exit-risk", type=float,
                       help="early exit at this calibrated risk that a top-k passage leaves (default: the "
                            "calibration's own)")
    parser.add_argument("--top-k", type=int, default=10, help="the cut early exits protect (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 where the CPU has bf16 arithmetic (default: %(default)s)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: those the model was profiled with, else torch's; "
                             "bench: else --peer-threads)")


def exits_option(args: argparse.Namespace):
    if args.no_exits:
        return False
    return True if args.exit_risk is None else args.exit_risk


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rerank", help="rerank a first-stage TREC run with the dynamic cross-encoder (optionally within a budget)",
        description="Rerank each query's first --candidates passages of RUN and write a TREC run with every "
                    "candidate (the rest keep first-stage order below the reranked ones). Without --budget-ms the "
                    "model runs at --width/--depth/--max-length; with it, the configuration comes from the model's "
                    "profile (rankshrink profile) and a deadline holds each query to the budget: passages the "
                    "deadline leaves unscored rank below the scored ones, in first-stage order.")
    parser.add_argument("--run", required=True, help="first-stage TREC run")
    parser.add_argument("--topics", required=True, help="topics: TSV qid<TAB>query, TREC topic file, or ir_datasets id")
    parser.add_argument("--collection", required=True, help="passages: JSONL, TSV, or ir_datasets id")
    parser.add_argument("--model", required=True, help="model directory (rankshrink or Hugging Face) or hub id")
    parser.add_argument("--output", required=True, help="the TREC run to write (atomically)")
    parser.add_argument("--budget-ms", type=float, help="latency budget per query in milliseconds")
    parser.add_argument("--stats", help="write per-query latency (ms), configuration and layers used to this JSON")
    parser.add_argument("--tag", default="rankshrink", help="run tag, the last column (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_reranker_options(parser)
    parser.set_defaults(handler=run)


def open_reranker(args: argparse.Namespace):
    from ..model import load_model
    from ..rerank import Reranker

    model = load_model(args.model)
    threads = args.threads if args.threads is not None else (model.metadata.get("profile") or {}).get("threads")
    return Reranker(model, width=args.width, depth=args.depth, max_length=args.max_length,
                    candidates=args.candidates, exits=exits_option(args), dtype=args.dtype, threads=threads,
                    keep=args.keep, prune_depth=args.prune_depth)


def run(args: argparse.Namespace) -> int:
    from ..data import atomic_write, check_output_file, check_tag, open_collection, read_run, read_topics, write_run

    if args.budget_ms is not None and not args.budget_ms >= 0:
        raise InputError(f"--budget-ms must be >= 0, got {args.budget_ms}")
    check_tag(args.tag)     # before the work, not after it
    check_output_file(args.output)
    check_output_file(args.stats)
    first_stage = read_run(args.run)
    topics = read_topics(args.topics)
    collection = open_collection(args.collection)
    _check_run_covered(first_stage, topics, collection, args)
    reranker = open_reranker(args)
    reranked, stats = reranker.rerank_run(first_stage, topics, collection, budget_ms=args.budget_ms,
                                          progress=not args.quiet, top_k=args.top_k)
    write_run(reranked, args.output, tag=args.tag)
    latencies = [s.latency_ms for s in stats.values()]
    layers = [n for s in stats.values() for n in s.layers_used if n]   # as QueryStats.mean_layers: those seen
    summary = {
        "queries": len(stats), "latency_ms_median": statistics.median(latencies),
        "latency_ms_p95": sorted(latencies)[max(0, int(round(0.95 * len(latencies))) - 1)],
        "mean_layers": statistics.fmean(layers) if layers else 0.0,
        "deadline_hits": sum(s.deadline_hit for s in stats.values()), "budget_ms": args.budget_ms,
        "reranker": repr(reranker),
    }
    if args.stats:
        with atomic_write(args.stats) as out:
            json.dump({"summary": summary, "queries": {qid: s.to_dict() for qid, s in stats.items()}}, out, indent=1)
            out.write("\n")
    budget = f", budget {args.budget_ms:g} ms ({summary['deadline_hits']} deadline hits)" \
        if args.budget_ms is not None else ""
    print(f"reranked {len(stats)} queries: median {summary['latency_ms_median']:.1f} ms, "
          f"p95 {summary['latency_ms_p95']:.1f} ms per query{budget}; mean layers per passage "
          f"{summary['mean_layers']:.2f} -> {args.output}", file=sys.stderr if args.quiet else sys.stdout)
    return 0


def _check_run_covered(first_stage, topics, collection, args: argparse.Namespace) -> None:
    """Before any work: every query of the run has a topic and each of its first ``--candidates`` (those
    reranked; the rest need no text) a passage; the error names the files."""
    from ..data import trec_order

    for qid, candidates in first_stage.items():
        if qid not in topics:
            raise InputError(f"{args.run}: query {qid!r} has no topic in {args.topics}")
        for docid, _ in trec_order(candidates)[:args.candidates]:
            if docid not in collection:
                raise InputError(f"{args.run}: query {qid!r}: docid {docid!r} not found in collection "
                                 f"{args.collection}")
