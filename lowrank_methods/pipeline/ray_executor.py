"""``--executor ray``: modules merged by Ray workers (this machine's, or a cluster's), streamed back in plan order.

The driver does what the local executor's reader does — reads each module's stored factors and converts them
(scales folded, NaN refused) — and sends them with the recipe's text to a Ray task. A worker parses the recipe once,
merges the module with ONE intra-op thread (as every local worker does, ``threads.py``) and returns the
``ModuleResult``; the driver hands results to the one writer strictly in plan order, with at most ``window``
modules in flight, so memory stays a few modules on either side. Same code, same single-threaded kernels: the
output is byte-identical to the local executor's (on workers of the same CPU type and torch build).

``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` (``ray start --head`` / ``ray start --address …`` on the
nodes; every node needs this package installed), else starts a local one with ``threads`` CPUs (its session files in a temporary directory), shut down and
removed after.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator

from lowrank_methods.core.errors import MergeError

if TYPE_CHECKING:
    from lowrank_methods.core.types import ModuleResult

EXECUTORS = ("local", "ray")


def ray_module():
    try:
        import ray
    except ImportError as e:
        raise MergeError("--executor ray needs Ray: pip install 'mergekit-lowrank[ray]'") from e
    return ray


@functools.lru_cache(maxsize=4)
def _recipe(text: str):
    from lowrank_methods.pipeline.recipe import parse_recipe

    return parse_recipe(text)


def merge_task(merge: Callable, text: str, module: str, t: float, factors: list, weights: list[float]) -> ModuleResult:
    """What a Ray worker runs: ``merge`` (the engine's per-module merge) on one module of the recipe ``text``, on
    the CPU with one intra-op thread."""
    import torch

    torch.set_num_threads(1)
    recipe = _recipe(text)
    return merge(recipe, module, factors, weights, recipe.params_for(module, t))


def ray_merged(modules: list[str], prepare: Callable[[str], tuple], merge: Callable, text: str, workers: int
               ) -> Iterator[tuple[str, ModuleResult]]:
    """Yield (module, result) in the order of ``modules``; ``prepare(module)`` gives (t, factors, weights) on the
    driver, ``merge`` is the engine's per-module merge (sent by reference). At most 2 × ``workers`` modules are in
    flight; an error is raised when its module's turn comes."""
    with ray_cluster(workers) as ray:
        remote = ray.remote(num_cpus=1)(merge_task)
        window: deque = deque()
        try:
            for module in modules:
                window.append((module, remote.remote(merge, text, module, *prepare(module))))
                if len(window) > 2 * workers:
                    yield result_of(ray, *window.popleft())
            while window:
                yield result_of(ray, *window.popleft())
        finally:
            for _, ref in window:
                ray.cancel(ref, force=True)


@contextlib.contextmanager
def ray_cluster(cpus: int):
    """Ray, joined to ``RAY_ADDRESS``'s cluster or to a local one of ``cpus`` CPUs started here (its session files in
    a temporary directory, removed after); a cluster this process started is shut down on exit."""
    ray = ray_module()
    started = not ray.is_initialized()
    session = None
    if started:
        address = os.environ.get("RAY_ADDRESS")
        if not address:  # a local cluster keeps its sockets and logs here, removed after (short: socket paths)
            session = tempfile.mkdtemp(prefix="mkl-ray-")
        ray.init(**({} if address else {"num_cpus": cpus, "_temp_dir": session}), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
        if session:
            shutil.rmtree(session, ignore_errors=True)


def result_of(ray, module: str, ref):
    """(module, the task's result), or the error it raised as itself (a MergeError stays one line)."""
    try:
        return module, ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise MergeError(f"a Ray worker failed: {str(e).splitlines()[0]}", module=module) from e
