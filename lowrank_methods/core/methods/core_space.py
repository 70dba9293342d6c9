"""core_space: Core Space merging (Panariello et al., arXiv 2509.17786). A rule on the R×R core matrices.

    U_B = lsv[B_1 … B_T],  V_A = rsv[A_1; …; A_T],  M_t = U_Bᵀ (w_t B_t A_t) V_Aᵀ   (lossless: w_t ΔW_t = U_B M_t V_A)
    ΔW* = λ U_B f(M_1 … M_T) V_A        rank ≤ R = Σ r_t; linear rules equal the dense merge exactly.
"""

from __future__ import annotations

import torch

from lowrank_methods.core.linalg import factored_core_space, svd_in_bases, truncate, weighted
from lowrank_methods.core.method import Rank, method
from lowrank_methods.core.types import ModuleResult
from lowrank_methods.core.rules import RuleParams, apply_rule, over_present_tasks


class CoreSpaceParams(RuleParams):
    rank: Rank = None  # None: exact (rank ≤ Σ r_t); int or energy fraction: truncated


def merge_in_core_space(factors, weights, params: RuleParams, rank: Rank) -> ModuleResult:
    """Rule on the cores, lift back, keep `rank` components (also the exact route of the standalone tsv/iso methods)."""
    Qb, core, QaT = factored_core_space(weighted(factors, weights))
    merged = params.lambda_ * apply_rule(torch.stack(core.cores), params)
    out, stats = truncate(svd_in_bases(Qb, core.U @ merged @ core.V, QaT), rank, factors[0].shape)
    return ModuleResult(out, stats)


@method("core_space", params=CoreSpaceParams, pretty_name="Core Space merging",
        reference_url="https://arxiv.org/abs/2509.17786")
@over_present_tasks
def core_space(factors, weights, params: CoreSpaceParams) -> ModuleResult:
    """Merge the adapters' R×R core matrices with a rule; exact for linear rules, rank ≤ Σ r_t."""
    return merge_in_core_space(factors, weights, params, params.rank)
