"""LoRA factors and lazy, per-module reading of PEFT adapters.

Every module of every adapter comes out as ``LoraFactors(A, B)`` with ``ΔW = B @ A`` in the base
weight's own layout and the LoRA scale already folded into ``B``:

    s = lora_alpha / r            (or lora_alpha / sqrt(r) with use_rslora)
    linear:            A (r, in),  B (out, r)           -> A,            s·B
    fan_in_fan_out:    ΔW = (B A)^T                     -> B^T,          s·A^T
    embedding:         ΔW = (B_emb A_emb)^T             -> B_emb^T,      s·A_emb^T
    convolution:       A (r, in, *k), B (out, r, 1..)   -> A.flatten(1), s·B.flatten(1)

``ModuleLayout`` remembers how to go back, so a writer can emit PEFT tensors again.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch

from .errors import MergeError

LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<name>[^.]+))?$"
)
# PEFT options whose adapters are not a plain sum of B @ A; merging them as LoRA would be silently wrong.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA adapters rescale the whole weight and cannot be merged as B @ A; merge them into the base first",
    "lora_bias": "adapters with lora_bias carry a bias that B @ A does not; retrain without lora_bias",
    "use_qalora": "QA-LoRA adapters are not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "target_parameters": "adapters on target_parameters (e.g. MoE experts) are not supported",
    "trainable_token_indices": "adapters with trainable_token_indices are not supported",
}
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class LoraFactors:
    """One module's update ΔW = B @ A, scale folded into B. Shapes: A (r, n), B (m, r)."""

    A: torch.Tensor
    B: torch.Tensor

    def __post_init__(self):
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"LoraFactors needs A (r, n) and B (m, r), got {tuple(self.A.shape)} and {tuple(self.B.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def to(self, device=None, dtype=None) -> "LoraFactors":
        return LoraFactors(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype))

    @staticmethod
    def zeros(shape: tuple[int, int], dtype=torch.float32, device=None) -> "LoraFactors":
        """The rank-0 update: what an adapter that lacks a module contributes."""
        m, n = shape
        return LoraFactors(torch.zeros(0, n, dtype=dtype, device=device), torch.zeros(m, 0, dtype=dtype, device=device))


@dataclass(frozen=True)
class ModuleLayout:
    """How a module's PEFT tensors map to the normalised (m, n) layout, and back."""

    kind: Literal["linear", "embedding", "conv"]
    shape: tuple[int, int]  # (m, n) of ΔW in the base weight's layout (flattened for convolutions)
    fan_in_fan_out: bool = False
    kernel: tuple[int, ...] = ()  # trailing dims of a convolution's lora_A

    def peft_tensors(self, f: LoraFactors) -> dict[str, torch.Tensor]:
        """Factors with scale 1 -> PEFT tensor suffixes (inverse of the normalisation above)."""
        A, B = f.A, f.B
        if self.kind == "embedding":
            return {"lora_embedding_A": B.T.contiguous(), "lora_embedding_B": A.T.contiguous()}
        if self.kind == "conv":
            ones = (1,) * len(self.kernel)
            A, B = A.reshape(A.shape[0], -1, *self.kernel), B.reshape(*B.shape, *ones)
        elif self.fan_in_fan_out:
            A, B = B.T, A.T
        return {"lora_A.weight": A.contiguous(), "lora_B.weight": B.contiguous()}


