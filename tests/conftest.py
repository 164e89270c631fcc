"""Shared fixtures. Tests that need the real data and weights in ../shared skip, saying why, when it is absent;
RANKSHRINK_SHARED points elsewhere."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RANKSHRINK_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path inside ../shared, or a skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared TREC DL data and weights; set RANKSHRINK_SHARED to its folder)")
    return path


@pytest.fixture
def shared() -> Path:
    return shared_path()


@pytest.fixture
def dl19() -> Path:
    return shared_path("trec-dl", "dl19")


# Tests never reach a model hub: every model they load is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
