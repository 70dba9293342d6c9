"""``output: model``: the base model with the merged update in its weights, ``W0 + ΔW*``, streamed tensor by tensor.

The writer follows the writer protocol (``formats.writer.Writer``: ``add``, ``add_extra``, ``finish``, ``abort``):

* when it is opened (before anything is merged) it reads the headers of the base model's safetensors files (in
  ``job.base_dir``: the pipeline resolved the base, a local directory or a Hub id fetched by
  ``publish.hub.resolve_model``) and maps every planned module ``m`` to the base tensor ``m.weight`` (or, for a checkpoint
  saved from a wrapper or a bare model, ``m.weight`` with one common prefix added or removed); a module without
  such a weight, with another shape or a non-float dtype is refused with one line;
* ``add`` keeps each module's merged factors (adapter-sized: they are what an adapter output would hold);
  ``add_extra`` spills ``modules_to_save`` tensors into the job's scratch directory;
* ``finish`` streams the base: each tensor is read on its own (positioned reads, no mmap), gets
  ``W0 + B @ A`` (computed in float32, or float64 for float64 factors or weights, then cast) when a module was
  merged into it, the adapter's tensor when it was saved whole, and is otherwise copied byte for byte. Output
  shards (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``
  past ``shard_size`` bytes) are written straight into ``job.path``; ``config.json`` (its ``dtype`` set to
  the recipe's), generation config, tokenizer and other small metadata files of the base are copied.

dtype: the recipe's ``dtype``/``out_dtype`` casts every floating-point tensor; without one each tensor keeps the
base's dtype (so untouched tensors are bit-identical). Memory: a few tensors of the base at a time.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_methods.core.errors import BaseModelError, ComputeError, OutputError, one_line, short
from lowrank_methods.core.types import LoraFactors, ModuleResult
from lowrank_methods.formats.peft import ModuleLayout, base_name, saved_module
from lowrank_methods.formats.safetensors_io import (BITS, DTYPES, SafetensorsFile, SafetensorsStream, encode_header,
                                                    write_tensor)
from lowrank_methods.formats.writer import OutputJob, merged_factors

DEFAULT_SHARD_SIZE = 5_000_000_000  # bytes: mergekit's --out-shard-size default (5B), transformers' is 5 GB
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
FLOAT_NAMES = {v: k for k, v in FLOATS.items()}
COPY_CHUNK = 16 << 20  # bytes per read when a tensor is copied unchanged
EXTRAS_FILE = "modules_to_save.safetensors"

# Files of the base copied beside the weights (top level and first-level folders such as sentence-transformers'
# 1_Pooling/); the weights, weight indexes, and files this tool writes itself are never copied.
METADATA_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*")
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                   "chat_template*", "*.tiktoken", "spiece*")
NOT_COPIED = {"config.json", "merge_report.json", "README.md", "mergekit_config.yml", "adapter_config.json",
              ".mergekit-lowrank.json"}


def parse_shard_size(value) -> int:
    """A shard size in bytes: an integer, or with mergekit's suffixes K, M, B (thousand, million, billion bytes);
    KB, MB, GB and G are accepted as the same decimal units."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(k|kb|m|mb|b|g|gb)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise OutputError(f"shard size {short(value, 40)} is not a size; write bytes, or e.g. 500M, 5B (5 billion "
                              "bytes, mergekit's notation), 5GB")
        units = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "b": 10**9, "g": 10**9, "gb": 10**9}
        size = int(m[1]) * units[(m[2] or "").lower()]
    if size < 1:
        raise OutputError(f"shard size must be at least 1 byte, got {size}")
    return size


# -- the base checkpoint --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseTensor:
    name: str
    file: int          # index into BaseCheckpoint.files
    dtype: str         # safetensors dtype name
    shape: tuple[int, ...]
    begin: int         # absolute byte offsets in the file
    end: int


