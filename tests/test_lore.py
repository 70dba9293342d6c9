"""LoRE-Merging math (lowrank_methods/core/methods/lore.py) against independent float64 references."""

import numpy as np
import pytest
import torch

from helpers import lore_reference, lore_ties_reference
from lowrank_methods.core.errors import MergeError
from lowrank_methods.core.methods.lore import energy_threshold, lore_decompose, lore_merge, svt

F64 = torch.float64


def _models(n=3, m=24, k=18, rank=2, noise=0.05, seed=0):
    """n "fine-tuned" matrices: a shared base plus a task-specific low-rank part plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, k, generator=g, dtype=F64)
    return [base + torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, k, generator=g, dtype=F64)
            + noise * torch.randn(m, k, generator=g, dtype=F64) for _ in range(n)]


def test_svt_matches_definition_and_rank():
    X = _models(1, 30, 20, rank=3, noise=0.1)[0]
    U, S, Vt = np.linalg.svd(X.numpy(), full_matrices=False)
    for tau in (0.0, 0.5 * float(S[1] + S[2]), 0.5 * float(S[3] + S[4]), float(S[0]) + 1):
        out = svt(X, tau)
        ref = U @ np.diag(np.maximum(S - tau, 0)) @ Vt
        np.testing.assert_allclose(out.dense().numpy(), ref, atol=1e-12)
        assert out.rank == int((S > tau).sum())


def test_subspace_route_matches_exact_grows_and_falls_back():
    g = torch.Generator().manual_seed(1)
    X = 3 * torch.randn(400, 6, generator=g, dtype=F64) @ torch.randn(6, 320, generator=g, dtype=F64)
    X = X + 0.05 * torch.randn(400, 320, generator=g, dtype=F64)
    exact = svt(X, 2.0)
    cold = svt(X, 2.0, lowrank=True)  # random block of 24 columns
    warm = svt(X + 0.01 * torch.randn(400, 320, generator=g, dtype=F64), 2.0, exact)  # from a nearby δ
    assert exact.route == "exact" and cold.route == warm.route == "subspace" and cold.rank == warm.rank == 6
    torch.testing.assert_close(cold.dense(), exact.dense(), rtol=0, atol=1e-9 * float(exact.s[0]))
    assert cold.fit == pytest.approx(exact.fit, rel=1e-9)  # ‖X − δ‖² without the dense δ
    # 40 components above τ, block starting at 24: widened (24 → 45 → 75) until one σ falls below τ
    Y = 3 * torch.randn(400, 40, generator=g, dtype=F64) @ torch.randn(40, 320, generator=g, dtype=F64)
    grown = svt(Y, 2.0, lowrank=True)
    assert grown.route == "subspace" and grown.rank == 40
    torch.testing.assert_close(grown.dense(), svt(Y, 2.0).dense(), rtol=0, atol=1e-8 * float(grown.s[0]))
    # a block that would reach a quarter of min(m, n) is not tried: the exact SVD
    assert svt(X[:, :80], 2.0, lowrank=True).route == "exact"
    full = 3 * torch.randn(400, 320, generator=g, dtype=F64)  # everything above τ: widening runs out
    assert svt(full, 2.0, lowrank=True).route == "exact"


def test_lowrank_decomposition_matches_the_exact_route():
    thetas = [t.repeat(8, 8) + 0.01 * torch.randn(192, 144, generator=torch.Generator().manual_seed(i), dtype=F64)
              for i, t in enumerate(_models(3, 24, 18, rank=2))]
    exact = lore_decompose(thetas, tau=0.5, iterations=8, tol=0, lowrank=False)
    fast = lore_decompose(thetas, tau=0.5, iterations=8, tol=0, lowrank=True)
    assert {d.route for d in fast.deltas} == {"subspace"} and {d.route for d in exact.deltas} == {"exact"}
    np.testing.assert_allclose(fast.objective, exact.objective, rtol=1e-9)
    torch.testing.assert_close(fast.base, exact.base, rtol=0, atol=1e-8)


def test_tau_zero_reconstructs_exactly_and_base_is_mean():
    thetas = _models()
    dec = lore_decompose(thetas, tau=0.0, iterations=5, tol=0)
    mean = sum(thetas) / len(thetas)
    torch.testing.assert_close(dec.base, mean, rtol=0, atol=1e-12)
    for t, d in zip(thetas, dec.deltas):
        torch.testing.assert_close(dec.base + d.dense(), t, rtol=0, atol=1e-12)
    assert dec.objective[-1] < 1e-20


def test_large_tau_is_plain_averaging():
    thetas = _models()
    mean = sum(thetas) / len(thetas)
    top = max(float(torch.linalg.matrix_norm(t - mean, ord=2)) for t in thetas) * (1 + 1e-12)  # τ ≥ every σ
    dec = lore_decompose(thetas, tau=top, iterations=5)
    assert all(d.rank == 0 for d in dec.deltas)
    torch.testing.assert_close(dec.base, mean, rtol=0, atol=1e-12)
    for rule in ("average", "ties"):
        torch.testing.assert_close(lore_merge(thetas, tau=top, rule=rule, lambda_=3.0), mean, rtol=0, atol=1e-12)


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_iterations_match_dense_reference_and_objective_never_increases(weights):
    thetas = _models(noise=0.2)
    tau = 1.5
    dec = lore_decompose(thetas, tau=tau, iterations=12, tol=0, weights=weights)
    base, deltas, objective = lore_reference(thetas, tau, 12, weights)
    np.testing.assert_allclose(dec.base.numpy(), base, atol=1e-10)
    for d, ref in zip(dec.deltas, deltas):
        np.testing.assert_allclose(d.dense().numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(dec.objective, objective, rtol=1e-10)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(objective, objective[1:]))
    assert objective[-1] < objective[0]


@pytest.mark.parametrize("seed", range(5))
def test_objective_monotone_on_random_inputs_and_rank_counts_sigma_above_tau(seed):
    g = torch.Generator().manual_seed(100 + seed)
    n, m, k = 2 + seed % 3, 20 + seed, 15
    thetas = [torch.randn(m, k, generator=g, dtype=F64) * (1 + i) for i in range(n)]
    tau = float(torch.rand(1, generator=g, dtype=F64)) * 3
    dec = lore_decompose(thetas, tau=tau, iterations=15, tol=0)
    _, _, objective = lore_reference(thetas, tau, 15)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(objective, objective[1:]))
    np.testing.assert_allclose(dec.objective, objective, rtol=1e-10)
    # δ_i is the last SVT of θ_i − θ0 taken with the θ0 of the last iteration: θ0 = Σ p(θ − δ_prev)
    prev = lore_decompose(thetas, tau=tau, iterations=14, tol=0)
    base = sum((t - d.dense()) for t, d in zip(thetas, prev.deltas)) / n
    for t, d in zip(thetas, dec.deltas):
        sigma = np.linalg.svd((t - base).numpy(), compute_uv=False)
        assert d.rank == int((sigma > tau).sum()) == np.linalg.matrix_rank(d.dense().numpy(), tol=1e-9)


def test_tol_stops_early_and_iterations_zero_is_mean():
    thetas = _models(noise=0.2)
    full = lore_decompose(thetas, tau=1.0, iterations=200, tol=0)
    early = lore_decompose(thetas, tau=1.0, iterations=200, tol=1e-3)
    assert early.iterations < full.iterations == 200
    drops = [(a - b) / a for a, b in zip(early.objective, early.objective[1:])]
    assert drops[-1] < 1e-3 and all(d >= 1e-3 for d in drops[:-1])
    torch.testing.assert_close(lore_merge(thetas, iterations=0), sum(thetas) / 3, rtol=0, atol=1e-12)


def test_energy_sets_tau_from_pooled_spectrum():
    thetas = _models(noise=0.2)
    mean = sum(thetas) / 3
    sigma = np.sort(np.concatenate([np.linalg.svd((t - mean).numpy(), compute_uv=False) for t in thetas]))[::-1]
    cum = np.cumsum(sigma**2) / np.sum(sigma**2)
    for energy in (0.5, 0.9, 0.99):
        kept = int(np.argmax(cum >= energy)) + 1
        tau = energy_threshold([torch.from_numpy(sigma.copy())], energy)
        assert tau == sigma[kept]
        dec = lore_decompose(thetas, energy=energy, iterations=1)
        assert dec.tau == pytest.approx(tau, rel=1e-12) and sum(d.rank for d in dec.deltas) == kept
    assert energy_threshold([torch.from_numpy(sigma.copy())], 1.0) == 0.0


def test_average_rule_at_convergence_is_mean_and_lambda_scales_deltas():
    """At a fixed point θ0 = mean(θ − δ), so θ0 + mean δ = mean θ: average with λ=1 is plain averaging."""
    thetas = _models(noise=0.2)
    dec = lore_decompose(thetas, tau=1.0, iterations=3, tol=0)
    mean_delta = sum(d.dense() for d in dec.deltas) / 3
    for lam in (0.0, 1.0, 2.5):
        torch.testing.assert_close(lore_merge(thetas, tau=1.0, iterations=3, tol=0, lambda_=lam),
                                   dec.base + lam * mean_delta, rtol=0, atol=1e-12)
    converged = lore_merge(thetas, tau=1.0, iterations=3000, tol=1e-15)
    torch.testing.assert_close(converged, sum(thetas) / 3, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, 2.0, 0.5]])
def test_ties_rule_in_merge(weights):
    thetas = _models(noise=0.2)
    dec = lore_decompose(thetas, tau=1.0, iterations=4, tol=0, weights=weights)
    stack = [w * d.dense() for w, d in zip(weights, dec.deltas)]
    want = dec.base.numpy() + 0.7 * lore_ties_reference(stack, 0.5)
    got = lore_merge(thetas, weights, tau=1.0, iterations=4, tol=0, rule="ties", density=0.5, lambda_=0.7)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_vectors_are_weighted_averages_and_higher_rank_tensors_are_reshaped():
    g = torch.Generator().manual_seed(3)
    vecs = [torch.randn(7, generator=g, dtype=F64) for _ in range(3)]
    torch.testing.assert_close(lore_merge(vecs, [1, 2, 1]), (vecs[0] + 2 * vecs[1] + vecs[2]) / 4)
    conv = [torch.randn(4, 3, 2, 2, generator=g, dtype=F64) for _ in range(2)]
    flat = lore_merge([c.reshape(4, -1) for c in conv], tau=0.3, iterations=3)
    torch.testing.assert_close(lore_merge(conv, tau=0.3, iterations=3), flat.reshape(4, 3, 2, 2))


def test_low_precision_inputs_compute_in_float32_and_keep_dtype():
    thetas = _models(noise=0.2)
    out = lore_merge([t.to(torch.bfloat16) for t in thetas], tau=1.0, iterations=3)
    ref = lore_merge([t.to(torch.bfloat16).double() for t in thetas], tau=1.0, iterations=3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0.05)


def test_zero_weight_model_is_left_out():
    thetas = _models(noise=0.2)
    torch.testing.assert_close(lore_merge(thetas + [100 * thetas[0]], [1, 1, 1, 0], tau=1.0, iterations=4),
                               lore_merge(thetas, tau=1.0, iterations=4), rtol=0, atol=1e-12)


def test_bad_parameters_are_one_line_errors():
    thetas = _models()
    with pytest.raises(MergeError, match="module 'w'.*not both"):
        lore_merge(thetas, tau=1.0, energy=0.9, name="w")
    with pytest.raises(MergeError, match="weight"):
        lore_merge(thetas, [0, 0, 0], name="w")
    with pytest.raises(MergeError, match="unknown rule 'mean'"):
        lore_merge(thetas, rule="mean", name="w")


def test_non_finite_inputs_and_results_are_refused_not_written():
    from lowrank_methods.core.errors import ComputeError

    good = [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for shape in ((6, 5), (5,)):
        inputs = [t[:, 0] if len(shape) == 1 else t for t in good]
        broken = [t.clone() for t in inputs]
        broken[1].view(-1)[2] = float("inf")
        with pytest.raises(MergeError, match="input model 2 of 3 contains NaN or Inf"):
            lore_merge(broken, name="w")
    half = [100 * t.half() for t in good]  # finite inputs whose λ-scaled merge overflows float16
    with pytest.raises(ComputeError, match="not finite"):
        lore_merge(half, tau=1.0, iterations=3, lambda_=1e7, name="w")
