"""Reversible bundles (method ``rmm``): write them, check them, and rebuild any task's adapter from them.

A bundle directory holds::

    bundle.safetensors   per module: mean_B (m, r), basis_B (m, r, p), coeffs_B (m, T, p), and the same with _A
                         (n positions), mean_* only when centred; ``extra.<key>`` for carried modules_to_save tensors
    reversible.json      tasks (names, sources, their adapter_config), per-module layout, ranks, p, errors,
                         storage figures, and the sha256 of bundle.safetensors
    merge_report.json, README.md

Task t of a module is ``x̂_t = mean + basis @ coeffs[:, t]`` at each position, trimmed to the task's own rank; in
``form: shared`` a module holds shared_B (m, K), shared_A (K, n) and cores (T, K, K) instead, and task t is
shared_B @ cores[t] @ shared_A (at the task's rank).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lowrank_methods.core.errors import BundleError, CorruptAdapterError, OutputExistsError, one_line, short
from lowrank_methods.core.methods.rmm import PARTS, SHARED, task_factors
from lowrank_methods.core.types import LoraFactors, ModuleResult
from lowrank_methods.formats.peft import (LORA_PARTS, AdapterWriter, ModuleLayout, live_loras, saved_module,
                                          tensor_key)
from lowrank_methods.formats.safetensors_io import SafetensorsStream, read_all
from lowrank_methods.formats.writer import OutputJob

TENSORS_FILE = "bundle.safetensors"
MANIFEST = "reversible.json"
FORMAT = "mergekit-lowrank/reversible-bundle"
VERSION = 1
POSITION_KEYS = tuple(f"{kind}_{part}" for part in PARTS for kind in ("mean", "basis", "coeffs"))
KEYS = POSITION_KEYS + SHARED  # form positions, then form shared (shared_B (m, K), shared_A (K, n), cores (T, K, K))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_MANIFEST_BYTES = 256 * 2**20  # a manifest holds a few numbers per module and task: far below this
MAX_CONFIG_DEPTH = 32  # nesting of a task's adapter_config (written back out as JSON)


class BundleWriter:
    """Streams rmm's per-module tensors into a reversible bundle in ``job.path`` (a ``formats.writer.Writer``)."""

    def __init__(self, job: OutputJob):
        if job.dtype not in DTYPE_NAMES:
            raise BundleError(f"a reversible bundle is stored as one of {', '.join(DTYPES)}, not {job.dtype}")
        self.path = job.path
        self.dtype = job.dtype
        names = [f"{m}.{k}" for m in job.modules for k in KEYS] + [f"extra.{k}" for k in job.extra_keys]
        self.stream = SafetensorsStream(self.path / TENSORS_FILE, names)
        self.settings = dict(job.settings)
        self.tasks = [{"name": ref.name, "source": ref.source, "revision": ref.revision, "config": src.config,
                       "extra_keys": list(src.extra_keys), "input_bytes": src.weights_file.stat().st_size}
                      for ref, src in zip(job.tasks, job.sources)]
        self.modules: dict[str, dict] = {}
        self.extras: list[str] = []

    def add(self, module: str, layout: ModuleLayout, result: ModuleResult) -> None:
        positions = {f"basis_{p}" for p in PARTS} | {f"coeffs_{p}" for p in PARTS} | {"ranks"}
        if not (positions <= result.tensors.keys() or {*SHARED, "ranks"} <= result.tensors.keys()):
            raise BundleError(f"the method returned no reversible tensors for {module}; only rmm writes a bundle")
        for key in KEYS:
            if key in result.tensors:
                self.stream.add(f"{module}.{key}", result.tensors[key].to(self.dtype))
        T = len(self.tasks)
        s = result.stats
        self.modules[module] = {
            "layout": asdict(layout), "ranks": [int(k) for k in result.tensors["ranks"]], "p": int(s["p"]),
            "r": int(s["rank"]), "center": "mean_B" in result.tensors,
            **({"form": "shared", "K": int(s["K"])} if "cores" in result.tensors else {}),
            "errors": [s[f"error_{t}"] for t in range(T)], "norms": [s[f"norm_{t}"] for t in range(T)],
            "stored_numbers": int(s["stored"]), "input_numbers": int(s["original"]),
        }

    def add_extra(self, key: str, tensor: torch.Tensor, module: str) -> None:
        """A full tensor carried over unchanged (modules_to_save); restored to the tasks that had it."""
        self.stream.add(f"extra.{key}", tensor)
        self.extras.append(key)

    def finish(self, config: dict) -> None:
        self.stream.close()
        data = (self.path / TENSORS_FILE).read_bytes()
        modules = self.modules
        stored = sum(m["stored_numbers"] for m in modules.values())
        inputs = sum(m["input_numbers"] for m in modules.values())
        input_bytes = sum(t["input_bytes"] for t in self.tasks)
        T, r = len(self.tasks), max((m["r"] for m in modules.values()), default=0)
        p = max((m["p"] for m in modules.values()), default=0)
        center = any(m["center"] for m in modules.values())
        shared = any(m.get("form") == "shared" for m in modules.values())
        manifest = {
            "format": FORMAT, "version": VERSION, "method": "rmm", "base_model": config.get("base_model_name_or_path"),
            "dtype": DTYPE_NAMES[self.dtype], "p": p, "center": center,
            "parameters": self.settings, "sha256": hashlib.sha256(data).hexdigest(),
            "tasks": [{k: v for k, v in t.items() if k != "input_bytes"} | {"error": _overall_error(modules, i)}
                      for i, t in enumerate(self.tasks)],
            "storage": {
                "bundle_bytes": len(data), "inputs_bytes": input_bytes, "ratio_bytes": len(data) / max(input_bytes, 1),
                "stored_numbers": stored, "input_numbers": inputs, "ratio": stored / max(inputs, 1),
                "paper_formula": "(m+n)K+TK² per module" if shared else "(p(r+T)+r)/(rT)" if center else "p(r+T)/(rT)",
                "paper_ratio": paper_ratio(p, r, T, center) if r and not shared else None,
            },
            "modules": modules,
        }
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")

    def abort(self) -> None:
        self.stream.discard()


