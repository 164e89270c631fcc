"""Topics, qrels, runs and collections in the plain shapes every stage shares.

    Run    = dict[qid, dict[docid, score]]   (the shape ranx and pytrec_eval use)
    Qrels  = dict[qid, dict[docid, grade]]
    Topics = dict[qid, query text]

Sources are files (TREC runs, qrels and topic files, optionally gzipped; TSV or JSONL collections, plain:
passages are looked up by byte offset) or ir_datasets ids such as ``msmarco-passage/trec-dl-2019/judged``.

>>> run = read_run("../shared/trec-dl/dl19/runs/bm25.top100.trec")
>>> write_run(run, "runs/bm25.trec", tag="bm25")   # atomic: a temp file, then a rename
"""
from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import json
import math
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import InputError, check_integer

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]
Topics = dict[str, str]


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, gzip-aware reads, ir_datasets ids


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success rename it over ``path``, on any error
    (Ctrl-C included) delete it, so ``path`` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes files private; outputs get the usual mode
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def json_digest(value, length: int = 32) -> str:
    """A hex name for a JSON-able value (dict keys sorted): how caches name an entry after what made it."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes: a cache key that a copy, a move or a new modification time leaves alone."""
    digest = hashlib.sha256()
    hash_file_into(digest, path)
    return digest.hexdigest()


def hash_file_into(digest, path: str | os.PathLike) -> None:
    """Feed a file's bytes to a ``hashlib`` digest, 1 MiB at a time (constant memory for a 3 GB collection)."""
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _open_text(path: Path) -> IO[str]:
    # utf-8-sig: a byte-order mark (Excel, PowerShell) must not become part of the first qid
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


def _existing_file(source: str | Path, what: str) -> Path | None:
    """The path when ``source`` is an existing file; None when it may be an ir_datasets id."""
    path = Path(source)
    if path.is_file():
        return path
    if path.exists():
        raise InputError(f"{source}: expected a {what} file, found a directory")
    if is_irds_id(str(source)):
        return None
    raise InputError(f"{source}: no such {what} file (and not an ir_datasets id)")


def is_irds_id(source: str) -> bool:
    """True when ``source`` names an ir_datasets dataset (only ids with a '/' or a known top level)."""
    if Path(source).exists() or source.endswith((".tsv", ".txt", ".jsonl", ".json", ".trec", ".gz")):
        return False
    try:
        import ir_datasets
    except ImportError:  # pragma: no cover - ir-datasets is a dependency
        return False
    try:
        ir_datasets.registry[source]
    except KeyError:
        return False
    return True


def irds_dataset(dataset_id: str):
    """Load an ir_datasets dataset (downloads happen on first use of its files, as ir_datasets does)."""
    import ir_datasets

    try:
        return ir_datasets.load(dataset_id)
    except KeyError as error:
        raise InputError(f"{dataset_id}: not an ir_datasets id") from error


def irds_records(dataset_id: str, what: str, records):
    """``records(dataset)`` read to the end; a download that fails (offline, say) is one InputError naming the
    dataset, not a requests traceback."""
    try:
        return records(irds_dataset(dataset_id))
    except (OSError, RuntimeError) as error:
        raise InputError(f"{dataset_id}: ir_datasets could not fetch the {what} ({type(error).__name__}: "
                         f"{str(error)[:160]}); offline, give a local file") from error


# ---------------------------------------------------------------------------------------------
# Runs


