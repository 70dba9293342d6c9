"""The installed plugin: the real ``mergekit-yaml`` in fresh venvs (normal and editable installs) over a tiny Llama.

Each venv is built once per module (``--system-site-packages --without-pip``; the package is installed with the
test process's pip, ``--no-deps --no-build-isolation --no-index``, so hatchling, and editables for the editable
install, must be importable). The ``mergekit-yaml`` run is the console script of the test interpreter's mergekit,
executed by the venv's python.
Each run costs a mergekit import (~15 s on 2 cores), so only the normal install's core checks run by default.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import merged_delta, model_weights, tiny_llama, write_adapter, write_recipe

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_YAML = Path(sysconfig.get_path("scripts")) / "mergekit-yaml"
MODULES = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
SHAPES = {"q_proj": (64, 64), "v_proj": (64, 64), "down_proj": (64, 128)}
HOOK_FILES = ("_lowrank_methods_hook.py", "mergekit_lowrank.pth", "mergekit_lowrank.start")

pytestmark = pytest.mark.skipif(not MERGEKIT_YAML.is_file(), reason="mergekit-yaml is not installed beside this python")
pytest.importorskip("hatchling", reason="building the package needs hatchling (pip install hatchling editables)")


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama base (hidden 64, 2 layers) and two PEFT adapters on it (ranks 4 and 2, different modules)."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama(hidden=64, heads=4, vocab=128).save_pretrained(root / "base")

    def shape(m):
        return SHAPES[m.rsplit(".", 1)[-1]]

    a = write_adapter(root / "lora-math", {m: shape(m) for m in MODULES if "down" not in m}, r=4, alpha=8, seed=1,
                      base=str(root / "base"))
    b = write_adapter(root / "lora-code", {m: shape(m) for m in MODULES if "v_proj" not in m}, r=2, alpha=4, seed=2,
                      rslora=True, base=str(root / "base"))
    for p in (a, b):  # small updates, as trained adapters have
        t = load_file(str(p / "adapter_model.safetensors"))
        save_file({k: v * 0.05 for k, v in t.items()}, str(p / "adapter_model.safetensors"), metadata={"format": "pt"})
    return root


def ctm_recipe(tiny: Path, path: Path, output: str | None = None) -> Path:
    """ctm with mergekit's parameter forms: per-model weight, a gradient over layers and a filter."""
    params = {"rank": 4, "lambda": [0.5, 1.0], "beta": [{"filter": "mlp", "value": 0.5}, {"value": 0.25}]}
    if output:
        params["output"] = output
    base = tiny / "base"
    return write_recipe(path, "ctm", [(Path(f"{base}+{tiny / 'lora-math'}"), 0.7), (tiny / "lora-code", None)], params,
                        base_model=str(base), dtype="float32")


