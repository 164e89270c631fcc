"""Tiny random BERT cross-encoders for the model tests (imported by test_model*.py, test_rewire.py).

Weights are drawn wider than BERT's N(0, 0.02) so that scores differ by O(1) between pairs: an equality
check at 1e-5 then means something."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = ("the a of is what how cat dog sat on mat paris france capital city river water blue sky why does "
         "grass green light sun rain cloud fish swim bird fly tree leaf house door window red car road").split()

QUERIES = ["what is the capital of france", "why is the sky blue", "how does a fish swim", "cat"]
PASSAGES = ["paris is the capital city of france on a river", "the sky is blue because light",
            "a fish does swim in water", "the cat sat on the mat", "a red car on the road",
            "green grass and rain", "dog"]


def tiny_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(str(directory))  # reads vocab.txt (transformers 4 and 5)


def tiny_hf_cross_encoder(directory: Path, *, layers: int = 4, heads: int = 4, hidden: int = 32, ffn: int = 64,
                          seed: int = 0, act: str = "gelu"):
    """Save a random ``BertForSequenceClassification`` (1 label) + tokenizer to ``directory``; return it."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64,
                        num_labels=1, hidden_act=act)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm.weight" in name:
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.3 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def hf_scores(hf_model, tokenizer, queries, passages, max_length: int = 64) -> torch.Tensor:
    batch = tokenizer(queries, passages, truncation="only_second", max_length=max_length, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        return hf_model(**batch).logits.squeeze(-1)


def pairs(n: int = 12) -> tuple[list[str], list[str]]:
    queries = [QUERIES[i % len(QUERIES)] for i in range(n)]
    passages = [PASSAGES[(3 * i + 1) % len(PASSAGES)] for i in range(n)]
    return queries, passages


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    tiny_hf_cross_encoder(tmp_path / "tiny")
    return tmp_path / "tiny"


def spread_scores(model, seed: int = 0):
    """Give a model whose classifier was just initialised (N(0, 0.02): scores all within ~0.01) a classifier
    with N(0, 1) weights, so its scores spread over several units and a 1e-5 comparison is a real test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = model.head.classifier.weight
        weight.copy_(torch.randn(weight.shape, generator=generator).to(weight.dtype))
    return model


def pair_exits(model, seed: int = 1):
    """Replace a model's exit heads by "pair"-pooled ones whose classifiers spread (as ``spread_scores``)."""
    model.new_exit_heads("pair")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.exits.values():
            head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=generator))
    return model
