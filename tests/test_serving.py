"""Serving profiles (``--for peft|vllm|sglang|llama.cpp``, recipe ``serve_for:``), the GGUF LoRA export and
``validate ADAPTER``.

Each engine's loading is re-implemented here from its own code, independently of the package (the checkers below:
key names, required fields, allowed ranks, the scale it applies, SGLang's q/k/v stacking, llama.cpp's GGUF names,
shapes and per-tensor scale). A profile passes when the engine's ΔW equals the ΔW PEFT computes for the
unprofiled merge (``get_delta_weight`` on a real PeftModel) within 1e-7 relative; the unprofiled mixed-rank merge is
shown to fail the engines that need the profile, so the checkers can fail.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import listing, tiny_llama, write_adapter, write_recipe
from lowrank_methods.cli import main as cli
from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.pipeline.recipe import load_recipe

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS, KV_HEADS, LAYERS = 16, 4, 2, 2
SHAPES = {"self_attn.q_proj": (16, 16), "self_attn.k_proj": (8, 16), "self_attn.v_proj": (8, 16),
          "self_attn.o_proj": (16, 16), "mlp.gate_proj": (32, 16), "mlp.up_proj": (32, 16), "mlp.down_proj": (16, 32)}
MODULES = {f"model.layers.{i}.{name}": shape for i in range(LAYERS) for name, shape in SHAPES.items()}
TOL = 1e-7


# -- the engines, from their loading code ----------------------------------------------------------------------
class Refused(Exception):
    """The engine would not load the adapter."""


LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def _peft_files(path: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    config = json.loads((path / "adapter_config.json").read_text())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path / "adapter_model.safetensors")).items():
        m = LORA_KEY.match(key)
        if not m:  # vllm/lora/utils.py parse_fine_tuned_lora_name: "... is unsupported LoRA weight"
            raise Refused(f"{key} is unsupported LoRA weight")
        pairs.setdefault(m["module"], {})[m["part"]] = t.double()
    return config, {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}


def vllm_deltas(path: Path, max_lora_rank: int) -> dict[str, torch.Tensor]:
    """vllm/lora/peft_helper.py PEFTHelper (from_dict keeps only its fields; validate_legal) and lora_model.py /
    lora_weights.py (each tensor copied at its own shape into max_lora_rank buffers, B scaled by one factor)."""
    assert max_lora_rank in (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
    config, pairs = _peft_files(path)
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise Refused(f"missing {field}")
    if config.get("modules_to_save"):
        raise Refused("vLLM only supports modules_to_save being None.")
    if config.get("use_dora"):
        raise Refused("vLLM does not yet support DoRA.")
    if config["r"] > max_lora_rank:
        raise Refused(f"LoRA rank {config['r']} is greater than max_lora_rank {max_lora_rank}")
    if config.get("bias", "none") != "none":
        raise Refused("Adapter bias is not supported.")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r  # rank_pattern never read
    out = {}
    for module, (A, B) in pairs.items():
        if A.shape[0] > max_lora_rank:  # lora_a_stacked[..., :lora_a.shape[0], :] in a max_lora_rank buffer
            raise Refused(f"{module}: rank {A.shape[0]} does not fit max_lora_rank {max_lora_rank}")
        out[module] = (B * scaling) @ A
    return out


def sglang_deltas(path: Path, max_lora_rank: int) -> dict[str, torch.Tensor]:
    """sglang/srt/lora: LoRAConfig reads r, lora_alpha, target_modules; LoRAAdapter.scaling = alpha / r;
    normalize_qkv_proj / normalize_gate_up_proj cat q/k/v (k zero-filled when absent) and gate/up; the memory pool
    slices every module's buffer at config r and asserts the shapes match."""
    config, pairs = _peft_files(path)
    r, alpha = config["r"], config["lora_alpha"]
    if r > max_lora_rank:
        raise Refused(f"rank {r} is incompatible with the current LoRA memory pool (--max-lora-rank)")
    scaling = alpha / r
    out = {}
    parents = {m.rpartition(".")[0] for m in pairs}
    for parent in parents:
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            names = [f"{parent}.{leaf}" for leaf in group]
            present = [n for n in names if n in pairs]
            if not present:
                continue
            if group[0] == "q_proj" and (names[0] not in pairs or names[2] not in pairs):
                raise Refused(f"{parent}: q_proj and v_proj are both needed to stack qkv_proj")
            if group[0] == "gate_proj" and names[0] not in pairs:
                raise Refused(f"{parent}: gate_proj is needed to stack gate_up_proj")
            try:
                As = [pairs[n][0] if n in pairs else torch.zeros_like(pairs[names[-1]][0]) for n in names]
                Bs = [pairs[n][1] if n in pairs else torch.zeros(pairs[names[-1]][1].shape) for n in names]
                torch.cat(Bs, 0)  # the stacked B: one rank for the whole group
            except RuntimeError as e:
                raise Refused(f"{parent}: {e}") from e
            for n, A, B in zip(names, As, Bs):
                if A.shape[0] != r:  # load_lora_weight_to_buffer: buffer[:, :lora_rank] with lora_rank = config r
                    raise Refused(f"{n}: LoRA buffer shape does not match weight shape (rank {A.shape[0]} vs r {r})")
                if n in pairs:
                    out[n] = (B * scaling) @ A
    for module, (A, B) in pairs.items():
        if module not in out:
            if A.shape[0] != r:
                raise Refused(f"{module}: LoRA buffer shape does not match weight shape")
            out[module] = (B * scaling) @ A
    return out


