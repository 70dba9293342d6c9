"""Reversible bundles (method ``rmm``): write them, check them, and rebuild any task's adapter from them.

A bundle directory holds::

    bundle.safetensors   per module: mean_B (m, r), basis_B (m, r, p), coeffs_B (m, T, p), and the same with _A
                         (n positions), mean_* only when centred; ``extra.<key>`` for carried modules_to_save tensors
    reversible.json      tasks (names, sources, their adapter_config), per-module layout, ranks, p, errors,
                         storage figures, and the sha256 of bundle.safetensors
    merge_report.json, README.md

Task t of a module is ``x̂_t = mean + basis @ coeffs[:, t]`` at each position, trimmed to the task's own rank.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .card import is_local_path
from .errors import MergeError
from .factors import LoraFactors, ModuleLayout
from .methods.rmm import PARTS, task_factors
from .registry import ModuleResult
from .writers import AdapterWriter, SafetensorsStream, StagedDirectory

TENSORS_FILE = "bundle.safetensors"
MANIFEST = "reversible.json"
FORMAT = "mergekit-lowrank/reversible-bundle"
VERSION = 1
KEYS = tuple(f"{kind}_{part}" for part in PARTS for kind in ("mean", "basis", "coeffs"))


class BundleWriter:
    """Streams rmm's per-module tensors into a reversible bundle (same protocol as ``AdapterWriter``)."""

    def __init__(self, recipe, out, plan, sources, *, extra_keys: list[str], dtype: torch.dtype, overwrite: bool = False):
        self.stage = StagedDirectory(out, overwrite)
        self.dtype = dtype
        names = [f"{m}.{k}" for m in plan.modules for k in KEYS] + [f"extra.{k}" for k in extra_keys]
        self.stream = SafetensorsStream(self.stage.path / TENSORS_FILE, names)
        self.settings = dict(recipe.settings)
        self.tasks = [{"name": ref.name, "source": public_source(ref.adapter), "revision": ref.revision, "config": src.config,
                       "extra_keys": list(src.extra_keys), "input_bytes": src.weights_file.stat().st_size}
                      for ref, src in zip(recipe.adapters, sources)]
        self.modules: dict[str, dict] = {}
        self.extras: list[str] = []

    @property
    def path(self) -> Path:
        return self.stage.path

    def add(self, module: str, layout: ModuleLayout, result: ModuleResult) -> None:
        missing = {f"basis_{p}" for p in PARTS} | {f"coeffs_{p}" for p in PARTS} | {"ranks"}
        if not missing <= result.tensors.keys():
            raise MergeError(f"the method returned no reversible tensors for {module}; only rmm writes a bundle")
        for key in KEYS:
            if key in result.tensors:
                self.stream.add(f"{module}.{key}", result.tensors[key].to(self.dtype))
        T = len(self.tasks)
        s = result.stats
        self.modules[module] = {
            "layout": asdict(layout), "ranks": [int(k) for k in result.tensors["ranks"]], "p": int(s["p"]),
            "r": int(s["rank"]), "center": "mean_B" in result.tensors,
            "errors": [s[f"error_{t}"] for t in range(T)], "norms": [s[f"norm_{t}"] for t in range(T)],
            "stored_numbers": int(s["stored"]), "input_numbers": int(s["original"]),
        }

    def add_extra(self, key: str, tensor: torch.Tensor, module: str) -> None:
        """A full tensor carried over unchanged (modules_to_save); restored to the tasks that had it."""
        self.stream.add(f"extra.{key}", tensor)
        self.extras.append(key)

    def finish(self, config: dict) -> Path:
        self.stream.close()
        data = (self.path / TENSORS_FILE).read_bytes()
        modules = self.modules
        stored = sum(m["stored_numbers"] for m in modules.values())
        inputs = sum(m["input_numbers"] for m in modules.values())
        input_bytes = sum(t["input_bytes"] for t in self.tasks)
        T, r = len(self.tasks), max((m["r"] for m in modules.values()), default=0)
        p = max((m["p"] for m in modules.values()), default=0)
        center = any(m["center"] for m in modules.values())
        manifest = {
            "format": FORMAT, "version": VERSION, "method": "rmm", "base_model": config.get("base_model_name_or_path"),
            "dtype": str(self.dtype).removeprefix("torch."), "p": p, "center": center,
            "parameters": self.settings, "sha256": hashlib.sha256(data).hexdigest(),
            "tasks": [{k: v for k, v in t.items() if k != "input_bytes"} | {"error": _overall_error(modules, i)}
                      for i, t in enumerate(self.tasks)],
            "storage": {
                "bundle_bytes": len(data), "inputs_bytes": input_bytes, "ratio_bytes": len(data) / max(input_bytes, 1),
                "stored_numbers": stored, "input_numbers": inputs, "ratio": stored / max(inputs, 1),
                "paper_formula": "(p(r+T)+r)/(rT)" if center else "p(r+T)/(rT)",
                "paper_ratio": paper_ratio(p, r, T, center) if r else None,
            },
            "modules": modules,
        }
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return self.stage.path

    def commit(self) -> Path:
        return self.stage.commit()

    def abort(self) -> None:
        self.stream.discard()
        self.stage.abort()


