"""mergekit's own names over bare adapter directories: `task_arithmetic`, `linear` and `ties` under `mergekit-yaml`
run on our factor engine and give what STOCK mergekit computes over the equivalent `base+adapter` recipe.

The stock reference is mergekit's own `run_merge` with every patch of the plugin taken off (the PEFT
merge_and_unload route through `--lora-merge-cache`, mergekit's loader and donor code), on a tiny local Llama.
In-process; no network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import dense_delta, merged_delta, model_weights, tiny_llama, write_adapter, write_recipe

REPO = Path(__file__).resolve().parents[1]
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
WEIGHTS = (1.0, 0.3, 0.6)  # non-uniform: mergekit's TIES divides by the agreeing entries' weights, PEFT's by their count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama base (hidden 16, 2 layers, vocab 32) and three adapters on its q/v projections naming it."""
    root = tmp_path_factory.mktemp("names")
    tiny_llama().save_pretrained(root / "base")
    base = str(root / "base")
    shapes = {m: (16, 16) for m in MODULES}
    write_adapter(root / "a", shapes, r=4, alpha=8, seed=1, base=base)
    write_adapter(root / "b", {m: s for m, s in shapes.items() if "q_proj" in m}, r=2, alpha=4, seed=2, rslora=True,
                  base=base)  # lacks v_proj: a task absent from some modules
    write_adapter(root / "c", shapes, r=3, alpha=3, seed=3, base=base)
    return root


@pytest.fixture
def one_worker(monkeypatch):
    """Both commands merge with one worker thread (their default is one per available core). With more, the
    engine's output currently varies in its last bits from run to run, in either command alike: the merge workers
    start with MKL's default thread count, not the one intra-op thread threads.py sets (a ThreadPoolExecutor
    initializer calling torch.set_num_threads(1) makes it deterministic). The equality tested here is of the two
    commands, so it is tested where the engine itself is deterministic."""
    import lowrank_methods.pipeline.threads as threads

    monkeypatch.setattr(threads, "available_cores", lambda: 1)


RECIPES = {  # method -> (parameters, adapters used); dtype float32 everywhere
    "task_arithmetic": ({"lambda": 0.7}, "abc"),
    "linear": ({}, "abc"),
    "ties": ({"density": 0.5, "lambda": 0.7}, "abc"),
}


def recipe(tiny: Path, path: Path, method: str, *, lora: bool, **extra) -> Path:
    """The recipe over bare adapter dirs (``lora=False``) or over ``base+adapter`` references (``lora=True``)."""
    params, names = RECIPES[method]
    base = tiny / "base"
    models = [(Path(f"{base}+{tiny / n}") if lora else tiny / n, w) for n, w in zip(names, WEIGHTS)]
    params = dict(params, **extra)
    if method == "ties" and not lora:
        params.setdefault("rank", 1.0)  # the exact (full-rank) result
    params = {k: v for k, v in params.items() if v is not None}  # extra={"rank": None}: no rank at all
    top = {"dtype": "float32"}
    if method != "linear":  # mergekit's linear would average base_model in as one more input
        top["base_model"] = str(base)
    return write_recipe(path, method, models, params or None, **top)


def mergekit_yaml(recipe_path: Path, out: Path, *options: str):
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main

    got = CliRunner().invoke(main, [str(recipe_path), str(out), "--quiet", "--no-write-model-card", *options])
    assert got.exit_code == 0, got.output
    return got


def our_cli(recipe_path: Path, out: Path):
    from click.testing import CliRunner

    from lowrank_methods.cli import main

    got = CliRunner().invoke(main, ["merge", str(recipe_path), str(out), "--quiet"])
    assert got.exit_code == 0, got.output
    return out


