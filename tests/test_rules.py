"""The merge rules (lowrank_methods/core/rules.py) against dense references written here and in helpers.py, in float64."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from helpers import iso_cts_reference, tsv_reference
from lowrank_methods.core.errors import MergeError
from lowrank_methods.core.linalg import tucker2
from lowrank_methods.core.method import get_method
from lowrank_methods.core.rules import DareRule, DareTiesRule, apply_rule, dare, iso_c, iso_cts, ties, tsv, wudi
from lowrank_methods.core.types import MethodContext

D = torch.float64


def low_rank_stack(ranks, m=12, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(m, r, generator=g, dtype=D) @ torch.randn(r, n, generator=g, dtype=D) for r in ranks])


# -- TIES ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_ties_matches_peft(method, density):
    X = torch.randn(4, 7, 9, generator=torch.Generator().manual_seed(1), dtype=D)
    ref = merge_utils.ties(list(X), torch.ones(4, dtype=D), density, method)
    torch.testing.assert_close(ties(X, density, method), ref, rtol=0, atol=1e-12)


def test_ties_written_out():
    """Trim to top-50%, γ = sign(Σ), mean of agreeing nonzero entries: a 1-D case worked by hand."""
    X = torch.tensor([[4.0, -1.0, 3.0, 0.5], [-2.0, 2.0, 1.0, -6.0], [1.0, -3.0, -0.1, 5.0]], dtype=D)[:, None, :]
    # trimmed: [4,0,3,0], [-2,0,0,-6], [0,-3,0,5]; Σ = [2,-3,3,-1] → γ = [+,-,+,-]
    expected = torch.tensor([4.0, -3.0, 3.0, -6.0], dtype=D)
    torch.testing.assert_close(ties(X, 0.5, "total")[0], expected)


def test_ties_identical_inputs_density_one_is_identity():
    x = torch.randn(6, 5, dtype=D)
    torch.testing.assert_close(ties(torch.stack([x, x, x]), 1.0), x, rtol=1e-15, atol=0)  # (x+x+x)/3 rounds
    assert torch.equal(ties(x[None], 1.0), x)


def reference_topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """The TIES / Compress-then-Merge reference code's trim, written out: k = n − ⌊n·d⌋, keep |x| ≥ the k-th smallest."""
    flat = x.abs().flatten()
    k = flat.numel() - int(flat.numel() * density)
    return x.abs() >= flat.kthvalue(k).values


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_ties_keep_count_floor_plus_one_is_the_reference_trim(density):
    X = torch.randn(3, 8, 9, generator=torch.Generator().manual_seed(4), dtype=D)
    mine = ties(X, density, "total", "floor+1")
    trimmed = torch.stack([x * reference_topk_mask(x, density) for x in X])
    torch.testing.assert_close(mine, ties(trimmed, 1.0, "total"), rtol=0, atol=0)
    counts = [int(reference_topk_mask(x, density).sum()) for x in X]
    assert counts == [int(72 * density) + 1] * 3
    assert not torch.equal(mine, ties(X, density, "total"))  # the default keeps one entry fewer per task


# -- DARE ----------------------------------------------------------------------------------------------
def test_dare_p0_is_identity():
    X = torch.randn(3, 4, 5, dtype=D)
    assert torch.equal(dare(X, 0.0, torch.Generator().manual_seed(0)), X)
    assert torch.equal(apply_rule(X, DareRule(drop_rate=0.0)), X.sum(0))


def test_dare_is_unbiased_over_seeds():
    X = torch.randn(1, 4, 5, dtype=D, generator=torch.Generator().manual_seed(3))
    n = 4000
    mean = sum(apply_rule(X, DareRule(drop_rate=0.5, seed=s)) for s in range(n)) / n
    # per entry: E = x, std of the mean = |x| √(p/(1-p)) / √n = |x|/√n
    assert ((mean - X[0]).abs() <= 5 * X[0].abs() / n**0.5).all()


def test_dare_drops_the_requested_fraction_and_rescales():
    X = torch.ones(2, 200, 100, dtype=D)
    out = dare(X, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.7))


