"""A λ per module type in the quality benchmark: the search, and its equality with a recipe's filtered λ."""

from __future__ import annotations

import torch

from benchmarks.quality.module_lambda import by_module_type, climb
from helpers import merged_delta, write_adapter, write_recipe
from lowrank_methods.core.types import LoraFactors
from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.pipeline.recipe import load_recipe

MODULES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.self_attn.v_proj": (8, 16),
           "model.layers.0.mlp.down_proj": (16, 40), "model.layers.1.mlp.up_proj": (40, 16)}


def test_climb_reaches_a_separable_optimum_and_counts_its_steps():
    seen = []

    def score(la, lm):
        seen.append((la, lm))
        return -(la - 0.5) ** 2 - (lm - 1.5) ** 2

    assert climb(score, (1.0, 1.0)) == (0.5, 1.5)
    assert climb(score, (0.125, 1.5)) == (0.5, 1.5)  # a start off the grid joins it
    assert (2.0, 1.0) not in seen  # hill-climbing, not the whole grid


def test_scaling_by_module_type_is_the_recipe_with_a_filtered_lambda(tmp_path):
    """tsv under a rank budget at λ = 1, attention scaled by 0.5 and MLP by 1.5, is what the recipe writes."""
    adapters = [(write_adapter(tmp_path / f"a{i}", MODULES, r=4, alpha=8, seed=i, dtype=torch.float64), 1.0)
                for i in range(3)]
    outs = {}
    for name, lam in (("one", 1.0), ("typed", [{"filter": "self_attn", "value": 0.5}, {"value": 1.5}])):
        recipe = write_recipe(tmp_path / f"{name}.yml", "tsv", adapters, {"lambda": lam, "rank_budget": 4},
                              dtype="float64")
        run_merge(load_recipe(recipe), outs.setdefault(name, tmp_path / name), precision="float64", quiet=True,
                  write_card=False)
    deltas = {m: merged_delta(outs["one"], m) for m in MODULES}
    scaled = by_module_type(deltas, 0.5, 1.5)
    for m in MODULES:
        want = merged_delta(outs["typed"], m)
        assert float((scaled[m] - want).norm() / want.norm()) < 1e-9, m
    factors = by_module_type({m: LoraFactors(torch.ones(2, 3), torch.ones(4, 2)) for m in MODULES}, 0.5, 1.5)
    assert [float(f.B[0, 0]) for f in factors.values()] == [0.5, 0.5, 1.5, 1.5]
