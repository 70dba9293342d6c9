"""ctm (Compress-then-Merge) against a dense Tucker-2 reference written here, and the identities of §10 (float64)."""

from __future__ import annotations

import pytest
import torch

from lowrank_methods.core.types import LoraFactors
from helpers import WEIGHTS, random_factors, rank_of, run, ties_reference

D = torch.float64


def top_left(X, r):
    return torch.linalg.svd(X, full_matrices=False)[0][:, :r]


def dense_ctm_reference(factors, weights, r, beta, rule, lam=1.0, iters=200):
    """CtM from the paper, on the dense m×n×T tensor (the repo's merge_space='low_rank'):
    β-reweight the tasks' norms, HOOI with SVD init for P (m×r), Q (n×r), C_t = Pᵀ ΔW_t Q, ΔW* = λ P f(C) Qᵀ."""
    W = [w * f.dense() for f, w in zip(factors, weights) if f.rank > 0]
    norms = torch.stack([x.norm() for x in W])
    Wt = [x * (beta + (1 - beta) * norms.mean() / nu) for x, nu in zip(W, norms)]
    P = top_left(torch.cat(Wt, 1), r)
    Q = top_left(torch.cat([x.T for x in Wt], 1), r)
    for _ in range(iters):
        P = top_left(torch.cat([x @ Q for x in Wt], 1), r)
        Q = top_left(torch.cat([x.T @ P for x in Wt], 1), r)
    C = torch.stack([P.T @ x @ Q for x in W])
    return lam * P @ rule(C) @ Q.T


def shared_subspace_factors(ranks, seed, m=14, n=11, k=3, noise=0.3):
    """Adapters around a common rank-k structure, as real ones are. (On unstructured random factors HOOI's fixed
    point is so ill-conditioned that two exact implementations agree only to ~1e-7 after any number of iterations.)"""
    g = torch.Generator().manual_seed(seed)
    P0, Q0 = torch.randn(m, k, generator=g, dtype=D), torch.randn(n, k, generator=g, dtype=D)
    return [LoraFactors(torch.randn(r, k, generator=g, dtype=D) @ Q0.T + noise * torch.randn(r, n, generator=g, dtype=D),
                        P0 @ torch.randn(k, r, generator=g, dtype=D) + noise * torch.randn(m, r, generator=g, dtype=D))
            for r in ranks]


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("rule,extra,ref_rule", [
    ("ta", {}, lambda C: C.sum(0)),
    ("ties", {"density": 0.4}, lambda C: ties_reference(C, 0.4)),
])
def test_ctm_matches_dense_tucker_reference(beta, rule, extra, ref_rule):
    fs = shared_subspace_factors((3, 0, 2, 4), seed=11)
    out = run("ctm", fs, WEIGHTS, rank=3, beta=beta, rule=rule, tol=1e-300, max_iter=200, **extra, **{"lambda": 0.6})
    ref = dense_ctm_reference(fs, WEIGHTS, 3, beta, ref_rule, lam=0.6)
    torch.testing.assert_close(out.factors.dense(), ref, rtol=0, atol=1e-8)
    assert out.factors.rank <= 3


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_ctm_at_full_rank_with_ta_is_task_arithmetic(beta):
    fs = random_factors((3, 2, 4), seed=12)
    w = [1.0, -0.5, 2.0]
    out = run("ctm", fs, w, rank=9, beta=beta, rule="ta", **{"lambda": 0.4})
    torch.testing.assert_close(out.factors.dense(), 0.4 * sum(wi * f.dense() for wi, f in zip(w, fs)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["ta", "ties", "tsv"])
def test_ctm_single_adapter_is_reproduced(rule):
    (f,) = random_factors((4,), seed=13)
    knobs = {"density": 1.0} if rule == "ties" else {}  # (a rule refuses knobs it does not read)
    out = run("ctm", [f, LoraFactors.zeros(f.shape, D)], [1.5, 1.0], rank=4, rule=rule, **knobs, **{"lambda": 0.5})
    torch.testing.assert_close(out.factors.dense(), 0.75 * f.dense(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["ta", "ties", "dare_ties", "tsv", "iso_c", "iso_cts"])
def test_ctm_output_rank_is_at_most_r(rule):
    fs = random_factors((4, 4, 4, 4), seed=14)
    out = run("ctm", fs, rank=3, rule=rule, **({"common_space_fraction": 0.5} if rule == "iso_cts" else {}))
    assert out.factors.rank <= 3 and rank_of(out.factors.dense()) <= 3
    assert out.stats["rank"] == out.factors.rank
    assert 0 < out.stats["retained_energy"] <= 1


def test_beta_has_no_effect_when_adapter_norms_are_equal():
    fs = [LoraFactors(f.A, f.B / f.dense().norm()) for f in random_factors((3, 2, 4), seed=15)]
    a = run("ctm", fs, rank=3, beta=0.0, rule="ties", density=0.5).factors.dense()
    b = run("ctm", fs, rank=3, beta=1.0, rule="ties", density=0.5).factors.dense()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # and β does matter when the norms differ
    gs = [LoraFactors(f.A, (t + 1) ** 2 * f.B) for t, f in enumerate(fs)]
    c = run("ctm", gs, rank=3, beta=0.0, rule="ta").factors.dense()
    d = run("ctm", gs, rank=3, beta=1.0, rule="ta").factors.dense()
    assert (c - d).norm() > 1e-3 * c.norm()


def test_ctm_ta_is_a_projection_of_task_arithmetic():
    """CtM-TA = P Pᵀ (λ Σ w_t ΔW_t) Q Qᵀ with P, Q the subspaces found (§10.19)."""
    fs = random_factors((3, 2, 4), seed=16)
    out = run("ctm", fs, rank=4, rule="ta").factors
    total = sum(f.dense() for f in fs)
    P = top_left(out.B, 4)
    Q = top_left(out.A.T, 4)
    torch.testing.assert_close(out.dense(), P @ P.T @ total @ Q @ Q.T, rtol=0, atol=1e-12)


def test_ctm_default_rank_is_the_largest_input_rank():
    fs = random_factors((3, 2, 4), seed=17)
    assert run("ctm", fs, rule="ta").factors.rank == 4


def test_low_rank_iso_cts_as_the_reference_keeps_one_direction_per_task():
    """r = 8, T = 4: at the defaults (⌊0.8·8⌋ = 6 common, round(2/4) = 0 per task) ctm's iso_cts is iso_c; with
    task_directions 1 it keeps r − T = 4 common directions and 1 per task (the reference code's split)."""
    fs = random_factors((8, 8, 8, 8), seed=15, m=20, n=18)
    default = run("ctm", fs, rank=8, rule="iso_cts").factors.dense()
    torch.testing.assert_close(default, run("ctm", fs, rank=8, rule="iso_c").factors.dense(), rtol=0, atol=1e-12)
    reference = run("ctm", fs, rank=8, rule="iso_cts", task_directions=1).factors.dense()
    assert (reference - default).norm() > 1e-3 * default.norm()
    assert rank_of(reference) <= 8
