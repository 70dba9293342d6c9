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

from lowrank_methods.core.errors import MergeError
from lowrank_methods.core.method import Paper
from lowrank_methods.core.rules import ties

PAPER = Paper("liu2025lore", "LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model Merging",
              "Liu, Zehua and Wu, Han and Yao, Yuxuan and She, Ruifeng and Han, Xiongwei and Zhong, Tao and "
              "Yuan, Mingxuan", 2025, "https://arxiv.org/abs/2502.10749")
SUMMARY = "LoRE-Merging of full fine-tuned models (base-free low-rank estimation); runs through mergekit"
DEFAULT_TAU = 0.01  # the μ = 0.01 of a third-party reimplementation, read as the SVT threshold (docs/methods/lore.md)


@dataclass
class Thresholded:
    """SVT_τ(X) = U diag(s) Vh with s = σ − τ > 0 for the singular values σ of X above τ."""

    U: torch.Tensor
    s: torch.Tensor
    Vh: torch.Tensor
    route: Literal["exact", "lowrank"] = "exact"

    @property
    def rank(self) -> int:
        return self.s.numel()

    def nuclear_norm(self) -> float:
        return float(self.s.sum())

    def dense(self) -> torch.Tensor:
        return (self.U * self.s) @ self.Vh


def svt(X: torch.Tensor, tau: float, rank_hint: int | None = None, *, niter: int = 6) -> Thresholded:
    """Singular value thresholding, the prox of τ‖·‖_*: keep σ_j > τ, shrink them to σ_j − τ.

    Exact SVD by default. With ``rank_hint`` (the rank expected above τ, e.g. the previous iteration's) small
    next to min(m, n), a randomized SVD sketch (as ``torch.svd_lowrank``) is tried first and kept only if it
    certifies itself (see ``_lowrank_svt``); otherwise the exact SVD is used.
    """
    if rank_hint is not None:
        q = _sketch_size(rank_hint)
        if 4 * q <= min(X.shape):
            result = _lowrank_svt(X, tau, q, niter)
            if result is not None:
                return result
    return _shrink(*torch.linalg.svd(X, full_matrices=False), tau)


def _sketch_size(rank_hint: int) -> int:
    return rank_hint + max(10, rank_hint // 4)  # oversampling: 25%, at least 10


def _shrink(U, S, Vh, tau: float) -> Thresholded:
    k = int((S > tau).sum())  # S is sorted descending
    return Thresholded(U[:, :k], S[:k] - tau, Vh[:k])


def _lowrank_svt(X: torch.Tensor, tau: float, q: int, niter: int) -> Thresholded | None:
    """SVT from a rank-q randomized sketch, or None when the sketch cannot be trusted.

    Accepted only if (1) the sketch is not saturated (some sketched σ ≤ τ), (2) the kept triplets are
    accurate (‖X V − U S‖_F ≤ 1e-4·‖S‖_F) and (3) nothing above τ is left in X − U S Vh (block power estimate
    of its spectral norm ≤ τ); these are the conditions under which SVT_τ(X) = U (S − τ) Vh.
    """
    gen = torch.Generator(device=X.device).manual_seed(0)  # private: deterministic, no global RNG state touched
    U, S, Vh = _sketch_svd(X, q, niter, gen)
    k = int((S > tau).sum())
    if k >= q:
        return None
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    if k and torch.linalg.vector_norm(X @ Vh.T - U * S) > 1e-4 * torch.linalg.vector_norm(S):
        return None
    if _deflated_norm(X, U, S, Vh, gen) > tau:
        return None
    return Thresholded(U, S - tau, Vh, "lowrank")


def _sketch_svd(X: torch.Tensor, q: int, niter: int, gen: torch.Generator):
    """Randomized SVD (Halko, Martinsson & Tropp 2011; what ``torch.svd_lowrank`` computes, with our generator):
    Q = orth((X Xᵀ)^niter X Ω) spans X's top-q range; the SVD of the q×n matrix Qᵀ X lifts back through Q."""
    Q = torch.linalg.qr(X @ torch.randn(X.shape[1], q, generator=gen, dtype=X.dtype, device=X.device))[0]
    for _ in range(niter):
        Q = torch.linalg.qr(X @ torch.linalg.qr(X.T @ Q)[0])[0]
    Ub, S, Vh = torch.linalg.svd(Q.T @ X, full_matrices=False)
    return Q @ Ub, S, Vh


def _deflated_norm(X, U, S, Vh, gen, block: int = 4, steps: int = 8) -> float:
    """Block power estimate of ‖X − U S Vh‖_2 (matrix products with thin blocks, never the m×n difference)."""
    def apply(Z):  # (X − U S Vh) Z
        return X @ Z - U @ (S[:, None] * (Vh @ Z))

    def apply_t(Y):  # (X − U S Vh)ᵀ Y
        return X.T @ Y - Vh.T @ (S[:, None] * (U.T @ Y))

    Z = torch.randn(X.shape[1], block, generator=gen, dtype=X.dtype, device=X.device)
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
    base = sum(pi * t for pi, t in zip(p, thetas))
    deltas = [Thresholded(t.new_zeros(t.shape[0], 0), t.new_zeros(0), t.new_zeros(0, t.shape[1])) for t in thetas]
    objective = [_objective(thetas, base, deltas, 0.0, p)]  # δ = 0: no nuclear term
    for it in range(iterations):
        if it:
            base = sum(pi * (t - d.dense()) for pi, t, d in zip(p, thetas, deltas))
        if tau is None:  # first step, energy target: exact SVDs give both τ and the first δ's
            svds = [torch.linalg.svd(t - base, full_matrices=False) for t in thetas]
            tau = energy_threshold([S for _, S, _ in svds], energy)
            deltas = [_shrink(*usv, tau) for usv in svds]
            del svds
        else:  # one residual θ_i − θ0 alive at a time
            hints = [d.rank if (lowrank and it) else None for d in deltas]
            deltas = [svt(t - base, tau, h) for t, h in zip(thetas, hints)]
        objective.append(_objective(thetas, base, deltas, tau, p))
        if tol > 0 and objective[-2] - objective[-1] < tol * abs(objective[-2]):
            break
    return LoreDecomposition(base, deltas, 0.0 if tau is None else tau, objective)


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
    shape, dtype = tensors[0].shape, tensors[0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if len(shape) < 2:
        return sum(pi * t.to(work) for pi, t in zip(p, tensors)).to(dtype)
    thetas = [t.to(work).reshape(shape[0], -1) for t in tensors]
    dec = lore_decompose(thetas, tau=tau, energy=energy, iterations=iterations, tol=tol, weights=weights)
    if rule == "average":
        merged = sum(pi * d.dense() for pi, d in zip(p, dec.deltas))
    else:  # ties: the shared TIES on the weighted stack w_i δ_i: trim, elect sign, disjoint mean
        merged = ties(torch.stack([w * d.dense() for w, d in zip(weights, dec.deltas)]), density)
    return (dec.base + lambda_ * merged).reshape(shape).to(dtype)


__all__ = ["svt", "energy_threshold", "lore_decompose", "lore_merge", "Thresholded",
           "LoreDecomposition", "DEFAULT_TAU"]