def unpermute(W: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of convert_hf_to_gguf.py's LlamaModel.permute on the rows of W."""
    return W.reshape(heads, W.shape[0] // heads // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def llama_cpp_deltas(path: Path, base_tensors: dict[str, tuple[int, int]], arch: str = "llama"
                     ) -> dict[str, torch.Tensor]:
    """src/llama-adapter.cpp llama_adapter_lora_init_impl (general.type adapter, matching arch, adapter.type lora,
    every pair's base tensor present with ne[0] == a.ne[0], ne[1] == b.ne[1], a.ne[1] == b.ne[0]) and
    llama_adapter_lora_weight::get_scale (alpha / b.ne[0], 1 without alpha). Returned in Hugging Face names and
    row order (q/k rows un-permuted)."""
    reader = gguf.GGUFReader(path)
    field = {k: f.contents() for k, f in reader.fields.items()}
    if field.get("general.type") != "adapter" or field.get("adapter.type") != "lora":
        raise Refused("expect general.type to be 'adapter' and adapter.type 'lora'")
    if field.get("general.architecture") != arch:
        raise Refused("model arch and LoRA arch mismatch")
    alpha = float(field.get("adapter.lora.alpha", 0.0))
    tensors = {t.name: torch.from_numpy(t.data.astype("float64").reshape([int(d) for d in reversed(t.shape)]))
               for t in reader.tensors}
    names = {n.rsplit(".", 1)[0] for n in tensors}
    hf = {f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}" for i in range(LAYERS) for g, h in (
        ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"))}
    out = {}
    for name in names:
        if f"{name}.lora_a" not in tensors or f"{name}.lora_b" not in tensors:
            raise Refused(f"LoRA tensor pair for '{name}' is missing one component")
        if name not in base_tensors:
            raise Refused(f"LoRA tensor '{name}' does not exist in base model")
        A, B = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]  # numpy order: A (r, in), B (out, r)
        ne_a, ne_b = (A.shape[1], A.shape[0]), (B.shape[1], B.shape[0])
        if base_tensors[name][0] != ne_a[0] or base_tensors[name][1] != ne_b[1]:
            raise Refused(f"tensor '{name}' has incorrect shape")
        if ne_a[1] != ne_b[0]:
            raise Refused("lora_a tensor is not transposed")
        scale = alpha / ne_b[0] if alpha else 1.0
        delta = scale * B @ A
        if name.endswith("attn_q.weight"):
            delta = unpermute(delta, HEADS)
        elif name.endswith("attn_k.weight"):
            delta = unpermute(delta, KV_HEADS)
        out[hf[name]] = delta
    return out


def peft_deltas(path: Path) -> dict[str, torch.Tensor]:
    """What PEFT itself adds to each weight: ``get_delta_weight`` of a PeftModel on a tiny Llama of these shapes."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(tiny_llama(HIDDEN, HEADS, layers=LAYERS, kv_heads=KV_HEADS).double(), str(path))
    return {name.removeprefix("base_model.model."): layer.get_delta_weight("default").double()
            for name, layer in model.named_modules() if isinstance(layer, LoraLayer) and "default" in layer.lora_A}


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest relative difference over modules (a module missing on one side is a zero update there)."""
    worst = 0.0
    for m in set(a) | set(b):
        x, y = a.get(m), b.get(m)
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        worst = max(worst, float((x - y).norm() / max(float(y.norm()), 1e-30)))
    return worst


