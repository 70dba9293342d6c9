"""llama.cpp's LoRA format: a GGUF file of ``<base tensor>.lora_a`` / ``.lora_b`` pairs, for ``llama-server --lora``.

llama.cpp adds ``scale · B @ A`` to every base tensor the file names, with one ``adapter.lora.alpha`` for the whole
file and the rank read from each tensor (``llama_adapter_lora_weight::get_scale``)::

    scale = alpha / rank_of_this_tensor        (alpha 0 or absent: scale 1)

and reads nothing else of PEFT's config: no rank_pattern, alpha_pattern or use_rslora. So every module is written at
one rank R (smaller ones zero-padded, which is exact) with alpha = R, and each module's own PEFT scale is folded into
B first: whatever the adapter's config says, llama.cpp computes exactly PEFT's ΔW.

Names and layout are those of llama.cpp's ``convert_lora_to_gguf.py``: the base's GGUF tensor name (``gguf``'s
``TensorNameMap``: ``model.layers.0.self_attn.q_proj`` → ``blk.0.attn_q.weight``), A as (R, in) and B as (out, R),
which ggml sees as ne = [in, R] and [R, out]. For the llama architecture the converter reorders the rows of q and k
(``LlamaModel.permute``: rotary halves interleaved per head), so B's rows of those modules are reordered the same way.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowrank_methods.core.errors import AdapterError, BaseModelError, OutputError, OutputExistsError, short
from lowrank_methods.core.types import LoraFactors

GGUF_FILE = "adapter.gguf"          # what `--for llama.cpp` writes beside the PEFT files
WRITER_KEY = "mergekit_lowrank.format_version"  # marks a file as ours: only such a file is ever replaced
FORMAT_VERSION = 1
# Hugging Face architectures → (llama.cpp architecture, q/k rows reordered), as convert_hf_to_gguf.py converts them
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
PERMUTED = {arch for arch, permuted in ARCHITECTURES.values() if permuted}
TENSOR_TYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


@dataclass(frozen=True)
class GgufBase:
    """What naming and checking the tensors needs to know of the base model (from its GGUF file or config.json)."""

    arch: str                                   # llama.cpp's architecture name, e.g. "llama"
    n_blocks: int
    n_head: int
    n_head_kv: int
    tensors: dict[str, tuple[int, ...]] | None  # GGUF tensor name → ne (from a GGUF base only)
    tied_embeddings: bool = False
    source: str = ""                            # for messages

    def tensor_name(self, module: str) -> str:
        """The base tensor ``module``'s update applies to, as llama.cpp names it (``blk.0.attn_q.weight``)."""
        name = _name_map(self.arch, self.n_blocks).get_name(module)
        layer = re.search(r"\.(\d+)\.", module)
        if name is None and layer and int(layer.group(1)) >= self.n_blocks:
            raise BaseModelError(f"the base {short(self.source, 80)} has {self.n_blocks} layers, this module is in layer "
                                 f"{layer.group(1)}; is it the adapter's base model?", module=module)
        if name is None:
            raise AdapterError(f"llama.cpp has no {self.arch} tensor for this module; only the base model's own "
                               "weights (attention, MLP, output) can carry a GGUF LoRA", module=module)
        if name == "output" and self.tied_embeddings:
            raise AdapterError("the base model ties lm_head to the token embeddings, so llama.cpp has no output "
                               "tensor to add this update to; retrain without lm_head in target_modules", module=module)
        return f"{name}.weight"

    def check_shape(self, module: str, name: str, shape: tuple[int, int]) -> None:
        """``shape`` = (out, in) of ΔW must be the base tensor's, whose ne is [in, out]."""
        if self.tensors is None:
            return
        if name not in self.tensors:
            raise BaseModelError(f"the base {short(self.source, 80)} has no tensor {name}; is it the adapter's base "
                                 "model?", module=module)
        if tuple(self.tensors[name]) != (shape[1], shape[0]):
            raise BaseModelError(f"ΔW is {shape[0]}×{shape[1]} but {name} of the base {short(self.source, 80)} is "
                                 f"{self.tensors[name][1]}×{self.tensors[name][0]}; is it the adapter's base model?",
                                 module=module)

    def reorder_rows(self, name: str, B: torch.Tensor) -> torch.Tensor:
        """B with its rows in llama.cpp's order: for the llama architecture's q and k, the converter's permutation
        ``reshape(h, 2, d/2, ·).swapaxes(1, 2)`` per head (h = n_head for q, n_head_kv for k)."""
        if self.arch not in PERMUTED or not name.endswith((".attn_q.weight", ".attn_k.weight")):
            return B
        heads = self.n_head if name.endswith(".attn_q.weight") else self.n_head_kv
        if B.shape[0] % (2 * heads):
            raise BaseModelError(f"{name} has {B.shape[0]} rows, not a multiple of 2 × {heads} heads; the base's "
                                 "head counts do not fit this adapter")
        return B.reshape(heads, 2, B.shape[0] // heads // 2, B.shape[1]).swapaxes(1, 2).reshape(B.shape)


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_blocks: int):
    """``gguf``'s HF → GGUF tensor name map of an architecture (building one takes ~10 ms: built once)."""
    import gguf

    return gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_blocks)


