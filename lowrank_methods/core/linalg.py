"""Shared linear algebra on stacked LoRA factors: never an m×n matrix.

With B_cat = [B_1 … B_T] (m×R) and A_cat = [A_1; …; A_T] (R×n), every ΔW_t = B_t A_t lives in
span(B_cat) ⊗ span(A_catᵀ). Thin QRs of the two stacks reduce all SVD work to R×R "cores".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lowrank_methods.core.types import LoraFactors


def stack_factors(factors: Sequence[LoraFactors], coeffs: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B_cat = [c_1 B_1 … c_T B_T] (m×R), A_cat = [A_1; …; A_T] (R×n), so B_cat A_cat = Σ c_t B_t A_t."""
    coeffs = coeffs if coeffs is not None else [1.0] * len(factors)
    B = torch.cat([c * f.B for c, f in zip(coeffs, factors)], dim=1)
    A = torch.cat([f.A for f in factors], dim=0)
    return B, A


@dataclass
class CoreSpace:
    """Core matrices M_t with orthonormal bases u, v in the stacks' QR coordinates (see factored_core_space)."""

    U: torch.Tensor
    V: torch.Tensor
    cores: list[torch.Tensor]


@dataclass
class LowRankSVD:
    """Thin SVD of B_cat @ A_cat computed from the factors: U (m×k), S (k), Vh (k×n)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def factors(self, k: int | None = None) -> LoraFactors:
        """Best rank-k approximation as balanced factors: B = U_k √S_k, A = √S_k Vh_k."""
        k = self.S.numel() if k is None else min(k, self.S.numel())
        root = self.S[:k].sqrt()
        return LoraFactors(root[:, None] * self.Vh[:k], self.U[:, :k] * root)

    def retained_energy(self, k: int) -> float:
        total = float((self.S**2).sum())
        return 1.0 if total == 0 else float((self.S[:k] ** 2).sum()) / total


def svd_of_product(B: torch.Tensor, A: torch.Tensor) -> LowRankSVD:
    """SVD of B @ A (m×R times R×n) by two thin QRs and an R×R SVD: O((m+n)R²), exact."""
    m, R = B.shape
    n = A.shape[1]
    if R == 0:
        return LowRankSVD(B.new_zeros(m, 0), B.new_zeros(0), A.new_zeros(0, n))
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return LowRankSVD(Qb @ U, S, Vh @ Qa.T)


def svd_of_sum(factors: Sequence[LoraFactors], coeffs: Sequence[float] | None = None) -> LowRankSVD:
    """SVD of Σ c_t B_t A_t, never forming the m×n sum."""
    return svd_of_product(*stack_factors(factors, coeffs))


def energy_rank(S: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k singular values keep ``fraction`` of Σσ² (at least 1 when S has any energy)."""
    energy = S.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype) - 1e-12).item()) + 1


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], rtol: float | None = None) -> int:
    """Count of singular values above max(shape)·eps·σ_max (numpy's matrix_rank rule)."""
    if S.numel() == 0 or float(S.max()) == 0:
        return 0
    rtol = rtol if rtol is not None else max(shape) * torch.finfo(S.dtype).eps
    return int((S > rtol * S.max()).sum())


