"""The mergekit bridge in-process: the direct LoRA loader, the recipe checks, the routing, and the patched code.

The installed plugin (start-up hook, stock ``mergekit-yaml`` in fresh venvs) is tested in test_mergekit_install.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import dense_delta, merged_delta, write_adapter, write_recipe


class DictLoader:
    """The part of mergekit's LazyTensorLoader that DirectLoraLoader uses, over an in-memory state dict."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.index = type("Index", (), {"tensor_paths": {k: "model.safetensors" for k in tensors}})()
        self.flushed = False

    def get_tensor(self, key, device="cpu", aliases=None, raise_on_missing=True):
        if key not in self.tensors:
            if raise_on_missing:
                raise KeyError(key)
            return None
        return self.tensors[key].clone().to(device)

    def flush(self):
        self.flushed = True


def _direct(path, base):
    from lowrank_methods.formats.peft import AdapterSource
    from lowrank_methods.mergekit_plugin.loader import DirectLoraLoader

    return DirectLoraLoader(DictLoader(base), AdapterSource.open(path))


def test_direct_loader_is_base_plus_scaled_product(tmp):
    g = torch.Generator().manual_seed(1)
    base = {"model.q.weight": torch.randn(6, 5, generator=g), "model.k.weight": torch.randn(6, 5, generator=g),
            "model.embed.weight": torch.randn(11, 4, generator=g), "model.norm.weight": torch.randn(5, generator=g),
            "lm_head.weight": torch.randn(11, 4, generator=g)}
    head = torch.randn(11, 4, generator=g)
    path = write_adapter(tmp / "a", {"model.q": (6, 5)}, r=3, alpha=5, rslora=True, rank_pattern={"q": 2},
                         embeddings={"model.embed": (11, 4)}, seed=3,
                         extra_tensors={"base_model.model.lm_head.weight": head})
    loader = _direct(path, base)
    for key in ("model.q.weight", "model.embed.weight"):  # float64 reference from the adapter's own files
        want = base[key].double() + dense_delta(path, key.removesuffix(".weight"))
        assert torch.allclose(loader.get_tensor(key).double(), want, atol=1e-5, rtol=1e-6)  # float32 rounding
    assert torch.equal(loader.get_tensor("model.k.weight"), base["model.k.weight"])  # untargeted: the base itself
    assert torch.equal(loader.get_tensor("model.norm.weight"), base["model.norm.weight"])
    assert torch.equal(loader.get_tensor("lm_head.weight"), head)  # modules_to_save: the adapter's copy
    assert loader.get_tensor("missing.weight", raise_on_missing=False) is None
    assert loader.index.tensor_paths is loader.base.index.tensor_paths
    loader.flush()
    assert loader.base.flushed


def test_direct_loader_rounds_like_peft_merge(tmp):
    """Bit-identical to PEFT's merge: W += transpose(B @ A) * scaling, half factors multiplied in float32."""
    g = torch.Generator().manual_seed(2)
    base = {"m.w.weight": torch.randn(7, 9, generator=g).to(torch.bfloat16)}
    path = write_adapter(tmp / "a", {"m.w": (9, 7)}, r=4, alpha=6, fan_in_fan_out=True, dtype=torch.bfloat16)
    from safetensors.torch import load_file

    t = load_file(str(path / "adapter_model.safetensors"))
    A, B = t["base_model.model.m.w.lora_A.weight"].float(), t["base_model.model.m.w.lora_B.weight"].float()
    w = base["m.w.weight"].clone()
    w += (B @ A).T * (6 / 4)  # PEFT: base_layer.weight.data += delta_weight
    got = _direct(path, base).get_tensor("m.w.weight")
    assert got.dtype == torch.bfloat16 and torch.equal(got, w)


def test_direct_loader_refuses_a_different_base(tmp):
    path = write_adapter(tmp / "a", {"m.w": (4, 3)})
    with pytest.raises(RuntimeError, match="different base model"):
        _direct(path, {"m.w.weight": torch.zeros(5, 3)}).get_tensor("m.w.weight")


