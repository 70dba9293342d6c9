"""rmm: Reversible Model Merging (Alipour & Mohammadi Amiri 2025): a compact basis from which every adapter comes back.

Per module, each task's ΔW_t = B_t A_t is put in a fixed gauge (SVD-balanced B = U√S, A = √S Vᵀ; or raw) and every
*position* (a row of B, a column of A) gives one r-vector x_t per task. Per position the T vectors are stored as
mean μ + top-p principal directions U (r×p) + coefficients c_t = Uᵀ(x_t − μ); task t comes back as μ + U c_t.
Exact for p = T−1 (centred) or p = T (uncentred); p = 0 is factor averaging. See docs/methods/rmm.md.
``form: shared`` spends the same storage on ONE subspace per module instead: bases P (m×K), Qᵀ (K×n) from the
Tucker-2 of the norm-equalised tasks (as ctm fits its subspaces) and a K×K core C_t per task, ΔŴ_t = P C_t Qᵀ, with
the largest K whose (m+n)·K + T·K² fits the storage of ``form: positions`` at this p.
Handed dense tensors through mergekit's generic API (``merge_state_dicts``), which has no place for a bundle, it
returns the weighted average Σ w_t θ_t / Σ w_t (mergekit_plugin/dense.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lowrank_methods.core.errors import RecipeError
from lowrank_methods.core.types import LoraFactors
from lowrank_methods.core.linalg import factored_core_space, svd_of_product, tucker2
from lowrank_methods.core.method import Paper, method
from lowrank_methods.core.params import MethodParams
from lowrank_methods.core.types import ModuleResult

PARTS = ("B", "A")  # bundle tensor suffixes: positions are the m rows of B, then the n columns of A


class RmmParams(MethodParams):
    p: int = Field(1, ge=0, description="principal directions kept per position (the storage/accuracy knob)")
    center: bool = Field(True, description="subtract (and store) the per-position mean before the PCA")
    gauge: Literal["balanced", "raw"] = Field("balanced", description="balanced: SVD-balanced factors of each ΔW_t; "
                                              "raw: the adapters' own factors (scale folded into B)")
    svd_rank: int = Field(16, ge=1, description="rank r of the truncated SVD of full fine-tuned models (PT-SVD inputs)")
    form: Literal["positions", "shared"] = Field("positions", description="positions: a PCA per row of B / column of "
                                                 "A (the paper); shared: one Tucker-2 subspace per module in the "
                                                 "same storage (far more accurate, docs/methods/rmm.md)")


def balanced_factors(f: LoraFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauge-fixed factors of ΔW = B A: B = U√S (m×rank), A = √S Vᵀ (rank×n), σ descending, each U column's
    largest |entry| positive, zero components padding the rank up to ``rank``."""
    svd = svd_of_product(f.B, f.A)
    U, S, Vh = svd.U, svd.S.clamp_min(0), svd.Vh
    k = S.numel()
    if k:
        signs = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True))).squeeze(0)
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        U, Vh = U * signs, Vh * signs[:, None]
    root = S.sqrt()
    B, A = U * root, root[:, None] * Vh
    return torch.nn.functional.pad(B, (0, rank - k)), torch.nn.functional.pad(A, (0, 0, 0, rank - k))


