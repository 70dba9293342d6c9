"""linear_factors: PEFT's legacy ``combination_type="linear"``, averaging A and B separately. For comparison only.

    A* = Σ_t sgn(w_t) √|w_t| A_t,   B* = λ Σ_t √|w_t| B_t     ⇒   B* A* = λ Σ_t w_t ΔW_t + λ Σ_{t≠u} (cross terms)
The cross terms B_t A_u make it a rough approximation that depends on how each update is split into factors.
"""

from __future__ import annotations

import math

from lowrank_methods.core.errors import RecipeError
from lowrank_methods.core.linalg import svd_of_product, truncate
from lowrank_methods.core.rules import over_present_tasks
from lowrank_methods.core.method import Link, method
from lowrank_methods.core.params import ScaledParams
from lowrank_methods.core.types import ModuleResult


def check_equal_ranks(params: ScaledParams, weights, ranks) -> None:
    """Averaging A's and B's needs one rank among the adapters that have the module."""
    present = sorted({k for k in ranks if k})
    if len(present) > 1:
        raise RecipeError(f"linear_factors needs every adapter to have the same rank, got ranks {present}; "
                          "use mtc, core_space or ctm instead")


@method("linear_factors", pretty_name="Linear on factors (PEFT legacy, for comparison)", check=check_equal_ranks,
        link=Link("PEFT `add_weighted_adapter(combination_type=\"linear\")`",
                  "https://huggingface.co/docs/peft/developer_guides/model_merging"))
@over_present_tasks
def linear_factors(factors, weights, params: ScaledParams, ctx) -> ModuleResult:
    """Weighted sums of the A's and of the B's (PEFT's `linear`); not a merge of the updates. Comparison only."""
    check_equal_ranks(params, weights, [f.rank for f in factors])
    A = sum(math.copysign(math.sqrt(abs(w)), w) * f.A for f, w in zip(factors, weights))
    B = params.lambda_ * sum(math.sqrt(abs(w)) * f.B for f, w in zip(factors, weights))
    merged, stats = truncate(svd_of_product(B, A), None, factors[0].shape)
    return ModuleResult(merged, stats)
