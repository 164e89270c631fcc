"""rankshrink eval --qrels QRELS RUN [RUN ...] [--metrics ...] [--baseline RUN] [--json] [--per-query]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data import read_qrels, read_run
from ..errors import InputError
from ..metrics import DEFAULT_METRICS, evaluate


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate TREC runs against qrels (trec_eval conventions, through ranx)",
        description="Evaluate TREC runs as trec_eval does: nDCG with linear gain over all grades; binary "
                    "metrics count grade >= --rel-level; ties broken by docid as trec_eval breaks them. Run "
                    "queries without judgments are ignored; judged queries a run lacks score 0 (trec_eval -c).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="TREC run files; name one NAME=PATH to choose its name in the table")
    parser.add_argument("--qrels", required=True, help="TREC qrels file or ir_datasets id")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                        help="ndcg@k, mrr@k, map, map@k, recall@k, p@k (default: %(default)s)")
    parser.add_argument("--baseline", help="a RUN (path or name) to test every other run against")
    parser.add_argument("--stat-test", choices=["student", "fisher", "tukey"], default="student",
                        help="paired significance test against the baseline (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default: %(default)s)")
    parser.add_argument("--rel-level", type=int, default=1,
                        help="minimum grade that binary metrics count as relevant (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print {run_name: {metric: value}} as JSON")
    parser.add_argument("--per-query", action="store_true",
                        help="also print each query's value (with --json: {run_name: {metric: {qid: value}}})")
    parser.set_defaults(handler=run)


def run_names(paths: list[str]) -> dict[str, Path]:
    """Name each run by its file name without the .trec/.txt/.run extension, or by NAME= when given."""
    named: dict[str, Path] = {}
    for spec in paths:
        name, equals, path_text = spec.partition("=")
        path = Path(path_text) if equals and not Path(spec).exists() else Path(spec)
        if not equals or Path(spec).exists():
            name = path.name.removesuffix(".gz")
            name = name.rsplit(".", 1)[0] if name.endswith((".trec", ".txt", ".run", ".tsv")) else name
        if name in named:
            raise InputError(f"two runs are named {name!r} ({named[name]} and {path}); name them with NAME=PATH")
        named[name] = path
    return named


def run(args: argparse.Namespace) -> int:
    paths = run_names(args.runs)
    baseline = None
    if args.baseline:
        matches = [name for name, path in paths.items()
                   if args.baseline == name or Path(args.baseline).resolve() == path.resolve()]
        if not matches:
            paths = {**run_names([args.baseline]), **paths}
            matches = [next(iter(paths))]
        baseline = matches[0]
    qrels = read_qrels(args.qrels)
    runs = {name: read_run(path) for name, path in paths.items()}
    result = evaluate(qrels, runs, args.metrics, rel_level=args.rel_level, baseline=baseline,
                      stat_test=args.stat_test, alpha=args.alpha)
    for name, coverage in result.coverage.items():
        message = coverage.message(name)
        if message:
            print(message, file=sys.stderr)
    if args.json:
        payload = result.per_query if args.per_query else result.scores
        print(json.dumps(payload, indent=2))
        return 0
    print(result.table())
    if args.per_query:
        print()
        for name in result.per_query:
            for metric, values in result.per_query[name].items():
                for qid, value in sorted(values.items()):
                    print(f"{name}\t{metric}\t{qid}\t{value:.4f}")
    return 0
