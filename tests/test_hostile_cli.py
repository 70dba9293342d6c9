"""A corpus of hostile inputs, each run through both CLIs: one line, no traceback, nothing left on disk.

Every case is a recipe over adapters built in-process. For each: `mergekit-lowrank validate` and `merge`
refuse (the same verdict), `mergekit-yaml` refuses too where the case reaches our code, each with exactly one
stderr line, a non-zero exit and no traceback; OUT's parent and TMPDIR hold nothing new afterwards.
"""

from __future__ import annotations

import json
import math
import pickle
import tempfile
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from helpers import listing, raw_safetensors, write_adapter
from lowrank_methods.cli import main as ours

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"
CASES: dict[str, tuple] = {}


def case(name: str, *, needle: str = "", mergekit: bool = True):
    """Register a builder ``fn(tmp) -> recipe text (or bytes)``; ``mergekit``: the case applies to mergekit-yaml."""

    def register(fn):
        CASES[name] = (fn, needle, mergekit)
        return fn

    return register


def good(tmp, name="good", **kw):
    return write_adapter(tmp / name, {Q: (8, 8), V: (8, 8)}, **kw)


def recipe(*adapters, method="mtc", parameters="{rank: 2}", weights=None, extra=""):
    models = "\n".join(f"  - model: {a}" + (f"\n    parameters: {{weight: {w}}}" if w is not None else "")
                       for a, w in zip(adapters, weights or [None] * len(adapters)))
    return f"merge_method: {method}\nmodels:\n{models}\nparameters: {parameters}\n{extra}"


def two(tmp, **bad_kw):
    """A good adapter and a bad one built with ``write_adapter(**bad_kw)``."""
    return recipe(good(tmp), good(tmp, "bad", **bad_kw))


def with_config(tmp, edit):
    """A good adapter and one whose adapter_config.json is replaced by ``edit(config dict) -> text``."""
    bad = good(tmp, "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    text = edit(cfg)
    (bad / "adapter_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return recipe(good(tmp), bad)


def with_header(tmp, header, data=b"", **kw):
    """A good adapter and one whose safetensors file is written raw."""
    bad = good(tmp, "bad")
    raw_safetensors(bad / "adapter_model.safetensors", header, data, **kw)
    return recipe(good(tmp), bad)


def lora_header(a_shape=(4, 8), b_shape=(8, 4), dtype="F32", a_offsets=None, b_offsets=None):
    size = 4 if dtype == "F32" else 2
    na, nb = math.prod(a_shape) * size, math.prod(b_shape) * size
    return {f"base_model.model.{Q}.lora_A.weight": {"dtype": dtype, "shape": list(a_shape), "data_offsets": a_offsets or [0, na]},
            f"base_model.model.{Q}.lora_B.weight": {"dtype": dtype, "shape": list(b_shape),
                                                    "data_offsets": b_offsets or [na, na + nb]}}, bytes(na + nb)


# -- recipes ---------------------------------------------------------------------------------------------------
case("recipe-not-utf8", needle="UTF-8", mergekit=False)(lambda tmp: b"merge_method: ctm\nmodels:\n  - model: \xff\xfe\n")
case("recipe-nul-byte", needle="YAML", mergekit=False)(lambda tmp: recipe(good(tmp)).replace("models", "mod\x00els"))
case("recipe-deep-nesting", needle="nests deeper", mergekit=False)(
    lambda tmp: recipe(good(tmp), parameters="{lambda: " + "[" * 5000 + "1" + "]" * 5000 + "}"))
case("recipe-alias-bomb", needle="aliases")(lambda tmp: recipe(good(tmp), parameters="{rank: 2}") + "\n".join(
    ["x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]))
case("recipe-not-a-mapping", needle="mapping", mergekit=False)(lambda tmp: "- merge_method\n- ctm\n")
case("recipe-empty", needle="mapping", mergekit=False)(lambda tmp: "")
case("recipe-bad-yaml", needle="YAML", mergekit=False)(lambda tmp: "merge_method: [ctm\nmodels: {\n")
case("recipe-too-large", needle="larger than", mergekit=False)(lambda tmp: recipe(good(tmp)) + "#" * (1 << 21))
case("recipe-unknown-method", needle="did you mean")(lambda tmp: recipe(good(tmp), method="mtcc"))
case("recipe-no-models", needle="no models", mergekit=False)(lambda tmp: "merge_method: ctm\nmodels: []\n")
case("recipe-slices", needle="slices", mergekit=False)(
    lambda tmp: f"merge_method: ctm\nslices:\n  - sources:\n      - model: {good(tmp)}\n        layer_range: [0, 1]\n")
case("recipe-two-plus", needle="more than one '+'", mergekit=False)(lambda tmp: recipe(f"a+b+{good(tmp)}"))
case("recipe-per-model-param", needle="per-model", mergekit=False)(
    lambda tmp: recipe(good(tmp)).replace("  - model: ", "  - parameters: {density: 0.5}\n    model: "))
case("recipe-bad-dtype", needle="dtype", mergekit=False)(lambda tmp: recipe(good(tmp), extra="dtype: float13\n"))
case("recipe-bundle-for-ctm", needle="does not fit")(lambda tmp: recipe(good(tmp), method="ctm", parameters="{output: bundle}"))
case("recipe-bad-output", needle="output")(lambda tmp: recipe(good(tmp), parameters="{output: photos}"))

# -- parameters and weights ----------------------------------------------------------------------------------
for value in (".nan", ".inf", "-.inf", "1e308", "[1.0, .nan]", "{filter: q_proj, value: .nan}"):
    case(f"lambda-{value}", needle="lambda")(lambda tmp, v=value: recipe(good(tmp), parameters=f"{{rank: 2, lambda: {v}}}"))
for value in (".nan", ".inf", "1e300", "abc", "[1.0, .inf]"):
    case(f"weight-{value}", needle="weight")(lambda tmp, v=value: recipe(good(tmp), good(tmp, "b"), weights=[1.0, v]))
case("rank-negative", needle="rank")(lambda tmp: recipe(good(tmp), parameters="{rank: -3}"))
case("rank-nan", needle="rank")(lambda tmp: recipe(good(tmp), parameters="{rank: .nan}"))
case("density-nan", needle="density")(lambda tmp: recipe(good(tmp), method="ctm", parameters="{rank: 2, rule: ties, density: .nan}"))
case("rmm-p-too-large", needle="p=5")(lambda tmp: recipe(good(tmp), good(tmp, "b"), method="rmm", parameters="{p: 5}"))
case("rmm-lambda", needle="lambda")(lambda tmp: recipe(good(tmp), good(tmp, "b"), method="rmm", parameters="{lambda: 0.5}"))
case("rmm-zero-weight", needle="> 0")(lambda tmp: recipe(good(tmp), good(tmp, "b"), method="rmm", parameters="{p: 1}",
                                                          weights=[1.0, 0.0]))
case("linear-factors-ranks", needle="same rank")(
    lambda tmp: recipe(good(tmp), good(tmp, "b", r=2), method="linear_factors", parameters="{}"))

# -- adapter directories and configs ---------------------------------------------------------------------------
case("adapter-missing", needle="nope")(lambda tmp: recipe(tmp / "nope"))
case("adapter-no-config", needle="adapter_config.json")(
    lambda tmp: recipe(good(tmp), (tmp / "empty").mkdir() or tmp / "empty"))
case("config-r-string", needle="r")(lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"r": "four"})))
case("config-r-float", needle="r")(lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"r": 4.7})))
case("config-r-zero", needle="r")(lambda tmp: recipe(good(tmp), good(tmp, "bad", r=0)))
case("config-alpha-string", needle="lora_alpha")(lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"lora_alpha": "x"})))
case("config-alpha-nan", needle="lora_alpha")(
    lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"lora_alpha": float("nan")})))
