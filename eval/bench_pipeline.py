"""Concurrent search under a budget: N threads × every dl19 query at once, against one sequential pass.

    python eval/bench_pipeline.py --model models/trec-dl-offline --budget-ms 400 --threads 4 \
        --markdown eval/bench_pipeline.md

What it shows, for ``Pipeline(concurrency=THREADS)`` (queries take turns on the model; the reranker works to
budget / THREADS - overhead, see rankshrink/pipeline/search.py):

* errors: none expected;
* rankings: every concurrent search's top 10 against the sequential pass's (identical expected);
* latency: each search's wall clock, queueing included, p50 / p95 / max, and each query's p95 over its
  THREADS concurrent runs, against the budget;
* what admission costs: nDCG@10 of the sequential pass planned for THREADS against one planned for a single
  caller (the whole budget), and two designs it replaced, run the same way: every thread calling the
  engine at once with the whole budget (no admission), and turns without a fixed share (a query reranks in
  whatever its wait left it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a profiled model directory (rankshrink profile)")
    parser.add_argument("--index", default=str(REPO / "indexes" / "dl19-passages"))
    parser.add_argument("--collection", default=str(SHARED / "trec-dl" / "dl19" / "passages.jsonl"))
    parser.add_argument("--topics", default=str(SHARED / "trec-dl" / "dl19" / "topics.tsv"))
    parser.add_argument("--qrels", default=str(SHARED / "trec-dl" / "dl19" / "qrels.txt"))
    parser.add_argument("--budget-ms", type=float, default=400.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--overhead-ms", type=float, default=20.0)
    parser.add_argument("--headroom", type=float, help="default: Pipeline's")
    parser.add_argument("--variants", action="store_true", help="also run the two designs admission replaced")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--markdown", type=Path, help="write a report here")
    return parser.parse_args()


def percentile(values, share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(-(-share * len(ordered) // 1)) - 1))]   # nearest rank


def summary(latencies) -> dict:
    return {"p50": round(statistics.median(latencies), 1), "p95": round(percentile(latencies, 0.95), 1),
            "max": round(max(latencies), 1)}


def run_threads(work, threads: int) -> tuple[list, float]:
    """``work(number)`` on ``threads`` threads released together; (results, wall seconds)."""
    results: list = [None] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def worker(number: int) -> None:
        try:
            barrier.wait()
            results[number] = work(number)
        except BaseException as error:  # noqa: BLE001 - reported
            errors.append(error)

    pool = [threading.Thread(target=worker, args=(number,)) for number in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - started


def ndcg10(qrels, rankings: dict[str, list[str]]) -> float:
    from rankshrink.metrics import evaluate

    run = {qid: {docid: float(len(docids) - i) for i, docid in enumerate(docids)} for qid, docids in rankings.items()}
    return evaluate(qrels, {"run": run}, ["ndcg@10"]).scores["run"]["ndcg@10"]


def pipeline_passes(pipeline, topics, budget: float, threads: int) -> dict:
    """A sequential pass, then ``threads`` threads × every query at once."""
    sequential = {}
    for qid, query in topics.items():
        hits, stats = pipeline.search_with_stats(query, k=10, budget_ms=budget)
        sequential[qid] = ([hit.docid for hit in hits], stats)

    def one_thread(number: int) -> dict:
        order = list(topics)
        random.Random(number).shuffle(order)
        out = {}
        for qid in order:
            hits, stats = pipeline.search_with_stats(topics[qid], k=10, budget_ms=budget)
            out[qid] = ([hit.docid for hit in hits], stats)
        return out

    concurrent, wall = run_threads(one_thread, threads)
    return {"sequential": sequential, "concurrent": concurrent, "wall_s": wall}


def count_configs(all_stats) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stats in all_stats:
        config = stats.config
        key = (f"w{config.get('width', 0):g} d{config.get('depth', 0):g} L{config.get('max_length', 0)} "
               f"K{config.get('candidates', 0)} exits {config.get('exit_risk') if config.get('exits') else 'off'}")
        counts[key] = counts.get(key, 0) + 1
    return counts


def describe(passes: dict, budget: float, qrels, label: str) -> dict:
    sequential, concurrent = passes["sequential"], passes["concurrent"]
    all_runs = [(qid, docids, stats) for result in concurrent for qid, (docids, stats) in result.items()]
    latencies = [stats.latency_ms for _, _, stats in all_runs]
    per_query_p95 = {qid: percentile([r[qid][1].latency_ms for r in concurrent], 0.95) for qid in sequential}
    same = sum(docids == sequential[qid][0] for qid, docids, _ in all_runs)
    # a ranking may differ because a deadline cut it (here or in the sequential pass); any other difference
    # would be a bug in admission
    unexplained = sum(docids != sequential[qid][0] and not stats.deadline_hit and not sequential[qid][1].deadline_hit
                      for qid, docids, stats in all_runs)
    configs = count_configs(stats for _, _, stats in all_runs)
    return {
        "label": label,
        "searches": len(all_runs),
        "identical_top10": same,
        "differing_without_a_deadline_cut": unexplained,
        "budget_ms": budget,
        "concurrent_latency_ms": summary(latencies),
        "sequential_latency_ms": summary([stats.latency_ms for _, stats in sequential.values()]),
        "sequential_deadline_hits": sum(stats.deadline_hit for _, stats in sequential.values()),
        "rerank_ms": summary([stats.rerank_ms for _, _, stats in all_runs]),
        "sequential_rerank_ms": summary([stats.rerank_ms for _, stats in sequential.values()]),
        "queries_with_p95_over_budget": sum(p95 > budget for p95 in per_query_p95.values()),
        "searches_over_budget": sum(latency > budget for latency in latencies),
        "deadline_hits": sum(stats.deadline_hit for _, _, stats in all_runs),
        "queued_ms_p95": round(percentile([stats.queued_ms for _, _, stats in all_runs], 0.95), 1),
        "rerank_budget_ms": sorted({round(s.rerank_budget_ms, 1) for _, _, s in all_runs
                                    if s.rerank_budget_ms is not None})[:5],
        "configs_chosen": configs,
        "sequential_configs_chosen": count_configs(stats for _, stats in sequential.values()),
        "queries_per_s": round(len(all_runs) / passes["wall_s"], 2),
        "ndcg10_sequential": round(ndcg10(qrels, {qid: d for qid, (d, _) in sequential.items()}), 4),
        "ndcg10_concurrent_mean": round(statistics.fmean(
            ndcg10(qrels, {qid: docids for qid, (docids, _) in result.items()}) for result in concurrent), 4),
    }


def no_admission(pipeline, topics, budget: float, threads: int, qrels) -> dict:
    """Every thread runs first stage + engine at once, each rerank with the whole budget: what Pipeline's
    turns replace."""
    reranker, first_stage, collection = pipeline.reranker, pipeline.first_stage, pipeline.collection

    def search(query: str):
        started = time.perf_counter()
        candidates = first_stage.search(query, k=pipeline.candidates)
        texts = dict(zip(candidates, collection.texts(candidates)))
        left = max(0.0, budget - (time.perf_counter() - started) * 1000)
        result = reranker.rerank(query, candidates, texts, budget_ms=left, top_k=10)
        return result.ranking()[:10], (time.perf_counter() - started) * 1000, result.stats.deadline_hit

    sequential = {qid: search(query) for qid, query in topics.items()}

    def one_thread(number: int) -> dict:
        order = list(topics)
        random.Random(number).shuffle(order)
        return {qid: search(topics[qid]) for qid in order}

    concurrent, wall = run_threads(one_thread, threads)
    runs = [(qid, value) for result in concurrent for qid, value in result.items()]
    latencies = [value[1] for _, value in runs]
    return {
        "label": "no admission: all threads call the engine at once, whole budget each",
        "searches": len(runs),
        "identical_top10": sum(value[0] == sequential[qid][0] for qid, value in runs),
        "concurrent_latency_ms": summary(latencies),
        "sequential_latency_ms": summary([value[1] for value in sequential.values()]),
        "searches_over_budget": sum(latency > budget for latency in latencies),
        "deadline_hits": sum(value[2] for _, value in runs),
        "queries_per_s": round(len(runs) / wall, 2),
        "ndcg10_sequential": round(ndcg10(qrels, {qid: v[0] for qid, v in sequential.items()}), 4),
        "ndcg10_concurrent_mean": round(statistics.fmean(
            ndcg10(qrels, {qid: v[0] for qid, v in result.items()}) for result in concurrent), 4),
    }


def main() -> int:
    args = arguments()
    warnings.simplefilter("ignore")
    import torch

    from rankshrink.data import atomic_write, read_qrels, read_topics
    from rankshrink.pipeline import Pipeline
    from rankshrink.rerank.budget import DEFAULT_HEADROOM

    if args.headroom is None:
        args.headroom = DEFAULT_HEADROOM
    topics, qrels = read_topics(args.topics), read_qrels(args.qrels)
    common = dict(index=args.index, collection=args.collection, candidates=args.candidates,
                  overhead_ms=args.overhead_ms, headroom=args.headroom)
    planned = Pipeline(model=args.model, concurrency=args.threads, **common)
    if planned.reranker.controller is None:
        print(f"{args.model} has no profile: budgets would only cut the fixed configuration; run rankshrink "
              "profile first", file=sys.stderr)
        return 2

    def warmed(pipeline):   # each pipeline warms up alike: kernels, caches, its engine's speed estimate
        for query in list(topics.values())[:5]:
            pipeline.search(query, k=10, budget_ms=args.budget_ms)
        return pipeline

    warmed(planned)
    started = time.time()
    report = {"command": " ".join(["python", "eval/bench_pipeline.py", *sys.argv[1:]]),
              "model": args.model, "threads": args.threads, "queries": len(topics), "budget_ms": args.budget_ms,
              "headroom": args.headroom,
              "load_average_before": round(os.getloadavg()[0], 2),
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "results": []}
    print(f"admission (concurrency={args.threads}) ...", file=sys.stderr)
    report["results"].append(describe(pipeline_passes(planned, topics, args.budget_ms, args.threads),
                                      args.budget_ms, qrels, f"Pipeline(concurrency={args.threads}): turns, "
                                                              f"fixed share"))
    alone = warmed(Pipeline(model=planned.reranker.source_model, concurrency=1, **common))
    report["alone"] = {"label": "Pipeline(concurrency=1), one caller: the whole budget",
                       "ndcg10": round(ndcg10(qrels, {qid: [h.docid for h in alone.search(q, 10, args.budget_ms)]
                                                      for qid, q in topics.items()}), 4)}
    if args.variants:
        print("adapting to load ...", file=sys.stderr)
        adaptive = warmed(Pipeline(model=planned.reranker.source_model, concurrency=args.threads,
                                   adapt_to_load=True, **common))
        report["results"].append(describe(pipeline_passes(adaptive, topics, args.budget_ms, args.threads),
                                          args.budget_ms, qrels, "turns, fixed share, adapt_to_load=True"))
        print("turns without a fixed share (concurrency=1, 4 callers) ...", file=sys.stderr)
        report["results"].append(describe(pipeline_passes(alone, topics, args.budget_ms, args.threads),
                                          args.budget_ms, qrels, "turns, no fixed share (time left)"))
        print("no admission ...", file=sys.stderr)
        report["results"].append(no_admission(planned, topics, args.budget_ms, args.threads, qrels))
    report["seconds"] = round(time.time() - started, 1)
    report["load_average_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with atomic_write(args.json) as out:
            out.write(text + "\n")
    if args.markdown:
        with atomic_write(args.markdown) as out:
            out.write(markdown(report))
    return 0


def markdown(report: dict) -> str:
    queries = report.get("queries", 43)   # reports before the key: the 43 dl19 queries
    lines = [f"# Concurrent search under a budget: {report['threads']} threads × {queries} dl19 queries", "",
             "```", report["command"], "```", "",
             f"Model `{report['model']}`, budget {report['budget_ms']:g} ms per search (first stage, texts, "
             f"queueing and rerank), headroom {report['headroom']:g}, {report['cpus']} CPUs, torch "
             f"{report['torch_threads']} thread(s), load average {report['load_average_before']} before and "
             f"{report['load_average_after']} after (a shared machine). Each design: "
             f"one sequential pass, then {report['threads']} threads each searching every query (own order) "
             "at once; rankings compared with its own sequential pass.", "",
             "| design | identical top 10 | p50 ms | p95 ms | max ms | searches over budget | queries with p95 "
             "over budget | deadline hits | queries/s | nDCG@10 seq / conc |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        lat = r["concurrent_latency_ms"]
        lines.append(f"| {r['label']} | {r['identical_top10']}/{r['searches']} | {lat['p50']} | {lat['p95']} | "
                     f"{lat['max']} | {r['searches_over_budget']} | {r.get('queries_with_p95_over_budget', '')} | "
                     f"{r['deadline_hits']} | {r['queries_per_s']} | {r['ndcg10_sequential']} / "
                     f"{r['ndcg10_concurrent_mean']} |")
    main = report["results"][0]
    chosen = ", ".join(f"{name} ×{count}" for name, count in sorted(main["configs_chosen"].items(),
                                                                   key=lambda kv: -kv[1]))
    lines += ["", f"Searches whose ranking differs without a deadline cut (here or in the sequential pass): "
              f"{main['differing_without_a_deadline_cut']}.",
              f"Configurations the controller chose under admission: {chosen}.",
              f"Reranker budget (share): {main['rerank_budget_ms']} ms. The same model planned for one caller "
              f"(the whole budget) scores nDCG@10 {report['alone']['ndcg10']} alone.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
