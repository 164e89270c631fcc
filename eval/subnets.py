"""nDCG@10 on TREC DL 2019 (BM25 top-100 reranked) of every (width, depth) sub-network and of every exit layer
at every width (all documents exiting there: the first layers and an exit head, FastBERT's way of running half
the depth), with each one's FLOPs; ablation models as extra rows; a PNG of nDCG vs FLOPs.

    python eval/subnets.py --model full=models/trec-dl-offline \
        --ablation no-rewiring=models/ablation-no-rewire --ablation labels-only=models/ablation-labels-only \
        --ablation no-hidden-mse=models/ablation-no-hidden-mse --output eval/distill

Scores are model.score in fp32 (the quality of the weights, not of the engine's bf16 or exits). Each
configuration's run is written to runs/distill/<model>/<config>.trec, so ``rankshrink eval`` reproduces every
number; FLOPs are per query: the sum over its 100 (query, passage) pairs of ``model.flops`` at their token count
(the last layer for [CLS] alone where the final head scores; an exit head reads every token).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from rankshrink.data import atomic_write, open_collection, read_qrels, read_run, read_topics, write_run  # noqa: E402
from rankshrink.metrics import evaluate  # noqa: E402
from rankshrink.model import load_model  # noqa: E402

SHARED = REPO.parent / "shared" / "trec-dl" / "dl19"
WIDTHS, DEPTHS = (0.25, 0.5, 0.75, 1.0), (0.5, 0.75, 1.0)
ABLATION_CONFIGS = ((1.0, 1.0), (0.5, 1.0), (0.5, 0.5), (0.25, 0.5))


def score_queries(model, run, topics, collection, max_length: int, configs, exits: bool):
    """{config name: Run} and {config name: GFLOPs per query} for the (width, depth) configs, plus each exit
    layer at every width of depth 1 when ``exits`` ("exit-3": full width, "w0.5-exit-3": width 0.5)."""
    runs: dict[str, dict] = {}
    gflops: dict[str, list[float]] = {}
    for qid in sorted(run):
        docids = sorted(run[qid], key=lambda d: -run[qid][d])[:100]
        texts = [collection[d] for d in docids]
        encoded = model.encode([topics[qid]] * len(docids), texts, max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        batch = model._pad(encoded)
        with torch.inference_mode():
            for width, depth in configs:
                wanted = "all" if exits and depth == 1.0 else None
                out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], width=width,
                            depth=depth, exits=wanted)
                name = f"w{width:g}-d{depth:g}"
                runs.setdefault(name, {})[qid] = dict(zip(docids, out.score.float().tolist()))
                gflops.setdefault(name, []).append(sum(model.flops(width, depth, n) for n in lengths) / 1e9)
                for layer, scores in sorted(out.exit_scores.items()):
                    if layer == model.config.num_layers - 1:
                        continue   # the last exit is the final head
                    exit_name = f"exit-{layer + 1}" if width == 1.0 else f"w{width:g}-exit-{layer + 1}"
                    runs.setdefault(exit_name, {})[qid] = dict(zip(docids, scores.float().tolist()))
                    gflops.setdefault(exit_name, []).append(sum(
                        (layer + 1) * model.layer_flops(width, n) + model.head_flops() for n in lengths) / 1e9)
    return runs, {name: sum(values) / len(values) for name, values in gflops.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="NAME=DIR: the trained model, every sub-network and exit")
    parser.add_argument("--append", action="store_true",
                        help="keep OUTPUT/results.json's rows of the models not named here (ablations scored "
                             "earlier); score --model and the --ablation models, replacing their rows")
    parser.add_argument("--ablation", action="append", default=[], help="NAME=DIR: ablation rows (4 configs each)")
    parser.add_argument("--split", type=Path, default=SHARED)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, help="only the first N queries (a quick check; numbers not comparable)")
    parser.add_argument("--output", type=Path, default=REPO / "eval" / "distill")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "distill")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run = read_run(args.split / "runs" / "bm25.top100.trec")
    run = {qid: run[qid] for qid in sorted(run)[:args.queries]}
    topics, qrels = read_topics(args.split / "topics.tsv"), read_qrels(args.split / "qrels.txt")
    qrels = {qid: judged for qid, judged in qrels.items() if qid in run}
    collection = open_collection(args.split / "passages.jsonl")
    rows, kept, main_name = [], [], args.model.partition("=")[0]
    if args.append:
        rescored = {main_name, *(spec.partition("=")[0] for spec in args.ablation)}
        kept = [row for row in json.loads((args.output / "results.json").read_text())["rows"]
                if row["model"] not in rescored]
    todo = [(args.model, [(w, d) for d in DEPTHS for w in WIDTHS], True),
            *((spec, ABLATION_CONFIGS, False) for spec in args.ablation)]
    for spec, configs, exits in todo:
        name, _, directory = spec.partition("=")
        model = load_model(directory).eval()
        runs, gflops = score_queries(model, run, topics, collection, args.max_length, configs, exits)
        for config, config_run in runs.items():
            write_run(config_run, args.runs / name / f"{config}.trec", tag=f"{name}-{config}")
        scores = evaluate(qrels, runs, ["ndcg@10"]).scores
        full = scores["w1-d1"]["ndcg@10"]
        for config in runs:
            rows.append({"model": name, "config": config, "ndcg@10": round(scores[config]["ndcg@10"], 4),
                         "of_full": round(scores[config]["ndcg@10"] / full, 4), "gflops": round(gflops[config], 2)})
        print(f"{name}: full network nDCG@10 {full:.4f}", file=sys.stderr)
    # Rows kept from earlier runs (ablations: the same architecture and tokens) take this run's FLOPs count.
    counted = {row["config"]: row["gflops"] for row in rows if row["model"] == main_name}
    rows += [{**row, "gflops": counted.get(row["config"], row["gflops"])} for row in kept]

    args.output.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output / "results.json") as out:
        json.dump({"max_length": args.max_length, "split": str(args.split.name), "rows": rows}, out, indent=1)
    lines = ["| model | configuration | nDCG@10 | of its full network | GFLOPs / query |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['config']} | {r['ndcg@10']:.4f} | {100 * r['of_full']:.1f}% | {r['gflops']:.1f} |"
              for r in rows]
    with atomic_write(args.output / "table.md") as out:
        out.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, main_name, args.output / "ndcg-vs-flops.png")
    return 0


def plot(rows, name: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for depth, marker in zip(DEPTHS, "os^"):
        points = sorted((r["gflops"], r["ndcg@10"]) for r in rows
                        if r["model"] == name and r["config"].endswith(f"-d{depth:g}"))
        axes.plot(*zip(*points), marker=marker, label=f"depth {depth:g}, widths 0.25–1")
    for prefix, label in (("exit-", "full width"), ("w0.5-exit-", "width 0.5")):
        exits = sorted((r["gflops"], r["ndcg@10"]) for r in rows if r["model"] == name and r["config"].startswith(prefix))
        if exits:
            axes.plot(*zip(*exits), marker="x", linestyle=":", label=f"exit after layer 1…5 ({label})")
    others = [r for r in rows if r["model"] != name]
    for r in others:
        axes.scatter(r["gflops"], r["ndcg@10"], marker=".", color="grey")
    axes.set_xlabel("GFLOPs per query (100 pairs)")
    axes.set_ylabel("nDCG@10, dl19 BM25 top-100")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_write(path, "wb", encoding=None) as out:
        figure.savefig(out, format="png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