def _make_venv(root: Path, editable: bool) -> Path:
    # This interpreter's packages are put on the new venv's path by a plain .pth listing, not as site dirs, so
    # their own .pth files (this package's hook, where it is installed here too) are not run there: after an
    # uninstall from the venv, no copy of the plugin may remain active.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = root / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_parent_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-build-isolation",
               "--no-index", *(["-e"] if editable else []), str(REPO)]
    proc = subprocess.run(install, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return py


def _site_packages(py: Path) -> Path:
    return Path(run(py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    return _make_venv(tmp_path_factory.mktemp("venv") / "normal", editable=False)


@pytest.fixture(scope="module")
def editable_venv(tmp_path_factory):
    pytest.importorskip("editables", reason="hatchling's editable wheels need the editables package")
    return _make_venv(tmp_path_factory.mktemp("venv") / "editable", editable=True)


def run(py: Path, *args, tmpdir: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    cwd = tmpdir or Path(sysconfig.get_path("stdlib"))  # never the repo: the package must come from the venv
    proc = subprocess.run([str(py), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def mergekit_yaml(py: Path, recipe: Path, out: Path, *options, tmpdir: Path | None = None, check: bool = True):
    return run(py, MERGEKIT_YAML, recipe, out, "--quiet", *options, tmpdir=tmpdir, check=check)


def our_cli(recipe: Path, out: Path) -> Path:
    from click.testing import CliRunner

    from lowrank_methods.cli import main

    got = CliRunner().invoke(main, ["merge", str(recipe), str(out), "--quiet"])
    assert got.exit_code == 0, got.output
    return out


# -- the normal install (default run) -------------------------------------------------------------------------
def test_startup_imports_neither_torch_nor_mergekit(venv):
    assert all((_site_packages(venv) / f).is_file() for f in HOOK_FILES)
    proc = run(venv, "-X", "importtime", "-c", "pass")
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "_lowrank_methods_hook" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "mergekit", "lowrank_methods", "transformers"))
    assert heavy == []


def test_mergekit_yaml_ctm_adapter_equals_our_cli_and_loads_in_peft(venv, tiny, tmp_path):
    recipe = ctm_recipe(tiny, tmp_path / "ctm.yml")
    out = tmp_path / "out"
    mergekit_yaml(venv, recipe, out, tmpdir=tmp_path)
    cli = our_cli(recipe, tmp_path / "cli")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (cli / name).read_bytes()
    assert (out / "README.md").is_file() and (out / "merge_report.json").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = model_weights(tiny / "base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "base"), out).merge_and_unload()
    merged = model.state_dict()
    for module in MODULES:
        want = base[f"{module}.weight"].double() + merged_delta(out, module)
        assert torch.allclose(merged[f"{module}.weight"].double(), want, atol=1e-6, rtol=0)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])


def test_mergekit_yaml_ctm_full_model_without_materialising_anything(venv, tiny, tmp_path):
    """output: model = W0 + ΔW* (ΔW* = the adapter output of the same recipe); no base-sized copy anywhere."""
    adapter = our_cli(ctm_recipe(tiny, tmp_path / "a.yml"), tmp_path / "adapter")
    scratch, cache, out = tmp_path / "tmp", tmp_path / "lora-cache", tmp_path / "model"
    scratch.mkdir()
    mergekit_yaml(venv, ctm_recipe(tiny, tmp_path / "m.yml", output="model"), out, "--lora-merge-cache", cache,
                  "--out-shard-size", "100K", tmpdir=scratch)
    assert not cache.exists() and list(scratch.iterdir()) == []
    base_size = (tiny / "base" / "model.safetensors").stat().st_size
    big = [p.parent for p in tmp_path.rglob("*.safetensors") if p.stat().st_size >= base_size / 4 and p.parent != out]
    assert big == []
    assert len(list(out.glob("*.safetensors"))) > 1  # mergekit's writer honoured --out-shard-size
    assert {"config.json", "README.md", "mergekit_config.yml", "merge_report.json"} <= {p.name for p in out.iterdir()}

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).state_dict()
    base = model_weights(tiny / "base")
    for name, w0 in base.items():
        module = name.removesuffix(".weight")
        delta = merged_delta(adapter, module) if module in MODULES else 0
        assert torch.allclose(loaded[name], w0.double() + delta, atol=1e-6, rtol=0), name


# -- more runs of the stock command (slow: one mergekit import each) -----------------------------------------
@pytest.mark.slow
def test_stock_task_arithmetic_over_base_plus_lora_equals_our_task_arithmetic(venv, tiny, tmp_path):
    """mergekit's own task_arithmetic, fed by the direct loader (no --lora-merge-cache: stock mergekit would
    refuse), equals W0 + our factor-space task_arithmetic adapter of the same recipe."""
    base = tiny / "base"
    refs = [(Path(f"{base}+{tiny / 'lora-math'}"), 0.7), (Path(f"{base}+{tiny / 'lora-code'}"), 0.3)]
    recipe = write_recipe(tmp_path / "ta.yml", "task_arithmetic", refs, {"lambda": 1.5}, base_model=str(base),
                          dtype="float32")
    mergekit_yaml(venv, recipe, tmp_path / "model", tmpdir=tmp_path)
    adapter = our_cli(recipe, tmp_path / "adapter")
    got, w0 = model_weights(tmp_path / "model"), model_weights(base)
    for name in w0:
        module = name.removesuffix(".weight")
        delta = merged_delta(adapter, module) if module in MODULES else 0
        assert torch.allclose(got[name].double(), w0[name].double() + delta, atol=1e-6, rtol=0), name


@pytest.mark.slow
def test_stock_ties_equals_cache_route_and_uninstall_leaves_mergekit_working(venv, tiny, tmp_path):
    base = tiny / "base"
    refs = [(Path(f"{base}+{tiny / 'lora-math'}"), 1.0), (Path(f"{base}+{tiny / 'lora-code'}"), 0.5)]
    recipe = write_recipe(tmp_path / "ties.yml", "ties", refs, {"density": 0.5}, base_model=str(base), dtype="float32")
    mergekit_yaml(venv, recipe, tmp_path / "direct", tmpdir=tmp_path)

    site_packages = _site_packages(venv)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv), "uninstall", "-y", "-q", "mergekit-lowrank"],
                   check=True, capture_output=True)
    assert not any((site_packages / f).exists() for f in HOOK_FILES)
    assert "Need to specify cache dir" in mergekit_yaml(venv, recipe, tmp_path / "x", tmpdir=tmp_path, check=False).stderr
    mergekit_yaml(venv, recipe, tmp_path / "cached", "--lora-merge-cache", tmp_path / "cache", tmpdir=tmp_path)
    direct, cached = model_weights(tmp_path / "direct"), model_weights(tmp_path / "cached")
    assert direct.keys() == cached.keys()
    assert all(torch.equal(direct[k], cached[k]) for k in direct)  # bit for bit


@pytest.mark.slow
def test_editable_install_runs_our_methods(editable_venv, tiny, tmp_path):
    assert all((_site_packages(editable_venv) / f).is_file() for f in HOOK_FILES)
    imported = run(editable_venv, "-X", "importtime", "-c", "pass").stderr
    assert "_lowrank_methods_hook" in imported and "| torch" not in imported and "| mergekit" not in imported
    recipe = ctm_recipe(tiny, tmp_path / "ctm.yml")
    run(editable_venv, "-m", "mergekit.scripts.run_yaml", recipe, tmp_path / "out", "--quiet", tmpdir=tmp_path)
    where = run(editable_venv, "-c", "import lowrank_methods, sys; print(lowrank_methods.__file__)", tmpdir=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(REPO)  # the working tree itself, not a copy
    cli = our_cli(recipe, tmp_path / "cli")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (cli / "adapter_model.safetensors").read_bytes()
