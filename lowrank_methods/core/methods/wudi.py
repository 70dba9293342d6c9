"""wudi: WUDI-Merging (Cheng et al., arXiv 2503.08099), data-free, in closed form, on the dense updates.

    X_t = w_t ΔW_t,  ΔW* = λ argmin_X Σ_t ‖(X − X_t) X_tᵀ‖² / ‖X_t‖² + μ ‖X − Σ_t X_t‖²
(X_t's rows stand in for the inputs task t reads.)
The paper minimises the first term by 300 Adam steps from Σ_t X_t; the ridge μ is that early stop in closed form.
Computed exactly in core space: with ΔW_t = U_B M_t V_A (orthonormal bases) the minimiser is U_B X*(M) V_A.
"""

from __future__ import annotations

from lowrank_methods.core.method import Paper, method
from lowrank_methods.core.params import Rank, ScaledParams
from lowrank_methods.core.types import ModuleResult
from lowrank_methods.core.rules import WudiRule, over_present_tasks
from lowrank_methods.core.methods.core_space import merge_in_core_space

PAPER = Paper("cheng2025wudi", "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via "
              "Task Vectors", "Cheng, Runxi and Xiong, Feng and Wei, Yongxian and Zhu, Wanyun and Yuan, Chun", 2025,
              "https://arxiv.org/abs/2503.08099", "ICML 2025")


class WudiParams(ScaledParams):
    rank: Rank = None
    ridge: float = WudiRule.model_fields["ridge"]


@method("wudi", params=WudiParams, pretty_name="WUDI-Merging (interference-free, closed form)", paper=PAPER)
@over_present_tasks
def wudi(factors, weights, params: WudiParams, ctx) -> ModuleResult:
    """The update that acts on each task's own row space as that task does, least squares (closed form)."""
    return merge_in_core_space(factors, weights, WudiRule(ridge=params.ridge), params.rank, params.lambda_, ctx)