def test_seeded_rules_are_deterministic_per_module_and_ignore_global_rng():
    X = torch.randn(3, 8, 8, dtype=D)
    p = DareTiesRule(seed=7, density=0.5)
    ctx = MethodContext("layers.0.q_proj")
    torch.manual_seed(0)
    a = apply_rule(X, p, ctx)
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(apply_rule(X, p, ctx), a)
    assert not torch.equal(apply_rule(X, p, MethodContext("layers.1.q_proj")), a)
    assert not torch.equal(apply_rule(X, p.model_copy(update={"seed": 8}), ctx), a)
    g1, g2 = ctx.generator(p.seed, "cpu"), ctx.generator(p.seed, "cpu")
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


@pytest.mark.parametrize("bad", [{"density": 0}, {"density": 1.5}, {"drop_rate": 1.0}, {"drop_rate": -0.1},
                                 {"majority_sign_method": "max"}, {"rule": "slerp"}, {"common_space_fraction": 0}])
def test_rule_parameters_are_validated(bad):
    with pytest.raises(MergeError, match="bad parameters for method 'core_space'"):
        get_method("core_space").parse_params(bad)


# -- TSV -----------------------------------------------------------------------------------------------
def test_tsv_single_task_is_identity():
    X = low_rank_stack([4])
    torch.testing.assert_close(tsv(X), X[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("ranks,k", [((2, 3, 1), None), ((2, 3, 4), 2), ((3, 3), 3)])
def test_tsv_matches_dense_reference(ranks, k):
    X = low_rank_stack(ranks)
    kk = k if k is not None else min(X.shape[1:]) // len(ranks)
    torch.testing.assert_close(tsv(X, k), tsv_reference(X, kk), rtol=0, atol=1e-10)


def test_tsv_of_orthogonal_tasks_is_task_arithmetic():
    Q1 = torch.linalg.qr(torch.randn(12, 6, dtype=D))[0]
    Q2 = torch.linalg.qr(torch.randn(10, 6, dtype=D))[0]
    X = torch.stack([Q1[:, 2 * t:2 * t + 2] @ torch.randn(2, 2, dtype=D) @ Q2[:, 2 * t:2 * t + 2].T for t in range(3)])
    torch.testing.assert_close(tsv(X), X.sum(0), rtol=0, atol=1e-12)


# -- Iso-C / Iso-CTS -----------------------------------------------------------------------------------
def test_iso_c_has_a_flat_spectrum_on_the_support_of_the_sum():
    X = low_rank_stack([2, 3, 1])
    out = iso_c(X)
    S_in = torch.linalg.svdvals(X.sum(0))[:6]
    S_out = torch.linalg.svdvals(out)
    torch.testing.assert_close(S_out[:6], torch.full((6,), float(S_in.mean()), dtype=D), rtol=0, atol=1e-12)
    assert S_out[6:].abs().max() < 1e-12
    # same singular subspaces as the sum
    U = torch.linalg.svd(X.sum(0))[0][:, :6]
    torch.testing.assert_close(U @ (U.T @ out), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3])
def test_iso_cts_matches_dense_reference(fraction):
    X = low_rank_stack([2, 3, 1, 2])
    torch.testing.assert_close(iso_cts(X, fraction), iso_cts_reference(X, fraction), rtol=0, atol=1e-10)


def test_iso_cts_task_directions_sets_the_split():
    """s = task_directions directly: D = 8, T = 4, s = 1 is the split common_space_fraction 0.5 also gives."""
    X = low_rank_stack([2, 2, 2, 2])
    torch.testing.assert_close(iso_cts(X, 0.8, task_directions=1), iso_cts(X, 0.5), rtol=0, atol=1e-12)
    torch.testing.assert_close(iso_cts(X, 0.8, task_directions=9), iso_cts(X, 0.8, task_directions=2), rtol=0, atol=0)
    assert not torch.allclose(iso_cts(X, 0.8, task_directions=1), iso_c(X))


def test_iso_cts_with_common_fraction_one_is_iso_c():
    X = low_rank_stack([2, 3, 1])
    torch.testing.assert_close(iso_cts(X, 1.0), iso_c(X), rtol=0, atol=1e-12)


# -- WUDI ----------------------------------------------------------------------------------------------
def _wudi_loss(M, X, mu):
    return sum(((M - x) @ x.T).square().sum() / x.square().sum() for x in X) + mu * (M - X.sum(0)).square().sum()


@pytest.mark.parametrize("ridge", [0.0, 0.01, 1.0])
def test_wudi_is_the_minimiser_of_its_objective(ridge):
    """The gradient of Σ_t ‖(M − X_t)X_tᵀ‖²/‖X_t‖² + μ‖M − Σ_t X_t‖² vanishes at the rule's output; with ridge 0
    and linearly independent row spaces (3 tasks of rank 2 in 10 columns) the interference term is 0."""
    X = low_rank_stack([2, 2, 2])
    G = sum(x.T @ x / x.square().sum() for x in X)
    mu = ridge * 3 / 6  # T / rank(Σ G_t): the mean nonzero eigenvalue
    M = wudi(X, ridge).requires_grad_()
    _wudi_loss(M, X, mu).backward()
    assert M.grad.abs().max() < 1e-10
    assert torch.linalg.matrix_rank(G) == 6
    if ridge == 0:
        assert float(_wudi_loss(M.detach(), X, 0)) < 1e-20
        for x in X:  # on each task's own rows the merge acts as that task does
            torch.testing.assert_close(M.detach() @ x.T, x @ x.T, rtol=0, atol=1e-10)


def test_wudi_with_orthogonal_row_spaces_is_the_sum_and_a_large_ridge_tends_to_it():
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(10, 6, generator=g, dtype=D))[0]
    X = torch.stack([torch.randn(12, 2, generator=g, dtype=D) @ Q[:, 2 * t:2 * t + 2].T for t in range(3)])
    for ridge in (0.0, 0.01, 5.0):
        torch.testing.assert_close(wudi(X, ridge), X.sum(0), rtol=0, atol=1e-10)
    Y = low_rank_stack([2, 3, 2])
    assert (wudi(Y, 1e6) - Y.sum(0)).norm() < 1e-4 * Y.sum(0).norm() < (wudi(Y, 0.01) - Y.sum(0)).norm()


