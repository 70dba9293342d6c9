"""`mergekit-lowrank merge` and `validate` for recipes of full-model methods (``lore``): mergekit runs them.

LoRE is a dense method on full fine-tuned models: there are no LoRA factors for our engine to stream, and
mergekit already plans, loads (local directories, Hub ids), shards and writes full models. So the recipe is
checked like any other (names, parameters, before anything is loaded) and handed to mergekit's own
``run_merge``, writing into our staging directory: the output is owned, replaced and cleaned up exactly like
every other output of ours.
"""

from __future__ import annotations

from pathlib import Path

from lowrank_methods.core.errors import RecipeError
from lowrank_methods.mergekit_plugin.route import FULL_MODEL_METHODS



def is_full_model_recipe(text: str) -> bool:
    """True for a recipe whose merge_method is one of ours that runs on full models through mergekit."""
    from lowrank_methods.pipeline.recipe import load_yaml

    data = load_yaml(text)
    return isinstance(data, dict) and data.get("merge_method") in FULL_MODEL_METHODS


def mergekit_config(text: str):
    """The recipe as mergekit's MergeConfiguration, checked as ``mergekit-yaml`` would check it with the plugin."""
    from pydantic import ValidationError

    import mergekit.merge  # noqa: F401  (the start-up hook registers our methods and patches here)
    from mergekit.config import MergeConfiguration

    from lowrank_methods.pipeline.recipe import load_yaml
    from lowrank_methods.core.method import _one_line
    from lowrank_methods.mergekit_plugin import patch
    from lowrank_methods.mergekit_plugin.route import check

    patch()  # idempotent: also where the start-up hook is not installed (e.g. a source checkout)
    try:
        config = MergeConfiguration.model_validate(load_yaml(text))
    except (ValidationError, RuntimeError) as e:  # mergekit's model references raise RuntimeError("Can't parse …")
        raise RecipeError(f"recipe: {_one_line(e)}") from e
    check(config, text)
    return config


def run_full_model_merge(text: str, out: str | Path, *, overwrite: bool, device: str, quiet: bool,
                         write_card: bool) -> Path:
    """Merge full models with mergekit's planner and writer into a staged ``out``; returns ``out``."""
    import mergekit.merge
    from mergekit.options import MergeOptions

    from lowrank_methods.pipeline.staging import StagedOutput
    from lowrank_methods.mergekit_plugin.swap import original

    config = mergekit_config(text)
    inputs = tuple(Path(str(m.model.path)) for m in config.referenced_models() if Path(str(m.model.path)).exists())
    with StagedOutput(out, overwrite=overwrite, inputs=inputs) as stage:
        options = MergeOptions(device=None if device == "auto" else device, cuda=device.startswith("cuda"),
                               quiet=quiet, write_model_card=write_card)
        original(mergekit.merge, "run_merge")(config, str(stage.path), options, config_source=text)
        return stage.commit()
