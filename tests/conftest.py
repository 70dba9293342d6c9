"""Shared fixtures: tiny PEFT adapters written in-process (no network, no base model needed)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BASE = "org/tiny-base"


def write_adapter(path: Path, modules: dict[str, tuple[int, int]], *, r: int = 4, alpha: float = 8, seed: int = 0,
                  rslora: bool = False, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                  fan_in_fan_out: bool = False, embeddings: dict[str, tuple[int, int]] | None = None,
                  dtype=torch.float32, base: str = BASE, extra_config: dict | None = None,
                  extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A PEFT LoRA adapter dir. ``modules``: name -> (out, in) of the base weight (nn.Linear layout);
    with fan_in_fan_out the base weight is (in, out) and PEFT's factors keep (r, in)/(out, r) shapes.
    ``embeddings``: name -> (num_embeddings, dim)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in modules.items():
        rank = _pattern(rank_pattern or {}, name, r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g, dtype=torch.float64).to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g, dtype=torch.float64).to(dtype)
    for name, (num, dim) in (embeddings or {}).items():
        rank = _pattern(rank_pattern or {}, name, r)
        tensors[f"base_model.model.{name}.lora_embedding_A"] = torch.randn(rank, num, generator=g, dtype=torch.float64).to(dtype)
        tensors[f"base_model.model.{name}.lora_embedding_B"] = torch.randn(dim, rank, generator=g, dtype=torch.float64).to(dtype)
    tensors.update(extra_tensors or {})
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r, "lora_alpha": alpha,
        "use_rslora": rslora, "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
        "fan_in_fan_out": fan_in_fan_out, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in list(modules) + list(embeddings or {})}),
        "lora_dropout": 0.0, "bias": "none", "use_dora": False, "lora_bias": False,
    }
    config.update(extra_config or {})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def dense_delta(path: Path, name: str) -> torch.Tensor:
    """The adapter's ΔW for ``name`` in the base weight's layout, from its files, in float64 (the test's reference)."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    t = {k: v.double() for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    r = _pattern(cfg.get("rank_pattern") or {}, name, cfg["r"])
    alpha = _pattern(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if f"base_model.model.{name}.lora_embedding_A" in t:
        return scale * (t[f"base_model.model.{name}.lora_embedding_B"] @ t[f"base_model.model.{name}.lora_embedding_A"]).T
    delta = scale * (t[f"base_model.model.{name}.lora_B.weight"] @ t[f"base_model.model.{name}.lora_A.weight"])
    return delta.T if cfg.get("fan_in_fan_out") else delta


def merged_delta(path: Path, name: str) -> torch.Tensor | None:
    """ΔW of a merged adapter we wrote (same reading rules), or None if the module is absent."""
    from safetensors.torch import load_file

    t = load_file(str(path / "adapter_model.safetensors"))
    if f"base_model.model.{name}.lora_A.weight" not in t and f"base_model.model.{name}.lora_embedding_A" not in t:
        return None
    return dense_delta(path, name)


def _pattern(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def write_recipe(path: Path, method: str, adapters: list[tuple[Path, float | None]], parameters: dict | None = None,
                 **top) -> Path:
    import yaml

    models = [{"model": str(p), **({"parameters": {"weight": w}} if w is not None else {})} for p, w in adapters]
    body = {"merge_method": method, "models": models, **top}
    if parameters:
        body["parameters"] = parameters
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture
def patched(monkeypatch):
    """The plugin's registration and patches, with mergekit's functions restored afterwards."""
    pytest.importorskip("mergekit")
    import mergekit.merge
    from mergekit.io.tasks import LoaderCache

    from lowrank_methods import mergekit_plugin

    for owner, name in ((mergekit.merge, "run_merge"), (mergekit.merge, "_get_donor_model"), (LoaderCache, "get")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    mergekit_plugin.patch()
    return mergekit.merge


def raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file written byte by byte (header JSON as given, even when invalid), for hostile-input tests."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(blob) if length is None else length).to_bytes(8, "little") + blob + data)
    return path


def listing(*dirs: Path) -> dict[str, list[str]]:
    """Everything below each directory (for "nothing new on disk" checks)."""
    return {str(d): sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else [] for d in dirs}


def folder_bytes(path: Path) -> dict[str, bytes]:
    """What a push uploads from an output folder: every file but our local ownership marker."""
    from lowrank_methods.pipeline.staging import MARKER

    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER}


def tiny_llama(hidden: int = 16, heads: int = 2, vocab: int = 32, layers: int = 2, seed: int = 0, **config):
    """A tiny LlamaForCausalLM (MLP 2×hidden, untied embeddings), seeded: the base model of the full-model tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                        tie_word_embeddings=False, **config))
