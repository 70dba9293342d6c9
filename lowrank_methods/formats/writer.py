"""What every output writer is given (``OutputJob``) and what it does with it (``Writer``).

A writer only writes files into ``job.path``: the caller made that directory and owns it (the pipeline's staging
area commits or removes it), so ``abort`` closes what the writer holds open and leaves the directory alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from lowrank_methods.core.errors import MergeError
from lowrank_methods.core.types import LoraFactors, ModuleResult


@dataclass(frozen=True)
class TaskRef:
    """One input adapter as a bundle manifest names it: its name, where it came from (public form), its revision."""

    name: str
    source: str | None
    revision: str | None = None


@dataclass(frozen=True)
class OutputJob:
    """Everything decided before the first module reaches a writer; each writer reads the fields it needs.

    The adapter writer needs path, modules and dtype (and extra_keys); the bundle writer also sources, tasks and
    settings; the full-model writer scratch, layouts, sources, base, base_dir, model_dtype, shard_size and
    copy_tokenizer."""

    path: Path                                  # the directory the files go into (made and owned by the caller)
    modules: list[str]                          # every module, in the order ``add`` receives them
    layouts: dict                               # module -> formats.peft.ModuleLayout (peft imports this file)
    dtype: torch.dtype                          # of written factors and tensors (the recipe's, else the inputs')
    extra_keys: list[str] = field(default_factory=list)  # tensors carried whole (modules_to_save), in order
    scratch: Path | None = None                 # for temporary files, removed by the caller
    sources: list = field(default_factory=list)  # the opened inputs (formats.peft.AdapterSource), recipe order
    tasks: list[TaskRef] = field(default_factory=list)  # the same inputs as the bundle manifest records them
    settings: dict = field(default_factory=dict)  # the recipe's parameters, recorded in a bundle manifest
    base: str | None = None                     # the base model as the recipe names it (in messages)
    base_dir: Path | None = None                # output: model: the base model's local directory, already resolved
    model_dtype: torch.dtype | None = None      # output: model: every float tensor cast to it; None keeps the base's
    shard_size: int | str | None = None         # output: model: bytes per weights file (None: 5B, mergekit's default)
    copy_tokenizer: bool = True                 # output: model: copy the base's tokenizer files too


class Writer(Protocol):
    """An output being written: modules in plan order, then the carried tensors, then ``finish`` (or ``abort``)."""

    def add(self, module: str, layout, result: ModuleResult) -> None:
        """One merged module, in plan order, with its formats.peft.ModuleLayout."""

    def add_extra(self, key: str, tensor: torch.Tensor, module: str) -> None:
        """A tensor an input carries whole (modules_to_save), under its adapter key."""

    def finish(self, config: dict) -> None:
        """Write what is left (configs, manifests, metadata); ``config`` is the first input's adapter_config."""

    def abort(self) -> None:
        """Close whatever is open; the caller removes the directory."""


def merged_factors(result: ModuleResult, module: str, output: str) -> LoraFactors:
    """The merged factors of ``result``, refused when the method gave none (only rmm's bundle tensors)."""
    if result.factors is None:
        raise MergeError(f"the method returned no factors for {module}; it cannot write {output}")
    return result.factors