case("config-alpha-inf", needle="lora_alpha")(
    lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"lora_alpha": float("inf")})))
case("config-alpha-1e308", needle="lora_alpha")(lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"lora_alpha": 1e308})))
case("config-list", needle="adapter_config.json")(lambda tmp: with_config(tmp, lambda c: "[1, 2]"))
case("config-null", needle="adapter_config.json")(lambda tmp: with_config(tmp, lambda c: "null"))
case("config-not-utf8", needle="UTF-8")(lambda tmp: with_config(tmp, lambda c: b'{"r": 4, "x": "\xff"}'))
case("config-not-json", needle="JSON")(lambda tmp: with_config(tmp, lambda c: "{r: 4"))
case("config-bad-regex", needle="rank_pattern")(
    lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"rank_pattern": {"q_proj(": 2}})))
case("config-pattern-list-value", needle="rank_pattern")(
    lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"rank_pattern": {"q_proj": [2]}})))
case("config-pattern-huge", needle="rank_pattern")(
    lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"rank_pattern": {f"m{i}": 2 for i in range(100_000)}})))
case("config-dora", needle="DoRA")(lambda tmp: two(tmp, extra_config={"use_dora": True}))
case("config-ia3", needle="IA3")(lambda tmp: two(tmp, extra_config={"peft_type": "IA3"}))
case("config-rank-mismatch", needle="rank")(lambda tmp: with_config(tmp, lambda c: json.dumps(c | {"r": 3})))
case("adapters-different-bases", needle="different base models")(lambda tmp: two(tmp, base="org/other"))
case("adapters-shape-mismatch", needle="shape")(
    lambda tmp: recipe(good(tmp), write_adapter(tmp / "bad", {Q: (8, 16)})))

