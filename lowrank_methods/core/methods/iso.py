"""iso_c, iso_cts: Isotropic merging (Marczak et al., arXiv 2502.04959), rank-aware, on the dense updates.

    Iso-C:   Σ_t w_t ΔW_t = U S Vᵀ (nonzero part)  →  ΔW* = λ mean(S) U Vᵀ
    Iso-CTS: top-k_c common directions of the sum + s per task from each residual (I − U_c U_cᵀ) ΔW_t,
             bases orthogonalised by polar factors, spectrum flattened to the mean of the kept singular values.
Both are computed exactly in core space (ΔW_t = U_B M_t V_A, orthonormal bases); see docs/methods/iso_c.md.
"""

from __future__ import annotations

from pydantic import PositiveInt

from lowrank_methods.core.method import Paper, method

from lowrank_methods.core.params import Rank, ScaledParams

from lowrank_methods.core.types import ModuleResult
from lowrank_methods.core.rules import IsoCRule, IsoCtsRule, over_present_tasks
from lowrank_methods.core.methods.core_space import merge_in_core_space


PAPER = Paper("marczak2025notask", "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
              "Subspaces", "Marczak, Daniel and Magistri, Simone and Cygert, Sebastian and Twardowski, Bart{\\l}omiej and "
              "Bagdanov, Andrew D. and van de Weijer, Joost", 2025, "https://arxiv.org/abs/2502.04959", "ICML 2025")


class IsoCParams(ScaledParams):
    rank: Rank = None


class IsoCtsParams(IsoCParams):
    common_space_fraction: float = IsoCtsRule.model_fields["common_space_fraction"]
    task_directions: PositiveInt | None = IsoCtsRule.model_fields["task_directions"]


@method("iso_c", params=IsoCParams, pretty_name="Iso-C (isotropic merging)", paper=PAPER)
@over_present_tasks
def iso_c(factors, weights, params: IsoCParams, ctx) -> ModuleResult:
    """Task-arithmetic sum with its nonzero singular values set to their mean (rank-aware Iso-C)."""
    return merge_in_core_space(factors, weights, IsoCRule(), params.rank, params.lambda_, ctx)


@method("iso_cts", params=IsoCtsParams, pretty_name="Iso-CTS (common + task-specific)", paper=PAPER)
@over_present_tasks
def iso_cts(factors, weights, params: IsoCtsParams, ctx) -> ModuleResult:
    """Common and task-specific subspaces with a flat spectrum (rank-aware Iso-CTS)."""
    rule = IsoCtsRule(common_space_fraction=params.common_space_fraction, task_directions=params.task_directions)
    return merge_in_core_space(factors, weights, rule, params.rank, params.lambda_, ctx)
