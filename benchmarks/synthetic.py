"""The benchmarks' one generator of synthetic LoRA adapters: Llama-7B-shaped, rank 16, alpha 32 (scale 2).

Each adapter's factors share half their subspace with the other adapters' (per module kind) and have decaying
spectra, as trained adapters do, so that iterative methods (ctm's HOOI) converge as they would on real ones.
``write_adapters`` saves them as PEFT adapter folders (bf16; benchmarks/scale.py, benchmarks/contention.py),
``layer_factors`` keeps one decoder layer in memory as LoraFactors (float32; benchmarks/layer_timing.py). Both
draw the same numbers in the same order from one seeded generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

SHAPES = {  # Llama-7B: (out, in) of each targeted linear layer
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
RANK = 16
SCALE = 2  # lora_alpha / r


def factors(n_adapters: int, n_layers: int, *, rank: int = RANK, seed: int = 0, shapes: dict = SHAPES
            ) -> Iterator[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(adapter index, module, A, B) for every adapter, layer and module in that order, float32, as PEFT stores
    them (ΔW = SCALE · B A): B already carries the decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    half = rank // 2
    shared = {s: (torch.randn(half, n, generator=g), torch.randn(m, half, generator=g)) for s, (m, n) in shapes.items()}
    decay = torch.logspace(0, -1.5, rank)
    for t in range(n_adapters):
        for layer in range(n_layers):
            for s, (m, n) in shapes.items():
                A = torch.randn(rank, n, generator=g) / n**0.5
                B = torch.randn(m, rank, generator=g) / m**0.5
                A[:half] += 0.5 * shared[s][0] / n**0.5
                B[:, :half] += 0.5 * shared[s][1] / m**0.5
                yield t, f"model.layers.{layer}.{s}", A, B * decay


def write_adapters(root: Path, n_adapters: int, n_layers: int, seed: int = 0, *, shapes: dict = SHAPES) -> list[Path]:
    """``root``/adapter0 … adapter{n-1}: PEFT LoRA folders (bf16 safetensors), reused if they are already there."""
    from safetensors.torch import save_file

    dirs = [root / f"adapter{t}" for t in range(n_adapters)]
    if all((d / "adapter_model.safetensors").exists() for d in dirs):
        return dirs
    tensors: dict[str, torch.Tensor] = {}

    def save(t: int) -> None:
        d = dirs[t]
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "bench/llama-7b-shaped", "r": RANK,
            "lora_alpha": SCALE * RANK, "target_modules": sorted({s.split(".")[1] for s in shapes}),
            "lora_dropout": 0.0}))
        tensors.clear()

    current = 0
    for t, module, A, B in factors(n_adapters, n_layers, seed=seed, shapes=shapes):
        if t != current:
            save(current)
            current = t
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = A.to(torch.bfloat16)
        tensors[f"{key}.lora_B.weight"] = B.to(torch.bfloat16)
    if n_adapters:
        save(current)
    return dirs


def layer_factors(n_adapters: int, rank: int = RANK, seed: int = 0, *, shapes: dict = SHAPES) -> dict[str, list]:
    """One decoder layer (layer 0): module -> one LoraFactors per adapter, float32, scale folded into B."""
    from lowrank_methods.core.types import LoraFactors

    out: dict[str, list] = {}
    for _, module, A, B in factors(n_adapters, 1, rank=rank, seed=seed, shapes=shapes):
        out.setdefault(module, []).append(LoraFactors(A, SCALE * B))
    return out
