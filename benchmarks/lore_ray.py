"""LoRE over Ray: a full-model merge measured here (mergekit's executor against ``--executor ray``), and modelled
for a 70B merge on 4 nodes × 8 GPUs from per-tensor costs measured here.

    python -m benchmarks.lore_ray                              # both parts, ~8 min on 2 cores
    python -m benchmarks.lore_ray --skip-measured-merge --update-docs docs/benchmarks.md

Measured part: a Llama-shaped model (hidden 1024, MLP 2816, 4 layers, vocab 4096: 60 M parameters) and 4 full
"fine-tunes" of it (rank-16 task part + noise per matrix, as ``lore_timing``), merged by ``mergekit-lowrank merge``
with LoRE (20 iterations, τ 0.3): mergekit's executor with all cores, then Ray with 1-thread workers (one per core),
then mergekit's executor with 1 thread, whose weights file must be byte-identical to Ray's.

Modelled part: LoRE's iterations are passes over m×n matrices (residuals and their products with thin subspace
bases), so a tensor's cost is ≈ c·m·n. c is measured here on one 70B-shaped matrix (8192², 4 models, 20 iterations)
and converted to a GPU by the slower of two ratios: this CPU's measured rate on LoRE's typical product (8192² by
8192×64, float32) against the GPU's assumed float32 rate, and this CPU's streaming bandwidth against the GPU's. The merge streams:
the driver reads every input once, sends each tensor's 4 inputs to a worker and writes the result, so the wall
time is bounded below by the slowest of disk read, network, and compute / workers (list scheduling in plan order).
"""

from __future__ import annotations

import argparse
import heapq
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.docs import write_section
from benchmarks.lore_timing import models as lore_inputs
from lowrank_methods.core.methods.lore import lore_decompose
from lowrank_methods.pipeline.threads import available_cores

ITERATIONS, TAU, N_MODELS = 20, 0.3, 4
SMALL = {"hidden": 1024, "mlp": 2816, "layers": 4, "heads": 16, "vocab": 4096}
# Llama-3-70B: 80 layers, hidden 8192, MLP 28672, 8 KV heads of 128, vocab 128256, untied embeddings
LLAMA_70B = {"q_proj, o_proj": ((8192, 8192), 160), "k_proj, v_proj": ((1024, 8192), 160),
             "gate_proj, up_proj": ((28672, 8192), 160), "down_proj": ((8192, 28672), 80),
             "embed_tokens, lm_head": ((128256, 8192), 2)}
# the cluster modelled (assumptions, not measurements)
NODES, GPUS_PER_NODE = 4, 8
GPU_FLOPS, GPU_BANDWIDTH, GPU_EFFICIENCY = 67e12, 4.8e12, 0.5  # H200: float32 FLOP/s (no TF32), HBM3e bytes/s; fraction reached
DISK_READ, NETWORK = 3.0e9, 12.5e9  # driver's NVMe read (bytes/s); its 100 Gb/s link to the workers
INPUT_BYTES = 2  # bf16 checkpoints


