"""Why rank-16 merges lose: how far each rank-16 output is from the exact task-arithmetic sum.

For every module, with the TA rule (λ = 1), compares ΔW_ctm and ΔW_mtc (both rank ≤ 16) with the exact
Σ_t ΔW_t (rank ≤ 128), and how much of each task's own update survives in the rank-16 output's spaces:

    err = ‖ΔW_method − Σ_t ΔW_t‖_F / ‖Σ_t ΔW_t‖_F        kept_t = ‖P Pᵀ ΔW_t Q Qᵀ‖²_F / ‖ΔW_t‖²_F

(P, Q: orthonormal bases of the output's column and row spaces). By Eckart–Young MtC has the smallest
possible err at rank 16; CtM instead keeps shared subspaces fitted to all tasks.

    python -m benchmarks.quality.subspace [--set main]
"""

from __future__ import annotations

import argparse

import torch

from lowrank_methods.core.types import MethodContext
from lowrank_methods.core.method import get_method

from .methods import load_factors


def kept_fraction(delta: torch.Tensor, out) -> float:
    P = torch.linalg.qr(out.B)[0]
    Q = torch.linalg.qr(out.A.T)[0]
    return float((P.T @ delta @ Q).square().sum() / delta.square().sum())


def compare(factors: dict, rank: int = 16) -> dict[str, dict[str, float]]:
    """Means over modules of err and of the per-task kept fraction (mean and worst task), per method."""
    sums: dict[str, dict[str, float]] = {}
    for module, fs in factors.items():
        fs = [f.to(dtype=torch.float64) for f in fs]
        exact = sum(f.dense() for f in fs)
        for name, values in (("ctm[ta]", {"rule": "ta", "rank": rank}), ("mtc[ta]", {"rule": "ta", "rank": rank})):
            method = get_method(name.split("[")[0])
            out = method(fs, [1.0] * len(fs), method.parse_params(values), MethodContext(module)).factors
            kept = [kept_fraction(f.dense(), out) for f in fs]
            s = sums.setdefault(name, {"err": 0.0, "kept_mean": 0.0, "kept_worst": 0.0})
            s["err"] += float((out.dense() - exact).norm() / exact.norm()) / len(factors)
            s["kept_mean"] += sum(kept) / len(kept) / len(factors)
            s["kept_worst"] += min(kept) / len(factors)
    return sums


def main(argv=None) -> None:
    from .train import EXAMPLE_DIR, SETS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.subspace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=list(SETS), default="main")
    args = parser.parse_args(argv)
    d = EXAMPLE_DIR / SETS[args.set].directory
    from . import tasks as task_data

    factors = load_factors([d / t for t in task_data.TASKS])
    for name, s in compare(factors).items():
        print(f"{name}: rel. error to exact TA {s['err']:.3f}; per-task energy kept: mean {s['kept_mean']:.3f}, "
              f"worst task {s['kept_worst']:.3f} (means over {len(factors)} modules)")


if __name__ == "__main__":
    main()
