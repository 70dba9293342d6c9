"""mergekit's task graph with every tensor's merge on a Ray worker: ``--executor ray`` for full-model recipes.

mergekit's ``Executor`` walks its schedule one task at a time. ``RayExecutor`` walks the same schedule, but each
``ExecuteMergeMethodTask`` (one output tensor's merge: ``lore``, our dense forms, any mergekit method) is sent to a
Ray task, and the walk goes on loading the next tensors while up to ``window`` merges are in flight. Reads
(``LoadTensor``, ``GatherTensors``) may run ahead; every other task (the writer's saves, finalisation, the
tokenizer) runs on the driver in schedule order, once the results it needs are back. So the writer receives the
same tensors in the same order as under mergekit's executor, and the files are byte-identical — provided each
worker computes with the intra-op thread count the local run used (``--threads``: an SVD's last bits depend on it),
on the same CPU type and torch build. Values are dropped once their last consumer has run.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Iterator

import tqdm
from mergekit.graph import Executor, TaskHandle
from mergekit.io.tasks import GatherTensors, LoadTensor
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

from lowrank_methods.pipeline.ray_executor import ray_module, result_of

READS = (LoadTensor, GatherTensors)  # no side effects: may run before earlier tasks of the schedule


def execute_on_worker(task: ExecuteMergeMethodTask, arguments: dict, threads: int, device: str):
    """What a Ray worker runs: one tensor's merge, with our methods registered and ``threads`` intra-op threads;
    on ``device`` "cuda" (the GPU Ray gave this task) where the method asks for an accelerator, returned on the CPU."""
    import torch

    from lowrank_methods.mergekit_plugin import register

    torch.set_num_threads(threads)
    register()
    if device != "cpu" and task.uses_accelerator():
        arguments = {k: {m: t.to(device) for m, t in v.items()} if isinstance(v, dict) else v
                     for k, v in arguments.items()}
    result = task.execute(**arguments)
    return result.cpu() if isinstance(result, torch.Tensor) else result


class RayExecutor(Executor):
    """mergekit's ``Executor`` with the merges on Ray: CPU tasks of ``threads`` intra-op threads each, or (math
    device cuda) tasks of one GPU each. Tasks left on the driver compute on its CPU."""

    def __init__(self, targets, math_device="cpu", storage_device="cpu", cached_values=None, *, threads: int,
                 window: int):
        super().__init__(targets, math_device=math_device, storage_device=storage_device, cached_values=cached_values)
        self.threads, self.window = threads, window
        self.device = "cuda" if self.math_device.type == "cuda" else "cpu"

    def _run(self, quiet: bool = False, desc: str | None = None) -> Iterator[tuple[TaskHandle, Any]]:
        ray = ray_module()
        gpu = self.device == "cuda"
        remote = ray.remote(num_cpus=1 if gpu else self.threads, num_gpus=1 if gpu else 0)(execute_on_worker)
        schedule = list(self.schedule.tasks)
        uses = Counter(dep for handle in schedule for dep in handle.arguments().values())
        values: dict[TaskHandle, Any] = dict(self.cached_values or {})
        in_flight: dict[TaskHandle, Any] = {}  # merge task → its Ray reference, oldest first
        waiting: deque[TaskHandle] = deque()  # tasks run later, in schedule order
        held = set()  # the handles in ``waiting``

        def remote_merge(handle: TaskHandle) -> bool:
            return isinstance(handle.task(), ExecuteMergeMethodTask) and handle not in self.targets

        def collect(handle: TaskHandle) -> None:
            values[handle] = self._move_tensors(result_of(ray, handle.task().output_weight.name,
                                                          in_flight.pop(handle))[1], self.storage_device)

        def release_inputs(handle: TaskHandle) -> None:
            for dep in handle.arguments().values():
                uses[dep] -= 1
                if uses[dep] == 0:
                    values.pop(dep, None)

        def start(handle: TaskHandle) -> Iterator[tuple[TaskHandle, Any]]:
            """Run ``handle`` here, or send it to a worker if it is a merge (its inputs are all here)."""
            task = handle.task()
            arguments = {name: values[dep] for name, dep in handle.arguments().items()}
            if remote_merge(handle):
                if len(in_flight) >= self.window:
                    collect(next(iter(in_flight)))
                in_flight[handle] = remote.remote(task, arguments, self.threads, self.device)
                del arguments
                release_inputs(handle)
                return
            values[handle] = self._move_tensors(task.execute(**arguments), self.storage_device)
            del arguments
            release_inputs(handle)
            if handle in self.targets:
                yield handle, values[handle]
            if uses[handle] == 0:
                values.pop(handle, None)

        def ready(handle: TaskHandle, block: bool) -> bool:
            """Are ``handle``'s inputs all here? Finished merges are collected; with ``block``, waited for."""
            pending = [dep for dep in handle.arguments().values() if dep in in_flight]
            if pending and not block:
                finished, _ = ray.wait([in_flight[dep] for dep in pending], num_returns=len(pending), timeout=0)
                if len(finished) < len(pending):
                    return False
            for dep in pending:
                collect(dep)
            return True

        def drain(block: bool) -> Iterator[tuple[TaskHandle, Any]]:
            while waiting and ready(waiting[0], block):
                handle = waiting.popleft()
                held.discard(handle)
                yield from start(handle)

        try:
            for handle in tqdm.tqdm(schedule, disable=quiet, desc=desc or "Executing graph on Ray"):
                deps = handle.arguments().values()
                may_run_ahead = remote_merge(handle) or isinstance(handle.task(), READS)
                if any(dep in held or dep in in_flight for dep in deps) or (waiting and not may_run_ahead):
                    waiting.append(handle)
                    held.add(handle)
                else:
                    yield from start(handle)
                yield from drain(block=False)
            yield from drain(block=True)
            assert not waiting and not in_flight, "every task ran"
        finally:
            for ref in in_flight.values():
                ray.cancel(ref, force=True)