def read_base(path: Path, source: str | None = None) -> GgufBase:
    """The base as a GGUF model file (tensor names and shapes checked too), or its config.json (a file, or a
    directory holding one)."""
    source = source or str(path)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, source)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise BaseModelError(f"{short(source, 120)} is neither a GGUF model file nor a model directory with "
                             "config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaseModelError(f"cannot read {short(str(config), 120)} as JSON ({short(str(e), 80)})") from e
    data = data.get("text_config", data) if isinstance(data, dict) and "architectures" not in data else data
    archs = data.get("architectures") if isinstance(data, dict) else None
    hf_arch = archs[0] if isinstance(archs, list) and archs else None
    if hf_arch not in ARCHITECTURES:
        raise BaseModelError(f"GGUF export knows the architectures {', '.join(ARCHITECTURES)}; the base "
                             f"{short(source, 80)} is {short(hf_arch, 60)}")
    try:
        n_head = int(data["num_attention_heads"])
        return GgufBase(ARCHITECTURES[hf_arch][0], int(data["num_hidden_layers"]), n_head,
                        int(data.get("num_key_value_heads") or n_head), None,
                        bool(data.get("tie_word_embeddings", False)), source)
    except (KeyError, TypeError, ValueError) as e:
        raise BaseModelError(f"config.json of {short(source, 80)} lacks num_hidden_layers / num_attention_heads "
                             f"({short(str(e), 60)})") from e


def _from_gguf(path: Path, source: str) -> GgufBase:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors, …, for anything that is not GGUF
        raise BaseModelError(f"{short(source, 120)} is not a readable GGUF file ({short(str(e), 80)})") from e

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if field("general.type", "model") != "model":
        raise BaseModelError(f"{short(source, 120)} is a GGUF {field('general.type')}, not a model")
    if arch not in {a for a, _ in ARCHITECTURES.values()}:
        raise BaseModelError(f"GGUF export knows the llama.cpp architectures "
                             f"{', '.join(sorted({a for a, _ in ARCHITECTURES.values()}))}; {short(source, 80)} is "
                             f"{short(arch, 40)}")
    n_head = int(field(f"{arch}.attention.head_count", 0))
    tensors = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    return GgufBase(arch, int(field(f"{arch}.block_count", 0)), n_head,
                    int(field(f"{arch}.attention.head_count_kv", n_head)), tensors,
                    "output.weight" not in tensors, source)


def gguf_tensors(factors: dict[str, LoraFactors], base: GgufBase) -> tuple[int, dict[str, torch.Tensor]]:
    """(R, {GGUF name: tensor}) for ``factors`` (ΔW = B @ A, scale 1, in the base layout): every module padded to
    the largest rank R with zeros, B's rows in llama.cpp's order. Zero-rank modules are left out."""
    kept = {m: f for m, f in factors.items() if f.rank > 0}
    if not kept:
        raise AdapterError("the adapter has no nonzero module; there is nothing to export")
    R = max(f.rank for f in kept.values())
    out: dict[str, torch.Tensor] = {}
    for module, f in kept.items():
        name = base.tensor_name(module)
        base.check_shape(module, name, f.shape)
        f = f.padded(R)
        out[f"{name}.lora_a"] = f.A
        out[f"{name}.lora_b"] = base.reorder_rows(name, f.B)
    return R, out


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], base: GgufBase, alpha: float, dtype: torch.dtype,
               *, overwrite: bool = False) -> None:
    """Write the GGUF LoRA file ``path`` atomically (a temporary file beside it, renamed into place). An existing
    file is replaced only with ``overwrite`` and only when it is a GGUF LoRA we wrote."""
    import gguf

    check_gguf_output(path, overwrite=overwrite)
    kind = getattr(gguf.GGMLQuantizationType, TENSOR_TYPES.get(dtype, "F32"))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_uint32(WRITER_KEY, FORMAT_VERSION)
        for name, t in tensors.items():
            array, raw = _numpy(t, kind)
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any file the user writes (mkstemp made it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _numpy(t: torch.Tensor, kind) -> tuple:
    """(array, raw dtype for ``add_tensor``) of a tensor stored as ``kind``: bfloat16 goes as its raw 16-bit words."""
    import gguf

    t = t.detach().contiguous()
    if kind == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), kind
    return t.to(torch.float16 if kind == gguf.GGMLQuantizationType.F16 else torch.float32).numpy(), None


