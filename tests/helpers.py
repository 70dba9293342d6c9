"""Helpers shared by the tests: plain functions and constants, imported as ``from helpers import ...``.

Fixtures live in conftest.py, the fake Hub server in hub_server.py (tests reach it through the ``fake_hub``
fixture, and its token as ``helpers.TOKEN``). No test module imports another test module or conftest
(tests/test_layout_of_tests.py checks it); tests/ is on sys.path through ``pythonpath`` in pyproject.toml.

- PEFT adapters written in-process: ``write_adapter``, ``write_recipe``, and the float64 readings of an adapter's
  ΔW the tests compare with: ``dense_delta``, ``merged_delta``;
- files and folders: ``raw_safetensors`` (hostile inputs), ``listing`` ("nothing new on disk"), ``folder_bytes``
  (what a push uploads), ``model_weights`` (a saved model's tensors);
- models: ``tiny_llama`` (every tiny Llama of the suite), ``logits``;
- the method tests' inputs, runner and dense references from the papers (float64): ``random_factors``, ``run``,
  ``WEIGHTS``, ``rank_of``, ``polar_ref``, ``ties_reference``, ``tsv_reference``, ``iso_cts_reference``;
- LoRE's independent numpy references: ``lore_reference``, ``lore_objective``, ``lore_ties_reference``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hub_server import TOKEN  # noqa: F401  (the fake Hub's valid token, for the tests that push)

BASE = "org/tiny-base"
D = torch.float64


# -- PEFT adapters ---------------------------------------------------------------------------------------
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


# -- files and folders -----------------------------------------------------------------------------------
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
    from lowrank_methods.formats.output_marker import MARKER

    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER}


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder (all its *.safetensors shards, as stored)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


# -- models ------------------------------------------------------------------------------------------------
def tiny_llama(hidden: int = 16, heads: int = 2, vocab: int = 32, layers: int = 2, seed: int = 0, *,
               kv_heads: int | None = None, **config):
    """A tiny LlamaForCausalLM (MLP 2×hidden, untied embeddings), seeded: the base model of every test that needs
    a Llama. ``kv_heads`` (default ``heads``: no grouped-query attention); ``config``: more LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                                        vocab_size=vocab, tie_word_embeddings=False, **config))


def logits(model, ids):
    """The model's logits for a batch of token ids, without autograd."""
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- the method tests: inputs, runner, dense references (float64) ------------------------------------------
M, N = 14, 11  # random_factors' default (out, in)
WEIGHTS = [1.0, 0.7, -0.5, 2.0]  # per-task weights, one negative


def random_factors(ranks, seed=0, m=M, n=N):
    """One LoraFactors per rank (0: an adapter absent from the module), Gaussian, float64, seeded."""
    from lowrank_methods.core.types import LoraFactors

    g = torch.Generator().manual_seed(seed)
    return [LoraFactors(torch.randn(r, n, generator=g, dtype=D), torch.randn(m, r, generator=g, dtype=D)) for r in ranks]


def run(name, factors, weights=None, **params):
    """The registered method ``name`` on one module's factors (weights default to 1 each), as the engine calls it."""
    from lowrank_methods.core.method import get_method
    from lowrank_methods.core.types import MethodContext

    meth = get_method(name)
    weights = weights if weights is not None else [1.0] * len(factors)
    return meth(factors, weights, meth.parse_params(params), MethodContext("layers.0.q_proj"))


def polar_ref(X):
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def rank_of(X):
    return int(torch.linalg.matrix_rank(X))


def ties_reference(X, density):
    """TIES from the paper: per task keep the top-k magnitudes, γ = sign(Σ), mean of agreeing nonzeros."""
    trimmed = []
    for x in X:
        k = max(1, int(density * x.numel()))
        idx = x.abs().flatten().topk(k).indices
        mask = torch.zeros(x.numel(), dtype=torch.bool)
        mask[idx] = True
        trimmed.append(x * mask.reshape(x.shape))
    Y = torch.stack(trimmed)
    gamma = torch.where(Y.sum(0) >= 0, 1.0, -1.0).to(D)
    agree = (Y.sign() == gamma) & (Y != 0)
    return (Y * agree).sum(0) / agree.sum(0).clamp(min=1)