# -- safetensors files -----------------------------------------------------------------------------------------
case("st-truncated", needle="bad")(lambda tmp: with_header(tmp, *lora_header()[:1], lora_header()[1][:-8]))
case("st-header-length-huge", needle="bad")(lambda tmp: with_header(tmp, *lora_header(), length=1 << 40))
case("st-header-not-json", needle="bad")(lambda tmp: with_header(tmp, b"{not json", b""))
case("st-overlap", needle="bad")(lambda tmp: with_header(tmp, *lora_header(a_offsets=[0, 128], b_offsets=[64, 192])))
case("st-negative-offset", needle="bad")(lambda tmp: with_header(tmp, *lora_header(a_offsets=[-16, 112])))
case("st-reversed-offsets", needle="bad")(lambda tmp: with_header(tmp, *lora_header(a_offsets=[128, 0], b_offsets=[128, 256])))
case("st-unknown-dtype", needle="bad")(lambda tmp: with_header(tmp, *lora_header(dtype="F33")))
case("st-bytes-mismatch", needle="bad")(lambda tmp: with_header(tmp, lora_header()[0] | {
    f"base_model.model.{Q}.lora_A.weight": {"dtype": "F32", "shape": [4, 9], "data_offsets": [0, 128]}}, lora_header()[1]))
case("st-missing-shape", needle="bad")(lambda tmp: with_header(tmp, {k: {kk: vv for kk, vv in v.items() if kk != "shape"}
                                                                     for k, v in lora_header()[0].items()}, lora_header()[1]))
case("st-scalar-lora", needle="bad")(lambda tmp: with_header(tmp, *lora_header(a_shape=(), b_shape=(8, 4))))
case("st-1d-lora", needle="bad")(lambda tmp: with_header(tmp, *lora_header(a_shape=(32,), b_shape=(8, 4))))
case("st-no-lora-tensors", needle="LoRA")(lambda tmp: with_header(tmp, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                                                   bytes(8)))
case("st-only-lora-a", needle="lora")(lambda tmp: with_header(tmp, {k: v for k, v in lora_header()[0].items() if "lora_A" in k},
                                                              lora_header()[1][:128]))
case("st-nan-factors", needle="NaN")(lambda tmp: recipe(good(tmp), _factors(tmp, float("nan"))))
case("st-inf-factors", needle="NaN or Inf")(lambda tmp: recipe(good(tmp), _factors(tmp, float("inf"))))
case("pickle-without-flag", needle="pickle")(lambda tmp: recipe(good(tmp), _pickled(tmp, {"w": torch.ones(2)})))


def _factors(tmp, value):
    bad = good(tmp, "bad")
    t = {f"base_model.model.{m}.{p}.weight": torch.randn(*s) for m in (Q, V) for p, s in (("lora_A", (4, 8)), ("lora_B", (8, 4)))}
    t[f"base_model.model.{V}.lora_B.weight"][3, 1] = value
    save_file(t, str(bad / "adapter_model.safetensors"))
    return bad


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _pickled(tmp, obj):
    bad = good(tmp, "bad")
    (bad / "adapter_model.safetensors").unlink()
    with open(bad / "adapter_model.bin", "wb") as f:
        pickle.dump(obj, f)
    return bad


def test_corpus_is_large_enough():
    assert len(CASES) >= 60, len(CASES)


def assert_one_line_refusal(result, where):
    assert result.exit_code not in (0, None), f"{where}: exit 0\n{result.output}"
    assert isinstance(result.exception, SystemExit), f"{where}: traceback {result.exception!r}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{where}: {result.stderr!r}"
    assert len(lines[0]) <= 320 and "Traceback" not in result.output, f"{where}: {lines[0]!r}"
    return lines[0]


@pytest.fixture
def quarantine(tmp_path, monkeypatch):
    """A TMPDIR of the test's own, to check that nothing is left in it."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    return tmpdir


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_line_and_leaves_nothing(name, tmp_path, quarantine, patched):
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    build, needle, in_mergekit = CASES[name]
    inputs = tmp_path / "in"
    inputs.mkdir()
    text = build(inputs)
    path = inputs / "recipe.yml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape"))
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "new" / "merged"
    before = listing(outs, quarantine, inputs)
    runner = CliRunner()
    start = time.perf_counter()

    validate = assert_one_line_refusal(runner.invoke(ours, ["validate", str(path)]), "validate")
    merge = assert_one_line_refusal(runner.invoke(ours, ["merge", str(path), str(out), "--quiet"]), "merge")
    assert validate == merge, "validate and merge disagree"
    assert merge.startswith("error: ") and needle in merge, merge
    assert listing(outs, quarantine, inputs) == before
    if in_mergekit:
        line = assert_one_line_refusal(runner.invoke(mergekit_yaml, [str(path), str(out), "--quiet"]), "mergekit-yaml")
        assert needle in line and "--" not in line.replace("--quiet", ""), line  # names no flag it lacks
        assert listing(outs, quarantine, inputs) == before
    assert time.perf_counter() - start < 30
