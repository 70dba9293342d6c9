"""mtc: Merge-then-Compress. Merge the task updates with a rule, then keep the best rank-k part.

    ΔW* = λ f(w_1 ΔW_1 … w_T ΔW_T),   output: top-`rank` SVD of ΔW*   (B = U_k √S_k, A = √S_k V_kᵀ)

- ta: λ Σ_t w_t B_t A_t is itself low-rank; its SVD is exact from the factors (two thin QRs + an R×R SVD).
- tsv, iso_c, iso_cts: the dense rank-aware rule equals the rule in core space (see the tsv/iso methods).
- ties, dare, dare_ties: elementwise, so dense: ΔW_t is formed in row blocks (memory T·block·n), TIES
  thresholds come from one task's full ΔW_t at a time, then one exact thin SVD of the m×n merge.
``task_arithmetic`` and ``linear`` are the ta computation with mergekit's defaults for those names.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from ..linalg import LowRankSVD, svd_of_sum, truncate
from ..registry import MethodParams, ModuleResult, Rank, method
from ..rules import RuleName, RuleParams, dare, elect_and_merge, magnitude_threshold, module_generator, over_present_tasks
from .core_space import merge_in_core_space

DENSE_RULES = ("ties", "dare", "dare_ties")  # elementwise: computed on the dense updates, result not low-rank
BLOCK_ELEMENTS = 1 << 24  # T·rows·n per dense block (64 MiB in float32); fixed, so DARE draws are reproducible


class MtcParams(RuleParams):
    rank: Rank = None
    rule: RuleName = "ta"
    normalize: bool = Field(False, description="ta only: divide by Σ w_t (mergekit's `normalize`)")

    @model_validator(mode="after")
    def _dense_rules_need_a_rank(self):
        if self.rule in DENSE_RULES and self.rank is None:
            raise ValueError(f"rule {self.rule!r} merges the dense updates, whose result is full rank; set `rank` "
                             "(e.g. 16, or an energy fraction such as 0.9) to choose the output adapter's size")
        return self


class TaskArithmeticParams(MethodParams):  # mergekit's names take no rule parameters
    rank: Rank = None
    normalize: bool = False


class LinearParams(TaskArithmeticParams):
    normalize: bool = True


def _merge_then_compress(factors, weights, params: MtcParams | TaskArithmeticParams) -> ModuleResult:
    shape = factors[0].shape
    if getattr(params, "rule", "ta") == "ta":
        scale = params.lambda_ / _weight_sum(weights) if params.normalize else params.lambda_
        merged, stats = truncate(svd_of_sum(factors, [scale * w for w in weights]), params.rank, shape)
        return ModuleResult(merged, stats)
    return _merge_by_rule(factors, weights, params)


@over_present_tasks  # (ta above keeps every adapter: `normalize` divides by all weights, as mergekit does)
def _merge_by_rule(factors, weights, params: MtcParams) -> ModuleResult:
    shape = factors[0].shape
    if params.rule in ("tsv", "iso_c", "iso_cts"):
        k = params.tsv_components or max(1, min(shape) // len(factors))
        return merge_in_core_space(factors, weights, params.model_copy(update={"tsv_components": k}), params.rank)
    dense = params.lambda_ * dense_elementwise_merge(factors, weights, params)
    transpose = dense.shape[0] < dense.shape[1]  # LAPACK is much faster on tall matrices
    U, S, Vh = torch.linalg.svd(dense.T if transpose else dense, full_matrices=False)
    svd = LowRankSVD(Vh.T, S, U.T) if transpose else LowRankSVD(U, S, Vh)
    merged, stats = truncate(svd, params.rank, shape)
    return ModuleResult(merged, stats)


def dense_elementwise_merge(factors, weights, params: RuleParams) -> torch.Tensor:
    """ties / dare / dare_ties on the dense w_t ΔW_t, formed block of rows by block of rows.

    TIES thresholds need a task's whole matrix: a first pass forms one task at a time (after its DARE drops,
    replayed from the same per-task generator in the second pass)."""
    m, n = factors[0].shape
    rows = max(1, BLOCK_ELEMENTS // (len(factors) * n))
    starts = range(0, m, rows)
    drops = params.rule in ("dare", "dare_ties")
    trims = params.rule != "dare" and params.density < 1
    device = factors[0].B.device

    def generators():
        return [module_generator(params, device, f"#{t}") for t in range(len(factors))] if drops else None

    def task_block(t, start, gens):
        x = weights[t] * (factors[t].B[start:start + rows] @ factors[t].A)
        return dare(x, params.drop_rate, gens[t]) if drops else x

    out = factors[0].B.new_empty(m, n)
    if trims:  # `out` doubles as the scratch for one task's full matrix
        gens, thresholds = generators(), []
        for t in range(len(factors)):
            for start in starts:
                out[start:start + rows] = task_block(t, start, gens)
            thresholds.append(magnitude_threshold(out, params.density))
        thresholds = torch.stack(thresholds)[:, None, None]
    gens = generators()
    for start in starts:
        X = torch.stack([task_block(t, start, gens) for t in range(len(factors))])
        if params.rule == "dare":
            out[start:start + rows] = X.sum(0)
            continue
        if trims:
            X = X * (X.abs() >= thresholds)
        out[start:start + rows] = elect_and_merge(X, params.majority_sign_method)
    return out


def _weight_sum(weights) -> float:
    total = sum(weights)
    return 1.0 if abs(total) < 1e-8 else total  # mergekit's guard against a zero divisor


@method("mtc", params=MtcParams, pretty_name="Merge-then-Compress", reference_url="https://arxiv.org/abs/2606.03723")
def mtc(factors, weights, params: MtcParams) -> ModuleResult:
    """Merge with a rule, then truncate to the best rank-`rank` approximation."""
    return _merge_then_compress(factors, weights, params)


@method("task_arithmetic", params=TaskArithmeticParams, pretty_name="Task Arithmetic",
        reference_url="https://arxiv.org/abs/2212.04089", in_mergekit=False)
def task_arithmetic(factors, weights, params: TaskArithmeticParams) -> ModuleResult:
    """λ Σ_t w_t ΔW_t (mergekit's task_arithmetic on adapters), exact or truncated to `rank`."""
    return _merge_then_compress(factors, weights, params)


@method("linear", params=LinearParams, pretty_name="Linear", reference_url="https://arxiv.org/abs/2203.05482",
        in_mergekit=False)
def linear(factors, weights, params: LinearParams) -> ModuleResult:
    """Σ_t w_t ΔW_t / Σ_t w_t (mergekit's linear on base+adapter models), exact or truncated to `rank`."""
    return _merge_then_compress(factors, weights, params)
