"""Teachers: whatever scores every candidate of every training group, with the scores cached on disk.

- ``CrossEncoderTeacher``: any Hugging Face cross-encoder (a hub id such as
  ``cross-encoder/ms-marco-MiniLM-L-12-v2`` when online, or a local directory), through
  sentence-transformers' ``CrossEncoder``; raw logits, no sigmoid.
- ``BiEncoderTeacher``: a sentence-transformers bi-encoder; cosine similarity times ``scale``.
- ``SparseEncoderTeacher``: a learned sparse encoder (SPLADE) through sentence-transformers' ``SparseEncoder``;
  the dot product of query and passage term weights — a first-stage model that scores lists no run covers.
- ``RunTeacher``: the scores of a first-stage run (e.g. SPLADE) for each data set; candidates the run
  lacks get the run's lowest score for that query minus a margin.
- ``FusionTeacher``: a weighted sum of other teachers' scores, each z-normalised within the query — how
  the offline recipe combines the bi-encoder with the shipped first-stage runs.

Scores are cached as JSON under ``cache_dir``: one file per teacher identity (a local model's path and a hash
of the files of its directory; a hub id and the commit its revision resolves to; or run files' hashes),
holding each list's scores keyed by what the list is (data set, qid, query, candidates and their texts). A
rerun of a recipe does not rescore; adding a data set makes a model only score its lists (a run part, whose
identity covers every data set's run file, reads them all again); a fusion caches each part on its own, so
changing a weight or a run rescores no model.

>>> teacher = teacher_from_spec({"bi-encoder": "../shared/models/all-MiniLM-L6-v2"})   # doctest: +SKIP
>>> score_groups(teacher, groups, cache_dir="cache/teacher")                           # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Run, atomic_write, file_sha256, hash_file_into, json_digest, read_run
from ..errors import InputError, check_integer, error_summary
from .groups import TrainingGroup


class Teacher(ABC):
    """Scores the candidates of training groups: one float32 array per group."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What the cache key is made of: kind, model or run, and its settings."""

    @abstractmethod
    def score(self, groups: Sequence[TrainingGroup]) -> list[np.ndarray]:
        """One float32 array per group, aligned with its candidates."""


def model_fingerprint(name_or_path: str, revision: str | None = None) -> dict[str, str]:
    """A local model directory is named by its path and a hash of every file in it (weights, configs, pooling
    and dense modules, tokenizer); a hub id by the id and the commit ``revision`` (default: main) resolves to
    now, so that a repository that moves on is scored again, not read from an older commit's cache."""
    path = Path(name_or_path)
    if not path.exists():
        return {"model": name_or_path, "revision": hub_commit(name_or_path, revision)}
    if revision is not None:
        raise InputError(f"teacher {name_or_path}: a revision ({revision!r}) names a commit of a hub id, "
                         f"not of a local directory")
    digest = hashlib.sha256()
    files = sorted(f.relative_to(path) for f in path.rglob("*") if f.is_file())
    for name in (f for f in files if not any(part.startswith(".") for part in f.parts)):   # not .cache/ etc.
        digest.update(str(name).encode() + b"\0")
        hash_file_into(digest, path / name)
    return {"model": str(path.resolve()), "files_sha256": digest.hexdigest()}


