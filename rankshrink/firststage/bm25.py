"""BM25 over a Lucene index, through Pyserini: build an index from a collection, search it, fetch passages.

Scores are Pyserini's ``LuceneSearcher`` scores on the same index and parameters (Anserini's BM25: k1=0.9,
b=0.4 by default; ``MSMARCO_BM25`` = (0.82, 0.68) is the setting tuned on MS MARCO passage).

>>> build_index("../shared/trec-dl/dl19/passages.jsonl", "indexes/dl19-passages")
>>> bm25 = BM25("indexes/dl19-passages")
>>> run = bm25.batch_search(read_topics("../shared/trec-dl/dl19/topics.tsv"), k=1000)
>>> bm25.doc(next(iter(run["1037798"])))            # the passage text, as indexed
"""
from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Literal

from ..data import Collection, Run, atomic_write, open_collection
from ..errors import InputError, check_integer
from .building import batches, check_writable_index_dir, count_hint, publish_directory
from .jvm import pyserini

ANSERINI_BM25 = (0.9, 0.4)
MSMARCO_BM25 = (0.82, 0.68)
INDEX_INFO_FILE = "rankshrink-index.json"


# ---------------------------------------------------------------------------------------------
# Where an index is: a local Lucene directory or a Pyserini prebuilt index name


@dataclass(frozen=True)
class IndexLocation:
    kind: Literal["local", "prebuilt"]
    name: str  # the directory, or the prebuilt index name
    description: str = ""

    @property
    def path(self) -> Path:
        return Path(self.name)


def is_lucene_index(path: Path) -> bool:
    return path.is_dir() and any(path.glob("segments_*"))


