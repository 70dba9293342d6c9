"""Method name → function + pydantic parameter schema.

A method is a pure function of one module's tensors::

    fn(factors: list[LoraFactors], weights: list[float], params: MethodParams) -> ModuleResult

``factors`` has one entry per adapter, in recipe order; an adapter that lacks the module gives the
rank-0 ``LoraFactors.zeros``. Methods do no I/O and run on whatever device their inputs are on.
To add a method: write ``methods/<name>.py`` with a ``@method(...)`` function and import it in
``methods/__init__.py``.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError
from typing_extensions import Annotated

from lowrank_methods.core.errors import RecipeError, short
from lowrank_methods.core.types import LoraFactors, ModuleResult



# Output rank: int = fixed rank; float in (0, 1] = smallest rank keeping that energy fraction, per module
# (written as rank_pattern); None = exact (every numerically nonzero component).
Rank = Annotated[StrictInt, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)] | None


# The largest |weight| or |lambda| a recipe may use: beyond it float32 results overflow (and no merge needs it).
MAX_MAGNITUDE = 1e6


class MethodParams(BaseModel):
    """Parameters every method accepts. Subclass it to declare a method's own parameters."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)
    lambda_: float = Field(1.0, alias="lambda", ge=-MAX_MAGNITUDE, le=MAX_MAGNITUDE,
                           description="global scale applied to the merged update")
    module: str = Field("", description="filled by the engine with the module's name (seeds per-module randomness)")


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[Sequence[LoraFactors], Sequence[float], MethodParams], ModuleResult]
    params: type[MethodParams]
    pretty_name: str
    reference_url: str | None = None
    output: Literal["adapter", "bundle"] = "adapter"
    in_mergekit: bool = True  # False for aliases of mergekit's own names (task_arithmetic, linear)
    summary: str = ""
    # (params, weights, ranks of each adapter at a module, 0 where absent) -> None or raises MergeError;
    # the refusals a method can make before computing, so that `validate` makes them too
    check: Callable[[MethodParams, Sequence[float], Sequence[int]], None] | None = None

    def parse_params(self, values: dict) -> MethodParams:
        try:
            return self.params.model_validate(values)
        except ValidationError as e:
            raise RecipeError(f"bad parameters for method {self.name!r}: {_one_line(e, self.parameter_names)}") from e

    @property
    def parameter_names(self) -> list[str]:
        """The names a recipe may set (aliases where a field has one; ``module`` is the engine's)."""
        return [f.alias or n for n, f in self.params.model_fields.items() if n != "module"]

    def validator(self, name: str) -> Callable:
        """The type check mergekit's ``evaluate_setting`` applies to each value of parameter ``name`` (lax, like
        mergekit's ``TypeAdapter(value_type)``); unknown names pass through and are refused by ``parse_params``."""
        for n, f in self.params.model_fields.items():
            if name in (n, f.alias):
                return _type_adapter(f.annotation).validate_python
        return lambda value: value


_METHODS: dict[str, Method] = {}


def method(name: str, *, params: type[MethodParams] = MethodParams, pretty_name: str, reference_url: str | None = None,
           output: Literal["adapter", "bundle"] = "adapter", in_mergekit: bool = True, check=None):
    """Decorator: register ``fn`` under ``name``."""

    def register(fn):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _METHODS[name] = Method(name, fn, params, pretty_name, reference_url, output, in_mergekit, doc[0] if doc else "",
                                check)
        return fn

    return register


def _load() -> None:
    from . import methods  # noqa: F401  (importing the package registers every method)


def get_method(name: str) -> Method:
    _load()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known methods: {', '.join(sorted(_METHODS))}"
        raise RecipeError(f"unknown merge_method {short(name)}{hint}")
    return _METHODS[name]


def list_methods() -> list[Method]:
    _load()
    return [_METHODS[k] for k in sorted(_METHODS)]


@functools.lru_cache(maxsize=None)
def _type_adapter(annotation) -> TypeAdapter:
    return TypeAdapter(annotation)


def _one_line(err: Exception, known: list[str] | None = None) -> str:
    """A pydantic error as one line; a name the model does not take gets a "did you mean" from ``known``."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        parts = []
        for e in errors():
            loc = ".".join(short(x, 40) if not isinstance(x, str) else x[:40] for x in e.get("loc", ())) or "parameters"
            if e.get("type") == "extra_forbidden" and known is not None:
                close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(known) or 'none'}"
                parts.append(f"{loc}: not a parameter of this method; {hint}")
                continue
            parts.append(f"{loc}: {e.get('msg')}")
        return "; ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "")
    return str(err).replace("\n", " ")
