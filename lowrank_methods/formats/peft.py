"""The PEFT LoRA format: its tensor keys, lazy per-module reading (``AdapterSource``), writing (``AdapterWriter``).

Every module of every adapter comes out as ``LoraFactors(A, B)`` with ``ΔW = B @ A`` in the base
weight's own layout and the LoRA scale already folded into ``B``:

    s = lora_alpha / r            (or lora_alpha / sqrt(r) with use_rslora)
    linear:            A (r, in),  B (out, r)           -> A,            s·B
    fan_in_fan_out:    ΔW = (B A)^T                     -> B^T,          s·A^T
    embedding:         ΔW = (B_emb A_emb)^T             -> B_emb^T,      s·A_emb^T
    convolution:       A (r, in, *k), B (out, r, 1..)   -> A.flatten(1), s·B.flatten(1)

``ModuleLayout`` remembers how to go back, so a writer can emit PEFT tensors again. Keys are
``base_model.model.<module>.<part>``: ``tensor_key``, ``split_lora_key`` and the helpers beside them are the only
place the package spells them out.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch

from lowrank_methods.core.types import LoraFactors, ModuleResult
from lowrank_methods.formats.peft_config import (CONFIG_FILE, UNSUPPORTED_OPTIONS, AdapterConfig, parse_adapter_config,
                                                 read_adapter_config, written_config)
from lowrank_methods.formats.peft_config import check_config as _check_config
from lowrank_methods.core.errors import AdapterError, CorruptAdapterError, MergeError, UnsupportedAdapterError, short
from lowrank_methods.formats.safetensors_io import DTYPE_NAMES, SafetensorsFile, SafetensorsStream
from lowrank_methods.formats.writer import OutputJob, merged_factors

PREFIX = "base_model.model."  # what PEFT's save_pretrained puts before every module name
LINEAR_PARTS = ("lora_A.weight", "lora_B.weight")  # the tensors of a module, after its name
EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")
LORA_PARTS = LINEAR_PARTS + EMBEDDING_PARTS
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<name>[^.]+))?$"
)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what PEFT trains and saves

__all__ = ["AdapterSource", "AdapterWriter", "LoraFactors", "ModuleLayout", "SafetensorsFile", "UNSUPPORTED_OPTIONS",
           "check_compatible", "check_config", "LORA_KEY", "LORA_PARTS", "ADAPTER_FILES", "tensor_key", "split_lora_key",
           "base_name", "saved_key", "saved_module"]


# -- tensor keys ----------------------------------------------------------------------------------------------
def tensor_key(module: str, part: str) -> str:
    """The key PEFT saves a module's tensor under: ``tensor_key("model.q", "lora_A.weight")`` is
    ``base_model.model.model.q.lora_A.weight``."""
    return f"{PREFIX}{module}.{part}"


def split_lora_key(key: str) -> tuple[str, str] | None:
    """(module, part) of a LoRA tensor key, part one of lora_A, lora_B, lora_embedding_A, lora_embedding_B (the
    prefix, an adapter name and ``.weight`` may be there or not); None for any other tensor."""
    m = LORA_KEY.match(key.removesuffix(".weight"))
    return (m["module"], m["part"]) if m else None


def base_name(key: str) -> str:
    """The base model's own name for an adapter key (or a PeftModel's module name): without PEFT's prefix."""
    return key.removeprefix(PREFIX)


def saved_key(name: str) -> str:
    """The key an adapter saves the base tensor ``name`` under when it carries it whole (modules_to_save)."""
    return f"{PREFIX}{name}"


def saved_module(key: str) -> str:
    """The module a tensor carried whole (modules_to_save) belongs to: ``…lm_head.weight`` -> ``lm_head``."""
    return base_name(key).removesuffix(".weight").removesuffix(".bias")


@dataclass(frozen=True)
class ModuleLayout:
    """How a module's PEFT tensors map to the normalised (m, n) layout, and back."""

    kind: Literal["linear", "embedding", "conv"]
    shape: tuple[int, int]  # (m, n) of ΔW in the base weight's layout (flattened for convolutions)
    fan_in_fan_out: bool = False
    kernel: tuple[int, ...] = ()  # trailing dims of a convolution's lora_A

    @property
    def transposed(self) -> bool:
        """PEFT stores ΔW transposed for this module: ΔW = (B A)^T (embeddings, fan_in_fan_out linears)."""
        return self.kind == "embedding" or self.fan_in_fan_out

    def peft_tensors(self, f: LoraFactors) -> dict[str, torch.Tensor]:
        """Factors with scale 1 -> PEFT tensor suffixes (inverse of the normalisation above)."""
        A, B = f.A, f.B
        if self.kind == "embedding":
            return dict(zip(EMBEDDING_PARTS, (B.T.contiguous(), A.T.contiguous())))
        if self.kind == "conv":
            ones = (1,) * len(self.kernel)
            A, B = A.reshape(A.shape[0], -1, *self.kernel), B.reshape(*B.shape, *ones)
        elif self.fan_in_fan_out:
            A, B = B.T, A.T
        return dict(zip(LINEAR_PARTS, (A.contiguous(), B.contiguous())))


