"""`mergekit-lowrank merge --push-to-hub` and `mergekit-lowrank push` against the fake Hub.

One test runs the CLI in a subprocess configured only through the environment (HF_ENDPOINT, HF_TOKEN,
HF_HOME), as a user would; the others use click's runner in-process.
"""

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from helpers import TOKEN, folder_bytes, write_adapter
from lowrank_methods.cli import main

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 8), "model.layers.1.mlp.down_proj": (8, 12)}
ROOT = Path(__file__).resolve().parents[1]


def hub_recipe(hub, tmp_path):
    for i, name in enumerate(["org/lora-a", "org/lora-b"]):
        path = write_adapter(tmp_path / name, SHAPES, seed=i + 1, r=2 + i)
        hub.add_repo(name, {p.name: p.read_bytes() for p in path.iterdir()})
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: mtc\nmodels:\n  - model: org/lora-a\n  - model: org/lora-b\n"
                      "    parameters: {weight: 0.5}\nparameters: {rank: 2}\n")
    return recipe


def test_merge_push_then_push_pr_in_a_subprocess(fake_hub, tmp_path):
    recipe, out = hub_recipe(fake_hub, tmp_path), tmp_path / "out"
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "lowrank_methods.cli"]
    done = subprocess.run(cli + ["merge", str(recipe), str(out), "--push-to-hub", "org/merged", "--private",
                                 "--commit-message", "first merge"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "pushed" in done.stdout and "org/merged" in done.stdout
    repo = fake_hub.repos["org/merged"]
    assert repo.private and repo.head("main").summary == "first merge"
    assert fake_hub.files("org/merged") == folder_bytes(out)

    (out / "notes.txt").write_text("for review\n")
    done = subprocess.run(cli + ["push", str(out), "org/merged", "--create-pr"], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "opened pull request" in done.stdout
    assert fake_hub.files("org/merged", "refs/pr/1") == folder_bytes(out)
    assert "notes.txt" not in fake_hub.files("org/merged", "main")


def test_bad_token_is_one_line_for_download_and_push(fake_hub, tmp_path, monkeypatch):
    recipe = hub_recipe(fake_hub, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_rejectedRejectedRejected00")
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: adapter 'lora-a': the Hub rejected the token (401 Unauthorized) while downloading org/lora-a; "
        "check HF_TOKEN or run `hf auth login`"]
    local = tmp_path / "local.yml"
    local.write_text(f"merge_method: cat\nmodels:\n  - model: {tmp_path / 'org' / 'lora-a'}\n")
    result = CliRunner().invoke(main, ["merge", str(local), str(tmp_path / "out"), "-q", "--push-to-hub", "org/m"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: the Hub rejected the token (401 Unauthorized); check HF_TOKEN or run `hf auth login` with a token "
        "that has write access"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # the merge itself succeeded and stays
    assert "org/m" not in fake_hub.repos


def test_missing_token_fails_before_merging(fake_hub, tmp_path):
    recipe = hub_recipe(fake_hub, tmp_path)
    n = len(fake_hub.requests)
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "--push-to-hub", "org/m"])
    assert result.exit_code == 1 and "no Hugging Face token" in result.output
    assert not (tmp_path / "out").exists() and len(fake_hub.requests) == n


def test_failed_merge_pushes_nothing(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: cat\nmodels:\n  - model: org/does-not-exist\n")
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "--push-to-hub", "org/m"])
    assert result.exit_code == 1 and "org/does-not-exist" in result.output
    assert not fake_hub.calls("POST") and not (tmp_path / "out").exists()


def test_push_command_flags(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    write_adapter(out, SHAPES)
    result = CliRunner().invoke(main, ["push", str(out), "org/plain", "--revision", "dev", "--commit-message", "hi"])
    assert result.exit_code == 0, result.output
    assert fake_hub.files("org/plain", "dev") == folder_bytes(out)
    assert fake_hub.repos["org/plain"].head("dev").summary == "hi"
    result = CliRunner().invoke(main, ["push", str(out), "org/plain", "--revision", "dev", "--create-pr"])
    assert result.exit_code == 1 and "pull request against main" in result.output
