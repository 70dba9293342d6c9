"""tsv: TSV-M, Task Singular Vectors - Merge (Gargiulo et al., arXiv 2412.00081), rank-aware, on the dense updates.

    w_t ΔW_t = U_t S_t V_tᵀ, keep k_t = min(⌊min(m,n)/T⌋, rank ΔW_t) triplets;  ΔW* = λ polar(U_cat) S_cat polar(V_cat)ᵀ
Computed exactly in core space: ΔW_t = U_B M_t V_A with orthonormal U_B, V_A, so the SVDs and polar factors of
the dense updates are U_B (·) and (·) V_A of those of the cores (see docs/methods/tsv.md).
"""

from __future__ import annotations

from pydantic import PositiveInt

from lowrank_methods.core.method import MethodParams, Rank, method

from lowrank_methods.core.types import ModuleResult
from lowrank_methods.core.rules import RuleParams, over_present_tasks
from lowrank_methods.core.methods.core_space import merge_in_core_space


class TsvParams(MethodParams):
    rank: Rank = None
    tsv_components: PositiveInt | None = None  # triplets per task; None: ⌊min(m, n)/T⌋ as in the reference


@method("tsv", params=TsvParams, pretty_name="TSV-M (Task Singular Vectors)", reference_url="https://arxiv.org/abs/2412.00081")
@over_present_tasks
def tsv(factors, weights, params: TsvParams) -> ModuleResult:
    """Per-task singular vectors, decorrelated by polar factors (exact dense TSV-M, computed in core space)."""
    m, n = factors[0].shape
    k = params.tsv_components or max(1, min(m, n) // len(factors))
    rule = RuleParams(rule="tsv", tsv_components=k, lambda_=params.lambda_, module=params.module)
    return merge_in_core_space(factors, weights, rule, params.rank)
