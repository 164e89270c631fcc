"""The distillation losses, each over one list of candidates per row.

- ``listwise_kl``: KL(teacher ‖ student) between softmaxes at a temperature (TinyBERT's soft labels, in
  the listwise form rankers use); defined in ``model.rewire`` where importance needs it too.
- ``listwise_ce``: cross-entropy against the graded labels turned into a distribution (hard labels).
- ``hidden_mse``: mean squared error between hidden states of matching layers (TinyBERT's
  intermediate-layer loss), ignoring padding.
- ``list_offset``: the squared gap between two score lists' means. A listwise KL leaves a score's offset
  free; exit heads also need the final head's, since the engine ranks exited documents by their exit
  scores among the final scores of the rest.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..model.rewire import listwise_kl

__all__ = ["hidden_mse", "list_offset", "listwise_ce", "listwise_kl"]


def listwise_ce(scores: torch.Tensor, grades: torch.Tensor, label_temperature: float = 0.5) -> torch.Tensor:
    """Cross-entropy of softmax(scores) against softmax(grades / label_temperature): a list with one
    grade-3 passage puts nearly all target mass on it; ties share it."""
    if scores.dim() == 1:
        scores, grades = scores[None], grades[None]
    target = F.softmax(grades.float() / label_temperature, dim=-1)
    return -(target * F.log_softmax(scores.float(), dim=-1)).sum(-1).mean()


def hidden_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
               attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of layers of the MSE between hidden states [batch, length, hidden], real tokens only."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student hidden states but {len(teacher)} teacher ones")
    weight = attention_mask.to(torch.float32)[..., None]
    tokens = weight.sum() * student[0].shape[-1]
    total = sum(((s.float() - t.float()) ** 2 * weight).sum() / tokens for s, t in zip(student, teacher))
    return total / len(student)


def list_offset(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(mean(scores) - mean(target))², per list (the last dimension), averaged over lists."""
    return (scores.float().mean(-1) - target.float().mean(-1)).pow(2).mean()