def write_models(root: Path) -> None:
    """The base (unused by LoRE, the config donor) and 4 fine-tunes, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=SMALL["hidden"], intermediate_size=SMALL["mlp"],
                                         num_hidden_layers=SMALL["layers"], num_attention_heads=SMALL["heads"],
                                         vocab_size=SMALL["vocab"], tie_word_embeddings=False))
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for i in range(N_MODELS):
        with torch.no_grad():
            for name, p in model.named_parameters():
                w = base[name]
                if w.ndim == 2:
                    m, n = w.shape
                    task = torch.randn(m, 16, generator=g) @ torch.randn(16, n, generator=g) * 1.5 / (m * n) ** 0.5
                    p.copy_(w + task + 0.1 / (m**0.5 + n**0.5) * torch.randn(m, n, generator=g))
                else:
                    p.copy_(w)
        model.save_pretrained(root / f"ft{i}")


def merge(recipe: Path, out: Path, threads: int, executor: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from lowrank_methods.cli import main; main()", "merge", str(recipe), str(out), "-q", "--no-card",
                    "--threads", str(threads), "--executor", executor], check=True, capture_output=True)
    return time.perf_counter() - start


def measured_merge(cores: int) -> list[tuple[str, float]]:
    root = Path(tempfile.mkdtemp(prefix="lore-ray-"))
    try:
        write_models(root)
        recipe = root / "lore.yml"
        recipe.write_text(f"merge_method: lore\nbase_model: {root / 'base'}\nmodels:\n"
                          + "".join(f"  - model: {root / f'ft{i}'}\n" for i in range(N_MODELS))
                          + f"parameters: {{tau: {TAU}, iterations: {ITERATIONS}, tol: 0}}\ndtype: float32\n")
        rows = [(f"mergekit's executor, {cores} threads", merge(recipe, root / "local", cores, "local")),
                (f"Ray, {cores} workers × 1 thread (local cluster)", merge(recipe, root / "ray", 1, "ray")),
                ("mergekit's executor, 1 thread", merge(recipe, root / "local1", 1, "local"))]
        same = (root / "ray" / "model.safetensors").read_bytes() == (root / "local1" / "model.safetensors").read_bytes()
        rows.append(("Ray's weights file = 1-thread mergekit's", float(same)))
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cpu_bandwidth() -> float:
    """Bytes/s of a streaming c = a + b over 3 × 512 MiB (best of 3)."""
    a, b = torch.rand(2**27), torch.rand(2**27)
    c = torch.empty_like(a)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.add(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    return 3 * a.numel() * 4 / best


def cpu_gemm_rate() -> float:
    """FLOP/s of LoRE's typical product, an 8192² matrix times an 8192×64 basis, float32 (best of 3)."""
    a, b = torch.randn(8192, 8192), torch.randn(8192, 64)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 8192 * 8192 * 64 / best


def per_element_cost(shape=(8192, 8192)) -> float:
    """Seconds per matrix entry of LoRE's 20 iterations over 4 models, measured on one 70B-shaped matrix."""
    thetas = lore_inputs(shape, "cpu")
    start = time.perf_counter()
    lore_decompose(thetas, tau=TAU, iterations=ITERATIONS, tol=0)
    return (time.perf_counter() - start) / (shape[0] * shape[1])


