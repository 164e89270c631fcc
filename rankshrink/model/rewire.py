"""Rewiring (DynaBERT §3.1): put the most important attention heads and FFN neurons first, so that the
narrow sub-networks (which keep the *first* heads and neurons) keep what matters.

Importance of a head (a neuron) is the magnitude of the gradient of a ranking loss with respect to a mask
multiplying that head's output (that neuron's activation), summed over batches of (query, passage) pairs.
Permuting heads and neurons leaves the full network's function unchanged.

>>> imp = head_neuron_importance(model, batches)   # batches: dicts of token tensors + "targets"  # doctest: +SKIP
>>> rewire(model, imp)                              # in place; the order is kept in model.rewiring  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dynabert import DynamicCrossEncoder

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def listwise_kl(scores: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(targets / T) ‖ softmax(scores / T)) over the last dimension (one list per row; a 1-D
    batch is one list). Targets may be teacher scores or graded labels."""
    if scores.dim() == 1:
        scores, targets = scores[None], targets[None]
    teacher = F.log_softmax(targets.float() / temperature, dim=-1)
    student = F.log_softmax(scores.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


@dataclass
class Importance:
    """Accumulated |∂loss/∂mask|: ``heads`` [num_layers, num_heads], ``neurons`` [num_layers, intermediate_size]."""

    heads: torch.Tensor
    neurons: torch.Tensor
    batches: int


def head_neuron_importance(model: DynamicCrossEncoder, batches: Iterable[Mapping[str, torch.Tensor]],
                           loss: Loss = listwise_kl, *, progress: bool = True) -> Importance:
    """DynaBERT's importance of every head and FFN neuron, at full width and depth, dropout off.

    Each batch is a mapping with ``input_ids`` and ``attention_mask`` (optionally ``token_type_ids``) of
    shape [..., length] and ``targets`` of shape [...] (labels or teacher scores): e.g. [queries, candidates,
    length] and [queries, candidates] for listwise losses. Scores come back in the targets' shape and go to
    ``loss(scores, targets)``. The model's parameters get no gradients.
    """
    config = model.config
    parameter = next(model.parameters())
    head_mask = torch.ones(config.num_layers, config.num_heads, dtype=parameter.dtype, device=parameter.device,
                           requires_grad=True)
    neuron_mask = torch.ones(config.num_layers, config.intermediate_size, dtype=parameter.dtype,
                             device=parameter.device, requires_grad=True)
    heads = torch.zeros(config.num_layers, config.num_heads, dtype=torch.float64)
    neurons = torch.zeros(config.num_layers, config.intermediate_size, dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc="importance", unit="batch", disable=not progress):
            input_ids = batch["input_ids"].to(parameter.device)
            length = input_ids.shape[-1]
            token_type_ids = batch.get("token_type_ids")
            out = model(input_ids.reshape(-1, length),
                        batch["attention_mask"].to(parameter.device).reshape(-1, length),
                        None if token_type_ids is None else token_type_ids.to(parameter.device).reshape(-1, length),
                        head_mask=head_mask, neuron_mask=neuron_mask)
            targets = batch["targets"].to(parameter.device)
            value = loss(out.score.reshape(targets.shape), targets)
            head_grad, neuron_grad = torch.autograd.grad(value, [head_mask, neuron_mask])
            heads += head_grad.detach().abs().double().cpu()
            neurons += neuron_grad.detach().abs().double().cpu()
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no batches: importance needs at least one batch of (query, passage) pairs")
    return Importance(heads.float(), neurons.float(), count)


def rewire(model: DynamicCrossEncoder, importance: Importance) -> DynamicCrossEncoder:
    """Reorder every layer's heads and FFN neurons by descending importance, in place.

    The full network computes the same function (heads and neurons are summed, so their order does not
    matter); the order applied, as original indices, is composed into ``model.rewiring`` and saved with
    the model. Returns ``model``.
    """
    config = model.config
    expected = ((config.num_layers, config.num_heads), (config.num_layers, config.intermediate_size))
    if (tuple(importance.heads.shape), tuple(importance.neurons.shape)) != expected:
        raise ValueError(f"importance shapes {list(importance.heads.shape)}, {list(importance.neurons.shape)} "
                         f"do not match the model's {list(expected[0])}, {list(expected[1])}")
    head_orders, neuron_orders = [], []
    size = config.head_size
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            head_order = torch.argsort(importance.heads[index], descending=True, stable=True)
            neuron_order = torch.argsort(importance.neurons[index], descending=True, stable=True)
            attention = layer.attention
            qkv_rows = (head_order[:, None] * 3 * size + torch.arange(3 * size)).reshape(-1)  # [q k v] per head
            attention.qkv.weight.copy_(attention.qkv.weight[qkv_rows])
            attention.qkv.bias.copy_(attention.qkv.bias[qkv_rows])
            columns = (head_order[:, None] * size + torch.arange(size)).reshape(-1)
            attention.output.weight.copy_(attention.output.weight[:, columns])
            layer.ffn.up.weight.copy_(layer.ffn.up.weight[neuron_order])
            layer.ffn.up.bias.copy_(layer.ffn.up.bias[neuron_order])
            layer.ffn.down.weight.copy_(layer.ffn.down.weight[:, neuron_order])
            head_orders.append(head_order.tolist())
            neuron_orders.append(neuron_order.tolist())
    if model.rewiring:  # compose with an earlier rewiring, so the record always maps to the original order
        head_orders = [[old[i] for i in new] for old, new in zip(model.rewiring["head_order"], head_orders)]
        neuron_orders = [[old[i] for i in new] for old, new in zip(model.rewiring["neuron_order"], neuron_orders)]
    model.rewiring = {"head_order": head_orders, "neuron_order": neuron_orders}
    return model