class BaseCheckpoint:
    """A model directory's safetensors weights, headers only: every tensor's file, dtype, shape and bytes."""

    def __init__(self, path: Path, who: str):
        self.path, self.who = Path(path), who
        self.files = [SafetensorsFile(f) for f in self.weight_files()]
        self.identity = [_identity(f.path) for f in self.files]
        self.tensors: dict[str, BaseTensor] = {}
        for i, sf in enumerate(self.files):
            entries = sorted(sf.entries.items(), key=lambda kv: kv[1]["data_offsets"])
            for name, e in entries:
                if name in self.tensors:
                    raise BaseModelError(f"{who}: tensor {short(name)} is in both {self.files[self.tensors[name].file].path.name} "
                                         f"and {sf.path.name}; the checkpoint is inconsistent")
                begin, end = e["data_offsets"]
                self.tensors[name] = BaseTensor(name, i, e["dtype"], tuple(e["shape"]), sf.data_start + begin,
                                                sf.data_start + end)

    def weight_files(self) -> list[Path]:
        """The files the weight index lists, else ``model.safetensors``, else every top-level ``*.safetensors``."""
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise BaseModelError(f"{self.who}: {INDEX_FILE} is not a valid weight index (JSON with weight_map); "
                                     "re-save the model")
            files = []
            for name in names:
                f = self.path / str(name)
                if not isinstance(name, str) or "/" in name or "\\" in name or not f.is_file():
                    raise BaseModelError(f"{self.who}: {INDEX_FILE} lists {short(name)}, which is not a file beside it")
                files.append(f)
            return files
        if (self.path / SINGLE_FILE).is_file():
            return [self.path / SINGLE_FILE]
        files = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
        if not files:
            bins = any(self.path.glob("pytorch_model*.bin"))
            raise BaseModelError(f"{self.who} has no safetensors weights{' (only pytorch_model*.bin)' if bins else ''}; "
                                 "output: model reads safetensors only: re-save the base with save_pretrained")
        return files

    def read(self, t: BaseTensor) -> torch.Tensor:
        return self.files[t.file].read(t.name)

    def copy_bytes(self, t: BaseTensor, out) -> None:
        """The tensor's bytes, unchanged, appended to the binary file ``out`` (chunked: no tensor in memory)."""
        path = self.files[t.file].path
        fd = os.open(path, os.O_RDONLY)
        try:
            if _identity(path, fd) != self.identity[t.file]:
                raise BaseModelError(f"{self.who}: {path.name} changed on disk while the model was written; run again")
            pos = t.begin
            while pos < t.end:
                chunk = os.pread(fd, min(COPY_CHUNK, t.end - pos), pos)
                if not chunk:
                    raise BaseModelError(f"{self.who}: {path.name} ended while {short(t.name)} was copied (truncated)")
                out.write(chunk)
                pos += len(chunk)
        finally:
            os.close(fd)


def _identity(path: Path, fd: int | None = None) -> tuple:
    st = os.fstat(fd) if fd is not None else os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def key_rule(names: list[str], keys) -> tuple[str, str]:
    """``(strip, add)`` such that ``add + name.removeprefix(strip)`` is a base key for every name: the identity
    when it fits, else one prefix added (an adapter of a bare model, a checkpoint of its wrapper: ``layers.0…`` ↔
    ``model.layers.0…``) or removed (``bert.encoder…`` ↔ ``encoder…``). The identity when nothing fits all."""
    keys = set(keys)
    missing = next((n for n in names if n not in keys), None)
    if missing is None:
        return "", ""
    candidates = {("", k[: -len(missing)]) for k in keys if k.endswith("." + missing)}
    parts = missing.split(".")
    candidates |= {(".".join(parts[:i]) + ".", "") for i in range(1, len(parts)) if ".".join(parts[i:]) in keys}
    for strip, add in sorted(candidates, key=lambda c: (len(c[0]) + len(c[1]), c)):
        if all(n.startswith(strip) and add + n[len(strip):] in keys for n in names):
            return strip, add
    return "", ""


