"""Dense first stage: a sentence-transformers bi-encoder encodes the collection into a faiss index.

An index directory holds ``faiss.index``, ``docids.txt`` (row i of the index is line i) and ``dense.json``
(the encoder, similarity, faiss kind, what was built). Scores are inner products of embeddings; for an
encoder whose similarity is cosine (all-MiniLM-L6-v2, most) embeddings are normalised, so they are cosines.

The build is resumable: passages are encoded in shards saved under a hidden ``.NAME.building-dense``
directory beside the index; run the same command again after an interruption and finished shards are kept.
The index appears under its name only when complete.

>>> build_dense_index("../shared/trec-dl/dl19/passages.jsonl", "indexes/dl19-minilm",
...                   encoder="../shared/models/all-MiniLM-L6-v2")
>>> dense = DenseSearcher("indexes/dl19-minilm")
>>> dense.search("what is durable medical equipment", k=10)      # {docid: score}, best first
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..data import Collection, Run, atomic_write, open_collection
from ..errors import InputError, check_integer
from .building import batches, check_writable_index_dir, count_hint, publish_directory, source_identity

FaissKind = Literal["flat", "hnsw", "ivfpq"]
EncodeDtype = Literal["auto", "fp32", "bf16"]
INFO_FILE = "dense.json"
INDEX_FILE = "faiss.index"
DOCIDS_FILE = "docids.txt"
IVFPQ_MIN_PASSAGES = 1000


# ---------------------------------------------------------------------------------------------
# The encoder


def bf16_is_fast(device: str) -> bool:
    """bf16 pays on GPUs that support it and on CPUs with bf16 instructions (AVX512-BF16 or AMX)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: EncodeDtype, device: str) -> Literal["fp32", "bf16"]:
    if dtype not in ("auto", "fp32", "bf16"):
        raise InputError(f"dtype must be auto, fp32 or bf16, got {dtype!r}")
    if dtype == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return dtype


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_encoder(encoder: str | Path, device: str | None = None, dtype: Literal["fp32", "bf16"] = "fp32",
                 max_length: int | None = None):
    """A sentence-transformers model from a local directory or a Hugging Face hub id, in ``dtype``."""
    import torch
    from sentence_transformers import SentenceTransformer

    text = str(encoder)
    looks_local = os.sep in text or text.startswith(".") or Path(text).exists()
    if looks_local and not Path(text).is_dir():
        raise InputError(f"{text}: no such encoder directory (expected a sentence-transformers model folder)")
    try:
        model = SentenceTransformer(text, device=device or default_device())
    except (OSError, ValueError) as error:
        where = "directory" if looks_local else "Hugging Face hub id (are you online?)"
        raise InputError(f"{text}: could not load a sentence-transformers model from this {where}: "
                         f"{str(error).splitlines()[0][:200]}") from None
    if dtype == "bf16":
        model.to(torch.bfloat16)
    if max_length:
        model.max_seq_length = int(max_length)
    model.eval()
    return model


def similarity_of(model) -> Literal["cosine", "dot"]:
    name = getattr(model, "similarity_fn_name", None) or "cosine"
    if name not in ("cosine", "dot"):
        raise InputError(f"encoder similarity {name!r} is not an inner product; rankshrink supports cosine and dot")
    return name


def encode(model, texts: Sequence[str], *, kind: Literal["query", "document"], batch_size: int,
           normalize: bool) -> np.ndarray:
    """float32 embeddings, one row per text (sentence-transformers sorts each call's texts by length)."""
    method = model.encode_query if kind == "query" else model.encode_document
    vectors = method(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False,
                     normalize_embeddings=normalize)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if normalize:  # again in fp32: a bf16 model normalises in bf16, leaving norms up to ~0.5% off 1
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class DenseIndexInfo:
    """What ``dense.json`` records."""
    encoder: str
    dimension: int
    similarity: Literal["cosine", "dot"]
    faiss: FaissKind
    faiss_factory: str
    dtype: Literal["fp32", "bf16"]
    max_length: int
    documents: int
    collection: str
    encode_seconds: float
    passages_per_second: float
    resumed_passages: int
    search_defaults: dict


