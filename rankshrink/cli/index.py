"""rankshrink index --collection PATH_OR_IRDS_ID --index DIR [--threads N] [--overwrite] [--recipe indexes/X.yaml]"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help="build a Lucene (BM25) index from a collection",
        description="Index a JSONL ({id, contents}) or TSV (id<TAB>text) collection, or an ir_datasets id, into a "
                    "Lucene index with positions, document vectors and raw text stored (as Pyserini's "
                    "DefaultLuceneDocumentGenerator). The index is built beside DIR and renamed into place when "
                    "complete; an interrupted build leaves nothing that looks like an index.")
    parser.add_argument("--collection", help="JSONL / TSV file or ir_datasets id (e.g. msmarco-passage)")
    parser.add_argument("--index", help="the index directory to create")
    parser.add_argument("--recipe", type=Path,
                        help="an indexes/*.yaml recipe giving collection, index, threads (flags override it)")
    parser.add_argument("--threads", type=int, help="indexing threads (default: 2)")
    parser.add_argument("--batch-size", type=int, default=1000, help="passages sent to Lucene at once")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def read_recipe(path: Path) -> dict:
    """An index recipe: a YAML mapping with ``collection`` and ``index`` (and optionally ``threads``)."""
    import yaml

    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(recipe, dict):
        raise InputError(f"{path}: expected a mapping with keys collection, index")
    known = {"collection", "index", "threads", "description", "source"}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    return recipe


def options(args: argparse.Namespace) -> dict:
    """Flags over recipe values over defaults."""
    recipe = read_recipe(args.recipe) if args.recipe else {}
    chosen = {
        "collection": args.collection or recipe.get("collection"),
        "index": args.index or recipe.get("index"),
        "threads": args.threads or recipe.get("threads") or 2,
    }
    for name in ("collection", "index"):
        if not chosen[name]:
            raise InputError(f"--{name} is required (or a --recipe that names it)")
    return chosen


def run(args: argparse.Namespace) -> int:
    from ..firststage import build_index

    chosen = options(args)
    info = build_index(str(chosen["collection"]), chosen["index"], threads=int(chosen["threads"]),
                       overwrite=args.overwrite, batch_size=args.batch_size, progress=not args.quiet)
    print(f"indexed {info.documents:,} passages from {info.collection} into {chosen['index']} "
          f"in {info.seconds:.1f} s ({info.threads} threads)")
    return 0
