"""core_space, tsv, iso_c, iso_cts against dense references written from the papers' equations (float64)."""

from __future__ import annotations

import pytest
import torch

from helpers import (M, N, WEIGHTS, iso_cts_reference, polar_ref, random_factors, rank_of, run, ties_reference,
                     tsv_reference)

D = torch.float64


def dense_core_reference(factors, weights, rule):
    """Core Space from the paper: U_B, V_A from full SVDs of the stacks, M_t = U_Bᵀ w_t ΔW_t V_Aᵀ, U_B f(M) V_A.
    The weight scales the task like the LoRA scale does: on B (so it enters U_B)."""
    kept = [(f, w) for f, w in zip(factors, weights) if f.rank > 0]
    B = torch.cat([w * f.B for f, w in kept], 1)
    A = torch.cat([f.A for f, _ in kept], 0)
    UB = torch.linalg.svd(B, full_matrices=False)[0]
    VA = torch.linalg.svd(A, full_matrices=False)[2]
    cores = torch.stack([UB.T @ (w * f.dense()) @ VA.T for f, w in kept])
    return UB @ rule(cores) @ VA


MIXED = (3, 0, 2, 4)


@pytest.mark.parametrize("ranks", [MIXED, (2, 2, 2), (6, 5, 4)])  # (6, 5, 4): R = 15 > min(m, n)
def test_core_space_task_arithmetic_is_dense_task_arithmetic(ranks):
    fs = random_factors(ranks)
    w = WEIGHTS[: len(ranks)]
    out = run("core_space", fs, w, rule="ta", **{"lambda": 0.3})
    ref = 0.3 * sum(wi * f.dense() for wi, f in zip(w, fs))
    torch.testing.assert_close(out.factors.dense(), ref, rtol=0, atol=1e-12)
    assert out.stats["rank"] == rank_of(ref)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_core_space_ties_matches_dense_reference(density):
    fs = random_factors(MIXED, seed=1)
    out = run("core_space", fs, WEIGHTS, rule="ties", density=density, **{"lambda": 0.8})
    ref = 0.8 * dense_core_reference(fs, WEIGHTS, lambda X: ties_reference(X, density))
    torch.testing.assert_close(out.factors.dense(), ref, rtol=0, atol=1e-10)


def test_core_space_iso_c_matches_dense_rank_aware_iso_c():
    fs = random_factors(MIXED, seed=2)
    total = sum(w * f.dense() for w, f in zip(WEIGHTS, fs))
    U, S, Vh = torch.linalg.svd(total)
    r = rank_of(total)
    ref = S[:r].mean() * U[:, :r] @ Vh[:r]
    for out in (run("core_space", fs, WEIGHTS, rule="iso_c"), run("iso_c", fs, WEIGHTS)):
        torch.testing.assert_close(out.factors.dense(), ref, rtol=0, atol=1e-10)


def test_core_space_truncated_to_rank_is_the_best_rank_k_of_its_merge():
    fs = random_factors(MIXED, seed=3)
    full = run("core_space", fs, WEIGHTS, rule="ties", density=0.5).factors.dense()
    out = run("core_space", fs, WEIGHTS, rule="ties", density=0.5, rank=3)
    U, S, Vh = torch.linalg.svd(full)
    torch.testing.assert_close(out.factors.dense(), U[:, :3] * S[:3] @ Vh[:3], rtol=0, atol=1e-10)
    assert out.factors.rank == 3
    assert out.stats["retained_energy"] == pytest.approx(float((S[:3] ** 2).sum() / (S**2).sum()), rel=1e-12)


def test_standalone_tsv_is_dense_tsv():
    fs = random_factors(MIXED, seed=4)
    kept = [(f, w) for f, w in zip(fs, WEIGHTS) if f.rank]
    X = torch.stack([w * f.dense() for f, w in kept])
    ref = 0.5 * tsv_reference(X, min(M, N) // len(kept))
    torch.testing.assert_close(run("tsv", fs, WEIGHTS, **{"lambda": 0.5}).factors.dense(), ref, rtol=0, atol=1e-10)
    # with few components per task: k = 2 < rank of two tasks
    torch.testing.assert_close(run("tsv", fs, WEIGHTS, tsv_components=2).factors.dense(), tsv_reference(X, 2),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("fraction", [0.8, 0.4, 1.0])
def test_standalone_iso_cts_is_dense_iso_cts(fraction):
    fs = random_factors(MIXED, seed=5)
    X = torch.stack([w * f.dense() for f, w in zip(fs, WEIGHTS) if f.rank])
    out = run("iso_cts", fs, WEIGHTS, common_space_fraction=fraction)
    torch.testing.assert_close(out.factors.dense(), iso_cts_reference(X, fraction), rtol=0, atol=1e-10)


def test_core_space_tsv_keeps_R_over_T_components_per_task():
    """In core space k = ⌊R/T⌋ (the Core repo); with equal ranks that keeps every component."""
    fs = random_factors((3, 3, 3), seed=6)
    X = torch.stack([f.dense() for f in fs])
    ref = polar_ref(torch.cat([torch.linalg.svd(x)[0][:, :3] for x in X], 1))
    out = run("core_space", fs, rule="tsv").factors.dense()
    torch.testing.assert_close(out, tsv_reference(X, 3), rtol=0, atol=1e-10)
    assert ref.shape[1] == 9 and rank_of(out) == 9


@pytest.mark.parametrize("ranks", [(3, 2, 4), (6, 5, 4)])  # R = 9 < min(m, n); R = 15 > min(m, n)
def test_factored_core_space_is_lossless_and_has_the_core_space_bases(ranks):
    from types import SimpleNamespace

    from lowrank_methods.core.linalg import factored_core_space

    fs = random_factors(ranks, seed=7)
    Qb, core, QaT = factored_core_space(fs)
    U, V = Qb @ core.U, core.V @ QaT
    # the reference's bases: singular vectors of the stacked factors, M_t = U_Bᵀ B_t A_t V_Aᵀ
    U_ref = torch.linalg.svd(torch.cat([f.B for f in fs], 1), full_matrices=False)[0]
    V_ref = torch.linalg.svd(torch.cat([f.A for f in fs], 0), full_matrices=False)[2]
    ref = SimpleNamespace(U=U_ref, V=V_ref, cores=[U_ref.T @ f.dense() @ V_ref.T for f in fs])
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(V @ V.T, torch.eye(V.shape[0], dtype=D), rtol=0, atol=1e-12)
    su, sv = torch.sign((ref.U * U).sum(0)), torch.sign((ref.V * V).sum(1))  # singular vectors agree up to sign
    torch.testing.assert_close(U * su, ref.U, rtol=0, atol=1e-10)
    for f, M, Mref in zip(fs, core.cores, ref.cores):
        torch.testing.assert_close(U @ M @ V, f.dense(), rtol=0, atol=1e-12)
        torch.testing.assert_close(su[:, None] * M * sv, Mref, rtol=0, atol=1e-10)
