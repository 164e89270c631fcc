"""Latency and nDCG@10 of rankshrink against sentence-transformers' CrossEncoder on TREC DL 2019, with the
latency–nDCG@10 plot.

    python eval/bench_rerank.py --model models/trec-dl-offline --repeats 3 \
        --output eval/bench_rerank.md --plot eval/bench_rerank.png --json eval/bench_rerank.json

One process, interleaved query by query (``rankshrink.rerank.bench``): the peer (CrossEncoder on the model
directory: fp32, batch 32, 2 threads) and every rankshrink arm rerank the same BM25 top-100 of each query;
medians and 95th percentiles are over all (query, repeat) calls, tokenization included. Arms:

* the full network, no exits, with 1 and with 2 intra-op threads, and in fp32 (bf16's cost in nDCG@10);
* the full network with the model's calibrated exits (when it has a calibration);
* "best within 1 point": the cheapest configuration of the model's profile whose *dev* (dl21) nDCG@10 is
  within ``--within`` of the full network's dev nDCG@10 — chosen on dev data, only measured here;
* one arm per budget (``--budgets``), the controller choosing from the profile.

The report checks issue 6's targets and says which are met.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rankshrink.data import atomic_write, open_collection, read_qrels, read_run, read_topics  # noqa: E402
from rankshrink.rerank.bench import Arm, bench  # noqa: E402
from rankshrink.rerank.budget import Controller, RerankConfig  # noqa: E402

FULL = "full, no exits"


def arms_for(model_dir: Path, budgets: list[float], within: float, threads: int, max_length: int,
             other_threads: bool = True) -> tuple[dict, dict]:
    manifest = json.loads((model_dir / "rankshrink.json").read_text()) if (model_dir / "rankshrink.json").is_file() else {}
    metadata = manifest.get("metadata") or {}
    full = RerankConfig(1.0, 1.0, max_length, 100, None)
    arms = {FULL: Arm(config=full, threads=threads)}
    if other_threads:
        arms[f"{FULL}, {3 - threads} thread{'s' if 3 - threads > 1 else ''}"] = Arm(config=full, threads=3 - threads)
    arms[f"{FULL}, fp32"] = Arm(config=full, threads=threads, dtype="fp32")   # what bf16 costs in nDCG, buys in time
    notes = {}
    if (metadata.get("calibration") or {}).get("default_risk"):
        arms["full, calibrated exits"] = Arm(config=full, model_exits=True, threads=threads)
    profile = metadata.get("profile")
    if profile and profile.get("reference"):
        controller = Controller.from_profile(profile)
        best = controller.cheapest_within(profile["reference"]["ndcg@10"], within)
        if best is not None:
            arms["best within 1 point (dev)"] = Arm(config=best.config, threads=threads)
            notes["best"] = (f"{best.config.label()}: dev nDCG@10 {best.ndcg:.4f} vs full {profile['reference']['ndcg@10']:.4f} "
                             f"on {profile.get('dev')}")
    if profile:
        for budget in budgets:
            arms[f"budget {budget:g} ms"] = Arm(budget_ms=budget, threads=threads)
    else:
        notes["budgets"] = "the model has no profile: run rankshrink profile on dl21 first; budget arms skipped"
    return arms, notes


def checks(summary: dict, budgets: list[float]) -> list[tuple[str, str, bool | None]]:
    rows = []
    full = summary.get(FULL)
    if full:
        peer_ndcg, full_ndcg = full["peer_ndcg@10"], full["rankshrink_ndcg@10"]
        if peer_ndcg is not None:
            rows.append(("full, no exits: nDCG@10 within 0.005 of the peer",
                         f"{full_ndcg:.4f} vs {peer_ndcg:.4f}", abs(full_ndcg - peer_ndcg) <= 0.005))
        thread_arms = [name for name in summary if name == FULL or (name.startswith(f"{FULL}, ") and "thread" in name)]
        fastest = max(thread_arms, key=lambda name: summary[name]["speedup"])
        speedup = summary[fastest]["speedup"]
        rows.append((f"full, no exits: ≥ 4× faster than the peer ({fastest})", f"{speedup:.2f}×", speedup >= 4))
    best = summary.get("best within 1 point (dev)")
    if best and full:
        rows.append(("best config: within 0.01 nDCG@10 of the full network",
                     f"{best['rankshrink_ndcg@10']:.4f} vs {full['rankshrink_ndcg@10']:.4f}",
                     best["rankshrink_ndcg@10"] >= full["rankshrink_ndcg@10"] - 0.01))
        rows.append(("best config: ≥ 15× faster than the peer", f"{best['speedup']:.2f}×", best["speedup"] >= 15))
    previous = None
    for budget in budgets:
        arm = summary.get(f"budget {budget:g} ms")
        if not arm:
            continue
        if budget in (50, 100, 200, 400):
            rows.append((f"budget {budget:g} ms: p95 ≤ budget + 5%", f"{arm['rankshrink_ms_p95']:.1f} ms",
                         arm["rankshrink_ms_p95"] <= 1.05 * budget))
        if previous is not None and budget in (100, 200, 400):
            rows.append((f"nDCG@10 at {budget:g} ms ≥ at {previous[0]:g} ms",
                         f"{arm['rankshrink_ndcg@10']:.4f} vs {previous[1]:.4f}", arm["rankshrink_ndcg@10"] >= previous[1]))
        if budget in (50, 100, 200, 400):
            previous = (budget, arm["rankshrink_ndcg@10"])
        if budget == 100 and full:
            rows.append(("budget 100 ms: ≥ 95% of the full network's nDCG@10",
                         f"{arm['rankshrink_ndcg@10'] / full['rankshrink_ndcg@10']:.1%}",
                         arm["rankshrink_ndcg@10"] >= 0.95 * full["rankshrink_ndcg@10"]))
    return rows


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    any_arm = next(iter(summary.values()))
    axes.scatter([any_arm["peer_ms_median"]], [any_arm["peer_ndcg@10"]], marker="s", s=60, color="black",
                 label="CrossEncoder (sentence-transformers, fp32)", zorder=3)
    budgets = sorted((arm for name, arm in summary.items() if name.startswith("budget")), key=lambda a: a["budget"])
    if budgets:
        axes.plot([a["rankshrink_ms_median"] for a in budgets], [a["rankshrink_ndcg@10"] for a in budgets], "o-",
                  color="tab:blue", label="rankshrink, latency budget (median ms)", zorder=2)
        axes.plot([a["rankshrink_ms_p95"] for a in budgets], [a["rankshrink_ndcg@10"] for a in budgets], "o:",
                  color="tab:blue", alpha=0.45, label="same, 95th percentile ms", zorder=2)
        for arm in budgets:
            axes.annotate(f"{arm['budget']:g}", (arm["rankshrink_ms_median"], arm["rankshrink_ndcg@10"]),
                          textcoords="offset points", xytext=(4, -11), fontsize=8, color="tab:blue")
    markers = {FULL: ("D", "tab:red"), "full, calibrated exits": ("^", "tab:orange"),
               "best within 1 point (dev)": ("*", "tab:green")}
    for name, (marker, color) in markers.items():
        if name in summary:
            arm = summary[name]
            axes.scatter([arm["rankshrink_ms_median"]], [arm["rankshrink_ndcg@10"]], marker=marker, s=80,
                         color=color, label=f"rankshrink, {name}", zorder=3)
    axes.set_xscale("log")
    axes.set_xlabel("milliseconds per query (100 BM25 candidates, tokenization included)")
    axes.set_ylabel("nDCG@10")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    with atomic_write(path, "wb") as out:
        figure.savefig(out, format="png", dpi=130)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--split", type=Path, default=REPO.parent / "shared" / "trec-dl" / "dl19")
    parser.add_argument("--run", default="bm25.top100.trec")
    parser.add_argument("--qrels", type=Path, help="default: SPLIT/qrels.txt")
    parser.add_argument("--no-other-threads", action="store_true", help="skip the full network at the other thread count")
    parser.add_argument("--queries", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", type=float, nargs="+", default=[25, 50, 100, 200, 400, 1000, 2000])
    parser.add_argument("--within", type=float, default=0.01, help="the 'best' arm's allowed dev nDCG@10 drop")
    parser.add_argument("--threads", type=int, default=1, help="rankshrink's threads (the peer always has 2)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output", type=Path, default=REPO / "eval" / "bench_rerank.md")
    parser.add_argument("--plot", type=Path, default=REPO / "eval" / "bench_rerank.png")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    arms, notes = arms_for(args.model, args.budgets, args.within, args.threads, args.max_length,
                           other_threads=not args.no_other_threads)
    split = args.split
    result = bench(args.model, read_run(split / "runs" / args.run), read_topics(split / "topics.tsv"),
                   open_collection(split / "passages.jsonl"), read_qrels(args.qrels or split / "qrels.txt"), arms=arms,
                   queries=args.queries, repeats=args.repeats, max_length=args.max_length, threads=args.threads)
    summary = result.summary()
    for name, arm in arms.items():
        summary[name]["budget"] = arm.budget_ms
    info = result.info
    command = " ".join(["python eval/bench_rerank.py", *sys.argv[1:]])
    lines = [f"# rankshrink vs CrossEncoder on TREC DL 2019 ({split.name}, {args.run})", "", "```", command, "```", "",
             f"Model: `{args.model}`. {info['queries']} queries × {info['repeats']} repeats, interleaved query by query "
             f"in one process; {info['candidates']} candidates, max length {info['max_length']}. Peer: "
             f"sentence-transformers CrossEncoder on the same directory, fp32, batch {info['peer_batch_size']}, "
             f"{info['peer_threads']} threads. rankshrink: {info['dtype']}, {args.threads} thread(s) unless the arm "
             f"says otherwise. torch {info['torch']}; load average {info['load_average_before']:.2f} before, "
             f"{info['load_average_after']:.2f} after (2 cores, shared). Latency per query includes tokenization; "
             f"medians and p95 over all calls; nDCG@10 averaged over repeats.", ""]
    for key, note in notes.items():
        lines.append(f"- {key}: {note}")
    lines += ["", "| arm | median ms | p95 ms | speedup (ratio of medians) | median per-query speedup | nDCG@10 | "
              "deadline hits | configurations used |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    peer = next(iter(summary.values()))
    lines.append(f"| peer (CrossEncoder) | {peer['peer_ms_median']:.1f} | {peer['peer_ms_p95']:.1f} | 1.00× | 1.00× | "
                 f"{peer['peer_ndcg@10']:.4f} | – | fp32, all layers |")
    for name, arm in summary.items():
        configs = "; ".join(f"{count}× {label}" for label, count in sorted(arm["configs"].items(), key=lambda x: -x[1])[:3])
        lines.append(f"| {name} | {arm['rankshrink_ms_median']:.1f} | {arm['rankshrink_ms_p95']:.1f} | "
                     f"{arm['speedup']:.2f}× | {arm['speedup_paired_median']:.2f}× | {arm['rankshrink_ndcg@10']:.4f} | "
                     f"{arm['deadline_hits']} | {configs} |")
    lines += ["", "| target (issue 6) | measured | met |", "| --- | --- | --- |"]
    for target, measured, met in checks(summary, args.budgets):
        lines.append(f"| {target} | {measured} | {'yes' if met else 'NO'} |")
    if args.plot:
        plot(summary, args.plot, f"TREC DL 2019, BM25 top-100: rankshrink vs CrossEncoder ({args.model.name})")
        lines += ["", f"![latency vs nDCG@10]({args.plot.name})"]
    with atomic_write(args.output) as out:
        out.write("\n".join(lines) + "\n")
    if args.json:
        with atomic_write(args.json) as out:
            json.dump({"info": info, "arms": summary, "notes": notes}, out, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
