"""How a merge uses the CPU: parallelism across modules, one intra-op thread per module.

A module's linear algebra is many small ops (QR/SVD of ≤ Σr-wide cores, Tucker/HOOI iterations, rules on r×r
blocks). With torch's intra-op parallelism every one of them is an OpenMP parallel region whose threads wait on
each other; on a machine shared with another busy process, one descheduled thread stalls the whole team at
every op (task arithmetic over 8 Llama-7B-shaped adapters: 7 s alone, 124 s beside a 2-thread matmul loop).
So on the CPU each module is computed with ONE intra-op thread, and ``threads`` worker threads (torch releases
the GIL) merge different modules at once; the results still reach the writer strictly in plan order.

Single-threaded kernels also make the output independent of the thread count: ``--threads 1`` and
``--threads 8`` write byte-identical files. On a GPU the device is the parallelism: one worker, which keeps the
launch order (and so the output) what a plain loop would give.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from lowrank_methods.core.errors import MergeError


def available_cores() -> int:
    """The cores this process may actually run on (its affinity mask: taskset, cgroups' cpusets), not the
    machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> int:
    """``threads`` as given (≥ 1), or the available cores when None; anything else is a one-line refusal."""
    if threads is None:
        return available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise MergeError(f"the thread count must be a whole number ≥ 1 (got {threads!r}): it is how many modules "
                         "are merged at once")
    return threads


@dataclass(frozen=True)
class ThreadPlan:
    workers: int  # modules merged at once
    intra_op: int  # torch intra-op threads inside each module's computation


def plan_threads(threads: int | None, device: torch.device) -> ThreadPlan:
    """CPU: ``threads`` workers × 1 intra-op thread. Other devices: one worker; the CPU-side work of a module
    (dtype conversion, finiteness checks) is small, so it keeps one intra-op thread too."""
    n = check_threads(threads)
    if device.type != "cpu":
        return ThreadPlan(workers=1, intra_op=1)
    return ThreadPlan(workers=n, intra_op=1)


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, restored after. Threads started inside the
    block (the merge workers) take ``n`` as their own count when they first run a torch op."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def pinned_device(device: torch.device) -> torch.device:
    """``cuda`` without an index is the calling thread's current GPU; pinned here, in the caller's thread, because
    each worker thread starts on GPU 0."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_scope(device: torch.device):
    """In a worker thread: make ``device`` the current GPU, so tensors a method creates without naming a device
    land where its inputs are."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