def test_wudi_ignores_zero_tasks_and_has_the_rank_of_the_row_spaces():
    X = low_rank_stack([2, 1, 3])
    with_zero = torch.cat([X, torch.zeros(1, *X.shape[1:], dtype=D)])
    torch.testing.assert_close(wudi(with_zero), wudi(X), rtol=0, atol=1e-12)
    assert torch.linalg.matrix_rank(wudi(X)) <= 6
    assert torch.equal(wudi(torch.zeros(2, 4, 5, dtype=D)), torch.zeros(4, 5, dtype=D))


# -- Tucker-2 ------------------------------------------------------------------------------------------
def test_tucker2_recovers_an_exact_multilinear_rank():
    g = torch.Generator().manual_seed(0)
    P = torch.linalg.qr(torch.randn(9, 3, generator=g, dtype=D))[0]
    Q = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=D))[0]
    cores = P @ torch.randn(5, 3, 3, generator=g, dtype=D) @ Q.T
    U0, U1 = tucker2(cores, 3)
    torch.testing.assert_close(U0 @ U0.T, P @ P.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(U1 @ U1.T, Q @ Q.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(U0.T @ U0, torch.eye(3, dtype=D), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_selection_is_kthvalue(dtype):
    """kth_smallest (one histogram pass over the bit patterns) returns torch.kthvalue's element, ties and zeros too."""
    from lowrank_methods.core.rules import kth_smallest

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300_000, generator=g, dtype=dtype).abs()
    a[:50_000] = 0.0
    a[50_000:60_000] = 0.5  # a run of equal values
    for k in (1, 50_000, 50_001, 55_000, 60_001, 299_999, 300_000):
        assert torch.equal(kth_smallest(a, k), torch.kthvalue(a, k).values)


def test_ties_in_cache_sized_blocks_is_the_whole_tensor_computation():
    """TIES over blocks of entries (rules.per_entry) gives exactly what the whole-tensor formulas give."""
    from lowrank_methods.core.rules import ties

    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 64, 3000, generator=g) * torch.rand(8, 1, 1, generator=g)
    flat = X.abs().flatten(1)
    keep = int(0.2 * flat.shape[1])
    thr = torch.kthvalue(flat, flat.shape[1] - keep + 1, dim=1).values.reshape(-1, 1, 1)
    T = X * (X.abs() >= thr)
    sign = T.sign()
    majority = torch.where(T.sum(0) >= 0, 1.0, -1.0)
    agree = sign == majority
    assert torch.equal(ties(X, 0.2), (T * agree).sum(0) / agree.sum(0).clamp(min=1))