@dataclass
class AdapterSource:
    """A PEFT LoRA adapter directory opened lazily: config parsed, key index built, no tensor read."""

    name: str
    path: Path
    config: dict
    keys: dict[str, dict[str, str]]  # module -> {part: tensor key}
    extra_keys: list[str] = field(default_factory=list)  # modules_to_save copies etc.
    weights_file: Path | None = None
    _file: "SafetensorsFile | None" = field(default=None, repr=False)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, name: str | None = None, *, allow_pickle: bool = False) -> "AdapterSource":
        path = Path(path)
        name = name or path.name
        cfg_file = path / "adapter_config.json"
        if not cfg_file.is_file():
            raise MergeError(f"no adapter_config.json in {path}; point the recipe at a PEFT adapter directory", adapter=name)
        try:
            config = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MergeError(f"adapter_config.json is not valid JSON ({e.msg}); re-save the adapter with PEFT", adapter=name) from None
        check_config(config, name)
        weights = path / ADAPTER_FILES[0]
        if not weights.is_file():
            if (path / ADAPTER_FILES[1]).is_file():
                if not allow_pickle:
                    raise MergeError(
                        "adapter_model.bin is a pickle file; convert it to safetensors or pass --allow-pickle "
                        "(it is then loaded with weights_only=True)",
                        adapter=name,
                    )
                weights = path / ADAPTER_FILES[1]
            else:
                raise MergeError(f"no adapter_model.safetensors in {path}", adapter=name)
        all_keys = _list_keys(weights, name)
        keys: dict[str, dict[str, str]] = {}
        extra: list[str] = []
        for key in all_keys:
            if "lora_magnitude_vector" in key:
                raise MergeError(f"{UNSUPPORTED_OPTIONS['use_dora']} (found {key})", adapter=name)
            if ".lora_B.bias" in key or ".lora_A.bias" in key:
                raise MergeError(f"{UNSUPPORTED_OPTIONS['lora_bias']} (found {key})", adapter=name)
            m = LORA_KEY.match(key.removesuffix(".weight"))
            if m:
                keys.setdefault(m["module"], {})[m["part"]] = key
            else:
                extra.append(key)
        for module, parts in keys.items():
            if not ({"lora_A", "lora_B"} <= parts.keys() or {"lora_embedding_A", "lora_embedding_B"} <= parts.keys()):
                raise MergeError(f"has only {sorted(parts)}; the adapter file is incomplete", adapter=name, module=module)
        if not keys:
            raise MergeError("contains no LoRA tensors (lora_A/lora_B); is it a LoRA adapter?", adapter=name)
        return cls(name=name, path=path, config=config, keys=keys, extra_keys=extra, weights_file=weights)

    # -- per-module facts -------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        return list(self.keys)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def rank_alpha(self, module: str) -> tuple[int, float]:
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        return int(r), float(alpha)

    def scale(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    # -- reading ------------------------------------------------------------------------------
    def read_raw(self, key: str) -> torch.Tensor:
        if self.weights_file.suffix == ".bin":
            return _pickle_state(self.weights_file)[key]
        return self._reader().read(key)

    def shape_of(self, key: str) -> tuple[int, ...]:
        if self.weights_file.suffix == ".bin":
            return tuple(_pickle_state(self.weights_file)[key].shape)
        return self._reader().shape(key)

    def _reader(self) -> "SafetensorsFile":
        if self._file is None:
            self._file = SafetensorsFile(self.weights_file)
        return self._file

    def layout(self, module: str) -> ModuleLayout:
        """The module's layout from tensor shapes alone (header only, no data read); checks ranks."""
        parts = self.keys[module]
        embedding = "lora_embedding_A" in parts
        a = self.shape_of(parts["lora_embedding_A" if embedding else "lora_A"])
        b = self.shape_of(parts["lora_embedding_B" if embedding else "lora_B"])
        r, _ = self.rank_alpha(module)
        if a[0] != r or b[1] != r:
            raise MergeError(
                f"tensors have rank {a[0]}/{b[1]} but the config says r={r} (check r and rank_pattern in adapter_config.json)",
                adapter=self.name, module=module,
            )
        if embedding:
            return ModuleLayout("embedding", (a[1], b[0]))
        if len(a) > 2:
            if any(d != 1 for d in b[2:]):
                raise MergeError(f"convolution lora_B has kernel {b[2:]}, expected 1s", adapter=self.name, module=module)
            return ModuleLayout("conv", (b[0], math.prod(a[1:])), kernel=tuple(a[2:]))
        if self.config.get("fan_in_fan_out"):
            return ModuleLayout("linear", (a[1], b[0]), fan_in_fan_out=True)
        return ModuleLayout("linear", (b[0], a[1]))

    def read_module(self, module: str, dtype=torch.float32) -> LoraFactors:
        """Read one module's factors, normalised to ΔW = B @ A in the base layout, scale folded into B."""
        return self.to_factors(module, *self.read_stored(module), dtype=dtype)

    def read_stored(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's (A, B) tensors exactly as stored: file reads only, no arithmetic (safe for an I/O thread)."""
        parts = self.keys[module]
        embedding = "lora_embedding_A" in parts
        return (self.read_raw(parts["lora_embedding_A" if embedding else "lora_A"]),
                self.read_raw(parts["lora_embedding_B" if embedding else "lora_B"]))

    def to_factors(self, module: str, a: torch.Tensor, b: torch.Tensor, dtype=torch.float32) -> LoraFactors:
        """Stored (A, B) → LoraFactors in the base layout with the scale folded into B; refuses NaN/Inf."""
        for t in (a, b):
            if not torch.isfinite(t).all():
                raise MergeError("factors contain NaN or Inf; the adapter is corrupt or diverged in training",
                                 adapter=self.name, module=module)
        layout = self.layout(module)
        s = self.scale(module)
        a, b = a.to(dtype), b.to(dtype)
        if layout.kind == "embedding" or layout.fan_in_fan_out:
            return LoraFactors(b.T, s * a.T)
        return LoraFactors(a.flatten(1), s * b.flatten(1))

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype of the factors (read from the first module)."""
        parts = next(iter(self.keys.values()))
        return self.read_raw(parts.get("lora_A") or parts["lora_embedding_A"]).dtype


def check_config(config: dict, name: str) -> None:
    """Refuse adapter configs whose update is not ``scale · B @ A`` (one line each)."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise MergeError(f"peft_type is {config.get('peft_type')!r}; only LORA adapters can be merged", adapter=name)
    for option, why in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise MergeError(why, adapter=name)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva", "loftq")):
        raise MergeError(
            f"init_lora_weights={init!r} also changes the base weights; convert the adapter to a plain LoRA first "
            "(PEFT's path_initial_model_for_weight_conversion)",
            adapter=name,
        )


def check_compatible(sources: Iterable[AdapterSource], *, base_model: str | None = None) -> str | None:
    """All adapters must share one base model (unless the recipe names it) and agree on fan_in_fan_out."""
    sources = list(sources)
    bases = {s.base_model for s in sources if s.base_model}
    if base_model is None and len(bases) > 1:
        listing = ", ".join(f"{s.name}: {s.base_model}" for s in sources)
        raise MergeError(f"adapters were trained on different base models ({listing}); set base_model in the recipe to merge anyway")
    fifo = {bool(s.config.get("fan_in_fan_out")) for s in sources}
    if len(fifo) > 1:
        raise MergeError("adapters disagree on fan_in_fan_out, so they cannot target the same base model")
    return base_model or (bases.pop() if bases else None)


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _list_keys(weights: Path, name: str) -> list[str]:
    try:
        if weights.suffix == ".bin":
            return list(_pickle_state(weights))
        return list(SafetensorsFile(weights).entries)
    except MergeError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise MergeError(f"cannot read {weights.name} ({e}); the file is corrupt or truncated", adapter=name) from None


class SafetensorsFile:
    """A safetensors file read tensor by tensor with positioned reads (``os.pread``).

    Unlike the mmap behind ``safetensors.safe_open``, pages of modules already merged never stay mapped
    into the process, so peak memory is bounded by the modules in flight, not by the file size.
    """

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError(f"header length {size} is implausible")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + size
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > self.path.stat().st_size:
            raise ValueError("the file is shorter than its header says (truncated)")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        buf = bytearray(end - begin)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < len(buf):
                n = os.preadv(fd, [view[done:]], self.data_start + begin + done)
                if n <= 0:
                    raise OSError(f"short read in {self.path.name}")
                done += n
        finally:
            os.close(fd)
        dtype = self.DTYPES[entry["dtype"]]
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


_PICKLES: dict[Path, dict] = {}


def _pickle_state(path: Path) -> dict:
    """A legacy pickle adapter, loaded once with weights_only=True (adapters are small)."""
    if path not in _PICKLES:
        _PICKLES[path] = torch.load(path, map_location="cpu", weights_only=True)
    return _PICKLES[path]
