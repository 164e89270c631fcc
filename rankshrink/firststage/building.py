"""What every index build and searcher shares: a safe target directory, publishing a finished build in one
rename, batching a collection, telling one collection from another, and checking ``k``."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..data import Collection
from ..errors import InputError


def check_writable_index_dir(index_dir: Path, overwrite: bool) -> None:
    if index_dir.exists() and not index_dir.is_dir():
        raise InputError(f"{index_dir}: exists and is not a directory")
    if index_dir.is_dir() and any(index_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{index_dir}: already exists; pass --overwrite (overwrite=True) to replace it")
        if not (any(index_dir.glob("segments_*")) or (index_dir / "dense.json").exists()):
            raise InputError(f"{index_dir}: not an index (no Lucene segments, no dense.json); refusing to replace "
                             f"a directory that may hold other files")
    index_dir.parent.mkdir(parents=True, exist_ok=True)


def publish_directory(new: Path, target: Path, replace: bool = True) -> bool:
    """Move the finished build ``new`` to ``target`` (an old ``target`` is set aside first and deleted after
    the swap), readable as any directory the user creates (mkdtemp made it private). With ``replace=False`` an
    index that another process published at ``target`` during this build is kept and ``new`` deleted: replacing
    its files under that process's open reader would corrupt its searches. Returns whether ``new`` was published."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (new, *new.iterdir()):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    if not replace:
        try:
            os.rename(new, target)   # fails on a non-empty target, unlike os.replace of a file
            return True
        except OSError:
            if not (target.is_dir() and any(target.iterdir())):
                raise
            shutil.rmtree(new, ignore_errors=True)
            return False
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def batches(passages: Iterable, size: int) -> Iterator[list]:
    batch = []
    for passage in passages:
        batch.append(passage)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_hint(passages: Collection) -> int | None:
    """Number of passages for the progress bar: lines of a file (a fast byte count), or ir_datasets' count."""
    path = Path(passages.source)
    if path.is_file():
        count, last = 0, b"\n"
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                count += chunk.count(b"\n")
                last = chunk[-1:]
        return count + (last != b"\n")
    try:
        return len(passages)
    except Exception:  # an ir_datasets id whose count needs a download: show a bar without a total
        return None


def source_identity(source: str | Path) -> dict:
    """Enough to notice that a collection (a file, or an ir_datasets id) is another one than before: for a file,
    its absolute path, size and modification time."""
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"irds": str(source)}
