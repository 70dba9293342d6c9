"""A real round trip: PEFT-made adapters on a tiny Llama → our merge → PeftModel.from_pretrained.

The merged adapter must give the logits of the base model carrying the dense weighted sum of the deltas.
"""

import pytest
import torch

from helpers import logits, tiny_llama, write_recipe

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def llama():
    """The tiny Llama all adapters here are made on (hidden 64, vocab 128), seeded, in eval mode."""
    return tiny_llama(hidden=64, heads=4, vocab=128, max_position_embeddings=64).eval()


ADAPTERS = {  # name: LoraConfig kwargs: mixed ranks, rsLoRA, patterns, an embedding and disjoint targets
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj", "embed_tokens"]),
    "pattern": dict(r=6, lora_alpha=6, target_modules=["q_proj", "o_proj", "gate_proj"],
                    rank_pattern={"o_proj": 2}, alpha_pattern={"gate_proj": 24}),
}
WEIGHTS = {"plain": 0.7, "rslora": 1.3, "pattern": -0.4}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    base = llama()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(llama(), peft.LoraConfig(init_lora_weights=False, **kwargs))
        model.save_pretrained(root / name)
        merged = model.merge_and_unload().state_dict()
        deltas[name] = {k: merged[k] - base_state[k] for k in base_state}
    return root, base_state, deltas


def test_merged_adapter_matches_dense_weighted_sum(saved, tmp_path):
    root, base_state, deltas = saved
    recipe = write_recipe(tmp_path / "r.yml", "task_arithmetic", [(root / n, w) for n, w in WEIGHTS.items()],
                          base_model="tiny-llama")
    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.pipeline.recipe import load_recipe

    run_merge(load_recipe(recipe), tmp_path / "merged", quiet=True)

    expected = llama()
    expected.load_state_dict({k: v + sum(WEIGHTS[n] * deltas[n][k] for n in WEIGHTS) for k, v in base_state.items()})
    merged = peft.PeftModel.from_pretrained(llama(), tmp_path / "merged").eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got = logits(expected, ids), logits(merged, ids)
    assert float((got - want).abs().max()) <= 1e-5
    assert float((logits(llama(), ids) - want).abs().max()) > 1e-2  # the deltas matter


def test_merged_adapter_at_reduced_rank_loads_in_peft(saved, tmp_path):
    root, _, _ = saved
    recipe = write_recipe(tmp_path / "r.yml", "task_arithmetic", [(root / n, w) for n, w in WEIGHTS.items()],
                          {"rank": 0.95}, base_model="tiny-llama")
    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.pipeline.recipe import load_recipe

    report = run_merge(load_recipe(recipe), tmp_path / "merged", quiet=True)
    merged = peft.PeftModel.from_pretrained(llama(), tmp_path / "merged").eval()
    lora_ranks = {name.removesuffix(".lora_A.default.weight").removeprefix("base_model.model."): p.shape[0]
                  for name, p in merged.named_parameters() if name.endswith("lora_A.default.weight")}
    lora_ranks |= {name.removesuffix(".lora_embedding_A.default").removeprefix("base_model.model."): p.shape[0]
                   for name, p in merged.named_parameters() if name.endswith("lora_embedding_A.default")}
    assert lora_ranks == {m: int(s["rank"]) for m, s in report.modules.items()}
