"""The recipe: mergekit's YAML format, validated before any adapter is downloaded or read.

    merge_method: ctm
    base_model: org/base                      # optional when every adapter names its base
    models:
      - model: org/base+org/lora-math         # mergekit's base+lora form, or a plain adapter path / Hub id
        parameters: {weight: 1.0}
    parameters: {rank: 16, rule: ties, density: [0.2, 0.5], lambda: {filter: mlp, value: 0.8}}
    dtype: bfloat16

Parameter values follow mergekit exactly (``mergekit.config.evaluate_setting``): a scalar, a gradient
over layers (a list, interpolated at t = layer / (n_layers - 1)), or filters ``{filter, value}`` matched
by substring against ``<module>.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import MergeError
from .registry import Method, MethodParams, get_method, _one_line

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


Setting = Union[Scalar, Conditional, list[Union[Scalar, Conditional]]]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] | None = None


class RecipeFile(BaseModel):
    """The subset of mergekit's MergeConfiguration that adapter merging uses."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Any = None
    tokenizer: Any = None
    chat_template: str | None = None


ENGINE_PARAMETERS = {"output"}  # read by the engine, not by the method
PER_ADAPTER_PARAMETERS = {"weight"}
DTYPES = {"float32", "float16", "bfloat16", "float64"}


@dataclass(frozen=True)
class AdapterRef:
    """One `models:` entry: an adapter (local dir or Hub id, optional @revision), maybe with its base."""

    name: str
    adapter: str
    revision: str | None
    base: str | None
    settings: dict[str, Setting]


@dataclass
class Recipe:
    method: Method
    adapters: list[AdapterRef]
    base_model: str | None
    settings: dict[str, Setting]
    output: Literal["adapter", "model", "bundle"]
    dtype: str | None
    text: str

    # -- parameters per module ----------------------------------------------------------------
    def params_for(self, module: str, t: float = 0.0) -> MethodParams:
        values = {k: _evaluate(self.settings[k], module, t, k) for k in self.settings if k not in ENGINE_PARAMETERS}
        values = {k: v for k, v in values.items() if v is not None}
        return self.method.parse_params({**values, "module": module})

    def weights_for(self, module: str, t: float = 0.0) -> list[float]:
        weights = []
        for a in self.adapters:
            w = _evaluate(a.settings["weight"], module, t, "weight") if "weight" in a.settings else None
            weights.append(1.0 if w is None else _as_float(w, f"weight of {a.name}"))
        return weights

    def check(self, probe_modules: list[str] | None = None) -> None:
        """Resolve every parameter at both ends of every gradient and under every filter (no tensors read)."""
        filters = {c.filter for s in self._all_settings() for c in _conditionals(s) if c.filter and c.filter != "*"}
        names = list(probe_modules or []) + [f"{f}" for f in sorted(filters)] + ["model.layers.0.probe"]
        for name in names:
            for t in (0.0, 0.5, 1.0):
                self.params_for(name, t)
                self.weights_for(name, t)

    def _all_settings(self):
        yield from self.settings.values()
        for a in self.adapters:
            yield from a.settings.values()


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise MergeError(f"cannot read recipe {path}: {e.strerror}") from None
    return parse_recipe(text)


def parse_recipe(text: str) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MergeError(f"recipe is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise MergeError("recipe must be a YAML mapping with merge_method and models")
    if "slices" in data or "modules" in data:
        raise MergeError("recipes with slices/modules are full-model recipes; adapter merging takes a flat `models:` list")
    try:
        raw = RecipeFile.model_validate(data)
    except ValidationError as e:
        raise MergeError(f"recipe: {_one_line(e)}") from None
    method = get_method(raw.merge_method)
    settings = dict(raw.parameters or {})
    if "module" in settings:
        raise MergeError("`module` is not a recipe parameter (the engine sets it per module)")
    output = settings.get("output", "bundle" if method.output == "bundle" else "adapter")
    if output not in ("adapter", "model", "bundle"):
        raise MergeError(f"parameters.output must be adapter, model or bundle, got {output!r}")
    if (output == "bundle") != (method.output == "bundle"):
        raise MergeError(f"method {method.name!r} writes {'a reversible bundle' if method.output == 'bundle' else 'merged weights'}; "
                         f"output: {output} does not fit it")
    dtype = raw.out_dtype or raw.dtype
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    if not raw.models:
        raise MergeError("recipe lists no models; add the adapters under `models:`")
    adapters = _adapter_refs(raw.models, raw.base_model)
    recipe = Recipe(method, adapters, raw.base_model, settings, output, dtype, text)
    recipe.check()
    return recipe


def _adapter_refs(models: list[ModelEntry], base_model: str | None) -> list[AdapterRef]:
    refs, seen = [], {}
    for entry in models:
        if entry.model.count("+") > 1:
            raise MergeError(f"model {entry.model!r} has more than one '+'; write base+adapter")
        base, _, adapter = entry.model.rpartition("+")
        adapter, _, revision = adapter.partition("@")
        settings = dict(entry.parameters or {})
        unknown = set(settings) - PER_ADAPTER_PARAMETERS
        if unknown:
            raise MergeError(f"model {entry.model!r}: per-model parameters may only be {sorted(PER_ADAPTER_PARAMETERS)}, "
                             f"got {sorted(unknown)}; put method parameters under the top-level `parameters:`")
        name = Path(adapter.rstrip("/")).name or adapter
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        refs.append(AdapterRef(name, adapter, revision or None, base or None, settings))
    if base_model is None:
        bases = {r.base.partition("@")[0] for r in refs if r.base}
        if len(bases) > 1:
            raise MergeError(f"models name different bases ({', '.join(sorted(bases))}); set base_model to choose one")
    return refs


def _conditionals(setting) -> list[Conditional]:
    if isinstance(setting, Conditional):
        return [setting]
    if isinstance(setting, list):
        return [c for c in setting if isinstance(c, Conditional)]
    return []


def _evaluate(setting: Setting, module: str, t: float, name: str):
    """mergekit.config.evaluate_setting, without importing mergekit (10 s of transformers imports)."""
    tensor_name = f"{module}.weight"
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        value = (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
        return type(setting[0])(value) if isinstance(setting[0], int) and value == int(value) else value
    for cond in setting:
        if not isinstance(cond, Conditional):
            raise MergeError(f"parameter {name!r} mixes plain values and filters in one list")
        if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
            result = _evaluate(cond.value, module, t, name)
            if result is not None:
                return result
    return None


def _as_float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeError(f"{what} must be a number, got {value!r}")
    return float(value)
