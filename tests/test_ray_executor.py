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