def list_schedule(costs: list[float], workers: int) -> float:
    """Makespan of tensors handed out in plan order to the first free worker."""
    free = [0.0] * workers
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def modelled(c_cpu: float, bw_cpu: float, flops_cpu: float) -> dict:
    tensors = [m * n for (m, n), count in LLAMA_70B.values() for _ in range(count)]
    elements = sum(tensors)
    c_gpu = c_cpu * max(flops_cpu / GPU_FLOPS, bw_cpu / GPU_BANDWIDTH) / GPU_EFFICIENCY
    workers = NODES * GPUS_PER_NODE
    compute = list_schedule([c_gpu * t for t in tensors], workers)
    read = N_MODELS * elements * INPUT_BYTES / DISK_READ
    network = (N_MODELS + 1) * elements * INPUT_BYTES / NETWORK  # inputs out, merged tensors back
    typical = sorted(tensors)[len(tensors) // 2] * N_MODELS * INPUT_BYTES
    return {"elements": elements, "cpu_total": c_cpu * elements, "c_gpu": c_gpu, "gpu_total": c_gpu * elements,
            "compute": compute, "read": read, "network": network, "wall": max(compute, read, network),
            "largest_task": c_gpu * max(tensors), "window_bytes": 2 * workers * typical}


def render(args, rows, c_cpu, bw_cpu, flops_cpu, model) -> str:
    who = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [f"`python -m benchmarks.lore_ray`: torch {torch.__version__}, {who}; 1-min load average at the end "
             f"{os.getloadavg()[0]:.1f}.", ""]
    if rows:
        lines += [f"Measured: LoRE ({ITERATIONS} iterations, τ {TAU}) over {N_MODELS} full Llama-shaped models of "
                  f"60 M parameters (hidden {SMALL['hidden']}, MLP {SMALL['mlp']}, {SMALL['layers']} layers), "
                  "`mergekit-lowrank merge` wall time including start-up:", "",
                  "| executor | wall s |", "|---|---|"]
        for name, value in rows:
            lines.append(f"| {name} | {'yes' if value else 'NO'} |" if name.startswith("Ray's") else
                         f"| {name} | {value:.1f} |")
        lines += ["", f"Ray's workers against one thread: {rows[2][1] / rows[1][1]:.2f}×; mergekit's own threads: "
                  f"{rows[2][1] / rows[0][1]:.2f}× (this machine's cores share their memory bandwidth, and Ray pays "
                  "≈ 10 s for its cluster and for each worker importing torch and mergekit). The gain is across "
                  "machines, modelled below.", ""]
    m = model
    lines += [f"Modelled: a Llama-3-70B LoRE merge ({N_MODELS} models, {ITERATIONS} iterations; "
              f"{m['elements'] / 1e9:.1f} B matrix entries per model) on {NODES} nodes × {GPUS_PER_NODE} GPUs:", "",
              "| quantity | value | from |", "|---|---|---|",
              f"| LoRE cost per matrix entry, this CPU ({args.threads} threads) | {c_cpu * 1e9:.0f} ns | measured, "
              f"8192² matrix |",
              f"| this CPU's float32 rate on 8192² × 8192×64 | {flops_cpu / 1e9:.0f} GFLOP/s | measured |",
              f"| this CPU's streaming bandwidth | {bw_cpu / 1e9:.1f} GB/s | measured |",
              f"| whole 70B merge on this CPU | {m['cpu_total'] / 3600:.1f} h | c × entries |",
              f"| per entry on one GPU | {m['c_gpu'] * 1e9:.1f} ns | × the slower ratio: H200 float32 "
              f"{GPU_FLOPS / 1e12:.0f} TFLOP/s, {GPU_BANDWIDTH / 1e12:.1f} TB/s, at {GPU_EFFICIENCY:.0%} (assumed) |",
              f"| compute on {NODES * GPUS_PER_NODE} GPUs (plan-order list scheduling) | {m['compute']:.0f} s | "
              f"one GPU: {m['gpu_total']:.0f} s; the embedding alone {m['largest_task']:.1f} s |",
              f"| driver reads {N_MODELS} × 70B bf16 | {m['read']:.0f} s | {DISK_READ / 1e9:.0f} GB/s NVMe (assumed) |",
              f"| network, inputs out + results back | {m['network']:.0f} s | {NETWORK * 8 / 1e9:.0f} Gb/s from the "
              "driver (assumed) |",
              f"| **predicted wall time** | **≈ {m['wall'] / 60:.0f} min** | the largest of the three (they overlap) |",
              f"| driver's object store for the in-flight window (2 tasks per worker) | ≈ {m['window_bytes'] / 1e9:.0f} GB "
              "| median tensor × 4 models × 64 (Ray spills to disk beyond memory) |"]
    lines += ["", "So past one machine LoRE is bound by the single driver's disk and network, not by the GPUs: the "
              "compute of a 70B merge is minutes on 32 GPUs, moving 4 × 140 GB through one reader is longer. Reading "
              "on the workers (a shared filesystem) would remove that bound; the executor does not do it."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for the per-entry cost measurement")
    ap.add_argument("--skip-measured-merge", action="store_true")
    ap.add_argument("--update-docs", type=Path, help="write the section between the lore-ray markers of this file")
    args = ap.parse_args()
    cores = available_cores()
    rows = [] if args.skip_measured_merge else measured_merge(cores)
    for name, value in rows:
        print(f"{name}: {value:.1f}", flush=True)
    torch.set_num_threads(args.threads)
    bw, flops = cpu_bandwidth(), cpu_gemm_rate()
    c = per_element_cost()
    table = render(args, rows, c, bw, flops, modelled(c, bw, flops))
    print(table)
    if args.update_docs:
        write_section("lore-ray", f"## LoRE over Ray\n\n{table}", Path(args.update_docs))


if __name__ == "__main__":
    main()
