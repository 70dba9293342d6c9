"""mtc (merge-then-compress) with every rule, and linear_factors, against dense references written here (float64)."""

from __future__ import annotations

import pytest
import torch

from lowrank_methods.core.errors import MergeError
from lowrank_methods.core.types import LoraFactors
from lowrank_methods.core.methods import mtc as mtc_module
from lowrank_methods.core.rules import dare
from lowrank_methods.core.types import MethodContext
from helpers import WEIGHTS, random_factors, rank_of, run, ties_reference, tiny_llama

D = torch.float64


def best_rank(X, k):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :k] * S[:k] @ Vh[:k]


def dense_tasks(fs, weights):
    return torch.stack([w * f.dense() for f, w in zip(fs, weights) if f.rank > 0])


def test_mtc_ta_is_the_truncated_weighted_sum_and_a_no_op_at_full_rank():
    fs = random_factors((3, 0, 2, 4), seed=31)
    total = 0.5 * dense_tasks(fs, WEIGHTS).sum(0)
    torch.testing.assert_close(run("mtc", fs, WEIGHTS, rank=4, **{"lambda": 0.5}).factors.dense(), best_rank(total, 4),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(run("mtc", fs, WEIGHTS, rank=9, **{"lambda": 0.5}).factors.dense(), total, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", [1 << 24, 3 * 11])  # one block, and blocks of one row (T·rows·n with n = 11, T = 3)
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_mtc_ties_is_dense_ties_then_truncation(monkeypatch, block, density):
    monkeypatch.setattr(mtc_module, "BLOCK_ELEMENTS", block)
    fs = random_factors((3, 0, 2, 4), seed=32)
    merged = 0.9 * ties_reference(dense_tasks(fs, WEIGHTS), density)
    out = run("mtc", fs, WEIGHTS, rule="ties", density=density, rank=5, **{"lambda": 0.9})
    torch.testing.assert_close(out.factors.dense(), best_rank(merged, 5), rtol=0, atol=1e-10)
    S = torch.linalg.svdvals(merged)
    assert out.stats["retained_energy"] == pytest.approx(float((S[:5] ** 2).sum() / (S**2).sum()), rel=1e-10)


def test_mtc_dare_with_p0_is_task_arithmetic_and_dare_is_seeded():
    fs = random_factors((3, 2, 4), seed=33)
    total = sum(f.dense() for f in fs)
    torch.testing.assert_close(run("mtc", fs, rule="dare", drop_rate=0.0, rank=9).factors.dense(), total, rtol=0, atol=1e-12)
    a = run("mtc", fs, rule="dare_ties", drop_rate=0.5, seed=3, rank=11).factors.dense()
    assert torch.equal(a, run("mtc", fs, rule="dare_ties", drop_rate=0.5, seed=3, rank=11).factors.dense())
    assert not torch.equal(a, run("mtc", fs, rule="dare_ties", drop_rate=0.5, seed=4, rank=11).factors.dense())


def test_mtc_dare_ties_trims_after_dropping(monkeypatch):
    """DARE-TIES = TIES on the DARE-dropped tasks; the drops are replayed between the two passes and across blocks."""
    monkeypatch.setattr(mtc_module, "BLOCK_ELEMENTS", 3 * 11 * 2)
    fs = random_factors((3, 2, 4), seed=34)
    a = run("mtc", fs, rule="dare_ties", drop_rate=0.4, density=0.5, seed=1, rank=11).factors.dense()
    assert rank_of(a) == min(a.shape)  # a dense TIES merge is full rank: rank = min(m, n) keeps all of it
    # the dropped tasks, drawn here block by block from the same per-task generators
    ctx = MethodContext("layers.0.q_proj")
    rows = max(1, mtc_module.BLOCK_ELEMENTS // (3 * 11))
    tasks = []
    for t, f in enumerate(fs):
        g = ctx.generator(1, "cpu", f"#{t}")
        tasks.append(torch.cat([dare(f.B[s:s + rows] @ f.A, 0.4, g) for s in range(0, f.shape[0], rows)]))
    torch.testing.assert_close(a, ties_reference(torch.stack(tasks), 0.5), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rule", ["tsv", "iso_c", "iso_cts"])
def test_mtc_spectral_rules_equal_the_standalone_dense_methods(rule):
    fs = random_factors((3, 0, 2, 4), seed=35)
    standalone = run(rule, fs, WEIGHTS, rank=4).factors.dense()
    torch.testing.assert_close(run("mtc", fs, WEIGHTS, rule=rule, rank=4).factors.dense(), standalone, rtol=0, atol=1e-12)


def test_linear_factors_is_peft_linear_on_the_factors():
    fs = random_factors((3, 3, 0, 3), seed=36)
    w = [0.5, -2.0, 1.0, 1.5]
    kept = [(f, x) for f, x in zip(fs, w) if f.rank]
    A = sum((1 if x >= 0 else -1) * abs(x) ** 0.5 * f.A for f, x in kept)
    B = sum(abs(x) ** 0.5 * f.B for f, x in kept)
    out = run("linear_factors", fs, w, **{"lambda": 0.8})
    torch.testing.assert_close(out.factors.dense(), 0.8 * B @ A, rtol=0, atol=1e-12)
    with pytest.raises(MergeError, match="same rank.*layers.0.q_proj|layers.0.q_proj.*same rank"):
        run("linear_factors", random_factors((3, 2)))


def test_linear_factors_equals_peft_add_weighted_adapter_linear_when_scale_is_one():
    """PEFT puts √(w·s) on both factors; with lora_alpha = r (s = 1) that is exactly this method."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(layers=1), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]), "a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    for name in ("a", "b"):
        torch.nn.init.normal_(layer.lora_B[name].weight)
    w = [0.7, -1.3]
    model.add_weighted_adapter(["a", "b"], w, "merged", combination_type="linear")
    peft_delta = layer.get_delta_weight("merged").double()
    factors = [LoraFactors(layer.lora_A[n].weight.double(), layer.lora_B[n].weight.double()) for n in ("a", "b")]
    torch.testing.assert_close(run("linear_factors", factors, w).factors.dense(), peft_delta, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["ties", "dare", "dare_ties"])
def test_mtc_dense_rules_refuse_to_run_without_a_rank(rule):
    from lowrank_methods.core.method import get_method

    with pytest.raises(MergeError, match=f"rule '{rule}' merges the dense updates.*set `rank`"):
        get_method("mtc").parse_params({"rule": rule})
    assert get_method("mtc").parse_params({"rule": rule, "rank": 0.9}).rank == 0.9
