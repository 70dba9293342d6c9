"""mtc: Merge-then-Compress. Merge the task updates with a rule, then keep the best rank-k part.

    ΔW* = λ f(w_1 ΔW_1 … w_T ΔW_T),   output: top-`rank` SVD of ΔW*   (B = U_k √S_k, A = √S_k V_kᵀ)

- ta: λ Σ_t w_t B_t A_t is itself low-rank; its SVD is exact from the factors (two thin QRs + an R×R SVD).
- tsv, iso_c, iso_cts, wudi: the dense rank-aware rule equals the rule in core space (see those methods).
- ties, dare, dare_ties: elementwise, so dense: ΔW_t is formed in row blocks (memory T·block·n), TIES
  thresholds come from one task's full ΔW_t at a time, then one exact thin SVD of the m×n merge.
``task_arithmetic``, ``linear`` and ``ties`` are mergekit's methods of those names, exactly, on the adapters' updates
(what stock mergekit computes over ``base+adapter`` models, minus W0); ``mergekit-yaml`` runs them here when every
model of the recipe is a bare adapter directory (``mergekit_plugin/route.py``):

- task_arithmetic: λ Σ_t w_t ΔW_t (÷ Σ_t w_t with ``normalize``, default false), exact from the factors.
- linear: mergekit averages the *weights*, Σ_t w_t (W0 + ΔW_t) / Σ_t w_t = W0 + Σ_t w_t ΔW_t / Σ_t w_t; so on
  adapters it is the normalized sum of the updates (no λ in mergekit's linear). ``normalize: false`` gives
  (Σ_t w_t)·W0 + Σ_t w_t ΔW_t, an update only when Σ_t w_t = 1 (refused otherwise).
- ties: mergekit's TIES (``rules.ties_weighted``): each ΔW_t trimmed to its top-`density` magnitudes (default 1),
  optionally L1-rescaled, weighted, sign elected by Σ_t, then Σ_t w_t x_t·[agree] / Σ_t w_t·[agree] (``normalize``,
  default true; PEFT's TIES divides by the count instead), × λ. Dense and full rank: `rank` is required
  (``rank: 1.0`` keeps every numerically nonzero component, i.e. the exact result).
- ``int8_mask`` (task_arithmetic, ties: only a mask dtype in mergekit), and ``rescale``/``density`` for
  task_arithmetic (which sparsifies nothing) are accepted because mergekit accepts them; they change nothing.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from lowrank_methods.core.errors import MergeError
from lowrank_methods.core.linalg import LowRankSVD, svd_of_sum, truncate
from lowrank_methods.core.method import Paper, method
from lowrank_methods.core.params import Rank, ScaledParams
from lowrank_methods.core.types import ModuleResult
from lowrank_methods.core.rules import (RuleName, RuleParams, dare, default_tsv_components, elect_and_merge, l1_rescale,
                                        magnitude_threshold, mergekit_threshold, over_present_tasks,
                                        weighted_disjoint_merge)
from lowrank_methods.core.methods import ctm
from lowrank_methods.core.methods.core_space import merge_in_core_space
from lowrank_methods.core.types import MethodContext

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


_NO_EFFECT = "accepted because mergekit's method takes it; it does not change the result"


class TaskArithmeticParams(ScaledParams):  # mergekit's task_arithmetic: its parameters, plus our `rank`
    rank: Rank = None
    normalize: bool = Field(False, description="divide by Σ w_t (mergekit's default for task_arithmetic: false)")
    int8_mask: bool = Field(False, description=_NO_EFFECT)
    rescale: bool = Field(False, description=_NO_EFFECT + " (task_arithmetic sparsifies nothing)")
    density: float = Field(1.0, description=_NO_EFFECT + " (task_arithmetic sparsifies nothing)")


class LinearParams(ScaledParams):  # mergekit's linear: weight and normalize, plus our `rank`
    rank: Rank = None
    normalize: bool = Field(True, description="divide by Σ w_t; false needs Σ w_t = 1 (else W0 itself is rescaled)")

    @model_validator(mode="after")
    def _no_lambda(self):
        if self.lambda_ != 1:
            raise ValueError("mergekit's 'linear' has no lambda (stock mergekit ignores it); remove it, or use "
                             "task_arithmetic with normalize: true for λ Σ w_t ΔW_t / Σ w_t")
        return self


class TiesParams(ScaledParams):  # mergekit's ties: its parameters (and defaults), plus our `rank`
    rank: Rank = None
    normalize: bool = Field(True, description="divide by the sum of the weights of the agreeing entries")
    density: float = Field(1.0, ge=0, le=1, description="fraction of each task's entries kept, by magnitude")
    rescale: bool = Field(False, description="L1-rescale each trimmed task to its untrimmed norm")
    int8_mask: bool = Field(False, description=_NO_EFFECT)

    @model_validator(mode="after")
    def _needs_a_rank(self):
        if self.rank is None:
            raise ValueError("mergekit's 'ties' on adapters merges the dense updates, whose result is full rank; set "
                             "`rank` (e.g. 16, an energy fraction such as 0.9, or 1.0 for the exact result)")
        return self


def _check_linear(params: LinearParams, weights, ranks) -> None:
    """Refusals of `linear` before computing: the cases where mergekit's result is not W0 plus an update of ours."""
    total = sum(weights)
    if params.normalize and abs(total) < 1e-8:
        raise MergeError(f"linear divides by the sum of the weights, which is {total:g} here; mergekit's result "
                         "would be Inf/NaN (or huge). Change the weights")
    if not params.normalize and abs(total - 1) > 1e-6:
        raise MergeError(f"linear with normalize: false gives Σw·W0 + Σ w_t ΔW_t with Σw = {total:g} here, which "
                         "rescales the base model itself; use task_arithmetic for Σ w_t ΔW_t, or weights summing to 1")


