"""Score a merged update: add ΔW to the base model's linear weights, then classify every task with its frozen head.

    W_module ← W_module + ΔW_module      (ΔW = B @ A for LoraFactors, or a dense tensor)

No PEFT is needed to evaluate; the base weights are restored afterwards. ``evaluate_adapter_factors`` is the
reusable entry point (also for reconstructed adapters).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping

import torch

from lowrank_methods.core.types import LoraFactors

from .model import Encoder, correct, label_heads

Delta = LoraFactors | torch.Tensor


@dataclass
class Evaluator:
    """The base encoder, the tasks and their frozen heads; scores per-module updates on a split."""

    encoder: Encoder
    tasks: dict  # name -> tasks.Task
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    validation_limit: int | None = None  # score only the first N validation items per task (the search is costly)

    def __post_init__(self):
        if not self.heads:
            self.heads = label_heads(self.encoder, self.tasks)

    def applied(self, deltas: Mapping[str, Delta]):
        return applied(self.encoder.model, deltas)

    @property
    def base_model(self) -> torch.nn.Module:
        return self.encoder.model

    def correct(self, deltas: Mapping[str, Delta], split: str = "test", only: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Per task, per item of ``split``: is base + ``deltas`` right (every task, or the tasks in ``only``)."""
        with self.applied(deltas):
            return {name: correct(self.encoder, self.heads[name], self.examples(name, split)) for name in only or self.tasks}

    def scores(self, deltas: Mapping[str, Delta], split: str = "test", only: list[str] | None = None) -> dict[str, float]:
        """Per-task accuracy of base + ``deltas`` on ``split``."""
        return {name: c.float().mean().item() for name, c in self.correct(deltas, split, only).items()}

    def examples(self, task: str, split: str) -> list[tuple[str, int]]:
        items = self.tasks[task].split(split)
        return items[:self.validation_limit] if split == "validation" and self.validation_limit else items


@contextmanager
def applied(model: torch.nn.Module, deltas: Mapping[str, Delta]):
    """Temporarily add each module's ΔW to the model's weight (in the base layout: nn.Linear is (out, in))."""
    saved = {}
    try:
        with torch.no_grad():
            for module, delta in deltas.items():
                weight = model.get_submodule(module).weight
                dense = delta.dense() if isinstance(delta, LoraFactors) else delta
                if dense.shape != weight.shape:
                    raise ValueError(f"{module}: ΔW has shape {tuple(dense.shape)}, the weight {tuple(weight.shape)}")
                saved[module] = weight.detach().clone()
                weight += dense.to(weight.dtype)
        yield
    finally:
        with torch.no_grad():
            for module, original in saved.items():
                model.get_submodule(module).weight.copy_(original)


def evaluate_adapter_factors(per_module_factors: Mapping[str, Delta], tasks, *, evaluator: Evaluator | None = None,
                             split: str = "test") -> dict[str, float]:
    """Per-task accuracy of the base model (all-MiniLM-L6-v2 unless ``evaluator`` says otherwise) plus the update."""
    if evaluator is None:
        from .model import load_minilm

        evaluator = Evaluator(load_minilm(), tasks)
    return evaluator.scores(per_module_factors, split)
