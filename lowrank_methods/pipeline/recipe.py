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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from lowrank_methods.core.errors import BaseModelError, RecipeError, short
from lowrank_methods.core.method import Method, get_method, _one_line
from lowrank_methods.core.params import MAX_MAGNITUDE, MethodParams

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


ENGINE_PARAMETERS = {"output", "rank_budget", "serve_for"}  # read by the engine, not by the method
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
    rank_budget: int | None = None  # the parameters of rank r everywhere, spread over modules (core/allocation.py)
    serve_for: str | None = None    # the serving engine the adapter is stored for (pipeline/serving.py)

    # -- parameters per module ----------------------------------------------------------------
    def params_for(self, module: str, t: float = 0.0) -> MethodParams:
        values = {k: _evaluate(self.settings[k], module, t, f"bad parameters for method {self.method.name!r}: {short(k, 40)}",
                               self.method.validator(k))
                  for k in self.settings if k not in ENGINE_PARAMETERS}
        values = {k: v for k, v in values.items() if v is not None}
        return self.method.parse_params(values)

    def local_inputs(self) -> tuple[Path, ...]:
        """The recipe's inputs that are local directories (an output must never replace one of them)."""
        names = [ref.adapter for ref in self.adapters] + [ref.base for ref in self.adapters if ref.base]
        names += [self.base_model] if self.base_model else []
        return tuple(Path(n) for n in names if Path(n).exists())

    def weights_for(self, module: str, t: float = 0.0) -> list[float]:
        weights = []
        for a in self.adapters:
            w = _evaluate(a.settings["weight"], module, t, f"weight of {a.name}", _WEIGHT) if "weight" in a.settings else None
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

    def check_output_fields(self) -> None:
        """``output: model`` copies the base's tokenizer unchanged: refuse the recipe fields mergekit's planner
        honours for a model (tokenizer_source other than base, tokenizer, chat_template)."""
        if self.output != "model":
            return
        data = load_yaml(self.text) if self.text else {}
        if not isinstance(data, dict):
            return
        source = data.get("tokenizer_source")
        if source not in (None, "base") or data.get("tokenizer") is not None or data.get("chat_template") is not None:
            raise BaseModelError("output: model copies the base model's tokenizer unchanged; remove tokenizer_source, "
                                 "tokenizer and chat_template from the recipe")

    def _all_settings(self):
        yield from self.settings.values()
        for a in self.adapters:
            yield from a.settings.values()


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; a megabyte is already absurd
MAX_DEPTH = 32              # nesting of mappings and lists
MAX_NODES = 100_000         # values after expanding aliases (a "billion laughs" bomb expands to 10^9)


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_recipe_text(path))


def read_recipe_text(path: str | Path) -> str:
    """The recipe file as text: at most 1 MiB, UTF-8.

    ``path`` is a local file, or a recipe in a Hub repo, ``org/repo:path/recipe.yml[@revision]`` (a local file of that
    name wins), downloaded with ``hf_hub_download`` into huggingface_hub's cache (``HF_HUB_OFFLINE=1``: from the
    cache, else one line saying so)."""
    if not Path(path).exists():
        from lowrank_methods.publish.hub import parse_recipe_ref

        ref = parse_recipe_ref(str(path))
        if ref is not None:
            from lowrank_methods.publish.hub import download_file

            repo_id, filename, revision = ref
            cached = download_file(repo_id, filename, revision, what=f"recipe {path}", max_bytes=MAX_RECIPE_BYTES,
                                   error=RecipeError)
            return _read_text(cached, str(path))
    return _read_text(Path(path), Path(path))


def _read_text(path: Path, name) -> str:
    """The file ``path`` (called ``name`` in messages) as UTF-8 text of at most 1 MiB."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read recipe {name}: {e.strerror}") from e
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {name} is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a short YAML file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from e
    return text


def load_yaml(text: str):
    """``yaml.safe_load`` with the nesting depth and the expanded size bounded before anything is built."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a short YAML file")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # the event stream: no recursion, nothing built
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeError(f"recipe nests deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1})")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # aliases stay shared nodes here
        if node is not None and _expanded_size(node, {}) > MAX_NODES:
            raise RecipeError(f"recipe expands to more than {MAX_NODES:,} values through YAML aliases; write the "
                              "values out")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e


