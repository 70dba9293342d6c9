"""Recipes mean what mergekit says they mean: settings evaluated as mergekit does, unused parameters refused."""

from __future__ import annotations

import pytest
import yaml
from pydantic import TypeAdapter

from lowrank_methods.core.errors import RecipeError
from lowrank_methods.pipeline.recipe import Conditional, evaluate_setting, parse_recipe

SETTINGS = [  # (YAML of one parameter value, the parameter's type)
    ("0.5", float), ("3", int), ("true", bool), ("ties", str), ("1e-3", float), ("1e-3", str),
    ("[0.0, 1.0]", float), ("[1e-3, 1e-1]", float), ("[1, 3, 9]", float), ("[2, 4]", int), ("[true, false]", bool),
    ("[ta, ties, tsv]", str), ("[1, 2.5]", float), ("[]", float),
    ("{filter: mlp, value: 0.3}", float), ("[{filter: mlp, value: 0.3}, {value: 0.5}]", float),
    ("[{filter: q_proj, value: [0.1, 0.9]}, {filter: '*', value: 2}]", float),
    ("[{filter: nothing, value: 1.0}]", float), ("[{filter: mlp, value: []}, {value: 0.5}]", float),
    ("[{filter: attn, value: [a, b]}, {value: c}]", str),
]
TENSORS = ["model.layers.3.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight", "lm_head.weight"]


def ours(raw, tensor, t, kind):
    setting = raw
    if isinstance(raw, dict):
        setting = Conditional.model_validate(raw)
    elif isinstance(raw, list) and raw and isinstance(raw[0], dict):
        setting = [Conditional.model_validate(c) for c in raw]
    return evaluate_setting(setting, tensor, t, TypeAdapter(kind).validate_python)


def theirs(raw, tensor, t, kind):
    from mergekit.config import ConditionalParameter
    from mergekit.config import evaluate_setting as mergekit_evaluate

    setting = raw
    if isinstance(raw, dict):
        setting = ConditionalParameter.model_validate(raw)
    elif isinstance(raw, list) and raw and isinstance(raw[0], dict):
        setting = [ConditionalParameter.model_validate(c) for c in raw]
    return mergekit_evaluate(tensor, setting, t, validate=TypeAdapter(kind).validate_python)


@pytest.mark.parametrize("text,kind", SETTINGS)
def test_settings_evaluate_exactly_as_mergekit(text, kind):
    pytest.importorskip("mergekit")
    raw = yaml.safe_load(text)
    for tensor in TENSORS:
        for t in (0.0, 0.25, 0.5, 0.9, 1.0):
            try:
                expected = theirs(raw, tensor, t, kind)
            except Exception as e:  # mergekit refuses it (e.g. 3.0 for an int): so must we
                with pytest.raises(Exception):
                    ours(raw, tensor, t, kind)
                continue
            got = ours(raw, tensor, t, kind)
            assert got == expected and type(got) is type(expected), (text, tensor, t, got, expected)


def recipe(method, parameters):
    return parse_recipe(yaml.safe_dump({"merge_method": method, "models": [{"model": "a"}, {"model": "b"}],
                                        "parameters": parameters}))


def test_yaml_scientific_strings_are_numbers_for_float_parameters():
    r = recipe("mtc", {"rank": 4, "lambda": ["1e-3", "1e-1"]})  # YAML 1.1 reads 1e-3 as a string
    assert r.params_for("model.layers.0.q_proj", 0.0).lambda_ == pytest.approx(1e-3)
    assert r.params_for("model.layers.0.q_proj", 1.0).lambda_ == pytest.approx(1e-1)


@pytest.mark.parametrize("method,parameters,needle", [
    ("knots", {"tsv_components": 4}, "tsv_components: not a parameter of this method"),  # knots takes no tsv rule
    ("knots", {"common_space_fraction": 0.5}, "common_space_fraction: not a parameter of this method"),
    ("ctm", {"rule": "ties", "tsv_components": 4}, "tsv_components is read by rule tsv, not by rule 'ties'"),
    ("ctm", {"rank": 4, "rule": "ta", "density": 0.3}, "density is read by rule dare_ties / ties"),
    ("core_space", {"rule": "ties", "drop_rate": 0.3}, "drop_rate is read by rule dare / dare_ties"),
    ("mtc", {"rank": 4, "denstiy": 0.3}, "did you mean 'density'?"),
    ("ctm", {"rank": 4, "rnak": 3}, "did you mean 'rank'?"),
    ("tsv", {"zzz": 1}, "it takes"),
])
def test_a_parameter_the_method_does_not_use_is_refused(method, parameters, needle):
    with pytest.raises(RecipeError) as err:
        recipe(method, parameters)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_rmm_refuses_lambda_before_anything_is_read(tmp_path):
    from click.testing import CliRunner

    from helpers import write_adapter, write_recipe
    from lowrank_methods.cli import main

    a = write_adapter(tmp_path / "a", {"model.layers.0.q": (4, 4)})
    b = write_adapter(tmp_path / "b", {"model.layers.0.q": (4, 4)}, seed=1)
    path = write_recipe(tmp_path / "r.yml", "rmm", [(a, None), (b, None)], {"lambda": 0.5})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1 and "lambda: not a parameter of this method" in result.stderr
