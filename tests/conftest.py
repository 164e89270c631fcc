"""Shared fixtures. Tests that need the real data and weights in ../shared skip, saying why, when it is absent;
RANKSHRINK_SHARED points elsewhere."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RANKSHRINK_SHARED", REPO.parent / "shared"))

# A shell's background job starts with SIGINT ignored, and so would every command the Ctrl-C tests start:
# give this process Python's handler back (children then start with the default action, as from a terminal).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture(scope="session")
def dl19_index(tmp_path_factory) -> Path:
    """A Lucene index (BM25) of the dl19 candidate pool, 10,852 passages, built once per test session."""
    passages = shared_path("trec-dl", "dl19", "passages.jsonl")
    from rankshrink.firststage import build_index

    index = tmp_path_factory.mktemp("dl19-lucene") / "index"
    build_index(passages, index, threads=2, progress=False)
    return index