# -- fixtures -----------------------------------------------------------------------------------------------------
def base_gguf(path: Path, *, layers: int = LAYERS, arch: str = "llama", tied: bool = True) -> Path:
    """A GGUF model file of the tiny Llama's names and shapes (a Q4-free stand-in for a real base; tensors zero)."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    for name, (out_f, in_f) in base_shapes(layers).items():
        w.add_tensor(name, np.zeros((out_f, in_f), dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((32, HIDDEN), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def base_shapes(layers: int = LAYERS) -> dict[str, tuple[int, int]]:
    """GGUF name -> (out, in) in numpy order; ggml's ne is (in, out)."""
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    return {f"blk.{i}.{g}.weight": SHAPES[h] for i in range(layers) for g, h in names.items()}


def ne(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {n: (s[1], s[0]) for n, s in shapes.items()}


@pytest.fixture
def mixed(tmp_path):
    """A recipe whose merge has a different rank in almost every module (tsv within a rank budget), float32."""
    adapters = [(write_adapter(tmp_path / f"a{i}", MODULES, r=4, alpha=8, seed=i), None) for i in range(3)]
    base = base_gguf(tmp_path / "base.gguf")
    return write_recipe(tmp_path / "r.yml", "tsv", adapters, {"lambda": 1.0, "rank_budget": 4},
                        base_model=str(base))


def merged(recipe: Path, out: Path, engine: str | None = None) -> Path:
    run_merge(load_recipe(recipe), out, serve_for=engine, quiet=True)
    return out


# -- the profiles against the engines ---------------------------------------------------------------------------
def test_the_unprofiled_mixed_rank_merge_is_served_wrongly_or_not_at_all(mixed, tmp_path):
    """The control: the checkers can fail. PEFT reads rank_pattern/alpha_pattern; SGLang cannot load it; llama.cpp's
    own converter (one alpha = r over each tensor's rank) would scale it wrongly."""
    out = merged(mixed, tmp_path / "plain")
    config = json.loads((out / "adapter_config.json").read_text())
    assert len(set(config["rank_pattern"].values())) > 1
    truth = peft_deltas(out)
    assert close(vllm_deltas(out, 16), truth) < TOL  # scale 1 everywhere: vLLM's one alpha/r is right here
    with pytest.raises(Refused, match="size|shape"):  # the q/k/v cat, or the buffer's shape assert
        sglang_deltas(out, 16)
    _, pairs = _peft_files(out)
    converted = {m: (config["lora_alpha"] / A.shape[0]) * B @ A for m, (A, B) in pairs.items()}
    assert close(converted, truth) > 0.1


@pytest.mark.parametrize("engine", ["peft", "vllm", "sglang", "llama.cpp"])
def test_each_profile_is_served_exactly_and_keeps_the_update(mixed, tmp_path, engine):
    plain = peft_deltas(merged(mixed, tmp_path / "plain"))
    out = merged(mixed, tmp_path / engine, engine)
    assert close(peft_deltas(out), plain) < TOL  # the profile changes how ΔW is stored, not ΔW
    config = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / "merge_report.json").read_text())
    assert report["serve_for"] == (engine if engine != "peft" else "peft")
    if engine == "peft":
        return
    ranks = {t.shape[0] for k, t in load_file(str(out / "adapter_model.safetensors")).items() if "lora_A" in k}
    assert ranks == {config["r"]} and config["lora_alpha"] == config["r"] and not config["rank_pattern"]
    assert not config["alpha_pattern"] and len(peft_deltas(out)) == len(MODULES)
    served = {"vllm": lambda: vllm_deltas(out, report["serving"]["vllm"]["max_lora_rank"]),
              "sglang": lambda: sglang_deltas(out, report["serving"]["sglang"]["max_lora_rank"]),
              "llama.cpp": lambda: llama_cpp_deltas(out / "adapter.gguf", ne(base_shapes()))}[engine]()
    assert close(served, plain) < TOL
    assert all(v["ok"] for v in report["serving"].values())
    card = (out / "README.md").read_text()
    assert f"Stored for {engine}" in card and "vllm serve" in card and "llama-server" in card


