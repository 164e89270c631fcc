"""Fixtures for the dense and fusion tests (imported by test_dense.py and test_fusion.py): a tiny random
sentence-transformers encoder (2 layers, 32 dims, all-MiniLM-L6-v2's tokenizer, so real text tokenises
as it does for the real model) and a flat dense index of the first 300 dl19 passages built with it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_path

SMALL_POOL = 300


def first_passages(count: int) -> list[dict]:
    with open(shared_path("trec-dl", "dl19", "passages.jsonl"), encoding="utf-8") as lines:
        return [json.loads(line) for line, _ in zip(lines, range(count))]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def make_tiny_encoder(directory: Path, seed: int = 0) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(shared_path("models", "all-MiniLM-L6-v2")))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory / "hf")
    tokenizer.save_pretrained(directory / "hf")
    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models
    word = models.Transformer(str(directory / "hf"), max_seq_length=64)
    encoder = SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    encoder.save(str(directory / "encoder"))
    return directory / "encoder"


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def small_pool(tmp_path_factory) -> Path:
    """The first 300 dl19 passages as a JSONL collection."""
    return write_jsonl(tmp_path_factory.mktemp("small-pool") / "passages.jsonl", first_passages(SMALL_POOL))


@pytest.fixture(scope="session")
def small_dense_index(tmp_path_factory, tiny_encoder, small_pool) -> Path:
    from rankshrink.firststage import build_dense_index

    index = tmp_path_factory.mktemp("small-dense") / "index"
    build_dense_index(small_pool, index, tiny_encoder, dtype="fp32", device="cpu", progress=False)
    return index
