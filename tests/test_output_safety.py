"""Outputs: only our own outputs are ever replaced, races have one winner, signals and full disks leave nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import listing, write_adapter, write_recipe
from lowrank_methods.cli import main as ours
from lowrank_methods.formats.output_marker import MARKER

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def long_recipe(tmp_path_factory):
    """A merge that takes a few seconds (4 rank-16 adapters × 48 modules of 1024×1024, ctm): long enough to
    be interrupted or raced."""
    root = tmp_path_factory.mktemp("long")
    mods = {f"model.layers.{i}.mlp.up_proj": (1024, 1024) for i in range(48)}
    adapters = [write_adapter(root / f"a{t}", mods, r=16, seed=t) for t in range(4)]
    return write_recipe(root / "r.yml", "ctm", [(a, None) for a in adapters], {"rank": 16})


def small(tmp, method="mtc"):
    a = write_adapter(tmp / "in" / "a", {Q: (8, 8)}, seed=1)
    b = write_adapter(tmp / "in" / "b", {Q: (8, 8)}, seed=2)
    return write_recipe(tmp / "in" / "r.yml", method, [(a, None), (b, 0.5)], {"rank": 2}), a


def merge(*args):
    return CliRunner().invoke(ours, ["merge", *map(str, args), "--quiet"])


def mergekit_yaml(*args):
    from mergekit.scripts.run_yaml import main

    return CliRunner().invoke(main, [*map(str, args), "--quiet"])


def cli(tool: str, recipe: Path, out: Path, *extra: str) -> list[str]:
    exe = Path(sys.executable).with_name(tool)
    return [str(exe), str(recipe), str(out), "--quiet", *extra] if tool == "mergekit-yaml" else \
        [str(exe), "merge", str(recipe), str(out), "--quiet", *extra]


def ours_left_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# -- ownership ---------------------------------------------------------------------------------------------------
def test_overwrite_replaces_a_previous_output_and_keeps_its_marker(tmp_path):
    recipe, _ = small(tmp_path)
    out = tmp_path / "out"
    assert merge(recipe, out).exit_code == 0
    marker = json.loads((out / MARKER).read_text())
    assert set(marker["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md", "merge_report.json", "retained_energy.png"}
    assert merge(recipe, out, "--overwrite").exit_code == 0
    assert ours_left_beside(out) == []


def test_overwrite_refuses_a_project_directory_and_touches_nothing(tmp_path, monkeypatch):
    recipe, _ = small(tmp_path)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("keep me")
    (project / "src" / "main.py").write_text("print()")
    before = listing(project)
    monkeypatch.chdir(project)
    result = merge(recipe, ".", "--overwrite")
    assert result.exit_code == 1 and "did not write" in result.stderr and "notes.txt" in result.stderr, result.output
    assert listing(project) == before


def test_a_file_added_to_a_previous_output_blocks_overwrite(tmp_path):
    recipe, _ = small(tmp_path)
    out = tmp_path / "out"
    assert merge(recipe, out).exit_code == 0
    (out / "my-notes.md").write_text("mine")
    result = merge(recipe, out, "--overwrite")
    assert result.exit_code == 1 and "my-notes.md" in result.stderr
    assert (out / "my-notes.md").read_text() == "mine"


@pytest.mark.parametrize("tool", ["mergekit-lowrank", "mergekit-yaml"])
def test_an_input_adapter_is_never_the_output(tmp_path, tool, patched):
    recipe, a = small(tmp_path)
    assert merge(recipe, tmp_path / "prev").exit_code == 0
    # even a previous output of ours that is now an input of the recipe
    recipe2 = write_recipe(tmp_path / "r2.yml", "mtc", [(tmp_path / "prev", None), (a, None)], {"rank": 2})
    before = listing(tmp_path / "in", tmp_path / "prev")
    for rec, target in ((recipe, a), (recipe2, tmp_path / "prev")):
        result = merge(rec, target, "--overwrite") if tool == "mergekit-lowrank" else mergekit_yaml(rec, target)
        assert result.exit_code == 1 and "input" in result.stderr, result.output
    assert listing(tmp_path / "in", tmp_path / "prev") == before


def test_mergekit_yaml_replaces_only_its_own_outputs(tmp_path, patched):
    recipe, _ = small(tmp_path)
    out = tmp_path / "out"
    assert mergekit_yaml(recipe, out).exit_code == 0
    assert mergekit_yaml(recipe, out).exit_code == 0  # no --overwrite there: a previous output of ours is replaced
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    (foreign / "adapter_config.json").write_text("{}")
    result = mergekit_yaml(recipe, foreign)
    assert result.exit_code == 1 and "did not write" in result.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["adapter_config.json", "cat.jpg"]


def test_output_directories_follow_the_umask(tmp_path):
    recipe, _ = small(tmp_path)
    old = os.umask(0o022)
    try:
        assert merge(recipe, tmp_path / "deep" / "er" / "out").exit_code == 0
    finally:
        os.umask(old)
    for d in (tmp_path / "deep", tmp_path / "deep" / "er", tmp_path / "deep" / "er" / "out"):
        assert d.stat().st_mode & 0o777 == 0o755, d


def test_non_finite_result_is_refused_and_nothing_written(tmp_path):
    """Finite inputs whose product overflows float32: caught before anything reaches disk."""
    big = write_adapter(tmp_path / "in" / "big", {Q: (8, 8)}, alpha=4)
    from safetensors.torch import load_file, save_file

    t = {k: v * 1e22 for k, v in load_file(str(big / "adapter_model.safetensors")).items()}
    save_file(t, str(big / "adapter_model.safetensors"))
    recipe = write_recipe(tmp_path / "in" / "r.yml", "mtc", [(big, None)], {"rank": 2})
    result = merge(recipe, tmp_path / "outs" / "out")
    assert result.exit_code == 1 and f"module {Q!r}: mtc" in result.stderr, result.output
    assert "NaN or Inf" in result.stderr or "did not converge" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "outs").exists()


# -- races -----------------------------------------------------------------------------------------------------
def test_two_racing_merges_have_exactly_one_winner(tmp_path, long_recipe):
    out = tmp_path / "out"
    procs = [subprocess.Popen(cli("mergekit-lowrank", long_recipe, out), stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code)
    assert "another merge is writing" in loser or "previous merge" in loser, loser
    assert ours_left_beside(out) == []


def wait_for_staging(out: Path, proc, timeout=120) -> None:
    """Until the merge has started writing (its staged safetensors exists)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(out.parent.glob(f".{out.name}.tmp-*/out/*.safetensors")):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError("the merge never started writing")