def trec_order(doc_scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """(docid, score) pairs in trec_eval's order: score descending, ties by docid descending."""
    return sorted(doc_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)


def read_run(path: str | Path) -> Run:
    """Read a TREC run ``qid Q0 docid rank score tag``; the rank column is ignored (scores order)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such run file")
    run: Run = {}
    with _open_text(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 6:
                raise InputError.at(
                    path, line_number, f"expected 6 columns 'qid Q0 docid rank score tag', got {len(fields)}", line
                )
            qid, _, docid, _, score_text, _ = fields
            try:
                score = float(score_text)
            except ValueError:
                raise InputError.at(path, line_number, f"score {score_text!r} is not a number", line) from None
            if not math.isfinite(score):
                raise InputError.at(path, line_number, f"score {score_text!r} is not finite", line)
            doc_scores = run.setdefault(qid, {})
            if docid in doc_scores:
                raise InputError.at(path, line_number, f"duplicate (qid, docid) = ({qid}, {docid})", line)
            doc_scores[docid] = score
    if not run:
        raise InputError(f"{path}: empty run file (expected lines 'qid Q0 docid rank score tag')")
    return run


_WHITESPACE = re.compile(r"\s")


def check_output_file(path: str | Path | None) -> None:
    """Refuse, before any work, an output path that a file cannot be written to (None: no output)."""
    if path is not None and Path(path).is_dir():
        raise InputError(f"{path}: is a directory; give the path of a file to write")


def check_tag(tag: str) -> str:
    """A TREC run tag: one word (the last column)."""
    if not isinstance(tag, str) or not tag or _WHITESPACE.search(tag):
        raise InputError(f"run tag must be one word without spaces, got {tag!r}")
    return tag


def write_run(run: Mapping[str, Mapping[str, float]], path: str | Path, tag: str = "rankshrink",
              k: int | None = None) -> None:
    """Write a TREC run atomically, each query in trec_eval order, optionally cut to its top ``k``."""
    check_tag(tag)
    check_integer("k", k)
    with atomic_write(path) as out:
        for qid in run:
            ranked = trec_order(run[qid])
            ranked = ranked[:k] if k else ranked
            for rank, ((docid, _), score) in enumerate(zip(ranked, score_texts([s for _, s in ranked])), start=1):
                if _WHITESPACE.search(docid) or _WHITESPACE.search(qid):   # the columns are whitespace-separated
                    raise InputError(f"{path}: qid {qid!r}, docid {docid!r}: a TREC run's ids cannot hold whitespace")
                out.write(f"{qid} Q0 {docid} {rank} {score} {tag}\n")


def score_texts(scores: Sequence[float]) -> list[str]:
    """A ranked query's scores as a run file writes them: 6 decimals (as Pyserini and Anserini write), or, where
    that would tie two different scores, and trec_eval would then order them by docid, every digit."""
    texts = [f"{score:.6f}" for score in scores]
    if any(a == b and x != y for a, b, x, y in zip(texts, texts[1:], scores, scores[1:])):
        return [repr(float(score)) for score in scores]
    return texts


def top_k(run: Mapping[str, Mapping[str, float]], k: int) -> Run:
    """Each query's first ``k`` documents in trec_eval order."""
    return {qid: dict(trec_order(docs)[:k]) for qid, docs in run.items()}


# ---------------------------------------------------------------------------------------------
# Qrels


def read_qrels(source: str | Path) -> Qrels:
    """Read TREC qrels ``qid iteration docid grade`` from a file, or an ir_datasets id's qrels."""
    path = _existing_file(source, "qrels")
    if path is None:
        qrels: Qrels = {}

        def read(dataset):
            for judgment in dataset.qrels_iter():
                qrels.setdefault(judgment.query_id, {})[judgment.doc_id] = int(judgment.relevance)
            return qrels

        return irds_records(str(source), "qrels", read)
    qrels = {}
    with _open_text(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 4:
                raise InputError.at(
                    path, line_number, f"expected 4 columns 'qid iteration docid grade', got {len(fields)}", line
                )
            qid, _, docid, grade_text = fields
            try:
                grade = int(grade_text)
            except ValueError:
                raise InputError.at(path, line_number, f"grade {grade_text!r} is not an integer", line) from None
            grades = qrels.setdefault(qid, {})
            if docid in grades and grades[docid] != grade:
                raise InputError.at(
                    path, line_number, f"({qid}, {docid}) judged twice, {grades[docid]} then {grade}", line
                )
            grades[docid] = grade
    if not qrels:
        raise InputError(f"{path}: empty qrels file (expected lines 'qid iteration docid grade')")
    return qrels


# ---------------------------------------------------------------------------------------------
# Topics


def read_topics(source: str | Path) -> Topics:
    """Read topics from a TSV ``qid<TAB>query`` file, a TREC topic file (``<top><num>...<title>``),
    a JSONL file of ``{"qid"|"id"|"query_id": ..., "query"|"text"|"title": ...}``, or an ir_datasets id."""
    path = _existing_file(source, "topics")
    if path is None:
        return irds_records(str(source), "topics", lambda dataset: {query.query_id: _irds_query_text(query)
                                                                    for query in dataset.queries_iter()})
    with _open_text(path) as handle:
        text = handle.read()
    stripped = text.lstrip()
    if not stripped:
        raise InputError(f"{path}: empty topics file (expected lines 'qid<TAB>query')")
    if stripped.startswith(("<top>", "<num>")):
        topics = _parse_trec_topics(text, path)
    elif stripped.startswith("{"):
        topics = _parse_jsonl_topics(text, path)
    else:
        topics = _parse_tsv_topics(text, path)
    return topics


def _irds_query_text(query) -> str:
    return query.default_text() if hasattr(query, "default_text") else query.text


def _parse_tsv_topics(text: str, path: Path) -> Topics:
    topics: Topics = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        qid, tab, query = line.partition("\t")
        if not tab or not qid.strip():
            raise InputError.at(path, line_number, "expected 'qid<TAB>query'", line)
        _add_topic(topics, qid.strip(), query.strip(), path, line_number, line)
    return topics


def _parse_jsonl_topics(text: str, path: Path) -> Topics:
    topics: Topics = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError.at(path, line_number, f"invalid JSON ({error.msg})", line) from None
        qid = next((record[key] for key in ("qid", "query_id", "id", "_id") if key in record), None)
        query = next((record[key] for key in ("query", "text", "title") if key in record), None)
        if qid is None or query is None:
            raise InputError.at(path, line_number, "expected keys 'qid' and 'query'", line)
        _add_topic(topics, str(qid), str(query).strip(), path, line_number, line)
    return topics


# A tag counts at the start of a line or right after another tag (``<top><num>303</num><title>...``), not in prose.
_TAG_AT = r"(?:^|(?<=>))[ \t]*"
_TREC_TOPIC = re.compile(_TAG_AT + r"(?P<num><num>)\s*(?:Number:)?\s*(?P<qid>[^<\s]+)\s*(?:</num>)?(?:(?!<num>).)*?"
                         + _TAG_AT + r"(?P<tag><title>)\s*(?:Topic:)?(?P<title>[^<]*)", re.S | re.M)
_TREC_TAGS = {tag: re.compile(_TAG_AT + f"({tag})", re.M) for tag in ("<num>", "<title>")}


def _parse_trec_topics(text: str, path: Path) -> Topics:
    """TREC topic files: ``<num> Number: 301`` then ``<title> query`` (the title is the query; closing tags
    and both on one line are fine)."""
    topics: Topics = {}
    lines = text.splitlines()
    line_starts = [0] + [match.end() for match in re.finditer("\n", text)]

    def line_at(position: int) -> tuple[int, str]:
        number = bisect.bisect_right(line_starts, position)
        return number, lines[number - 1] if number <= len(lines) else ""

    matches = list(_TREC_TOPIC.finditer(text))
    for match in matches:
        _add_topic(topics, match["qid"], " ".join(match["title"].split()), path, *line_at(match.start("num")))
    used = {"<num>": {m.start("num") for m in matches}, "<title>": {m.start("tag") for m in matches}}
    for tag, missing in (("<num>", "<title>"), ("<title>", "<num>")):
        stray = next((m.start(1) for m in _TREC_TAGS[tag].finditer(text) if m.start(1) not in used[tag]), None)
        if stray is not None:
            number, line = line_at(stray)
            raise InputError.at(path, number, f"topic has a {tag} but no {missing}", line)
    if not topics:
        raise InputError(f"{path}: no '<num>' / '<title>' topics found")
    return topics


def _add_topic(topics: Topics, qid: str, query: str, path: Path, line_number: int, line: str) -> None:
    if qid in topics:
        raise InputError.at(path, line_number, f"qid {qid} appears twice", line)
    topics[qid] = query


# ---------------------------------------------------------------------------------------------
# Collections


@dataclass(frozen=True)
class Passage:
    docid: str
    text: str


class Collection:
    """docid → text, streamed in file order by iteration, with lookup by docid.

    ``collection[docid]`` and ``collection.texts(docids)`` read passages from a byte-offset index built on
    the first lookup (one pass over the file, then random reads), so a large collection is never held in
    memory. Lookups are thread-safe.
    """

    def __init__(self, source: str | Path):
        self.source = str(source)
        self._path = _existing_file(source, "collection")
        self._offsets: dict[str, tuple[int, int, int]] | None = None  # docid -> (offset, length, line)
        self._irds_store = None
        self._index_lock = threading.Lock()
        self._warned_invalid_utf8 = False
        if self._path is not None and self._path.suffix == ".gz":
            raise InputError(f"{self._path}: gzipped collections are not supported for lookup; gunzip it first")
        if self._path is not None:
            self._format = "jsonl" if self._path.suffix in (".jsonl", ".json") else "tsv"

    def __iter__(self) -> Iterator[Passage]:
        if self._path is None:
            for doc in irds_dataset(self.source).docs_iter():
                yield Passage(doc.doc_id, _irds_doc_text(doc))
            return
        with open(self._path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield self._parse(raw, line_number)

    def __len__(self) -> int:
        if self._path is None:
            return irds_dataset(self.source).docs_count()
        return len(self._index())

    def __contains__(self, docid: str) -> bool:
        if self._path is None:
            return self._irds().get(docid) is not None
        return docid in self._index()

    def __getitem__(self, docid: str) -> str:
        if self._path is None:
            doc = self._irds().get(docid)
            if doc is None:
                raise InputError(f"docid {docid!r} not found in collection {self.source}")
            return _irds_doc_text(doc)
        location = self._index().get(docid)
        if location is None:
            raise InputError(f"docid {docid!r} not found in collection {self.source}")
        offset, length, line_number = location
        with open(self._path, "rb") as handle:
            raw = os.pread(handle.fileno(), length, offset)
        return self._parse(raw, line_number).text

    def texts(self, docids: Iterable[str]) -> list[str]:
        """The passages of ``docids``, in order; a missing docid raises an error naming it."""
        if self._path is None:
            docids = list(docids)
            found = self._irds().get_many(docids)
            missing = [docid for docid in docids if docid not in found]
            if missing:
                raise InputError(f"docid {missing[0]!r} not found in collection {self.source}"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            return [_irds_doc_text(found[docid]) for docid in docids]
        index = self._index()
        out = []
        with open(self._path, "rb") as handle:
            for docid in docids:
                location = index.get(docid)
                if location is None:
                    raise InputError(f"docid {docid!r} not found in collection {self.source}")
                offset, length, line_number = location
                out.append(self._parse(os.pread(handle.fileno(), length, offset), line_number).text)
        return out

    def _irds(self):
        if self._irds_store is None:
            self._irds_store = irds_dataset(self.source).docs_store()
        return self._irds_store

    def _index(self) -> dict[str, tuple[int, int, int]]:
        with self._index_lock:
            if self._offsets is None:
                self._offsets = self._build_offsets()
            return self._offsets

    def _build_offsets(self) -> dict[str, tuple[int, int, int]]:
        offsets: dict[str, tuple[int, int, int]] = {}
        offset = 0
        with open(self._path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if raw.strip():
                    docid = self._parse_docid(raw, line_number)
                    if docid in offsets:
                        raise InputError.at(self._path, line_number, f"docid {docid!r} appears twice",
                                            raw.decode("utf-8", "replace"))
                    offsets[docid] = (offset, len(raw), line_number)
                offset += len(raw)
        return offsets

    def _parse_docid(self, raw: bytes, line_number: int) -> str:
        raw = _without_bom(raw, line_number)
        if self._format == "tsv":
            docid = raw.split(b"\t", 1)[0].strip().decode("utf-8", "replace")
            if not docid or b"\t" not in raw:
                raise InputError.at(self._path, line_number, "expected 'docid<TAB>text'", raw.decode("utf-8", "replace"))
            return docid
        return self._parse(raw, line_number).docid

    def _parse(self, raw: bytes, line_number: int) -> Passage:
        line = self._decode(_without_bom(raw, line_number), line_number)
        if self._format == "tsv":
            docid, tab, text = line.rstrip("\r\n").partition("\t")
            if not tab or not docid.strip():
                raise InputError.at(self._path, line_number, "expected 'docid<TAB>text'", line)
            return Passage(docid.strip(), text)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError.at(self._path, line_number, f"invalid JSON ({error.msg})", line) from None
        if not isinstance(record, dict):
            raise InputError.at(self._path, line_number, "expected a JSON object", line)
        docid = next((record[key] for key in ("id", "docid", "_id", "doc_id") if key in record), None)
        if docid is None or str(docid).strip() == "":
            raise InputError.at(self._path, line_number, "passage has no 'id'", line)
        if "contents" in record:
            text = record["contents"]
        elif "text" in record:
            text = " ".join(part for part in (record.get("title"), record["text"]) if part)
        else:
            raise InputError.at(self._path, line_number, "passage has no 'contents' or 'text'", line)
        return Passage(str(docid), str(text))

    def _decode(self, raw: bytes, line_number: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if not self._warned_invalid_utf8:
                self._warned_invalid_utf8 = True
                warnings.warn(f"{self._path}:{line_number}: invalid UTF-8, replaced by U+FFFD "
                              "(reported once per collection)", stacklevel=3)
            return raw.decode("utf-8", errors="replace")


def _without_bom(raw: bytes, line_number: int) -> bytes:
    return raw.removeprefix(b"\xef\xbb\xbf") if line_number == 1 else raw


def _irds_doc_text(doc) -> str:
    return doc.default_text() if hasattr(doc, "default_text") else doc.text


def open_collection(source: str | Path | Collection) -> Collection:
    """A Collection for a JSONL / TSV file or an ir_datasets id (an existing Collection passes through)."""
    return source if isinstance(source, Collection) else Collection(source)