def _expanded_size(node, memo: dict) -> int:
    """How many values ``node`` becomes once every alias is expanded (memoised: linear in the node graph)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_NODES + 1  # a recursive alias expands forever
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def parse_recipe(text: str) -> Recipe:
    data = load_yaml(text)
    if not isinstance(data, dict):
        raise RecipeError("recipe must be a YAML mapping with merge_method and models")
    if "slices" in data or "modules" in data:
        raise RecipeError("recipes with slices/modules are full-model recipes; adapter merging takes a flat `models:` list")
    try:
        raw = RecipeFile.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"recipe: {_one_line(e)}") from e
    method = get_method(raw.merge_method)
    settings = dict(raw.parameters or {})
    output = settings.get("output", "bundle" if method.output == "bundle" else "adapter")
    if output not in ("adapter", "model", "bundle"):
        raise RecipeError(f"parameters.output must be adapter, model or bundle, got {short(output)}")
    if (output == "bundle") != (method.output == "bundle"):
        raise RecipeError(f"method {method.name!r} writes {'a reversible bundle' if method.output == 'bundle' else 'merged weights'}; "
                         f"output: {output} does not fit it")
    rank_budget = settings.get("rank_budget")
    if rank_budget is not None:
        if isinstance(rank_budget, bool) or not isinstance(rank_budget, int) or rank_budget < 1:
            raise RecipeError(f"parameters.rank_budget must be a positive integer (the uniform rank whose parameter "
                              f"count is spread over the modules), got {short(rank_budget)}")
        if output != "adapter":
            raise RecipeError(f"parameters.rank_budget sizes an adapter; output: {output} does not take it")
    serve_for = check_serve_for(settings.get("serve_for"), output)
    dtype = raw.out_dtype or raw.dtype
    if dtype is not None and dtype not in DTYPES:
        raise RecipeError(f"dtype {short(dtype)} is not one of {', '.join(sorted(DTYPES))}")
    if not raw.models:
        raise RecipeError("recipe lists no models; add the adapters under `models:`")
    adapters = _adapter_refs(raw.models, raw.base_model)
    recipe = Recipe(method, adapters, raw.base_model, settings, output, dtype, text, rank_budget, serve_for)
    recipe.check()
    return recipe


def check_serve_for(engine, output: str, *, where: str = "parameters.serve_for") -> str | None:
    """``serve_for`` (or ``--for``): one of the engines of ``formats/serving.py``, for an adapter output."""
    from lowrank_methods.formats.serving import ENGINES

    if engine is None:
        return None
    if not isinstance(engine, str) or engine not in ENGINES:
        raise RecipeError(f"{where} must be one of {', '.join(ENGINES)}, got {short(engine)}")
    if output != "adapter":
        raise RecipeError(f"{where} stores an adapter for a serving engine; output: {output} does not take it")
    return engine


def _adapter_refs(models: list[ModelEntry], base_model: str | None) -> list[AdapterRef]:
    refs, seen = [], {}
    for entry in models:
        if entry.model.count("+") > 1:
            raise RecipeError(f"model {short(entry.model)} has more than one '+'; write base+adapter")
        base, _, adapter = entry.model.rpartition("+")
        adapter, _, revision = adapter.partition("@")
        settings = dict(entry.parameters or {})
        unknown = set(settings) - PER_ADAPTER_PARAMETERS
        if unknown:
            raise RecipeError(f"model {short(entry.model)}: per-model parameters may only be {sorted(PER_ADAPTER_PARAMETERS)}, "
                             f"got {sorted(unknown)}; put method parameters under the top-level `parameters:`")
        name = Path(adapter.rstrip("/")).name or adapter
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        refs.append(AdapterRef(name, adapter, revision or None, base or None, settings))
    if base_model is None:
        bases = {r.base.partition("@")[0] for r in refs if r.base}
        if len(bases) > 1:
            raise RecipeError(f"models name different bases ({', '.join(sorted(bases))}); set base_model to choose one")
    return refs


def _conditionals(setting) -> list[Conditional]:
    if isinstance(setting, Conditional):
        return [setting]
    if isinstance(setting, list):
        return [c for c in setting if isinstance(c, Conditional)]
    return []


def evaluate_setting(setting: Setting, tensor_name: str, t: float, validate: Callable[[Any], Any]):
    """``mergekit.config.evaluate_setting``, step for step, without importing mergekit (10 s of imports).

    Each value is validated with the parameter's type *before* interpolating (so YAML's string "1e-3" is the
    number 0.001 for a float parameter), numeric endpoints interpolate at t, other values select
    ``values[int(t·(n−1))]``; filters match by substring of the tensor name, and the first match decides."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [validate(e) for e in setting]
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if not isinstance(cond, Conditional):
            raise RecipeError("a parameter mixes plain values and filters in one list; write {filter: ..., value: ...} "
                              "for every entry")
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(cond.value, tensor_name, t, validate)
    return None


def _evaluate(setting: Setting, module: str, t: float, what: str, validate: Callable[[Any], Any]):
    try:
        return evaluate_setting(setting, f"{module}.weight", t, validate)
    except ValidationError as e:
        raise RecipeError(f"{what}: {e.errors()[0]['msg']}") from e


_WEIGHT = TypeAdapter(float).validate_python  # mergekit's `weight` is a float parameter


def _as_float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{what} must be a number, got {short(value)}")
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise RecipeError(f"{what} must be a finite number of magnitude at most {MAX_MAGNITUDE:g}, got {value!r}")
    return float(value)
