"""Merge rules on stacked task coordinates X (T, p, q), shared by every space.

A rule maps T task matrices to one. The space is the caller's: dense ΔW_t (m×n), Core-Space cores
M_t (R×R), CtM coordinates C_t (r×r) or KnOTS' aligned V_t (k×n). Per-adapter weights are applied
by the caller before the rule (X_t = w_t ΔW_t, as PEFT and mergekit do), λ after it.

    ta        Σ_t X_t                                                    (Ilharco et al. 2212.04089)
    ties      trim each X_t to its top-`density` magnitudes, elect γ = sign(Σ_t X̂_t),
              mean of the entries agreeing with γ                         (Yadav et al. 2306.01708)
              (PEFT's disjoint mean: ÷ the count of agreeing entries; mergekit's `ties` divides by the
              sum of their *weights* instead: ``ties_weighted`` below, used only by the `ties` alias)
    dare      Σ_t X_t ⊙ m_t / (1-p),  m_t ~ Bernoulli(1-p)               (Yu et al. 2311.03099)
    dare_ties DARE drop-and-rescale, then TIES
    tsv       per-task top singular triplets, U and V orthogonalised by their polar factors
                                                                          (Gargiulo et al. 2412.00081)
    iso_c     Σ_t X_t with its nonzero spectrum flattened to its mean     (Marczak et al. 2502.04959)
    iso_cts   common subspace of Σ_t X_t + task-specific residual directions, flattened spectrum
    wudi      argmin_X Σ_t ‖(X − X_t) X_tᵀ‖² / ‖X_t‖² (+ a ridge towards Σ_t X_t), closed form
                                                                          (Cheng et al. 2503.08099)
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from lowrank_methods.core.linalg import numerical_rank, polar
from lowrank_methods.core.params import ScaledParams
from lowrank_methods.core.types import LoraFactors, MethodContext, ModuleResult

RuleName = Literal["ta", "ties", "dare", "dare_ties", "tsv", "iso_c", "iso_cts", "wudi"]
SignMethod = Literal["total", "frequency"]
KeepCount = Literal["floor", "floor+1"]


# -- each rule with its own knobs (a method taking ``rule:`` gets exactly the chosen rule's knobs) ----------------
class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)


class TaRule(Rule):
    rule: Literal["ta"] = "ta"


class TiesRule(Rule):
    rule: Literal["ties"] = "ties"
    density: float = Field(0.2, gt=0, le=1, description="TIES: fraction of each task's entries kept (by magnitude)")
    majority_sign_method: SignMethod = Field("total", description="TIES sign election: sum of values or count of signs")
    keep_count: KeepCount = Field("floor", description="TIES: entries kept per task, ⌊density·n⌋, or ⌊density·n⌋+1 "
                                  "as the TIES and CtM reference code (threshold at the (n−⌊density·n⌋)-th smallest)")


class DareRule(Rule):
    rule: Literal["dare"] = "dare"
    drop_rate: float = Field(0.1, ge=0, lt=1, description="DARE: probability p of dropping an entry")
    seed: int = Field(0, description="DARE: seed; each module draws from (seed, module name)")


class DareTiesRule(TiesRule, DareRule):
    rule: Literal["dare_ties"] = "dare_ties"


class TsvRule(Rule):
    rule: Literal["tsv"] = "tsv"
    tsv_components: PositiveInt | None = Field(None, description="TSV: singular triplets kept per task (None: "
                                               "⌊min(m, n)/T⌋ of the m×n matrices merged)")


class IsoCRule(Rule):
    rule: Literal["iso_c"] = "iso_c"


class IsoCtsRule(Rule):
    rule: Literal["iso_cts"] = "iso_cts"
    common_space_fraction: float = Field(0.8, gt=0, le=1, description="Iso-CTS: share of the spectrum kept common")
    task_directions: PositiveInt | None = Field(None, description="Iso-CTS: directions per task (None: from "
                                                "common_space_fraction; CtM's reference code keeps 1, so r−T are common)")


class WudiRule(Rule):
    rule: Literal["wudi"] = "wudi"
    ridge: float = Field(0.01, ge=0, description="WUDI: pull towards the task-arithmetic sum, relative to the mean "
                         "eigenvalue of Σ_t G_t (0: the exact minimiser, which amplifies directions few tasks use)")


RULES: dict[str, type[Rule]] = {"ta": TaRule, "ties": TiesRule, "dare": DareRule, "dare_ties": DareTiesRule,
                                "tsv": TsvRule, "iso_c": IsoCRule, "iso_cts": IsoCtsRule, "wudi": WudiRule}


class RuleParams(ScaledParams):
    """Parameters of a method that takes ``rule:``; the registry adds the chosen rule's knobs (``Method.variants``)."""

    rule: RuleName = "ties"