def build_dense_index(collection: str | Path | Collection, index_dir: str | Path, encoder: str | Path, *,
                      faiss_kind: FaissKind = "flat", dtype: EncodeDtype = "auto", batch_size: int = 64,
                      shard_size: int = 8192, max_length: int | None = None, device: str | None = None,
                      hnsw_m: int = 32, overwrite: bool = False, resume: bool = True,
                      progress: bool = True) -> DenseIndexInfo:
    """Encode a collection with a sentence-transformers bi-encoder into a faiss index.

    ``faiss_kind``: ``flat`` (exact inner product; the default), ``hnsw`` (graph, approximate, fast search,
    more memory) or ``ivfpq`` (inverted lists over product-quantised codes of one byte per 8 dimensions, 1/32
    of flat's memory; approximate; needs at least 1,000 passages to train). ``dtype="auto"`` encodes in bf16 where
    the hardware has bf16 arithmetic (measured in eval/bench_firststage.md), else fp32.

    >>> build_dense_index("../shared/trec-dl/dl19/passages.jsonl", "indexes/dl19-minilm",
    ...                   "../shared/models/all-MiniLM-L6-v2")
    DenseIndexInfo(encoder='/.../shared/models/all-MiniLM-L6-v2', dimension=384, faiss='flat', ...)
    """
    if faiss_kind not in ("flat", "hnsw", "ivfpq"):
        raise InputError(f"faiss kind must be flat, hnsw or ivfpq, got {faiss_kind!r}")
    check_integer("batch_size", batch_size, optional=False)
    check_integer("shard_size", shard_size, optional=False)
    index_dir = Path(index_dir)
    check_writable_index_dir(index_dir, overwrite)
    passages = open_collection(collection)
    device = device or default_device()
    chosen_dtype = resolve_dtype(dtype, device)
    model = load_encoder(encoder, device, chosen_dtype, max_length)
    similarity = similarity_of(model)
    settings = {"collection": source_identity(passages.source), "encoder": _encoder_reference(encoder), "dtype": chosen_dtype,
                "max_length": model.max_seq_length, "shard_size": shard_size, "similarity": similarity}
    building = index_dir.parent / f".{index_dir.name}.building-dense"
    with _exclusive(building, index_dir):
        shards = _Shards(building, settings, resume)
        started = time.perf_counter()
        try:
            encoded = _encode_shards(model, passages, shards, batch_size, similarity == "cosine", progress)
        except BaseException:
            kept = len(list(building.glob("shard-*.ids")))
            if kept:
                warnings.warn(f"{building}: {kept} encoded shard(s) of {shard_size} passages are kept; run the same "
                              "command again to resume", stacklevel=2)
            raise
        encode_seconds = time.perf_counter() - started
        docids = shards.docids()
        if not docids:
            raise InputError(f"{passages.source}: the collection has no passages")
        index, factory, search_defaults = _faiss_index(shards.vectors, len(docids), faiss_kind, hnsw_m)
        info = DenseIndexInfo(
            encoder=_encoder_reference(encoder), dimension=int(index.d), similarity=similarity,
            faiss=faiss_kind, faiss_factory=factory, dtype=chosen_dtype, max_length=int(model.max_seq_length),
            documents=len(docids), collection=_collection_reference(passages),
            encode_seconds=round(encode_seconds, 2),
            passages_per_second=round(encoded / encode_seconds, 1) if encoded else 0.0,
            resumed_passages=len(docids) - encoded, search_defaults=search_defaults)
        finished = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.building-", dir=index_dir.parent))
        try:
            _write_index(finished, index, docids, info)
            publish_directory(finished, index_dir)
        except BaseException:
            shutil.rmtree(finished, ignore_errors=True)
            raise
        shutil.rmtree(building)  # the shards; our lock goes with them
    return info