def test_hook_acts_after_the_module_and_survives_plugin_failures(tmp, monkeypatch):
    """The start-up hook's finder: the action runs once the watched module has executed; a failing plugin warns."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "_hook_under_test", Path(__file__).resolve().parents[1] / "mergekit_hook" / "_lowrank_methods_hook.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    (tmp / "fakemk").mkdir()
    (tmp / "fakemk" / "__init__.py").write_text("")
    (tmp / "fakemk" / "methods.py").write_text("READY = True\n")
    monkeypatch.syspath_prepend(str(tmp))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    seen = []

    class Plugin:
        @staticmethod
        def register():
            seen.append(sys.modules["fakemk.methods"].READY)
            raise RuntimeError("plugin is broken")

    import lowrank_methods  # noqa: F401  (the parent of the stub below)

    monkeypatch.setitem(sys.modules, "lowrank_methods.mergekit_plugin", Plugin)
    hook._Finder.pending = {"fakemk.methods": "register"}
    hook.install()
    hook.install()  # idempotent
    assert sys.meta_path.count(hook._Finder) == 1
    with pytest.warns(UserWarning, match="plugin is broken"):
        import fakemk.methods
    assert fakemk.methods.READY and seen == [True]  # the module imported fine; the action saw it complete
    assert hook._Finder not in sys.meta_path  # one-shot
    sys.modules.pop("fakemk.methods")
    sys.modules.pop("fakemk")


# -- with mergekit imported ------------------------------------------------------------------------------
def test_patched_mergekit_code_is_the_code_the_patches_replace(patched):
    """Fails when mergekit's internals change under the patches (source hashes of mergekit 0.1.5)."""
    from mergekit.io.tasks import LoaderCache

    from lowrank_methods.mergekit_plugin import patches, route

    assert patches.stale_patches() == []
    assert patched.run_merge is route.run_merge
    assert LoaderCache.get is patches._loader_cache_get
    assert patched._get_donor_model is patches._get_donor_model


def test_every_in_mergekit_method_is_registered(patched):
    from mergekit.merge_methods import registered_methods

    from lowrank_methods.core.method import list_methods

    names = {m.spec.name for m in registered_methods()}
    ours = {m.name for m in list_methods() if m.in_mergekit}
    assert ours and ours <= names
    assert "lore" in names
    mergekit_ta = next(m for m in registered_methods() if m.spec.name == "task_arithmetic")
    assert mergekit_ta.spec.pretty_name != "Merge-then-Compress"  # mergekit's own, not our alias


def _config(text):
    import yaml
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(yaml.safe_load(text))


@pytest.mark.parametrize("text, message", [
    ("merge_method: ctmm\nmodels: [{model: /nowhere/base+/nowhere/a}]", "unknown merge_method 'ctmm'; did you mean 'ctm'?"),
    ("merge_method: ctm\nmodels: [{model: /nowhere/a}]\nparameters: {rank: -2}", "bad parameters for method 'ctm'"),
    ("merge_method: ctm\nmodels: [{model: /nowhere/a}]\nparameters: {rnk: 2}", "rnk"),
    ("merge_method: ties\nbase_model: /nowhere/b\nmodels: [{model: /nowhere/b+/nowhere/a}]\nparameters: {densty: 0.5}",
     "method 'ties' has no parameter 'densty'; did you mean 'density'?"),
    ("merge_method: ties\nbase_model: /nowhere/b\nmodels: [{model: /nowhere/b+/nowhere/a, parameters: {weight: heavy}}]",
     "bad value for 'weight' of method 'ties'"),
])
def test_bad_recipe_fails_before_any_loading(patched, tmp, text, message):
    """One line, raised before mergekit reads a config (every path here is missing, so any load would fail)."""
    from mergekit.options import MergeOptions

    from lowrank_methods.core.errors import MergeError

    with pytest.raises(MergeError) as err:
        patched.run_merge(_config(text), str(tmp / "out"), MergeOptions(), config_source=text)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp / "out").exists()


def test_bare_adapter_in_a_stock_recipe_fails_with_the_fix(patched, tmp):
    from mergekit.options import MergeOptions

    from lowrank_methods.core.errors import MergeError

    a = write_adapter(tmp / "a", {"m.w": (4, 3)})  # (task_arithmetic/linear/ties run it: test_mergekit_names.py)
    text = f"merge_method: dare_ties\nbase_model: /nowhere/b\nmodels: [{{model: {a}}}]"
    with pytest.raises(MergeError, match=f"is a LoRA adapter; .* write it as /nowhere/b\\+{a}"):
        patched.run_merge(_config(text), str(tmp / "out"), MergeOptions(), config_source=text)


def test_unknown_but_harmless_stock_parameters_pass(patched):
    """mergekit ignores parameters its method does not take (community recipes carry e.g. int8_mask everywhere)."""
    from lowrank_methods.mergekit_plugin.route import check

    text = "merge_method: slerp\nbase_model: /nowhere/b\nmodels: [{model: /nowhere/a}]\nparameters: {t: 0.5, int8_mask: true}"
    assert check(_config(text), text) is None


def test_device_reaches_the_engine(patched, tmp, monkeypatch):
    """--cuda / --device: the engine computes on options.device (no GPU needed to see it passed)."""
    from mergekit.options import MergeOptions

    import lowrank_methods.pipeline.engine as engine

    seen = {}
    monkeypatch.setattr(engine, "run_merge", lambda recipe, out, **kw: seen.update(kw, method=recipe.method.name))
    a = write_adapter(tmp / "a", {"model.layers.0.mlp.up_proj": (8, 6)})
    text = write_recipe(tmp / "r.yml", "ctm", [(a, None)], {"rank": 2}).read_text()
    patched.run_merge(_config(text), str(tmp / "out"), MergeOptions(cuda=True), config_source=text)
    assert seen["device"] == "cuda" and seen["method"] == "ctm"
    patched.run_merge(_config(text), str(tmp / "out"), MergeOptions(device="cpu", quiet=True), config_source=text)
    assert seen["device"] == "cpu" and seen["quiet"] is True


