"""knots: KnOTS (Stoica et al., arXiv 2410.19735). Align the adapters by one SVD, merge the aligned V's.

    [w_1 ΔW_1 … w_T ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ]   (SVD of the m×Tn concatenation, from the factors)
    ΔW* = λ U f(Σ V_1ᵀ … Σ V_Tᵀ)        (scale_by_sigma, the KnOTS repo)   or   λ U Σ f(V_1ᵀ … V_Tᵀ)   (Core repo)
The concatenation is B_cat · blockdiag(A_t), so U, Σ come from QR(B_cat), QR(A_tᵀ) and an R×R SVD.
"""

from __future__ import annotations

from typing import Literal

import torch

from lowrank_methods.core.linalg import numerical_rank, svd_of_product, truncate, weighted
from lowrank_methods.core.method import Paper, method
from lowrank_methods.core.params import Rank
from lowrank_methods.core.types import ModuleResult
from lowrank_methods.core.rules import RuleParams, apply_rule, over_present_tasks


class KnotsParams(RuleParams):
    rule: Literal["ta", "ties", "dare", "dare_ties"] = "ties"
    rank: Rank = None
    scale_by_sigma: bool = True  # merge Σ V_tᵀ (KnOTS repo) rather than V_tᵀ (Core Space repo's KnOTS)


def aligned_components(factors, scale_by_sigma: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m×k), Σ (k), stack of V_tᵀ (T, k, n) with Σ_t U diag(Σ) V_tᵀ = Σ_t B_t A_t, k = numerical rank
    (``scale_by_sigma``: the stack of Σ V_tᵀ instead, scaled on the small side before the lift)."""
    B = torch.cat([f.B for f in factors], 1)
    Qb, Rb = torch.linalg.qr(B)
    QRs = [torch.linalg.qr(f.A.T) for f in factors]  # A_tᵀ = Q_t R_t
    K = Rb @ torch.block_diag(*[R.T for _, R in QRs])  # [ΔW_1 … ΔW_T] = Qb K blockdiag(Q_tᵀ)
    u, s, vh = torch.linalg.svd(K, full_matrices=False)
    k = numerical_rank(s, (B.shape[0], sum(f.shape[1] for f in factors)))
    u, s, vh = u[:, :k], s[:k], vh[:k]
    blocks = torch.split(vh, [Q.shape[1] for Q, _ in QRs], dim=1)
    V = vh.new_empty(len(QRs), k, QRs[0][0].shape[0])
    for t, (blk, (Q, _)) in enumerate(zip(blocks, QRs)):
        torch.matmul(blk, Q.T, out=V[t])
    if scale_by_sigma:
        V *= s[:, None]  # after the lift, in place: the products of KnOTS' definition, entry for entry
    return Qb @ u, s, V


PAPER = Paper("stoica2025knots", "Model merging with SVD to tie the KnOTS", "Stoica, George and Ramesh, Pratik and "
              "Ecsedi, Boglarka and Choshen, Leshem and Hoffman, Judy", 2025, "https://arxiv.org/abs/2410.19735",
              "ICLR 2025")


@method("knots", params=KnotsParams, pretty_name="KnOTS", paper=PAPER)
@over_present_tasks
def knots(factors, weights, params: KnotsParams, ctx) -> ModuleResult:
    """One SVD of the concatenated updates gives a shared U; a rule merges the per-task V's (per module)."""
    U, S, V = aligned_components(weighted(factors, weights), params.scale_by_sigma)
    merged = apply_rule(V, params, ctx)  # of Σ V_tᵀ (scale_by_sigma) or of V_tᵀ
    B = U if params.scale_by_sigma else U * S
    out, stats = truncate(svd_of_product(params.lambda_ * B, merged), params.rank, factors[0].shape)
    return ModuleResult(out, stats)