def stock(merge, recipe_path: Path, out: Path, cache: Path) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5 itself: its run_merge, LoaderCache.get (PEFT merge_and_unload into --lora-merge-cache) and
    donor code, with the plugin's replacements taken off for this call."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    from lowrank_methods.mergekit_plugin.swap import original

    text = recipe_path.read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    with pytest.MonkeyPatch.context() as mp:  # the plugin's patches are back on when this returns
        mp.setattr(LoaderCache, "get", original(LoaderCache, "get"))
        mp.setattr(merge, "_get_donor_model", original(merge, "_get_donor_model"))
        mp.setattr(LoaderCache, "loaders", {})  # no loader of an earlier run (direct or cached) is reused
        original(merge, "run_merge")(config, str(out), MergeOptions(lora_merge_cache=str(cache), quiet=True),
                                     config_source=text)
    assert cache.is_dir() and any(cache.iterdir())  # the adapters really went through PEFT's merge_and_unload
    return model_weights(out)


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str, rtol: float = 1e-5):
    err = float((got.double() - want.double()).abs().max())
    scale = float(want.double().abs().max())
    assert err <= rtol * max(scale, 1e-30), f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"


# -- (1) + (2): mergekit-yaml over bare adapters = stock mergekit over base+lora; = mergekit-lowrank merge ---------
@pytest.mark.parametrize("method", list(RECIPES))
def test_bare_adapters_run_on_our_engine_and_equal_stock_mergekit(patched, one_worker, tiny, tmp_path, method):
    from lowrank_methods.mergekit_plugin.route import check

    bare = recipe(tiny, tmp_path / "bare.yml", method, lora=False)
    import yaml
    from mergekit.config import MergeConfiguration

    routed = check(MergeConfiguration.model_validate(yaml.safe_load(bare.read_text())), bare.read_text())
    assert routed is not None and routed.method.name == method and not routed.method.in_mergekit

    mergekit_yaml(bare, tmp_path / "mk")
    cli = our_cli(bare, tmp_path / "cli")
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # (2) the same bytes from both CLIs
        assert (tmp_path / "mk" / name).read_bytes() == (cli / name).read_bytes(), name

    want = stock(patched, recipe(tiny, tmp_path / "lora.yml", method, lora=True), tmp_path / "stock",
                 tmp_path / "cache")
    w0 = model_weights(tiny / "base")
    assert want.keys() == w0.keys()
    for name, w in w0.items():  # (1) W0 + our ΔW* = stock mergekit's merged model, every tensor
        module = name.removesuffix(".weight")
        delta = merged_delta(tmp_path / "mk", module) if module in MODULES else None
        assert_close(w.double() + (0 if delta is None else delta), want[name], name)
        if delta is not None:  # the update itself, not only the (W0-dominated) weight
            assert_close(delta, want[name].double() - w.double(), f"{name} (update)", rtol=1e-4)


def test_ties_full_model_output_equals_stock_mergekit(patched, tiny, tmp_path):
    """`output: model`: mergekit-yaml writes W0 + ΔW* itself, equal to stock mergekit's ties over base+lora."""
    mergekit_yaml(recipe(tiny, tmp_path / "bare.yml", "ties", lora=False, output="model"), tmp_path / "model")
    got = model_weights(tmp_path / "model")
    want = stock(patched, recipe(tiny, tmp_path / "lora.yml", "ties", lora=True), tmp_path / "stock",
                 tmp_path / "cache")
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], name)


def test_weighted_ties_differs_from_the_count_mean(patched, tiny, tmp_path):
    """The alias is mergekit's TIES (÷ Σ w over agreeing entries), not PEFT's disjoint mean (÷ their count)."""
    from lowrank_methods.core.rules import ties

    our_cli(recipe(tiny, tmp_path / "bare.yml", "ties", lora=False), tmp_path / "out")
    module = MODULES[0]
    D = torch.stack([dense_delta(tiny / n, module) for n in "abc"])
    w = torch.tensor(WEIGHTS, dtype=D.dtype)[:, None, None]
    count_mean = 0.7 * ties(w * D, 0.5)
    assert float((merged_delta(tmp_path / "out", module) - count_mean).abs().max()) > 1e-3


