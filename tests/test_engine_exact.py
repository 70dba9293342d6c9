"""cat and task_arithmetic through the whole engine reproduce Σ w_t s_t B_t A_t exactly (float64)."""

import pytest
import torch

from helpers import dense_delta, merged_delta, write_adapter, write_recipe
from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.pipeline.recipe import load_recipe

Q0, D0, Q1, V1 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
EMB = "model.embed_tokens"


@pytest.fixture
def mixed(tmp_path):
    """Mixed ranks, rsLoRA, rank/alpha patterns, embeddings and partly disjoint target modules."""
    f64 = torch.float64
    a = write_adapter(tmp_path / "a", {Q0: (24, 16), D0: (16, 40), Q1: (24, 16)}, r=4, alpha=8, seed=1, dtype=f64)
    b = write_adapter(tmp_path / "b", {Q0: (24, 16), D0: (16, 40), V1: (8, 16)}, r=6, alpha=3, seed=2, rslora=True,
                      rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 5}, dtype=f64)
    c = write_adapter(tmp_path / "c", {Q1: (24, 16)}, r=3, alpha=3, seed=3, embeddings={EMB: (50, 16)}, dtype=f64)
    return [(a, 0.5), (b, 1.0), (c, -1.25)]


def reference(adapters, module):
    return sum(w * dense_delta(p, module) for p, w in adapters if merged_delta(p, module) is not None)


def merge(tmp_path, method, adapters, **params):
    recipe = write_recipe(tmp_path / f"{method}.yml", method, adapters, params or None, dtype="float64")
    out = tmp_path / f"out-{method}-{len(params)}"
    report = run_merge(load_recipe(recipe), out, precision="float64", quiet=True, write_card=False)
    return out, report


@pytest.mark.parametrize("method", ["cat", "task_arithmetic", "mtc"])
def test_full_rank_is_exact(tmp_path, mixed, method):
    out, report = merge(tmp_path, method, mixed, **{"lambda": 0.7})
    for module in (Q0, D0, Q1, V1, EMB):
        ref = 0.7 * reference(mixed, module)
        got = merged_delta(out, module)
        assert float((got - ref).norm() / ref.norm()) <= 1e-10, module
        assert report.modules[module]["retained_energy"] == pytest.approx(1.0)


def test_rank_k_is_the_best_rank_k_approximation(tmp_path, mixed):
    out, report = merge(tmp_path, "task_arithmetic", mixed, rank=3)
    for module in (Q0, D0, Q1, V1, EMB):
        ref = reference(mixed, module)
        U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
        k = min(3, int((S > S[0] * 1e-12).sum()))
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        got = merged_delta(out, module)
        assert float((got - best).norm() / best.norm()) <= 1e-8, module
        assert report.modules[module]["retained_energy"] == pytest.approx(float((S[:k] ** 2).sum() / (S**2).sum()))


def test_energy_rank_writes_rank_pattern(tmp_path, mixed):
    import json

    out, report = merge(tmp_path, "task_arithmetic", mixed, rank=0.9)
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {m: int(s["rank"]) for m, s in report.modules.items()}
    assert all(s["retained_energy"] >= 0.9 - 1e-12 for s in report.modules.values())
    assert config["r"] == max(ranks.values()) and config["lora_alpha"] == config["r"]
    assert len(set(ranks.values())) > 1 and config["rank_pattern"]
    for module in ranks:
        U, S, Vh = torch.linalg.svd(reference(mixed, module), full_matrices=False)
        energy = torch.cumsum(S**2, 0) / (S**2).sum()
        assert ranks[module] == int((energy < 0.9 - 1e-12).sum()) + 1


def test_linear_normalises_by_weight_sum(tmp_path, mixed):
    out, _ = merge(tmp_path, "linear", mixed)
    total = sum(w for _, w in mixed)
    ref = reference(mixed, Q0) / total
    assert float((merged_delta(out, Q0) - ref).norm() / ref.norm()) <= 1e-10


def test_fan_in_fan_out_round_trip(tmp_path):
    f64 = torch.float64
    conv1d = {"transformer.h.0.attn.c_attn": (48, 16), "transformer.h.1.attn.c_attn": (48, 16)}
    a = write_adapter(tmp_path / "a", conv1d, r=2, alpha=4, seed=1, fan_in_fan_out=True, dtype=f64)
    b = write_adapter(tmp_path / "b", conv1d, r=3, alpha=3, seed=2, fan_in_fan_out=True, dtype=f64)
    out, _ = merge(tmp_path, "task_arithmetic", [(a, 1.0), (b, 2.0)])
    for module in conv1d:
        ref = dense_delta(a, module) + 2 * dense_delta(b, module)
        assert ref.shape == (16, 48)  # GPT-2 Conv1D layout (in, out)
        assert float((merged_delta(out, module) - ref).norm() / ref.norm()) <= 1e-10


def test_gradient_and_filter_parameters(tmp_path, mixed):
    """lambda as a gradient over layers and a filter per module type, as in mergekit recipes."""
    params = {"lambda": [{"filter": "mlp", "value": 2.0}, {"value": [1.0, 3.0]}]}
    out, _ = merge(tmp_path, "task_arithmetic", mixed, **params)
    for module, lam in ((D0, 2.0), (Q0, 1.0), (Q1, 3.0), (EMB, 1.0)):
        ref = lam * reference(mixed, module)
        assert float((merged_delta(out, module) - ref).norm() / ref.norm()) <= 1e-10, module


def test_same_recipe_gives_identical_files(tmp_path, mixed):
    (tmp_path / "again").mkdir()
    a, _ = merge(tmp_path, "task_arithmetic", mixed, rank=4)
    b, _ = merge(tmp_path / "again", "task_arithmetic", mixed, rank=4)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
