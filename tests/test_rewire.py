"""Rewiring: DynaBERT's head/neuron importance, and a permutation that leaves the full network unchanged."""
from __future__ import annotations

import warnings

import pytest
import torch

import rankshrink
from conftest import shared_path
from rankshrink.model import UninitializedWeightsWarning, head_neuron_importance, listwise_kl, rewire
from test_model_fixtures import pairs, spread_scores, tiny_dir  # noqa: F401


def load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UninitializedWeightsWarning)
        return rankshrink.load_model(path)


def listwise_batches(model, groups: int = 3, candidates: int = 4, seed: int = 0):
    """[queries, candidates, length] token tensors + [queries, candidates] targets, as training would feed."""
    generator = torch.Generator().manual_seed(seed)
    queries, passages = pairs(groups * candidates)
    batch = model.tokenize(queries, passages, max_length=32)
    shaped = {key: value.reshape(groups, candidates, -1) for key, value in batch.items()}
    shaped["targets"] = torch.randn(groups, candidates, generator=generator)
    return [shaped, {key: value.flip(0) for key, value in shaped.items()}]


def test_importance_is_the_mask_gradient_magnitude(tiny_dir):
    model = load_quietly(tiny_dir)
    batches = listwise_batches(model)
    importance = head_neuron_importance(model, batches, progress=False)
    assert importance.heads.shape == (4, 4) and importance.neurons.shape == (4, 64)
    assert importance.batches == 2
    assert (importance.heads > 0).all() and (importance.neurons >= 0).all() and importance.neurons.sum() > 0
    assert all(parameter.grad is None for parameter in model.parameters())
    # by hand for the first batch: |d loss / d head_mask|
    head_mask = torch.ones(4, 4, requires_grad=True)
    first = batches[0]
    out = model(first["input_ids"].reshape(-1, first["input_ids"].shape[-1]),
                first["attention_mask"].reshape(-1, first["input_ids"].shape[-1]),
                first["token_type_ids"].reshape(-1, first["input_ids"].shape[-1]), head_mask=head_mask)
    listwise_kl(out.score.reshape(3, 4), first["targets"]).backward()
    alone = head_neuron_importance(model, batches[:1], progress=False)
    assert torch.allclose(alone.heads, head_mask.grad.abs(), atol=1e-6)


def test_rewiring_leaves_the_full_network_unchanged_and_sorts_importance(tiny_dir):
    model = load_quietly(tiny_dir)
    queries, passages = pairs(12)
    batch = model.tokenize(queries, passages)
    with torch.no_grad():
        before = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], exits="all")
    narrow_before = model.score(queries, passages, width=0.5)
    importance = head_neuron_importance(model, listwise_batches(model), progress=False)
    rewire(model, importance)
    with torch.no_grad():
        after = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], exits="all")
    assert (after.score - before.score).abs().max() <= 1e-5
    for layer in before.exit_scores:
        assert (after.exit_scores[layer] - before.exit_scores[layer]).abs().max() <= 1e-5
    # the narrow network now keeps the important half, so it computes something else
    assert not torch.allclose(model.score(queries, passages, width=0.5), narrow_before, atol=1e-4)
    # importance measured again is in descending order, and the record maps positions to original indices
    again = head_neuron_importance(model, listwise_batches(model), progress=False)
    assert torch.allclose(again.heads, importance.heads.gather(1, torch.tensor(model.rewiring["head_order"])),
                          rtol=1e-4, atol=1e-6)
    assert (again.heads[:, :-1] >= again.heads[:, 1:] - 1e-6).all()
    assert sorted(model.rewiring["neuron_order"][0]) == list(range(64))


def test_rewiring_twice_composes_the_recorded_order(tiny_dir):
    model = load_quietly(tiny_dir)
    first = head_neuron_importance(model, listwise_batches(model, seed=1), progress=False)
    rewire(model, first)
    second = head_neuron_importance(model, listwise_batches(model, seed=2), progress=False)
    order_one = model.rewiring["head_order"]
    rewire(model, second)
    local = torch.argsort(second.heads, dim=1, descending=True, stable=True).tolist()
    assert model.rewiring["head_order"] == [[one[i] for i in two] for one, two in zip(order_one, local)]
    with pytest.raises(ValueError, match="importance shapes"):
        rewire(model, type(first)(first.heads[:2], first.neurons, 1))


def test_rewiring_minilm_on_dl21_keeps_full_scores(shared):
    """Real weights, real (training-split) queries and passages, graded labels as targets."""
    from rankshrink.data import open_collection, read_qrels, read_topics

    dl21 = shared_path("trec-dl", "dl21")
    model = spread_scores(load_quietly(shared_path("models", "all-MiniLM-L6-v2")))
    topics, qrels = read_topics(dl21 / "topics.tsv"), read_qrels(dl21 / "qrels.txt")
    collection = open_collection(dl21 / "passages.jsonl")
    batches = []
    for qid in [qid for qid in qrels if qid in topics][:2]:
        judged = sorted(qrels[qid].items(), key=lambda item: -item[1])
        chosen = judged[:3] + judged[-3:]
        docids = [docid for docid, _ in chosen if docid in collection][:6]
        batch = model.tokenize([topics[qid]] * len(docids), collection.texts(docids), max_length=64)
        batch = {key: value[None] for key, value in batch.items()}
        batch["targets"] = torch.tensor([[float(qrels[qid][d]) for d in docids]])
        batches.append(batch)
    scored = [(qid, docid) for qid in list(qrels)[2:5] for docid in [d for d in qrels[qid] if d in collection][:2]]
    queries = [topics[qid] for qid, _ in scored]
    texts = collection.texts([docid for _, docid in scored])
    before = model.score(queries, texts, max_length=64)
    assert before.std() > 0.1
    rewire(model, head_neuron_importance(model, batches, progress=False))
    assert (model.score(queries, texts, max_length=64) - before).abs().max() <= 1e-5