@pytest.mark.parametrize("density, normalize, rescale, w", [
    (0.5, True, False, [1.0, 0.3, 0.6]), (0.3, False, True, [1.0, 0.3, 0.6]), (0.5, True, True, [0.7, -0.4, 1.2]),
    (1.0, True, False, [2.0, 1.0, 0.5]), (0.0, True, False, [1.0, 1.0, 1.0]),
])
def test_ties_alias_is_mergekits_ties_kernel(patched, density, normalize, rescale, w):
    """The alias on factors against mergekit's own `ties` kernel on base + B_t A_t (float64), every knob."""
    from mergekit.merge_methods import merge_tensors

    from lowrank_methods.core.types import LoraFactors
    from lowrank_methods.core.method import get_method

    g = torch.Generator().manual_seed(4)
    factors = [LoraFactors(A=torch.randn(r, 9, generator=g, dtype=torch.float64),
                           B=torch.randn(12, r, generator=g, dtype=torch.float64)) for r in (2, 3, 1)]
    base = torch.randn(12, 9, generator=g, dtype=torch.float64)
    knobs = {"density": density, "lambda": 0.7, "normalize": normalize, "rescale": rescale}
    want = merge_tensors([base] + [base + f.B @ f.A for f in factors], "ties", base_index=0,
                         parameters={"weight": w, **knobs}) - base
    method = get_method("ties")
    got = method(factors, w, method.parse_params({"rank": 1.0, **knobs})).factors
    assert float((got.B @ got.A - want).abs().max()) <= 1e-12 * max(1.0, float(want.abs().max()))


def test_readme_recipe_gives_the_same_adapter_from_both_clis(patched, one_worker, tmp_path, monkeypatch):
    """README.md's recipe ("A recipe", task_arithmetic over adapter directories, rank 16), as is."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## A recipe", 1)[1]
    text = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "merge_method: task_arithmetic" in text and "rank: 16" in text
    (tmp_path / "readme.yml").write_text(text)
    monkeypatch.chdir(REPO)  # its adapter paths are relative to the repository
    mergekit_yaml(tmp_path / "readme.yml", tmp_path / "mk")
    cli = our_cli(tmp_path / "readme.yml", tmp_path / "cli")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "mk" / name).read_bytes() == (cli / name).read_bytes(), name


def test_parameters_mergekit_takes_without_effect_are_accepted(patched, one_worker, tiny, tmp_path):
    plain = our_cli(recipe(tiny, tmp_path / "plain.yml", "task_arithmetic", lora=False), tmp_path / "plain")
    extra = recipe(tiny, tmp_path / "extra.yml", "task_arithmetic", lora=False, int8_mask=True, rescale=True,
                   density=0.3, normalize=False)
    mergekit_yaml(extra, tmp_path / "extra")
    assert (tmp_path / "extra" / "adapter_model.safetensors").read_bytes() == \
        (plain / "adapter_model.safetensors").read_bytes()
    ties_plain = our_cli(recipe(tiny, tmp_path / "t.yml", "ties", lora=False), tmp_path / "t")
    mergekit_yaml(recipe(tiny, tmp_path / "t8.yml", "ties", lora=False, int8_mask=True), tmp_path / "t8")
    assert (tmp_path / "t8" / "adapter_model.safetensors").read_bytes() == \
        (ties_plain / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("method, extra, message", [
    ("ties", {"rank": None}, "set `rank`"),
    ("linear", {"lambda": 0.5}, "mergekit's 'linear' has no lambda"),
    ("linear", {"normalize": False}, "rescales the base model itself"),
    ("ties", {"densty": 0.5}, "did you mean 'density'?"),
])
def test_what_we_cannot_honour_is_one_line_in_both_clis(patched, tiny, tmp_path, method, extra, message):
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main as mk

    from lowrank_methods.cli import main as ours

    path = recipe(tiny, tmp_path / "r.yml", method, lora=False, **extra)
    for cli, args in ((mk, [str(path), str(tmp_path / "mk")]), (ours, ["merge", str(path), str(tmp_path / "cli")])):
        got = CliRunner().invoke(cli, args)
        lines = got.output.strip().splitlines()
        assert got.exit_code == 1 and len(lines) == 1 and message in lines[0], got.output
    assert not (tmp_path / "mk").exists() and not (tmp_path / "cli").exists()


def test_per_model_density_is_refused_with_the_fix(patched, tiny, tmp_path):
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main as mk

    import yaml

    path = recipe(tiny, tmp_path / "r.yml", "ties", lora=False)
    body = yaml.safe_load(path.read_text())
    body["models"][0]["parameters"]["density"] = 0.4
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    got = CliRunner().invoke(mk, [str(path), str(tmp_path / "mk")])
    assert got.exit_code == 1 and "top-level `parameters:`" in got.output


# -- (3) what stays mergekit's ---------------------------------------------------------------------------------
def _config(text: str):
    import yaml
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(yaml.safe_load(text))


def test_routing_rule(patched, tiny):
    """Only recipes whose every model is a bare adapter directory are routed; base+lora and mixes stay mergekit's."""
    from lowrank_methods.core.errors import MergeError
    from lowrank_methods.mergekit_plugin.route import check

    base, a, b = tiny / "base", tiny / "a", tiny / "b"
    for method in RECIPES:
        rank = "\nparameters: {rank: 4}" if method == "ties" else ""
        routed = check(_config(f"merge_method: {method}\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]"
                               f"{rank}"))
        assert routed.method.name == method and not routed.method.in_mergekit
        assert check(_config(f"merge_method: {method}\nbase_model: {base}\n"
                             f"models: [{{model: {base}+{a}}}, {{model: {base}+{b}}}]")) is None
        with pytest.raises(MergeError, match="is a LoRA adapter"):
            check(_config(f"merge_method: {method}\nbase_model: {base}\nmodels: [{{model: {base}+{a}}}, {{model: {b}}}]"))
    with pytest.raises(MergeError, match="is a LoRA adapter"):  # other mergekit methods still need base+adapter
        check(_config(f"merge_method: dare_ties\nbase_model: {base}\nmodels: [{{model: {a}}}]"))