def tsv_reference(X, k):
    """TSV-M from the paper: per task top-k_t SVD (k_t = min(k, rank)), polar(U_cat) diag(S_cat) polar(V_cat)."""
    Us, Ss, Vs = [], [], []
    for x in X:
        U, S, Vh = torch.linalg.svd(x)
        kt = min(k, rank_of(x))
        Us.append(U[:, :kt]), Ss.append(S[:kt]), Vs.append(Vh[:kt])
    return polar_ref(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ polar_ref(torch.cat(Vs, 0))


def iso_cts_reference(X, fraction):
    """Iso-CTS from the paper, rank-aware (D = rank of the sum instead of min(m, n))."""
    T = X.shape[0]
    U, S, Vh = torch.linalg.svd(X.sum(0))
    Dm = rank_of(X.sum(0))
    kc = int(Dm * fraction)
    s = round((Dm - kc) / T)
    kc = Dm - s * T
    Us, Ss, Vs = [U[:, :kc]], [S[:kc]], [Vh[:kc]]
    for x in X:
        Rt = x - U[:, :kc] @ U[:, :kc].T @ x
        u, sig, vh = torch.linalg.svd(Rt)
        st = min(s, rank_of(Rt))
        Us.append(u[:, :st]), Ss.append(sig[:st]), Vs.append(vh[:st])
    return torch.cat(Ss).mean() * polar_ref(torch.cat(Us, 1)) @ polar_ref(torch.cat(Vs, 0))


# -- LoRE: independent numpy references ----------------------------------------------------------------------
def lore_objective(thetas, base, deltas, tau, p):
    """Σ p_i (½‖θ0 + δ_i − θ_i‖² + τ‖δ_i‖_*), nuclear norm from numpy's singular values."""
    return sum(pi * (0.5 * np.sum((base + d - t) ** 2) + tau * np.linalg.svd(d, compute_uv=False).sum())
               for pi, t, d in zip(p, thetas, deltas))


def lore_reference(thetas, tau, iterations, p=None):
    """Independent numpy implementation of the iterations: θ0 ← Σ p(θ−δ); δ ← U max(σ−τ,0) Vᵀ."""
    thetas = [t.numpy() for t in thetas]
    p = np.full(len(thetas), 1 / len(thetas)) if p is None else np.asarray(p) / np.sum(p)
    deltas = [np.zeros_like(t) for t in thetas]
    objective = [lore_objective(thetas, sum(pi * t for pi, t in zip(p, thetas)), deltas, tau, p)]
    for _ in range(iterations):
        base = sum(pi * (t - d) for pi, t, d in zip(p, thetas, deltas))
        deltas = []
        for t in thetas:
            U, S, Vt = np.linalg.svd(t - base, full_matrices=False)
            deltas.append(U @ np.diag(np.maximum(S - tau, 0)) @ Vt)
        objective.append(lore_objective(thetas, base, deltas, tau, p))
    return base, deltas, objective


def lore_ties_reference(stack, density):
    """Entry-by-entry TIES on an already weighted stack: trim each task to its top-k |.|, elect the sign of the
    sum (0 → +), average the nonzero entries that agree with it."""
    flat = [d.flatten().numpy().copy() for d in stack]
    k = int(flat[0].size * density)
    for f in flat:
        f[np.argsort(-np.abs(f), kind="stable")[k:]] = 0.0
    total = sum(flat)
    out = np.zeros_like(flat[0])
    for j in range(out.size):
        s = 1.0 if total[j] >= 0 else -1.0
        agree = [f[j] for f in flat if f[j] != 0 and np.sign(f[j]) == s]
        out[j] = sum(agree) / len(agree) if agree else 0.0
    return out.reshape(stack[0].shape)


def full_finetunes(root: Path, model, n: int = 3, *, vector_scale: float = 0.0, noise: float = 0.0, seed: int = 1) -> Path:
    """``model`` saved as ``root/base`` and ``n`` full fine-tunes ``root/ft{i}`` of it: every matrix gets a rank-2 task
    update (×0.05), every vector ``vector_scale``·N(0, 1), every tensor ``noise``·N(0, 1) on top; seeded."""
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        with torch.no_grad():
            for name, p in model.named_parameters():
                w = base[name]
                if w.ndim == 2:
                    task = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.05
                else:
                    task = vector_scale * torch.randn(w.shape, generator=g) if vector_scale else torch.zeros_like(w)
                p.copy_(w + task + (noise * torch.randn(w.shape, generator=g) if noise else 0))
        model.save_pretrained(root / f"ft{i}")
    return root