@dataclass
class AdapterSource:
    """A PEFT LoRA adapter directory opened lazily: config parsed, key index built, no tensor read.

    ``config`` is adapter_config.json as read (a plain dict); ``settings`` is the same, validated and typed
    (``adapter_config.AdapterConfig``, with rank_pattern / alpha_pattern compiled)."""

    name: str
    path: Path
    config: dict
    keys: dict[str, dict[str, str]]  # module -> {part: tensor key}
    extra_keys: list[str] = field(default_factory=list)  # modules_to_save copies etc.
    weights_file: Path | None = None
    _file: "SafetensorsFile | None" = field(default=None, repr=False)
    settings: AdapterConfig | None = field(default=None, repr=False)
    _rank_alpha: dict = field(default_factory=dict, repr=False)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, name: str | None = None, *, allow_pickle: bool = False) -> "AdapterSource":
        path = Path(path)
        name = name or path.name
        if not (path / "adapter_config.json").is_file():
            raise AdapterError(f"no adapter_config.json in {short(str(path), 120)}; point the recipe at a PEFT adapter "
                               "directory", adapter=name)
        settings, config = read_adapter_config(path, adapter=name)
        weights = path / ADAPTER_FILES[0]
        reader = None
        if weights.is_file():
            reader = SafetensorsFile(weights, adapter=name)
            all_keys = list(reader.entries)
        elif (path / ADAPTER_FILES[1]).is_file():
            if not allow_pickle:
                raise AdapterError("adapter_model.bin is a pickle file; convert it to safetensors", adapter=name,
                                   flag="--allow-pickle", flag_hint="pass --allow-pickle to load it with weights_only=True")
            weights = path / ADAPTER_FILES[1]
            all_keys = list(_pickle_state(weights, name))
        else:
            raise AdapterError(f"no adapter_model.safetensors in {short(str(path), 120)}", adapter=name)
        keys: dict[str, dict[str, str]] = {}
        extra: list[str] = []
        for key in all_keys:
            if "lora_magnitude_vector" in key:
                raise UnsupportedAdapterError(f"{UNSUPPORTED_OPTIONS['use_dora']} (found {short(key, 80)})", adapter=name)
            if ".lora_B.bias" in key or ".lora_A.bias" in key:
                raise UnsupportedAdapterError(f"{UNSUPPORTED_OPTIONS['lora_bias']} (found {short(key, 80)})", adapter=name)
            lora = split_lora_key(key)
            if lora:
                module, part = lora
                parts = keys.setdefault(module, {})
                if part in parts:  # e.g. x.lora_A.weight and x.lora_A.default.weight: which one is meant?
                    raise CorruptAdapterError(f"has two {part} tensors ({short(parts[part], 80)} and "
                                              f"{short(key, 80)})", adapter=name, module=module)
                parts[part] = key
            else:
                extra.append(key)
        for module, parts in keys.items():
            if not ({"lora_A", "lora_B"} <= parts.keys() or {"lora_embedding_A", "lora_embedding_B"} <= parts.keys()):
                raise CorruptAdapterError(f"has only {sorted(parts)}; the adapter file is incomplete",
                                          adapter=name, module=module)
        if not keys:
            raise AdapterError("contains no LoRA tensors (lora_A/lora_B); is it a LoRA adapter?", adapter=name)
        source = cls(name=name, path=path, config=config, keys=keys, extra_keys=extra, weights_file=weights,
                     _file=reader, settings=settings)
        for module in keys:  # from the header alone: a malformed LoRA tensor is refused before anything is read
            source._factor_shapes(module)
        return source

    # -- per-module facts -------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        return list(self.keys)

    @property
    def base_model(self) -> str | None:
        return self._settings().base_model_name_or_path

    def _settings(self) -> AdapterConfig:
        if self.settings is None:  # built by hand from a dict: validate it the same way
            self.settings, _ = parse_adapter_config(json.dumps(self.config).encode(), adapter=self.name)
        return self.settings

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, lora_alpha) for ``module`` after rank_pattern / alpha_pattern, as PEFT resolves them."""
        cached = self._rank_alpha.get(module)
        if cached is None:
            cached = self._rank_alpha[module] = self._settings().rank_alpha(module)
        return cached

    def scale(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        s = alpha / math.sqrt(r) if self._settings().use_rslora else alpha / r
        if not math.isfinite(s):
            raise CorruptAdapterError(f"the LoRA scale lora_alpha/r = {alpha}/{r} is not finite", adapter=self.name,
                                      module=module)
        return s

    # -- reading ------------------------------------------------------------------------------
    def read_raw(self, key: str) -> torch.Tensor:
        if self.weights_file.suffix == ".bin":
            return _pickle_state(self.weights_file, self.name)[key]
        return self._reader().read(key)

    def shape_of(self, key: str) -> tuple[int, ...]:
        if self.weights_file.suffix == ".bin":
            return tuple(_pickle_state(self.weights_file, self.name)[key].shape)
        return self._reader().shape(key)

    def dtype_of(self, key: str) -> torch.dtype:
        if self.weights_file.suffix == ".bin":
            return _pickle_state(self.weights_file, self.name)[key].dtype
        return self._reader().dtype(key)

    def _reader(self) -> "SafetensorsFile":
        if self._file is None:
            self._file = SafetensorsFile(self.weights_file, adapter=self.name)
        return self._file

    def _factor_shapes(self, module: str) -> tuple[bool, tuple[int, ...], tuple[int, ...]]:
        """(embedding?, shape of A, shape of B), checked to be LoRA factors: matrices (or a convolution's
        kernels, B with 1s past its rank) of a floating dtype."""
        parts = self.keys[module]
        embedding = "lora_embedding_A" in parts
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        a, b = (self.shape_of(parts[n]) for n in names)
        if embedding and (len(a) != 2 or len(b) != 2) or not embedding and (len(a) < 2 or len(b) != len(a)):
            raise CorruptAdapterError(
                f"LoRA tensors have shapes {short(list(a), 40)} and {short(list(b), 40)}; they must be matrices "
                "(or convolution kernels)", adapter=self.name, module=module)
        if len(a) > 2 and any(d != 1 for d in b[2:]):
            raise CorruptAdapterError(f"convolution lora_B has kernel {short(list(b[2:]), 40)}, expected 1s",
                                      adapter=self.name, module=module)
        for part in names:
            dtype = self.dtype_of(parts[part])
            if dtype not in FACTOR_DTYPES:
                raise UnsupportedAdapterError(
                    f"{part} is stored as {DTYPE_NAMES.get(dtype, dtype)}; only float16, bfloat16, float32 and "
                    "float64 LoRA factors can be merged", adapter=self.name, module=module)
        return embedding, a, b

    def layout(self, module: str) -> ModuleLayout:
        """The module's layout from tensor shapes alone (header only, no data read); checks ranks."""
        embedding, a, b = self._factor_shapes(module)
        r, _ = self.rank_alpha(module)
        if a[0] != r or b[1] != r:
            raise AdapterError(
                f"tensors have rank {a[0]}/{b[1]} but the config says r={r} (check r and rank_pattern in adapter_config.json)",
                adapter=self.name, module=module,
            )
        if embedding:
            return ModuleLayout("embedding", (a[1], b[0]))
        if len(a) > 2:
            return ModuleLayout("conv", (b[0], math.prod(a[1:])), kernel=tuple(a[2:]))
        if self._settings().fan_in_fan_out:
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
        layout = self.layout(module)  # shapes, dtypes and rank first: a malformed module never reaches arithmetic
        for t in (a, b):
            if not torch.isfinite(t).all():
                raise CorruptAdapterError("factors contain NaN or Inf; the adapter is corrupt or diverged in training",
                                          adapter=self.name, module=module)
        s = self.scale(module)
        a, b = a.to(dtype), b.to(dtype)
        if layout.transposed:
            return LoraFactors(b.T, s * a.T)
        return LoraFactors(a.flatten(1), s * b.flatten(1))

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype of the factors (of the first module's A; from the header, no data read)."""
        parts = next(iter(self.keys.values()))
        return self.dtype_of(parts.get("lora_A") or parts["lora_embedding_A"])


class AdapterWriter:
    """Streams merged modules into a flat PEFT adapter in ``job.path``, as vLLM and ``PeftModel.from_pretrained``
    read it: ``tensor_key`` keys with no adapter name, and ``peft_config.written_config`` (scale 1)."""

    def __init__(self, job: OutputJob):
        self.path = job.path
        self.dtype = job.dtype
        names = [tensor_key(m, p) for m in job.modules for p in LINEAR_PARTS] + list(job.extra_keys)
        self.stream = SafetensorsStream(self.path / ADAPTER_FILES[0], names)
        self.ranks: dict[str, int] = {}
        self.saved_modules: list[str] = []

    def add(self, module: str, layout: ModuleLayout, result: ModuleResult) -> None:
        factors = merged_factors(result, module, "an adapter")
        if factors.rank == 0:  # nothing to add here: leave the module out of the adapter
            return
        for part, tensor in layout.peft_tensors(factors).items():
            self.stream.add(tensor_key(module, part), tensor.to(self.dtype))
        self.ranks[module] = factors.rank

    def add_extra(self, key: str, tensor: torch.Tensor, module: str) -> None:
        """A full tensor carried over unchanged (modules_to_save)."""
        self.stream.add(key, tensor)
        if module not in self.saved_modules:
            self.saved_modules.append(module)

    def finish(self, config: dict) -> None:
        self.stream.close()
        text = json.dumps(written_config(self.ranks, config, self.saved_modules), indent=2, allow_nan=False)
        (self.path / CONFIG_FILE).write_text(text + "\n")

    def abort(self) -> None:
        self.stream.discard()


@dataclass
class LiveLora:
    """One LoRA layer of a loaded PeftModel, for one adapter: its A-like and B-like parameters (the rank is dim 0
    of the first and dim 1 of the second, as ``ModuleLayout.peft_tensors`` orders them) and its scaling."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    merged: bool


def live_loras(model, adapter: str) -> dict[str, LiveLora]:
    """The LoRA layers of the PeftModel ``model`` that hold ``adapter``, by the base model's module name."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and (adapter in layer.lora_A or adapter in layer.lora_embedding_A):
            if adapter in layer.lora_embedding_A:
                A, B = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
            else:
                A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            found[base_name(name)] = LiveLora(A, B, layer.scaling[adapter], layer.merged)
    return found


def check_config(config: dict, name: str) -> None:
    """Refuse adapter configs whose update is not ``scale · B @ A`` (one line each)."""
    _check_config(config, name)


def check_compatible(sources: Iterable[AdapterSource], *, base_model: str | None = None) -> str | None:
    """All adapters must share one base model (unless the recipe names it) and agree on fan_in_fan_out."""
    sources = list(sources)
    bases = {s.base_model for s in sources if s.base_model}
    if base_model is None and len(bases) > 1:
        listing = ", ".join(f"{s.name}: {short(s.base_model, 60)}" for s in sources)
        raise MergeError(f"adapters were trained on different base models ({listing}); set base_model in the recipe to merge anyway")
    fifo = {bool(s.config.get("fan_in_fan_out")) for s in sources}
    if len(fifo) > 1:
        raise MergeError("adapters disagree on fan_in_fan_out, so they cannot target the same base model")
    return base_model or (bases.pop() if bases else None)


_PICKLES: dict[Path, dict] = {}


def _pickle_state(path: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """A legacy pickle adapter, loaded once with weights_only=True (adapters are small), checked to be a state
    dict of plain tensors."""
    if path in _PICKLES:
        return _PICKLES[path]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it did not write
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise CorruptAdapterError(f"{path.name} holds objects other than tensors; it was not loaded (weights_only)",
                                      adapter=name) from e
        raise CorruptAdapterError(f"{path.name} is not a readable PyTorch checkpoint; the file is corrupt or truncated",
                                  adapter=name) from e
    except OSError as e:
        raise AdapterError(f"cannot read {path.name} ({e.strerror or type(e).__name__})", adapter=name) from e
    except Exception:  # zip errors, EOFError, KeyError, …: torch's own messages are long and multi-line
        raise CorruptAdapterError(f"{path.name} is not a readable PyTorch checkpoint; the file is corrupt or truncated",
                                  adapter=name)
    if not isinstance(state, dict):
        raise CorruptAdapterError(f"{path.name} holds a {type(state).__name__}, not a dict of tensors", adapter=name)
    for key, value in state.items():
        if not isinstance(key, str):
            raise CorruptAdapterError(f"{path.name} has a key {short(key, 40)} that is not a string", adapter=name)
        if not isinstance(value, torch.Tensor):
            raise CorruptAdapterError(f"{path.name} holds {type(value).__name__} under {short(key, 80)}, not a tensor",
                                      adapter=name)
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            raise CorruptAdapterError(f"{path.name} holds a {value.layout} tensor under {short(key, 80)}; "
                                      "only dense tensors are supported", adapter=name)
    state = {k: v.detach() for k, v in state.items()}
    _PICKLES[path] = state
    return state