def test_vllm_profile_names_the_max_lora_rank_to_pass(tmp_path):
    adapters = [(write_adapter(tmp_path / f"a{i}", MODULES, r=6, alpha=6, seed=i), None) for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yml", "cat", adapters)  # exact: rank 18 everywhere
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "out"), "--for", "vllm"])
    assert result.exit_code == 0, result.output
    assert "stored for vllm: PEFT files at rank 18, scale 1, serve with --max-lora-rank 32" in result.output
    with pytest.raises(Refused, match="greater than max_lora_rank"):
        vllm_deltas(tmp_path / "out", 16)  # vLLM's default would refuse it: the card says --max-lora-rank 32
    assert "--max-lora-rank 32" in (tmp_path / "out" / "README.md").read_text()


def test_sglang_profile_keeps_zero_modules_so_q_and_v_stack(tmp_path):
    """A module whose merged update is zero (here: lora_B as PEFT initialises it) is left out of a plain adapter,
    which breaks SGLang's q/k/v stacking; the profile writes it (zeros at the one rank)."""
    v = "model.layers.0.self_attn.v_proj"
    zero_b = {f"base_model.model.{v}.lora_B.weight": torch.zeros(MODULES[v][0], 2)}
    a = write_adapter(tmp_path / "a", MODULES, r=2, seed=1, extra_tensors=zero_b)
    recipe = write_recipe(tmp_path / "r.yml", "task_arithmetic", [(a, None)])
    plain = merged(recipe, tmp_path / "plain")
    assert v not in json.loads((plain / "adapter_config.json").read_text())["target_modules"]
    with pytest.raises(Refused, match="q_proj and v_proj are both needed"):
        sglang_deltas(plain, 2)
    out = merged(recipe, tmp_path / "sg", "sglang")
    served = sglang_deltas(out, 2)
    assert len(served) == len(MODULES) and float(served[v].abs().max()) == 0
    assert close(served, peft_deltas(plain)) < TOL


