"""rankshrink search --index DIR --topics T --k 1000 --output RUN [--k1 0.9 --b 0.4 | --msmarco] [--threads N]"""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="BM25 search of a Lucene index; writes a TREC run",
        description="Search every topic with BM25 (Pyserini's LuceneSearcher, batch search) and write a TREC run. "
                    "Defaults are Anserini's k1=0.9, b=0.4; --msmarco uses k1=0.82, b=0.68, tuned on MS MARCO "
                    "passage. INDEX may be a directory or a Pyserini prebuilt index name (msmarco-v1-passage).")
    parser.add_argument("--index", required=True, help="Lucene index directory or Pyserini prebuilt index name")
    parser.add_argument("--topics", required=True, help="topics: TSV qid<TAB>query, TREC topic file, or ir_datasets id")
    parser.add_argument("--output", required=True, help="the TREC run to write (atomically)")
    parser.add_argument("--k", type=int, default=1000, help="hits per query (default: %(default)s)")
    parser.add_argument("--k1", type=float, help="BM25 k1 (default 0.9; 0.82 with --msmarco)")
    parser.add_argument("--b", type=float, help="BM25 b (default 0.4; 0.68 with --msmarco)")
    parser.add_argument("--msmarco", action="store_true", help="BM25 parameters tuned on MS MARCO: k1=0.82, b=0.68")
    parser.add_argument("--threads", type=int, default=2, help="search threads (default: %(default)s)")
    parser.add_argument("--tag", default="bm25", help="run tag, the last column (default: %(default)s)")
    parser.set_defaults(handler=run)


def bm25_parameters(args: argparse.Namespace) -> tuple[float, float]:
    from ..firststage import ANSERINI_BM25, MSMARCO_BM25

    k1, b = MSMARCO_BM25 if args.msmarco else ANSERINI_BM25
    if args.msmarco and (args.k1 is not None or args.b is not None):
        raise InputError("--msmarco sets k1=0.82 and b=0.68; give either --msmarco or --k1/--b")
    return (args.k1 if args.k1 is not None else k1), (args.b if args.b is not None else b)


def run(args: argparse.Namespace) -> int:
    from ..data import read_topics, write_run
    from ..firststage import BM25

    k1, b = bm25_parameters(args)
    topics = read_topics(args.topics)
    searcher = BM25(args.index, k1=k1, b=b)
    started = time.perf_counter()
    results = searcher.batch_search(topics, k=args.k, threads=args.threads)
    seconds = time.perf_counter() - started
    write_run(results, args.output, tag=args.tag)
    report(results, seconds, args.output)
    return 0


def report(results: dict, seconds: float, output: str) -> None:
    empty = [qid for qid, hits in results.items() if not hits]
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        print(f"rankshrink search: {len(empty)} of {len(results)} queries have no hits "
              f"(empty, or stopwords only): {shown}", file=sys.stderr)
    hits = sum(len(docs) for docs in results.values())
    print(f"searched {len(results)} queries in {seconds:.2f} s ({len(results) / max(seconds, 1e-9):.1f} queries/s), "
          f"{hits:,} hits -> {output}")