# -- the writer ----------------------------------------------------------------------------------------------
class FullModelWriter:
    """Streams ``W0 + ΔW*`` of the base model in ``job.base_dir`` into ``job.path`` (see the module docstring)."""

    def __init__(self, job: OutputJob):
        self.path = job.path
        self.who = f"base model {short(job.base, 80)}"
        self.base_dir = job.base_dir
        if not (self.base_dir / "config.json").is_file():
            raise BaseModelError(f"{self.who} has no config.json; point base_model at a transformers model directory")
        self.checkpoint = BaseCheckpoint(self.base_dir, self.who)
        self.out_dtype = job.model_dtype
        self.shard_size = parse_shard_size(job.shard_size) if job.shard_size is not None else DEFAULT_SHARD_SIZE
        self.copy_tokenizer = job.copy_tokenizer

        tensors = self.checkpoint.tensors
        extra_names = {k: base_name(k) for k in job.extra_keys}
        strip, add = key_rule([f"{m}.weight" for m in job.modules] + list(extra_names.values()), tensors)

        def base_key(name: str) -> str:
            return add + name[len(strip):] if name.startswith(strip) else name

        self.targets: dict[str, str] = {}  # module -> base tensor
        for module in job.modules:
            key = base_key(f"{module}.weight")
            if key not in tensors:
                raise BaseModelError(f"the {self.who} has no weight {short(key, 80)} for this module (nor with one common "
                                     "prefix added or removed); the adapters were not trained on this base model",
                                     module=module)
            _check_fits(job.layouts[module], tensors[key], module, self.who)
            self.targets[module] = key
        self.extra_targets: dict[str, str] = {}  # adapter key -> base tensor
        owners = {k: src for src in job.sources for k in src.extra_keys}
        for adapter_key, name in extra_names.items():
            key = base_key(name)
            module = saved_module(adapter_key)
            if key not in tensors:
                raise BaseModelError(f"the adapter saves {short(name, 80)} whole (modules_to_save), but the {self.who} "
                                     "has no such tensor", module=module)
            shape = tuple(owners[adapter_key].shape_of(adapter_key)) if adapter_key in owners else tensors[key].shape
            if shape != tensors[key].shape:
                raise BaseModelError(f"the adapter's saved copy (modules_to_save) has shape {list(shape)} but {short(key, 80)} "
                                     f"is {list(tensors[key].shape)} in the {self.who}", module=module)
            self.extra_targets[adapter_key] = key
        both = sorted(set(self.targets.values()) & set(self.extra_targets.values()))
        if both:
            raise BaseModelError(f"{short(both[0], 80)} is both saved whole (modules_to_save) by one adapter and a LoRA "
                                 "target of another; there is no defined merge of the two")
        self.updates: dict[str, tuple[ModuleLayout, LoraFactors, str]] = {}  # base tensor -> what to add
        self.replaced: set[str] = set()
        self.extras_path = job.scratch / EXTRAS_FILE
        self.extras = None
        if job.extra_keys:
            self.extras = SafetensorsStream(self.extras_path, list(job.extra_keys))

    # -- the protocol ------------------------------------------------------------------------------------
    def add(self, module: str, layout: ModuleLayout, result: ModuleResult) -> None:
        factors = merged_factors(result, module, "a model")
        if factors.rank == 0:  # nothing to add: the base weight is copied unchanged
            return
        self.updates[self.targets[module]] = (layout, factors.to("cpu"), module)

    def add_extra(self, key: str, tensor: torch.Tensor, module: str) -> None:
        """A full tensor of an adapter (modules_to_save): it replaces the base's tensor."""
        target = self.checkpoint.tensors[self.extra_targets[key]]
        if tuple(tensor.shape) != target.shape:
            raise BaseModelError(f"the adapter's saved copy (modules_to_save) has shape {list(tensor.shape)} but "
                                 f"{short(target.name, 80)} is {list(target.shape)} in the {self.who}", module=module)
        self.extras.add(key, tensor)
        self.replaced.add(key)

    def finish(self, config: dict) -> None:
        extras = None
        if self.extras is not None:
            self.extras.close()
            self.extras = None
            extras = SafetensorsFile(self.extras_path)
        by_target = {self.extra_targets[k]: k for k in self.replaced}
        items = [self._planned(t, by_target.get(t.name)) for t in self.checkpoint.tensors.values()]
        shards = _shards(items, self.shard_size)
        names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                         for i in range(1, len(shards) + 1)]
        saved = torch.get_num_threads()
        torch.set_num_threads(1)  # W0 + B @ A on one thread: the same bytes whatever the caller's thread count
        try:
            for name, shard in zip(names, shards):
                self._write_shard(self.path / name, shard, extras)
        finally:
            torch.set_num_threads(saved)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(i.nbytes for i in items)},
                     "weight_map": {i.name: n for n, shard in zip(names, shards) for i in shard}}
            (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self._copy_metadata()
        if self.extras_path.exists():
            self.extras_path.unlink()

    def abort(self) -> None:
        if self.extras is not None:
            self.extras.discard()
            self.extras = None

    # -- streaming -----------------------------------------------------------------------------------------
    def _planned(self, t: BaseTensor, extra_key: str | None) -> "_Item":
        dtype = FLOAT_NAMES[self.out_dtype] if self.out_dtype is not None and t.dtype in FLOATS else t.dtype
        nbytes = t.end - t.begin if dtype == t.dtype else math.prod(t.shape) * FLOATS[dtype].itemsize
        how = ("extra" if extra_key is not None else "update" if t.name in self.updates
               else "copy" if dtype == t.dtype else "cast")
        return _Item(t.name, t, dtype, nbytes, how, extra_key)

    def _write_shard(self, path: Path, shard: list["_Item"], extras) -> None:
        order = sorted(shard, key=lambda i: -BITS[i.dtype])  # widest first: every tensor starts aligned
        header, offset = {}, 0
        for item in order:
            header[item.name] = {"dtype": item.dtype, "shape": list(item.base.shape),
                                 "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        with open(path, "wb") as out:
            out.write(encode_header(header, {"format": "pt"}))
            for item in order:
                start = out.tell()
                if item.how == "copy":
                    self.checkpoint.copy_bytes(item.base, out)
                else:
                    write_tensor(out, self._tensor(item, extras))
                if out.tell() - start != item.nbytes:  # never a file whose header lies
                    raise RuntimeError(f"{item.name}: wrote {out.tell() - start} bytes, expected {item.nbytes}")

    def _tensor(self, item: "_Item", extras) -> torch.Tensor:
        target = DTYPES[item.dtype]
        if item.how == "extra":
            return extras.read(item.extra_key).to(target)
        w0 = self.checkpoint.read(item.base)
        if item.how == "cast":
            return w0.to(target)
        layout, f, module = self.updates[item.name]
        work = torch.promote_types(torch.promote_types(f.A.dtype, w0.dtype), torch.float32)
        w = w0.to(work)  # a fresh tensor of its own: read() returns one, .to() copies when the dtype changes
        m, n = layout.shape
        w.view(m, n).addmm_(f.B.to(work), f.A.to(work))
        if not bool(torch.isfinite(w).all()):
            raise ComputeError("W0 + ΔW is not finite (the merged update overflows the weight); nothing was written",
                               module=module)
        return w.to(target)

    def _copy_metadata(self) -> None:
        config = self.base_dir / "config.json"
        if self.out_dtype is None:
            shutil.copyfile(config, self.path / "config.json")
        else:
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise BaseModelError(f"{self.who}: config.json is not valid JSON ({one_line(str(e), 80)})") from e
            if not isinstance(data, dict):
                raise BaseModelError(f"{self.who}: config.json is not a JSON object")
            name = str(self.out_dtype).removeprefix("torch.")
            if "torch_dtype" in data:
                data["torch_dtype"] = name
            if "dtype" in data or "torch_dtype" not in data:
                data["dtype"] = name
            (self.path / "config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        for src in _metadata_files(self.base_dir):
            rel = src.relative_to(self.base_dir)
            if not self.copy_tokenizer and _matches(src.name, TOKENIZER_FILES):
                continue
            dst = self.path / rel
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, dst)


@dataclass(frozen=True)
class _Item:
    name: str
    base: BaseTensor
    dtype: str
    nbytes: int
    how: str  # copy | cast | update | extra
    extra_key: str | None = None


def _shards(items: list[_Item], size: int) -> list[list[_Item]]:
    """Consecutive groups of at most ``size`` bytes (a larger tensor gets a shard of its own), like transformers."""
    shards: list[list[_Item]] = [[]]
    used = 0
    for item in items:
        if shards[-1] and used + item.nbytes > size:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += item.nbytes
    return shards


def _check_fits(layout: ModuleLayout, t: BaseTensor, module: str, who: str) -> None:
    m, n = layout.shape
    if layout.kind == "conv":
        fits = len(t.shape) >= 2 and t.shape[0] == m and math.prod(t.shape[1:]) == n and t.shape[2:] == layout.kernel
    else:
        fits = t.shape == (m, n)
    if not fits:
        want = f"{m}×{n}" + (f" (kernel {list(layout.kernel)})" if layout.kind == "conv" else "")
        raise BaseModelError(f"ΔW is {want} but {short(t.name, 80)} is {list(t.shape)} in the {who}; the adapters were "
                             "not trained on this base model", module=module)
    if t.dtype not in FLOATS:
        raise BaseModelError(f"{short(t.name, 80)} is {t.dtype} in the {who}; output: model adds ΔW to float16, bfloat16, "
                             "float32 or float64 weights only (not quantized ones)", module=module)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _metadata_files(root: Path) -> list[Path]:
    """The base's small files to copy: top level and first-level folders, not hidden, not weights or indexes."""
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found += [p for p in sorted(entry.iterdir()) if p.is_file() and not p.name.startswith(".")
                      and _is_metadata(p.name, top=False)]
        elif entry.is_file() and _is_metadata(entry.name, top=True):
            found.append(entry)
    return found


def _is_metadata(name: str, *, top: bool) -> bool:
    if name.endswith((".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")):
        return False
    if top and name in NOT_COPIED:
        return False
    return _matches(name, METADATA_FILES)