def default_tsv_components(shape: tuple[int, int], tasks: int) -> int:
    """TSV-M's triplets per task when the recipe sets none: ⌊min(m, n)/T⌋, at least 1 (the reference's choice)."""
    return max(1, min(shape) // tasks)


def over_present_tasks(fn):
    """An adapter that lacks a module (rank 0) is not a task there: drop it before T, norms or k are counted,
    so it changes nothing; with no task left the result is the rank-0 update."""

    @functools.wraps(fn)
    def wrapper(factors, weights, params, ctx=None):
        kept = [(f, w) for f, w in zip(factors, weights) if f.rank > 0]
        if not kept:
            f = factors[0]
            return ModuleResult(LoraFactors.zeros(f.shape, f.A.dtype, f.A.device), {"rank": 0, "retained_energy": 1.0})
        return fn([f for f, _ in kept], [w for _, w in kept], params, ctx if ctx is not None else MethodContext())

    return wrapper


def apply_rule(X: torch.Tensor, rule: Rule, ctx: MethodContext | None = None) -> torch.Tensor:
    """Merge the (already weighted) stack X (T, p, q) with ``rule`` (a rule model, or a method's parameters for
    one); λ is the caller's. ``ctx`` seeds DARE's draws from the module's name."""
    name = rule.rule
    if name == "ta":
        return task_arithmetic(X)
    if name == "ties":
        return ties(X, rule.density, rule.majority_sign_method, rule.keep_count)
    if name in ("dare", "dare_ties"):
        dropped = dare(X, rule.drop_rate, (ctx or MethodContext()).generator(rule.seed, X.device))
        if name == "dare":
            return task_arithmetic(dropped)
        return ties(dropped, rule.density, rule.majority_sign_method, rule.keep_count)
    if name == "tsv":
        return tsv(X, rule.tsv_components)
    if name == "iso_c":
        return iso_c(X)
    if name == "iso_cts":
        return iso_cts(X, rule.common_space_fraction, rule.task_directions)
    if name == "wudi":
        return wudi(X, rule.ridge)
    raise ValueError(f"unknown rule {name!r}")


# -- elementwise rules -------------------------------------------------------------------------------
def task_arithmetic(X: torch.Tensor) -> torch.Tensor:
    """Σ_t X_t."""
    return X.sum(0)


def magnitude_threshold(x: torch.Tensor, density: float, keep_count: KeepCount = "floor") -> torch.Tensor:
    """The k-th largest |x| with k = max(1, ⌊density·numel⌋) (+1 for "floor+1"); entries with |x| ≥ it are kept
    (ties kept too)."""
    flat = x.abs().flatten()
    keep = max(1, int(density * flat.numel()) + (keep_count == "floor+1"))
    if keep >= flat.numel():
        return flat.new_zeros(())
    return kth_smallest(flat, flat.numel() - keep + 1)


RADIX = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}  # bits view, shift to 15 top bits
RADIX_MIN = 1 << 16  # below this, torch.kthvalue is as fast


