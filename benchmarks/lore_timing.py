"""LoRE timing: seconds per 4096×4096 matrix per coordinate-descent iteration, exact-SVD vs svd_lowrank route.

    python -m benchmarks.lore_timing                         # n = 2, 4 models, 4096², float32, 1 thread, CPU
    python -m benchmarks.lore_timing --device cuda --update-docs docs/benchmarks.md

Each θ_i = W + (rank-`task_rank` task part, singular values 1..2) + 1e-3 noise, τ = 0.3: θ_i − θ0 then has rank
≤ n·task_rank above τ. One iteration = θ0 update + n SVTs + objective; the first is always exact (no rank hint yet),
later ones take the low-rank route when the previous rank is small. Extrapolates to a Llama-3.2-1B-shaped model.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.docs import write_section

from lowrank_methods.core.methods.lore import svt

# Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192, 8 KV heads of 64 (k/v 512×2048), vocab 128256, tied embeddings
LAYERS = 16
LAYER_SHAPES = {"q_proj": (2048, 2048), "k_proj": (512, 2048), "v_proj": (512, 2048), "o_proj": (2048, 2048),
                "gate_proj": (8192, 2048), "up_proj": (8192, 2048), "down_proj": (2048, 8192)}
EMBED = (128256, 2048)


def models(n: int, size: int, task_rank: int, device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(size, size, generator=g) / size**0.5
    out = []
    for _ in range(n):
        U = torch.linalg.qr(torch.randn(size, task_rank, generator=g))[0]
        V = torch.linalg.qr(torch.randn(size, task_rank, generator=g))[0]
        out.append(W + (U * torch.linspace(2, 1, task_rank)) @ V.T + 1e-3 * torch.randn(size, size, generator=g))
    return [t.to(device) for t in out]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _clock(device) -> float:
    """CPU: process time (with 1 thread ≈ the uncontended wall time; the machine is shared); GPU: wall time."""
    return time.perf_counter() if torch.device(device).type == "cuda" else time.process_time()


def iteration(thetas, deltas, tau, hints, device):
    """One LoRE iteration (θ0 update, n SVTs, objective), timed; returns (seconds, new deltas)."""
    _sync(device)
    t0 = _clock(device)
    base = sum(t - d.dense() for t, d in zip(thetas, deltas)) / len(thetas)
    new = [svt(t - base, tau, h) for t, h in zip(thetas, hints)]
    objective = sum(0.5 * float(torch.linalg.vector_norm(base + d.dense() - t)) ** 2 + tau * d.nuclear_norm()
                    for t, d in zip(thetas, new))
    _sync(device)
    assert objective == objective
    return _clock(device) - t0, new


def time_svd(shape, device) -> float:
    X = torch.randn(*shape, device=device)
    _sync(device)
    t0 = _clock(device)
    torch.linalg.svd(X, full_matrices=False)
    _sync(device)
    return _clock(device) - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="2,4")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--task-rank", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--update-docs", type=Path, help="write the table between the lore markers of this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    rows, per_unit = [], {}
    for n in [int(x) for x in args.models.split(",")]:
        thetas = models(n, args.size, args.task_rank, dev)
        zero = [svt(torch.zeros(args.size, args.size, device=dev), 1.0) for _ in thetas]
        t_exact, deltas = iteration(thetas, zero, args.tau, [None] * n, dev)
        ranks = [d.rank for d in deltas]
        t_low, fast = iteration(thetas, deltas, args.tau, ranks, dev)
        err = float("nan")
        if n == min(int(x) for x in args.models.split(",")):  # accuracy, once: model 0's δ by the exact SVD
            base = sum(t - d.dense() for t, d in zip(thetas, deltas)) / n
            exact = svt(thetas[0] - base, args.tau).dense()
            err = float((fast[0].dense() - exact).norm() / exact.norm())
        routes = ",".join(sorted({d.route for d in fast}))
        rows.append((n, ranks, t_exact, t_low, routes, err))
        per_unit[n] = (t_exact / n, t_low / n)
        print(f"n={n}: ranks {ranks}, exact {t_exact:.2f} s/iter, low-rank ({routes}) {t_low:.2f} s/iter, "
              f"rel. err vs exact {err:.1e}", flush=True)
    tall = time_svd(EMBED[1:] + (4 * EMBED[1],), dev)  # 2048×8192: calibrates thin SVDs of non-square matrices
    square = per_unit[max(per_unit)][0]
    table = render(args, rows, tall, square, dev)
    print(table)
    if args.update_docs:
        write_section("lore", f"## LoRE\n\n{table}", Path(args.update_docs))


def model_seconds(square_4096: float, tall_2048x8192: float) -> float:
    """Exact SVDs of every matrix of one 1B-shaped model: square matrices scale as size³ from the 4096² time,
    non-square ones as m·n·min(m,n) from the measured 2048×8192 time."""
    def cost(m, n):
        if m == n:
            return square_4096 * (m / 4096) ** 3
        return tall_2048x8192 * (max(m, n) * min(m, n) ** 2) / (8192 * 2048**2)

    return LAYERS * sum(cost(*s) for s in LAYER_SHAPES.values()) + cost(*EMBED)


def model_lowrank_seconds(per_matrix: float, size: int) -> float:
    """Sketch SVTs of every matrix of one 1B-shaped model, scaling the measured size² time by m·n."""
    def cost(m, n):
        return per_matrix * m * n / size**2

    return LAYERS * sum(cost(*s) for s in LAYER_SHAPES.values()) + cost(*EMBED)


def render(args, rows, tall, square, dev) -> str:
    who = f"{platform.processor() or platform.machine()}, {args.threads} thread(s)" if dev == "cpu" else \
        torch.cuda.get_device_name()
    lines = [f"`python -m benchmarks.lore_timing`: {args.size}×{args.size} float32, device {dev} ({who}), "
             f"task rank {args.task_rank} per model, τ = {args.tau}; torch {torch.__version__}; 1-min load average at the "
             f"end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, so CPU seconds are measured (process time) "
             "instead of wall time.", "",
             "| models n | rank of δ_i | exact SVD route, s/iteration | low-rank route, s/iteration |"
             " per matrix per model (exact / low-rank) | low-rank vs exact (rel. Frobenius) |",
             "|---|---|---|---|---|---|"]
    for n, ranks, te, tl, routes, err in rows:
        lines.append(f"| {n} | {ranks} | {te:.1f} | {tl:.2f} ({routes}) | {te / n:.1f} s / {tl / n:.2f} s | "
                     f"{'—' if err != err else f'{err:.0e}'} |")
    model_exact = model_seconds(square, tall)
    model_low = model_lowrank_seconds(rows[-1][3] / rows[-1][0], args.size)
    lines += ["", f"One exact 2048×8192 SVD: {tall:.1f} s. Llama-3.2-1B-shaped model (16 layers, hidden 2048, MLP "
              f"8192, k/v 512×2048, tied 128256×2048 embedding; 1.24 B parameters), per model per iteration: "
              f"**exact route ≈ {model_exact:.0f} s**, low-rank route ≈ {model_low:.0f} s (sketch cost ∝ m·n at the "
              f"same rank). n = 4 models, 20 iterations (the first one exact): ≈ "
              f"{4 * 20 * model_exact / 3600:.1f} h with exact SVDs only, ≈ "
              f"{4 * (model_exact + 19 * model_low) / 3600:.1f} h with the low-rank route."]
    if dev == "cpu":
        lines += ["", "GPU: not measured in this run (no GPU was available; `python -m benchmarks.lore_timing --device cuda "
                  "--update-docs docs/benchmarks.md` measures one; mergekit runs the method there with `--cuda`)."]
    return "\n".join(lines)



if __name__ == "__main__":
    main()
