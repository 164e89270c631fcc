"""Distillation, stage by stage, into one width/depth-adaptive cross-encoder with self-distilled exits.

1. **full** (Simplified TinyBERT's one step): the full network learns from the teacher's scores over each
   list (listwise KL at a temperature: soft labels) and from the graded labels where there are any
   (listwise CE: hard labels). Held-out queries choose the best step (or ``keep: last``, the end's). The result is
   the fine-tuned teacher the next stages distil from.
2. **rewire** (DynaBERT): heads and FFN neurons reordered by importance — |∂loss/∂mask| over training
   lists — so narrow sub-networks keep the important ones. The full network's function is unchanged.
3. **width** (DynaBERT stage 1): each step runs the full network, the narrowest width and random others;
   every sub-network learns the scores (listwise KL) and hidden states (MSE, TinyBERT's intermediate-layer
   loss) of the network as the full stage left it, frozen (``losses.reference: frozen``, the default; with
   ``inplace``, of the full network, which keeps learning from teacher and labels).
4. **depth** (DynaBERT stage 2): the same over widths × depths, plus FastBERT's self-distillation: every
   exit head learns the final layer's scores of the sub-network it runs in, so all layers share one scale.
   With ``depth_layers: prefix`` a depth below 1 is the first layers and ends at an exit head: the stage
   starts fresh heads reading ``exit_pooling`` and trains them with the network, matching each list's mean
   as well (heads and depths are then on the final head's scale); no exits stage follows.
5. **exits** (FastBERT, optional): fresh exit heads reading ``exit_pooling`` learn the same on the frozen
   network. Its checkpoints are keyed by the network's stages only, so changing this stage does not
   retrain the network.

Checkpoints every ``checkpoint_every`` steps make a run resumable (``rankshrink train`` again picks up where
it stopped), keyed by the recipe and by what it trains on (the base's files, every list and its teacher scores:
a data file changed in place starts afresh); a fixed seed gives the same model; each stage logs JSON lines to
``<cache>/logs/<checkpoint key>/<stage>.jsonl``, so two recipes sharing a cache keep their own logs.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import (atomic_write, file_sha256, json_digest, open_collection, read_qrels, read_run, read_topics,
                    trec_order, write_run)
from ..errors import InputError
from ..metrics import evaluate
from ..model import DynamicCrossEncoder, head_neuron_importance, load_model, rewire, save_model
from .averaging import WeightAverage
from .batches import forward_in_slices, length_sorted
from .groups import TrainingGroup, build_groups, sample_list, split_queries
from .pseudo import pseudo_queries
from .losses import hidden_mse, list_offset, listwise_ce, listwise_kl
from .recipe import STAGES, StageSpec, TrainSpec
from .teacher import model_fingerprint, score_groups, teacher_from_spec

TRAINED_STAGES = tuple(stage for stage in STAGES if stage != "rewire")   # the stages with steps
EXIT_STAGE_KEYS = ("exits", "exit_pooling")   # what the exits stage reads and the network's stages do not
HEAD_LR_SCALE = 10
DEV_CONFIGS = ((1.0, 1.0), (0.5, 1.0), (0.5, 0.5), (0.25, 0.5))


class Trainer:
    """Runs a ``TrainSpec`` end to end: data → teacher scores → the four stages → a model directory."""

    def __init__(self, spec: TrainSpec, progress: bool = True, log: Callable[[str], None] = print):
        self.spec, self.progress, self.log = spec, progress, log
        recipe = asdict(spec)
        if spec.losses.exit_offset is None:   # defaults left out: recipes keep the fingerprints they had before them
            del recipe["losses"]["exit_offset"]
        for key in ("output", "checkpoint_every", "smoke"):   # they do not change what is trained
            del recipe[key]
        if spec.micro_batches == 1:   # one padded batch a list, as every recipe trained before the key
            del recipe["micro_batches"]
        if spec.dropout is None:   # the base's, as every recipe trained before the key
            del recipe["dropout"]
        for data in recipe["data"]:
            if data["repeat"] == 1:
                del data["repeat"]
        for stage in TRAINED_STAGES:
            if recipe.get(stage) and recipe[stage]["keep"] == "best":
                del recipe[stage]["keep"]
        network = dict(recipe)
        if spec.depth_layers == "spread":
            del recipe["depth_layers"], network["depth_layers"]
            apart = EXIT_STAGE_KEYS
            network["losses"] = {key: value for key, value in recipe["losses"].items() if key != "exit_offset"}
        else:   # a prefix depth stage trains the exit heads with the network: exit_pooling is the network's too
            apart = ("exits",)
        self.fingerprint = json_digest({key: value for key, value in network.items() if key not in apart}, 16)
        self.recipe_fingerprint = json_digest(recipe, 16)
        self.cache = Path(spec.cache)
        self.checkpoint_dir = self.cache / "checkpoints" / self.fingerprint   # + the inputs' digest, in run()
        self.log_dir = self.cache / "logs" / self.fingerprint   # + the inputs' digest, in run()
        self.autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if spec.dtype == "bf16" else nullcontext())

    # -- data -----------------------------------------------------------------------------------

    def load_data(self) -> tuple[list[TrainingGroup], list[TrainingGroup]]:
        """Training and held-out groups of every data set, each once, teacher-scored (through the cache). Data
        sets with pseudo-queries come last: their queries never come from the held-out queries' candidates."""
        train, held_out = [], []
        run_files: dict[str, dict[str, Path]] = {}
        for data in sorted(self.spec.data, key=lambda data: data.pseudo_queries is not None):
            qrels = read_qrels(data.qrels) if data.qrels else None
            collection = open_collection(data.collection)
            if data.pseudo_queries is None:
                topics = read_topics(data.topics)
            else:
                topics = self._pseudo_topics(data, collection, {docid for group in held_out for docid in group.docids})
            run_files[data.name] = {name: Path(path) for name, path in data.runs.items()}
            if data.search:
                run_files[data.name][data.search.name] = self._searched_run(data, topics, qrels)
            runs = [read_run(path) for path in run_files[data.name].values()]
            qids = sorted({qid for run in runs for qid in run})
            if data.queries is not None:
                qids = qids[: data.queries]
            if data.candidates is not None:
                runs = [{qid: dict(trec_order(docs)[: data.candidates]) for qid, docs in run.items()} for run in runs]
            judged = [qid for qid in qids if qid in qrels] if qrels else []   # the held-out queries need labels
            if data.held_out and not judged:
                raise InputError(f"data set {data.name!r}: held_out {data.held_out} needs judged queries (qrels "
                                 f"that judge some of its queries)")
            train_qids, held_qids = split_queries(judged, data.held_out, self.spec.seed, f"data set {data.name!r}: ") \
                if judged else (qids, [])
            train_qids = sorted(set(train_qids) | (set(qids) - set(judged)))
            train += build_groups(topics, runs, collection, qrels=qrels, queries=train_qids, source=data.name)
            if held_qids:
                held_out += build_groups(topics, runs, collection, qrels=qrels, queries=held_qids, source=data.name)
        if not self.spec.losses.teacher_kl:   # labels only (an ablation): unlabelled lists teach nothing
            unlabelled = sum(group.labels is None for group in train)
            train = [group for group in train if group.labels is not None]
            if unlabelled:
                self.log(f"losses.teacher_kl is 0: {unlabelled} training queries without labels left out")
            if not train:
                raise InputError("losses.teacher_kl is 0 and no training query has labels (qrels)")
        elif self.spec.teacher or any(data.teacher for data in self.spec.data):
            self._score_with_teachers(train, run_files)
        elif self.spec.losses.teacher_kl:
            raise InputError("losses.teacher_kl is set but the recipe has no teacher")
        return train, held_out

    def stage_lists(self, train: Sequence[TrainingGroup], stage: str) -> list[TrainingGroup]:
        """``train`` as an epoch of ``stage`` draws it: each list as many times as its data set's ``repeat``
        says for the stage, its copies side by side."""
        repeats = {data.name: data.repeat_in(stage) for data in self.spec.data}
        return [group for group in train for _ in range(repeats[group.source])]

    def _score_with_teachers(self, train: list[TrainingGroup], run_files: dict[str, dict[str, Path]]) -> None:
        """Each data set's lists are scored by its own teacher (``data.teacher``) or else the recipe's."""
        teacher_of = {data.name: data.teacher or self.spec.teacher for data in self.spec.data}
        by_teacher: dict[str, tuple[dict, list[TrainingGroup]]] = {}
        for group in train:
            spec = teacher_of[group.source]
            if spec is None:
                raise InputError(f"data set {group.source!r} has no teacher: give train.teacher or its own teacher")
            by_teacher.setdefault(json_digest(spec), (spec, []))[1].append(group)
        for spec, groups in by_teacher.values():
            teacher = teacher_from_spec(spec, run_files)
            sources = ", ".join(dict.fromkeys(group.source for group in groups))
            self.log(f"teacher scores for {len(groups)} training queries of {sources} ({teacher.identity()['kind']})")
            score_groups(teacher, groups, self.cache / "teacher")

    def _pseudo_topics(self, data, collection, exclude: set[str]) -> dict[str, str]:
        spec = data.pseudo_queries
        topics = pseudo_queries(collection, spec.count, f"{self.spec.seed}-{data.name}", min_words=spec.min_words,
                                max_words=spec.max_words, exclude=exclude, prefix=f"{data.name}-")
        self.log(f"{data.name}: {len(topics)} pseudo-queries cut from {data.collection} "
                 f"({len(exclude)} held-out candidates excluded)")
        if not topics:
            raise InputError(f"{data.name}: no passage of {data.collection} is long enough for a pseudo-query")
        return topics

    def _searched_run(self, data, topics: dict[str, str], qrels) -> Path:
        """``data.search``'s BM25 candidates for the data set's queries (the judged ones when there are qrels,
        the first ``data.queries`` by qid), searched once and cached as a TREC run keyed by what made it. Without
        an index, the data set's collection is indexed once into the cache."""
        search = data.search
        qids = sorted(qrels) if qrels is not None else sorted(topics)
        if data.queries is not None:
            qids = qids[: data.queries]
        missing = [qid for qid in qids if qid not in topics]
        if missing:
            raise InputError(f"{data.name}: judged query {missing[0]!r} has no topic in {data.topics}")
        index = search.index or self._collection_index(data)
        queries = {qid: topics[qid] for qid in qids}
        key = json_digest([asdict(search), str(index), queries], 16)
        path = self.cache / "runs" / f"{data.name}-{search.name}-{key}.trec"
        if not path.is_file():
            from ..firststage import BM25

            options = {name: value for name, value in (("k1", search.k1), ("b", search.b)) if value is not None}
            self.log(f"{data.name}: BM25 top {search.k} from {index} for {len(qids)} queries")
            write_run(BM25(str(index), **options).batch_search(queries, k=search.k), path, tag=search.name)
        return path

    def _collection_index(self, data) -> Path:
        """A Lucene index of ``data.collection`` in the cache, built on first use. A file is keyed by its content,
        so a copy or a new modification time (a fresh checkout, a synced share) finds the index it already has."""
        from ..firststage.bm25 import build_index

        source = Path(data.collection)
        identity = {"sha256": file_sha256(source)} if source.is_file() else {"irds": str(data.collection)}
        index = self.cache / "indexes" / f"{data.name}-{json_digest(identity, 16)}"
        if not index.is_dir():
            self.log(f"{data.name}: indexing {data.collection} for BM25 into {index}")
            index.parent.mkdir(parents=True, exist_ok=True)
            build_index(data.collection, index, progress=self.progress)   # keeps one a concurrent trainer published
        return index

    # -- the whole run --------------------------------------------------------------------------

    def run(self) -> Path:
        started = time.time()
        torch.manual_seed(self.spec.seed)
        train, held_out = self.load_data()
        base = model_fingerprint(self.spec.base)
        inputs_digest = self._inputs_digest(base, train, held_out)
        self.checkpoint_dir = self.cache / "checkpoints" / f"{self.fingerprint}-{inputs_digest}"
        self.log_dir = self.cache / "logs" / self.checkpoint_dir.name
        older = sorted(path.name for path in self.checkpoint_dir.parent.glob("*") if "-" not in path.name)
        if older:
            self.log(f"{self.checkpoint_dir.parent}: checkpoints {', '.join(older)} predate keys that cover the "
                     f"training data; they are not reused (delete them to free the space)")
        state = self._read_checkpoint()
        before_exits = self.checkpoint_dir / "before-exits"
        exits_changed = state is not None and state.get("recipe") != self.recipe_fingerprint
        if exits_changed and "depth" in state["done"] and before_exits.is_dir():   # as the depth stage left it
            state = {**state, "model_dir": str(before_exits)}
        # A hub base loads the commit the inputs' digest names, even if main has moved on since
        model = load_model(state["model_dir"]) if state else load_model(self.spec.base, revision=base.get("revision"))
        for measured in ("profile", "calibration"):   # a profiled base's: measured on another network
            model.metadata.pop(measured, None)
        model.config = replace(model.config, widths=tuple(self.spec.widths), depths=tuple(self.spec.depths),
                               depth_layers=self.spec.depth_layers)
        if self.spec.dropout is not None:
            model.set_dropout(self.spec.dropout)
        done = self.done = set(state["done"]) if state else set()
        if exits_changed:   # the exits stage changed: run it again (or not at all)
            done.discard("exits")
            state["summary"]["dev"].pop("exits", None)
            if state.get("stage") == "exits":
                state = {key: value for key, value in state.items() if key != "stage"}
        summary: dict[str, Any] = state["summary"] if state else {"dev": {}}
        for stage in STAGES:
            if stage in done or (stage == "exits" and not self.spec.exits.steps):   # optional: off unless given
                continue
            if stage == "rewire":
                if self.spec.rewire:
                    self._rewire(model, self.stage_lists(train, stage))
            else:
                stage_spec: StageSpec = getattr(self.spec, stage)
                if stage_spec.steps > 0:
                    resume = state if state and state.get("stage") == stage else None
                    if stage == "exits" and not resume:
                        save_model(model, before_exits)
                    if stage in ("width", "depth") and self.spec.losses.reference == "frozen":
                        self.reference = self._frozen_reference(model)
                    self._train_stage(stage, stage_spec, model, self.stage_lists(train, stage), held_out, resume,
                                      summary)
            if held_out:
                summary["dev"][stage] = (self.exit_dev_scores(model, held_out) if stage == "exits"
                                         else self.dev_scores(model, held_out))
                self.log(f"after {stage}: held-out nDCG@10 {summary['dev'][stage]}")
            done.add(stage)
            state = None
            self._write_checkpoint(model, {"done": sorted(done), "summary": summary})
        model.metadata["training"] = {
            "base": self.spec.base, "teacher": self.spec.teacher, "recipe_fingerprint": self.fingerprint,
            "data_set_teachers": {data.name: data.teacher for data in self.spec.data if data.teacher},
            "steps": {stage: getattr(self.spec, stage).steps for stage in TRAINED_STAGES},
            "exit_pooling": model.config.exit_pooling,
            "rewired": self.spec.rewire, "held_out_ndcg@10": summary["dev"],
            "selected_step": summary.get("selected_step", {}),
            # Two runs of one recipe that differ here saw different lists or teacher scores; that agree, trained
            # differently from the same inputs.
            "inputs_digest": inputs_digest, "logs": str(self.log_dir),
            "train_queries": len(train), "held_out_queries": len(held_out),
            "elapsed_s_this_run": round(time.time() - started, 1),
        }
        save_model(model, self.spec.output)
        self.log(f"model written to {self.spec.output} ({time.time() - started:.0f} s)")
        return Path(self.spec.output)

    def _inputs_digest(self, base: dict[str, str], train: Sequence[TrainingGroup],
                       held_out: Sequence[TrainingGroup]) -> str:
        """What the network learns from besides the recipe: the base model's weights (``base``, its
        ``model_fingerprint``) and every list (query, candidates, passages, labels, teacher scores). A data file
        or a teacher changed in place then starts new checkpoints instead of resuming ones made from the old."""
        digest = hashlib.sha256((base.get("files_sha256") or f"{base['model']}@{base['revision']}").encode())
        for group in [*train, *held_out]:
            digest.update(json.dumps([group.key, group.query, group.docids, group.texts, group.labels]).encode())
            if group.teacher is not None:
                digest.update(np.ascontiguousarray(group.teacher, dtype=np.float32).tobytes())
        return digest.hexdigest()[:16]

    # -- stages ---------------------------------------------------------------------------------

    def _frozen_reference(self, model: DynamicCrossEncoder) -> DynamicCrossEncoder:
        """The network as the full stage (and rewiring) left it, frozen: what width and depth stages distill
        from. Saved with the checkpoints, so a resumed run distills from the same one."""
        directory = self.checkpoint_dir / "reference"
        if not (directory / "rankshrink.json").is_file():
            save_model(model, directory)
        reference = load_model(directory).eval()
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        return reference

    def _rewire(self, model: DynamicCrossEncoder, groups: Sequence[TrainingGroup]) -> None:
        rng = random.Random(self.spec.seed + 1)
        lists = [rng.choice(groups) for _ in range(self.spec.rewire_lists)]

        def batches():
            for group in lists:
                chosen = sample_list(group, self.spec.list_size, rng)
                batch = self._tokenize(model, group, chosen)
                targets = (torch.as_tensor(group.teacher[chosen]) if group.teacher is not None
                           else torch.as_tensor(group.graded_labels()[chosen]))
                yield {**batch, "targets": targets}

        importance = head_neuron_importance(model, batches(), progress=self.progress)
        rewire(model, importance)

    def _train_stage(self, stage: str, stage_spec: StageSpec, model: DynamicCrossEncoder,
                     groups: Sequence[TrainingGroup], held_out: Sequence[TrainingGroup],
                     resume: dict | None, summary: dict) -> None:
        from tqdm.auto import tqdm

        spec = self.spec
        rng = random.Random(f"{spec.seed}-{stage}")
        torch.manual_seed(rng.randrange(2**31))  # dropout: the same whether or not earlier stages ran in this process
        with_network = stage == "depth" and spec.depth_layers == "prefix"   # heads trained beside the network
        if (stage == "exits" or with_network) and not resume:
            model.new_exit_heads(spec.exit_pooling)
        for parameter in model.parameters():
            parameter.requires_grad_(stage != "exits")
        for parameter in model.exits.parameters():
            parameter.requires_grad_(True)
        if spec.freeze_word_embeddings:
            model.embeddings.word.weight.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        parameter_groups: list = trainable
        if with_network:
            # Fresh heads beside a trained network learn faster than it: else their first, random scores steer it.
            heads = {id(p) for p in model.exits.parameters()}
            parameter_groups = [{"params": [p for p in trainable if id(p) not in heads]},
                                {"params": [p for p in trainable if id(p) in heads],
                                 "lr": stage_spec.lr * HEAD_LR_SCALE}]
        optimizer = torch.optim.AdamW(parameter_groups, lr=stage_spec.lr, weight_decay=0.01)
        warmup = max(1, int(stage_spec.warmup * stage_spec.steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / stage_spec.steps))
        start_step, best, order = 0, None, []
        average = WeightAverage(trainable, stage_spec.average) if stage_spec.average else None
        if resume:
            start_step, saved = resume["step"], Path(resume["state_dir"])
            _load_optimizer(optimizer, schedule, saved)
            if average is not None:
                average.load(saved / "average.safetensors")
            rng.setstate(_tuples(resume["rng"]))
            torch.set_rng_state(_load_torch_rng(saved))
            best = resume.get("best")
            order = list(resume["order"])
        configs = self._configs(stage)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_dir / f"{stage}.jsonl"
        kept = _logged_until(log_file, start_step) if resume else []
        with atomic_write(log_file) as out:    # a resumed stage logs the steps after its checkpoint once
            out.writelines(kept)
        model.train(stage != "exits")   # the exits stage: the frozen network without dropout, the heads with it
        model.exits.train()
        bar = tqdm(range(start_step, stage_spec.steps), desc=stage, unit="step", disable=not self.progress,
                   initial=start_step, total=stage_spec.steps)
        started = time.time()
        for step in bar:
            if not order:
                order = list(range(len(groups)))
                rng.shuffle(order)
            group = groups[order.pop()]
            chosen = sample_list(group, spec.list_size, rng)
            batch = self._tokenize(model, group, chosen)
            if spec.micro_batches > 1:
                by_length, batch = length_sorted(batch)
                chosen = [chosen[i] for i in by_length]
            picked = [configs[0], configs[-1]] + rng.sample(configs[1:-1], min(len(configs) - 2, stage_spec.configs - 2)) \
                if len(configs) > 2 else configs
            with self.autocast:
                parts = self._step_losses(stage, model, batch, group, chosen, picked)
            loss = sum(parts.values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update()
            loss_value = float(loss.detach())
            record = {"step": step + 1, "loss": loss_value,
                      **{k: round(float(torch.as_tensor(v).detach()), 5) for k, v in parts.items()},
                      "lr": schedule.get_last_lr()[0], "elapsed_s": round(time.time() - started, 2)}
            bar.set_postfix(loss=f"{loss_value:.3f}")
            done_steps = step + 1
            if stage == "full" and held_out and stage_spec.eval_every and done_steps % stage_spec.eval_every == 0:
                if average is not None:   # for comparison; the average is what is kept
                    record["held_out_ndcg@10_unaveraged"] = self._full_dev_score(model, held_out)
                with average.applied() if average is not None else nullcontext():
                    record["held_out_ndcg@10"] = self._full_dev_score(model, held_out)
                    if stage_spec.keep == "best" and (best is None or record["held_out_ndcg@10"] > best["ndcg"]):
                        best_dir = self._fresh_directory("best-")   # the checkpoint's best stays till the next
                        save_model(model, best_dir)
                        best = {"ndcg": record["held_out_ndcg@10"], "step": done_steps, "dir": str(best_dir)}
                model.train()
            with open(log_file, "a") as out:
                out.write(json.dumps(record) + "\n")
            if done_steps % spec.checkpoint_every == 0 and done_steps < stage_spec.steps:
                self._write_checkpoint(model, {"done": sorted(self.done), "summary": summary,
                                               "stage": stage, "step": done_steps, "rng": rng.getstate(),
                                               "order": order, "best": best}, optimizer, schedule, average)
        if average is not None:
            average.copy_to_model()
        if best is not None:
            final = self._full_dev_score(model, held_out)
            if best["ndcg"] > final:
                self.log(f"{stage}: keeping step {best['step']} (held-out nDCG@10 {best['ndcg']:.4f} > {final:.4f} "
                         f"at the end)")
                _copy_weights(load_model(best["dir"]), model)
            summary.setdefault("selected_step", {})[stage] = best["step"] if best["ndcg"] > final else stage_spec.steps
        elif stage == "full" and stage_spec.keep == "last":
            summary.setdefault("selected_step", {})[stage] = stage_spec.steps
        model.eval()

    def _configs(self, stage: str) -> list[tuple[float, float]]:
        """The (width, depth) pairs a stage trains, largest first and smallest last."""
        widths = sorted(self.spec.widths, reverse=True)
        if stage == "full":
            return [(1.0, 1.0)]
        if stage == "width":
            return [(width, 1.0) for width in widths]
        depths = sorted(self.spec.depths, reverse=True)
        return sorted(((w, d) for w in widths for d in depths), key=lambda c: -c[0] * c[1])

    def _step_losses(self, stage: str, model: DynamicCrossEncoder, batch: dict[str, torch.Tensor],
                     group: TrainingGroup, chosen: list[int], configs: Sequence[tuple[float, float]]
                     ) -> dict[str, torch.Tensor]:
        weights = self.spec.losses
        temperature = weights.temperature
        teacher = None if group.teacher is None else torch.as_tensor(group.teacher[chosen])
        grades = None if group.labels is None else torch.as_tensor(group.graded_labels()[chosen])
        with_exits = stage == "depth"
        # A prefix model's heads are its exits for good (no exits stage follows): they learn the final scale too.
        on_exit_scale = with_exits and self.spec.depth_layers == "prefix"
        with_hidden = stage in ("width", "depth") and weights.hidden_mse > 0
        parts: dict[str, torch.Tensor] = {}

        def add(name: str, weight: float, value: Callable[[], torch.Tensor]) -> None:
            if weight:
                parts[name] = parts.get(name, 0) + weight * value()

        if stage == "exits":
            return self._exit_losses(model, batch, grades, configs)
        full = None
        frozen = stage in ("width", "depth") and weights.reference == "frozen"
        if frozen:  # DynaBERT: every configuration, the full one too, learns from the frozen reference
            with torch.no_grad():
                full = self._forward(self.reference, batch, output_hidden_states=with_hidden)
        for width, depth in configs:
            out = self._forward(model, batch, width=width, depth=depth, exits="all" if with_exits else None,
                                output_hidden_states=with_hidden)
            if full is None:  # the first config is the full network: it learns from teacher and labels
                full = out
                if teacher is not None:
                    add("teacher_kl", weights.teacher_kl, lambda: listwise_kl(out.score, teacher, temperature))
                if grades is not None:
                    add("labels_ce", weights.labels_ce, lambda: listwise_ce(out.score, grades, weights.label_temperature))
            else:  # sub-networks learn from the full network (in place, or the frozen reference)
                target = full.score.detach()
                add("inplace_kl", weights.inplace_kl, lambda: listwise_kl(out.score, target, temperature))
                ends_at_exit_head = model.config.ends_at_exit_head(depth)
                if ends_at_exit_head:
                    add("inplace_offset", weights.inplace_kl, lambda: list_offset(out.score, target))
                if with_hidden:
                    matching = _matching_states(full, out, ends_at_final_head=not ends_at_exit_head)
                    add("hidden_mse", weights.hidden_mse,
                        lambda: hidden_mse(out.hidden_states[1:], matching, batch["attention_mask"]))
                if grades is not None:
                    add("sub_labels_ce", weights.sub_labels_ce,
                        lambda: listwise_ce(out.score, grades, weights.label_temperature))
            if with_exits and out.exit_scores:
                final = out.score.detach()
                add("exit_kl", weights.exit_kl / len(configs),
                    lambda: sum(listwise_kl(s, final, temperature) for s in out.exit_scores.values())
                    / len(out.exit_scores))
                if on_exit_scale:
                    add("exit_offset", self._exit_offset_weight() / len(configs),
                        lambda: sum(list_offset(s, final) for s in out.exit_scores.values()) / len(out.exit_scores))
                if grades is not None:
                    add("exit_labels_ce", weights.exit_labels_ce / len(configs),
                        lambda: sum(listwise_ce(s, grades, weights.label_temperature) for s in out.exit_scores.values())
                        / len(out.exit_scores))
        if not parts:
            raise InputError(f"stage {stage}: every loss weight that applies to this list is 0")
        return parts

    def _exit_offset_weight(self) -> float:
        weights = self.spec.losses
        return weights.exit_kl if weights.exit_offset is None else weights.exit_offset

    def _exit_losses(self, model: DynamicCrossEncoder, batch: dict[str, torch.Tensor], grades: torch.Tensor | None,
                     configs: Sequence[tuple[float, float]]) -> dict[str, torch.Tensor]:
        """FastBERT's self-distillation on the frozen network: in each configuration, every exit head learns
        that configuration's final scores — their distribution over the list (KL) and their offset, so that
        exited documents rank among the others on one scale — and the graded labels, if weighted."""
        weights = self.spec.losses
        parts: dict[str, torch.Tensor] = {}
        for width, depth in configs:
            with torch.no_grad():
                out = self._forward(model, batch, width=width, depth=depth, output_hidden_states=True)
            exits = [model.exit_score(layer, out.hidden_states[position + 1], batch["attention_mask"],
                                      batch["token_type_ids"])
                     for position, layer in enumerate(out.layers[:-1]) if model.has_exit(layer)]
            if not exits:
                continue
            final, share = out.score.float(), 1 / (len(configs) * len(exits))
            if weights.exit_kl:
                parts["exit_kl"] = parts.get("exit_kl", 0) + weights.exit_kl * share * sum(
                    listwise_kl(score, final, weights.temperature) for score in exits)
            if self._exit_offset_weight():
                parts["exit_offset"] = parts.get("exit_offset", 0) + self._exit_offset_weight() * share * sum(
                    list_offset(score, final) for score in exits)
            if weights.exit_labels_ce and grades is not None:
                parts["exit_labels_ce"] = parts.get("exit_labels_ce", 0) + weights.exit_labels_ce * share * sum(
                    listwise_ce(score, grades, weights.label_temperature) for score in exits)
        if not parts:
            raise InputError("stage exits: no exit head runs in the sampled configurations, or exit_kl, "
                             "exit_offset and exit_labels_ce are all 0")
        return parts

    def exit_dev_scores(self, model: DynamicCrossEncoder, groups: Sequence[TrainingGroup]) -> dict[str, float]:
        """nDCG@10 of each exit head of the full network on the held-out queries (every candidate exiting
        there), in bf16."""
        scorer = model.clone().to(torch.bfloat16).eval()
        qrels = _judged(groups)
        runs: dict[str, dict[str, dict[str, float]]] = {}
        with torch.inference_mode():
            for group in groups:
                batch = scorer.tokenize([group.query] * len(group.texts), group.texts, max_length=256)
                out = scorer(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], exits="all")
                for layer, scores in out.exit_scores.items():
                    runs.setdefault(f"exit-{layer + 1}", {})[group.qid] = dict(zip(group.docids, scores.float().tolist()))
        scores = evaluate(qrels, runs, ["ndcg@10"]).scores
        return {name: round(values["ndcg@10"], 4) for name, values in sorted(scores.items())}

    def _forward(self, network: DynamicCrossEncoder, batch: dict[str, torch.Tensor], **options):
        return forward_in_slices(network, batch, self.spec.micro_batches, **options)

    def _tokenize(self, model: DynamicCrossEncoder, group: TrainingGroup, chosen: Sequence[int]
                  ) -> dict[str, torch.Tensor]:
        return model.tokenize([group.query] * len(chosen), [group.texts[i] for i in chosen],
                              max_length=self.spec.max_length)

    # -- evaluation on held-out queries ---------------------------------------------------------

    def _full_dev_score(self, model: DynamicCrossEncoder, groups: Sequence[TrainingGroup]) -> float:
        return self.dev_scores(model, groups, configs=((1.0, 1.0),))["1.0x1.0"]

    def dev_scores(self, model: DynamicCrossEncoder, groups: Sequence[TrainingGroup],
                   configs: Sequence[tuple[float, float]] = DEV_CONFIGS) -> dict[str, float]:
        """nDCG@10 of reranking each held-out query's candidates, at each (width, depth), in bf16."""
        scorer = model.clone().to(torch.bfloat16).eval()
        qrels = _judged(groups)
        runs = {}
        for width, depth in configs:
            runs[f"{width}x{depth}"] = {
                group.qid: dict(zip(group.docids, scorer.score(group.query, group.texts, width=width, depth=depth,
                                                               max_length=256).tolist()))
                for group in groups}
        scores = evaluate(qrels, runs, ["ndcg@10"]).scores
        return {name: round(values["ndcg@10"], 4) for name, values in scores.items()}

    # -- checkpoints ----------------------------------------------------------------------------

    def _write_checkpoint(self, model: DynamicCrossEncoder, state: dict, optimizer=None, schedule=None,
                          average: WeightAverage | None = None) -> None:
        """Everything a resume reads goes to a fresh directory; then ``state.json``, rewritten in one rename,
        points at it. Interrupted anywhere, the checkpoint is the old one or the new one, whole."""
        saved = self._fresh_directory("state-")
        save_model(model, saved / "model")
        if optimizer is not None:
            from safetensors.torch import save_file

            _save_optimizer(optimizer, schedule, saved)
            save_file({"rng": torch.get_rng_state()}, str(saved / "torch_rng.safetensors"))
        if average is not None:
            average.save(saved / "average.safetensors")
        with atomic_write(self.checkpoint_dir / "state.json") as out:
            json.dump({**state, "state_dir": str(saved), "model_dir": str(saved / "model"),
                       "recipe": self.recipe_fingerprint}, out)
        best = (state.get("best") or {}).get("dir")
        for older in [*self.checkpoint_dir.glob("state-*"), *self.checkpoint_dir.glob("best-*")]:
            if str(older) not in (str(saved), best):   # older checkpoints', and what interrupted writes left
                shutil.rmtree(older, ignore_errors=True)

    def _fresh_directory(self, prefix: str) -> Path:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.checkpoint_dir))

    def _read_checkpoint(self) -> dict | None:
        path = self.checkpoint_dir / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        self.log(f"resuming from {self.checkpoint_dir} (done: {state['done']}"
                 + (f", {state['stage']} at step {state['step']}" if state.get("stage") else "") + ")")
        return state


