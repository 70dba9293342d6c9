"""One table from the recipe's ``output:`` to the writer that writes it, and the job every writer is built from.

The pipeline decides everything a writer needs before the first module (the staging directory, the resolved base
model, the public names of the inputs) and puts it in one ``OutputJob``; the writer only writes files into it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lowrank_methods.core.errors import BaseModelError, MergeError
from lowrank_methods.formats.bundle import BundleWriter
from lowrank_methods.formats.full_model import FullModelWriter
from lowrank_methods.formats.peft import AdapterWriter
from lowrank_methods.formats.writer import OutputJob, TaskRef, Writer
from lowrank_methods.publish.card import is_local_path
from lowrank_methods.publish.hub import resolve_model

WRITERS = {"adapter": AdapterWriter, "bundle": BundleWriter, "model": FullModelWriter}


def open_writer(ready, stage, *, extra_keys: list[str], dtype: torch.dtype, shard_size: int | str | None = None,
                copy_tokenizer: bool = True) -> Writer:
    """The writer for ``ready.recipe.output`` (``ready``: the engine's Prepared), writing into ``stage.path``; the
    caller commits or removes the stage. ``shard_size`` and ``copy_tokenizer`` are for ``output: model``."""
    recipe = ready.recipe
    writer = WRITERS.get(recipe.output)
    if writer is None:
        raise MergeError(f"output: {recipe.output} is not available for method {recipe.method.name!r}")
    job = OutputJob(
        path=stage.path, modules=ready.plan.modules, layouts=ready.plan.layouts, dtype=dtype,
        extra_keys=list(extra_keys), scratch=stage.scratch, sources=ready.sources,
        tasks=[TaskRef(ref.name, public_source(ref.adapter), ref.revision) for ref in recipe.adapters],
        settings=dict(recipe.settings), base=ready.base,
    )
    if recipe.output == "model":
        job = replace(job, base_dir=base_model_dir(ready.base), model_dtype=dtype if recipe.dtype else None,
                      shard_size=shard_size, copy_tokenizer=copy_tokenizer)
    return writer(job)


def base_model_dir(base: str | None) -> Path:
    """The local directory of the base model that ``output: model`` adds the update to (fetched from the Hub
    when ``base`` is a repo id)."""
    if not base:
        raise BaseModelError("output: model needs the base model: set base_model in the recipe (no adapter names "
                             "its base_model_name_or_path)")
    return resolve_model(base)


def public_source(source: str) -> str:
    """A task's source as recorded in a bundle that may be pushed: a local absolute path becomes its directory name."""
    return Path(source.rstrip("/\\")).name if is_local_path(source) else source