def _collection_reference(passages: Collection) -> str:
    path = Path(passages.source)
    return str(path.resolve()) if path.is_file() else passages.source


def _encoder_reference(encoder: str | Path) -> str:
    """A local encoder is recorded by absolute path (so the index works from any directory); a hub id as is."""
    path = Path(encoder)
    return str(path.resolve()) if path.is_dir() else str(encoder)


class _exclusive:
    """Hold a lock inside the build folder while building, so two builds of one index cannot interleave."""

    def __init__(self, building: Path, index_dir: Path):
        self.building, self.index_dir = building, index_dir

    def __enter__(self) -> None:
        self.building.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.building / "lock", "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise InputError(f"{self.index_dir}: another build of this index is running") from None

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        if self.building.is_dir() and {p.name for p in self.building.iterdir()} <= {"lock"}:
            shutil.rmtree(self.building)  # nothing to resume from: leave nothing behind


class _Shards:
    """Encoded shards of a build in progress: ``shard-NNNNN.npy`` (float32) and ``shard-NNNNN.ids``, the ids
    written last, so a shard with an ids file is complete."""

    def __init__(self, folder: Path, settings: dict, resume: bool):
        self.folder, self.settings = folder, settings
        manifest = folder / "build.json"
        if manifest.exists():
            same = json.loads(manifest.read_text(encoding="utf-8")) == settings
            if not (resume and same):
                if resume:
                    warnings.warn(f"{folder}: an unfinished build with other settings (collection, encoder, "
                                  "dtype or shard size) is discarded", stacklevel=3)
                self.remove_shards()
        if not manifest.exists():
            with atomic_write(manifest) as out:
                json.dump(settings, out, indent=2)
        self.done = sorted(folder.glob("shard-*.ids"))

    def ids(self, number: int) -> list[str]:
        return (self.folder / f"shard-{number:05d}.ids").read_text(encoding="utf-8").split("\n")[:-1]

    def save(self, number: int, docids: list[str], vectors: np.ndarray) -> None:
        with atomic_write(self.folder / f"shard-{number:05d}.npy", mode="wb") as out:
            np.save(out, vectors)
        with atomic_write(self.folder / f"shard-{number:05d}.ids") as out:
            out.write("".join(f"{docid}\n" for docid in docids))

    def docids(self) -> list[str]:
        return [docid for ids_file in sorted(self.folder.glob("shard-*.ids"))
                for docid in ids_file.read_text(encoding="utf-8").split("\n")[:-1]]

    def vectors(self) -> Iterator[np.ndarray]:
        """The shards' embeddings one shard at a time, so the whole matrix is never in memory twice."""
        for ids_file in sorted(self.folder.glob("shard-*.ids")):
            yield np.load(ids_file.with_suffix(".npy"))

    def remove_shards(self) -> None:
        for path in [*self.folder.glob("shard-*"), self.folder / "build.json"]:
            path.unlink(missing_ok=True)


def _encode_shards(model, passages: Collection, shards: _Shards, batch_size: int, normalize: bool,
                   progress: bool) -> int:
    """Encode every shard not already on disk; returns the number of passages encoded now. Passages with empty
    text are skipped, with a warning, as the BM25 index skips them."""
    from tqdm import tqdm

    shard_size = shards.settings["shard_size"]
    done = len(shards.done)
    seen: set[str] = set()
    encoded = empty = 0

    def with_text() -> Iterator:
        nonlocal empty
        for passage in passages:
            if passage.text.strip():
                yield passage
            else:
                empty += 1
    with tqdm(total=count_hint(passages), unit=" passages", desc="encoding", disable=not progress,
              dynamic_ncols=True) as bar:
        if done:
            bar.set_description(f"encoding (resuming after {done} shards)")
        for number, shard in enumerate(batches(with_text(), shard_size)):
            docids = [passage.docid for passage in shard]
            for docid in docids:
                if docid in seen:
                    raise InputError(f"{passages.source}: docid {docid!r} appears twice")
                seen.add(docid)
            if number < done:
                if shards.ids(number) != docids:
                    raise InputError(f"{shards.folder}: shard {number} was encoded from other passages; "
                                     "rebuild without resuming (--no-resume)")
                bar.update(len(shard))
                continue
            vectors = []
            for chunk in batches(shard, batch_size * 16):  # a bar that moves within a shard
                vectors.append(encode(model, [passage.text for passage in chunk], kind="document",
                                      batch_size=batch_size, normalize=normalize))
                bar.update(len(chunk))
            shards.save(number, docids, np.concatenate(vectors))
            encoded += len(shard)
    if empty:
        warnings.warn(f"{passages.source}: {empty} passage(s) with empty text were not encoded (as BM25 skips "
                      f"them)", stacklevel=3)
    return encoded


