"""mergekit-lowrank: merge many LoRA adapters into one, with low-rank merge methods.

    from lowrank_methods import load_recipe, run_merge
    report = run_merge(load_recipe("recipe.yml"), "out/")
"""

from lowrank_methods.core.errors import MergeError
from lowrank_methods.formats.peft import AdapterSource
from lowrank_methods.core.types import LoraFactors
from lowrank_methods.core.method import get_method, list_methods

__all__ = ["MergeError", "AdapterSource", "LoraFactors", "get_method", "list_methods", "load_recipe", "run_merge",
           "load_adapter"]


def load_recipe(path):
    """Parse and validate a mergekit-style recipe file (no adapter is read)."""
    from lowrank_methods.pipeline.recipe import load_recipe as _load

    return _load(path)


def run_merge(recipe, out, **options):
    """Merge a recipe (a path or a parsed Recipe) into ``out``; see engine.run_merge for options."""
    from lowrank_methods.pipeline.engine import run_merge as _run

    return _run(load_recipe(recipe) if not hasattr(recipe, "method") else recipe, out, **options)


def load_adapter(path, dtype=None) -> dict:
    """Every module of a PEFT LoRA adapter as ``{module: LoraFactors}`` (scale folded into B)."""
    import torch

    source = AdapterSource.open(path)
    return {m: source.read_module(m, dtype or torch.float32) for m in source.modules}


from lowrank_methods.formats.bundle import ReversibleBundle  # noqa: E402  (issue 7: reversible bundles of merge_method rmm)

__all__ += ["ReversibleBundle"]