def paper_ratio(p: int, r: int, T: int, center: bool = True) -> float:
    """Storage of the bundle relative to T rank-r adapters, per position: p·r basis + p·T coefficients + r mean."""
    return (p * (r + T) + (r if center else 0)) / (r * T)


@dataclass
class ReversibleBundle:
    """A loaded bundle: every task's adapter can be rebuilt from it without reading the files again."""

    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: str | Path) -> "ReversibleBundle":
        path = Path(path)
        manifest = _read_manifest(path)
        data = path / TENSORS_FILE
        if not data.is_file():
            raise MergeError(f"bundle {path} has no {TENSORS_FILE}; the bundle is incomplete, re-create it with mergekit-lowrank merge")
        raw = data.read_bytes()
        if hashlib.sha256(raw).hexdigest() != manifest.get("sha256"):
            raise MergeError(f"bundle {path}: {TENSORS_FILE} does not match the checksum in {MANIFEST}; the bundle is "
                             "corrupt, re-create it with mergekit-lowrank merge")
        try:
            from safetensors.torch import load as load_bytes

            tensors = load_bytes(raw)
        except Exception as e:
            raise MergeError(f"bundle {path}: cannot read {TENSORS_FILE} ({e}); the bundle is corrupt") from None
        bundle = cls(path, manifest, tensors)
        try:
            bundle._check()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MergeError(f"bundle {path}: {MANIFEST} is malformed ({type(e).__name__}: {e}); the bundle is corrupt") from None
        return bundle

    # -- what it holds ---------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def modules(self) -> list[str]:
        return list(self.manifest["modules"])

    def layout(self, module: str) -> ModuleLayout:
        d = self.manifest["modules"][module]["layout"]
        return ModuleLayout(d["kind"], tuple(d["shape"]), d.get("fan_in_fan_out", False), tuple(d.get("kernel", ())))

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise MergeError(f"bundle {self.path} has no task {task!r}; it holds: {', '.join(self.tasks)}")
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

    def write_adapter(self, task: str, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write task ``task`` as a PEFT adapter (r == lora_alpha, the task's own rank per module), atomically."""
        t = self.task_index(task)
        meta = self.manifest["tasks"][t]
        factors = self.adapter(task)
        extras = [k for k in meta.get("extra_keys", []) if f"extra.{k}" in self.tensors]
        dtype = getattr(torch, self.manifest.get("dtype", "float32"))
        writer = AdapterWriter(out, list(factors), extras, dtype=dtype, overwrite=overwrite)
        try:
            for module, f in factors.items():
                writer.add(module, self.layout(module), ModuleResult(f))
            for key in extras:
                module = key.removeprefix("base_model.model.").removesuffix(".weight").removesuffix(".bias")
                writer.add_extra(key, self.tensors[f"extra.{key}"], module)
            config = dict(meta["config"])
            config["base_model_name_or_path"] = config.get("base_model_name_or_path") or self.manifest.get("base_model")
            writer.finish(config)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    def to_peft(self, model, task: str, adapter_name: str | None = None):
        """Switch a loaded PeftModel to ``task``: overwrite the active adapter's lora_A/lora_B so that its update
        ``scaling · B A`` equals the task's ΔW (zero where the task lacks a module). Returns ``model``."""
        from peft.tuners.lora import LoraLayer

        t = self.task_index(task)
        if self.manifest["tasks"][t].get("extra_keys"):
            raise MergeError(f"task {task!r} carries modules_to_save tensors that to_peft cannot swap; use "
                             "write_adapter (mergekit-lowrank reconstruct) and load that adapter instead")
        name = adapter_name or model.active_adapter
        name = name if isinstance(name, str) else name[0]
        layers = {n.removeprefix("base_model.model."): mod for n, mod in model.named_modules()
                  if isinstance(mod, LoraLayer) and (name in mod.lora_A or name in mod.lora_embedding_A)}
        factors = self.adapter(task)
        missing = sorted(set(factors) - set(layers))
        if missing:
            raise MergeError(f"adapter {name!r} of the model has no LoRA layer on {missing[0]} ({len(missing)} modules "
                             "missing); load an adapter that targets every module of the bundle, e.g. one reconstructed from it")
        params = {}
        for module, layer in layers.items():  # check everything before touching any weight
            embedding = name in layer.lora_embedding_A
            A = layer.lora_embedding_A[name] if embedding else layer.lora_A[name].weight
            B = layer.lora_embedding_B[name] if embedding else layer.lora_B[name].weight
            if layer.merged:
                raise MergeError(f"the adapter is merged into the base weights at {module}; unmerge it before to_peft")
            if module in factors and A.shape[0] < factors[module].rank:
                raise MergeError(f"the loaded adapter has rank {A.shape[0]} but task {task!r} needs "
                                 f"{factors[module].rank}; load an adapter with rank >= the bundle's ranks", module=module)
            params[module] = (A, B, layer.scaling[name])
        with torch.no_grad():
            for module, (A, B, scaling) in params.items():
                f = factors.get(module)
                A.zero_()
                B.zero_()
                if f is None:
                    continue
                a, b = layout_values(self.layout(module), f)
                A[: f.rank] = a.to(A.dtype)
                B[:, : f.rank] = (b / scaling).to(B.dtype)
        return model

    # -- checks --------------------------------------------------------------------------------
    def _module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """One module's tensors; half-precision bundles are rebuilt in float32."""
        out = {k: self.tensors[f"{module}.{k}"] for k in KEYS if f"{module}.{k}" in self.tensors}
        return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in out.items()}

    def _check(self) -> None:
        T = len(self.manifest["tasks"])
        for module, info in self.manifest["modules"].items():
            m, n = info["layout"]["shape"]
            r, p = info["r"], info["p"]
            expected = {"basis_B": (m, r, p), "coeffs_B": (m, T, p), "basis_A": (n, r, p), "coeffs_A": (n, T, p)}
            if info["center"]:
                expected |= {"mean_B": (m, r), "mean_A": (n, r)}
            for key, shape in expected.items():
                got = self.tensors.get(f"{module}.{key}")
                if got is None or tuple(got.shape) != shape:
                    found = "missing" if got is None else f"shape {tuple(got.shape)}"
                    raise MergeError(f"bundle {self.path}: tensor {key} is {found}, expected {shape}; the bundle is corrupt",
                                     module=module)
            if len(info["ranks"]) != T or any(not 0 <= k <= r for k in info["ranks"]):
                raise MergeError(f"bundle {self.path}: ranks {info['ranks']} do not fit {T} tasks of rank <= {r}; the "
                                 "bundle is corrupt", module=module)


def layout_values(layout: ModuleLayout, f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A-like, B-like) tensors for ``f``: rank is dim 0 of the first and dim 1 of the second."""
    a, b = layout.peft_tensors(f).values()
    return a, b


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise MergeError(f"bundle {path} is not a directory; pass the directory written by an rmm merge")
    file = path / MANIFEST
    if not file.is_file():
        raise MergeError(f"{path} has no {MANIFEST}; it is not a reversible bundle (written by merge_method: rmm)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeError(f"bundle {path}: {MANIFEST} is not valid JSON ({e}); the bundle is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MergeError(f"bundle {path}: {MANIFEST} is not a {FORMAT} manifest; the bundle is corrupt")
    if manifest.get("version") != VERSION:
        raise MergeError(f"bundle {path} has format version {manifest.get('version')}; this mergekit-lowrank reads "
                         f"version {VERSION}")
    for key in ("tasks", "modules", "sha256"):
        if key not in manifest:
            raise MergeError(f"bundle {path}: {MANIFEST} lacks {key!r}; the bundle is corrupt")
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
    lines.append(f"p={manifest['p']} ({center}): stores {s['ratio']:.4f} of the inputs' numbers{paper}; "
                 f"{s['bundle_bytes']:,} bytes on disk vs {s['inputs_bytes']:,} for the adapters ({s['ratio_bytes']:.4f})")
    if manifest.get("dtype") in ("float16", "bfloat16"):
        lines.append(f"(errors are measured at compute precision, before the bundle is rounded to {manifest['dtype']})")
    return "\n".join(lines)


def public_source(source: str) -> str:
    """A task's source as recorded in a bundle that may be pushed: a local absolute path becomes its directory name."""
    return Path(source.rstrip("/\\")).name if is_local_path(source) else source