def _faiss_index(shards: Callable[[], Iterable[np.ndarray]], count: int, kind: FaissKind, hnsw_m: int):
    """(index, factory string, search defaults): ``count`` vectors under inner product, added shard by shard.
    ``shards()`` yields the vectors in row order (called twice for IVF-PQ: once to train, once to add)."""
    import faiss

    dimension = next(iter(shards())).shape[1]
    defaults: dict = {}
    if kind == "flat":
        index, factory = faiss.IndexFlatIP(dimension), "Flat"
    elif kind == "hnsw":
        index, factory = faiss.IndexHNSWFlat(dimension, hnsw_m, faiss.METRIC_INNER_PRODUCT), f"HNSW{hnsw_m},Flat"
        index.hnsw.efConstruction = 200
        defaults = {"ef_search": 256}
    else:
        if count < IVFPQ_MIN_PASSAGES:
            raise InputError(f"IVF-PQ needs at least {IVFPQ_MIN_PASSAGES:,} passages to train its quantisers, "
                             f"got {count:,}; use --faiss flat (exact) for a collection this small")
        nlist = max(1, min(int(4 * math.sqrt(count)), count // 39))
        sub_quantizers = next(m for m in (dimension // 8, dimension // 4, dimension // 2, dimension)
                              if m > 0 and dimension % m == 0)
        bits = 8 if count >= 256 * 39 else 4
        factory = f"IVF{nlist},PQ{sub_quantizers}x{bits}"
        index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(shards(), count, limit=max(256, nlist) * 256))
        defaults = {"nprobe": max(1, min(nlist, 32))}
    for vectors in shards():
        index.add(vectors)
    return index, factory, defaults


def _training_sample(shards: Iterable[np.ndarray], count: int, limit: int) -> np.ndarray:
    """At most ``limit`` vectors spread evenly over all ``count`` (the first ones may be one kind of passage)."""
    step = max(1, count // limit)
    taken, seen = [], 0
    for vectors in shards:
        offset = (-seen) % step
        taken.append(vectors[offset::step])
        seen += len(vectors)
    return np.ascontiguousarray(np.concatenate(taken)[:limit])


def _write_index(folder: Path, index, docids: list[str], info: DenseIndexInfo) -> None:
    import faiss

    faiss.write_index(index, str(folder / INDEX_FILE))
    with atomic_write(folder / DOCIDS_FILE) as out:
        out.write("".join(f"{docid}\n" for docid in docids))
    with atomic_write(folder / INFO_FILE) as out:
        json.dump(asdict(info), out, indent=2)


# ---------------------------------------------------------------------------------------------
# Searching


def is_dense_index(path: Path) -> bool:
    return (path / INFO_FILE).is_file() and (path / INDEX_FILE).is_file()


class DenseSearcher:
    """Search a dense index built by ``build_dense_index``; the same shape as ``BM25``.

    Queries are encoded with the index's encoder (fp32 by default; ``dtype="bf16"`` to match a bf16 build's
    speed). An empty query has no hits. ``ef_search`` (HNSW) and ``nprobe`` (IVF-PQ) trade speed for recall.

    >>> dense = DenseSearcher("indexes/dl19-minilm")
    >>> run = dense.batch_search({"q1": "what is durable medical equipment"}, k=1000)
    """

    def __init__(self, index_dir: str | Path, *, encoder: str | Path | None = None, device: str | None = None,
                 dtype: Literal["fp32", "bf16"] = "fp32", batch_size: int = 64, ef_search: int | None = None,
                 nprobe: int | None = None):
        import faiss

        self.index_dir = Path(index_dir)
        if not self.index_dir.exists():
            raise InputError(f"{self.index_dir}: no such dense index directory; build one with "
                             f"`rankshrink index --dense --encoder MODEL --index {self.index_dir}`")
        if not is_dense_index(self.index_dir):
            what = "a Lucene index (search it without --dense)" if any(self.index_dir.glob("segments_*")) else \
                f"not a dense index (no {INFO_FILE} and {INDEX_FILE})"
            raise InputError(f"{self.index_dir}: {what}")
        self.info = json.loads((self.index_dir / INFO_FILE).read_text(encoding="utf-8"))
        self.docids = (self.index_dir / DOCIDS_FILE).read_text(encoding="utf-8").split("\n")[:-1]
        self.index = faiss.read_index(str(self.index_dir / INDEX_FILE))
        if self.index.ntotal != len(self.docids):
            raise InputError(f"{self.index_dir}: {self.index.ntotal} vectors but {len(self.docids)} docids")
        defaults = self.info.get("search_defaults", {})
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = int(ef_search or defaults.get("ef_search", 256))
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = int(nprobe or defaults.get("nprobe", 32))
        self.encoder_name = str(encoder or self.info["encoder"])
        self.model = load_encoder(self.encoder_name, device, dtype, self.info.get("max_length"))
        self.normalize = self.info["similarity"] == "cosine"
        self.batch_size = batch_size
        self._collection: Collection | None = None

    def __repr__(self) -> str:
        return f"DenseSearcher({str(self.index_dir)!r}, encoder={self.encoder_name!r}, faiss={self.info['faiss']!r})"

    @property
    def num_docs(self) -> int:
        return len(self.docids)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return encode(self.model, queries, kind="query", batch_size=self.batch_size, normalize=self.normalize)

    def search(self, query: str, k: int = 1000) -> dict[str, float]:
        """The top ``k`` passages for ``query`` as ``{docid: inner product}``, best first."""
        return self.batch_search({"q": query}, k=k)["q"]

    def batch_search(self, topics: Mapping[str, str], k: int = 1000, threads: int = 2) -> Run:
        """All ``topics`` ({qid: query}); a Run in the topics' order. ``threads`` sets faiss' OpenMP threads."""
        import faiss

        check_integer("k", k, optional=False)
        for qid, query in topics.items():
            if not isinstance(query, str):
                raise InputError(f"query {qid}: expected a string, got {type(query).__name__}")
        qids = [str(qid) for qid in topics]
        searchable = [i for i, query in enumerate(topics.values()) if query.strip()]
        run: Run = {qid: {} for qid in qids}
        if not searchable:
            return run
        queries = list(topics.values())
        vectors = self.encode_queries([queries[i] for i in searchable])
        faiss.omp_set_num_threads(max(1, int(threads)))
        scores, rows = self.index.search(vectors, min(k, self.num_docs))
        for i, row_scores, row_ids in zip(searchable, scores, rows):
            run[qids[i]] = {self.docids[row]: float(score) for score, row in zip(row_scores, row_ids) if row >= 0}
        return run

    def doc(self, docid: str) -> str:
        """A passage's text, read from the collection the index was built from (when it is still there)."""
        if self._collection is None:
            self._collection = open_collection(self.info["collection"])
        return self._collection[docid]

    def texts(self, docids: Iterable[str]) -> list[str]:
        return [self.doc(docid) for docid in docids]