def paper_ratio(p: int, r: int, T: int, center: bool = True) -> float:
    """Storage of the bundle relative to T rank-r adapters, per position: p·r basis + p·T coefficients + r mean."""
    return (p * (r + T) + (r if center else 0)) / (r * T)


# -- the manifest (reversible.json): validated before anything in it is used -----------------------------------------
# A bundle may come from anywhere (the Hub, a shared drive): every field is checked for its type and range, the
# dtype comes from an allow-list, and the cross-field facts the reader relies on (one rank per task, ranks <= r,
# unique task names, ...) are checked too. Extra fields are ignored, so that later writers can add some.

Count = Annotated[int, Field(ge=0)]
Dim = Annotated[int, Field(ge=1)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class LayoutSpec(_Strict):
    kind: Literal["linear", "embedding", "conv"]
    shape: Annotated[list[Dim], Field(min_length=2, max_length=2)]
    fan_in_fan_out: bool = False
    kernel: Annotated[list[Dim], Field(max_length=3)] = []

    @model_validator(mode="after")
    def _kernel_fits(self):
        if self.kind != "conv":
            if self.kernel:
                raise ValueError(f"a {self.kind} layout has no kernel, got {short(self.kernel)}")
        elif not self.kernel:
            raise ValueError("a conv layout needs its kernel")
        elif self.shape[1] % math.prod(self.kernel):
            raise ValueError(f"shape[1]={short(self.shape[1])} is not a multiple of the kernel {short(self.kernel)}")
        return self


class ModuleSpec(_Strict):
    layout: LayoutSpec
    ranks: list[Count]
    p: Count
    r: Count
    center: bool
    errors: list[FiniteFloat]
    norms: list[FiniteFloat]
    stored_numbers: Count
    input_numbers: Count
    form: Literal["positions", "shared"] = "positions"
    K: Count = 0  # form shared: the rank of the module's shared subspace

    @model_validator(mode="after")
    def _ranks_fit(self):
        if self.form == "shared" and self.K < 1:
            raise ValueError(f"form shared needs K >= 1, got {short(self.K)}")
        for i, k in enumerate(self.ranks):
            if k > self.r:
                raise ValueError(f"ranks[{i}]={short(k)} is larger than r={short(self.r)}")
        return self


class TaskSpec(_Strict):
    name: Annotated[str, Field(min_length=1)]
    source: str | None = None
    revision: str | None = None
    config: dict[str, Any]
    extra_keys: list[Annotated[str, Field(min_length=1)]] = []
    error: FiniteFloat

    @field_validator("config")
    @classmethod
    def _config_is_plain(cls, config: dict) -> dict:
        if _depth(config) > MAX_CONFIG_DEPTH:
            raise ValueError(f"is nested deeper than {MAX_CONFIG_DEPTH} levels")
        for key in ("base_model_name_or_path", "task_type", "revision"):  # copied into the rebuilt adapter_config
            if not isinstance(config.get(key), str | None):
                raise ValueError(f"{key} must be a string or null, got {short(config.get(key))}")
        return config

    @field_validator("extra_keys")
    @classmethod
    def _unique_keys(cls, keys: list[str]) -> list[str]:
        seen = set()
        for key in keys:
            if key in seen:
                raise ValueError(f"lists {short(key)} twice")
            seen.add(key)
        return keys


class StorageSpec(_Strict):
    bundle_bytes: Count
    inputs_bytes: Count
    ratio_bytes: FiniteFloat
    stored_numbers: Count
    input_numbers: Count
    ratio: FiniteFloat
    paper_formula: str
    paper_ratio: FiniteFloat | None = None


class ManifestSpec(_Strict):
    format: Literal[FORMAT]
    version: Literal[VERSION]
    method: Literal["rmm"] = "rmm"
    base_model: str | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"]
    p: Count
    center: bool
    parameters: dict[str, Any] = {}
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
    tasks: Annotated[list[TaskSpec], Field(min_length=1)]
    storage: StorageSpec
    modules: Annotated[dict[Annotated[str, Field(min_length=1)], ModuleSpec], Field(min_length=1)]

    @field_validator("parameters")
    @classmethod
    def _shallow(cls, parameters: dict) -> dict:
        if _depth(parameters) > MAX_CONFIG_DEPTH:
            raise ValueError(f"is nested deeper than {MAX_CONFIG_DEPTH} levels")
        return parameters

    @model_validator(mode="after")
    def _fits_the_tasks(self):
        T = len(self.tasks)
        names = set()
        for i, task in enumerate(self.tasks):
            if task.name in names:
                raise ValueError(f"tasks[{i}].name {short(task.name)} is not unique")
            names.add(task.name)
        for module, info in self.modules.items():
            for field in ("ranks", "errors", "norms"):
                if len(getattr(info, field)) != T:
                    raise ValueError(f"modules[{short(module, 40)}].{field} has {len(getattr(info, field))} entries "
                                     f"for {T} tasks")
        return self


def _depth(value, limit: int = MAX_CONFIG_DEPTH + 1) -> int:
    """Nesting depth of a JSON value (counted up to ``limit``, without recursion)."""
    deepest, level = 0, [(value, 0)]
    while level:
        v, d = level.pop()
        deepest = max(deepest, d)
        if deepest >= limit:
            break
        if isinstance(v, dict):
            level.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            level.extend((x, d + 1) for x in v)
    return deepest


def _where(loc: tuple) -> str:
    """A pydantic error location as one short path: ``modules['model.q_proj'].layout.shape[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_]\w{0,39}", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{short(part, 40)}]"
    return out


def _validation_line(path: Path, e: ValidationError) -> str:
    errors = e.errors(include_url=False)
    first = errors[0]
    where = _where(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    value = first.get("input")
    scalar = isinstance(value, str | int | float | bool | None)
    got = f" (got {short(value, 40)})" if first.get("type") != "missing" and scalar else ""
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    at = f" at {where}" if where else ""
    return f"bundle {path}: {MANIFEST} is malformed{at}: {one_line(message, 120)}{got}{more}; the bundle is corrupt"


def _error(message: str, module: str | None = None) -> BundleError:
    """A BundleError of one short line; names from the manifest are shortened (they may be anything)."""
    return BundleError(one_line(f"module {short(module, 80)}: {message}" if module is not None else message))


def validate_manifest(manifest, path: Path) -> ManifestSpec:
    """``manifest`` (parsed JSON) as a ManifestSpec, or a BundleError naming the first bad field."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _error(f"bundle {path}: {MANIFEST} is not a {FORMAT} manifest; the bundle is corrupt")
    if manifest.get("version") != VERSION or isinstance(manifest.get("version"), bool):
        raise _error(f"bundle {path} has format version {short(manifest.get('version'), 20)}; this mergekit-lowrank "
                     f"reads version {VERSION}")
    try:
        return ManifestSpec.model_validate(manifest)
    except ValidationError as e:
        raise _error(_validation_line(path, e)) from e


@dataclass
class ReversibleBundle:
    """A loaded bundle: every task's adapter can be rebuilt from it without reading the files again.

    ``load`` checks everything before returning: the manifest (types, ranges, dtype allow-list), the checksum,
    every tensor's presence, shape, dtype and finiteness, and the carried modules_to_save tensors."""

    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: str | Path) -> "ReversibleBundle":
        path = Path(path)
        manifest = _read_manifest(path)
        data = path / TENSORS_FILE
        if not data.is_file():
            raise _error(f"bundle {path} has no {TENSORS_FILE}; the bundle is incomplete, re-create it with mergekit-lowrank merge")
        raw = data.read_bytes()
        if hashlib.sha256(raw).hexdigest() != manifest["sha256"].lower():
            raise _error(f"bundle {path}: {TENSORS_FILE} does not match the checksum in {MANIFEST}; the bundle is "
                         "corrupt, re-create it with mergekit-lowrank merge")
        try:
            tensors = read_all(raw, TENSORS_FILE)  # the very bytes just checksummed
        except CorruptAdapterError as e:
            raise _error(f"bundle {path}: cannot read {TENSORS_FILE} ({short(str(e), 100)}); the bundle is corrupt") from e
        bundle = cls(path, manifest, tensors)
        try:
            bundle._check()
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a safety net: _read_manifest checked
            raise _error(f"bundle {path}: {MANIFEST} is malformed ({type(e).__name__}: {short(str(e), 100)}); "
                         "the bundle is corrupt") from e
        return bundle

    # -- what it holds ---------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def modules(self) -> list[str]:
        return list(self.manifest["modules"])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the bundle is stored in (and reconstructed adapters are written in)."""
        name = self.manifest.get("dtype", "float32")
        if not isinstance(name, str) or name not in DTYPES:  # validated on load; this guards bundles built by hand
            raise _error(f"bundle {self.path}: dtype {short(name, 20)} is not one of {', '.join(DTYPES)}")
        return DTYPES[name]

    def layout(self, module: str) -> ModuleLayout:
        d = self.manifest["modules"][module]["layout"]
        return ModuleLayout(d["kind"], tuple(d["shape"]), d.get("fan_in_fan_out", False), tuple(d.get("kernel", ())))

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise _error(f"bundle {self.path} has no task {short(task)}; it holds: {', '.join(self.tasks)}")
        return self.tasks.index(task)

    # -- rebuilding ------------------------------------------------------------------------
    def adapter(self, task: str, dtype: torch.dtype | None = None) -> dict[str, LoraFactors]:
        """Task ``task``'s factors per module (ΔW = B @ A in the base layout, scale 1); modules it lacks are absent."""
        t = self.task_index(task)
        out = {}
        for module, info in self.manifest["modules"].items():
            rank = info["ranks"][t]
            if rank:
                f = task_factors(self._module_tensors(module), t, rank)
                out[module] = f.to(dtype=dtype) if dtype is not None else f
        return out

    def rebuilt(self, task: str) -> "RebuiltAdapter":
        """Task ``task`` as the PEFT adapter it rebuilds to (r == lora_alpha, the task's own rank per module), every
        check made and nothing written: its factors are finite in the output dtype, its carried tensors are there."""
        t = self.task_index(task)
        meta = self.manifest["tasks"][t]
        dtype = self.dtype
        factors = self.adapter(task)
        if not factors:
            raise _error(f"bundle {self.path}: task {short(task)} has rank 0 in every module; the bundle is corrupt")
        keys = set()
        for module, f in factors.items():
            for part, tensor in self.layout(module).peft_tensors(f).items():
                if not bool(torch.isfinite(tensor.to(dtype)).all()):
                    raise _error(f"bundle {self.path}: task {short(task)} rebuilds to non-finite {part} values in "
                                 f"{dtype_name(dtype)}; the bundle is corrupt", module=module)
                keys.add(tensor_key(module, part))
        extras = list(meta.get("extra_keys", []))
        for key in extras:
            if f"extra.{key}" not in self.tensors:  # _check saw them; this guards bundles built by hand
                raise _error(f"bundle {self.path}: task {short(task)} carries {short(key)} but {TENSORS_FILE} lacks "
                             f"{short('extra.' + key)}; the bundle is corrupt")
            if key in keys:
                raise _error(f"bundle {self.path}: carried tensor {short(key)} collides with a LoRA tensor of the "
                             "adapter; the bundle is corrupt")
        config = dict(meta["config"])
        config["base_model_name_or_path"] = config.get("base_model_name_or_path") or self.manifest.get("base_model")
        return RebuiltAdapter(factors, {m: self.layout(m) for m in factors},
                              {key: self.tensors[f"extra.{key}"] for key in extras}, config, dtype)

    def check_outside(self, out: str | Path) -> None:
        """Refuse an output directory that is, holds or lies inside this bundle."""
        target, home = Path(out).resolve(), self.path.resolve()
        if target == home or target in home.parents or home in target.parents:
            raise _error(f"output {out} is, holds or lies inside the bundle {self.path}; write the adapter somewhere else")

    def write_adapter(self, task: str, directory: str | Path) -> Path:
        """Write task ``task`` as a PEFT adapter into ``directory`` (a new or empty one), every check made first.
        Not atomic by itself: ``mergekit-lowrank reconstruct`` writes into a staging directory it renames into place
        (and replaces an older output of ours with ``--overwrite``)."""
        adapter = self.rebuilt(task)
        self.check_outside(directory)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):  # never write over files we do not own
            raise OutputExistsError(f"{directory} is not empty; choose a new directory (or use mergekit-lowrank "
                                    "reconstruct --overwrite to replace an earlier output of ours)")
        adapter.write(directory)
        return directory

    def to_peft(self, model, task: str, adapter_name: str | None = None):
        """Switch a loaded PeftModel to ``task``: overwrite the active adapter's lora_A/lora_B so that its update
        ``scaling · B A`` equals the task's ΔW (zero where the task lacks a module). Returns ``model``."""
        t = self.task_index(task)
        if self.manifest["tasks"][t].get("extra_keys"):
            raise _error(f"task {short(task)} carries modules_to_save tensors that to_peft cannot swap; use "
                         "write_adapter (mergekit-lowrank reconstruct) and load that adapter instead")
        name = adapter_name or model.active_adapter
        name = name if isinstance(name, str) else name[0]
        layers = live_loras(model, name)
        factors = self.adapter(task)
        missing = sorted(set(factors) - set(layers))
        if missing:
            raise _error(f"adapter {short(name)} of the model has no LoRA layer on {short(missing[0], 80)} ({len(missing)} "
                         "modules missing); load an adapter that targets every module of the bundle, e.g. one reconstructed from it")
        for module, layer in layers.items():  # check everything before touching any weight
            if layer.merged:
                raise _error(f"the adapter is merged into the base weights at {short(module, 80)}; unmerge it before to_peft")
            if module in factors and layer.A.shape[0] < factors[module].rank:
                raise _error(f"the loaded adapter has rank {layer.A.shape[0]} but task {short(task)} needs "
                             f"{factors[module].rank}; load an adapter with rank >= the bundle's ranks", module=module)
        with torch.no_grad():
            for module, layer in layers.items():
                f = factors.get(module)
                layer.A.zero_()
                layer.B.zero_()
                if f is None:
                    continue
                a, b = layout_values(self.layout(module), f)
                layer.A[: f.rank] = a.to(layer.A.dtype)
                layer.B[:, : f.rank] = (b / layer.scaling).to(layer.B.dtype)
        return model

    # -- checks --------------------------------------------------------------------------------
    def _module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """One module's tensors; half-precision bundles are rebuilt in float32."""
        out = {k: self.tensors[f"{module}.{k}"] for k in KEYS if f"{module}.{k}" in self.tensors}
        return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in out.items()}

    def _check(self) -> None:
        """Every tensor the manifest promises is there, with its shape and the bundle's dtype, and finite."""
        T = len(self.manifest["tasks"])
        dtype = self.dtype
        for module, info in self.manifest["modules"].items():
            m, n = info["layout"]["shape"]
            r, p = info["r"], info["p"]
            if len(info["ranks"]) != T or any(not 0 <= k <= r for k in info["ranks"]):
                raise _error(f"bundle {self.path}: ranks {short(info['ranks'])} do not fit {T} tasks of rank <= {r}; the "
                             "bundle is corrupt", module=module)
            if info.get("form") == "shared":
                K = info["K"]
                expected = {"shared_B": (m, K), "shared_A": (K, n), "cores": (T, K, K)}
            else:
                expected = {"basis_B": (m, r, p), "coeffs_B": (m, T, p), "basis_A": (n, r, p), "coeffs_A": (n, T, p)}
                if info["center"]:
                    expected |= {"mean_B": (m, r), "mean_A": (n, r)}
            for key, shape in expected.items():
                got = self.tensors.get(f"{module}.{key}")
                if got is None or tuple(got.shape) != shape:
                    found = "missing" if got is None else f"shape {tuple(got.shape)}"
                    raise _error(f"bundle {self.path}: tensor {key} is {found}, expected {short(shape)}; the bundle is "
                                 "corrupt", module=module)
                if got.dtype != dtype:
                    raise _error(f"bundle {self.path}: tensor {key} is {dtype_name(got.dtype)} but {MANIFEST} says "
                                 f"{dtype_name(dtype)}; the bundle is corrupt", module=module)
                if not bool(torch.isfinite(got).all()):
                    raise _error(f"bundle {self.path}: tensor {key} holds NaN or Inf; the bundle is corrupt", module=module)
            for key in KEYS:
                if key not in expected and f"{module}.{key}" in self.tensors:
                    raise _error(f"bundle {self.path}: tensor {key} is present but {MANIFEST} says the module is not "
                                 f"{'of form positions' if key in SHARED or info.get('form') == 'shared' else 'centred'}"
                                 "; the bundle is corrupt", module=module)
        outputs = {tensor_key(m, part) for m in self.manifest["modules"] for part in LORA_PARTS}
        for task in self.manifest["tasks"]:
            for key in task.get("extra_keys", []):
                got = self.tensors.get(f"extra.{key}")
                if got is None:
                    raise _error(f"bundle {self.path}: task {short(task['name'])} carries {short(key)} but "
                                 f"{TENSORS_FILE} lacks {short('extra.' + key)}; the bundle is corrupt")
                if key in outputs:
                    raise _error(f"bundle {self.path}: carried tensor {short(key)} of task {short(task['name'])} "
                                 "collides with a LoRA tensor; the bundle is corrupt")
                if (got.is_floating_point() or got.is_complex()) and not bool(torch.isfinite(got).all()):
                    raise _error(f"bundle {self.path}: carried tensor {short('extra.' + key)} holds NaN or Inf; the "
                                 "bundle is corrupt")


