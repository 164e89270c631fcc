"""rankshrink search --index DIR --topics T --k 1000 --output RUN [--k1 0.9 --b 0.4 | --msmarco] [--threads N]
                  [--dense] [--hybrid --dense-index DIR [--fusion rrf|sum] [--weights W_BM25 W_DENSE]]"""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="first-stage search (BM25, dense or hybrid); writes a TREC run",
        description="Search every topic and write a TREC run. By default BM25 over a Lucene index (Pyserini's "
                    "LuceneSearcher batch search; Anserini's k1=0.9, b=0.4, or --msmarco for k1=0.82, b=0.68 tuned "
                    "on MS MARCO passage); INDEX may be a Pyserini prebuilt index name (msmarco-v1-passage). "
                    "--dense searches a faiss index from `rankshrink index --dense`; --hybrid fuses BM25 (--index) "
                    "and dense (--dense-index) through ranx.")
    parser.add_argument("--index", required=True,
                        help="Lucene index directory or Pyserini prebuilt index name; with --dense, the dense index")
    parser.add_argument("--topics", required=True, help="topics: TSV qid<TAB>query, TREC topic file, or ir_datasets id")
    parser.add_argument("--output", required=True, help="the TREC run to write (atomically)")
    parser.add_argument("--k", type=int, default=1000, help="hits per query (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="search threads (default: %(default)s)")
    parser.add_argument("--tag", help="run tag, the last column (default: bm25, dense or hybrid-METHOD)")
    bm25 = parser.add_argument_group("BM25")
    bm25.add_argument("--k1", type=float, help="BM25 k1 (default 0.9; 0.82 with --msmarco)")
    bm25.add_argument("--b", type=float, help="BM25 b (default 0.4; 0.68 with --msmarco)")
    bm25.add_argument("--msmarco", action="store_true", help="BM25 parameters tuned on MS MARCO: k1=0.82, b=0.68")
    dense = parser.add_argument_group("dense and hybrid")
    mode = dense.add_mutually_exclusive_group()
    mode.add_argument("--dense", action="store_true", help="search the dense (faiss) index given by --index")
    mode.add_argument("--hybrid", action="store_true", help="fuse BM25 (--index) with dense (--dense-index)")
    dense.add_argument("--dense-index", help="the dense index for --hybrid")
    dense.add_argument("--fusion", choices=["rrf", "sum"], default="rrf",
                       help="rrf: reciprocal rank fusion; sum: min-max normalised score sum (default: %(default)s)")
    dense.add_argument("--weights", type=float, nargs=2, default=[1.0, 1.0], metavar=("W_BM25", "W_DENSE"),
                       help="fusion weights of BM25 and dense (default: 1 1)")
    dense.add_argument("--rrf-k", type=float, default=60, help="the k of RRF, 1/(k + rank) (default: %(default)s)")
    dense.add_argument("--depth", type=int, default=1000,
                       help="hits each side retrieves before fusion (default: %(default)s, at least --k)")
    dense.add_argument("--ef-search", type=int, help="HNSW search breadth (default: the index's, 256)")
    dense.add_argument("--nprobe", type=int, help="IVF lists visited per query (default: the index's)")
    dense.add_argument("--device", help="query encoder device (default: cuda when available)")
    parser.set_defaults(handler=run)


def bm25_parameters(args: argparse.Namespace) -> tuple[float, float]:
    from ..firststage import ANSERINI_BM25, MSMARCO_BM25

    k1, b = MSMARCO_BM25 if args.msmarco else ANSERINI_BM25
    if args.msmarco and (args.k1 is not None or args.b is not None):
        raise InputError("--msmarco sets k1=0.82 and b=0.68; give either --msmarco or --k1/--b")
    return (args.k1 if args.k1 is not None else k1), (args.b if args.b is not None else b)


def searcher(args: argparse.Namespace):
    from ..firststage import BM25, DenseSearcher, HybridSearcher

    if args.hybrid and not args.dense_index:
        raise InputError("--hybrid needs --dense-index DIR (a faiss index from rankshrink index --dense)")
    if args.dense_index and not args.hybrid:
        raise InputError("--dense-index is for --hybrid; with --dense, give the dense index as --index")
    dense_options = {"ef_search": args.ef_search, "nprobe": args.nprobe, "device": args.device}
    if args.dense:
        if args.msmarco or args.k1 is not None or args.b is not None:
            raise InputError("--k1/--b/--msmarco are BM25 parameters; --dense has none")
        return DenseSearcher(args.index, **dense_options), args.tag or "dense"
    k1, b = bm25_parameters(args)
    if args.hybrid:
        hybrid = HybridSearcher(BM25(args.index, k1=k1, b=b), DenseSearcher(args.dense_index, **dense_options),
                                method=args.fusion, weights=args.weights, rrf_k=args.rrf_k, depth=args.depth)
        return hybrid, args.tag or f"hybrid-{args.fusion}"
    return BM25(args.index, k1=k1, b=b), args.tag or "bm25"


def run(args: argparse.Namespace) -> int:
    from ..data import check_output_file, check_tag, read_topics, write_run

    check_output_file(args.output)
    topics = read_topics(args.topics)
    first_stage, tag = searcher(args)
    check_tag(tag)
    started = time.perf_counter()
    results = first_stage.batch_search(topics, k=args.k, threads=args.threads)
    seconds = time.perf_counter() - started
    write_run(results, args.output, tag=tag)
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
