"""mtc: Merge-then-Compress. Merge the task updates with a rule, then keep the best rank-k part.

With the task-arithmetic rule the merged update λ Σ_t w_t B_t A_t is itself low-rank, so its
truncated SVD is computed exactly from the factors (two thin QRs + an R×R SVD, R = Σ r_t).
``task_arithmetic`` and ``linear`` are the same computation with mergekit's defaults for those names.
"""

from __future__ import annotations

from typing import Literal

from ..linalg import svd_of_sum, truncate
from ..registry import MethodParams, ModuleResult, Rank, method


class MtcParams(MethodParams):
    rank: Rank = None
    rule: Literal["ta"] = "ta"
    normalize: bool = False  # divide by Σ w_t (mergekit's `normalize`)


class LinearParams(MtcParams):
    normalize: bool = True


def _merge_then_compress(factors, weights, params: MtcParams) -> ModuleResult:
    shape = factors[0].shape
    scale = params.lambda_ / _weight_sum(weights) if params.normalize else params.lambda_
    merged, stats = truncate(svd_of_sum(factors, [scale * w for w in weights]), params.rank, shape)
    return ModuleResult(merged, stats)


def _weight_sum(weights) -> float:
    total = sum(weights)
    return 1.0 if abs(total) < 1e-8 else total  # mergekit's guard against a zero divisor


@method("mtc", params=MtcParams, pretty_name="Merge-then-Compress", reference_url="https://arxiv.org/abs/2606.03723")
def mtc(factors, weights, params: MtcParams) -> ModuleResult:
    """Merge with a rule, then truncate to the best rank-`rank` approximation."""
    return _merge_then_compress(factors, weights, params)


@method("task_arithmetic", params=MtcParams, pretty_name="Task Arithmetic",
        reference_url="https://arxiv.org/abs/2212.04089", in_mergekit=False)
def task_arithmetic(factors, weights, params: MtcParams) -> ModuleResult:
    """λ Σ_t w_t ΔW_t (mergekit's task_arithmetic on adapters), exact or truncated to `rank`."""
    return _merge_then_compress(factors, weights, params)


@method("linear", params=LinearParams, pretty_name="Linear", reference_url="https://arxiv.org/abs/2203.05482",
        in_mergekit=False)
def linear(factors, weights, params: LinearParams) -> ModuleResult:
    """Σ_t w_t ΔW_t / Σ_t w_t (mergekit's linear on base+adapter models), exact or truncated to `rank`."""
    return _merge_then_compress(factors, weights, params)
