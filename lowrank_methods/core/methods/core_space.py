"""core_space: Core Space merging (Panariello et al., arXiv 2509.17786). A rule on the R×R core matrices.

    U_B = lsv[B_1 … B_T],  V_A = rsv[A_1; …; A_T],  M_t = U_Bᵀ (w_t B_t A_t) V_Aᵀ   (lossless: w_t ΔW_t = U_B M_t V_A)
    ΔW* = λ U_B f(M_1 … M_T) V_A        rank ≤ R = Σ r_t; linear rules equal the dense merge exactly.
"""

from __future__ import annotations

import torch

from lowrank_methods.core.linalg import factored_core_space, svd_in_bases, truncate, weighted
from lowrank_methods.core.method import Paper, method
from lowrank_methods.core.params import Rank
from lowrank_methods.core.types import ModuleResult
from lowrank_methods.core.rules import Rule, RuleParams, apply_rule, over_present_tasks
from lowrank_methods.core.types import MethodContext


class CoreSpaceParams(RuleParams):
    rank: Rank = None  # None: exact (rank ≤ Σ r_t); int or energy fraction: truncated


PAPER = Paper("panariello2025core", "Accurate and Efficient Low-Rank Model Merging in Core Space",
              "Panariello, Aniello and Marczak, Daniel and Magistri, Simone and Porrello, Angelo and "
              "Twardowski, Bart{\\l}omiej and Bagdanov, Andrew D. and Calderara, Simone and "
              "van de Weijer, Joost", 2025, "https://arxiv.org/abs/2509.17786", "NeurIPS 2025")


def merge_in_core_space(factors, weights, rule: Rule, rank: Rank, lambda_: float, ctx: MethodContext) -> ModuleResult:
    """Rule on the cores, lift back, keep `rank` components (also the exact route of the standalone tsv/iso methods)."""
    Qb, core, QaT = factored_core_space(weighted(factors, weights))
    merged = lambda_ * apply_rule(torch.stack(core.cores), rule, ctx)
    out, stats = truncate(svd_in_bases(Qb, core.U @ merged @ core.V, QaT), rank, factors[0].shape)
    return ModuleResult(out, stats)


@method("core_space", params=CoreSpaceParams, pretty_name="Core Space merging", paper=PAPER)
@over_present_tasks
def core_space(factors, weights, params: CoreSpaceParams, ctx) -> ModuleResult:
    """Merge the adapters' R×R core matrices with a rule; exact for linear rules, rank ≤ Σ r_t."""
    return merge_in_core_space(factors, weights, params, params.rank, params.lambda_, ctx)