def _logged_until(log_file: Path, step: int) -> list[str]:
    """The lines of a stage's log up to ``step`` (a line an interruption cut short is dropped)."""
    kept = []
    for line in log_file.read_text().splitlines(keepends=True) if log_file.is_file() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def _judged(groups: Sequence[TrainingGroup]) -> dict[str, dict[str, int]]:
    return {group.qid: {docid: label for docid, label in zip(group.docids, group.labels) if label is not None}
            for group in groups}


def _matching_states(full, sub, ends_at_final_head: bool) -> list[torch.Tensor]:
    """The full network's hidden states the sub-network's layers should match: the same physical layer,
    except, when both feed the final head, the sub-network's last layer, which matches the full network's last.
    (A prefix depth's last layer feeds its exit head and the full network's next layer: its own state.)"""
    full_by_layer = {layer: state for layer, state in zip(full.layers, full.hidden_states[1:])}
    states = [full_by_layer[layer].detach() for layer in sub.layers]
    if ends_at_final_head:
        states[-1] = full.hidden_states[-1].detach()
    return states


def _copy_weights(source: DynamicCrossEncoder, target: DynamicCrossEncoder) -> None:
    with torch.no_grad():
        target.load_state_dict(source.state_dict())
    target.rewiring = source.rewiring


def _tuples(value):
    """JSON turns the tuples of random.getstate() into lists; setstate needs tuples back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _save_optimizer(optimizer, schedule, directory: Path) -> None:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    with atomic_write(directory / "optimizer.json") as out:
        json.dump({"scalars": scalars, "param_groups": state["param_groups"],
                   "schedule": schedule.state_dict() if schedule else None}, out, default=str)


def _load_optimizer(optimizer, schedule, directory: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "optimizer.safetensors"))
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if schedule is not None and meta["schedule"]:
        schedule.load_state_dict(meta["schedule"])


def _load_torch_rng(directory: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(directory / "torch_rng.safetensors"))["rng"]