def polar(X: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor U Vᵀ of X = U S Vᵀ (the nearest matrix with orthonormal columns)."""
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def truncate(svd: LowRankSVD, rank: int | float | None, shape: tuple[int, int]) -> tuple[LoraFactors, dict[str, float]]:
    """Keep the top components of ``svd``: all numerically nonzero ones (rank None), a fixed count
    (int), or the fewest keeping a fraction of the energy Σσ² (float in (0, 1])."""
    exact = numerical_rank(svd.S, shape)
    if rank is None:
        k = exact
    elif isinstance(rank, float):
        k = min(energy_rank(svd.S, rank), exact)
    else:
        k = min(int(rank), exact)
    return svd.factors(k), {"rank": k, "retained_energy": svd.retained_energy(k)}


def _top_left(X: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k left singular vectors of X (p×N), from the SVD of whichever side is thinner."""
    if X.shape[0] <= X.shape[1]:
        return torch.linalg.svd(X.T, full_matrices=False)[2][:k].T
    return torch.linalg.svd(X, full_matrices=False)[0][:, :k]


def tucker2(cores: torch.Tensor, rank: int, tol: float = 1e-6, max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial Tucker-2 of the stack 𝓜 (T, p, q) on modes (p, q) by HOOI with SVD init (tensorly's partial_tucker):

        max over orthonormal U0 (p×r0), U1 (q×r1) of Σ_t ‖U0ᵀ M_t U1‖²,   r0 = min(rank, p), r1 = min(rank, q).

    Alternates U0 ← top-r0 lsv [M_t U1]_t, U1 ← top-r1 lsv [M_tᵀ U0]_t; stops when the relative error
    √|‖𝓜‖² − ‖core‖²|/‖𝓜‖ changes by less than ``tol`` (checked from the third iteration, as tensorly does).
    """
    T, p, q = cores.shape
    r0, r1 = min(rank, p), min(rank, q)
    U0 = _top_left(cores.permute(1, 0, 2).reshape(p, T * q), r0)
    U1 = _top_left(cores.permute(2, 0, 1).reshape(q, T * p), r1)
    total = float(cores.square().sum())
    if total == 0 or (r0 == p and r1 == q):
        return U0, U1
    errors: list[float] = []
    for _ in range(max_iter):
        U0 = _top_left((cores @ U1).permute(1, 0, 2).reshape(p, T * r1), r0)
        MtU0 = cores.transpose(1, 2) @ U0  # (T, q, r0)
        U1 = _top_left(MtU0.permute(1, 0, 2).reshape(q, T * r0), r1)
        kept = float((U1.T @ MtU0).square().sum())
        errors.append(abs(total - kept) ** 0.5 / total**0.5)
        if len(errors) > 2 and abs(errors[-2] - errors[-1]) < tol:
            break
    return U0, U1


def weighted(factors: Sequence[LoraFactors], coeffs: Sequence[float]) -> list[LoraFactors]:
    """Each task's update scaled by its coefficient (on B): c_t B_t A_t."""
    return [LoraFactors(f.A, c * f.B) for c, f in zip(coeffs, factors)]


def svd_in_bases(U: torch.Tensor, M: torch.Tensor, V: torch.Tensor) -> LowRankSVD:
    """SVD of U M V for U, Vᵀ with orthonormal columns: only the small M is decomposed."""
    u, s, vh = torch.linalg.svd(M, full_matrices=False)
    return LowRankSVD(U @ u, s, vh @ V)


def factored_core_space(factors: Sequence[LoraFactors]) -> tuple[torch.Tensor, CoreSpace, torch.Tensor]:
    """Core Space (Panariello et al. 2025) with its bases kept as products, so only the final lift touches m or n:

        B_cat = Q_B R_B, A_catᵀ = Q_A R_A (thin QRs);  U_B = Q_B u, V_A = v Q_Aᵀ (u, vᵀ: lsv of R_B, R_A)
        M_t = uᵀ R_B[:, t] R_A[:, t]ᵀ vᵀ   (so ΔW_t = U_B M_t V_A = Q_B (u M_t v) Q_Aᵀ exactly)

    Returns Q_B (m×R'), CoreSpace(u, v, cores) in QR coordinates, Q_Aᵀ (R''×n).
    """
    B, A = stack_factors(factors)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    u = torch.linalg.svd(Rb, full_matrices=False)[0]
    v = torch.linalg.svd(Ra, full_matrices=False)[0].T
    ranks = [f.rank for f in factors]
    cores = [(u.T @ rb) @ (ra.T @ v.T) for rb, ra in zip(Rb.split(ranks, 1), Ra.split(ranks, 1))]
    return Qb, CoreSpace(u, v, cores), Qa.T
