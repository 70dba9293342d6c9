"""knots against a dense reference (SVD of the m×Tn concatenation) written here from the paper (float64)."""

from __future__ import annotations

import pytest
import torch

from lowrank_methods.core.types import LoraFactors
from lowrank_methods.core.methods.knots import aligned_components
from helpers import WEIGHTS, random_factors, run, ties_reference

D = torch.float64


def dense_knots_reference(factors, weights, rule, scale_by_sigma=True, lam=1.0):
    """KnOTS from the paper: [ΔW_1 … ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ] (dense SVD), merge ΣV_tᵀ (or V_tᵀ), λ U f(·)."""
    W = [w * f.dense() for f, w in zip(factors, weights) if f.rank > 0]
    n = W[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(W, 1), full_matrices=False)
    k = int((S > S[0] * 1e-10).sum())
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    V = torch.stack([Vh[:, t * n:(t + 1) * n] for t in range(len(W))])
    if scale_by_sigma:
        return lam * U @ rule(S[:, None] * V)
    return lam * (U * S) @ rule(V)


def test_knots_task_arithmetic_is_task_arithmetic():
    fs = random_factors((3, 0, 2, 4), seed=21)
    out = run("knots", fs, WEIGHTS, rule="ta", **{"lambda": 0.7})
    torch.testing.assert_close(out.factors.dense(), 0.7 * sum(w * f.dense() for w, f in zip(WEIGHTS, fs)),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale_by_sigma", [True, False])
@pytest.mark.parametrize("density", [0.2, 0.6])
def test_knots_ties_matches_dense_reference(scale_by_sigma, density):
    fs = random_factors((3, 0, 2, 4), seed=22)
    out = run("knots", fs, WEIGHTS, rule="ties", density=density, scale_by_sigma=scale_by_sigma, **{"lambda": 0.5})
    ref = dense_knots_reference(fs, WEIGHTS, lambda X: ties_reference(X, density), scale_by_sigma, lam=0.5)
    torch.testing.assert_close(out.factors.dense(), ref, rtol=0, atol=1e-10)


def test_aligned_components_reconstruct_the_concatenation():
    fs = random_factors((3, 2, 4), seed=23)
    U, S, V = aligned_components(fs)
    for f, v in zip(fs, V):
        torch.testing.assert_close((U * S) @ v, f.dense(), rtol=0, atol=1e-12)
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=D), rtol=0, atol=1e-12)
    Vh = torch.cat(list(V), 1)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(U.shape[1], dtype=D), rtol=0, atol=1e-12)


def test_knots_single_task_ties_is_the_adapter():
    (f,) = random_factors((4,), seed=24)
    out = run("knots", [f, LoraFactors.zeros(f.shape, D)], rule="ties", density=1.0, **{"lambda": 0.3})
    torch.testing.assert_close(out.factors.dense(), 0.3 * f.dense(), rtol=0, atol=1e-12)


def test_knots_dare_p0_is_task_arithmetic_and_rule_choice_is_validated():
    fs = random_factors((3, 2), seed=25)
    out = run("knots", fs, rule="dare", drop_rate=0.0)
    torch.testing.assert_close(out.factors.dense(), fs[0].dense() + fs[1].dense(), rtol=0, atol=1e-12)
    from lowrank_methods.core.errors import MergeError
    from lowrank_methods.core.method import get_method
    with pytest.raises(MergeError, match="rule"):
        get_method("knots").parse_params({"rule": "tsv"})