def check_gguf_output(path: Path, *, overwrite: bool) -> None:
    """Refuse an OUT that exists unless ``overwrite`` and it is a GGUF LoRA this tool wrote; refuse a missing
    parent directory."""
    if not path.parent.is_dir():
        raise OutputError(f"the directory of {short(str(path), 120)} does not exist")
    if path.is_dir():
        raise OutputExistsError(f"{short(str(path), 120)} is a directory; give the path of the .gguf file to write")
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise OutputExistsError(f"{short(str(path), 120)} exists", flag="--overwrite",
                                flag_hint="pass --overwrite to replace it")
    if path.is_symlink() or not is_our_gguf(path):
        raise OutputExistsError(f"{short(str(path), 120)} is not a GGUF LoRA written by mergekit-lowrank; it is "
                                "never replaced: choose another path")


def is_our_gguf(path: Path) -> bool:
    import gguf

    try:
        return WRITER_KEY in gguf.GGUFReader(path).fields
    except Exception:
        return False


def folded_dtype(dtype: torch.dtype, scales: list[float]) -> torch.dtype:
    """The stored dtype: the adapter's own when folding changed no value (every scale exactly 1), else float32,
    so that a folded scale costs no rounding."""
    return dtype if dtype in TENSOR_TYPES and all(s == 1.0 for s in scales) else torch.float32


__all__ = ["GGUF_FILE", "GgufBase", "read_base", "gguf_tensors", "write_gguf", "folded_dtype"]


@dataclass(frozen=True)
class GgufExport:
    """What ``export_gguf`` wrote: the file, its rank and alpha, how many modules were padded to that rank."""

    path: Path
    rank: int
    modules: int
    padded: int
    dtype: torch.dtype


def export_gguf(adapter: Path, base: GgufBase, out: Path, *, overwrite: bool = False,
                allow_pickle: bool = False) -> GgufExport:
    """The PEFT adapter directory ``adapter`` as llama.cpp's GGUF LoRA ``out``, computing the same ΔW in llama.cpp
    as PEFT does: each module's scale (rank_pattern, alpha_pattern, rsLoRA included) folded into B, one rank."""
    from lowrank_methods.formats.peft import AdapterSource

    source = AdapterSource.open(adapter, allow_pickle=allow_pickle)
    if source.extra_keys:
        raise AdapterError(f"the adapter carries whole tensors ({short(source.extra_keys[0], 80)}, modules_to_save); "
                           "a GGUF LoRA holds only lora_a/lora_b pairs, so llama.cpp would serve a different model",
                           adapter=source.name)
    factors = {}
    for module in source.modules:
        if source.layout(module).kind != "linear":
            raise AdapterError(f"GGUF export writes linear modules; this one is a {source.layout(module).kind} LoRA",
                               adapter=source.name, module=module)
        factors[module] = source.read_module(module)
    rank, tensors = gguf_tensors(factors, base)
    dtype = folded_dtype(source.dtype, [source.scale(m) for m in source.modules])
    write_gguf(out, tensors, base, alpha=rank, dtype=dtype, overwrite=overwrite)
    kept = [f for f in factors.values() if f.rank > 0]
    return GgufExport(out, rank, len(kept), sum(f.rank < rank for f in kept), dtype)