def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit a hub model's ``revision`` (a branch, tag or commit; default: main) resolves to: asked of the
    hub when online, read from the local Hugging Face cache when not."""
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as error:  # offline and not cached, unknown id, gated repo: one message for all
        raise InputError(f"teacher {repo_id}: not a local directory, and resolving it on the Hugging Face hub "
                         f"failed ({error_summary(error)})") from error
    return Path(config).parent.name   # the cache keeps every file of a commit under snapshots/<commit>/


class ModelTeacher(Teacher):
    """A teacher that loads a model: a local directory, or a hub id at ``revision``. Its scores come from the
    commit its cache key names (``fingerprint``)."""

    def __init__(self, model: str, revision: str | None = None):
        self.model_name, self.revision = model, revision
        self._fingerprint: dict[str, str] | None = None

    def fingerprint(self) -> dict[str, str]:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_name, self.revision)
        return self._fingerprint

    def load_options(self) -> dict[str, str]:
        """What sentence-transformers' loaders need to read the fingerprinted files: a hub id's commit."""
        commit = self.fingerprint().get("revision")
        return {} if commit is None else {"revision": commit}


class CrossEncoderTeacher(ModelTeacher):
    def __init__(self, model: str, max_length: int = 256, batch_size: int = 32, revision: str | None = None):
        super().__init__(model, revision)
        self.max_length, self.batch_size = max_length, batch_size

    def identity(self) -> dict[str, Any]:
        return {"kind": "cross-encoder", "max_length": self.max_length, **self.fingerprint()}

    def score(self, groups: Sequence[TrainingGroup]) -> list[np.ndarray]:
        import torch
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(self.model_name, max_length=self.max_length, activation_fn=torch.nn.Identity(),
                             **self.load_options())
        pairs = [(group.query, text) for group in groups for text in group.texts]
        scores = model.predict(pairs, batch_size=self.batch_size, show_progress_bar=True,
                               activation_fn=torch.nn.Identity())
        return _split(np.asarray(scores, dtype=np.float32).reshape(-1), groups)


class BiEncoderTeacher(ModelTeacher):
    def __init__(self, model: str, scale: float = 20.0, batch_size: int = 64, max_length: int | None = None,
                 revision: str | None = None):
        super().__init__(model, revision)
        self.scale, self.batch_size, self.max_length = scale, batch_size, max_length

    def identity(self) -> dict[str, Any]:
        return {"kind": "bi-encoder", "scale": self.scale, "max_length": self.max_length, **self.fingerprint()}

    def score(self, groups: Sequence[TrainingGroup]) -> list[np.ndarray]:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(self.model_name, device="cpu", **self.load_options())
        if self.max_length:
            model.max_seq_length = self.max_length
        texts, rows = _distinct_texts(groups)
        passages = model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                show_progress_bar=True, convert_to_numpy=True)
        queries = model.encode([group.query for group in groups], batch_size=self.batch_size,
                               normalize_embeddings=True, convert_to_numpy=True)
        return [self.scale * (passages[group_rows] @ queries[i]).astype(np.float32)
                for i, group_rows in enumerate(rows)]


class SparseEncoderTeacher(ModelTeacher):
    def __init__(self, model: str, max_length: int = 256, batch_size: int = 32, revision: str | None = None):
        super().__init__(model, revision)
        self.max_length, self.batch_size = max_length, batch_size

    def identity(self) -> dict[str, Any]:
        return {"kind": "sparse-encoder", "max_length": self.max_length, **self.fingerprint()}

    def score(self, groups: Sequence[TrainingGroup]) -> list[np.ndarray]:
        from sentence_transformers import SparseEncoder

        model = SparseEncoder(self.model_name, device="cpu", **self.load_options())
        model.max_seq_length = self.max_length
        texts, rows = _distinct_texts(groups)
        passages = _csr(model.encode_document(texts, batch_size=self.batch_size, show_progress_bar=True,
                                              convert_to_sparse_tensor=True))
        queries = _csr(model.encode_query([group.query for group in groups], batch_size=self.batch_size,
                                          convert_to_sparse_tensor=True))
        return [np.asarray((passages[group_rows] @ queries[i].T).toarray(), dtype=np.float32).reshape(-1)
                for i, group_rows in enumerate(rows)]


def _distinct_texts(groups: Sequence[TrainingGroup]) -> tuple[list[str], list[list[int]]]:
    """Each passage text once (a passage in several lists is encoded once), and each group's rows among them."""
    texts = list(dict.fromkeys(text for group in groups for text in group.texts))
    position = {text: i for i, text in enumerate(texts)}
    return texts, [[position[text] for text in group.texts] for group in groups]


def _csr(vectors):
    """A torch sparse (COO) batch of term weights as a SciPy CSR matrix: rows can be picked and multiplied."""
    from scipy.sparse import csr_matrix

    vectors = vectors.coalesce()
    rows, columns = vectors.indices().numpy()
    return csr_matrix((vectors.values().float().numpy(), (rows, columns)), shape=tuple(vectors.shape))


