"""tsv: TSV-M, Task Singular Vectors - Merge (Gargiulo et al., arXiv 2412.00081), rank-aware, on the dense updates.

    w_t ΔW_t = U_t S_t V_tᵀ, keep k_t = min(⌊min(m,n)/T⌋, rank ΔW_t) triplets;  ΔW* = λ polar(U_cat) S_cat polar(V_cat)ᵀ
Computed exactly in core space: ΔW_t = U_B M_t V_A with orthonormal U_B, V_A, so the SVDs and polar factors of
the dense updates are U_B (·) and (·) V_A of those of the cores (see docs/methods/tsv.md).
"""

from __future__ import annotations

from pydantic import PositiveInt

from lowrank_methods.core.method import Paper, method

from lowrank_methods.core.params import Rank, ScaledParams

from lowrank_methods.core.types import ModuleResult
from lowrank_methods.core.rules import TsvRule, default_tsv_components, over_present_tasks
from lowrank_methods.core.methods.core_space import merge_in_core_space


PAPER = Paper("gargiulo2025tsv", "Task Singular Vectors: Reducing Task Interference in Model Merging",
              "Gargiulo, Antonio Andrea and Crisostomi, Donato and Bucarelli, Maria Sofia and Scardapane, Simone "
              "and Silvestri, Fabrizio and Rodol{\\`a}, Emanuele", 2025, "https://arxiv.org/abs/2412.00081", "CVPR 2025")


class TsvParams(ScaledParams):
    rank: Rank = None
    tsv_components: PositiveInt | None = None  # triplets per task; None: ⌊min(m, n)/T⌋ as in the reference


@method("tsv", params=TsvParams, pretty_name="TSV-M (Task Singular Vectors)", paper=PAPER)
@over_present_tasks
def tsv(factors, weights, params: TsvParams, ctx) -> ModuleResult:
    """Per-task singular vectors, decorrelated by polar factors (exact dense TSV-M, computed in core space)."""
    k = params.tsv_components or default_tsv_components(factors[0].shape, len(factors))
    return merge_in_core_space(factors, weights, TsvRule(tsv_components=k), params.rank, params.lambda_, ctx)