# -- validate on any adapter ----------------------------------------------------------------------------------
def test_validate_tells_which_engines_serve_an_adapter_and_why_not(tmp_path):
    rs = write_adapter(tmp_path / "rs", MODULES, r=4, alpha=8, rslora=True, rank_pattern={"q_proj": 2},
                       alpha_pattern={"down_proj": 3})
    result = CliRunner().invoke(cli, ["validate", str(rs)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert result.output.startswith(f"ok: LoRA adapter, {len(MODULES)} modules, rank 2–4")
    assert lines["peft"].split() == ["peft", "yes"]
    assert "vllm       no: vLLM applies one scale lora_alpha/√r = 4" in lines["vllm"]
    assert "modules are not at rank r = 4" in lines["sglang"] and "ignores rank_pattern" in lines["sglang"]
    assert lines["llama.cpp"].startswith("  llama.cpp  yes; after mergekit-lowrank export-gguf") and \
        "convert_lora_to_gguf.py would scale" in lines["llama.cpp"]
    ours = CliRunner().invoke(cli, ["validate", str(write_adapter(tmp_path / "plain", MODULES, r=8, alpha=16))])
    assert "vllm       yes (--max-lora-rank 8)" in ours.output and "sglang     yes (--max-lora-rank 8)" in ours.output
    assert "would scale" not in ours.output  # alpha/r is the same for every module: the converter is exact too


def test_validate_names_carried_tensors_and_broken_stacking(tmp_path):
    carried = write_adapter(tmp_path / "c", MODULES, extra_config={"modules_to_save": ["lm_head"]},
                            extra_tensors={"base_model.model.lm_head.weight": torch.zeros(32, HIDDEN)})
    out = CliRunner().invoke(cli, ["validate", str(carried)]).output
    assert out.count("modules_to_save, e.g. lm_head") == 3  # vllm, sglang, llama.cpp
    qk = write_adapter(tmp_path / "qk", {m: s for m, s in MODULES.items() if "v_proj" not in m})
    out = CliRunner().invoke(cli, ["validate", str(qk)]).output
    assert "has k_proj, q_proj but not v_proj" in out and "vllm       yes" in out
    named = write_adapter(tmp_path / "named", MODULES)
    from safetensors.torch import save_file

    tensors = load_file(str(named / "adapter_model.safetensors"))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
              str(named / "adapter_model.safetensors"))
    out = CliRunner().invoke(cli, ["validate", str(named)]).output
    assert "vllm       no: tensor keys carry an adapter name (e.g. base_model.model." in out and "peft       yes" in out


# -- the GGUF export ------------------------------------------------------------------------------------------------
def test_export_gguf_is_exact_for_any_adapter(tmp_path):
    """rsLoRA, rank_pattern and alpha_pattern all folded: llama.cpp's rule gives PEFT's ΔW; float32 because folding
    changed values; names and shapes checked against the base GGUF."""
    rs = write_adapter(tmp_path / "rs", MODULES, r=4, alpha=8, rslora=True, rank_pattern={"q_proj": 2},
                       alpha_pattern={"down_proj": 3}, dtype=torch.float16)
    base = base_gguf(tmp_path / "base.gguf")
    result = CliRunner().invoke(cli, ["export-gguf", str(rs), str(base), str(tmp_path / "rs.gguf")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"wrote {tmp_path / 'rs.gguf'}: {len(MODULES)} modules at rank 4 (alpha 4, "
                                     f"scale 1), {LAYERS} modules zero-padded to it, float32")
    assert close(llama_cpp_deltas(tmp_path / "rs.gguf", ne(base_shapes())), peft_deltas(rs)) < TOL
    plain = write_adapter(tmp_path / "p", MODULES, r=4, alpha=4, dtype=torch.float16)
    assert CliRunner().invoke(cli, ["export-gguf", str(plain), str(base), str(tmp_path / "p.gguf")]).exit_code == 0
    reader = gguf.GGUFReader(tmp_path / "p.gguf")
    assert {t.tensor_type.name for t in reader.tensors} == {"F16"}  # nothing folded: the stored values, as stored
    stored = load_file(str(plain / "adapter_model.safetensors"))
    a = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight.lora_a")
    assert bytes(a.data.tobytes()) == stored["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].numpy().tobytes()


def test_export_gguf_from_a_config_json_base(tmp_path):
    """Without the base's GGUF, its config.json names the tensors (shapes unchecked)."""
    model_dir = tmp_path / "base"
    tiny_llama(HIDDEN, HEADS, layers=LAYERS, kv_heads=KV_HEADS).save_pretrained(model_dir)
    a = write_adapter(tmp_path / "a", MODULES, r=3, alpha=6)
    assert CliRunner().invoke(cli, ["export-gguf", str(a), str(model_dir), str(tmp_path / "a.gguf")]).exit_code == 0
    assert close(llama_cpp_deltas(tmp_path / "a.gguf", ne(base_shapes())), peft_deltas(a)) < TOL


@pytest.mark.parametrize("case, message", [
    ("wrong base", "ΔW is 16×32 but blk.0.ffn_down.weight of the base"),
    ("missing layer", "has 1 layers, this module is in layer 1; is it the adapter's base model?"),
    ("not gguf", "is not a readable GGUF file"),
    ("no base", "is neither a local file or directory nor a Hub repo id"),
    ("carried", "a GGUF LoRA holds only lora_a/lora_b pairs"),
    ("embedding", "GGUF export writes linear modules"),
    ("exists", "exists; pass --overwrite to replace it"),
    ("not ours", "is not a GGUF LoRA written by mergekit-lowrank; it is never replaced"),
    ("tied lm_head", "ties lm_head to the token embeddings"),
])
def test_export_gguf_refusals_are_one_line_and_leave_nothing(tmp_path, case, message):
    a = write_adapter(tmp_path / "a", MODULES)
    base = base_gguf(tmp_path / "base.gguf")
    out = tmp_path / "out" / "a.gguf"
    out.parent.mkdir()
    if case == "wrong base":
        import numpy as np

        w = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "llama")
        w.add_block_count(LAYERS)
        w.add_head_count(HEADS)
        for name in base_shapes():
            w.add_tensor(name, np.zeros((8, 8), dtype=np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        base = tmp_path / "other.gguf"
    elif case == "missing layer":
        base = base_gguf(tmp_path / "short.gguf", layers=1)
        a = write_adapter(tmp_path / "a2", MODULES)
    elif case == "not gguf":
        base = tmp_path / "bad.gguf"
        base.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    elif case == "no base":
        base = tmp_path / "nothing-here"
    elif case == "carried":
        a = write_adapter(tmp_path / "c", MODULES, extra_config={"modules_to_save": ["lm_head"]},
                          extra_tensors={"base_model.model.lm_head.weight": torch.zeros(32, HIDDEN)})
    elif case == "embedding":
        a = write_adapter(tmp_path / "e", MODULES, embeddings={"model.embed_tokens": (32, HIDDEN)})
    elif case == "exists":
        out.write_bytes(b"someone's file")
    elif case == "not ours":
        out.write_bytes(b"someone's file")
    elif case == "tied lm_head":
        a = write_adapter(tmp_path / "t", {**MODULES, "lm_head": (32, HIDDEN)})
    before = listing(tmp_path)
    args = ["export-gguf", str(a), str(base), str(out)] + (["--overwrite"] if case == "not ours" else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output
    assert listing(tmp_path) == before
    if case in ("exists", "not ours"):
        assert out.read_bytes() == b"someone's file"


def test_export_gguf_replaces_its_own_file_with_overwrite(tmp_path):
    a = write_adapter(tmp_path / "a", MODULES)
    base, out = base_gguf(tmp_path / "base.gguf"), tmp_path / "a.gguf"
    assert CliRunner().invoke(cli, ["export-gguf", str(a), str(base), str(out)]).exit_code == 0
    b = write_adapter(tmp_path / "b", MODULES, seed=5)
    assert CliRunner().invoke(cli, ["export-gguf", str(b), str(base), str(out), "--overwrite"]).exit_code == 0
    assert close(llama_cpp_deltas(out, ne(base_shapes())), peft_deltas(b)) < TOL


# -- the profile's refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("bad engine", "parameters.serve_for must be one of peft, vllm, sglang, llama.cpp, got 'tgi'"),
    ("model output", "parameters.serve_for stores an adapter for a serving engine; output: model does not take it"),
    ("disagree", "--for vllm disagrees with the recipe's serve_for: sglang"),
    ("carried", "--for vllm: it carries whole tensors (modules_to_save, e.g. lm_head)"),
    ("no base", "a GGUF LoRA is named after its base model's tensors"),
    ("rank above 512", "vLLM serves LoRA ranks up to 512"),
])
def test_profile_refusals_are_one_line_and_leave_nothing(tmp_path, case, message):
    a = write_adapter(tmp_path / "a", MODULES, base=None if case == "no base" else "org/tiny-base")
    params, top, flag = {}, {}, []
    if case == "bad engine":
        params = {"serve_for": "tgi"}
    elif case == "model output":
        params = {"serve_for": "vllm", "output": "model"}
    elif case == "disagree":
        params, flag = {"serve_for": "sglang"}, ["--for", "vllm"]
    elif case == "carried":
        a = write_adapter(tmp_path / "c", MODULES, extra_config={"modules_to_save": ["lm_head"]},
                          extra_tensors={"base_model.model.lm_head.weight": torch.zeros(32, HIDDEN)})
        flag = ["--for", "vllm"]
    elif case == "no base":
        flag = ["--for", "llama.cpp"]
    elif case == "rank above 512":
        a = write_adapter(tmp_path / "big", {"model.layers.0.mlp.up_proj": (600, 600)}, r=300)
        b = write_adapter(tmp_path / "big2", {"model.layers.0.mlp.up_proj": (600, 600)}, r=300, seed=3)
        recipe = write_recipe(tmp_path / "r.yml", "cat", [(a, None), (b, None)])
        flag = ["--for", "vllm"]
    if case != "rank above 512":
        recipe = write_recipe(tmp_path / "r.yml", "task_arithmetic", [(a, None)], params or None, **top)
    before = listing(tmp_path)
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "out"), "-q"] + flag)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output
    assert listing(tmp_path) == before


def test_validate_of_a_recipe_checks_the_profile_before_merging(tmp_path, mixed):
    recipe = tmp_path / "r2.yml"
    recipe.write_text(mixed.read_text().replace("rank_budget: 4", "rank_budget: 4\n  serve_for: llama.cpp")
                      .replace(str(tmp_path / "base.gguf"), str(tmp_path / "missing.gguf")))
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 1 and "missing.gguf" in result.output
