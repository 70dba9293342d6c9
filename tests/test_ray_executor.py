"""``--executor ray``: modules merged by Ray workers on a local cluster (2 CPUs) write the same bytes as the local
executor; a worker's error comes back as the same one line."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from helpers import listing, write_adapter, write_recipe
from lowrank_methods.cli import main as cli

ray = pytest.importorskip("ray")

MODULES = {f"model.layers.{i}.{name}": shape for i in range(3) for name, shape in
           (("self_attn.q_proj", (24, 16)), ("self_attn.v_proj", (8, 16)), ("mlp.down_proj", (16, 40)))}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("method, params", [("ctm", {"rank": 3, "rule": "ties", "density": 0.5}),
                                            ("knots", {"rule": "dare_ties", "seed": 3}),
                                            ("tsv", {"lambda": [0.5, 1.0], "rank_budget": 3})])
def test_ray_writes_the_same_bytes_as_local_threads(tmp_path, cluster, method, params):
    adapters = [(write_adapter(tmp_path / f"a{i}", MODULES, r=2 + i, seed=i), 1.0 - 0.2 * i) for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yml", method, adapters, params)
    for executor in ("local", "ray"):
        result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / executor), "-q", "--threads", "2",
                                          "--executor", executor])
        assert result.exit_code == 0, result.output
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_a_workers_error_is_the_same_one_line(tmp_path, cluster):
    huge = {f"base_model.model.{m}.lora_B.weight": torch.full((s[0], 2), 1e30) for m, s in MODULES.items()}
    a = write_adapter(tmp_path / "a", MODULES, r=2, extra_tensors=huge)
    recipe = write_recipe(tmp_path / "r.yml", "ctm", [(a, None), (a, None)], {"rank": 2})
    before = listing(tmp_path)
    lines = {}
    for executor in ("local", "ray"):
        result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "out"), "-q", "--executor", executor])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        lines[executor] = result.output
    assert lines["ray"] == lines["local"] and "too large for the precision" in lines["ray"]
    assert listing(tmp_path) == before


@pytest.fixture(scope="module")
def full_models(tmp_path_factory):
    """A tiny Llama base and three full fine-tunes of it (helpers.full_finetunes)."""
    from helpers import full_finetunes, tiny_llama

    return full_finetunes(tmp_path_factory.mktemp("ray_full"), tiny_llama(hidden=32, heads=2, vocab=64), noise=0.002)


def _full_recipe(path, root, method, params, models=("ft0", "ft1", "ft2")):
    lines = [f"merge_method: {method}", f"base_model: {root / 'base'}", "models:"]
    lines += [f"  - model: {root / m}" for m in models]
    path.write_text("\n".join(lines + [f"parameters: {params}", "dtype: float32", ""]))
    return path


@pytest.mark.parametrize("method, params, threads", [("lore", "{tau: 0.05, iterations: 3, tol: 0}", 1),
                                                     ("lore", "{tau: 0.05, iterations: 3, tol: 0}", 2),
                                                     ("ctm", "{rank: 4, rule: ties, density: 0.5}", 1)])
def test_full_model_tensors_on_ray_write_the_same_bytes_as_mergekits_executor(tmp_path, cluster, full_models, method,
                                                                               params, threads):
    """lore, and our dense forms over full models, go through mergekit's planner; with --executor ray each tensor's
    merge is a Ray task (threads 1: two at once on the two CPUs), and the weights files are identical."""
    recipe = _full_recipe(tmp_path / "r.yml", full_models, method, params)
    for executor in ("local", "ray"):
        result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / executor), "-q", "--no-card",
                                          "--threads", str(threads), "--executor", executor])
        assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_a_nan_in_a_full_model_is_the_same_one_line_on_ray(tmp_path, cluster, full_models):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(full_models / "ft2", bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    recipe = _full_recipe(tmp_path / "r.yml", full_models, "lore", "{iterations: 2}", models=("ft0", "ft1", bad))
    before = listing(tmp_path)
    lines = {}
    for executor in ("local", "ray"):
        result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "out"), "-q", "--executor", executor])
        assert result.exit_code == 1, result.output
        lines[executor] = result.output.strip().splitlines()[-1]
    assert lines["ray"] == lines["local"]
    assert "up_proj" in lines["ray"] and "input model 3 of 3 contains NaN or Inf" in lines["ray"]
    assert listing(tmp_path) == before


def test_more_threads_than_any_ray_node_has_is_refused_not_left_waiting(tmp_path, cluster, full_models):
    recipe = _full_recipe(tmp_path / "r.yml", full_models, "lore", "{iterations: 1}")
    before = listing(tmp_path)
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "out"), "-q", "--threads", "3",
                                      "--executor", "ray"])
    assert result.exit_code == 1 and "no node of the Ray cluster has that many CPUs" in result.output, result.output
    assert listing(tmp_path) == before


def test_gpu_workers_on_a_cluster_without_gpus_are_refused(tmp_path, cluster, full_models):
    if torch.cuda.is_available():
        pytest.skip("this machine's Ray cluster has a GPU: test_gpu_workers_write_what_mergekits_gpu_run_writes runs")
    recipe = _full_recipe(tmp_path / "r.yml", full_models, "lore", "{iterations: 1}")
    before = listing(tmp_path)
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "out"), "-q", "--device", "cuda",
                                      "--executor", "ray"])
    assert result.exit_code == 1 and "the Ray cluster has no GPU" in result.output, result.output
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "out"), "-q", "--device", "cuda:1",
                                      "--executor", "ray"])
    assert result.exit_code == 1 and "use --device cpu or cuda" in result.output, result.output
    assert listing(tmp_path) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_workers_write_what_mergekits_gpu_run_writes(tmp_path, cluster, full_models):
    recipe = _full_recipe(tmp_path / "r.yml", full_models, "lore", "{tau: 0.05, iterations: 3, tol: 0}")
    for executor in ("local", "ray"):
        result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / executor), "-q", "--no-card",
                                          "--device", "cuda", "--threads", "1", "--executor", executor])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "ray" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
