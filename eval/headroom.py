"""How much of a budget the controller may plan for: budgets × headrooms on the dev queries (dl21, never dl19).

    python eval/headroom.py --model models/trec-dl-offline --headrooms 0.4 0.3 0.2 --output eval/headroom.md

One ``Reranker`` per headroom (each warmed up, each measuring its own load), every budget and headroom in turn on
each query, the queries ``--passes`` times; per cell the median, p95 and largest latency, the deadline cuts and
nDCG@10 (of the last pass). The headroom is a latency-safety margin, so it is chosen on these latencies; the dev
nDCG@10 is in-sample for the profile, which chose its configurations on the same queries.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from rankshrink.data import atomic_write, open_collection, read_qrels, read_run, read_topics, top_k  # noqa: E402
from rankshrink.metrics import evaluate  # noqa: E402
from rankshrink.model import load_model  # noqa: E402
from rankshrink.rerank.engine import Reranker  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--split", type=Path, default=REPO.parent / "shared" / "trec-dl" / "dl21")
    parser.add_argument("--headrooms", type=float, nargs="+", default=[0.4, 0.3, 0.2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, help="only the first N judged queries (a quick check)")
    parser.add_argument("--output", type=Path, help="a markdown table (default: print it)")
    args = parser.parse_args()

    run = read_run(args.split / "runs" / "bm25.top100.trec")
    topics, qrels = read_topics(args.split / "topics.tsv"), read_qrels(args.split / "qrels.txt")
    collection = open_collection(args.split / "passages.jsonl")
    qids = sorted(qid for qid in run if qid in qrels)[:args.queries]
    candidates = top_k({qid: run[qid] for qid in qids}, 100)
    texts = {qid: {docid: collection[docid] for docid in candidates[qid]} for qid in qids}
    model = load_model(args.model)
    rerankers = {headroom: Reranker(model, threads=args.threads, headroom=headroom) for headroom in args.headrooms}
    for reranker in rerankers.values():
        reranker.warm_up(topics[qids[0]], texts[qids[0]])
    cells = [(budget, headroom) for budget in args.budgets for headroom in args.headrooms]
    latencies: dict = {cell: [] for cell in cells}
    cuts = dict.fromkeys(cells, 0)
    runs: dict = {cell: {} for cell in cells}
    for _ in range(args.passes):
        for qid in qids:
            for budget, headroom in cells:
                result = rerankers[headroom].rerank(topics[qid], candidates[qid], texts[qid], budget_ms=budget)
                latencies[(budget, headroom)].append(result.stats.latency_ms)
                cuts[(budget, headroom)] += result.stats.deadline_hit
                runs[(budget, headroom)][qid] = result.scores
    names = {cell: f"b{cell[0]:g}-h{cell[1]:g}" for cell in cells}
    scores = evaluate({qid: qrels[qid] for qid in qids}, {names[c]: runs[c] for c in cells}, ["ndcg@10"]).scores

    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [f"# Headroom on {args.split.name}: {len(qids)} judged queries × {args.passes} passes", "",
             "```", command, "```", "",
             "| budget | " + " | ".join(f"headroom {h:g}: median / p95 / max ms, cuts, nDCG@10" for h in args.headrooms)
             + " |", "| --- |" + " --- |" * len(args.headrooms)]
    for budget in args.budgets:
        row = []
        for headroom in args.headrooms:
            values = latencies[(budget, headroom)]
            row.append(f"{np.median(values):.1f} / {np.percentile(values, 95):.1f} / {max(values):.1f}, "
                       f"{cuts[(budget, headroom)]}, {scores[names[(budget, headroom)]]['ndcg@10']:.4f}")
        lines.append(f"| {budget:g} ms | " + " | ".join(row) + " |")
    lines += ["", f"Cuts: deadline hits of {len(qids) * args.passes} reranks per cell. Loads measured at the end: "
              + ", ".join(f"{h:g}: {rerankers[h].load:.2f}" for h in args.headrooms) + "."]
    text = "\n".join(lines) + "\n"
    if args.output:
        with atomic_write(args.output) as out:
            out.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
