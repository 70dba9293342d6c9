"""--threads: modules merged in parallel, one intra-op thread each, results written in plan order.

The output may not depend on the thread count (byte for byte), the default is the cores this process may run on,
errors are one line, and torch's own thread setting is restored afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time

import pytest
import torch
from click.testing import CliRunner

from helpers import write_adapter, write_recipe
from lowrank_methods.cli import main

MODULES = {f"model.layers.{i}.{name}": shape for i in range(3)
           for name, shape in (("self_attn.q_proj", (24, 16)), ("self_attn.v_proj", (8, 16)), ("mlp.down_proj", (16, 40)))}
METHODS = [  # every family: exact, SVD of the sum, Tucker/HOOI, core space, rules with per-module randomness
    ("cat", {}),
    ("mtc", {"rank": 3, "rule": "dare_ties", "density": 0.5, "drop_rate": 0.3}),
    ("ctm", {"rank": 3}),
    ("core_space", {}),
    ("knots", {"rank": 5}),
    ("tsv", {}),
    ("iso_cts", {"rank": 6}),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    some = {k: v for k, v in MODULES.items() if "v_proj" not in k}  # one adapter lacks a module kind
    return [(write_adapter(root / "a", MODULES, r=4, alpha=8, seed=1), 0.7),
            (write_adapter(root / "b", MODULES, r=3, alpha=3, seed=2, rslora=True), 1.0),
            (write_adapter(root / "c", some, r=2, alpha=4, seed=3), None)]


def merge(recipe, out, *extra) -> object:
    return CliRunner().invoke(main, ["merge", str(recipe), str(out), "--quiet", "--no-card", *extra])


@pytest.mark.parametrize("method, params", METHODS, ids=[m for m, _ in METHODS])
def test_output_is_byte_identical_across_thread_counts(tmp_path, adapters, method, params):
    recipe = write_recipe(tmp_path / "r.yml", method, adapters, params or None)
    outputs = {}
    for n in (1, 2, 3):
        got = merge(recipe, tmp_path / f"t{n}", "--threads", str(n))
        assert got.exit_code == 0, got.output
        outputs[n] = [(tmp_path / f"t{n}" / name).read_bytes() for name in ("adapter_model.safetensors",
                                                                            "adapter_config.json")]
    assert outputs[1] == outputs[2] == outputs[3]
    stats = [json.loads((tmp_path / f"t{n}" / "merge_report.json").read_text())["modules"] for n in (1, 2, 3)]
    assert stats[0] == stats[1] == stats[2] and list(stats[0]) == sorted(MODULES, key=_natural)


def _natural(name):
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def test_default_is_the_affinity_mask_not_the_machine(monkeypatch):
    import lowrank_methods.pipeline.threads as threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 2, 5})
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    assert threads.check_threads(None) == 3
    assert threads.plan_threads(None, torch.device("cpu")) == threads.ThreadPlan(workers=3, intra_op=1)
    monkeypatch.delattr(threads.os, "sched_getaffinity")  # not Linux: the machine's count
    assert threads.available_cores() == 64


def test_cli_default_uses_the_available_cores(tmp_path, adapters, monkeypatch):
    import lowrank_methods.pipeline.threads as threads

    plans = []
    plan = threads.plan_threads
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {1, 3})
    monkeypatch.setattr(threads, "plan_threads", lambda n, dev: plans.append(plan(n, dev)) or plans[-1])
    recipe = write_recipe(tmp_path / "r.yml", "cat", adapters)
    assert merge(recipe, tmp_path / "out").exit_code == 0
    assert merge(recipe, tmp_path / "out3", "--threads", "3").exit_code == 0
    assert [p.workers for p in plans] == [2, 3]


@pytest.mark.parametrize("value", ["0", "-1", "-8"])
def test_zero_or_negative_threads_is_a_one_line_error(tmp_path, adapters, value):
    recipe = write_recipe(tmp_path / "r.yml", "cat", adapters)
    got = merge(recipe, tmp_path / "out", "--threads", value)
    assert got.exit_code == 1
    assert got.output.strip().splitlines() == [
        f"error: the thread count must be a whole number ≥ 1 (got {value}): it is how many modules are merged at once"]
    assert not (tmp_path / "out").exists()


def test_each_module_runs_single_threaded_and_torch_is_restored(tmp_path, adapters, monkeypatch):
    """Inside a merge every module sees one intra-op thread, several modules run at once, never more than
    --threads; afterwards torch's thread count is what it was."""
    from lowrank_methods.core import method as registry

    registry._load()
    seen, lock, running = [], threading.Lock(), [0, 0]  # running: now, most at once
    cat = registry._METHODS["cat"]

    def spy(factors, weights, params, ctx):
        with lock:
            running[0] += 1
            running[1] = max(running)
        time.sleep(0.05)  # long enough for the modules to overlap
        seen.append((torch.get_num_threads(), threading.current_thread().name))
        with lock:
            running[0] -= 1
        return cat.fn(factors, weights, params, ctx)

    monkeypatch.setitem(registry._METHODS, "cat", dataclasses.replace(cat, fn=spy))
    before = torch.get_num_threads()
    recipe = write_recipe(tmp_path / "r.yml", "cat", adapters)
    got = merge(recipe, tmp_path / "out", "--threads", "2")
    assert got.exit_code == 0, got.output
    assert len(seen) == len(MODULES) and {n for n, _ in seen} == {1}
    assert len({name for _, name in seen}) == 2 and running[1] == 2
    assert torch.get_num_threads() == before


