"""Dense forms of our methods: what each one computes when mergekit hands it full tensors.

Our methods are registered in mergekit's global registry (``methods.py``), so every generic mergekit entry point
can reach them with dense tensors of one shape: ``merge_state_dicts``, ``merge_tensors``, any caller of
``GroupMergeMethod``. (``mergekit-yaml`` recipes of our methods never get here: ``route.run_merge`` sends them to
our engine, which reads the LoRA factors.) Each method then runs its full-model form on the task vectors

    Δ_t = θ_t − θ_0   (θ_0: the base input),   or   Δ_t = θ_t   when there is no base,

and returns θ_0 + ΔW* (ΔW* without a base). No base means θ_0 = 0: the inputs are the task vectors themselves,
as mergekit's optional-base methods (``multislerp``, ``nuslerp``) treat the tensors relative to the origin; this is
also how to merge precomputed task vectors (or dense LoRA updates) with ``merge_state_dicts``.

Per 2-D tensor (X_t = w_t Δ_t; T counts the tasks whose Δ_t is not all zero, like ``over_present_tasks``):

=============== =======================================================================================================
cat             λ Σ_t w_t Δ_t (the exact weighted sum)
linear_factors  λ Σ_t w_t Δ_t: the weighted sum that factor averaging approximates; dense inputs have no factors to
                average (any split B G, G⁻¹ A would give a different, arbitrary answer)
mtc             λ f(X_1 … X_T) with its rule (ta: divided by Σ w_t with ``normalize``), then the best rank-``rank``
                approximation; exact when ``rank`` is unset (for every rule: a dense merge has no adapter size to pick)
tsv             TSV-M: per-task SVD, top k = ``tsv_components`` or ⌊min(m,n)/T⌋ triplets of each X_t,
                λ polar(U_cat) diag(S_cat) polar(V_cat)ᵀ; then ``rank``
iso_c           λ mean(S) U Vᵀ of Σ_t X_t = U S Vᵀ (nonzero spectrum); then ``rank``
iso_cts         common top-k_c subspace of Σ_t X_t + per-task directions of the residuals, polar-orthogonalised,
                flat spectrum (``rules.iso_cts``), × λ; then ``rank``
wudi            λ (Σ_t X_t G_t + μ Σ_t X_t)(Σ_t G_t + μI)⁻¹ with G_t = X_tᵀX_t/‖X_t‖² (``rules.wudi``); then ``rank``
core_space      the factor method on the exact SVD factors of each Δ_t (balanced: B = U√S, A = √S Vᵀ, numerical rank)
knots           the same (KnOTS depends only on the products B_t A_t)
ctm             the factor method on the rank-r factors of each Δ_t (its top-r SVD, balanced), r = ``rank``;
                unset: each Δ_t's numerical rank (exact factors; r is then the largest of them)
rmm             Σ_t w_t θ_t / Σ_t w_t, the weighted average of the inputs (see below)
=============== =======================================================================================================

Tensors that are not 2-D (biases, norms, scalars, convolution kernels) and empty ones: the method's task arithmetic
θ_0 + λ Σ_t w_t Δ_t (divided by Σ w_t for ``mtc`` with ``normalize``; rmm: the weighted average): the methods are
defined on matrices.

rmm has no single-model form: its output is a bundle from which every task comes back. Its dense form is the
centre its weighted PCA would have on dense task vectors, the weighted average Σ w_t θ_t / Σ w_t (= θ_0 + Σ_t p_t Δ_t with
p_t = w_t / Σ w, independent of the base; mergekit's ``linear``); ``p``, ``center``, ``gauge`` and ``svd_rank`` are
validated but do not enter it. Weights must be > 0 and ``lambda`` 1, as in the bundle route.

Inputs are never modified: each is read through ``.contiguous()`` (a copy only for strided views) and every step
builds new tensors. Computation is in float64 for float64 inputs, float32 otherwise; the result has the input dtype.
As mergekit's API promises, autograd connections are kept: exact for the linear forms (cat, linear_factors, mtc's
ta, rmm, non-matrix tensors); through an SVD only where it is differentiable (distinct nonzero singular values).
Cost: at most one thin SVD per Δ_t plus the method's small-space work, O(T m n min(m, n)) for T tasks.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch

from lowrank_methods.core.errors import ComputeError, MergeError, RecipeError, short
from lowrank_methods.core.types import LoraFactors
from lowrank_methods.core.linalg import LowRankSVD, numerical_rank, truncate
from lowrank_methods.core.method import Method, get_method
from lowrank_methods.core.params import MAX_MAGNITUDE, MethodParams
from lowrank_methods.core.rules import apply_rule, default_tsv_components, iso_c, iso_cts, tsv, wudi
from lowrank_methods.core.types import MethodContext

DENSE_OUTPUTS = (None, "model")  # `output: adapter` / `bundle` describe the adapter route's files


def merge_dense(method: Method | str, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                parameters: dict | None = None, *, base: torch.Tensor | None = None,
                name: str | None = None) -> torch.Tensor:
    """One output tensor of ``method`` from dense inputs: θ_0 + ΔW* (``base`` = θ_0), or ΔW* without a base.

    ``tensors`` are the non-base inputs θ_t, ``weights`` their w_t, ``parameters`` the method's own (as in a recipe:
    ``lambda``, ``rank``, rule parameters, ``output``), validated through the method's parameter model.
    """
    method = get_method(method) if isinstance(method, str) else method
    values = dict(parameters or {})
    output = values.pop("output", None)
    for adapter_only in ("rank_budget", "serve_for"):
        if values.pop(adapter_only, None) is not None:
            raise RecipeError(f"{method.name}: {adapter_only} shapes an adapter merged from LoRA adapters; merging "
                              "dense tensors gives merged weights: remove it", module=name)
    if output not in DENSE_OUTPUTS:
        raise RecipeError(f"{method.name}: output {short(output)} is for LoRA adapter inputs; merging dense tensors "
                          "gives merged weights: leave `output` unset or use `output: model`", module=name)
    params = _validate(method, values, name)
    weights = [_weight(w, method.name, name) for w in weights]
    if len(weights) != len(tensors) or not tensors:
        raise MergeError(f"{method.name}: needs one weight per input and at least one non-base input, got "
                         f"{len(tensors)} inputs and {len(weights)} weights", module=name)
    if method.name not in DENSE_FORMS:
        raise RecipeError(f"method {method.name!r} has no dense form", module=name)
    if method.name == "rmm":
        _check_rmm(params, weights, name)

    first = tensors[0]
    if any(t.shape != first.shape for t in tensors) or (base is not None and base.shape != first.shape):
        raise MergeError(f"{method.name}: inputs of different shapes {[tuple(t.shape) for t in tensors]}", module=name)
    dtype = first.dtype if first.is_floating_point() else torch.float32
    work = torch.float64 if dtype == torch.float64 else torch.float32
    theta0 = None if base is None else _read(base, work, method.name, name, "the base")
    deltas = []
    for i, t in enumerate(tensors):
        theta = _read(t, work, method.name, name, f"input {i}")
        deltas.append(theta if theta0 is None else theta - theta0)

    if first.ndim != 2 or first.numel() == 0:
        update = _task_arithmetic(deltas, weights, params, method.name)
    else:
        update = DENSE_FORMS[method.name](method, deltas, weights, params, MethodContext(name or ""))
    merged = update if theta0 is None else theta0 + update
    if not torch.isfinite(merged).all():
        raise ComputeError(f"{method.name}: the merged tensor is not finite (NaN or Inf); lower `lambda` or the "
                         "weights", module=name)
    return merged.to(dtype)


# -- parameters ---------------------------------------------------------------------------------------------------
def _validate(method: Method, values: dict, name: str | None) -> MethodParams:
    """``values`` through the method's parameter model. mergekit binds every declared parameter, filling in the
    defaults, so a value equal to its field's default counts as unset; and since mergekit's generic callers pass one
    parameter set to every method declaring a name, a rule knob the chosen rule does not read is ignored with a
    warning (a recipe refuses it)."""
    fields = {f.alias or n: f for n, f in method.fields.items()}
    values = {k: v for k, v in values.items() if k not in fields or not _is_default(v, fields[k].default)}
    values = _drop_other_rules_knobs(method, values, fields)
    try:
        if method.name == "mtc" and values.get("rank") is None:
            # the adapter route refuses ties/dare without `rank` (it must size the adapter); a dense merge is exact
            return method.parse_params({**values, "rank": 1}).model_copy(update={"rank": None})
        return method.parse_params(values)
    except RecipeError as e:
        raise RecipeError(e.message, module=name) from e


def _is_default(value, default) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def _drop_other_rules_knobs(method: Method, values: dict, fields: dict) -> dict:
    if not method.variants:
        return values
    rule = values.get("rule", fields["rule"].default)
    if rule not in method.variants:
        return values  # an unknown rule: parse_params says so
    every_knob = set().union(*(method.knobs_of(r) for r in method.variants))
    unused = sorted(k for k in values if k in every_knob and k not in method.knobs_of(rule))
    if unused:
        warnings.warn(f"mergekit-lowrank: {method.name} with rule {rule!r} does not read {', '.join(unused)}; "
                      "ignored", stacklevel=2)
    return {k: v for k, v in values.items() if k not in unused}


def _weight(w, method: str, name: str | None) -> float:
    w = float(w)
    if not math.isfinite(w) or abs(w) > MAX_MAGNITUDE:
        raise RecipeError(f"{method}: weight must be a finite number of magnitude at most {MAX_MAGNITUDE:g}, "
                          f"got {w!r}", module=name)
    return w


def _check_rmm(params, weights: Sequence[float], name: str | None) -> None:
    if any(w <= 0 for w in weights):
        raise RecipeError(f"rmm weights are the tasks' importance and must be > 0, got {list(weights)}", module=name)


def _read(t: torch.Tensor, work: torch.dtype, method: str, name: str | None, what: str) -> torch.Tensor:
    """The input as a contiguous tensor of the working dtype (a copy only when needed: never written to; autograd
    connections kept, as mergekit's ``merge_state_dicts`` promises)."""
    t = t.contiguous().to(work)
    if not torch.isfinite(t).all():
        raise MergeError(f"{method}: {what} contains NaN or Inf", module=name)
    return t


# -- shared pieces --------------------------------------------------------------------------------------------------
def _weighted_sum(deltas, weights) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out = out + w * d
    return out


def _weight_sum(weights) -> float:
    total = sum(weights)
    return 1.0 if abs(total) < 1e-8 else total  # mergekit's guard against a zero divisor (as mtc's `normalize`)


def _task_arithmetic(deltas, weights, params, method: str) -> torch.Tensor:
    """What every method does with a tensor that is not a matrix: λ Σ w_t Δ_t (normalised where the method is)."""
    if method == "rmm":
        return _weighted_sum(deltas, weights) / sum(weights)
    scale = params.lambda_ / _weight_sum(weights) if getattr(params, "normalize", False) else params.lambda_
    return scale * _weighted_sum(deltas, weights)


def _present(deltas, weights):
    """The tasks whose update is not all zero (an absent task changes nothing, as ``over_present_tasks``)."""
    kept = [(d, w) for d, w in zip(deltas, weights) if bool(d.any())]
    return [d for d, _ in kept], [w for _, w in kept]


def dense_svd(D: torch.Tensor) -> LowRankSVD:
    """Thin SVD of an m×n matrix, computed on its tall side (LAPACK is much faster on tall matrices)."""
    if D.shape[0] < D.shape[1]:
        U, S, Vh = torch.linalg.svd(D.T, full_matrices=False)
        return LowRankSVD(Vh.T, S, U.T)
    return LowRankSVD(*torch.linalg.svd(D, full_matrices=False))


def exact_factors(D: torch.Tensor, rank: int | None = None) -> LoraFactors:
    """Balanced factors B = U√S, A = √S Vᵀ of D's top min(rank, numerical rank) components (all when rank is None)."""
    svd = dense_svd(D)
    k = numerical_rank(svd.S, tuple(D.shape))
    return svd.factors(k if rank is None else min(k, rank))


def best_rank(D: torch.Tensor, rank) -> torch.Tensor:
    """D itself (rank None) or its best approximation of that rank / energy fraction (``linalg.truncate``)."""
    if rank is None:
        return D
    f, _ = truncate(dense_svd(D), rank, tuple(D.shape))
    return f.dense()


# -- the dense forms: fn(method, deltas Δ_t, weights w_t, params) -> ΔW* ----------------------------------------------
def _weighted_stack(deltas, weights) -> torch.Tensor:
    return torch.stack([w * d for d, w in zip(deltas, weights)])


def _cat(method, deltas, weights, params, ctx):
    """cat, linear_factors: λ Σ_t w_t Δ_t. (For linear_factors, the weighted sum its factor averaging approximates:
    a dense update has no factors, and averaging some chosen split of it would be an arbitrary answer.)"""
    return params.lambda_ * _weighted_sum(deltas, weights)


def _mtc(method, deltas, weights, params, ctx):
    """Also the dense form of the aliases task_arithmetic and linear (rule ta, mergekit's defaults)."""
    if getattr(params, "rule", "ta") == "ta":  # every task counts: `normalize` divides by all weights, as mergekit
        scale = params.lambda_ / _weight_sum(weights) if params.normalize else params.lambda_
        return best_rank(scale * _weighted_sum(deltas, weights), params.rank)
    zero = torch.zeros_like(deltas[0])
    deltas, weights = _present(deltas, weights)
    if not deltas:
        return zero
    if params.rule == "tsv":
        k = params.tsv_components or default_tsv_components(deltas[0].shape, len(deltas))
        params = params.model_copy(update={"tsv_components": k})
    return best_rank(params.lambda_ * apply_rule(_weighted_stack(deltas, weights), params, ctx), params.rank)


def _tsv(method, deltas, weights, params, ctx):
    """TSV-M: top-k triplets of each X_t, k = tsv_components or ⌊min(m,n)/T⌋; λ polar(U_cat) S_cat polar(V_cat)ᵀ."""
    kept, kw = _present(deltas, weights)
    if not kept:
        return torch.zeros_like(deltas[0])
    k = params.tsv_components or default_tsv_components(kept[0].shape, len(kept))
    return best_rank(params.lambda_ * tsv(_weighted_stack(kept, kw), k), params.rank)


def _iso_c(method, deltas, weights, params, ctx):
    """Iso-C: Σ_t X_t = U S Vᵀ → λ mean(S) U Vᵀ over its nonzero spectrum."""
    kept, kw = _present(deltas, weights)
    if not kept:
        return torch.zeros_like(deltas[0])
    return best_rank(params.lambda_ * iso_c(_weighted_stack(kept, kw)), params.rank)


def _iso_cts(method, deltas, weights, params, ctx):
    """Iso-CTS: common subspace of the sum + task-specific residual directions, orthogonalised, flat spectrum."""
    kept, kw = _present(deltas, weights)
    if not kept:
        return torch.zeros_like(deltas[0])
    return best_rank(params.lambda_ * iso_cts(_weighted_stack(kept, kw), params.common_space_fraction,
                                                 params.task_directions), params.rank)


def _wudi(method, deltas, weights, params, ctx):
    """WUDI: (Σ_t X_t G_t + μ Σ_t X_t)(Σ_t G_t + μI)⁻¹, G_t = X_tᵀX_t/‖X_t‖²; then ``rank``."""
    kept, kw = _present(deltas, weights)
    if not kept:
        return torch.zeros_like(deltas[0])
    return best_rank(params.lambda_ * wudi(_weighted_stack(kept, kw), params.ridge), params.rank)


def _on_factors(rank_of: Callable[[MethodParams], int | None]):
    """The factor method itself, on the SVD factors of each Δ_t (exact, or the top ``rank_of(params)`` components)."""

    def form(method, deltas, weights, params, ctx):
        r = rank_of(params)
        result = method([exact_factors(d, r) for d in deltas], weights, params, ctx)
        return result.factors.dense()

    return form


def _rmm(method, deltas, weights, params, ctx):
    """rmm has no single-model form (its output is a bundle from which each task comes back): its dense form is
    the weighted average Σ_t w_t θ_t / Σ_t w_t (= θ_0 + Σ_t p_t Δ_t, whatever the base), the centre its weighted
    PCA would have on dense task vectors; p, center, gauge and svd_rank do not enter it."""
    return _weighted_sum(deltas, weights) / sum(weights)


DENSE_FORMS: dict[str, Callable] = {
    "cat": _cat,
    "linear_factors": _cat,
    "mtc": _mtc,
    "task_arithmetic": _mtc,  # aliases of mergekit's own names (not registered in mergekit; for direct calls)
    "linear": _mtc,
    "tsv": _tsv,
    "iso_c": _iso_c,
    "iso_cts": _iso_cts,
    "wudi": _wudi,
    "core_space": _on_factors(lambda p: None),
    "knots": _on_factors(lambda p: None),
    "ctm": _on_factors(lambda p: p.rank),
    "rmm": _rmm,
}