@dataclass
class RebuiltAdapter:
    """One task of a bundle as a PEFT adapter, checked and ready to write (``ReversibleBundle.rebuilt``)."""

    factors: dict[str, LoraFactors]
    layouts: dict[str, ModuleLayout]
    extras: dict[str, torch.Tensor]  # carried tensors (modules_to_save) by adapter key
    config: dict  # the task's adapter_config, base_model_name_or_path filled in from the bundle
    dtype: torch.dtype

    def write(self, directory: Path) -> None:
        """adapter_model.safetensors and adapter_config.json, written into the existing ``directory``."""
        writer = AdapterWriter(OutputJob(Path(directory), list(self.factors), self.layouts, self.dtype, list(self.extras)))
        try:
            for module, f in self.factors.items():
                writer.add(module, self.layouts[module], ModuleResult(f))
            for key, tensor in self.extras.items():
                writer.add_extra(key, tensor, saved_module(key))
            writer.finish(self.config)
        except BaseException:
            writer.abort()
            raise


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout_values(layout: ModuleLayout, f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A-like, B-like) tensors for ``f``: rank is dim 0 of the first and dim 1 of the second."""
    a, b = layout.peft_tensors(f).values()
    return a, b


def _read_manifest(path: Path) -> dict:
    """The bundle's manifest as the plain dict it is stored as, after ``validate_manifest`` accepted it."""
    if not path.is_dir():
        raise _error(f"bundle {path} is not a directory; pass the directory written by an rmm merge")
    file = path / MANIFEST
    if not file.is_file():
        raise _error(f"{path} has no {MANIFEST}; it is not a reversible bundle (written by merge_method: rmm)")
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise _error(f"bundle {path}: {MANIFEST} is {file.stat().st_size:,} bytes, more than a manifest can be; "
                     "the bundle is corrupt")
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _error(f"bundle {path}: {MANIFEST} is not valid JSON (not UTF-8 at byte {e.start}); the bundle is "
                     "corrupt") from e
    except json.JSONDecodeError as e:
        raise _error(f"bundle {path}: {MANIFEST} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                     "the bundle is corrupt") from e
    except RecursionError:
        raise _error(f"bundle {path}: {MANIFEST} is not valid JSON (nested too deeply); the bundle is corrupt")
    validate_manifest(manifest, path)
    return manifest


def _overall_error(modules: dict[str, dict], t: int) -> float:
    """‖ΔŴ_t − ΔW_t‖ / ‖ΔW_t‖ over all modules together (Frobenius norm of the stacked modules)."""
    err = sum((m["errors"][t] * m["norms"][t]) ** 2 for m in modules.values())
    norm = sum(m["norms"][t] ** 2 for m in modules.values())
    return math.sqrt(err / norm) if norm > 0 else 0.0


def summary_table(path: str | Path) -> str:
    """The short table ``mergekit-lowrank merge`` prints for an rmm bundle: each task's error and the storage."""
    manifest = _read_manifest(Path(path))
    s = manifest["storage"]
    width = max([len(t["name"]) for t in manifest["tasks"]] + [4])
    lines = [f"{'task':{width}s}  rel. error ΔW (all modules)  worst module"]
    for i, t in enumerate(manifest["tasks"]):
        worst = max((m["errors"][i] for m in manifest["modules"].values()), default=0.0)
        lines.append(f"{t['name']:{width}s}  {t['error']:27.3e}  {worst:.3e}")
    center = "centred" if manifest["center"] else "uncentred"
    paper = f", paper formula {s['paper_formula']} = {s['paper_ratio']:.4f}" if s.get("paper_ratio") is not None else ""
    shared = [m["K"] for m in manifest["modules"].values() if m.get("form") == "shared"]
    form = f"shared subspaces K={min(shared)}..{max(shared)} in the storage of p={manifest['p']}" if shared else \
        f"p={manifest['p']} ({center})"
    lines.append(f"{form}: stores {s['ratio']:.4f} of the inputs' numbers{paper}; "
                 f"{s['bundle_bytes']:,} bytes on disk vs {s['inputs_bytes']:,} for the adapters ({s['ratio_bytes']:.4f})")
    if manifest.get("dtype") in ("float16", "bfloat16"):
        lines.append(f"(errors are measured at compute precision, before the bundle is rounded to {manifest['dtype']})")
    return "\n".join(lines)