def _merge_then_compress(factors, weights, params: MtcParams | TaskArithmeticParams | LinearParams,
                         ctx: MethodContext) -> ModuleResult:
    shape = factors[0].shape
    if getattr(params, "rule", "ta") == "ta":
        if isinstance(params, LinearParams):  # _check_linear refused Σw ≈ 0 (normalize) and Σw ≠ 1 (not)
            scale = 1 / sum(weights) if params.normalize else 1.0
        else:
            scale = params.lambda_ / _weight_sum(weights) if params.normalize else params.lambda_
        merged, stats = truncate(svd_of_sum(factors, [scale * w for w in weights]), params.rank, shape)
        return ModuleResult(merged, stats)
    return _merge_by_rule(factors, weights, params, ctx)


@over_present_tasks  # (ta above keeps every adapter: `normalize` divides by all weights, as mergekit does)
def _merge_by_rule(factors, weights, params: MtcParams, ctx: MethodContext) -> ModuleResult:
    shape = factors[0].shape
    if params.rule == "tsv":
        k = params.tsv_components or default_tsv_components(shape, len(factors))
        params = params.model_copy(update={"tsv_components": k})
    if params.rule in ("tsv", "iso_c", "iso_cts", "wudi"):
        return merge_in_core_space(factors, weights, params, params.rank, params.lambda_, ctx)
    return _compress_dense(params.lambda_ * dense_elementwise_merge(factors, weights, params, ctx), params.rank, shape)


def _compress_dense(dense: torch.Tensor, rank, shape) -> ModuleResult:
    """The best rank-`rank` factors of a dense merge, from one exact thin SVD."""
    transpose = dense.shape[0] < dense.shape[1]  # LAPACK is much faster on tall matrices
    U, S, Vh = torch.linalg.svd(dense.T if transpose else dense, full_matrices=False)
    svd = LowRankSVD(Vh.T, S, U.T) if transpose else LowRankSVD(U, S, Vh)
    merged, stats = truncate(svd, rank, shape)
    return ModuleResult(merged, stats)


def dense_elementwise_merge(factors, weights, params: RuleParams, ctx: MethodContext) -> torch.Tensor:
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
        return [ctx.generator(params.seed, device, f"#{t}") for t in range(len(factors))] if drops else None

    def task_block(t, start, gens):
        x = weights[t] * (factors[t].B[start:start + rows] @ factors[t].A)
        return dare(x, params.drop_rate, gens[t]) if drops else x

    out = factors[0].B.new_empty(m, n)
    if trims:  # `out` doubles as the scratch for one task's full matrix
        gens, thresholds = generators(), []
        for t in range(len(factors)):
            for start in starts:
                out[start:start + rows] = task_block(t, start, gens)
            thresholds.append(magnitude_threshold(out, params.density, params.keep_count))
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