def same_adapter_from_both_clis(recipe, tmp):
    """`mergekit-yaml recipe tmp/mk` and `mergekit-lowrank merge recipe tmp/cli` (in-process) write the same
    adapter bytes; returns the click runner."""
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from lowrank_methods.cli import main as ours

    runner = CliRunner()
    got = runner.invoke(mergekit_yaml, [str(recipe), str(tmp / "mk"), "--no-write-model-card", "--quiet"])
    assert got.exit_code == 0, got.output
    assert runner.invoke(ours, ["merge", str(recipe), str(tmp / "cli"), "--quiet"]).exit_code == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp / "mk" / name).read_bytes() == (tmp / "cli" / name).read_bytes()
    return runner


def test_mergekit_yaml_adapter_output_equals_our_cli(patched, tmp):
    """The stock command's click entry point, in-process: same adapter bytes as `mergekit-lowrank merge`."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    mods = {f"model.layers.{i}.self_attn.q_proj": (8, 8) for i in range(2)}
    a = write_adapter(tmp / "a", mods, seed=1)
    b = write_adapter(tmp / "b", {**mods, "model.layers.1.mlp.down_proj": (8, 12)}, r=2, seed=2)
    recipe = write_recipe(tmp / "r.yml", "ctm", [(a, 0.6), (b, None)], {"rank": 3, "lambda": [0.5, 1.0]})
    runner = same_adapter_from_both_clis(recipe, tmp)
    bad = runner.invoke(mergekit_yaml, [str(write_recipe(tmp / "bad.yml", "ctmm", [(a, None)])), str(tmp / "x")])
    assert bad.exit_code == 1 and bad.output.strip().splitlines() == [
        "Error: unknown merge_method 'ctmm'; did you mean 'ctm'?"]


def test_mergekit_yaml_takes_a_rank_budget(patched, tmp):
    """`rank_budget` through the stock command: the same adapter as our CLI, with ranks spread over modules."""
    import json

    mods = {f"model.layers.{i}.self_attn.q_proj": (12, 10) for i in range(2)} | {"model.layers.0.mlp.down_proj": (10, 30)}
    adapters = [(write_adapter(tmp / f"a{i}", mods, r=3, seed=i), None) for i in range(3)]
    same_adapter_from_both_clis(write_recipe(tmp / "r.yml", "task_arithmetic", adapters, {"rank_budget": 3}), tmp)
    config = json.loads((tmp / "mk" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]


def test_mergekit_yaml_takes_serve_for(patched, tmp):
    """`serve_for` through the stock command: the same adapter as our CLI, one rank everywhere, scale 1."""
    import json

    mods = {f"model.layers.{i}.self_attn.{p}_proj": (12, 10) for i in range(2) for p in "qv"} | {
        "model.layers.0.mlp.down_proj": (10, 30)}
    adapters = [(write_adapter(tmp / f"a{i}", mods, r=3, seed=i), None) for i in range(3)]
    recipe = write_recipe(tmp / "r.yml", "task_arithmetic", adapters, {"rank_budget": 3, "serve_for": "sglang"})
    same_adapter_from_both_clis(recipe, tmp)
    config = json.loads((tmp / "mk" / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    ranks = {t.shape[0] for k, t in load_file(str(tmp / "mk" / "adapter_model.safetensors")).items() if "lora_A" in k}
    assert not config["rank_pattern"] and ranks == {config["r"]} and config["lora_alpha"] == config["r"]


@pytest.mark.gpu
def test_cuda_device_merges_on_gpu(patched, tmp):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mergekit.options import MergeOptions

    a = write_adapter(tmp / "a", {"model.layers.0.mlp.up_proj": (16, 12)}, seed=1)
    b = write_adapter(tmp / "b", {"model.layers.0.mlp.up_proj": (16, 12)}, seed=2)
    text = write_recipe(tmp / "r.yml", "ctm", [(a, None), (b, None)], {"rank": 4}).read_text()
    for device, out in (("cuda", "gpu"), ("cpu", "cpu")):
        report = patched.run_merge(_config(text), str(tmp / out), MergeOptions(device=device, quiet=True),
                                   config_source=text)
        assert report.device.startswith(device)
    name = "model.layers.0.mlp.up_proj"
    gpu, cpu = merged_delta(tmp / "gpu", name), merged_delta(tmp / "cpu", name)
    assert torch.allclose(gpu, cpu, atol=1e-5 * math.sqrt(cpu.numel()) * cpu.abs().max().item(), rtol=0)
