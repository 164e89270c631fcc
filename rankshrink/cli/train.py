"""rankshrink train RECIPE.yaml [--smoke] [--set KEY=VALUE ...]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="distil a width/depth-adaptive reranker with exit heads from a recipe's train: section",
        description="Runs the recipe's training stages (full network from teacher + labels, rewiring, "
                    "width, width x depth with self-distilled exits). Resumable: run it again after an "
                    "interruption and it continues from the last checkpoint.")
    parser.add_argument("recipe", type=Path, help="a YAML recipe with a train: section (pipelines/*.yaml)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few queries, candidates and steps: checks the whole recipe end to end in minutes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train: key, dotted for nested ones (e.g. losses.hidden_mse=0, "
                             "stages.full.steps=100, data.dl21.repeat=5: a data set by its name, "
                             "output=models/ablation); YAML values")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def read_train_section(recipe: Path, overrides: list[str]) -> dict:
    import yaml

    if not recipe.is_file():
        raise InputError(f"{recipe}: no such recipe file")
    try:
        document = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"{recipe}: invalid YAML ({error})") from None
    if not isinstance(document, dict) or "train" not in document:
        raise InputError(f"{recipe}: no train: section")
    section = document["train"]
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or not key:
            raise InputError(f"--set {override!r}: expected KEY=VALUE")
        target = section
        *parents, last = key.split(".")
        for part in parents:
            target = _child(target, part, override)
        if not isinstance(target, dict):
            raise InputError(f"--set {override!r}: name one of {parents[-1]}'s items (data.NAME.KEY)")
        target[last] = yaml.safe_load(value)
    return section


def _child(target: dict | list, part: str, override: str) -> dict | list:
    if isinstance(target, list):   # data sets, by name
        named = [item for item in target if isinstance(item, dict) and item.get("name") == part]
        if not named:
            raise InputError(f"--set {override!r}: no item named {part!r}")
        return named[0]
    child = target.setdefault(part, {})
    if not isinstance(child, (dict, list)):
        raise InputError(f"--set {override!r}: {part} is not a mapping")
    return child


def run(args: argparse.Namespace) -> int:
    from ..train import train_recipe

    section = read_train_section(args.recipe, args.overrides)
    output = train_recipe(section, smoke=args.smoke, progress=not args.quiet,
                          log=lambda message: print(message, file=sys.stderr))
    print(output)
    return 0
