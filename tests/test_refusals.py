"""Every refusal is one clear line from the CLI, and nothing is left in the output's parent directory."""

import json

import pytest
import torch
from click.testing import CliRunner

from helpers import write_adapter, write_recipe
from lowrank_methods.cli import main

Q = "model.layers.0.self_attn.q_proj"


def run_cli(tmp_path, adapters, *extra, method="task_arithmetic", parameters=None, **top):
    recipe = write_recipe(tmp_path / "recipe.yml", method, [(a, None) for a in adapters], parameters, **top)
    out = tmp_path / "outdir" / "merged"
    result = CliRunner().invoke(main, ["merge", str(recipe), str(out), "--quiet", *extra])
    return result, out


def assert_refused(result, out, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    parent = out.parent
    assert not out.exists()
    assert not parent.exists() or not any(parent.iterdir()), list(parent.iterdir())


def good(tmp_path, name="good", **kw):
    return write_adapter(tmp_path / name, {Q: (8, 8)}, **kw)


@pytest.mark.parametrize("option,needle", [("use_dora", "DoRA"), ("lora_bias", "lora_bias")])
def test_refuses_dora_and_lora_bias(tmp_path, option, needle):
    bad = good(tmp_path, "bad", extra_config={option: True})
    assert_refused(*run_cli(tmp_path, [good(tmp_path), bad]), "'bad'", needle)


def test_refuses_dora_magnitude_tensor_without_flag(tmp_path):
    bad = good(tmp_path, "bad", extra_tensors={f"base_model.model.{Q}.lora_magnitude_vector": torch.ones(8)})
    assert_refused(*run_cli(tmp_path, [good(tmp_path), bad]), "'bad'", "DoRA")


def test_refuses_other_peft_types(tmp_path):
    bad = good(tmp_path, "bad", extra_config={"peft_type": "IA3"})
    assert_refused(*run_cli(tmp_path, [good(tmp_path), bad]), "'bad'", "IA3", "only LORA")


def test_refuses_conflicting_modules_to_save(tmp_path):
    head = "base_model.model.score.weight"
    a = good(tmp_path, "a", extra_tensors={head: torch.ones(2, 8)}, extra_config={"modules_to_save": ["score"]})
    b = good(tmp_path, "b", extra_tensors={head: torch.zeros(2, 8)}, extra_config={"modules_to_save": ["score"]})
    assert_refused(*run_cli(tmp_path, [a, b]), "'score'", "modules_to_save")


def test_identical_modules_to_save_are_carried_over(tmp_path):
    head = "base_model.model.score.weight"
    a = good(tmp_path, "a", extra_tensors={head: torch.ones(2, 8)}, extra_config={"modules_to_save": ["score"]})
    b = good(tmp_path, "b", extra_tensors={head: torch.ones(2, 8)}, extra_config={"modules_to_save": ["score"]})
    result, out = run_cli(tmp_path, [a, b])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out / "adapter_model.safetensors"))[head], torch.ones(2, 8))
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["score"]


def test_refuses_different_base_models_unless_recipe_names_one(tmp_path):
    a, b = good(tmp_path, "a"), good(tmp_path, "b", base="org/other-base")
    assert_refused(*run_cli(tmp_path, [a, b]), "different base models", "base_model")
    result, out = run_cli(tmp_path, [a, b], base_model="org/tiny-base")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-base"


def test_refuses_shape_mismatch(tmp_path):
    a = good(tmp_path, "a")
    b = write_adapter(tmp_path / "b", {Q: (8, 12)})
    assert_refused(*run_cli(tmp_path, [a, b]), "'b'", Q, "different models")


def test_refuses_rank_that_disagrees_with_config(tmp_path):
    b = good(tmp_path, "b", extra_config={"r": 7})
    assert_refused(*run_cli(tmp_path, [good(tmp_path), b]), "'b'", "r=7")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_refuses_non_finite_factors(tmp_path, value):
    bad = write_adapter(tmp_path / "bad", {Q: (8, 8), "model.layers.1.self_attn.q_proj": (8, 8)}, seed=3)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] = value
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    assert_refused(*run_cli(tmp_path, [good(tmp_path), bad]), "'bad'", "NaN or Inf")


def test_refuses_pickle_unless_allowed(tmp_path):
    a = good(tmp_path, "a")
    p = good(tmp_path, "p")
    from safetensors.torch import load_file

    torch.save(load_file(str(p / "adapter_model.safetensors")), p / "adapter_model.bin")
    (p / "adapter_model.safetensors").unlink()
    assert_refused(*run_cli(tmp_path, [a, p]), "'p'", "pickle", "--allow-pickle")
    result, out = run_cli(tmp_path, [a, p], "--allow-pickle")
    assert result.exit_code == 0, result.output


def test_refuses_existing_output_unless_overwrite(tmp_path):
    a = good(tmp_path)
    result, out = run_cli(tmp_path, [a])
    assert result.exit_code == 0, result.output
    result, _ = run_cli(tmp_path, [a])
    assert result.exit_code == 1 and "previous merge" in result.output and "--overwrite" in result.output
    result, _ = run_cli(tmp_path, [a], "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]


def test_overwrite_never_replaces_a_directory_that_is_not_ours(tmp_path):
    a = good(tmp_path)
    out = tmp_path / "outdir" / "merged"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        result, _ = run_cli(tmp_path, [a], *extra)
        assert result.exit_code == 1 and "did not write (keep.txt)" in result.output, result.output
        assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]


@pytest.mark.parametrize("method,parameters,needle", [
    ("task_arithmatic", None, "did you mean 'task_arithmetic'"),
    ("task_arithmetic", {"rank": -3}, "rank"),
    ("task_arithmetic", {"ranks": 3}, "ranks"),
])
def test_bad_recipe_fails_before_reading_adapters(tmp_path, method, parameters, needle):
    missing = tmp_path / "does-not-exist"
    assert_refused(*run_cli(tmp_path, [missing], method=method, parameters=parameters), needle)


def test_missing_adapter_is_one_line(tmp_path):
    assert_refused(*run_cli(tmp_path, [tmp_path / "nope"]), "nope")


def test_validate_checks_without_writing(tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", "task_arithmetic", [(good(tmp_path, "a"), 1.0), (good(tmp_path, "b"), 0.5)])
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0 and result.output.startswith("ok: task_arithmetic over 2 adapters, 1 modules")


def test_refuses_truncated_safetensors(tmp_path):
    bad = good(tmp_path, "bad")
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) - 40])
    assert_refused(*run_cli(tmp_path, [good(tmp_path), bad]), "'bad'", "corrupt or truncated")