def kth_smallest(a: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.kthvalue(a, k).values`` for a 1-D tensor of non-negative finite numbers, by one radix pass: their
    bit patterns sort as the numbers do, so a histogram of the top 15 bits names the bucket holding the k-th, and
    only that bucket is searched. The same element, ≈4× faster on millions of entries."""
    if a.dtype not in RADIX or a.numel() < RADIX_MIN:
        return torch.kthvalue(a, k).values
    view, shift = RADIX[a.dtype]
    top = a.view(view) >> shift
    below = torch.bincount(top, minlength=1 << 15).cumsum(0)
    bucket = int(torch.searchsorted(below, k))  # the first bucket with at least k entries up to it
    before = int(below[bucket - 1]) if bucket else 0
    return torch.kthvalue(a[top == bucket], k - before).values


CHUNK_BYTES = 1 << 21  # per-entry work over the tasks in blocks that stay in cache (≈4× faster, same result)


def per_entry(fn, X: torch.Tensor, *args) -> torch.Tensor:
    """``fn(X, *args)`` for a function of each entry's T values (reducing dim 0), computed over blocks of entries."""
    flat = X.reshape(X.shape[0], -1)
    step = max(1, CHUNK_BYTES // (flat.shape[0] * flat.element_size()))
    if flat.shape[1] <= step:
        return fn(flat, *args).reshape(X.shape[1:])
    return torch.cat([fn(flat[:, i:i + step], *args) for i in range(0, flat.shape[1], step)]).reshape(X.shape[1:])


def trim(X: torch.Tensor, density: float, keep_count: KeepCount = "floor") -> torch.Tensor:
    """TIES step 1: keep each task's top-`density` entries by magnitude, zero the rest."""
    if density >= 1 or X.numel() == 0:
        return X
    thresholds = _thresholds(X, density, keep_count)
    return X * (X.abs() >= thresholds)


def _thresholds(X: torch.Tensor, density: float, keep_count: KeepCount) -> torch.Tensor:
    thresholds = torch.stack([magnitude_threshold(x, density, keep_count) for x in X])
    return thresholds.reshape(-1, *([1] * (X.ndim - 1)))


def elect_and_merge(X: torch.Tensor, majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES steps 2-3: γ = sign(Σ_t X_t) (or of Σ_t sign X_t), ties → +; mean over the nonzero entries agreeing with γ."""
    return per_entry(_elect, X, majority_sign_method)


def _elect(X: torch.Tensor, majority_sign_method: SignMethod, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    if thresholds is not None:
        X = X * (X.abs() >= thresholds)
    sign = X.sign()
    votes = X.sum(0) if majority_sign_method == "total" else sign.sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(X.dtype)
    agree = sign == majority
    return (X * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties(X: torch.Tensor, density: float, majority_sign_method: SignMethod = "total",
         keep_count: KeepCount = "floor") -> torch.Tensor:
    """TIES-Merging: trim, elect sign, disjoint mean (trimmed block by block, once each task's threshold is known)."""
    if density >= 1 or X.numel() == 0:
        return elect_and_merge(X, majority_sign_method)
    thresholds = _thresholds(X, density, keep_count).reshape(-1, 1)
    return per_entry(_elect, X, majority_sign_method, thresholds)


# -- mergekit's TIES (generalized_task_arithmetic.py: magnitude sparsification, consensus "sum") ----------
RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when either L1 norm is below it


def mergekit_threshold(x: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's ``sparsify.magnitude`` as a threshold on |x|: density ≥ 1 keeps everything, ≤ 0 nothing, else
    the top k = max(1, ⌊density·numel⌋) magnitudes (mergekit keeps exactly k, breaking equal magnitudes in
    argsort's order; this keeps every entry equal to the k-th, which differs only on exactly tied magnitudes)."""
    if density >= 1 or x.numel() == 0:
        return x.new_zeros(())
    if density <= 0:
        return x.new_tensor(float("inf"))
    return magnitude_threshold(x, density)


def l1_rescale(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """mergekit's ``rescale: true`` (L1): ‖x‖₁ / ‖x ⊙ [|x| ≥ threshold]‖₁, or 1 when either is below 1e-7."""
    before = x.abs().sum()
    after = (x.abs() * (x.abs() >= threshold)).sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return x.new_ones(())
    return before / after


def weighted_disjoint_merge(X: torch.Tensor, weights, normalize: bool = True) -> torch.Tensor:
    """mergekit's TIES steps 2-3 on X_t = w_t x̂_t (T, p, q): γ = sign(Σ_t X_t) (ties → +), agree_t = [sign X_t = γ]
    (a zero never agrees), then Σ_t X_t·agree_t, divided (``normalize``) by Σ_t w_t·agree_t (0 → 1).
    With unit weights this is ``elect_and_merge``'s disjoint mean; with equal weights w, that mean ÷ w."""
    w = torch.as_tensor(weights, dtype=X.dtype, device=X.device).reshape(-1, *([1] * (X.ndim - 1)))
    sign = X.sign()
    majority = torch.where(X.sum(0) >= 0, 1.0, -1.0).to(X.dtype)
    agree = sign == majority
    merged = (X * agree).sum(0)
    if not normalize:
        return merged
    divisor = (w * agree).sum(0)
    return merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def ties_weighted(D: torch.Tensor, weights, density: float = 1.0, *, normalize: bool = True,
                  rescale: bool = False) -> torch.Tensor:
    """mergekit's ``ties`` on the *unweighted* task stack D (T, p, q), before λ: each D_t trimmed to its top
    `density` magnitudes (and, with ``rescale``, L1-rescaled), weighted, then ``weighted_disjoint_merge``."""
    parts = []
    for d, w in zip(D, weights):
        threshold = mergekit_threshold(d, density)
        scale = l1_rescale(d, threshold) if rescale and 0 < density < 1 else 1.0
        parts.append(w * scale * (d * (d.abs() >= threshold)))
    return weighted_disjoint_merge(torch.stack(parts), weights, normalize)


def dare(X: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability p, rescale the survivors by 1/(1-p): E[dare(X)] = X."""
    if drop_rate == 0:
        return X
    keep = torch.rand(X.shape, generator=generator, device=X.device, dtype=X.dtype) >= drop_rate
    return X * keep / (1 - drop_rate)


# -- spectral rules ----------------------------------------------------------------------------------
def _svd(X: torch.Tensor, k: int | None = None):
    """Thin SVD keeping at most k of the numerically nonzero triplets (rank-aware: null vectors are arbitrary)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    r = numerical_rank(S, tuple(X.shape))
    r = r if k is None else min(k, r)
    return U[:, :r], S[:r], Vh[:r]


def tsv(X: torch.Tensor, components: int | None = None) -> torch.Tensor:
    """TSV-M: keep k = ⌊min(p,q)/T⌋ (≥1) triplets per task, capped at the task's rank;
    ΔW* = polar(U_cat) diag(S_cat) polar(V_cat)."""
    T, p, q = X.shape
    k = components if components is not None else default_tsv_components((p, q), T)
    parts = [_svd(x, k) for x in X]
    U = torch.cat([u for u, _, _ in parts], 1)
    if U.shape[1] == 0:
        return X.new_zeros(p, q)
    S = torch.cat([s for _, s, _ in parts])
    Vh = torch.cat([vh for _, _, vh in parts], 0)
    return (polar(U) * S) @ polar(Vh)


def iso_c(X: torch.Tensor) -> torch.Tensor:
    """Iso-C, rank-aware: Σ_t X_t = U S Vᵀ → mean(S) U Vᵀ over the nonzero singular values only."""
    U, S, Vh = _svd(X.sum(0))
    if S.numel() == 0:
        return X.new_zeros(X.shape[1:])
    return S.mean() * (U @ Vh)


def iso_cts(X: torch.Tensor, common_space_fraction: float = 0.8, task_directions: int | None = None) -> torch.Tensor:
    """Iso-CTS, rank-aware: D = rank(Σ X_t) directions, k_c of them common (top of Σ X_t) and s per task
    (top of X_t minus its common part); both bases orthogonalised by polar factors, spectrum flattened.
    ``task_directions`` sets s directly (at most ⌊D/T⌋), else s = round((D − ⌊fraction·D⌋)/T)."""
    T = X.shape[0]
    U, S, Vh = _svd(X.sum(0))
    D = S.numel()
    if D == 0:
        return X.new_zeros(X.shape[1:])
    k_c = int(D * common_space_fraction)
    s = round((D - k_c) / T) if task_directions is None else task_directions
    s = min(s, D // T)  # reference: round((D - k_c)/T) dims per task, then k_c = D - s·T
    k_c = D - s * T
    Uc, Sc, Vc = U[:, :k_c], S[:k_c], Vh[:k_c]
    us, ss, vs = [Uc], [Sc], [Vc]
    if s > 0:
        for x in X:
            u, sig, vh = _svd(x - Uc @ (Uc.T @ x), s)
            us.append(u), ss.append(sig), vs.append(vh)
    sigma = torch.cat(ss).mean()
    return sigma * (polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 0)))


def wudi(X: torch.Tensor, ridge: float = 0.01) -> torch.Tensor:
    """WUDI-Merging in closed form: a task's rows span the inputs it reads, so the merge should act on them as the
    task does: X* = argmin Σ_t ‖(X − X_t) X_tᵀ‖²/‖X_t‖² + μ‖X − Σ_t X_t‖²
                  = (Σ_t X_t G_t + μ Σ_t X_t)(Σ_t G_t + μI)⁻¹,   G_t = X_tᵀX_t/‖X_t‖²,
    μ = ridge × the mean nonzero eigenvalue of Σ_t G_t (the same in every space)."""
    norms = X.square().sum((1, 2))
    present = norms > 0
    X = X[present]
    if X.shape[0] == 0:
        return X.new_zeros(X.shape[1:])
    G = X.transpose(1, 2) @ X / norms[present].reshape(-1, 1, 1)
    evals, evecs = torch.linalg.eigh(G.sum(0))
    nonzero = evals > evals.max() * max(G.shape[1:]) * torch.finfo(X.dtype).eps
    mu = ridge * evals[nonzero].mean()
    # the inverse on the tasks' row space only: the right-hand side has no part outside it
    inverse = (evecs[:, nonzero] / (evals[nonzero] + mu)) @ evecs[:, nonzero].T
    return ((X @ G).sum(0) + mu * X.sum(0)) @ inverse
