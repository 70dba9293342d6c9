"""lore: LoRE-Merging (Liu et al. 2025, arXiv 2502.10749): base-free merging by low-rank estimation.

Per weight matrix, estimate a shared base θ0 and low-rank task parts δ_i from the fine-tuned θ_i alone,
    min_{θ0, δ_1..δ_n}  Σ_i p_i (½‖θ0 + δ_i − θ_i‖²_F + τ‖δ_i‖_*)      (p_i = w_i / Σ w, convex),
by block coordinate descent: θ0 ← Σ p_i (θ_i − δ_i), then δ_i ← SVT_τ(θ_i − θ0), from θ0 = mean θ_i, δ_i = 0.
The merged weight is θ0 + λ·rule(δ_1..δ_n) with rule average or TIES; 1-D tensors are averaged.

This is a dense, full-model method: it runs inside mergekit (``mergekit_plugin/lore.py``), not the factor registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from lowrank_methods.core.errors import ComputeError, MergeError
from lowrank_methods.core.method import Paper
from lowrank_methods.core.rules import ties

PAPER = Paper("liu2025lore", "LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model Merging",
              "Liu, Zehua and Wu, Han and Yao, Yuxuan and She, Ruifeng and Han, Xiongwei and Zhong, Tao and "
              "Yuan, Mingxuan", 2025, "https://arxiv.org/abs/2502.10749")
SUMMARY = "LoRE-Merging of full fine-tuned models (base-free low-rank estimation); runs through mergekit"
DEFAULT_TAU = 0.01  # the μ = 0.01 of a third-party reimplementation, read as the SVT threshold (docs/methods/lore.md)


@dataclass
class Thresholded:
    """SVT_τ(X) = U diag(s) Vh with s = σ − τ > 0 for the singular values σ of X above τ; ``fit`` = ‖X − SVT_τ(X)‖²_F
    (k·τ² plus the energy below τ), so the objective never needs the dense δ."""

    U: torch.Tensor
    s: torch.Tensor
    Vh: torch.Tensor
    route: Literal["exact", "subspace"] = "exact"
    fit: float = 0.0

    @property
    def rank(self) -> int:
        return self.s.numel()

    def nuclear_norm(self) -> float:
        return float(self.s.sum())

    def dense(self) -> torch.Tensor:
        return (self.U * self.s) @ self.Vh


def svt(X: torch.Tensor, tau: float, start: "Thresholded | None" = None, *, lowrank: bool = False,
        max_steps: int = 12) -> Thresholded:
    """Singular value thresholding, the prox of τ‖·‖_*: keep σ_j > τ, shrink them to σ_j − τ.

    Exact SVD unless ``lowrank`` (or a ``start``): then block subspace iteration from ``start``'s right singular
    vectors (the previous LoRE iteration's δ, which spans nearly the same subspace) or a random block, its width
    grown until the smallest σ it finds is below τ, kept only once it certifies itself (see ``_subspace_svt``);
    the exact SVD when the block would reach a quarter of min(m, n) or the steps run out.
    """
    if lowrank or start is not None:
        result = _subspace_svt(X, tau, start, max_steps)
        if result is not None:
            return result
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    k = int((S > tau).sum())  # S is sorted descending
    fit = k * tau * tau + float((S[k:].double() ** 2).sum())
    return Thresholded(U[:, :k], S[:k] - tau, Vh[:k], "exact", fit)


def _oversampled(rank: int) -> int:
    return rank + max(8, rank // 4)  # 25%, at least 8


def _subspace_svt(X: torch.Tensor, tau: float, start: "Thresholded | None", max_steps: int) -> Thresholded | None:
    """SVT by subspace iteration, or None when it cannot be certified within ``max_steps`` matrix passes.

    With V an orthonormal n×q block: Q = orth(X V), then the SVD of the q×n matrix Qᵀ X gives U = Q Ub, S, Vh, and
    Vh's rows are the next V (one power step). The result is accepted when (1) the block is not saturated (fewer
    than q − 2 of its σ are above τ), (2) the kept triplets are accurate (‖X Vhᵀ − U S‖_F ≤ 1e-4·‖S‖_F; 1e-9 in float64) and (3)
    nothing above τ is left in X − U S Vh (block power estimate of its spectral norm ≤ τ): then SVT_τ(X) =
    U (S − τ) Vh. Each step costs two products with X at width q; a warm start usually passes after one.
    """
    m, n = X.shape
    gen = torch.Generator(device=X.device).manual_seed(0)  # private: deterministic, no global RNG state touched
    q = _oversampled(start.rank if start is not None else 16)
    V = _block(start.Vh.T if start is not None and start.rank else None, n, q, gen, X)
    squared = float(torch.linalg.vector_norm(X, dim=1).double().square().sum())  # ‖X‖²: float32 rows, summed in
                                                                                   # float64 (fit = ‖X‖² − ΣS² cancels)
    for _ in range(max_steps):
        if 4 * q > min(m, n):
            return None
        Q = torch.linalg.qr(X @ V)[0]
        Ub, S, Vh = torch.linalg.svd(Q.T @ X, full_matrices=False)
        k = int((S > tau).sum())
        if k > q - 3:  # saturated: widen the block, keeping what was found
            q = _oversampled(int(1.5 * q))
            V = _block(Vh.T, n, q, gen, X)
            continue
        U = Q @ Ub[:, :k]
        if _certified(X, U, S[:k], Vh[:k], tau, gen, Vh[k:]):
            fit = max(squared - float((S[:k].double() ** 2).sum()), 0.0) + k * tau * tau
            return Thresholded(U, S[:k] - tau, Vh[:k], "subspace", fit)
        V = Vh.T  # one more power step from the block just found
    return None


def _block(basis: torch.Tensor | None, n: int, q: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """An orthonormal n×q block: ``basis``'s columns (the warm start) completed with random ones."""
    extra = q - (0 if basis is None else basis.shape[1])
    fresh = torch.randn(n, max(extra, 0), generator=gen, dtype=like.dtype, device=like.device)
    block = fresh if basis is None else torch.cat([basis[:, :q], fresh], dim=1)
    return torch.linalg.qr(block)[0]