class RunTeacher(Teacher):
    """``runs`` maps a group's ``source`` (data set name) to the run file that scores its candidates.
    ``partial``: a data set without a run scores 0 for every candidate (no opinion; in a fusion the other parts
    decide) instead of raising."""

    def __init__(self, runs: Mapping[str, str | Path], missing_margin: float = 0.1, partial: bool = False):
        self.run_paths = {source: Path(path) for source, path in runs.items()}
        self.missing_margin = missing_margin
        self.partial = partial
        self._runs: dict[str, Run] = {}

    def identity(self) -> dict[str, Any]:
        files = {source: _file_digest(path) for source, path in sorted(self.run_paths.items())}
        return {"kind": "run", "runs": files, "missing_margin": self.missing_margin}

    def score(self, groups: Sequence[TrainingGroup]) -> list[np.ndarray]:
        out = []
        for group in groups:
            if group.source not in self.run_paths and self.partial:
                out.append(np.zeros(len(group), dtype=np.float32))
                continue
            if group.source not in self.run_paths:
                raise InputError(f"run teacher has no run for data set {group.source!r} "
                                 f"(it has {sorted(self.run_paths)})")
            run = self._runs.setdefault(group.source, read_run(self.run_paths[group.source]))
            scores = run.get(group.qid, {})
            if scores:
                lowest = min(scores.values())
                missing = lowest - self.missing_margin * max(abs(lowest), 1e-6)
            else:
                missing = 0.0
            out.append(np.array([scores.get(docid, missing) for docid in group.docids], dtype=np.float32))
        return out


