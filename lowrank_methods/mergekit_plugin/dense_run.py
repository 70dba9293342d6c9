"""`mergekit-lowrank merge` and `validate` for recipes over full models: mergekit runs them.

``lore`` (always), and our other methods except rmm when every model is a local full model directory, are dense
merges of full fine-tuned models: there are no LoRA factors for our engine to stream, and mergekit already plans,
loads (local directories, Hub ids), shards and writes full models (each tensor through the method's dense form,
``dense.py``). So the recipe is checked like any other (names, parameters, before anything is loaded) and handed
to mergekit's own ``run_merge``, writing into our staging directory: the output is owned, replaced and cleaned up
exactly like every other output of ours. ``threads`` is each tensor merge's torch intra-op thread count; with
``executor="ray"`` the tensor merges run on Ray workers (``ray_graph.py``), writing the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from lowrank_methods.core.errors import MergeError, RecipeError
from lowrank_methods.mergekit_plugin.route import dense_in_mergekit, mergekit_merge_staged



def is_full_model_recipe(text: str) -> bool:
    """True for a recipe of ours that mergekit runs on full models (``route.dense_in_mergekit``)."""
    from lowrank_methods.pipeline.recipe import load_yaml

    data = load_yaml(text)
    if not isinstance(data, dict):
        return False
    refs = [m.get("model") for m in data.get("models") or [] if isinstance(m, dict)]
    refs += [data["base_model"]] if data.get("base_model") else []
    paths = [r if isinstance(r, str) and "+" not in r else None for r in refs]
    return dense_in_mergekit(data.get("merge_method"), paths)


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
                         write_card: bool, threads: int | None = None, executor: str = "local") -> Path:
    """Merge full models with mergekit's planner and writer into a staged ``out``; returns ``out``."""
    import torch
    from mergekit.options import MergeOptions

    from lowrank_methods.pipeline.threads import available_cores, check_threads

    threads = check_threads(threads)
    if executor == "ray" and device not in ("cpu", "cuda"):
        raise MergeError(f"--executor ray runs each tensor on a worker's CPU or on the GPU Ray gives it: use --device "
                         f"cpu or cuda, not {device}")
    config = mergekit_config(text)
    options = MergeOptions(device=None if device == "auto" else device, cuda=device.startswith("cuda"), quiet=quiet,
                           write_model_card=write_card)
    before = torch.get_num_threads()
    with _executor(executor, threads, available_cores(), gpu=device == "cuda"):
        torch.set_num_threads(threads)
        try:
            return mergekit_merge_staged(config, text, out, options, overwrite=overwrite)
        finally:
            torch.set_num_threads(before)


@contextlib.contextmanager
def _executor(executor: str, threads: int, cpus: int, gpu: bool = False):
    """mergekit's own executor, or (``ray``) ``RayExecutor`` in its place for the duration, on a Ray cluster
    (``RAY_ADDRESS``'s, or a local one of ``cpus`` CPUs), two tensors in flight per ``threads`` of the cluster's CPUs
    (``gpu``: per GPU of the cluster)."""
    if executor == "local":
        yield
        return
    import mergekit.merge

    from lowrank_methods.mergekit_plugin.ray_graph import RayExecutor
    from lowrank_methods.pipeline.ray_executor import ray_cluster

    stock = mergekit.merge.Executor
    with ray_cluster(max(cpus, threads)) as ray:
        if gpu:  # a task asking for a GPU no node has would wait forever
            workers = int(ray.cluster_resources().get("GPU", 0))
            if workers < 1:
                raise MergeError("--device cuda --executor ray: the Ray cluster has no GPU (start the nodes with "
                                 "theirs, or drop --device)")
        else:  # likewise a task asking for more CPUs than any node has
            largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
            if largest < threads:
                raise MergeError(f"--threads {threads}: no node of the Ray cluster has that many CPUs (the largest "
                                 f"has {largest:g}); each tensor's merge is one task of --threads CPUs")
            workers = max(1, int(ray.cluster_resources().get("CPU", cpus)) // threads)
        mergekit.merge.Executor = functools.partial(RayExecutor, threads=threads, window=2 * workers)
        try:
            yield
        finally:
            mergekit.merge.Executor = stock