def mergekit_ties_merge(factors, weights, params: TiesParams) -> torch.Tensor:
    """``rules.ties_weighted`` on the dense ΔW_t = B_t A_t (before λ), formed block of rows by block of rows
    (memory T·block·n). The trim threshold and the L1 rescale need a task's whole matrix: a first pass forms one
    task at a time into the output buffer."""
    m, n = factors[0].shape
    rows = max(1, BLOCK_ELEMENTS // (len(factors) * n))
    starts = range(0, m, rows)
    T = len(factors)

    def task_block(t, start):
        return factors[t].B[start:start + rows] @ factors[t].A

    out = factors[0].B.new_empty(m, n)
    thresholds, scales = [out.new_zeros(())] * T, [out.new_ones(())] * T
    if params.density < 1:  # `out` doubles as the scratch for one task's full matrix
        for t in range(T):
            for start in starts:
                out[start:start + rows] = task_block(t, start)
            thresholds[t] = mergekit_threshold(out, params.density)
            if params.rescale and params.density > 0:
                scales[t] = l1_rescale(out, thresholds[t])
    coefficients = torch.stack([w * s for w, s in zip(out.new_tensor(weights), scales)])[:, None, None]
    thresholds = torch.stack(thresholds)[:, None, None]
    for start in starts:
        D = torch.stack([task_block(t, start) for t in range(T)])
        out[start:start + rows] = weighted_disjoint_merge(coefficients * (D * (D.abs() >= thresholds)), weights,
                                                          params.normalize)
    return out


def _weight_sum(weights) -> float:
    total = sum(weights)
    return 1.0 if abs(total) < 1e-8 else total  # mergekit's guard against a zero divisor


@method("mtc", params=MtcParams, pretty_name="Merge-then-Compress", paper=ctm.PAPER)  # the baseline that paper defines
def mtc(factors, weights, params: MtcParams, ctx) -> ModuleResult:
    """Merge with a rule, then truncate to the best rank-`rank` approximation."""
    return _merge_then_compress(factors, weights, params, ctx)


@method("task_arithmetic", params=TaskArithmeticParams, pretty_name="Task Arithmetic", in_mergekit=False,
        paper=Paper("ilharco2023editing", "Editing Models with Task Arithmetic", "Ilharco, Gabriel and others", 2023,
                    "https://arxiv.org/abs/2212.04089", "ICLR 2023"))
def task_arithmetic(factors, weights, params: TaskArithmeticParams, ctx) -> ModuleResult:
    """λ Σ_t w_t ΔW_t (mergekit's task_arithmetic on adapters), exact or truncated to `rank`."""
    return _merge_then_compress(factors, weights, params, ctx)


@method("linear", params=LinearParams, pretty_name="Linear", in_mergekit=False, check=_check_linear,
        paper=Paper("wortsman2022soups", "Model soups: averaging weights of multiple fine-tuned models improves "
                    "accuracy without increasing inference time", "Wortsman, Mitchell and others", 2022,
                    "https://arxiv.org/abs/2203.05482", "ICML 2022"))
def linear(factors, weights, params: LinearParams, ctx) -> ModuleResult:
    """Σ_t w_t ΔW_t / Σ_t w_t (mergekit's linear on base+adapter models), exact or truncated to `rank`."""
    _check_linear(params, weights, [f.rank for f in factors])  # also for callers that skip the engine's checks
    return _merge_then_compress(factors, weights, params, ctx)


@method("ties", params=TiesParams, pretty_name="TIES", in_mergekit=False,
        paper=Paper("yadav2023ties", "TIES-Merging: Resolving Interference When Merging Models", "Yadav, Prateek and "
                    "Tam, Derek and Choshen, Leshem and Raffel, Colin and Bansal, Mohit", 2023,
                    "https://arxiv.org/abs/2306.01708", "NeurIPS 2023"))
@over_present_tasks  # an absent adapter's zeros never agree with the elected sign: dropping it changes nothing
def ties(factors, weights, params: TiesParams, ctx) -> ModuleResult:
    """mergekit's TIES on the adapters' updates (weighted disjoint merge), truncated to `rank`."""
    return _compress_dense(params.lambda_ * mergekit_ties_merge(factors, weights, params), params.rank,
                           factors[0].shape)
