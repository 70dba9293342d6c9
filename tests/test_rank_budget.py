"""Fixed-budget rank allocation (core/allocation.py, ``parameters: {rank_budget: r}``): the parameters of uniform
rank r, spread over modules by the merged update's spectrum."""

import json

import pytest
import torch

from helpers import dense_delta, merged_delta, write_adapter, write_recipe
from lowrank_methods.core.allocation import allocate_ranks, budget
from lowrank_methods.core.errors import RecipeError
from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.pipeline.recipe import load_recipe, parse_recipe

MODULES = {f"model.layers.{i}.self_attn.{p}": s for i in range(2)
           for p, s in (("q_proj", (24, 16)), ("v_proj", (8, 16)))} | {"model.layers.0.mlp.down_proj": (16, 40)}


def cost(ranks, shapes):
    return sum(k * sum(shapes[m]) for m, k in ranks.items())


def test_equal_shapes_use_exactly_the_uniform_budget():
    shapes = {f"m{i}": (32, 32) for i in range(6)}
    g = torch.Generator().manual_seed(0)
    spectra = {m: torch.rand(32, generator=g).sort(descending=True).values * (i + 1) for i, m in enumerate(shapes)}
    ranks = allocate_ranks(spectra, shapes, 8)
    assert cost(ranks, shapes) == budget(shapes, 8) == 6 * 8 * 64
    assert len(set(ranks.values())) > 1  # spread, not uniform


def test_mixed_shapes_stay_within_one_triplet_of_the_budget():
    shapes = {"a": (24, 16), "b": (8, 16), "c": (16, 40), "d": (64, 64)}
    g = torch.Generator().manual_seed(1)
    spectra = {m: torch.rand(min(s), generator=g).sort(descending=True).values for m, s in shapes.items()}
    ranks = allocate_ranks(spectra, shapes, 4)
    assert budget(shapes, 4) - min(sum(s) for s in shapes.values()) < cost(ranks, shapes) <= budget(shapes, 4)
    assert all(0 <= ranks[m] <= min(shapes[m]) for m in shapes)


def test_identical_relative_spectra_give_the_uniform_rank():
    shapes = {f"m{i}": (20, 20) for i in range(4)}
    s = torch.linspace(1, 0.1, 20)
    assert allocate_ranks({m: s * (10 ** i) for i, m in enumerate(shapes)}, shapes, 5) == {m: 5 for m in shapes}


def test_zero_update_gets_no_rank():
    shapes = {"a": (8, 8), "b": (8, 8)}
    ranks = allocate_ranks({"a": torch.zeros(8), "b": torch.linspace(1, 0.5, 8)}, shapes, 2)
    assert ranks == {"a": 0, "b": 4}


@pytest.fixture
def adapters(tmp_path):
    return [(write_adapter(tmp_path / f"a{i}", MODULES, r=4, alpha=8, seed=i, dtype=torch.float64), 1.0)
            for i in range(3)]


def test_merge_with_a_budget(tmp_path, adapters):
    """Per module: the best rank-k_m approximation of the exact merge; scale 1 per module; within the budget."""
    recipe = write_recipe(tmp_path / "r.yml", "task_arithmetic", adapters, {"rank_budget": 4}, dtype="float64")
    out = tmp_path / "out"
    report = run_merge(load_recipe(recipe), out, precision="float64", quiet=True, write_card=False)
    ranks = {m: int(s["rank"]) for m, s in report.modules.items()}
    shapes = {m: (o, i) for m, (o, i) in MODULES.items()}
    assert budget(shapes, 4) - max(o + i for o, i in shapes.values()) < cost(ranks, shapes) <= budget(shapes, 4)
    assert len(set(ranks.values())) > 1
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == max(ranks.values())
    for module, k in ranks.items():
        exact = sum(dense_delta(p, module) for p, _ in adapters)
        U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        got = merged_delta(out, module)
        assert float((got - best).norm() / best.norm()) <= 1e-9, module
        kept = float((S[:k]**2).sum() / (S**2).sum())
        assert report.modules[module]["budget_retained_energy"] == pytest.approx(kept)
        assert report.modules[module]["retained_energy"] == pytest.approx(kept)  # task arithmetic itself keeps all


@pytest.mark.parametrize("value, message", [
    (0, "parameters.rank_budget must be a positive integer"),
    ("16", "parameters.rank_budget must be a positive integer"),
    (True, "parameters.rank_budget must be a positive integer"),
])
def test_bad_budget_is_one_line(tmp_path, adapters, value, message):
    text = write_recipe(tmp_path / "r.yml", "task_arithmetic", adapters, {"rank_budget": value}).read_text()
    with pytest.raises(RecipeError, match=message) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)


def test_budget_is_for_adapters_only(tmp_path, adapters):
    text = write_recipe(tmp_path / "r.yml", "task_arithmetic", adapters, {"rank_budget": 4, "output": "model"}).read_text()
    with pytest.raises(RecipeError, match="rank_budget sizes an adapter; output: model does not take it"):
        parse_recipe(text)
