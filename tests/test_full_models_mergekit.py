"""Our methods on full fine-tuned models through the stock mergekit-yaml (its planner, our dense forms), and every
shared recipe giving the same files under both CLIs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import full_finetunes, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yml"))


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    """A tiny Llama base and three full fine-tunes of it (base + a rank-2 task update on every matrix)."""
    return full_finetunes(tmp_path_factory.mktemp("finetunes"), tiny_llama(hidden=32, heads=4, vocab=64),
                          vector_scale=0.01)


@pytest.mark.parametrize("method,parameters", [("tsv", "{}"), ("iso_c", "{lambda: 0.8}"), ("ctm", "{rank: 2}")])
def test_mergekit_yaml_merges_full_finetunes_with_our_methods(finetunes, tmp_path, patched, method, parameters):
    from mergekit.merge_methods import get as get_method
    from mergekit.merge_methods import merge_state_dicts
    from mergekit.scripts.run_yaml import main as mergekit_yaml
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: {method}\nbase_model: {finetunes / 'base'}\nmodels:\n"
                      + "".join(f"  - model: {finetunes / f'ft{i}'}\n" for i in range(3))
                      + f"parameters: {parameters}\ndtype: float32\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(mergekit_yaml, [str(recipe), str(out), "--quiet", "--no-write-model-card"])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(str(out))  # a full model that transformers loads
    assert model.config.num_hidden_layers == 2
    merged = load_file(str(out / "model.safetensors"))
    # the same tensors as mergekit's own dense API on those checkpoints (our dense form, dense.py)
    states = [load_file(str(finetunes / name / "model.safetensors")) for name in ("base", "ft0", "ft1", "ft2")]
    key = "model.layers.1.self_attn.q_proj.weight"
    import yaml

    expected = merge_state_dicts([{key: s[key]} for s in states], get_method(method), base=0,
                                 parameters=yaml.safe_load(parameters) or {})[key]
    torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged[key], states[0][key])  # it did merge something


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shared_recipe_writes_the_same_files_under_both_clis(path, tmp_path, monkeypatch, patched):
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from lowrank_methods.cli import main as ours

    monkeypatch.chdir(ROOT)  # the recipes name the bundled adapters relative to the repository root
    runner = CliRunner()
    a = runner.invoke(ours, ["merge", str(path), str(tmp_path / "ours"), "--quiet"])
    b = runner.invoke(mergekit_yaml, [str(path), str(tmp_path / "mk"), "--quiet"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    names = sorted(p.name for p in (tmp_path / "ours").iterdir() if p.suffix in (".safetensors", ".json")
                   and p.name not in ("merge_report.json",))
    assert names
    for name in names:  # the weights and configs; reports and cards differ only in timings
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "mk" / name).read_bytes(), name


def test_mergekit_yaml_over_full_models_is_staged_like_every_output_of_ours(finetunes, tmp_path, patched):
    """lore and our dense forms run on mergekit's planner, but into our staging: a failed merge leaves nothing,
    a directory of someone else's files is refused untouched, a previous output of ours is replaced."""
    import shutil

    from mergekit.scripts.run_yaml import main as mergekit_yaml
    from safetensors.torch import save_file

    from helpers import listing

    bad = tmp_path / "bad"
    shutil.copytree(finetunes / "ft2", bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})

    def recipe(method, last):
        path = tmp_path / f"{method}.yml"
        path.write_text(f"merge_method: {method}\nbase_model: {finetunes / 'base'}\nmodels:\n"
                        f"  - model: {finetunes / 'ft0'}\n  - model: {finetunes / 'ft1'}\n  - model: {last}\n"
                        "parameters: {iterations: 2}\ndtype: float32\n" if method == "lore" else
                        f"merge_method: {method}\nbase_model: {finetunes / 'base'}\nmodels:\n"
                        f"  - model: {finetunes / 'ft0'}\n  - model: {last}\ndtype: float32\n")
        return str(path)

    broken = {method: recipe(method, bad) for method in ("lore", "tsv")}
    before = listing(tmp_path)
    for method in ("lore", "tsv"):
        result = CliRunner().invoke(mergekit_yaml, [broken[method], str(tmp_path / "out"), "--quiet"])
        assert result.exit_code == 1 and "contains NaN or Inf" in result.output, result.output
        assert listing(tmp_path) == before, method
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = CliRunner().invoke(mergekit_yaml, [recipe("lore", finetunes / "ft2"), str(foreign), "--quiet"])
    assert result.exit_code == 1 and "did not write" in result.output, result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = tmp_path / "out"
    for _ in range(2):  # the second run replaces the first one's output
        result = CliRunner().invoke(mergekit_yaml, [recipe("lore", finetunes / "ft2"), str(out), "--quiet"])
        assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