class FusionTeacher(Teacher):
    def __init__(self, parts: Sequence[tuple[Teacher, float]]):
        if not parts:
            raise InputError("a fusion teacher needs at least one part")
        self.parts = list(parts)

    def identity(self) -> dict[str, Any]:
        return {"kind": "fusion", "parts": [{"weight": weight, **teacher.identity()} for teacher, weight in self.parts]}

    def score(self, groups: Sequence[TrainingGroup]) -> list[np.ndarray]:
        return self.fuse([teacher.score(groups) for teacher, _ in self.parts])

    def fuse(self, part_scores: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
        """The weighted sum of each part's scores (``part_scores[i]``: part i's, per group), z-normalised per group."""
        total = [np.zeros(len(scores), dtype=np.float32) for scores in part_scores[0]]
        for (_, weight), scores_by_group in zip(self.parts, part_scores):
            for fused, scores in zip(total, scores_by_group):
                fused += weight * _z_normalised(scores)
        return total


def _z_normalised(scores: np.ndarray) -> np.ndarray:
    spread = scores.std()
    return (scores - scores.mean()) / (spread if spread > 0 else 1.0)


def _file_digest(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"{path}: no such run file")
    return file_sha256(path)


def _split(flat: np.ndarray, groups: Sequence[TrainingGroup]) -> list[np.ndarray]:
    out, start = [], 0
    for group in groups:
        out.append(flat[start:start + len(group)].astype(np.float32))
        start += len(group)
    return out


_TEACHER_KEYS = {"cross-encoder": {"max_length": int, "batch_size": int, "revision": str},
                 "bi-encoder": {"scale": float, "batch_size": int, "max_length": int | None, "revision": str},
                 "sparse-encoder": {"max_length": int, "batch_size": int, "revision": str},
                 "run": {}, "fusion": {}}


def check_teacher_spec(spec: Any, where: str = "teacher", in_fusion: bool = False) -> None:
    """A teacher's recipe entry (``teacher_from_spec``) is well formed: one kind, known keys, numbers where
    numbers go; the error names the key. Nothing is loaded."""
    if not isinstance(spec, Mapping):
        raise InputError(f"{where}: expected a mapping such as {{bi-encoder: PATH}}, got {spec!r}")
    kinds = [key for key in _TEACHER_KEYS if key in spec]
    if len(kinds) != 1:
        raise InputError(f"{where} {dict(spec)}: expected exactly one of {', '.join(_TEACHER_KEYS)}")
    kind = kinds[0]
    allowed = {kind: str, **_TEACHER_KEYS[kind], **({"weight": float} if in_fusion else {})}
    for key, value in spec.items():
        if key not in allowed:
            raise InputError(f"{where}: unknown key {key!r} for a {kind} teacher; expected some of {sorted(allowed)}")
        if kind == "fusion" and key == kind:
            if not isinstance(value, list) or not value:
                raise InputError(f"{where}.fusion: expected a list of parts, got {value!r}")
            for i, part in enumerate(value):
                check_teacher_spec(part, f"{where}.fusion[{i}]", in_fusion=True)
        elif allowed[key] is str:
            if not isinstance(value, str) or not value:
                raise InputError(f"{where}.{key}: expected a name, path or revision, got {value!r}")
        elif allowed[key] is float:    # a weight or a scale
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{where}.{key}: expected a number, got {value!r}")
        else:
            check_integer(f"{where}.{key}", value, optional=allowed[key] == int | None)


def teacher_from_spec(spec: Mapping[str, Any], runs_by_source: Mapping[str, Mapping[str, Path]] | None = None) -> Teacher:
    """Build a teacher from its recipe entry:

    ``{"cross-encoder": NAME_OR_PATH, "max_length": 256}``, ``{"bi-encoder": NAME_OR_PATH, "scale": 20}``,
    ``{"sparse-encoder": NAME_OR_PATH, "max_length": 256}`` (SPLADE) — a hub id's optionally with a
    ``"revision"`` (branch, tag or commit; default main), ``{"run": RUN_NAME}`` (that run of each
    training data set: ``runs_by_source[source][RUN_NAME]``), or
    ``{"fusion": [PART, ...]}`` where each part is one of those with a ``weight``; in a fusion, a run part
    scores only the data sets that have that run (the others' lists are fused from the remaining parts).
    """
    check_teacher_spec(spec)
    return _teacher_from_spec(spec, runs_by_source, in_fusion=False)


def _teacher_from_spec(spec: Mapping[str, Any], runs_by_source: Mapping[str, Mapping[str, Path]] | None,
                       in_fusion: bool) -> Teacher:
    kind = next(key for key in _TEACHER_KEYS if key in spec)
    revision = spec.get("revision")
    if kind == "cross-encoder":
        return CrossEncoderTeacher(str(spec[kind]), int(spec.get("max_length", 256)), int(spec.get("batch_size", 32)),
                                   revision)
    if kind == "bi-encoder":
        return BiEncoderTeacher(str(spec[kind]), float(spec.get("scale", 20.0)), int(spec.get("batch_size", 64)),
                                spec.get("max_length"), revision)
    if kind == "sparse-encoder":
        return SparseEncoderTeacher(str(spec[kind]), int(spec.get("max_length", 256)), int(spec.get("batch_size", 32)),
                                    revision)
    if kind == "run":
        name = str(spec[kind])
        runs_by_source = runs_by_source or {}
        available = {source: runs[name] for source, runs in runs_by_source.items() if name in runs}
        if not available:
            raise InputError(f"teacher run {name!r}: no training data set has a run of that name")
        return RunTeacher(available, partial=in_fusion)
    parts = spec[kind]
    return FusionTeacher([(_teacher_from_spec({k: v for k, v in part.items() if k != "weight"}, runs_by_source,
                                              in_fusion=True), float(part.get("weight", 1.0))) for part in parts])


def score_groups(teacher: Teacher, groups: Sequence[TrainingGroup], cache_dir: str | Path | None) -> None:
    """Set ``group.teacher`` for every group: cached lists are read, only the others are scored (and added to
    the cache, atomically). A fusion's parts are cached one by one and fused afterwards."""
    for group, scores in zip(groups, _cached_scores(teacher, groups, cache_dir)):
        group.teacher = np.asarray(scores, dtype=np.float32)


def _cached_scores(teacher: Teacher, groups: Sequence[TrainingGroup], cache_dir: str | Path | None
                   ) -> list[np.ndarray]:
    if isinstance(teacher, FusionTeacher):
        return teacher.fuse([_cached_scores(part, groups, cache_dir) for part, _ in teacher.parts])
    if cache_dir is None:
        return teacher.score(groups)
    identity = teacher.identity()
    cache_file = Path(cache_dir) / f"scores-{identity['kind']}-{json_digest(identity)}.json"
    cached: dict[str, list[float]] = json.loads(cache_file.read_text())["scores"] if cache_file.is_file() else {}
    keys = [_list_key(group) for group in groups]
    missing = {key: group for key, group in zip(keys, groups) if key not in cached}
    if missing:
        for key, scores in zip(missing, teacher.score(list(missing.values()))):
            cached[key] = np.asarray(scores, dtype=np.float32).tolist()
        with atomic_write(cache_file) as out:
            json.dump({"teacher": identity, "scores": cached}, out)
    return [np.asarray(cached[key], dtype=np.float32) for key in keys]


def _list_key(group: TrainingGroup) -> str:
    """What a teacher's scores of a list depend on: its data set (which run), query and candidates' texts."""
    return json_digest([group.source, group.qid, group.query, group.docids, group.texts])
