"""LoRE at the scale of a 1B model: 20 coordinate-descent iterations over n = 4 models, timed per matrix shape.

    python -m benchmarks.lore_timing                          # every shape of Llama-3.2-1B, 2 threads, CPU
    python -m benchmarks.lore_timing --threads 1 --skip-embedding
    python -m benchmarks.lore_timing --device cuda --update-docs docs/benchmarks.md

For each distinct matrix shape of Llama-3.2-1B (q/o 2048², k/v 512×2048, gate/up 8192×2048, down 2048×8192, the tied
128256×2048 embedding), n = 4 synthetic "fine-tunes" θ_i = W + (rank-32 task part, σ from 2 to 1) + noise whose
largest singular value is ≈ 0.1, τ = 0.3: θ_i − θ0 has rank ≈ 32 above τ, as in a merge of four distinct fine-tunes.
``lore_decompose`` runs 20 iterations (tol = 0) with certified subspace SVTs warm-started from the previous
iteration; the model's time is the sum over its matrices (shape time × count; 1-D tensors are averages, free). On the
two smallest shapes the exact-SVD route runs too: the objectives must agree within 1e-3 (relative).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.docs import write_section

from lowrank_methods.core.methods.lore import lore_decompose

# Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192, 8 KV heads of 64 (k/v 512×2048), vocab 128256, tied embeddings
LAYERS = 16
SHAPES = {"q_proj, o_proj": ((2048, 2048), 2 * LAYERS), "k_proj, v_proj": ((512, 2048), 2 * LAYERS),
          "gate_proj, up_proj": ((8192, 2048), 2 * LAYERS), "down_proj": ((2048, 8192), LAYERS),
          "embed_tokens (tied)": ((128256, 2048), 1)}
EXACT_TOO = ("k_proj, v_proj", "q_proj, o_proj")
MODELS, ITERATIONS, TASK_RANK, TAU = 4, 20, 32, 0.3
BEFORE_S = 198.0 * 4 * 20 + 4 * 1241 - 4 * 198  # docs of 2026-11: first iteration exact, then the sketch route


def models(shape: tuple[int, int], device, seed: int = 0) -> list[torch.Tensor]:
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) / n**0.5
    noise = 0.1 / (m**0.5 + n**0.5)  # largest singular value of the noise ≈ 0.1, below τ
    out = []
    for _ in range(MODELS):
        U = torch.linalg.qr(torch.randn(m, TASK_RANK, generator=g))[0]
        V = torch.linalg.qr(torch.randn(n, TASK_RANK, generator=g))[0]
        t = W + (U * torch.linspace(2, 1, TASK_RANK)) @ V.T
        t += noise * torch.randn(m, n, generator=g)
        out.append(t.to(device))
    return out


def timed(thetas, lowrank: bool, device) -> tuple[float, float, object]:
    """(wall s, CPU s, decomposition) of 20 iterations."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    dec = lore_decompose(thetas, tau=TAU, iterations=ITERATIONS, tol=0, lowrank=lowrank)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, dec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-embedding", action="store_true", help="estimate the embedding from down_proj (by m·n)")
    ap.add_argument("--update-docs", type=Path, help="write the table between the lore markers of this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (shape, count) in SHAPES.items():
        if args.skip_embedding and name.startswith("embed"):
            continue
        thetas = models(shape, args.device)
        wall, cpu, dec = timed(thetas, True, args.device)
        routes = sorted({d.route for d in dec.deltas})
        exact = timed(thetas, False, args.device) if name in EXACT_TOO else None
        agree = abs(dec.objective[-1] - exact[2].objective[-1]) / abs(exact[2].objective[-1]) if exact else None
        rows.append((name, shape, count, wall, cpu, [d.rank for d in dec.deltas], routes, exact, agree))
        print(f"{name} {shape}: {wall:.1f} s wall, {cpu:.1f} s CPU, ranks {rows[-1][5]}, {routes}"
              + (f"; exact route {exact[0]:.1f} s, objective agrees to {agree:.1e}" if exact else ""), flush=True)
        del thetas, dec
    table = render(args, rows)
    print(table)
    if args.update_docs:
        write_section("lore", f"## LoRE\n\n{table}", Path(args.update_docs))


def render(args, rows) -> str:
    who = f"{platform.processor() or platform.machine()}, {args.threads} thread(s)" if args.device == "cpu" else \
        torch.cuda.get_device_name()
    lines = [f"`python -m benchmarks.lore_timing --threads {args.threads}`: n = {MODELS} models, {ITERATIONS} "
             f"iterations, τ = {TAU}, rank-{TASK_RANK} task parts (module docstring), float32, device {args.device} "
             f"({who}); torch {torch.__version__}; 1-min load average at the end {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cores.", "",
             "| matrices | shape | per model | 20 iterations × 4 models, wall s (CPU s) | rank of δ_i | route | "
             "exact route, wall s | objective vs exact (rel.) |",
             "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for name, shape, count, wall, cpu, ranks, routes, exact, agree in rows:
        total += wall * count
        lines.append(f"| {name} | {shape[0]}×{shape[1]} | {count} | {wall:.1f} ({cpu:.1f}) | {ranks} | "
                     f"{', '.join(routes)} | {f'{exact[0]:.1f}' if exact else '—'} | "
                     f"{f'{agree:.0e}' if agree is not None else '—'} |")
    if not any(r[0].startswith("embed") for r in rows):
        down = next(r for r in rows if r[0] == "down_proj")
        total += down[3] * (128256 * 2048) / (2048 * 8192)
    lines += ["", f"Llama-3.2-1B-shaped model (1.24 B parameters), 4 models × 20 iterations: **≈ {total / 60:.0f} min** "
              f"(the sum of shape time × count), against ≈ {BEFORE_S / 3600:.1f} h before (2026-11: exact first "
              "iteration, then a cold randomized sketch with 6 power iterations each time: 198 s per model per "
              "iteration, 1241 s for an exact one)."]
    if args.device == "cpu":
        lines += ["", "GPU: not measured (no GPU was lent; `--device cuda` measures one; mergekit runs LoRE there with "
                  "`--cuda`)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
