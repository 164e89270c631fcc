"""rankshrink index --collection PATH_OR_IRDS_ID --index DIR [--threads N] [--overwrite] [--recipe indexes/X.yaml]
                 [--dense --encoder MODEL [--faiss flat|hnsw|ivfpq] [--dtype auto|fp32|bf16]]"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError

RECIPE_KEYS = {"collection", "index", "threads", "description", "source", "dense", "encoder", "faiss", "dtype",
               "max_length"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help="build a Lucene (BM25) or, with --dense, a faiss index from a collection",
        description="Index a JSONL ({id, contents}) or TSV (id<TAB>text) collection, or an ir_datasets id. By "
                    "default: a Lucene index with positions, document vectors and raw text stored (as Pyserini's "
                    "DefaultLuceneDocumentGenerator). With --dense: passages encoded by a sentence-transformers "
                    "bi-encoder into a faiss index (resumable: run the same command again after an interruption). "
                    "Either way the index is built beside DIR and renamed into place when complete.")
    parser.add_argument("--collection", help="JSONL / TSV file or ir_datasets id (e.g. msmarco-passage)")
    parser.add_argument("--index", help="the index directory to create")
    parser.add_argument("--recipe", type=Path, help="an indexes/*.yaml recipe (flags override its values)")
    parser.add_argument("--threads", type=int, help="indexing threads (default: 2)")
    parser.add_argument("--batch-size", type=int,
                        help="passages per Lucene batch (default 1000) or per encoder batch with --dense (default 64)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    dense = parser.add_argument_group("dense (sentence-transformers + faiss)")
    dense.add_argument("--dense", action="store_true", help="build a dense index instead of a Lucene one")
    dense.add_argument("--encoder", help="sentence-transformers model: a local directory or a Hugging Face hub id")
    dense.add_argument("--faiss", choices=["flat", "hnsw", "ivfpq"],
                       help="flat: exact inner product (default); hnsw: graph, fast approximate search; "
                            "ivfpq: compressed codes, 1/32 of flat's memory, approximate")
    dense.add_argument("--dtype", choices=["auto", "fp32", "bf16"],
                       help="encoding precision; auto (default) is bf16 where the CPU/GPU has bf16 arithmetic")
    dense.add_argument("--max-length", type=int, help="encoder max tokens per passage (default: the model's)")
    dense.add_argument("--shard-size", type=int, default=8192, help="passages per saved shard (the unit of resume)")
    dense.add_argument("--no-resume", action="store_true", help="discard an unfinished build instead of resuming it")
    dense.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.set_defaults(handler=run)


def read_recipe(path: Path) -> dict:
    """An index recipe: a YAML mapping with ``collection`` and ``index`` (and optionally ``threads``, or
    ``dense: true`` with ``encoder``, ``faiss``, ``dtype``, ``max_length``)."""
    import yaml

    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(recipe, dict):
        raise InputError(f"{path}: expected a mapping with keys collection, index")
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(RECIPE_KEYS))}")
    return recipe


def options(args: argparse.Namespace) -> dict:
    """Flags over recipe values over defaults."""
    recipe = read_recipe(args.recipe) if args.recipe else {}
    flag = lambda name: getattr(args, name, None)  # noqa: E731
    chosen = {name: flag(name) if flag(name) is not None else recipe.get(name)
              for name in ("collection", "index", "threads", "encoder", "faiss", "dtype", "max_length")}
    chosen["dense"] = bool(flag("dense") or recipe.get("dense"))
    chosen["threads"] = chosen["threads"] or 2
    for name in ("collection", "index"):
        if not chosen[name]:
            raise InputError(f"--{name} is required (or a --recipe that names it)")
    if chosen["dense"] and not chosen["encoder"]:
        raise InputError("--dense needs --encoder MODEL (a sentence-transformers directory or hub id)")
    if not chosen["dense"]:
        given = [name for name in ("encoder", "faiss", "dtype", "max_length") if chosen[name]]
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} applies to dense indexes; add --dense")
    return chosen


def run(args: argparse.Namespace) -> int:
    chosen = options(args)
    if chosen["dense"]:
        from ..firststage import build_dense_index

        info = build_dense_index(
            str(chosen["collection"]), chosen["index"], chosen["encoder"], faiss_kind=chosen["faiss"] or "flat",
            dtype=chosen["dtype"] or "auto", batch_size=args.batch_size or 64, shard_size=args.shard_size,
            max_length=chosen["max_length"], device=args.device, overwrite=args.overwrite,
            resume=not args.no_resume, progress=not args.quiet)
        resumed = f", {info.resumed_passages:,} resumed from an earlier run" if info.resumed_passages else ""
        print(f"encoded {info.documents:,} passages from {info.collection} into {chosen['index']} "
              f"({info.faiss_factory}, {info.dimension} dims, {info.dtype}) in {info.encode_seconds:.1f} s "
              f"({info.passages_per_second:.1f} passages/s{resumed})")
        return 0
    from ..firststage import build_index

    info = build_index(str(chosen["collection"]), chosen["index"], threads=int(chosen["threads"]),
                       overwrite=args.overwrite, batch_size=args.batch_size or 1000, progress=not args.quiet)
    print(f"indexed {info.documents:,} passages from {info.collection} into {chosen['index']} "
          f"in {info.seconds:.1f} s ({info.threads} threads)")
    return 0
