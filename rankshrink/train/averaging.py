"""An exponential moving average of a model's trainable weights (Polyak averaging, the EMA of fine-tuning
recipes): with ~100 real queries a step's weights swing with the list it saw; the average does not.

>>> average = WeightAverage(trainable, decay=0.998)     # doctest: +SKIP
>>> optimizer.step(); average.update()                    # doctest: +SKIP
>>> with average.applied(): evaluate(model)               # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch


class WeightAverage:
    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"an average's decay is in (0, 1), got {decay}")
        self.parameters = list(parameters)
        self.decay = decay
        self.average = [parameter.detach().clone() for parameter in self.parameters]
        self.updates = 0

    def update(self) -> None:
        """Move the average towards the current weights. Early on the decay is smaller (TensorFlow's
        ``num_updates`` rule), so the first steps do not leave the average near the starting weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for average, parameter in zip(self.average, self.parameters):
                average.lerp_(parameter.detach(), 1.0 - decay)

    def copy_to_model(self) -> None:
        with torch.no_grad():
            for average, parameter in zip(self.average, self.parameters):
                parameter.copy_(average)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model carries the averaged weights; after it, its own again."""
        own = [parameter.detach().clone() for parameter in self.parameters]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for weights, parameter in zip(own, self.parameters):
                    parameter.copy_(weights)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {str(i): average.contiguous() for i, average in enumerate(self.average)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({**tensors, "updates": torch.tensor(self.updates)}, str(path))

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != len(self.average) + 1:
            raise ValueError(f"{path}: {len(tensors) - 1} averaged tensors, the model trains {len(self.average)}")
        self.average = [tensors[str(i)] for i in range(len(self.average))]
        self.updates = int(tensors["updates"])
