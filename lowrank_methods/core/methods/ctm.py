"""ctm: Compress-then-Merge (He et al., arXiv 2606.03723). Shared rank-r subspaces first, then a rule in r×r.

    M_t = U_Bᵀ (w_t B_t A_t) V_Aᵀ (core space);  M̃_t = M_t (β + (1-β) ν̄/ν_t), ν_t = ‖M_t‖_F  (subspace fit only)
    U0, U1 = Tucker-2/HOOI of stack(M̃_t) at rank r;   P = U_B U0,  Q = V_Aᵀ U1;   C_t = U0ᵀ M_t U1
    ΔW* = λ P f(C_1 … C_T) Qᵀ          rank ≤ r by construction
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt

from lowrank_methods.core.linalg import factored_core_space, svd_in_bases, truncate, tucker2, weighted
from lowrank_methods.core.method import Paper, method
from lowrank_methods.core.types import ModuleResult
from lowrank_methods.core.rules import RuleParams, apply_rule, over_present_tasks


class CtmParams(RuleParams):
    rank: PositiveInt | None = None  # the shared subspace rank r; None: the largest input rank
    beta: float = Field(0.0, ge=0, le=1, description="1: fit the subspaces to the raw adapters; 0: to norm-equalised ones")
    tol: float = Field(1e-6, gt=0, description="HOOI stops when the relative error changes by less than this")
    max_iter: PositiveInt = 1000


def reweight(cores: torch.Tensor, beta: float) -> torch.Tensor:
    """M̃_t = M_t (β + (1-β) ν̄/ν_t): β interpolates each task's norm towards the mean norm (zero tasks stay zero)."""
    norms = cores.flatten(1).norm(dim=1)
    gain = beta + (1 - beta) * norms.mean() / norms.where(norms > 0, torch.ones_like(norms))
    return cores * gain.where(norms > 0, torch.zeros_like(gain))[:, None, None]


PAPER = Paper("he2026compress", "Compress then Merge: From Multiple LoRAs into One Low-Rank Adapter",
              "He, Zhengbao and Ding, Ruiqi and Huang, Zhehao and Yang, Ruikai and Li, Tao and Huang, Xiaolin", 2026,
              "https://arxiv.org/abs/2606.03723", "ICML 2026")


@method("ctm", params=CtmParams, pretty_name="Compress-then-Merge", paper=PAPER)
@over_present_tasks
def ctm(factors, weights, params: CtmParams, ctx) -> ModuleResult:
    """Project every adapter onto shared rank-r subspaces (Tucker-2), merge the r×r coordinates, lift back."""
    r = params.rank or max(f.rank for f in factors)
    Qb, core, QaT = factored_core_space(weighted(factors, weights))
    M = torch.stack(core.cores)
    U0, U1 = tucker2(reweight(M, params.beta), r, params.tol, params.max_iter)
    C = U0.T @ M @ U1
    merged = params.lambda_ * apply_rule(C, params, ctx)
    P, Qt = Qb @ (core.U @ U0), (U1.T @ core.V) @ QaT  # P = U_B U0, Qᵀ = U1ᵀ V_A
    out, stats = truncate(svd_in_bases(P, merged, Qt), None, factors[0].shape)
    total = float(M.square().sum())
    stats["retained_energy"] = float(C.square().sum()) / total if total > 0 else 1.0  # of Σ‖w_t ΔW_t‖² in the subspaces
    return ModuleResult(out, stats)
