"""LoRE through the stock mergekit-yaml (0.1.5): tiny full Llama models and base+LoRA refs, checked against an
independent float64 numpy implementation of the iterations (helpers.lore_reference)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import full_finetunes, lore_reference, lore_ties_reference, tiny_llama

REPO = Path(__file__).resolve().parents[1]
LLAMA = {"hidden": 64, "heads": 4, "vocab": 128}  # the tiny base model's sizes
# registers "lore" unless the plugin already did (its import hook may be installed), then runs mergekit-yaml
LAUNCHER = ("from mergekit.merge_methods import register, registered_methods; "
            "from lowrank_methods.mergekit_plugin.lore import mergekit_method; "
            "m = mergekit_method(); "
            "m.spec.name in {x.spec.name for x in registered_methods()} or register(m); "
            "from mergekit.scripts.run_yaml import main; main()")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}


def _mergekit_yaml(recipe: str, tmp: Path, *extra: str) -> Path:
    (tmp / "recipe.yml").write_text(recipe)
    out = tmp / "out"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(tmp / "recipe.yml"), str(out), "--no-write-model-card",
                           *extra], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _load_merged(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def full_models(tmp_path_factory):
    """A base and three 'full fine-tunes': base + a rank-2 task part + small noise on every tensor."""
    return full_finetunes(tmp_path_factory.mktemp("lore_full"), tiny_llama(**LLAMA), noise=0.002)


def test_mergekit_yaml_runs_lore_on_full_models(full_models, tmp_path):
    ft = [full_models / f"ft{i}" for i in range(3)]
    weights = [1.0, 2.0, 1.0]
    tau, iterations, lam = 0.05, 4, 1.5
    recipe = (f"merge_method: lore\nbase_model: {full_models / 'base'}\nmodels:\n"
              + "".join(f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in zip(ft, weights))
              + f"parameters: {{tau: {tau}, iterations: {iterations}, tol: 0, lambda: {lam}}}\ndtype: float64\n")
    merged = _load_merged(_mergekit_yaml(recipe, tmp_path))

    inputs = [_weights(p) for p in ft]
    assert set(merged) == set(inputs[0])
    p = np.asarray(weights) / sum(weights)
    ranks = []
    for name, got in merged.items():
        thetas = [x[name] for x in inputs]
        if thetas[0].ndim == 1:  # norms: weighted average
            want = sum(pi * t.numpy() for pi, t in zip(p, thetas))
        else:  # the configured base_model is not an input: LoRE estimates θ0 from the three models
            base, deltas, _ = lore_reference(thetas, tau, iterations, weights)
            want = base + lam * sum(pi * d for pi, d in zip(p, deltas))
            ranks.append([np.linalg.matrix_rank(d, tol=1e-9) for d in deltas])
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9, err_msg=name)
    assert max(max(r) for r in ranks) > 0 and min(min(r) for r in ranks) < 64  # δ's are neither 0 nor full rank


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    """A base and two PEFT LoRA adapters (r=4, alpha=8, q_proj/v_proj, random B so ΔW ≠ 0)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lore_lora")
    tiny_llama(**LLAMA).save_pretrained(root / "base")
    for i in range(2):
        torch.manual_seed(10 + i)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(tiny_llama(**LLAMA), config)
        peft_model.save_pretrained(root / f"lora{i}")
    return root


def test_mergekit_yaml_runs_lore_on_base_plus_lora_refs(lora_models, tmp_path):
    base_dir = lora_models / "base"
    loras = [lora_models / f"lora{i}" for i in range(2)]
    tau, iterations, density = 0.02, 3, 0.5
    recipe = ("merge_method: lore\nmodels:\n" + "".join(f"  - model: {base_dir}+{p}\n" for p in loras)
              + f"parameters: {{tau: {tau}, iterations: {iterations}, tol: 0, rule: ties, density: {density}}}\n"
                "dtype: float64\n")
    merged = _load_merged(_mergekit_yaml(recipe, tmp_path, "--lora-merge-cache", str(tmp_path / "cache")))

    base = _weights(base_dir)
    thetas_by_name = {k: [w.clone() for _ in loras] for k, w in base.items()}
    for i, lora in enumerate(loras):  # θ_i = W0 + (alpha/r)·B@A, from the adapter files
        cfg = json.loads((lora / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        tensors = {k: v.double() for k, v in load_file(str(lora / "adapter_model.safetensors")).items()}
        for key, A in tensors.items():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                B = tensors[key.replace(".lora_A.", ".lora_B.")]
                thetas_by_name[module + ".weight"][i] += scale * B @ A
    adapted = [k for k in base if "q_proj" in k or "v_proj" in k]
    assert len(adapted) == 4
    for name, got in merged.items():
        if name not in adapted:  # every input equals the base: δ = 0, θ0 = W0
            torch.testing.assert_close(got, base[name], rtol=0, atol=1e-7, msg=name)
            continue
        b, deltas, _ = lore_reference(thetas_by_name[name], tau, iterations)
        want = b + lore_ties_reference([torch.from_numpy(d) for d in deltas], density)
        # the merge cache holds θ_i in float32 (PEFT merge_and_unload), so agreement is to float32 rounding
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6, err_msg=name)
        assert not np.allclose(want, base[name].numpy(), atol=1e-4)


@pytest.mark.gpu
def test_kernel_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lowrank_methods.core.methods.lore import lore_merge

    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(256, 192, generator=g, dtype=torch.float64) for _ in range(3)]
    cpu = lore_merge(thetas, tau=5.0, iterations=5, tol=0)
    gpu = lore_merge([t.cuda() for t in thetas], tau=5.0, iterations=5, tol=0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-9)


def test_mergekit_lowrank_merge_runs_lore_like_mergekit_yaml(full_models, tmp_path, patched):
    """`mergekit-lowrank merge` and `validate` take lore recipes; the output equals mergekit-yaml's, and is ours
    (marker), so a second run needs --overwrite."""
    from click.testing import CliRunner

    from lowrank_methods.cli import main

    ft = [full_models / f"ft{i}" for i in range(2)]
    recipe = (f"merge_method: lore\nmodels:\n" + "".join(f"  - model: {p}\n" for p in ft)
              + "parameters: {tau: 0.05, iterations: 2}\ndtype: float64\n")
    path = tmp_path / "r.yml"
    path.write_text(recipe)
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(path)])
    assert ok.exit_code == 0 and ok.output.startswith("ok: lore over 2 full models"), ok.output
    done = runner.invoke(main, ["merge", str(path), str(tmp_path / "ours"), "--quiet", "--no-card"])
    assert done.exit_code == 0, done.output
    theirs = _load_merged(_mergekit_yaml(recipe, tmp_path))
    for name, got in _load_merged(tmp_path / "ours").items():
        torch.testing.assert_close(got, theirs[name], rtol=0, atol=0)
    again = runner.invoke(main, ["merge", str(path), str(tmp_path / "ours"), "--quiet"])
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    bad = runner.invoke(main, ["validate", str(tmp_path / "bad.yml")]) if (tmp_path / "bad.yml").write_text(
        recipe.replace("tau: 0.05", "tua: 0.05")) else None
    assert bad.exit_code == 1 and "did you mean 'tau'" in bad.stderr, bad.output
