"""PT-SVD inputs: full fine-tuned models become rank-r LoRA adapters of their delta to the base model.

For every 2-D weight, ΔW = θ_t − θ_0 ≈ U_r S_r V_rᵀ (exact truncated SVD: the best rank-r approximation,
Eckart–Young), written as a PEFT adapter with B = U_r √S_r, A = √S_r V_rᵀ and r == lora_alpha (scale 1).
The engine then reads those adapters like any other, so rmm runs on them unchanged (the paper's PT-SVD setting).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lowrank_methods.core.errors import AdapterError, MergeError
from lowrank_methods.core.linalg import LowRankSVD, truncate
from lowrank_methods.core.types import LoraFactors, ModuleResult
from lowrank_methods.formats.peft import AdapterWriter, ModuleLayout
from lowrank_methods.formats.safetensors_io import SafetensorsFile
from lowrank_methods.formats.writer import OutputJob

EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings)$")


def is_full_model(path: Path) -> bool:
    """A transformers model directory (config.json + *.safetensors) rather than a PEFT adapter."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file() and any(path.glob("*.safetensors"))


def weight_index(path: Path) -> dict[str, SafetensorsFile]:
    """Tensor name → its (header-checked) safetensors file, over every shard of a model directory, names sorted
    within each file."""
    index: dict[str, SafetensorsFile] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            reader = SafetensorsFile(file)
        except AdapterError as e:
            raise MergeError(f"cannot read {file} ({e}); the model file is corrupt or truncated") from e
        index.update({key: reader for key in sorted(reader.keys())})
    return index


def low_rank_delta(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the best rank-``rank`` approximation of a dense delta: B = U√S, A = √S Vᵀ (ranks ≤ rank)."""
    factors, _ = truncate(LowRankSVD(*torch.linalg.svd(delta, full_matrices=False)), rank, tuple(delta.shape))
    return factors.B, factors.A


def delta_adapter(model_dir: Path, base_dir: Path, out: Path, rank: int, name: str) -> Path:
    """Write the rank-``rank`` PT-SVD adapter of ``model_dir`` against ``base_dir`` into ``out``, with the writer
    of merged adapters (scale 1: r == lora_alpha, rank_pattern where a module's rank is lower)."""
    tuned, base = weight_index(model_dir), weight_index(base_dir)
    factors: dict[str, LoraFactors] = {}
    layouts: dict[str, ModuleLayout] = {}
    dtype = torch.float32
    for key, file in tuned.items():
        if not key.endswith(".weight") or key not in base:
            continue
        if len(file.shape(key)) != 2:
            continue
        W, W0 = file.read(key), base[key].read(key)
        if W0.shape != W.shape:
            raise MergeError(f"{key} has shape {tuple(W.shape)} but {tuple(W0.shape)} in the base model; it was not "
                             "fine-tuned from this base", adapter=name)
        B, A = low_rank_delta(W.double() - W0.double(), rank)
        if B.shape[1] == 0:  # untouched by fine-tuning
            continue
        dtype = torch.float64 if W.dtype == torch.float64 else dtype
        module = key.removesuffix(".weight")
        kind = "embedding" if EMBEDDING.search(module) else "linear"  # PEFT embeddings: ΔW (num, dim) = (B_e A_e)ᵀ
        factors[module], layouts[module] = LoraFactors(A, B), ModuleLayout(kind, tuple(W.shape))
    if not factors:
        raise MergeError("no 2-D weight differs from the base model; nothing to compress", adapter=name)
    out.mkdir(parents=True, exist_ok=True)
    writer = AdapterWriter(OutputJob(out, list(factors), layouts, dtype))
    try:
        for module, f in factors.items():
            writer.add(module, layouts[module], ModuleResult(f))
        writer.finish({"base_model_name_or_path": str(base_dir)})
    except BaseException:
        writer.abort()
        raise
    return out


def as_adapter_dirs(recipe, paths: list[Path], scratch: Path | None) -> list[Path]:
    """The recipe's model paths with every full fine-tuned model replaced by its PT-SVD adapter in ``scratch``
    (a directory the caller removes, also on SIGTERM: the merge's staging area, or validate's temporary one)."""
    full = [i for i, p in enumerate(paths) if is_full_model(p)]
    if not full:
        return paths
    if recipe.method.name != "rmm":
        raise MergeError(f"{paths[full[0]]} is a full model, not a LoRA adapter; only merge_method: rmm accepts full "
                         "fine-tuned models (compressed by truncated SVD, svd_rank)", adapter=recipe.adapters[full[0]].name)
    rank = recipe.settings.get("svd_rank", 16)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"svd_rank must be one positive integer for all modules, got {rank!r}")
    if scratch is None:
        raise ValueError("full fine-tuned models need a scratch directory for their PT-SVD adapters")
    out = list(paths)
    for i in full:
        ref = recipe.adapters[i]
        base = recipe.base_model or (ref.base.partition("@")[0] if ref.base else None)
        if not base or not is_full_model(Path(base)):
            raise MergeError("a full fine-tuned model needs base_model: the local directory of the model it was "
                             "fine-tuned from (config.json + safetensors)", adapter=ref.name)
        out[i] = delta_adapter(Path(paths[i]), Path(base), scratch / f"{i}-{ref.name}", rank, ref.name)
    return out