def test_results_come_in_plan_order_with_bounded_lookahead():
    """_merged: any completion order, yielded in input order; at most workers + 1 submitted and not yielded."""
    from lowrank_methods.pipeline.engine import _merged

    modules = [f"m{i}" for i in range(20)]
    state = {"computed": 0, "yielded": 0, "ahead": 0}
    lock = threading.Lock()
    rng = random.Random(0)
    delays = {m: rng.uniform(0, 0.01) for m in modules}

    def compute(module, stored):
        time.sleep(delays[module])
        with lock:
            state["computed"] += 1
            state["ahead"] = max(state["ahead"], state["computed"] - state["yielded"])
        return stored

    out = []
    for module, result in _merged(modules, lambda m: m.upper(), compute, workers=3):
        out.append((module, result))
        state["yielded"] += 1
    assert out == [(m, m.upper()) for m in modules]
    assert state["ahead"] <= 3 + 1


def test_the_first_failing_module_in_plan_order_is_reported(tmp_path):
    """Two corrupt modules: whatever finishes first, the error names the earlier one in plan order."""
    nan = {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.full((4, 16), float("nan")),
           "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight": torch.full((4, 40), float("nan"))}
    bad = write_adapter(tmp_path / "bad", MODULES, seed=4, extra_tensors=nan)
    good = write_adapter(tmp_path / "good", MODULES, seed=5)
    recipe = write_recipe(tmp_path / "r.yml", "ctm", [(good, None), (bad, None)], {"rank": 2})
    for n in ("1", "3"):
        got = merge(recipe, tmp_path / f"out{n}", "--threads", n)
        assert got.exit_code == 1
        lines = got.output.strip().splitlines()
        assert len(lines) == 1 and "model.layers.1.self_attn.q_proj" in lines[0] and "NaN" in lines[0], lines
        assert not (tmp_path / f"out{n}").exists()


def test_a_gpu_device_gets_one_worker(monkeypatch):
    """No GPU needed: the plan, and "cuda" pinned to the caller's current GPU (a worker thread starts on GPU 0)."""
    from lowrank_methods.pipeline.threads import ThreadPlan, pinned_device, plan_threads

    assert plan_threads(8, torch.device("cuda")) == ThreadPlan(workers=1, intra_op=1)
    assert plan_threads(8, torch.device("cpu")) == ThreadPlan(workers=8, intra_op=1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert pinned_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert pinned_device(torch.device("cuda:0")) == torch.device("cuda", 0)
    assert pinned_device(torch.device("cpu")) == torch.device("cpu")


def test_an_error_stops_the_queue():
    """A failing module: it is raised, and modules queued behind it never start (at most the lookahead ran)."""
    from lowrank_methods.pipeline.engine import _merged

    started = []

    def compute(module, stored):
        started.append(module)
        if module == "m3":
            raise ValueError("boom")
        time.sleep(0.01)
        return module

    with pytest.raises(ValueError, match="boom"):
        for _ in _merged([f"m{i}" for i in range(60)], lambda m: m, compute, workers=2):
            pass
    assert len(started) <= 4 + 2 + 2


def test_mergekit_num_threads_reaches_the_engine(patched, tmp_path, adapters, monkeypatch):
    """mergekit-yaml's --num-threads/-j (options.num_threads) is the worker count; unset: the available cores."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    import lowrank_methods.pipeline.threads as threads

    plans = []
    plan = threads.plan_threads
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(threads, "plan_threads", lambda n, dev: plans.append(plan(n, dev)) or plans[-1])
    text = write_recipe(tmp_path / "r.yml", "ctm", adapters, {"rank": 2}).read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    before = torch.get_num_threads()
    for n in (2, None):
        patched.run_merge(config, str(tmp_path / f"out{n}"), MergeOptions(quiet=True, num_threads=n), config_source=text)
    torch.set_num_threads(before)  # mergekit's own apply_global_options is not ours to undo
    assert [p.workers for p in plans] == [2, 1]
    assert (tmp_path / "out2" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "outNone" / "adapter_model.safetensors").read_bytes()


@pytest.mark.gpu
def test_cuda_merge_with_threads(tmp_path, adapters):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    recipe = write_recipe(tmp_path / "r.yml", "ctm", adapters, {"rank": 3})
    for n in ("1", "4"):
        got = merge(recipe, tmp_path / f"gpu{n}", "--device", "cuda", "--threads", n)
        assert got.exit_code == 0, got.output
    assert (tmp_path / "gpu1" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "gpu4" / "adapter_model.safetensors").read_bytes()