def resolve_index(index: str | Path) -> IndexLocation:
    """A local Lucene index directory, or a Pyserini prebuilt index name such as ``msmarco-v1-passage``
    (downloaded to Pyserini's cache on first use). Anything else raises ``InputError`` saying what was found."""
    path = Path(index)
    if path.exists():
        if is_lucene_index(path):
            return IndexLocation("local", str(path))
        if (path / "faiss.index").exists() or (path / "dense.json").exists():
            raise InputError(f"{path}: a dense index, not a Lucene one (search it with --dense)")
        raise InputError(f"{path}: not a Lucene index (no segments_N file); build one with "
                         f"`rankshrink index --collection COLLECTION --index {path}`")
    text = str(index)
    if os.sep in text or "/" in text or text.startswith(".") or not text:
        raise InputError(f"{text}: no such index directory; build one with "
                         f"`rankshrink index --collection COLLECTION --index {text}`")
    prebuilt = pyserini().TF_INDEX_INFO
    if text in prebuilt:
        return IndexLocation("prebuilt", text, prebuilt[text].get("description", ""))
    close = difflib.get_close_matches(text, list(prebuilt), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise InputError(f"{text}: no such index directory, and not a Pyserini prebuilt Lucene index name{hint}")


def index_path(location: IndexLocation) -> Path:
    """The directory of a resolved index; a prebuilt one is downloaded into Pyserini's cache when absent."""
    if location.kind == "local":
        return location.path
    try:
        return Path(pyserini().download_prebuilt_index(location.name, verbose=False))
    except (ValueError, OSError) as error:
        raise InputError(f"{location.name}: could not download the prebuilt index ({error}); "
                         "build a local one with `rankshrink index`") from error


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class IndexInfo:
    """What ``rankshrink-index.json`` records beside the Lucene files."""
    collection: str
    documents: int
    empty_skipped: int
    seconds: float
    threads: int
    stored: tuple[str, ...] = ("positions", "docvectors", "raw")
    analyzer: str = "Anserini DefaultEnglishAnalyzer (Porter stemming, stopwords removed)"


def build_index(collection: str | Path | Collection, index_dir: str | Path, *, threads: int = 2,
                overwrite: bool = False, batch_size: int = 1000, progress: bool = True) -> IndexInfo:
    """Index a JSONL / TSV collection or an ir_datasets id into a Lucene index with positions, document
    vectors and raw text stored (Anserini's ``DefaultLuceneDocumentGenerator``, as Pyserini indexes).

    The index is built in a hidden directory beside ``index_dir`` and renamed into place only when complete,
    so an interrupted build never leaves a directory that looks like an index. An existing ``index_dir`` is
    replaced only with ``overwrite=True``; without it, an index another process finished there meanwhile is kept. Passages with empty text are skipped (as Anserini does), with a warning.

    >>> build_index("../shared/trec-dl/dl19/passages.jsonl", "indexes/dl19-passages", threads=2)
    IndexInfo(collection='../shared/trec-dl/dl19/passages.jsonl', documents=10852, ...)
    """
    index_dir = Path(index_dir)
    check_writable_index_dir(index_dir, overwrite)
    check_integer("threads", threads, optional=False)
    check_integer("batch_size", batch_size, optional=False)
    passages = open_collection(collection)
    started = time.perf_counter()
    building = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.building-", dir=index_dir.parent))
    try:
        indexer = pyserini().LuceneIndexer(
            args=["-index", str(building), "-storePositions", "-storeDocvectors", "-storeRaw"], threads=threads)
        try:
            fed, indexed = _feed(indexer, passages, batch_size, progress)
        except OSError as error:
            if Path(passages.source).exists():
                raise
            raise InputError(f"{passages.source}: ir_datasets could not fetch the collection "
                             f"({type(error).__name__}: {str(error)[:200]}); offline, give a local JSONL/TSV file") from error
        finally:
            indexer.close()
        searcher = pyserini().LuceneSearcher(str(building))
        documents = searcher.num_docs
        searcher.close()
        if documents != indexed:
            raise RuntimeError(f"Lucene reports {documents} documents after indexing {indexed}")
        if fed == 0:
            raise InputError(f"{passages.source}: the collection has no passages")
        if indexed < fed:
            warnings.warn(f"{passages.source}: {fed - indexed} passage(s) with empty text were not indexed "
                          "(BM25 cannot retrieve them)", stacklevel=2)
        info = IndexInfo(str(passages.source), documents, fed - indexed,
                         round(time.perf_counter() - started, 3), threads)
        with atomic_write(building / INDEX_INFO_FILE) as out:
            json.dump(asdict(info), out, indent=2)
        publish_directory(building, index_dir, replace=overwrite)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return info


def _feed(indexer, passages: Collection, batch_size: int, progress: bool) -> tuple[int, int]:
    """Send passages to Anserini in batches of JSON lines; returns (passages sent, documents indexed).

    A second thread hands batches to Java (which releases the GIL and indexes each batch with its own
    threads) while this one reads and checks the next batch, so neither waits for the other."""
    from queue import Queue

    from tqdm import tqdm

    pending: Queue[list[str] | None] = Queue(maxsize=2)
    indexed = 0
    failures: list[BaseException] = []

    def index_batches() -> None:
        nonlocal indexed
        from jnius import detach

        try:
            while (lines := pending.get()) is not None:
                if not failures:
                    indexed += indexer.object.addRawDocuments(lines)
        except BaseException as error:  # handed to the reading thread, which raises it
            failures.append(error)
            while pending.get() is not None:
                pass
        finally:
            detach()

    worker = threading.Thread(target=index_batches, name="rankshrink-lucene-indexer", daemon=True)
    worker.start()
    seen: set[str] = set()
    fed = 0
    try:
        with tqdm(total=count_hint(passages), unit=" passages", desc="indexing", disable=not progress,
                  dynamic_ncols=True) as bar:
            for batch in batches(passages, batch_size):
                lines = []
                for passage in batch:
                    if passage.docid in seen:
                        raise InputError(f"{passages.source}: docid {passage.docid!r} appears twice "
                                         f"(passage {fed + len(lines) + 1})")
                    seen.add(passage.docid)
                    lines.append(json.dumps({"id": passage.docid, "contents": passage.text}, ensure_ascii=False))
                if failures:
                    break
                pending.put(lines)
                fed += len(lines)
                bar.update(len(lines))
    finally:
        pending.put(None)
        worker.join()
    if failures:
        raise failures[0]
    return fed, indexed


# ---------------------------------------------------------------------------------------------
# Searching


class BM25:
    """BM25 search over a Lucene index (a directory, or a Pyserini prebuilt index name).

    ``search`` returns ``{docid: score}`` in rank order; ``batch_search`` returns a Run. Scores equal those
    of Pyserini's ``LuceneSearcher`` with the same parameters (Anserini rounds them to 4 decimals and breaks
    ties by docid). Queries are bags of words: Lucene syntax (``AND``, ``field:``, quotes) is plain text.

    >>> bm25 = BM25("indexes/dl19-passages")                   # or BM25("msmarco-v1-passage", *MSMARCO_BM25)
    >>> hits = bm25.search("what is durable medical equipment", k=10)
    >>> bm25.doc(next(iter(hits)))
    'Durable Medical Equipment (DME) is ...'
    """

    def __init__(self, index: str | Path, k1: float = ANSERINI_BM25[0], b: float = ANSERINI_BM25[1]):
        if not (k1 >= 0 and 0 <= b <= 1):
            raise InputError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.location = resolve_index(index)
        self.index_dir = index_path(self.location)
        self.k1, self.b = float(k1), float(b)
        lucene = pyserini().LuceneSearcher
        self._searcher = lucene(str(self.index_dir), prebuilt_index_name=(
            self.location.name if self.location.kind == "prebuilt" else None))
        self._searcher.set_bm25(self.k1, self.b)

    def __repr__(self) -> str:
        return f"BM25({self.location.name!r}, k1={self.k1}, b={self.b})"

    @property
    def num_docs(self) -> int:
        return self._searcher.num_docs

    def search(self, query: str, k: int = 1000) -> dict[str, float]:
        """The top ``k`` documents for ``query`` as ``{docid: score}``, best first. An empty query (or one of
        stopwords only) has no hits."""
        check_integer("k", k, optional=False)
        if not isinstance(query, str):
            raise InputError(f"a query is a string, got {type(query).__name__}")
        if not query.strip():
            return {}
        return {hit.docid: hit.score for hit in self._searcher.search(query, k)}

    def batch_search(self, topics: Mapping[str, str], k: int = 1000, threads: int = 2) -> Run:
        """Search all ``topics`` ({qid: query}) with ``threads`` Java threads; a Run in the topics' order.
        Queries without hits (empty, or stopwords only) map to ``{}``."""
        check_integer("k", k, optional=False)
        check_integer("threads", threads, optional=False)
        qids = [str(qid) for qid in topics]
        queries = [topics[qid] for qid in topics]
        for qid, query in zip(qids, queries):
            if not isinstance(query, str):
                raise InputError(f"query {qid}: expected a string, got {type(query).__name__}")
        searchable = [(qid, query) for qid, query in zip(qids, queries) if query.strip()]
        results = self._searcher.batch_search([query for _, query in searchable],
                                              [qid for qid, _ in searchable], int(k), int(threads))
        return {qid: {hit.docid: hit.score for hit in results.get(qid, [])} for qid in qids}

    def doc(self, docid: str) -> str:
        """The text of ``docid`` as it was indexed (the ``contents`` of its stored raw JSON)."""
        document = self._searcher.doc(str(docid))
        if document is None:
            raise InputError(f"docid {docid!r} not found in index {self.location.name}")
        raw = document.raw()
        if raw is None:
            contents = document.contents()
            if contents is None:
                raise InputError(f"index {self.location.name} stores no text for its documents "
                                 "(built without -storeRaw); rebuild it with `rankshrink index`")
            return contents
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            return raw
        if isinstance(record, dict):
            for key in ("contents", "text", "passage", "body"):
                if key in record:
                    return str(record[key])
        return raw

    def texts(self, docids: Iterable[str]) -> list[str]:
        """The texts of ``docids``, in order (as ``Collection.texts``)."""
        return [self.doc(docid) for docid in docids]

    def close(self) -> None:
        self._searcher.close()

    def __enter__(self) -> BM25:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