def _certified(X, U, S, Vh, tau: float, gen, after: torch.Tensor) -> bool:
    """(2) and (3) of ``_subspace_svt``: the kept triplets are singular triplets of X and nothing above τ is left.
    ``after``: the block's next right singular vectors (rows), which start the residual's power estimate."""
    accuracy = 1e-9 if X.dtype == torch.float64 else 1e-4
    if S.numel() and torch.linalg.vector_norm(X @ Vh.T - U * S) > accuracy * torch.linalg.vector_norm(S):
        return False
    return _deflated_norm(X, U, S, Vh, gen, after) <= tau


def _deflated_norm(X, U, S, Vh, gen, after: torch.Tensor | None = None, block: int = 4, steps: int = 5) -> float:
    """Block power estimate of ‖X − U S Vh‖_2 (products with thin blocks, never the m×n difference), from the next
    directions the subspace found (``after``) and random ones. Products with X and Yᵀ X (not Xᵀ Y): row-major."""
    def apply(Z):  # (X − U S Vh) Z
        return X @ Z - U @ (S[:, None] * (Vh @ Z))

    def apply_t(Y):  # (X − U S Vh)ᵀ Y, as (Yᵀ X − (Yᵀ U) S Vh)ᵀ
        return (Y.T @ X - ((Y.T @ U) * S) @ Vh).T

    warm = [] if after is None else [after[: block // 2].T]
    fresh = torch.randn(X.shape[1], block - sum(w.shape[1] for w in warm), generator=gen, dtype=X.dtype,
                        device=X.device)
    Z = torch.linalg.qr(torch.cat(warm + [fresh], dim=1))[0]
    for _ in range(steps):
        Z = torch.linalg.qr(apply_t(apply(Z)))[0]
    return float(torch.linalg.matrix_norm(apply(Z), ord=2))


def energy_threshold(singular_values: Sequence[torch.Tensor], energy: float) -> float:
    """τ such that the pooled singular values above τ carry ≥ ``energy`` of Σ σ² (one τ for all inputs)."""
    s = torch.sort(torch.cat([v.flatten() for v in singular_values]).double(), descending=True).values
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    cum = torch.cumsum(s**2, 0)
    k = int(torch.searchsorted(cum, energy * cum[-1]))  # smallest k with cum[k] ≥ energy·total (0-based)
    return float(s[k + 1]) if k + 1 < s.numel() else 0.0


@dataclass
class LoreDecomposition:
    """θ_i ≈ base + δ_i, with the objective after the start and after each iteration (never increasing)."""

    base: torch.Tensor
    deltas: list[Thresholded]
    tau: float
    objective: list[float]

    @property
    def iterations(self) -> int:
        return len(self.objective) - 1


def lore_decompose(thetas: Sequence[torch.Tensor], *, tau: float | None = None, energy: float | None = None,
                   iterations: int = 20, tol: float = 1e-5, weights: Sequence[float] | None = None,
                   lowrank: bool = True) -> LoreDecomposition:
    """Coordinate descent for LoRE on 2-D tensors of one shape.

    θ0 ← Σ p_i (θ_i − δ_i); δ_i ← SVT_τ(θ_i − θ0). Each step exactly minimises the objective in its block,
    so the objective never increases; stops after ``iterations`` or once it falls by less than tol (relative;
    tol = 0 runs every iteration).
    ``energy`` sets τ from the first step's residuals θ_i − mean θ (see ``energy_threshold``).
    """
    if (tau is None) == (energy is None):
        raise ValueError("give exactly one of tau and energy")
    p = _probabilities(weights, len(thetas))
    mean = sum(pi * t for pi, t in zip(p, thetas))
    base = mean
    deltas = [Thresholded(t.new_zeros(t.shape[0], 0), t.new_zeros(0), t.new_zeros(0, t.shape[1])) for t in thetas]
    objective = [_objective(thetas, base, deltas, 0.0, p)]  # δ = 0: no nuclear term
    for it in range(iterations):
        if it:
            base = mean - _weighted_sum(p, deltas)  # θ0 = Σ p_i (θ_i − δ_i): one product for all n δ's
        if tau is None:  # first step, energy target: exact SVDs give both τ and the first δ's
            svds = [torch.linalg.svd(t - base, full_matrices=False) for t in thetas]
            tau = energy_threshold([S for _, S, _ in svds], energy)
            deltas = [svt_from(usv, tau) for usv in svds]
            del svds
        else:  # one residual θ_i − θ0 alive at a time; each SVT warm-started from the previous δ_i
            deltas = [svt(t - base, tau, d if (lowrank and d.rank) else None, lowrank=lowrank)
                      for t, d in zip(thetas, deltas)]
        objective.append(sum(pi * (0.5 * d.fit + tau * d.nuclear_norm()) for pi, d in zip(p, deltas)))
        if tol > 0 and objective[-2] - objective[-1] < tol * abs(objective[-2]):
            break
    return LoreDecomposition(base, deltas, 0.0 if tau is None else tau, objective)


def svt_from(usv, tau: float) -> Thresholded:
    """SVT_τ of a matrix from its full thin SVD (U, S, Vh)."""
    U, S, Vh = usv
    k = int((S > tau).sum())
    return Thresholded(U[:, :k], S[:k] - tau, Vh[:k], "exact", k * tau * tau + float((S[k:].double() ** 2).sum()))


def _weighted_sum(p, deltas: Sequence[Thresholded]) -> torch.Tensor:
    """Σ p_i δ_i as one product of the stacked factors [p_i U_i s_i] and [Vh_i]."""
    left = torch.cat([pi * d.U * d.s for pi, d in zip(p, deltas)], dim=1)
    return left @ torch.cat([d.Vh for d in deltas], dim=0)


def _probabilities(weights: Sequence[float] | None, n: int) -> list[float]:
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError("weights must be n non-negative numbers with a positive sum")
    total = sum(w)
    return [x / total for x in w]


def _objective(thetas, base, deltas, tau: float, p) -> float:
    """Σ_i p_i (½‖θ0 + δ_i − θ_i‖²_F + τ‖δ_i‖_*)."""
    total = 0.0
    for pi, t, d in zip(p, thetas, deltas):
        fit = float(torch.linalg.vector_norm(base + d.dense() - t)) ** 2
        total += pi * (0.5 * fit + tau * d.nuclear_norm())
    return total


def lore_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *, tau: float | None = None,
               energy: float | None = None, iterations: int = 20, tol: float = 1e-5,
               rule: Literal["average", "ties"] = "average", density: float = 1.0, lambda_: float = 1.0,
               name: str | None = None) -> torch.Tensor:
    """One merged tensor: θ0 + λ·rule(δ) for matrices (≥ 2-D are reshaped to (shape[0], −1)), a weighted
    average for vectors and scalars. Computes in float64 for float64 inputs, else float32; returns the input dtype."""
    weights = [1.0] * len(tensors) if weights is None else list(weights)
    try:
        p = _probabilities(weights, len(tensors))
    except ValueError as e:
        raise MergeError(f"lore: {e}; fix the `weight` parameters", module=name) from e
    if tau is not None and energy is not None:
        raise MergeError("lore: give either `tau` or `energy`, not both", module=name)
    if rule not in ("average", "ties"):
        raise MergeError(f"lore: unknown rule {rule!r}; use average or ties", module=name)
    if tau is None and energy is None:
        tau = DEFAULT_TAU
    for i, t in enumerate(tensors):
        if not torch.isfinite(t).all():
            raise MergeError(f"lore: input model {i + 1} of {len(tensors)} contains NaN or Inf here; fix or drop that "
                             "model", module=name)
    shape, dtype = tensors[0].shape, tensors[0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if len(shape) < 2:
        return _finite(sum(pi * t.to(work) for pi, t in zip(p, tensors)).to(dtype), name)
    thetas = [t.to(work).reshape(shape[0], -1) for t in tensors]
    dec = lore_decompose(thetas, tau=tau, energy=energy, iterations=iterations, tol=tol, weights=weights)
    if rule == "average":
        merged = _weighted_sum(p, dec.deltas)
    else:  # ties: the shared TIES on the weighted stack w_i δ_i: trim, elect sign, disjoint mean
        merged = ties(torch.stack([w * d.dense() for w, d in zip(weights, dec.deltas)]), density)
    return _finite((dec.base + lambda_ * merged).reshape(shape).to(dtype), name)


def _finite(merged: torch.Tensor, name: str | None) -> torch.Tensor:
    if not torch.isfinite(merged).all():
        raise ComputeError(f"lore: the merged tensor is not finite (NaN or Inf) in {merged.dtype}; lower `lambda` "
                           "or merge in a wider dtype", module=name)
    return merged


__all__ = ["svt", "energy_threshold", "lore_decompose", "lore_merge", "Thresholded",
           "LoreDecomposition", "DEFAULT_TAU"]
