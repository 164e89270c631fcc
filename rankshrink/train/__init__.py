"""Training: teacher scores → a width/depth-adaptive student with self-distilled exit heads.

``groups.py`` builds listwise training data, ``teacher.py`` scores it (cached), ``losses.py`` holds the
losses, ``distill.py`` runs the stages, ``recipe.py`` reads the ``train:`` section of a recipe.

>>> from rankshrink.train import train_recipe
>>> train_recipe(yaml.safe_load(open("pipelines/trec-dl-offline.yaml"))["train"])   # doctest: +SKIP
PosixPath('models/trec-dl-offline')
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .distill import Trainer
from .groups import TrainingGroup, build_groups, sample_list, split_queries
from .recipe import TrainSpec, train_spec_from_dict
from .teacher import teacher_from_spec

__all__ = ["TrainSpec", "Trainer", "TrainingGroup", "build_groups", "sample_list", "split_queries",
           "teacher_from_spec", "train_recipe", "train_spec_from_dict"]


def train_recipe(section: Mapping[str, Any], *, smoke: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print) -> Path:
    """Train the model a recipe's ``train:`` section describes; returns its model directory."""
    spec = train_spec_from_dict(section)
    if smoke:
        spec = spec.smoke_version()
    return Trainer(spec, progress=progress, log=log).run()
