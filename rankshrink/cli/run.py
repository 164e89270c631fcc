"""rankshrink run RECIPE [--queries N] [--check] [--no-budgets] [--output DIR] [--quiet]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run a pipelines/*.yaml recipe end to end: index, search, rerank, eval, table and plot",
        description="Run a recipe end to end: build the index when missing, search (or read a first-stage run), "
                    "rerank at each fixed configuration and each budget, evaluate, and write results.json, "
                    "table.md and a plot under the recipe's output folder (eval/NAME/ by default; the runs go to "
                    "runs/NAME/). --check instead writes to runs/NAME/check/ and compares the new scores with the "
                    "committed results, within the recipe's tolerances (exit status 1 when they differ).")
    parser.add_argument("recipe", type=Path, help="the recipe, e.g. pipelines/trec-dl-offline.yaml")
    parser.add_argument("--queries", type=int, help="only the first N topics (a quick check)")
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed results instead of replacing them")
    parser.add_argument("--output", type=Path, help="write results here instead (default: the recipe's output)")
    parser.add_argument("--no-budgets", action="store_true",
                        help="skip the budget rows (their scores depend on this machine's speed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline.recipe import RESULTS_FILE, compare_results, read_recipe, read_results, run_recipe

    recipe = read_recipe(args.recipe)
    committed = read_results(recipe.output / RESULTS_FILE) if args.check else None
    output = args.output or (recipe.runs / "check" if args.check else None)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731 - stdout carries the table only
    results = run_recipe(recipe, output=output, queries=args.queries, budgets=not args.no_budgets,
                         progress=not args.quiet, log=log)
    from ..pipeline.recipe import format_table

    print(format_table(results))
    if committed is None:
        return 0
    differences = compare_results(results, committed, recipe.eval["tolerance"], recipe.eval["budget_tolerance"])
    for difference in differences:
        print(f"rankshrink run --check: {difference}", file=sys.stderr)
    if differences:
        print(f"rankshrink run --check: {len(differences)} difference(s) from {recipe.output / RESULTS_FILE}",
              file=sys.stderr)
        return 1
    print(f"matches {recipe.output / RESULTS_FILE} on {len(results.queries)} queries "
          f"(tolerance {recipe.eval['tolerance']}, budgets {recipe.eval['budget_tolerance']})")
    return 0