def test_a_directory_created_at_out_during_a_merge_survives(tmp_path, long_recipe):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli("mergekit-lowrank", long_recipe, out), stderr=subprocess.PIPE, text=True)
    wait_for_staging(out, proc)
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    assert proc.wait(timeout=300) == 1
    assert "appeared while the merge ran" in proc.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert ours_left_beside(out) == []


# -- signals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tool", ["mergekit-lowrank", "mergekit-yaml"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, long_recipe, tool, sig):
    out = tmp_path / "out"
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()
    proc = subprocess.Popen(cli(tool, long_recipe, out), stderr=subprocess.PIPE, text=True, env=env)
    wait_for_staging(out, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    err = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert code == 128 + sig, (code, err)
    assert err == [f"terminated by {signal.Signals(sig).name}; nothing was written"], err
    assert not out.exists() and ours_left_beside(out) == []
    # (importing mergekit makes torch create its own cache dir torchinductor_<user> in TMPDIR, plugin or not)
    assert [p.name for p in (tmp_path / "tmpdir").iterdir() if not p.name.startswith("torchinductor_")] == []


@pytest.fixture(scope="module")
def long_lore_recipe(tmp_path_factory):
    """A LoRE merge of full models that takes a few seconds (mergekit's planner, our staging)."""
    from helpers import full_finetunes, tiny_llama

    root = full_finetunes(tmp_path_factory.mktemp("long_lore"), tiny_llama(hidden=384, heads=4, vocab=256), noise=0.01)
    recipe = root / "lore.yml"
    recipe.write_text(f"merge_method: lore\nmodels:\n" + "".join(f"  - model: {root / f'ft{i}'}\n" for i in range(3))
                      + "parameters: {iterations: 200, tol: 0}\ndtype: float32\n")
    return recipe


@pytest.mark.parametrize("tool", ["mergekit-lowrank", "mergekit-yaml"])
def test_sigterm_during_a_full_model_merge_leaves_nothing(tmp_path, long_lore_recipe, tool):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(tool, long_lore_recipe, out), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ours_left_beside(out) and time.time() < deadline:  # the staging directory exists: mergekit is merging
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    err = [line for line in proc.stderr.read().splitlines() if line.startswith(("terminated", "Error", "error"))]
    assert code == 128 + signal.SIGTERM and err == ["terminated by SIGTERM; nothing was written"], (code, err)
    assert not out.exists() and ours_left_beside(out) == []


def test_after_sigkill_the_next_run_cleans_up(tmp_path, long_recipe):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli("mergekit-lowrank", long_recipe, out), stderr=subprocess.PIPE, text=True)
    wait_for_staging(out, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert any(name.startswith(f".{out.name}.tmp-") for name in ours_left_beside(out))
    recipe, _ = small(tmp_path)
    assert merge(recipe, out).exit_code == 0
    assert ours_left_beside(out) == []


# -- a full disk --------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (skipped where this process may not mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("tool", ["mergekit-lowrank", "mergekit-yaml"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_disk, tool, patched):
    mods = {f"model.layers.{i}.mlp.up_proj": (256, 256) for i in range(8)}  # ~1 MiB of output factors
    a = write_adapter(tmp_path / "a", mods, r=32, seed=1)
    b = write_adapter(tmp_path / "b", mods, r=32, seed=2)
    recipe = write_recipe(tmp_path / "r.yml", "cat", [(a, None), (b, None)])
    out = tiny_disk / "out"
    result = merge(recipe, out) if tool == "mergekit-lowrank" else mergekit_yaml(recipe, out)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert list(tiny_disk.iterdir()) == []