def raw_factors(f: LoraFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's own factors (B with the LoRA scale folded in), zero-padded to ``rank``."""
    k = f.rank
    return torch.nn.functional.pad(f.B, (0, rank - k)), torch.nn.functional.pad(f.A, (0, 0, 0, rank - k))


def principal_directions(X: torch.Tensor, w: torch.Tensor, p: int, center: bool):
    """Weighted PCA per position. X (P, T, r) → mean (P, r), basis (P, r, p) orthonormal, coeffs (P, T, p) minimising
    Σ_t w_t ‖x_t − μ − U c_t‖² (Eckart–Young: U = top-p right singular vectors of diag(√w)(X − μ))."""
    w = w.to(X.dtype)
    mean = torch.einsum("t,ptr->pr", w / w.sum(), X) if center else X.new_zeros(X.shape[0], X.shape[2])
    Y = X - mean[:, None, :]
    if p == 0:
        basis = X.new_zeros(X.shape[0], X.shape[2], 0)
    else:
        Vh = torch.linalg.svd(w.sqrt()[None, :, None] * Y, full_matrices=False)[2]
        basis = Vh[:, :p, :].transpose(1, 2).contiguous()
    return mean, basis, Y @ basis


def reconstruct_positions(mean: torch.Tensor, basis: torch.Tensor, coeffs: torch.Tensor, t: int) -> torch.Tensor:
    """x̂_t = μ + U c_t at every position: (P, r)."""
    return mean + (basis @ coeffs[:, t, :, None]).squeeze(-1)


SHARED = ("shared_B", "shared_A", "cores")  # form shared: P (m, K), Qᵀ (K, n), the tasks' cores (T, K, K)


def task_factors(tensors: dict[str, torch.Tensor], t: int, rank: int) -> LoraFactors:
    """Task t's factors from one module's bundle tensors, trimmed to its own rank (dropping the zero padding; in
    the shared form P C_t Qᵀ, whose rank is at most the task's: C_t = U0ᵀ M_t U1 with M_t of that rank)."""
    if "cores" in tensors:
        P, Qt, C = tensors["shared_B"], tensors["shared_A"], tensors["cores"][t]
        u, s, vh = torch.linalg.svd(C)
        k = min(rank, s.numel())
        return LoraFactors((vh[:k] @ Qt).contiguous(), ((P @ u[:, :k]) * s[:k]).contiguous())
    B, A = (_positions(tensors, part, t) for part in PARTS)
    return LoraFactors(A[:, :rank].T.contiguous(), B[:, :rank].contiguous())


def delta_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B A‖_F from two thin QRs (backward stable: accurate even when B A is a tiny difference)."""
    if B.shape[1] == 0:
        return 0.0
    Rb = torch.linalg.qr(B, mode="r")[1]
    Ra = torch.linalg.qr(A.T, mode="r")[1]
    return float(torch.linalg.matrix_norm(Rb @ Ra.T))


def max_components(T: int, center: bool) -> int:
    """The largest meaningful p: T−1 directions span T centred points, T span them uncentred."""
    return T - 1 if center else T


def check_rmm(params: RmmParams, weights, ranks) -> None:
    """What rmm refuses before computing: p beyond the exact point, non-positive weights."""
    T = len(ranks)
    limit = max_components(T, params.center)
    if params.p > limit:
        raise RecipeError(f"rmm: p={params.p} is larger than possible for {T} adapters (center={params.center}): "
                          f"p={limit} already reconstructs every adapter exactly; use p <= {limit}")
    if any(w <= 0 for w in weights):
        raise RecipeError(f"rmm weights are the tasks' importance in the PCA and must be > 0, got {list(weights)}")


PAPER = Paper("alipour2025reversible", "Towards Reversible Model Merging For Low-rank Weights",
              "Alipour, Mohammadsajad and Mohammadi Amiri, Mohammad", 2025, "https://arxiv.org/abs/2510.14163")


@method("rmm", params=RmmParams, pretty_name="Reversible Model Merging", paper=PAPER, output="bundle", check=check_rmm)
def rmm(factors, weights, params: RmmParams, ctx) -> ModuleResult:
    """A basis + per-task coefficients from which every adapter is rebuilt (exact at p = T−1, centred)."""
    check_rmm(params, weights, [f.rank for f in factors])
    T = len(factors)
    m, n = factors[0].shape
    ranks = [f.rank for f in factors]
    r = max(ranks)
    present = torch.tensor([k > 0 for k in ranks])
    # tasks lacking the module are rebuilt as rank 0 from their recorded rank: they take no part in the fit
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64) * present
    p = min(params.p, r, max(int(present.sum()) - int(params.center), 0))

    dtype, device = factors[0].A.dtype, factors[0].A.device
    if params.form == "shared":
        return _shared_subspace(factors, w, p, params.center, ranks, dtype)
    gauge = balanced_factors if params.gauge == "balanced" else raw_factors
    pairs = [gauge(f, r) for f in factors]
    X = torch.cat([torch.stack([B for B, _ in pairs], 1), torch.stack([A.T for _, A in pairs], 1)])  # (m+n, T, r)
    mean, basis, coeffs = principal_directions(X, w.to(device), p, params.center)

    tensors = {}
    for s, rows in zip(PARTS, (slice(0, m), slice(m, m + n))):
        if params.center:
            tensors[f"mean_{s}"] = mean[rows]
        tensors[f"basis_{s}"] = basis[rows]
        tensors[f"coeffs_{s}"] = coeffs[rows]
    tensors["ranks"] = torch.tensor(ranks, dtype=torch.int64)

    stats = {"rank": r, "p": p}
    resid = total = 0.0
    for t, f in enumerate(factors):
        g = task_factors(tensors, t, ranks[t])
        err = delta_norm(torch.cat([g.B, -f.B], 1), torch.cat([g.A, f.A], 0))
        norm = delta_norm(f.B, f.A)
        stats[f"error_{t}"] = err / norm if norm > 0 else 0.0
        stats[f"norm_{t}"] = norm
        Bt, At = pairs[t]
        resid += float((g.B - Bt[:, : ranks[t]]).square().sum() + (g.A - At[: ranks[t]]).square().sum())
        total += float(Bt.square().sum() + At.square().sum())
    stats["retained_energy"] = 1.0 - resid / total if total > 0 else 1.0
    stats["stored"] = (m + n) * (p * r + p * T + (r if params.center else 0))
    stats["original"] = (m + n) * sum(ranks)
    return ModuleResult(None, stats, {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})


def shared_rank(m: int, n: int, T: int, budget: int, limit: int) -> int:
    """The largest K ≤ ``limit`` with (m+n)·K + T·K² ≤ ``budget`` (at least 1)."""
    K = 1
    while K < limit and (m + n) * (K + 1) + T * (K + 1) ** 2 <= budget:
        K += 1
    return K


def _shared_subspace(factors, w: torch.Tensor, p: int, center: bool, ranks: list[int], dtype) -> ModuleResult:
    """``form: shared``: P, Qᵀ from the Tucker-2 of √w_t M_t/‖M_t‖ (Core-Space coordinates, as ctm), C_t = U0ᵀ M_t U1."""
    T = len(factors)
    m, n = factors[0].shape
    r = max(ranks)
    Qb, core, QaT = factored_core_space(factors)
    M = torch.stack(core.cores)
    norms = M.flatten(1).norm(dim=1)
    gain = (w.to(M.dtype).sqrt() / norms.where(norms > 0, torch.ones_like(norms))).where(norms > 0, torch.zeros_like(norms))
    budget = (m + n) * (p * r + p * T + (r if center else 0))
    K = shared_rank(m, n, T, budget, min(M.shape[1], M.shape[2]))
    U0, U1 = tucker2(M * gain[:, None, None], K)  # K ≤ both core dimensions: U0, U1 have K columns each
    C = U0.T @ M @ U1
    tensors = {"shared_B": Qb @ (core.U @ U0), "shared_A": (U1.T @ core.V) @ QaT, "cores": C,
               "ranks": torch.tensor(ranks, dtype=torch.int64)}
    stats = {"rank": r, "p": p, "K": K}
    for t, f in enumerate(factors):
        g = task_factors(tensors, t, ranks[t])
        norm = delta_norm(f.B, f.A)
        stats[f"error_{t}"] = delta_norm(torch.cat([g.B, -f.B], 1), torch.cat([g.A, f.A], 0)) / norm if norm > 0 else 0.0
        stats[f"norm_{t}"] = norm
    total = float(M.square().sum())
    stats["retained_energy"] = float(C.square().sum()) / total if total > 0 else 1.0
    stats["stored"] = (m + n) * K + T * K * K
    stats["original"] = (m + n) * sum(ranks)
    return ModuleResult(None, stats, {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})


def _positions(tensors: dict[str, torch.Tensor], part: str, t: int) -> torch.Tensor:
    basis = tensors[f"basis_{part}"]
    mean = tensors.get(f"mean_{part}")
    mean = mean if mean is not None else basis.new_zeros(basis.shape[0], basis.shape[1])  # uncentred: μ = 0
    return reconstruct_positions(mean, basis, tensors[f"coeffs_{part}"], t)
