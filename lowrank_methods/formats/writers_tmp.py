"""Writers: results go to a temporary sibling directory that is renamed into place only on success.

``AdapterWriter`` writes a flat PEFT adapter (adapter_config.json + adapter_model.safetensors) as
vLLM and ``PeftModel.from_pretrained`` expect: keys ``base_model.model.<module>.lora_A.weight`` with no
adapter name, ``r == lora_alpha`` (scale 1, every input scale folded into the factors), and
``rank_pattern``/``alpha_pattern`` when modules end up with different ranks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import _TYPES as _ST_DTYPES  # torch dtype <-> safetensors dtype names

from lowrank_methods.core.errors import MergeError
from lowrank_methods.formats.peft import ModuleLayout
from lowrank_methods.core.types import ModuleResult
from lowrank_methods.pipeline.staging import StagedOutput

_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def StagedDirectory(out, overwrite: bool = False, stage: StagedOutput | None = None) -> StagedOutput:
    """The staging area a writer writes into: the caller's ``stage``, or a new one it then owns."""
    return stage if stage is not None else StagedOutput(out, overwrite=overwrite)


class SafetensorsStream:
    """Write a safetensors file tensor by tensor, without holding them all in memory.

    The header (8-byte little-endian length + JSON) comes first in the format, so space for it is
    reserved up front from the known tensor names and filled in at close; safetensors allows the
    header to be padded with spaces.
    """

    PER_TENSOR = 192  # generous bound on one header entry besides its name (dtype, 4-d shape, offsets)

    def __init__(self, path: Path, names: list[str], metadata: dict[str, str] | None = None):
        self.metadata = metadata or {"format": "pt"}
        reserve = sum(len(json.dumps(n)) + self.PER_TENSOR for n in names) + len(json.dumps(self.metadata)) + 64
        self.header_size = (reserve + 7) // 8 * 8
        self.file = open(path, "wb")
        self.file.seek(8 + self.header_size)
        self.entries: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        self.file.write(raw)
        self.entries[name] = {"dtype": _DTYPE_NAMES[data.dtype], "shape": list(data.shape),
                              "data_offsets": [self.offset, self.offset + len(raw)]}
        self.offset += len(raw)

    def close(self) -> None:
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.header_size:  # more tensors than announced: never silently corrupt
            raise RuntimeError("safetensors header overflow")
        self.file.seek(0)
        self.file.write(len(header.ljust(self.header_size)).to_bytes(8, "little"))
        self.file.write(header.ljust(self.header_size))
        self.file.close()

    def discard(self) -> None:
        self.file.close()


class AdapterWriter:
    """Streams merged modules into a PEFT adapter directory (see module docstring)."""

    def __init__(self, out, modules: list[str], extra_keys: list[str], *, dtype: torch.dtype, overwrite: bool = False,
                 stage: StagedOutput | None = None):
        self.stage = StagedDirectory(out, overwrite, stage)
        self.dtype = dtype
        names = [f"base_model.model.{m}.{p}" for m in modules for p in ("lora_A.weight", "lora_B.weight")] + extra_keys
        self.stream = SafetensorsStream(self.stage.path / "adapter_model.safetensors", names)
        self.ranks: dict[str, int] = {}
        self.saved_modules: list[str] = []

    @property
    def path(self) -> Path:
        return self.stage.path

    def add(self, module: str, layout: ModuleLayout, result: ModuleResult) -> None:
        factors = merged_factors(result, module, "an adapter")
        if factors.rank == 0:  # nothing to add here: leave the module out of the adapter
            return
        for part, tensor in layout.peft_tensors(factors).items():
            self.stream.add(f"base_model.model.{module}.{part}", tensor.to(self.dtype))
        self.ranks[module] = factors.rank

    def add_extra(self, key: str, tensor: torch.Tensor, module: str) -> None:
        """A full tensor carried over unchanged (modules_to_save)."""
        self.stream.add(key, tensor)
        if module not in self.saved_modules:
            self.saved_modules.append(module)

    def finish(self, config: dict) -> Path:
        self.stream.close()
        (self.path / "adapter_config.json").write_text(json.dumps(self.adapter_config(config), indent=2, allow_nan=False) + "\n")
        return self.stage.path

    def adapter_config(self, source: dict) -> dict:
        ranks = self.ranks
        r = max(ranks.values(), default=1)
        pattern = {_exact_pattern(m): k for m, k in ranks.items() if k != r}
        return {
            "peft_type": "LORA",
            "task_type": source.get("task_type"),
            "base_model_name_or_path": source.get("base_model_name_or_path"),
            "revision": source.get("revision"),
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks),
            "fan_in_fan_out": bool(source.get("fan_in_fan_out", False)),
            "modules_to_save": self.saved_modules or None,
            "use_rslora": False,
            "use_dora": False,
            "lora_bias": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "init_lora_weights": True,
            "inference_mode": True,
            "peft_version": _peft_version(),
        }

    def commit(self) -> Path:
        return self.stage.commit()

    def abort(self) -> None:
        self.stream.discard()
        self.stage.abort()


def merged_factors(result: ModuleResult, module: str, output: str):
    """The merged factors of ``result``, refused when the method gave none (only rmm's bundle tensors)."""
    if result.factors is None:
        raise MergeError(f"the method returned no factors for {module}; it cannot write {output}")
    return result.factors


def open_writer(recipe, stage: StagedOutput, plan, sources, *, extra_keys: list[str], dtype: torch.dtype,
                base: str | None = None, **options):
    """The writer for the recipe's output kind, writing into ``stage``. ``base`` (the shared base model) and
    ``options`` (``shard_size``, ``copy_tokenizer``) are for ``output: model``; the other writers ignore them."""
    if recipe.output == "model":
        from lowrank_methods.formats.full_model import FullModelWriter

        return FullModelWriter(recipe, stage, plan, sources, extra_keys=extra_keys, base=base, **options)
    if recipe.output == "adapter":
        return AdapterWriter(stage.out, plan.modules, extra_keys, dtype=dtype, stage=stage)
    if recipe.output == "bundle":
        from lowrank_methods.formats.bundle import BundleWriter

        return BundleWriter(recipe, stage.out, plan, sources, extra_keys=extra_keys, dtype=dtype, stage=stage)
    raise MergeError(f"output: {recipe.output} is not available for method {recipe.method.name!r}")


def _exact_pattern(module: str) -> str:
    """A rank_pattern key that PEFT (`re.match(rf"(.*\\.)?({key})$", name)`) matches to this module only."""
    return re.escape(module) if not re.fullmatch(r"[\w.]+", module) else module.replace(".", r"\.")


def _peft_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return None
