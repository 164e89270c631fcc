"""README's "Search from Python" snippet runs as printed, on the shared dl19 data.

Its index (indexes/dl19-passages) is git-ignored: when it is not built, the session's dl19 index stands in.
Its model (models/trec-dl-offline) is what `rankshrink train pipelines/trec-dl-offline.yaml` makes: until it
is trained, the untrained all-MiniLM-L6-v2 from ../shared stands in (the snippet's calls are what is checked
here, not the ranking's quality)."""
from __future__ import annotations

import re
import warnings

import pytest

from conftest import REPO, shared_path

pytestmark = pytest.mark.shared


def readme_snippet(heading: str) -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"README.md's '{heading}' section has no python block"
    return blocks[0]


def test_the_search_from_python_snippet_runs(dl19_index, monkeypatch, capsys):
    shared_path("trec-dl", "dl19", "passages.jsonl")
    code = readme_snippet("Search from Python")
    if not (REPO / "indexes" / "dl19-passages" / "rankshrink-index.json").is_file():
        code = code.replace('"indexes/dl19-passages"', repr(str(dl19_index)))
    if not (REPO / "models" / "trec-dl-offline" / "rankshrink.json").is_file():
        code = code.replace('"models/trec-dl-offline"', repr(str(shared_path("models", "all-MiniLM-L6-v2"))))
    monkeypatch.chdir(REPO)                       # the snippet's paths are relative to the repository
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # the stand-in model's classifier is untrained, and says so
        exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["1", "2", "3"]
    assert all(line.split()[1].isdigit() for line in printed)                 # MS MARCO passage ids
    assert len(namespace["run"]["q1"]) == 100
    assert sorted(hit.text for hit in namespace["hits"]) == ["A cat is a small feline.", "Paris is in France."]