@pytest.mark.parametrize("method", list(RECIPES))
def test_full_model_recipes_stay_mergekit(patched, tiny, tmp_path, method):
    """A full-model recipe of these names: the plugin's mergekit-yaml writes exactly what mergekit itself writes."""
    import yaml
    from mergekit.options import MergeOptions
    from safetensors.torch import save_file

    from lowrank_methods.mergekit_plugin.swap import original
    from lowrank_methods.mergekit_plugin.route import check

    import shutil

    w0 = model_weights(tiny / "base")
    models = []
    for i, scale in enumerate((0.01, -0.02)):
        d = tmp_path / f"ft{i}"
        shutil.copytree(tiny / "base", d)
        g = torch.Generator().manual_seed(10 + i)
        save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in w0.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        models.append({"model": str(d), "parameters": {"weight": 0.7 - 0.3 * i}})
    body = {"merge_method": method, "models": models, "dtype": "float32",
            "parameters": {"lambda": 0.8} if method == "task_arithmetic" else {"density": 0.5} if method == "ties" else {}}
    if method != "linear":
        body["base_model"] = str(tiny / "base")
    text = yaml.safe_dump(body, sort_keys=False)
    (tmp_path / "r.yml").write_text(text)
    assert check(_config(text), text) is None
    mergekit_yaml(tmp_path / "r.yml", tmp_path / "plugin")
    original(patched, "run_merge")(_config(text), str(tmp_path / "stock"),
                                   MergeOptions(quiet=True, write_model_card=False), config_source=text)
    got, want = model_weights(tmp_path / "plugin"), model_weights(tmp_path / "stock")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(p.name for p in (tmp_path / "plugin").iterdir()) == sorted(p.name for p in (tmp_path / "stock").iterdir())
