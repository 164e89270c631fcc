"""rankshrink profile --model MODEL_DIR --run RUN --topics T --collection C [--qrels Q] [--output DIR] ..."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..errors import InputError


def register(subparsers) -> None:
    from ..rerank.profiling import DEFAULT_CANDIDATES, DEFAULT_EXIT_RISKS, DEFAULT_KEEPS, DEFAULT_MAX_LENGTHS

    parser = subparsers.add_parser(
        "profile", help="calibrate early exits and measure the latency-nDCG frontier on dev data; store it with the model",
        description="Trace every (width, depth, max length) of the model on the dev queries, calibrate the exit "
                    "margins, simulate every number of candidates, exit risk and cascade, fit a cost model to the "
                    "timings, time the Pareto frontier and the budget ladder for real, and store calibration, frontier "
                    "and ladder in the model's rankshrink.json (budgets then work: rankshrink rerank --budget-ms). "
                    "Use dev data (TREC DL 2021), never the test set.")
    parser.add_argument("--model", required=True, help="rankshrink model directory (updated in place unless --output)")
    parser.add_argument("--run", required=True, help="dev first-stage TREC run, e.g. dl21 BM25 top-100")
    parser.add_argument("--topics", required=True, help="dev topics")
    parser.add_argument("--collection", required=True, help="dev passages (JSONL, TSV or ir_datasets id)")
    parser.add_argument("--qrels", help="dev qrels; without them, quality is agreement with the full network: nDCG@10 "
                                        "against its own top 10 on every query of the run (your own, unjudged queries)")
    parser.add_argument("--output", type=Path,
                        help="save the model with its profile here (needed when --model is a plain Hugging Face dir)")
    parser.add_argument("--widths", type=float, nargs="+", help="default: the model's trained widths")
    parser.add_argument("--depths", type=float, nargs="+", help="default: the model's trained depths")
    parser.add_argument("--max-lengths", type=int, nargs="+", default=list(DEFAULT_MAX_LENGTHS),
                        help="default: %(default)s")
    parser.add_argument("--candidates", type=int, nargs="+", default=list(DEFAULT_CANDIDATES),
                        help="numbers of first-stage candidates to rerank (default: %(default)s)")
    parser.add_argument("--exit-risks", nargs="+", default=["off", *(f"{r:g}" for r in DEFAULT_EXIT_RISKS if r)],
                        help="exit risks to try; 'off' is no early exit (default: %(default)s)")
    parser.add_argument("--keeps", type=int, nargs="*", default=list(DEFAULT_KEEPS),
                        help="cascades to try: the smallest sub-network's best N candidates go on (default: "
                             "%(default)s; none: --keeps with no value)")
    parser.add_argument("--prune-depths", type=float, nargs="+",
                        help="depths of a cascade's first pass to try (default: the model's depths but its deepest)")
    parser.add_argument("--queries", type=int, help="profile on this many dev queries (default: all judged ones)")
    parser.add_argument("--time-queries", type=int, default=20,
                        help="dev queries that time each frontier configuration for real (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=10, help="the cut early exits protect (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="default: %(default)s")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--points", type=Path, help="also write every simulated configuration to this JSON (for plots)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def parse_risks(values: list[str]) -> list[float | None]:
    risks: list[float | None] = []
    for value in values:
        if str(value).lower() in ("off", "none"):
            risks.append(None)
            continue
        try:
            risks.append(float(value))
        except ValueError:
            raise InputError(f"--exit-risks: {value!r} is not a probability or 'off'") from None
    return risks


def run(args: argparse.Namespace) -> int:
    from ..data import atomic_write, open_collection, read_qrels, read_run, read_topics
    from ..model import load_model, save_model
    from ..model.io import MANIFEST
    from ..rerank.profiling import frontier_table, profile, save_profile

    model_dir = Path(args.model)
    if args.output is None and not (model_dir / MANIFEST).is_file():
        raise InputError(f"{model_dir}: not a rankshrink model directory (no {MANIFEST}); give --output DIR to save "
                         f"the model with its profile there")
    if any(re.search(r"dl19|dl-2019|trec-dl-2019", str(path)) for path in (args.run, args.qrels) if path):
        print("rankshrink profile: warning: this looks like TREC DL 2019, the test set; profile on dev data "
              "(e.g. dl21) so that numbers quoted on dl19 are not tuned on it", file=sys.stderr)
    model = load_model(model_dir)
    result = profile(model, read_run(args.run), read_topics(args.topics), open_collection(args.collection),
                     read_qrels(args.qrels) if args.qrels else None, widths=args.widths, depths=args.depths,
                     max_lengths=args.max_lengths, candidates=args.candidates,
                     exit_risks=parse_risks(args.exit_risks), keeps=args.keeps, prune_depths=args.prune_depths,
                     dtype=args.dtype, threads=args.threads, queries=args.queries, time_queries=args.time_queries,
                     top_k=args.top_k, progress=not args.quiet, dev_name=f"{args.run} ({args.qrels or 'no qrels'})")
    if args.output is not None:
        model.metadata["calibration"] = result.calibration
        model.metadata["profile"] = result.profile
        save_model(model, args.output)
        where = args.output / MANIFEST
    else:
        where = save_profile(model_dir, result)
    if args.points:
        with atomic_write(args.points) as out:
            json.dump({"profile": result.profile, "points": result.points}, out, indent=1)
            out.write("\n")
    print(frontier_table(result.profile))
    print("\nladder (what budgets climb):\n" + frontier_table(result.profile, "ladder"))
    reference = result.profile.get("reference")
    if reference:
        print(f"\nfull network (width {reference['width']:g}, depth {reference['depth']:g}, "
              f"{reference['candidates']} candidates, no exits): dev nDCG@10 {reference['ndcg@10']:.4f}"
              f"{'' if args.qrels else ' (against itself)'}, "
              f"predicted {reference['ms_p50']:.0f} ms median per query")
    print(f"default exit risk: {result.calibration['default_risk']}; "
          f"{len(result.profile['frontier'])} frontier configurations, {len(result.profile['ladder'])} on the "
          f"ladder -> {where}")
    return 0
